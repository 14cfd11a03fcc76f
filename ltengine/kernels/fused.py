"""Fused elementwise kernels of the decode step (CUDA, fp16/bf16) and their PyTorch twins.

- ``add_rmsnorm(x, residual, weight, eps)``: ``r = residual + x`` (rounded to the input dtype, as the
  model's own ``h = h + out`` is), then RMSNorm of r; returns (normed, r). ``residual`` None: norm only.
- ``rope_store(qkv, cos, sin, ...)``: in one launch over the heads of a fused QKV row: optional per-head
  RMSNorm of q and k (Qwen3), RoPE on q (in place) and k, and the k and v rows written into the KV
  pool at each sequence's row (an fp8 pool: quantized per row as ``fp8.quantize`` does, scales beside).
- ``silu_mul(gate_up)``: ``silu(g) * u`` of a fused gate/up projection ``[N, 2I]`` -> ``[N, I]``.
The references follow the HF modules' math (fp32 statistics, products in the input dtype).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import FP8_MAX, quantize

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = None


# ---------------------------------------------------------------------------------- references
def add_rmsnorm_ref(x, residual, weight, eps):
    r = x if residual is None else (residual + x)
    h = r.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), r


def rope_store_ref(qkv, cos, sin, h_q, h_kv, d, k_flat, v_flat, rows, qn=None, kn=None, eps=1e-6,
                   ks_flat=None, vs_flat=None):
    """qkv ``[B, (H_q + 2 H_kv) * D]`` (q is rotated in place); cos/sin ``[B, D]``; rows ``[B]``
    flat pool rows; k_flat/v_flat ``[rows, H_kv, D]``; an fp8 pool's ks_flat/vs_flat ``[rows, H_kv]``.
    Returns q ``[B, H_q, D]``."""
    b = qkv.shape[0]
    q = qkv[:, : h_q * d].view(b, h_q, d)
    k = qkv[:, h_q * d: (h_q + h_kv) * d].view(b, h_kv, d)
    v = qkv[:, (h_q + h_kv) * d:].view(b, h_kv, d)
    if qn is not None:
        q = add_rmsnorm_ref(q, None, qn, eps)[0]
        k = add_rmsnorm_ref(k, None, kn, eps)[0]

    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]

    qr = rot(q)
    qkv[:, : h_q * d].copy_(qr.reshape(b, -1))
    if ks_flat is None:
        k_flat[rows] = rot(k)
        v_flat[rows] = v
    else:
        for flat, sflat, x in ((k_flat, ks_flat, rot(k)), (v_flat, vs_flat, v)):
            x8, sc = quantize(x)
            flat[rows] = x8
            sflat[rows] = sc
    return qkv[:, : h_q * d].view(b, h_q, d)


def silu_mul_ref(gate_up):
    g, u = gate_up.chunk(2, dim=-1)
    return F.silu(g) * u


# ---------------------------------------------------------------------------------- Triton
if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(X, R, W, Y, RO, sx, sr, sy, sro, n, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < n
        x = tl.load(X + row * sx + cols, mask=m, other=0.0)
        if HAS_RES:
            x = (x + tl.load(R + row * sr + cols, mask=m, other=0.0)).to(X.dtype.element_ty)
            tl.store(RO + row * sro + cols, x, mask=m)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n + eps)
        y = (xf * rstd).to(X.dtype.element_ty).to(tl.float32) * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * sy + cols, y.to(Y.dtype.element_ty), mask=m)

    _FP8_MAX = tl.constexpr(FP8_MAX)

    @triton.jit
    def _store_row(DST, SC, half, o1, o2, HALF: tl.constexpr, FP8: tl.constexpr):
        """One K or V row, its two halves ``o1``/``o2``, into the pool at DST; ``FP8``: scaled to e4m3 as
        ``fp8.quantize`` does (amax / 448, correctly rounded divisions), the scale stored at SC."""
        if FP8:
            f1 = o1.to(tl.float32)
            f2 = o2.to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(f1), 0), tl.max(tl.abs(f2), 0))
            sc = tl.math.div_rn(amax, _FP8_MAX)
            sc = tl.where(sc > 0, sc, 1.0)
            f1 = tl.minimum(tl.maximum(tl.math.div_rn(f1, sc), -_FP8_MAX), _FP8_MAX)
            f2 = tl.minimum(tl.maximum(tl.math.div_rn(f2, sc), -_FP8_MAX), _FP8_MAX)
            tl.store(DST + half, f1.to(DST.dtype.element_ty))
            tl.store(DST + HALF + half, f2.to(DST.dtype.element_ty))
            tl.store(SC, sc)
        else:
            tl.store(DST + half, o1)
            tl.store(DST + HALF + half, o2)

    @triton.jit
    def _rope_store_kernel(QKV, COS, SIN, KF, VF, KS, VS, ROWS, QN, KN, s_qkv, s_c, eps,
                           HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, QK_NORM: tl.constexpr,
                           FP8: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        half = tl.arange(0, D // 2)
        base = QKV + b * s_qkv + h * D
        row = tl.load(ROWS + b).to(tl.int64)
        if h < HQ + HK:
            x1 = tl.load(base + half).to(tl.float32)
            x2 = tl.load(base + D // 2 + half).to(tl.float32)
            dt = QKV.dtype.element_ty
            if QK_NORM:
                if h < HQ:
                    w1 = tl.load(QN + half).to(tl.float32)
                    w2 = tl.load(QN + D // 2 + half).to(tl.float32)
                else:
                    w1 = tl.load(KN + half).to(tl.float32)
                    w2 = tl.load(KN + D // 2 + half).to(tl.float32)
                rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / D + eps)
                x1 = ((x1 * rstd).to(dt).to(tl.float32) * w1).to(dt).to(tl.float32)
                x2 = ((x2 * rstd).to(dt).to(tl.float32) * w2).to(dt).to(tl.float32)
            c1 = tl.load(COS + b * s_c + half).to(tl.float32)
            c2 = tl.load(COS + b * s_c + D // 2 + half).to(tl.float32)
            s1 = tl.load(SIN + b * s_c + half).to(tl.float32)
            s2 = tl.load(SIN + b * s_c + D // 2 + half).to(tl.float32)
            o1 = (x1 * c1 - x2 * s1).to(dt)
            o2 = (x2 * c2 + x1 * s2).to(dt)
            if h < HQ:
                tl.store(base + half, o1)
                tl.store(base + D // 2 + half, o2)
            else:
                _store_row(KF + (row * HK + (h - HQ)) * D, KS + row * HK + (h - HQ), half, o1, o2, D // 2, FP8)
        else:
            hv = h - HQ - HK
            _store_row(VF + (row * HK + hv) * D, VS + row * HK + hv, half, tl.load(base + half),
                       tl.load(base + D // 2 + half), D // 2, FP8)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, s_gu, s_o, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n
        g = tl.load(GU + row * s_gu + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(GU + row * s_gu + n + cols, mask=m, other=0.0)
        a = (g / (1.0 + tl.exp(-g))).to(u.dtype)
        tl.store(OUT + row * s_o + cols, a * u, mask=m)


def available(device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> bool:
    """The fused step runs fp16/bf16 models on CUDA, over a pool of the model's dtype or fp8."""
    return triton is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) \
        and kv_dtype in (None, dtype, torch.float8_e4m3fn)


