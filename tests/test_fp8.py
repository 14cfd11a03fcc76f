"""fp8 KV (``kv_dtype="fp8"``) on CPU: quantization bounds, byte counts against the formula, the budget,
paged == reference token for token, preemption, demotion moving scales, and the paged-decode twin
against dequantize-then-attend. The Triton kernel's tests are in test_fp8_cuda.py."""
from __future__ import annotations

import pytest
import torch

from conftest import SpacedIds as _Ids, random_prompts as _prompts, tiny_model
from ltengine import Engine, LazyConfig
from ltengine.config import EngineConfig
from ltengine.kernels import cuda as kcuda, fused
from ltengine.kernels.fp8 import FP8, FP8_MAX, dequantize, quantize, resolve_kv_dtype
from ltengine.kernels.paged import paged_decode_ref, paged_truncate_ref_
from ltengine.kernels.reference import decode_full_ref
from ltengine.memory.pool import KVPool

LAZY = LazyConfig(fraction=0.5, sink=2, window=14, probe=8)


def test_quantize_error_within_e4m3_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(257, 3, 37, generator=g) * torch.logspace(-3, 3, 37)  # rows spanning 6 decades
    x[5, 1] = 0.0  # an all-zero row: scale 1, zeros back
    x8, s = quantize(x)
    assert x8.dtype == FP8 and s.shape == x.shape[:-1] and s[5, 1] == 1.0
    back = dequantize(x8, s)
    assert (x8.float().abs().amax(-1) <= FP8_MAX).all()
    # round to nearest: relative 2^-4 in e4m3's normal range, absolute 2^-10 * s among its subnormals
    bound = torch.maximum(x.abs() * 2.0 ** -4, s.unsqueeze(-1) * 2.0 ** -10)
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    assert torch.equal(back[5, 1], torch.zeros(37))


def test_kv_dtype_is_validated_and_normalized():
    assert EngineConfig(kv_dtype="fp8").kv_dtype == FP8
    assert EngineConfig(kv_dtype="auto").kv_dtype is None and EngineConfig().kv_dtype is None
    assert EngineConfig(kv_dtype=torch.bfloat16).kv_dtype == torch.bfloat16
    assert resolve_kv_dtype("float16") == torch.float16
    for bad in ("int8", torch.int8, 8):
        with pytest.raises(ValueError, match="kv_dtype must be None, 'auto'"):
            EngineConfig(kv_dtype=bad)


def test_fp8_pool_bytes_equal_the_formula():
    bs, h, d = 16, 2, 24
    pool = KVPool(5, bs, h, d, FP8, torch.device("cpu"))
    per_block = 2 * bs * h * (d * 1 + 4)  # fp8 K and V rows plus one float32 scale each per token and head
    assert KVPool.block_bytes(bs, h, d, FP8) == pool.bytes_per_block == per_block
    assert pool.nbytes == 5 * per_block
    assert KVPool.block_bytes(bs, h, d, torch.float32) == 2 * bs * h * d * 4


