"""The engine on a CUDA GPU: kernels and graphs against the reference path (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_model
from ltengine import Engine, LazyConfig
from ltengine.memory.cache import FullKV, KVMeter, demote
from ltengine.kernels import cuda as kcuda
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


def test_overlapped_decode_on_gpu_equals_plain():
    """The default on CUDA (step n + 1 launched before step n's tokens reach the host) against the
    plain loop, fp32, CUDA graphs, a budget that makes prompts wait, per-request lengths, batched
    prefill: the same tokens, and the pool is back to idle."""
    gpu = tiny_model("qwen3", layers=6).cuda()
    prompts = _prompts(5, (64, 64, 64, 64, 30, 90, 7, 150, 60, 33, 120, 10))
    new = [11, 11, 30, 2, 5, 17, 9, 3, 12, 20, 1, 8]
    outs = {}
    for overlap in (False, True):
        engine = Engine(gpu, _Ids(), lazy=LazyConfig(fraction=0.5, sink=2, window=14), kv_budget="256KiB",
                        block_size=16, overlap=overlap)
        outs[overlap] = engine.generate(prompts, max_new_tokens=new)
        assert engine.last_stats["runner"] == "paged"
        assert engine.last_stats["kv_used_after"] == 0
        assert engine.last_stats["peak_kv_bytes"] <= 256 * 1024
    assert max(o.stats.prefill_batch for o in outs[True]) > 1
    for a, b in zip(outs[False], outs[True]):
        assert b.token_ids == a.token_ids and len(b.token_ids) == len(a.token_ids)
    assert [len(o.token_ids) for o in outs[True]] == new


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_bf16_fused_paged_decode_agrees_with_reference(family):
    """bf16, head dim 64: the paged runner (fused kernels, Triton paged attention, CUDA graphs) against
    the same model upcast to fp32 on the contiguous runner's PyTorch reference kernels, all fed the
    fp32 model's greedy tokens (teacher forcing). Tolerance from the reference's own rounding: at
    every step the fast path's logits error is at most 2x that of the bf16 model on the reference
    kernels, + 1e-2; and the same lazy layers."""
    import copy

    import transformers as tf

    from conftest import prefill_requests
    from ltengine.lazy import make_policy
    from ltengine.memory.pool import KVPool
    from ltengine.runners import PagedRunner, ReferenceRunner

    cfg = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, head_dim=64, max_position_embeddings=8192, initializer_range=0.1,
               eos_token_id=None, bos_token_id=None, pad_token_id=None)
    cls, conf = {"llama": (tf.LlamaForCausalLM, tf.LlamaConfig), "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config),
                 "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config)}[family]
    torch.manual_seed(0)
    model = cls(conf(**cfg)).to(device="cuda", dtype=torch.bfloat16).eval()
    if family == "qwen2":  # give the qkv biases values, so the fused bias is tested
        for layer in model.model.layers:
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(m.bias, std=0.1)
    engine32 = Engine(copy.deepcopy(model).float(), _Ids(), lazy=None)
    engine = Engine(model, _Ids(), lazy=None)
    ref_backend = get_backend("cuda", prefer="reference")
    sink, window = 4, 60

    def rel(x, y):
        return ((x - y).norm() / y.norm()).item()

    for n in (50, 700, 3000):
        ids = torch.tensor(torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist(),
                           device="cuda")
        lazy = LazyConfig(fraction=0.5, sink=sink, window=window)
        ref32 = ReferenceRunner(engine32.adapter, ref_backend, None)
        ref = ReferenceRunner(engine.adapter, ref_backend, None)
        pool = KVPool(4 * 4 * (n + 40) // 16 + 8, 16, 2, 64, torch.bfloat16, torch.device("cuda"))
        fast = PagedRunner(engine.adapter, engine.backend, pool)
        assert fast.fused is not None and fast.attn_name in ("cuda", "triton") and fast.graphs
        # with the CUDA build the step folds its norms, residual adds and SiLU into the projections
        assert fast._fold_linear(1) == kcuda.has_cuda_ext()
        runs = [r.prefill(prefill_requests(r.backend, [ids], [make_policy(lazy, 4, 2)], lazy, 24))[0]
                for r in (ref32, ref, fast)]
        assert runs[0].lazy_layers == runs[1].lazy_layers == runs[2].lazy_layers and len(runs[0].lazy_layers) == 2
        logits = [r.logits[None].float() for r in runs]
        for step in range(24):
            own, err = rel(logits[1], logits[0]), rel(logits[2], logits[0])
            assert err <= 2 * own + 1e-2, f"{family}, prompt {n}, step {step}: error {err:.3e}, bf16 reference {own:.3e}"
            tok = logits[0].argmax(-1)
            pos = torch.tensor([n + step], device="cuda")
            logits = [r.decode([x.handle], tok, pos).float().clone() for r, x in zip((ref32, ref, fast), runs)]
        for r, x in zip((ref32, ref, fast), runs):
            r.release(x.handle)
        assert pool.used_blocks == 1  # only the scratch block


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
    # a new layer of the same size takes the freed K and V blocks: reserved memory does not grow
    reuse = [torch.empty(t, h, d, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
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
