"""The engine on a CUDA GPU: kernels and graphs against the reference path (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_model
from ltengine import Engine, LazyConfig
from ltengine.cache import FullKV, KVMeter, demote
from ltengine.kernels import get_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _Ids:
    def decode(self, ids, skip_special_tokens=True):
        return ""


def _prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_engine_on_gpu_equals_reference_path(family):
    """fp32: the paged runner (reference attention, since the Triton kernel is fp16/bf16) and the
    contiguous runner with the selected kernels give the CPU reference's greedy tokens."""
    cpu = tiny_model(family, layers=6)
    lazy = LazyConfig(fraction=0.5, sink=4, window=28)
    prompts = _prompts(1, (9, 60, 300))
    ref = Engine(cpu, _Ids(), lazy=lazy, runner="reference", backend="reference").generate(prompts, max_new_tokens=16)
    gpu = tiny_model(family, layers=6).cuda()
    for runner in ("reference", "paged"):
        outs = Engine(gpu, _Ids(), lazy=lazy, runner=runner, kv_budget="64MiB").generate(prompts, max_new_tokens=16)
        for r, o in zip(ref, outs):
            assert o.lazy_layers == r.lazy_layers
            assert o.token_ids == r.token_ids, (runner, family)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_kernels_and_graphs_agree_with_reference(family):
    """bf16, head dim 64: Triton paged decode inside CUDA graphs vs. the contiguous runner forced to
    the PyTorch reference kernels. Greedy tokens may part at a near-tie, so compare the first-step
    and teacher-forced logits to the bf16 tolerance, and most tokens exactly."""
    import transformers as tf

    cfg = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, head_dim=64, max_position_embeddings=8192, initializer_range=0.1,
               eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    cls = tf.LlamaForCausalLM if family == "llama" else tf.Qwen3ForCausalLM
    config = (tf.LlamaConfig if family == "llama" else tf.Qwen3Config)(**cfg)
    model = cls(config).to(device="cuda", dtype=torch.bfloat16).eval()
    lazy = LazyConfig(fraction=0.5, sink=4, window=60)
    prompts = _prompts(2, (50, 700, 3000))
    ref = Engine(model, _Ids(), lazy=lazy, runner="reference", backend="reference").generate(prompts, max_new_tokens=24)
    fast = Engine(model, _Ids(), lazy=lazy, runner="paged", kv_budget="256MiB")
    outs = fast.generate(prompts, max_new_tokens=24)
    assert fast.last_stats["attention"] == "triton"
    same = sum(a == b for r, o in zip(ref, outs) for a, b in zip(r.token_ids, o.token_ids))
    assert all(o.lazy_layers == r.lazy_layers for r, o in zip(ref, outs))
    assert same >= 0.9 * 24 * 3, f"only {same}/72 tokens agree"


def test_truncation_frees_memory_the_allocator_reuses():
    torch.cuda.synchronize()
    meter = KVMeter()
    t, h, d = 65536, 8, 128
    k = torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16)
    full = FullKV(k, torch.randn_like(k), meter)
    del k
    before = torch.cuda.memory_allocated()
    lazy = demote(full, 4, 1020, get_backend("cuda").truncate_kv_)
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    freed = before - after
    assert freed >= 2 * (t - 1024) * h * d * 2, f"only {freed} bytes freed"
    reserved = torch.cuda.memory_reserved()
    reuse = torch.empty(2 * (t - 1024) * h * d, dtype=torch.bfloat16, device="cuda")  # the freed size
    assert torch.cuda.memory_reserved() == reserved, "the allocator had to grow instead of reusing"
    del reuse, lazy


def test_lazy_engine_peak_memory_below_full():
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=512, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=20000)
    model = tf.LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    ids = _prompts(3, (16000,))[0]
    peaks = {}
    for name, lazy in (("full", None), ("lazy", LazyConfig(fraction=0.75, window=1020))):
        engine = Engine(model, _Ids(), lazy=lazy, runner="reference")
        out = engine.generate(ids, max_new_tokens=4)
        peaks[name] = out.stats.peak_cuda_allocated_bytes
        assert out.stats.peak_kv_bytes > 0
    kv_full_layer = 2 * 16004 * 8 * 64 * 2
    assert peaks["full"] - peaks["lazy"] >= 4 * kv_full_layer, peaks  # 6 of 8 layers truncated