@pytest.mark.parametrize("runner", ["paged", "reference"])
def test_fp8_stats_count_fp8_bytes(runner):
    model = tiny_model("llama", layers=6)  # GQA 4:2, head dim 16
    prompts = _prompts(3, (100, 40, 9))
    engine = Engine(model, _Ids(), lazy=LAZY, runner=runner, kv_dtype="fp8", block_size=8)
    per_tl = 2 * 2 * (16 + 4)
    assert engine.adapter.kv_bytes_per_token_layer == per_tl
    for out, ids in zip(engine.generate(prompts, max_new_tokens=4), prompts):
        t, n_lazy, ring = len(ids), len(out.lazy_layers), min(len(ids), 16)
        assert out.stats.full_kv_bytes == per_tl * 6 * t
        if runner == "reference":
            assert out.stats.kv_bytes_after_prefill == per_tl * ((6 - n_lazy) * t + n_lazy * ring)
        else:  # whole blocks of 8 tokens; the full layers' last block has room for decode tokens
            blocks = (6 - n_lazy) * -(-(t + 4) // 8) + n_lazy * -(-min(t + 4, 16) // 8)
            assert out.stats.kv_bytes_after_prefill == blocks * 8 * per_tl


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("lazy", [LazyConfig(fraction=0.0), LAZY], ids=["full", "lazy"])
def test_fp8_paged_equals_reference(family, lazy):
    """Both runners quantize the same rows the same way and attend over the same dequantized values."""
    model = tiny_model(family, layers=6)
    prompts = _prompts(1, (120, 33, 70, 5))
    ref = Engine(model, _Ids(), lazy=lazy, runner="reference", kv_dtype="fp8").generate(prompts, max_new_tokens=24)
    paged = Engine(model, _Ids(), lazy=lazy, runner="paged", kv_dtype="fp8", block_size=8).generate(
        prompts, max_new_tokens=24)
    for a, b in zip(ref, paged):
        assert (b.token_ids, b.lazy_layers) == (a.token_ids, a.lazy_layers)


@pytest.mark.parametrize("lazy", [None, LAZY], ids=["full", "lazy"])
def test_fp8_budget_never_exceeded_with_preemption(lazy):
    """A pool that runs dry swaps fp8 sequences (their scales too) out and back: the tokens equal each
    prompt run alone under the same budget, and the budget is never exceeded."""
    model = tiny_model("llama", layers=4)
    prompts = _prompts(11, (40, 24, 33, 17, 48, 29))
    # 4 layers x 2 KV heads x (16 fp8 bytes + a 4-byte scale) x 2 = 320 B per token: the prompts and a
    # block of decode room each fit at once (~75 KiB), their 60 decode tokens each (~110 KiB more) do not
    budget = 96 * 1024
    engine = Engine(model, _Ids(), lazy=lazy, runner="paged", block_size=8, kv_budget=budget, kv_dtype="fp8")
    alone = [engine.generate(p, max_new_tokens=60, ignore_eos=True) for p in prompts]
    outs = engine.generate(prompts, max_new_tokens=60, ignore_eos=True)
    stats = engine.last_stats
    assert stats["preemptions"] > 0, "the budget was meant to force preemption"
    assert stats["peak_kv_bytes"] <= budget and stats["kv_used_after"] == 0
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]


def test_paged_truncate_moves_fp8_rows_and_scales():
    """The reference and the C++ op move fp8 rows byte for byte, and scales by a second call."""
    g = torch.Generator().manual_seed(3)
    nb, bs, h, d, sink, window = 12, 4, 2, 8, 2, 5
    tables = torch.stack([torch.randperm(nb, generator=g)[:5] for _ in range(2)]).int()
    lengths = torch.tensor([19, 6], dtype=torch.int32)
    k8, ks = quantize(torch.randn(nb, bs, h, d, generator=g))
    v8, vs = quantize(torch.randn(nb, bs, h, d, generator=g))
    impls = [paged_truncate_ref_] + ([kcuda.paged_truncate_] if kcuda.has_cpu_ext() else [])
    results = []
    for fn in impls:
        pk, pv, sk, sv = k8.clone(), v8.clone(), ks.clone(), vs.clone()
        fn(pk, pv, tables, lengths, sink, window)
        fn(sk.unsqueeze(-1), sv.unsqueeze(-1), tables, lengths, sink, window)
        results.append((dequantize(pk, sk), dequantize(pv, sv)))
    full_k = dequantize(k8, ks)[tables[0].long()].reshape(-1, h, d)
    got_k = results[0][0][tables[0].long()].reshape(-1, h, d)
    for p in range(19 - window, 19):  # the last window tokens sit in their ring slots, scales with them
        assert torch.equal(got_k[sink + (p - sink) % window], full_k[p])
    assert torch.equal(got_k[:sink], full_k[:sink])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("b, h_kv, group, d, bs, lengths", [
    (1, 1, 1, 8, 4, [1]), (3, 2, 4, 24, 16, [5, 64, 33]), (4, 3, 3, 40, 7, [13, 1, 50, 29])])
