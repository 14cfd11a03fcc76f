"""fp8 KV on the GPU: the paged decode over fp8 pools (Triton, and the csrc CUDA kernel when built) against its PyTorch twin, the fused
rope + fp8 store against its twin, and the engine's fp8 path (CUDA graphs, fused step) end to end.
Skipped with a reason without a CUDA GPU or Triton.

Decode tolerances, flash-attention style, on fresh random inputs including odd sizes:
- same fp8 pools: ``max|out - ref64| <= 2 * max|ref_lp - ref64| + 1e-3`` and relative Frobenius error
  <= 1e-2, where ref64 = attention in float64 over the dequantized pools, ref_lp = the twin with q (and
  its output) in the low precision;
- against the unquantized K/V (what fp8 storage costs): ``max|out - exact| <= 2 * max|twin - exact|
  + 2 * max|ref_lp - ref64| + 1e-3``, where exact = float64 attention over the K/V before quantization
  and twin = the fp32 twin over the fp8 pools: the kernel may add no more than fp8's own rounding error
  (2^-4 relative per element, ``kernels/fp8.py``) already costs the reference.
Block 0 and every slot past a row's length hold NaN (fp8 and scales), so a stray read fails.
"""
from __future__ import annotations

import pytest
import torch

from conftest import SpacedIds as _Ids, random_prompts as _prompts, tiny_model
from ltengine import Engine, LazyConfig
from ltengine.kernels import cuda as kcuda
from ltengine.kernels import fused
from ltengine.kernels.fp8 import FP8, dequantize, quantize
from ltengine.kernels.paged import paged_decode_ref, paged_decode_triton, triton
from ltengine.kernels.reference import decode_full_ref

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(triton is None, reason="needs triton"),
]


