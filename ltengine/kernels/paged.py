"""Decode attention over a paged KV pool (one launch per layer for the whole batch).

q ``[B, H_q, D]``; k_pool, v_pool ``[num_blocks, block_size, H_kv, D]``; block_tables ``[B, MB]``
int32 (a sequence's blocks for this layer, in slot order); n_valid ``[B]``: slots ``[0, n)`` are
attended. Full layers pass their length; sink + window layers ``min(length, sink + window)``: their
valid slots are always that prefix (ring order does not matter to softmax). Entries of a table past
a sequence's blocks may hold any valid block id; slots past ``n`` are never read by the kernel and
are masked out by the reference.
"""
from __future__ import annotations

import functools

import torch

from .reference import decode_full_ref

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - no Triton: the reference runs
    triton = None


def paged_decode_ref(q, k_pool, v_pool, block_tables, n_valid, scale):
    """Gathers each sequence's blocks into a contiguous cache, then ``decode_full_ref``."""
    b, mb = block_tables.shape
    bs = k_pool.shape[1]
    idx = block_tables.long()
    k = k_pool[idx].reshape(b, mb * bs, *k_pool.shape[2:])
    v = v_pool[idx].reshape(b, mb * bs, *v_pool.shape[2:])
    return decode_full_ref(q, k, v, n_valid, scale)


if triton is not None:

    @triton.jit
    def _paged_split_kernel(Q, K, V, TABLES, NVALID, PO, PM, PL,
                            s_qb, s_qh, s_kb, s_kt, s_kh, s_tb, s_ob, s_oh, s_os, s_mb, s_mh,
                            scale, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                            BS: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        n = tl.load(NVALID + b)
        per = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_N) * BLOCK_N
        lo = s * per
        hi = tl.minimum(lo + per, n)
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        gmask = g < G
        dmask = d < D
        q = tl.load(Q + b * s_qb + (h * G + g)[:, None] * s_qh + d[None, :], mask=gmask[:, None] & dmask[None, :],
                    other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            tmask = t < hi
            blk = tl.load(TABLES + b * s_tb + t // BS, mask=tmask, other=0).to(tl.int64)
            off = blk * s_kb + (t % BS) * s_kt + h * s_kh
            k = tl.load(K + off[:, None] + d[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
            v = tl.load(V + off[:, None] + d[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
            if IEEE:  # fp32 caches: exact fp32 dots, not TF32
                qk = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                qk = tl.dot(q, tl.trans(k)) * scale
            qk = tl.where(tmask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        rows = b * s_ob + (h * G + g) * s_oh + s * s_os
        tl.store(PO + rows[:, None] + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])
        mrow = b * s_mb + (h * G + g) * s_mh + s
        tl.store(PM + mrow, m_i, mask=gmask)
        tl.store(PL + mrow, l_i, mask=gmask)

    @triton.jit
    def _combine_kernel(PO, PM, PL, OUT, s_ob, s_oh, s_os, s_mb, s_mh, s_outb, s_outh,
                        D: tl.constexpr, DP: tl.constexpr, SPLITS: tl.constexpr, SP: tl.constexpr):
        b = tl.program_id(0)
        hq = tl.program_id(1)
        s = tl.arange(0, SP)
        d = tl.arange(0, DP)
        dmask = d < D
        smask = s < SPLITS
        m = tl.load(PM + b * s_mb + hq * s_mh + s, mask=smask, other=float("-inf"))
        l = tl.load(PL + b * s_mb + hq * s_mh + s, mask=smask, other=0.0)
        big = tl.max(m, 0)
        w = tl.where(m > float("-inf"), tl.exp(m - big), 0.0)
        o = tl.load(PO + b * s_ob + hq * s_oh + s[:, None] * s_os + d[None, :], mask=smask[:, None] & dmask[None, :],
                    other=0.0)
        out = tl.sum(w[:, None] * o, 0) / tl.sum(w * l, 0)
        tl.store(OUT + b * s_outb + hq * s_outh + d, out.to(OUT.dtype.element_ty), mask=dmask)


def triton_supports(dtype: torch.dtype, head_dim: int) -> bool:
    """bf16/fp16 (fp32 accumulation) and fp32 (IEEE dots); any head dim up to 256 (padded to a power of 2)."""
    return triton is not None and dtype in (torch.float16, torch.bfloat16, torch.float32) and 8 <= head_dim <= 256


def num_splits(batch: int, num_kv_heads: int, max_tokens: int, block_n: int = 64, sms: int = 132) -> int:
    """Key-axis splits so that about sixteen programs per SM run at a full bucket, without splits shorter
    than a tile. Fewer (four per SM) cost up to 7% of bandwidth when a bucket is part padding or the
    blocks are scattered by truncation (bench/RESULTS.md, split sweep); more only add merge traffic."""
    want = max(1, -(-16 * sms // (batch * num_kv_heads)))
    return max(1, min(want, -(-max_tokens // block_n), 64))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def paged_decode_triton(q, k_pool, v_pool, block_tables, n_valid, scale, splits: int | None = None,
                        block_n: int | None = None, num_warps: int = 4, num_stages: int = 2):
    """Split-K (flash-decoding) paged decode; fp32 accumulation. Same contract as ``paged_decode_ref``.
    ``splits``/``block_n``/``num_warps``/``num_stages``: tuning knobs (defaults from bench/RESULTS.md)."""
    b, h_q, d = q.shape
    bs, h_kv = k_pool.shape[1], k_pool.shape[2]
    g = h_q // h_kv
    if splits is None:
        splits = num_splits(b, h_kv, block_tables.shape[1] * bs, sms=_sm_count(q.device.index or 0))
    part_o = torch.empty((b, h_q, splits, d), dtype=torch.float32, device=q.device)
    part_m = torch.empty((b, h_q, splits), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    q = q.contiguous()
    block_n = min(block_n or 64, bs)
    _paged_split_kernel[(b, h_kv, splits)](
        q, k_pool, v_pool, block_tables, n_valid, part_o, part_m, part_l,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), block_tables.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_m.stride(0), part_m.stride(1),
        scale, G=g, GP=max(16, triton.next_power_of_2(g)), D=d, DP=max(16, triton.next_power_of_2(d)), BS=bs,
        BLOCK_N=block_n, SPLITS=splits, IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    out = torch.empty_like(q)
    _combine_kernel[(b, h_q)](part_o, part_m, part_l, out, part_o.stride(0), part_o.stride(1), part_o.stride(2),
                              part_m.stride(0), part_m.stride(1), out.stride(0), out.stride(1),
                              D=d, DP=max(16, triton.next_power_of_2(d)), SPLITS=splits,
                              SP=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out


def pick_paged_decode(device: torch.device, dtype: torch.dtype, head_dim: int, prefer: str | None = None):
    """The paged decode implementation for this device and dtype, chosen once: (name, fn)."""
    if prefer != "reference" and device.type == "cuda" and triton_supports(dtype, head_dim):
        return "triton", paged_decode_triton
    return "reference", paged_decode_ref
