"""Triton split-K decode attention ("flash-decoding"): one query token per sequence, GQA, fp32 softmax.

Same contract and same trick as the CUDA kernel (csrc/decode.cu): a sink + window cache has valid slots
[0, min(len, sink + window)), so both ops run one kernel over keys [0, min(len, T_cap)).
Program (pair, split): the G query heads of one kv head (padded to BLOCK_H >= 16 rows for tl.dot)
attend one key chunk; a second kernel merges the chunks' (output, log2-sum-exp) pairs.
Works for bfloat16, float16 and float32 (float32 dots in IEEE precision) and any head dim.

Importing this module never fails: without triton, ``available()`` is False and calls raise.
Reference twins: reference.decode_full_ref / decode_sink_window_ref.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None
    tl = None

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in DTYPES and 8 <= head_dim <= 256


@functools.cache
def _kernels():
    if triton is None:
        raise RuntimeError("triton is not installed")

    @triton.jit
    def split_kernel(Q, K, V, Lens, Out, OPart, LsePart, scale_log2,
                     q_sb, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh,
                     H_kv, G, T_cap, chunk, num_splits,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                     SINGLE: tl.constexpr, IEEE: tl.constexpr):
        pair = tl.program_id(0)
        split = tl.program_id(1)
        m_tiles = tl.cdiv(G, BLOCK_H)
        mt = pair % m_tiles
        bh = pair // m_tiles
        b = bh // H_kv
        kvh = bh % H_kv
        n = tl.minimum(tl.maximum(tl.load(Lens + b).to(tl.int32), 0), T_cap)
        start = split * chunk
        end = tl.minimum(start + chunk, n)

        offs_g = mt * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = offs_g < G
        heads = kvh * G + offs_g
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        b64 = b.to(tl.int64)
        q = tl.load(Q + b64 * q_sb + heads[:, None] * q_sh + offs_d[None, :],
                    mask=hmask[:, None] & dmask[None, :], other=0.0)
        k_base = K + b64 * k_sb + kvh * k_sh
        v_base = V + b64 * v_sb + kvh * v_sh

        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for s in range(start, end, BLOCK_N):
            offs_n = s + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * k_st + offs_d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = tl.where(nmask[None, :], qk * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(qk, 1))
            ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no valid key yet
            alpha = tl.exp2(m - ref)
            p = tl.exp2(qk - ref[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * v_st + offs_d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new

        o = acc / tl.where(l > 0, l, 1.0)[:, None]
        row = b64 * H_kv * G + heads  # b * H_q + head
        if SINGLE:
            tl.store(Out + row[:, None] * D + offs_d[None, :], o.to(Out.dtype.element_ty),
                     mask=hmask[:, None] & dmask[None, :])
        else:
            part = row * num_splits + split
            tl.store(OPart + part[:, None] * D + offs_d[None, :], o, mask=hmask[:, None] & dmask[None, :])
            lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
            tl.store(LsePart + part, lse, mask=hmask)

    @triton.jit
    def combine_kernel(OPart, LsePart, Out, num_splits,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # b * H_q + head
        offs_s = tl.arange(0, BLOCK_S)
        smask = offs_s < num_splits
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        lse = tl.load(LsePart + row * num_splits + offs_s, mask=smask, other=float("-inf"))
        mx = tl.max(lse, 0)
        ref = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.exp2(lse - ref)
        wsum = tl.sum(w, 0)
        o = tl.load(OPart + (row * num_splits + offs_s[:, None]) * D + offs_d[None, :],
                    mask=smask[:, None] & dmask[None, :], other=0.0)
        res = tl.sum(o * w[:, None], 0) / tl.where(wsum > 0, wsum, 1.0)
        tl.store(Out + row * D + offs_d, res.to(Out.dtype.element_ty), mask=dmask)

    return split_kernel, combine_kernel


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _decode(q, k, v, lengths, scale, out=None, num_splits=0, block_n=32, num_warps=4, num_stages=2):
    split_kernel, combine_kernel = _kernels()
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, H_q, D], k, v [B, T, H_kv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtype must be one of {DTYPES} for q, k, v alike; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_cuda or k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one CUDA device; got {q.device}, {k.device}, {v.device}")
    b, h_q, d = q.shape
    t_cap, h_kv = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree (B, D, or H_q % H_kv)")
    if lengths.shape != (b,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be int32/int64 of shape ({b},); got {lengths.dtype} {tuple(lengths.shape)}")
    lengths = lengths.to(q.device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if out is None:
        out = torch.empty((b, h_q, d), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}")
    if b == 0 or h_q == 0:
        return out
    group = h_q // h_kv
    block_h = max(16, min(64, triton.next_power_of_2(group)))
    m_tiles = triton.cdiv(group, block_h)
    pairs = b * h_kv * m_tiles
    blocks = max(1, triton.cdiv(t_cap, block_n))
    if num_splits <= 0:
        num_splits = triton.cdiv(4 * _sm_count(q.device.index or 0), pairs)
    num_splits = min(max(num_splits, 1), blocks, 1024)
    chunk = triton.cdiv(blocks, num_splits) * block_n
    num_splits = triton.cdiv(t_cap, chunk) if t_cap else 1
    single = num_splits == 1
    if single:
        o_part = lse_part = out  # unused
    else:
        o_part = torch.empty((b, h_q, num_splits, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((b, h_q, num_splits), dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(d)
    split_kernel[(pairs, num_splits)](
        q, k, v, lengths, out, o_part, lse_part, float(scale) * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        h_kv, group, t_cap, chunk, num_splits,
        D=d, BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_N=block_n, SINGLE=single, IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not single:
        combine_kernel[(b * h_q,)](
            o_part, lse_part, out, num_splits, D=d, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out


def decode_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float,
                **kw) -> torch.Tensor:
    """Decode attention over keys [0, lengths[b]) of k/v [B, T_cap, H_kv, D]; q [B, H_q, D] -> [B, H_q, D]."""
    return _decode(q, k, v, lengths, scale, **kw)


def decode_sink_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, sink: int,
                       window: int, scale: float, **kw) -> torch.Tensor:
    """Decode attention over a sink + window cache k/v [B, sink + window, H_kv, D] (valid slots
    [0, min(len, sink + window))); q [B, H_q, D] -> [B, H_q, D]."""
    if sink < 0 or window < 1:
        raise ValueError(f"need sink >= 0 and window >= 1; got sink={sink}, window={window}")
    if k.dim() != 4 or k.shape[1] != sink + window:
        raise ValueError(f"k must be [B, sink + window = {sink + window}, H_kv, D]; got {tuple(k.shape)}")
    return _decode(q, k, v, lengths, scale, **kw)