def _case(seed, b, h_kv, group, d, bs, lengths):
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks_each = [-(-n // bs) for n in lengths]
    mb, nb = max(blocks_each) + 2, sum(blocks_each) + 8
    mag = torch.logspace(-1, 1, h_kv, device="cuda")[None, None, :, None]  # heads of different scales
    k = torch.randn(nb, bs, h_kv, d, device="cuda", generator=g) * mag
    v = torch.randn(nb, bs, h_kv, d, device="cuda", generator=g)
    perm = torch.randperm(nb - 1, device="cuda", generator=g) + 1
    tables = torch.zeros(b, mb, dtype=torch.int32, device="cuda")
    at = 0
    for i, n in enumerate(blocks_each):
        tables[i, :n] = perm[at:at + n].int()
        at += n
    (k8, ks), (v8, vs) = quantize(k), quantize(v)
    poison = torch.zeros(nb, bs, dtype=torch.bool, device="cuda")
    poison[0] = True
    for i, n in enumerate(lengths):
        if n % bs:
            poison[tables[i, n // bs].long(), n % bs:] = True
    for x in (k8, v8):
        x.view(torch.uint8)[poison] = 0x7F  # e4m3fn's NaN code
    for s in (ks, vs):
        s[poison] = float("nan")
    q = torch.randn(b, h_kv * group, d, device="cuda", generator=g)
    return q, k, v, (k8, ks, v8, vs), tables, torch.tensor(lengths, dtype=torch.int32, device="cuda")


def _dense(pool, tables):
    b, mb = tables.shape
    return pool[tables.long()].reshape(b, mb * pool.shape[1], *pool.shape[2:])


# (q dtype, head dim, query heads per KV head, block size): odd head dims and groups, both block sizes,
# each a compile of its own (kept to seven so the device run stays short)
SHAPES = [(torch.bfloat16, 128, 4, 64), (torch.bfloat16, 128, 8, 16), (torch.bfloat16, 64, 1, 16),
          (torch.bfloat16, 72, 3, 64), (torch.float16, 128, 4, 16), (torch.float32, 64, 8, 16),
          (torch.float32, 72, 3, 64)]


@pytest.mark.parametrize("dtype, d, group, bs", SHAPES, ids=[f"{str(s[0])[6:]}-d{s[1]}-g{s[2]}-bs{s[3]}" for s in SHAPES])
@pytest.mark.parametrize("lengths", [[1], [4099], [1, 17, 1024, 333, 4096, 64] * 3 + [7, 5000]],
                         ids=["1", "4099", "mixed20"])
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_fp8_paged_decode_matches_twin(dtype, d, group, bs, lengths, impl):
    if impl == "cuda" and not kcuda.has_cuda_ext():
        pytest.skip("ltengine._C was built without CUDA kernels")
    if impl == "cuda" and not kcuda.paged_supports(FP8, d):
        pytest.skip(f"the CUDA kernel reads fp8 pools with D % 16 == 0 (D = {d} decodes through Triton)")
    b = len(lengths)
    q, k, v, (k8, ks, v8, vs), tables, n = _case(d * 7 + group * 131 + bs + b, b, 2, group, d, bs, lengths)
    scale = d ** -0.5
    ql = q.to(dtype)
    fn = paged_decode_triton if impl == "triton" else kcuda.paged_decode
    out = fn(ql, k8, v8, tables, n, scale, ks, vs)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "the kernel read a poisoned slot or wrote NaN"
    clean = [torch.nan_to_num(x.float(), nan=0.0) for x in (k8, ks, v8, vs)]
    kd, vd = dequantize(clean[0], clean[1], torch.float64), dequantize(clean[2], clean[3], torch.float64)
    ref64 = decode_full_ref(ql.double(), _dense(kd, tables), _dense(vd, tables), n, scale)
    k8c, v8c = clean[0].to(FP8), clean[2].to(FP8)
    # the CUDA kernel runs fp16 MMAs on fp8 pools: an fp32 q is rounded to fp16 there, so its low-precision
    # reference is the twin on that q (a bf16 or fp16 q is already as coarse)
    q_lp = ql.half().to(dtype) if impl == "cuda" and dtype == torch.float32 else ql
    ref_lp = paged_decode_ref(q_lp, k8c, v8c, tables, n, scale, clean[1], clean[3]).double()
    own = (ref_lp - ref64).abs().max().item()
    err = (out.double() - ref64).abs().max().item()
    assert err <= 2 * own + 1e-3, f"max error {err:.3e} > 2 x {own:.3e} + 1e-3"
    assert ((out.double() - ref64).norm() / ref64.norm()).item() <= 1e-2
    # what fp8 storage costs, and that the kernel adds no more than that
    exact = decode_full_ref(ql.double(), _dense(k.double(), tables), _dense(v.double(), tables), n, scale)
    twin = paged_decode_ref(ql.float(), k8c, v8c, tables, n, scale, clean[1], clean[3]).double()
    fp8_err = (twin - exact).abs().max().item()
    err_exact = (out.double() - exact).abs().max().item()
    assert err_exact <= 2 * fp8_err + 2 * own + 1e-3, f"{err_exact:.3e} vs fp8's own {fp8_err:.3e}"


@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("v_mag", [1e-2, 1e-3])
def test_fp8_paged_decode_keeps_precision_on_small_values(impl, v_mag):
    """Value rows of small magnitude (their scale amax / 448 small: p * scale below fp16's normals unless the
    kernel rescales it): relative error against the fp32 twin on the same fp8 pools at most 1e-2."""
    if impl == "cuda" and not kcuda.has_cuda_ext():
        pytest.skip("ltengine._C was built without CUDA kernels")
    lengths = [4096, 333, 1, 2000]
    q, k, v, _, tables, n = _case(int(1 / v_mag), len(lengths), 2, 4, 128, 64, lengths)
    (k8, ks), (v8, vs) = quantize(k), quantize(v * v_mag)
    ql = q.to(torch.bfloat16)
    fn = paged_decode_triton if impl == "triton" else kcuda.paged_decode
    out = fn(ql, k8, v8, tables, n, 128 ** -0.5, ks, vs).double()
    twin = paged_decode_ref(ql.float(), k8, v8, tables, n, 128 ** -0.5, ks, vs).double()
    rel = ((out - twin).norm() / twin.norm()).item()
    assert rel <= 1e-2, f"relative error {rel:.2e} on values of magnitude ~{v_mag}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, h_q, h_kv, d", [(1, 8, 2, 64), (7, 32, 8, 128), (33, 9, 3, 64)])
def test_fused_rope_store_fp8_matches_twin(dtype, b, h_q, h_kv, d):
    """The fused kernel quantizes as ``fp8.quantize`` does (amax / 448, round-to-nearest-even casts):
    scales equal to fp32 division's rounding, fp8 codes equal but for rare one-step boundary cases."""
    g = torch.Generator(device="cuda").manual_seed(b * d + h_q)
    qkv = (torch.randn(b, (h_q + 2 * h_kv) * d, device="cuda", generator=g) * 4).to(dtype)
    pos = torch.randint(0, 4000, (b,), device="cuda", generator=g).float()
    freqs = pos[:, None] / 10000 ** (torch.arange(0, d, 2, device="cuda") / d)
    ang = torch.cat([freqs, freqs], dim=-1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    rows = torch.randperm(4 * b, device="cuda", generator=g)[:b]
    outs = []
    for fn in (fused.rope_store, fused.rope_store_ref):
        kf = torch.zeros(4 * b, h_kv, d, dtype=FP8, device="cuda")
        vf = torch.zeros_like(kf)
        ks = torch.zeros(4 * b, h_kv, device="cuda")
        vs = torch.zeros_like(ks)
        q = fn(qkv.clone(), cos, sin, h_q, h_kv, d, kf, vf, rows, ks_flat=ks, vs_flat=vs)
        outs.append((q.clone(), kf.view(torch.uint8), vf.view(torch.uint8), ks, vs))
    (q1, k1, v1, ks1, vs1), (q2, k2, v2, ks2, vs2) = outs
    # q is rotated in fp32 and rounded to the model dtype in both: near a cancellation one rounding step
    # of the operands' magnitude remains (measured on the H200: 0.031 = one bf16 step at |q| ~ 8)
    step = 2 * torch.finfo(dtype).eps * qkv.float().abs().max().item()
    torch.testing.assert_close(q1.float(), q2.float(), rtol=1e-2, atol=step)
    # Triton's fp32 division (amax / 448) is not correctly rounded: up to 2 ulp of fp32 (measured: 1 ulp,
    # 9e-8 relative); a scale that far off can move a code across a rounding boundary by one fp8 step
    torch.testing.assert_close(vs1, vs2, rtol=2 * torch.finfo(torch.float32).eps, atol=0)
    # one e4m3 step of the larger of the two codes (3 mantissa bits: 2^-3 of it; subnormals 2^-9): a code
    # just under a power of two and its neighbour above it are a step of the upper binade apart
    vdiff = (v1.view(FP8).float() - v2.view(FP8).float()).abs()
    assert (vdiff <= torch.maximum(v1.view(FP8).float().abs(), v2.view(FP8).float().abs()) * 2 ** -3 + 2 ** -9).all()
    assert (v1 != v2).float().mean().item() <= 0.01  # a rare boundary case, not a systematic difference
    # K is rotated in fp32 then rounded to the model dtype in both; a last-bit difference in that
    # rounding can move the row max, so scales agree to the dtype's rounding and codes to one step
    torch.testing.assert_close(ks1, ks2, rtol=2 * torch.finfo(dtype).eps + 2 * torch.finfo(torch.float32).eps, atol=0)
    # compared as values (code x scale): one fp8 step of the larger, plus, near a cancellation in the
    # rotation, the one model-dtype step of the operands that remains (as for q above)
    kv1, kv2 = k1.view(FP8).float() * ks1[..., None], k2.view(FP8).float() * ks2[..., None]
    bound = torch.maximum(kv1.abs(), kv2.abs()) * 2 ** -3 + ks2[..., None] * 2 ** -9 + step
    assert ((kv1 - kv2).abs() <= bound).all(), ((kv1 - kv2).abs() - bound).max().item()


def test_fp8_engine_on_cuda_graphs_and_budget():
    """The paged fp8 path on CUDA (fused step, CUDA graphs, the backend's fp8 decode) runs under a budget and
    agrees with the fp32-math reference backend on the same fp8 pool for the first tokens."""
    model = tiny_model("llama", layers=6).to("cuda", torch.bfloat16)
    prompts = _prompts(5, (300, 40, 129))
    lazy = LazyConfig(fraction=0.5, sink=4, window=60, probe=8)
    budget = 256 * 1024
    fast = Engine(model, _Ids(), lazy=lazy, kv_budget=budget, kv_dtype="fp8")
    assert fast.runner.pool.dtype == FP8 and fast.runner.fused is not None and fast.runner.graphs
    assert fast.runner.attn_name == fast.backend.impl_for("paged_decode", FP8, fast.adapter.shape.head_dim)
    outs = fast.generate(prompts, max_new_tokens=24)
    assert fast.last_stats["peak_kv_bytes"] <= budget
    ref = Engine(model, _Ids(), lazy=lazy, kv_budget=budget, kv_dtype="fp8", backend="reference",
                 graphs=False).generate(prompts, max_new_tokens=24)
    for a, r in zip(outs, ref):
        assert a.lazy_layers == r.lazy_layers
        assert a.token_ids[:2] == r.token_ids[:2]  # bf16 decode: later tokens may tie-break apart
