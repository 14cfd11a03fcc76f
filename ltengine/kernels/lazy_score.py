"""Triton lazy-ratio kernel: the share of attention mass the last P prompt queries put on sink + window keys.

Reference twin: ``ltengine.lazy.lazy_ratio`` (materializes the ``[H_kv, G*P, T]`` probabilities in fp32).
Here nothing is materialized: program (kv head, row tile, split) streams its key range once, keeping per
query row a running max and two running sums of ``exp(score - max)`` -- over every causal key and over the
kept ones (``j < sink`` or ``j > pos - window``). Splits merge on the host side like flash-decoding chunks;
a row's ratio is ``kept / all``. fp32 accumulation (fp32 inputs: IEEE dots, no TF32). At T = 32k, 32 query
heads, P = 64 this reads K once per row tile (~0.1 ms per layer on an H100) instead of writing and
re-reading ~1 GB of fp32 scores.

Importing this module never fails: without triton, ``available()`` is False and calls raise.
"""

from __future__ import annotations

import functools

import torch

from ._triton import available, tl, triton

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in DTYPES and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


@functools.cache
def _kernel():
    if triton is None:
        raise RuntimeError("triton is not installed")

    @triton.jit
    def lazy_mass_kernel(Q, K, M_OUT, ALL_OUT, KEEP_OUT,
                         s_qh, s_qp, s_kh, s_kt, T, P, SINK, WINDOW, scale, per_split,
                         G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         IEEE: tl.constexpr):
        h = tl.program_id(0)
        tile = tl.program_id(1)
        split = tl.program_id(2)
        n_splits = tl.num_programs(2)
        r = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # row = g * P + i within this kv head
        rmask = r < G * P
        g = r // P
        i = r % P
        pos = T - P + i  # absolute position of the query
        d = tl.arange(0, D)
        q = tl.load(Q + (h * G + g)[:, None] * s_qh + i[:, None] * s_qp + d[None, :], mask=rmask[:, None], other=0.0)
        lo = split * per_split
        hi = tl.minimum(lo + per_split, T)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_all = tl.zeros([BLOCK_M], tl.float32)
        l_keep = tl.zeros([BLOCK_M], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            k = tl.load(K + h * s_kh + t[:, None] * s_kt + d[None, :], mask=(t < hi)[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            valid = (t[None, :] <= pos[:, None]) & (t[None, :] < hi) & rmask[:, None]
            keep = valid & ((t[None, :] < SINK) | (t[None, :] > pos[:, None] - WINDOW))
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no valid key yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_all = l_all * alpha + tl.sum(p, 1)
            l_keep = l_keep * alpha + tl.sum(tl.where(keep, p, 0.0), 1)
            m_i = m_new
        out = (h * (G * P) + r) * n_splits + split
        tl.store(M_OUT + out, m_i, mask=rmask)
        tl.store(ALL_OUT + out, l_all, mask=rmask)
        tl.store(KEEP_OUT + out, l_keep, mask=rmask)

    return lazy_mass_kernel


def _splits(h_kv: int, tiles: int, t: int, block_n: int, sms: int) -> int:
    """Key-axis splits: about two programs per SM, no split shorter than 8 key tiles."""
    want = -(-2 * sms // (h_kv * tiles))
    return max(1, min(want, -(-t // (8 * block_n))))


def lazy_mass_triton(q: torch.Tensor, k: torch.Tensor, sink: int, window: int, scale: float) -> torch.Tensor:
    """Per-row kept mass ``[H_kv, G, P]`` (fp32); q ``[H_q, P, D]``, k ``[H_kv, T, D]`` (any strides with
    a unit last stride): the kernel twin of ``ltengine.lazy.kept_mass``."""
    h_q, p, d = q.shape
    h_kv, t, _ = k.shape
    if h_q % h_kv or p > t or k.shape[-1] != d:
        raise ValueError(f"lazy_mass_triton: q {tuple(q.shape)} and k {tuple(k.shape)} do not match "
                         "([H_q, P, D] with H_q a multiple of H_kv, [H_kv, T, D] with P <= T)")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    g = h_q // h_kv
    block_m, block_n = 64, 64
    tiles = -(-(g * p) // block_m)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    splits = _splits(h_kv, tiles, t, block_n, sms)
    per = -(-(-(-t // splits)) // block_n) * block_n
    splits = -(-t // per)
    m = torch.empty((h_kv * g * p, splits), dtype=torch.float32, device=q.device)
    l_all, l_keep = torch.empty_like(m), torch.empty_like(m)
    _kernel()[(h_kv, tiles, splits)](
        q, k, m, l_all, l_keep, q.stride(0), q.stride(1), k.stride(0), k.stride(1), t, p, sink, window,
        float(scale), per, G=g, D=d, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2)
    top = m.max(dim=1, keepdim=True).values  # every row has key 0, so top is finite
    w = torch.exp(m - top)  # empty splits: m = -inf -> weight 0
    mass = (l_keep * w).sum(1) / (l_all * w).sum(1)
    return mass.view(h_kv, g, p)


def lazy_ratio_triton(q: torch.Tensor, k: torch.Tensor, sink: int, window: int, scale: float) -> float:
    """Mean kept mass over heads and queries: ``ltengine.lazy.lazy_ratio`` on the GPU."""
    return float(lazy_mass_triton(q, k, sink, window, scale).mean())