def add_rmsnorm(x, residual, weight, eps):
    """Triton twin of ``add_rmsnorm_ref`` for ``[N, hidden]`` rows."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    y = torch.empty_like(x2)
    ro = torch.empty_like(x2) if residual is not None else x2
    r2 = residual.reshape(-1, n) if residual is not None else x2
    _add_rmsnorm_kernel[(x2.shape[0],)](x2, r2, weight, y, ro, x2.stride(0), r2.stride(0), y.stride(0), ro.stride(0),
                                        n, eps, HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n),
                                        num_warps=8 if n >= 4096 else 4)
    return y.view(x.shape), (ro.view(x.shape) if residual is not None else x)


def rope_store(qkv, cos, sin, h_q, h_kv, d, k_flat, v_flat, rows, qn=None, kn=None, eps=1e-6,
               ks_flat=None, vs_flat=None):
    """Triton twin of ``rope_store_ref``."""
    b = qkv.shape[0]
    fp8 = ks_flat is not None
    _rope_store_kernel[(b, h_q + 2 * h_kv)](
        qkv, cos, sin, k_flat, v_flat, ks_flat if fp8 else cos, vs_flat if fp8 else cos, rows,
        qn if qn is not None else cos, kn if kn is not None else cos,
        qkv.stride(0), cos.stride(0), eps, HQ=h_q, HK=h_kv, D=d, QK_NORM=qn is not None, FP8=fp8, num_warps=1)
    return qkv[:, : h_q * d].view(b, h_q, d)


def silu_mul(gate_up):
    n = gate_up.shape[-1] // 2
    out = torch.empty((gate_up.shape[0], n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(gate_up.shape[0], triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n,
                                                                BLOCK=block, num_warps=4)
    return out
