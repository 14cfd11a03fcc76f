"""Sink + window prefill attention (streaming prefill of a layer known to be lazy), and its PyTorch twin.

    prefill_sink_window(q, k, v, sink, window, scale) -> o
    q ``[B, T, H_q, D]``, k/v ``[B, T, H_kv, D]`` (rotated; ``H_q`` a multiple of ``H_kv``) -> ``[B, T, H_q, D]``

Query i attends keys j with ``j <= i`` and (``j < sink`` or ``i - window < j``): the keys a sink +
window cache holds when token i is decoded, so a streaming-prefilled layer sees in prefill what it
sees in decode. Work and memory are O(T * (sink + window)), never a T x T mask.

- ``prefill_sink_window_ref`` (the twin, any device): query chunks of ``chunk`` rows; each chunk
  attends, through PyTorch SDPA and a ``[chunk, sink + window + chunk]`` boolean mask, to the sink
  keys and to the keys from ``window - 1`` before the chunk to its end.
- ``prefill_sink_window_triton`` (CUDA): flash-attention forward, one program per (query tile, batch
  x query head); it visits the key tiles holding sinks, then the ``ceil((window - 1 + BLOCK_M) /
  BLOCK_N)`` tiles of the window band, and nothing else, with an online softmax in fp32 (fp32 inputs: IEEE dots, no TF32).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._triton import available, tl, triton

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q must be [B, T, H_q, D] and k, v [B, T, H_kv, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")
    if sink < 0 or window < 1:
        raise ValueError(f"sink must be >= 0 and window >= 1, got sink={sink}, window={window}")


def prefill_sink_window_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int,
                            scale: float, chunk: int | None = None) -> torch.Tensor:
    """PyTorch twin (see module doc). ``chunk``: query rows per SDPA call (default ``max(64, window)``,
    at most 1024: each call's mask is ``chunk x (sink + window + chunk)``)."""
    _check(q, k, v, sink, window)
    b, t, h_q, d = q.shape
    chunk = chunk or min(1024, max(64, window))
    gqa = h_q != k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D] views
    out = torch.empty_like(qt)
    for c0 in range(0, t, chunk):
        c1 = min(t, c0 + chunk)
        lo = max(0, c0 - window + 1)  # first key of the chunk's window band
        keys = torch.cat([torch.arange(min(sink, lo), device=q.device), torch.arange(lo, c1, device=q.device)])
        qpos = torch.arange(c0, c1, device=q.device)[:, None]
        allowed = (keys[None, :] <= qpos) & ((keys[None, :] < sink) | (keys[None, :] > qpos - window))
        kk = kt.index_select(2, keys)
        vv = vt.index_select(2, keys)
        out[:, :, c0:c1] = F.scaled_dot_product_attention(qt[:, :, c0:c1], kk, vv, attn_mask=allowed, scale=scale,
                                                          enable_gqa=gqa)
    return out.transpose(1, 2)


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in DTYPES and 1 <= head_dim <= 256


if triton is not None:

    @triton.jit
    def _tile(q, acc, m_i, l_i, K, V, k_off, v_off, s_kt, s_vt, start, rows, SINK, WINDOW, T, qk_scale, d, d_ok,
              IN_SINK: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        j = start + tl.arange(0, BLOCK_N)
        jj = j[:, None].to(tl.int64)
        kv_ok = (j < T)[:, None] & d_ok[None, :]
        k = tl.load(K + k_off + jj * s_kt + d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + v_off + jj * s_vt + d[None, :], mask=kv_ok, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
        ok = (j[None, :] <= rows[:, None]) & (j[None, :] < T)
        if IN_SINK:
            ok = ok & (j[None, :] < SINK)
        else:  # the band: sinks were counted by the first loop
            ok = ok & (j[None, :] >= SINK) & (j[None, :] > rows[:, None] - WINDOW)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    @triton.jit
    def sink_window_kernel(Q, K, V, O, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
                           T, H_Q, SINK, WINDOW, N_BAND, qk_scale, G: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        m0 = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = (bh // H_Q).to(tl.int64)  # int64 offsets: a 128k-token batch passes 2**31 elements
        h = bh % H_Q
        hk = h // G
        rows = m0 + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None].to(tl.int64) * s_qt + d[None, :],
                    mask=(rows < T)[:, None] & d_ok[None, :], other=0.0)
        kv_k = b * s_kb + hk * s_kh
        kv_v = b * s_vb + hk * s_vh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, SINK, BLOCK_N):
            acc, m_i, l_i = _tile(q, acc, m_i, l_i, K, V, kv_k, kv_v, s_kt, s_vt, start, rows,
                                  SINK, WINDOW, T, qk_scale, d, d_ok, True, BLOCK_N, IEEE)
        # the band [m0 - WINDOW + 1, m0 + BLOCK_M) in N_BAND tiles (the same count for every program: a
        # loop bound that is not a tensor; tiles past the diagonal of the first programs are all masked)
        lo = tl.maximum(m0 - WINDOW + 1, SINK)
        for it in range(0, N_BAND):
            acc, m_i, l_i = _tile(q, acc, m_i, l_i, K, V, kv_k, kv_v, s_kt, s_vt, lo + it * BLOCK_N, rows,
                                  SINK, WINDOW, T, qk_scale, d, d_ok, False, BLOCK_N, IEEE)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + b * s_ob + h * s_oh + rows[:, None].to(tl.int64) * s_ot + d[None, :], out.to(O.dtype.element_ty),
                 mask=(rows < T)[:, None] & d_ok[None, :])


def prefill_sink_window_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int,
                               scale: float) -> torch.Tensor:
    """The Triton kernel (see module doc); same contract as ``prefill_sink_window_ref``."""
    _check(q, k, v, sink, window)
    if triton is None or not (available() or os.environ.get("TRITON_INTERPRET") == "1"):  # the interpreter: CPU tests
        raise RuntimeError("prefill_sink_window_triton needs triton and a CUDA device")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, t, h_q, d = q.shape
    o = torch.empty_like(q)
    ieee = q.dtype == torch.float32
    block_d = max(16, triton.next_power_of_2(d))
    block_m = 64 if (ieee or block_d > 128) else 128
    block_n = 32 if ieee else 64
    grid = (triton.cdiv(t, block_m), b * h_q)
    n_band = triton.cdiv(window - 1 + block_m, block_n)
    sink_window_kernel[grid](q, k, v, o, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                             t, h_q, sink, window, n_band, scale * 1.4426950408889634, G=h_q // k.shape[2],
                             HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee,
                             num_warps=8 if block_m == 128 else 4, num_stages=2)
    return o
