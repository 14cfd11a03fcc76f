"""Fused decode kernels against their PyTorch twins (GPU; skipped with a reason elsewhere).

Tolerance: relative Frobenius error against an fp32 computation of the reference <= 2x the
reference's own error in the input precision + 1e-3 (flash-attention style), and <= 1e-2.
"""
from __future__ import annotations

import pytest
import torch

from ltengine.kernels import fused

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(fused.triton is None, reason="needs triton"),
]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _check(out, ref_lp, ref32):
    assert torch.isfinite(out.float()).all()
    err, own = _rel(out, ref32), _rel(ref_lp, ref32)
    assert err <= 2 * own + 1e-3 and err <= 1e-2, f"error {err:.2e}, reference's own {own:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, n", [(1, 576), (33, 4096), (7, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rmsnorm(dtype, rows, n, with_residual):
    g = torch.Generator(device="cuda").manual_seed(rows * n)
    x = torch.randn(rows, n, device="cuda", generator=g).to(dtype)
    r = torch.randn(rows, n, device="cuda", generator=g).to(dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(n, device="cuda", generator=g)).to(dtype)
    y, ro = fused.add_rmsnorm(x, r, w, 1e-5)
    y_lp, ro_lp = fused.add_rmsnorm_ref(x, r, w, 1e-5)
    y32, _ = fused.add_rmsnorm_ref(x.float(), None if r is None else r.float(), w.float(), 1e-5)
    _check(y, y_lp, y32)
    torch.testing.assert_close(ro, ro_lp, rtol=0, atol=0)  # the residual sum is rounded exactly like the model's


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, h_q, h_kv, d", [(1, 9, 3, 64), (33, 32, 8, 128), (5, 16, 16, 64)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_store(dtype, b, h_q, h_kv, d, qk_norm):
    g = torch.Generator(device="cuda").manual_seed(b * h_q * d)
    qkv = torch.randn(b, (h_q + 2 * h_kv) * d, device="cuda", generator=g).to(dtype)
    ang = torch.rand(b, d // 2, device="cuda", generator=g) * 100
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype)
    qn = (1 + 0.1 * torch.randn(d, device="cuda", generator=g)).to(dtype) if qk_norm else None
    kn = (1 + 0.1 * torch.randn(d, device="cuda", generator=g)).to(dtype) if qk_norm else None
    rows = torch.randperm(3 * b, device="cuda", generator=g)[:b]
    pools = [torch.full((3 * b, h_kv, d), float("nan"), device="cuda", dtype=dtype) for _ in range(6)]
    outs = []
    for fn, src, (kf, vf), cast in (
            (fused.rope_store, qkv.clone(), pools[0:2], lambda t: t),
            (fused.rope_store_ref, qkv.clone(), pools[2:4], lambda t: t),
            (fused.rope_store_ref, qkv.float(), [p.float() for p in pools[4:6]], lambda t: t.float())):
        q = fn(src, cast(cos), cast(sin), h_q, h_kv, d, kf, vf, rows,
               None if qn is None else cast(qn), None if kn is None else cast(kn), 1e-6)
        outs.append((q, kf[rows], vf[rows]))
    for i in range(3):
        _check(outs[0][i], outs[1][i], outs[2][i])
    torch.testing.assert_close(outs[0][2], outs[1][2], rtol=0, atol=0)  # v is copied, not computed
    untouched = torch.ones(3 * b, dtype=torch.bool, device="cuda")
    untouched[rows] = False
    assert pools[0][untouched].isnan().all(), "rows other than the sequences' were written"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, n", [(1, 1536), (33, 14336), (3, 1000)])
def test_silu_mul(dtype, rows, n):
    g = torch.Generator(device="cuda").manual_seed(n)
    gu = torch.randn(rows, 2 * n, device="cuda", generator=g).to(dtype)
    _check(fused.silu_mul(gu), fused.silu_mul_ref(gu), fused.silu_mul_ref(gu.float()))