def test_paged_decode_twin_matches_dequantize_then_attend(b, h_kv, group, d, bs, lengths):
    """The twin folds the scales into scores and probabilities (as the Triton kernel does); the same
    attention over a dequantized contiguous copy agrees to fp32 rounding."""
    g = torch.Generator().manual_seed(b * 100 + d)
    mb = max(-(-n // bs) for n in lengths)
    nb = b * mb + 3
    k8, ks = quantize(torch.randn(nb, bs, h_kv, d, generator=g) * 3)
    v8, vs = quantize(torch.randn(nb, bs, h_kv, d, generator=g))
    tables = torch.randperm(nb, generator=g)[:b * mb].view(b, mb).int()
    q = torch.randn(b, h_kv * group, d, generator=g)
    n = torch.tensor(lengths, dtype=torch.int32)
    out = paged_decode_ref(q, k8, v8, tables, n, d ** -0.5, ks, vs)
    k = dequantize(k8, ks)[tables.long()].reshape(b, mb * bs, h_kv, d)
    v = dequantize(v8, vs)[tables.long()].reshape(b, mb * bs, h_kv, d)
    torch.testing.assert_close(out, decode_full_ref(q, k, v, n, d ** -0.5), rtol=1e-5, atol=1e-5)


def test_rope_store_ref_fp8_writes_quantized_rows():
    """The fused step's reference twin stores fp8 rows exactly as ``quantize`` (the engine's writes) does."""
    g = torch.Generator().manual_seed(5)
    b, hq, hk, d = 3, 4, 2, 16
    qkv = torch.randn(b, (hq + 2 * hk) * d, generator=g)
    cos, sin = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    rows = torch.tensor([5, 1, 7])
    kf8, vf8 = torch.zeros(10, hk, d, dtype=FP8), torch.zeros(10, hk, d, dtype=FP8)
    ks, vs = torch.zeros(10, hk), torch.zeros(10, hk)
    kf, vf = torch.zeros(10, hk, d), torch.zeros(10, hk, d)
    fused.rope_store_ref(qkv.clone(), cos, sin, hq, hk, d, kf, vf, rows)
    fused.rope_store_ref(qkv.clone(), cos, sin, hq, hk, d, kf8, vf8, rows, ks_flat=ks, vs_flat=vs)
    for x8, s, x in ((kf8, ks, kf), (vf8, vs, vf)):
        e8, es = quantize(x[rows])
        assert torch.equal(x8[rows].view(torch.uint8), e8.view(torch.uint8)) and torch.equal(s[rows], es)


def test_backend_puts_the_csrc_fp8_decode_where_it_reads_the_pool():
    """fp8 pools with D % 16 == 0 go to the CUDA kernel when it is built; others to Triton / the twin."""
    assert kcuda.paged_supports(FP8, 128) and kcuda.paged_supports(FP8, 64)
    assert not kcuda.paged_supports(FP8, 72) and not kcuda.paged_supports(FP8, 8)
    assert kcuda.paged_supports(torch.bfloat16, 72) and not kcuda.paged_supports(torch.bfloat16, 36)


def test_eval_harness_builds_fp8_caches_like_the_engine():
    """The shared-prefill harness stores its decode caches in the adapter's KV dtype: greedy tokens
    equal ``Engine.generate``'s with ``kv_dtype="fp8"`` (reference runner), lazy layers too."""
    from ltengine.eval.harness import greedy, shared_prefill

    model = tiny_model("qwen2", layers=6)
    engine = Engine(model, _Ids(), lazy=LAZY, runner="reference", kv_dtype="fp8")
    ids = _prompts(4, (90,))[0]
    out = engine.generate(ids, max_new_tokens=12, ignore_eos=True)
    sp = shared_prefill(engine.adapter, ids, LAZY.probe)
    layers = sp.lazy_layers(LAZY)
    cache = sp.build_cache(layers, LAZY.sink, LAZY.window, len(ids) + 12, engine.backend)
    assert all(c.ks is not None and c.k.dtype == FP8 for c in cache.layers)
    tokens = greedy(engine.adapter, engine.backend, [cache], sp.logits, len(ids), 12, set())[0]
    assert (tokens, layers) == (out.token_ids, out.lazy_layers)
