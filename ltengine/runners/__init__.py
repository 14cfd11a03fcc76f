"""Runners execute the model over the KV they own: ``reference`` (contiguous caches, the exactness
reference) and ``paged`` (one block pool, batched decode, CUDA graphs), behind ``base.Runner``."""
import torch

from ..memory.pool import KVPool
from .base import LayerMajorPrefill, PrefillJob, PrefillRequest, PrefillResult, PrefillTask, Runner, prefill_attention
from .paged import PagedRunner
from .reference import ReferenceRunner, decode_step

__all__ = ["LayerMajorPrefill", "build_runner", "default_cuda_budget", "PagedRunner", "PrefillJob", "PrefillRequest", "PrefillResult", "PrefillTask",
           "ReferenceRunner", "Runner", "decode_step", "prefill_attention"]


def build_runner(kind: str, adapter, backend, config, budget: int | None) -> Runner:
    """The runner of ``kind`` ("reference" | "paged") holding at most ``budget`` KV bytes. A paged runner
    with no budget gets a pool that grows on CPU; on CUDA, 80% of the free memory less 4 GiB (room for
    a long prompt's prefill activations and the CUDA graphs)."""
    if kind == "reference":
        return ReferenceRunner(adapter, backend, budget)
    shape, dev, bs = adapter.shape, adapter.device, config.block_size
    per_block = KVPool.block_bytes(bs, shape.num_kv_heads, shape.head_dim, adapter.kv_dtype)
    growable = budget is None and dev.type != "cuda"
    if budget is None and not growable:
        budget = default_cuda_budget(dev)
    blocks = 64 if growable else max(2, budget // per_block + 1)
    pool = KVPool(blocks, bs, shape.num_kv_heads, shape.head_dim, adapter.kv_dtype, dev, growable=growable)
    return PagedRunner(adapter, backend, pool, graphs=config.graphs, fused_step=config.backend != "reference")


def default_cuda_budget(device: torch.device) -> int:
    """KV bytes a paged runner takes on ``device`` when given no budget: 80% of the free memory less 4 GiB."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * 0.8) - (4 << 30)
