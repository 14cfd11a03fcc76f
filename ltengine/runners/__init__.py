"""Runners execute the model over the KV they own: ``reference`` (contiguous caches, the exactness
reference) and ``paged`` (one block pool, batched decode, CUDA graphs), behind ``base.Runner``."""
from .base import LayerMajorPrefill, PrefillJob, PrefillRequest, PrefillResult, PrefillTask, Runner, prefill_attention
from .paged import PagedRunner
from .reference import ReferenceRunner, decode_step

__all__ = ["LayerMajorPrefill", "PagedRunner", "PrefillJob", "PrefillRequest", "PrefillResult", "PrefillTask",
           "ReferenceRunner", "Runner", "decode_step", "prefill_attention"]
