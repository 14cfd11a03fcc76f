"""Decode attention over a paged KV pool (one launch per layer for the whole batch).

q ``[B, H_q, D]``; k_pool, v_pool ``[num_blocks, block_size, H_kv, D]``; block_tables ``[B, MB]``
int32 (a sequence's blocks for this layer, in slot order); n_valid ``[B]``: slots ``[0, n)`` are
attended. Full layers pass their length; sink + window layers ``min(length, sink + window)``: their
valid slots are always that prefix (ring order does not matter to softmax). Entries of a table past
a sequence's blocks may hold any valid block id; slots past ``n`` are never read by the kernel and
are masked out by the reference.

fp8 pools (``float8_e4m3fn``) come with ``k_scale``/``v_scale`` ``[num_blocks, block_size, H_kv]``, one
float32 scale per stored row (``fp8.py``). Both twins dequantize without a float copy of the cache: a
key's scale multiplies its score (``q . k8 * s_k``), a value's scale its probability (``p * s_v``) before
the weighted sum over fp8 values, as the Triton kernel does in registers.
"""
from __future__ import annotations

import functools

import torch

from ._triton import tl, triton
from .fp8 import as_bytes, take_rows
from .reference import decode_full_ref


def paged_decode_ref(q, k_pool, v_pool, block_tables, n_valid, scale, k_scale=None, v_scale=None):
    """Gathers each sequence's blocks into a contiguous cache, then ``decode_full_ref``; with scales
    (an fp8 pool) the scaled-score form below, in float32."""
    b, mb = block_tables.shape
    bs = k_pool.shape[1]
    idx = block_tables.long()
    k = take_rows(k_pool, idx).reshape(b, mb * bs, *k_pool.shape[2:])
    v = take_rows(v_pool, idx).reshape(b, mb * bs, *v_pool.shape[2:])
    if k_scale is None:
        return decode_full_ref(q, k.to(q.dtype), v.to(q.dtype), n_valid, scale)
    ks = k_scale[idx].reshape(b, mb * bs, -1).float()  # [B, T, H_kv]
    vs = v_scale[idx].reshape(b, mb * bs, -1).float()
    h_q, h_kv, d = q.shape[1], k.shape[2], q.shape[2]
    valid = torch.arange(mb * bs, device=q.device)[None, :] < n_valid.to(q.device).long()[:, None]  # [B, T]
    qf = q.float().reshape(b, h_kv, h_q // h_kv, d)
    scores = torch.einsum("bhgd,bthd->bhgt", qf, k.float()) * ks.permute(0, 2, 1)[:, :, None] * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # a row with no keys -> zeros
    probs = probs * vs.masked_fill(~valid[:, :, None], 0.0).permute(0, 2, 1)[:, :, None]
    out = torch.einsum("bhgt,bthd->bhgd", probs, v.float().masked_fill(~valid[:, :, None, None], 0.0))
    return out.reshape(b, h_q, d).to(q.dtype)


def paged_truncate_ref_(k_pool, v_pool, block_tables, lengths, sink: int, window: int) -> None:
    """In place: for each row n, the tokens ``[L - window, L)`` (L = ``lengths[n]``) move from their
    slots in the blocks ``block_tables[n]`` (slot order) to their ring slots ``ring_slot(p)``; the
    sink stays. Rows with L <= sink + window already hold every token in its ring slot. The kept rows
    are gathered before any is written, so overlapping sources and destinations are harmless.
    Rows move as bytes (any dtype, fp8 included; an fp8 pool's scales move by a second call on them)."""
    bs = k_pool.shape[1]
    flat_k = as_bytes(k_pool).view(-1, *k_pool.shape[2:])
    flat_v = as_bytes(v_pool).view(-1, *v_pool.shape[2:])
    for n, length in enumerate(lengths.tolist()):
        if length <= sink + window:
            continue
        table = block_tables[n].long()
        pos = torch.arange(length - window, length, device=k_pool.device)
        slots = sink + (pos - sink) % window
        src = table[pos // bs] * bs + pos % bs
        dst = table[slots // bs] * bs + slots % bs
        flat_k.index_copy_(0, dst, flat_k.index_select(0, src))
        flat_v.index_copy_(0, dst, flat_v.index_select(0, src))


if triton is not None:

    @triton.jit
    def _attend_keys(q, K, V, KS, VS, TABLE, head_off, h, lo, hi, s_kb, s_kt, s_sb, s_st, scale, d, dmask,
                     GP: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                     IEEE: tl.constexpr, FP8: tl.constexpr):
        """Online softmax of the query rows ``q [GP, DP]`` over one row's keys ``[lo, hi)`` (slot t in
        block ``TABLE[t // BS]``), BLOCK_N keys at a time: returns (max, sum of exp, weighted values).
        Keys and values are cast to q's dtype in registers; ``FP8``: each key's scale (KS, strides
        s_sb/s_st, head h) multiplies its score and each value's scale (VS) its probability."""
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            tmask = t < hi
            blk = tl.load(TABLE + t // BS, mask=tmask, other=0).to(tl.int64)
            off = blk * s_kb + (t % BS) * s_kt + head_off
            k = tl.load(K + off[:, None] + d[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0).to(q.dtype)
            v = tl.load(V + off[:, None] + d[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0).to(q.dtype)
            if IEEE:  # fp32 caches: exact fp32 dots, not TF32
                qk = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                qk = tl.dot(q, tl.trans(k)) * scale
            if FP8:
                soff = blk * s_sb + (t % BS) * s_st + h
                qk = qk * tl.load(KS + soff, mask=tmask, other=0.0)[None, :]
            qk = tl.where(tmask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if FP8:  # the sum above is of the unscaled probabilities; the values' scales weight p
                p = p * tl.load(VS + soff, mask=tmask, other=0.0)[None, :]
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return m_i, l_i, acc


# a single long row still gets at most this many chunks: one sequence of 32k keys ran at 68% of copy
# bandwidth in 258 chunks of 128 keys and at 80% in 64 of 516 (bench/RESULTS.md)
ROW_CHUNKS = 64

if triton is not None:
    _ROW_CHUNKS = tl.constexpr(ROW_CHUNKS)

    @triton.jit
    def _chunk_plan(NVALID, B, TPH: tl.constexpr, MIN_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BP: tl.constexpr):
        """The balanced schedule, recomputed by every program from the lengths alone: one chunk size
        for the whole batch (total keys over the target programs per head; at least MIN_CHUNK, and
        no row in more than ROW_CHUNKS chunks; a multiple of BLOCK_N); row r takes ``cdiv(n_r, per)``
        chunks, numbered in row order."""
        r = tl.arange(0, BP)
        ns = tl.load(NVALID + r, mask=r < B, other=0)
        per = tl.maximum(tl.maximum(tl.cdiv(tl.sum(ns, 0), TPH), MIN_CHUNK), tl.cdiv(tl.max(ns, 0), _ROW_CHUNKS))
        per = tl.cdiv(per, BLOCK_N) * BLOCK_N
        ch = tl.cdiv(ns, per)
        cum = tl.cumsum(ch, 0)  # inclusive: row r's chunks are [cum_r - ch_r, cum_r)
        return r, ns, per, ch, cum

    @triton.jit
    def _paged_chunk_kernel(Q, K, V, KS, VS, TABLES, NVALID, PO, PM, PL, B,
                            s_qb, s_qh, s_kb, s_kt, s_kh, s_sb, s_st, s_tb, s_oh, s_oc, s_mh,
                            scale, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                            BS: tl.constexpr, BLOCK_N: tl.constexpr, TPH: tl.constexpr, MIN_CHUNK: tl.constexpr,
                            BP: tl.constexpr, IEEE: tl.constexpr, FP8: tl.constexpr):
        h = tl.program_id(0)
        c = tl.program_id(1)  # a chunk number; past the batch's chunk count the program has nothing to do
        r, ns, per, ch, cum = _chunk_plan(NVALID, B, TPH, MIN_CHUNK, BLOCK_N, BP)
        live = c < tl.sum(ch, 0)
        b = tl.sum((cum <= c).to(tl.int32), 0)  # the row whose chunks contain c (B when none does)
        mine = r == b
        n = tl.sum(tl.where(mine, ns, 0), 0)
        lo = (c - tl.sum(tl.where(mine, cum - ch, 0), 0)) * per
        hi = tl.minimum(lo + per, n)
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        gmask = g < G
        dmask = d < D
        q = tl.load(Q + b * s_qb + (h * G + g)[:, None] * s_qh + d[None, :],
                    mask=(gmask[:, None] & dmask[None, :]) & live, other=0.0)
        m_i, l_i, acc = _attend_keys(q, K, V, KS, VS, TABLES + b * s_tb, h * s_kh, h, lo, hi, s_kb, s_kt, s_sb, s_st,
                                     scale, d, dmask, GP, DP, BS, BLOCK_N, IEEE, FP8)
        rows = (h * G + g) * s_oh + c * s_oc
        tl.store(PO + rows[:, None] + d[None, :], acc, mask=(gmask[:, None] & dmask[None, :]) & live)
        mrow = (h * G + g) * s_mh + c
        tl.store(PM + mrow, m_i, mask=gmask & live)
        tl.store(PL + mrow, l_i, mask=gmask & live)

    @triton.jit
    def _combine_chunks_kernel(NVALID, PO, PM, PL, OUT, B, s_oh, s_oc, s_mh, s_outb, s_outh,
                               TPH: tl.constexpr, MIN_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BP: tl.constexpr,
                               D: tl.constexpr, DP: tl.constexpr, SP: tl.constexpr):
        b = tl.program_id(0)
        hq = tl.program_id(1)
        r, ns, per, ch, cum = _chunk_plan(NVALID, B, TPH, MIN_CHUNK, BLOCK_N, BP)
        mine = r == b
        count = tl.sum(tl.where(mine, ch, 0), 0)
        first = tl.sum(tl.where(mine, cum - ch, 0), 0)
        d = tl.arange(0, DP)
        dmask = d < D
        big = tl.full([1], float("-inf"), tl.float32)
        den = tl.zeros([1], tl.float32)
        acc = tl.zeros([DP], tl.float32)
        for at in range(0, count, SP):  # online over the row's chunks, SP at a time
            s = at + tl.arange(0, SP)
            smask = s < count
            m = tl.load(PM + hq * s_mh + first + s, mask=smask, other=float("-inf"))
            l = tl.load(PL + hq * s_mh + first + s, mask=smask, other=0.0)
            o = tl.load(PO + hq * s_oh + (first + s)[:, None] * s_oc + d[None, :],
                        mask=smask[:, None] & dmask[None, :], other=0.0)
            new = tl.maximum(big, tl.max(m, 0))
            keep = tl.where(big > float("-inf"), tl.exp(big - new), 0.0)
            w = tl.where(m > float("-inf"), tl.exp(m - new), 0.0)
            acc = acc * keep + tl.sum(w[:, None] * o, 0)
            den = den * keep + tl.sum(w * l, 0)
            big = new
        out = acc / den
        tl.store(OUT + b * s_outb + hq * s_outh + d, out.to(OUT.dtype.element_ty), mask=dmask)


def triton_supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Pools of bf16/fp16 (fp32 accumulation), fp32 (IEEE dots) or fp8 e4m3 with scales; any head dim up
    to 256 (padded to a power of 2)."""
    return triton is not None and dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn) \
        and 8 <= head_dim <= 256


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


PROGRAMS_PER_SM = 16  # the split kernels aim at this many programs per SM (bench/RESULTS.md, split sweeps)
MIN_CHUNK = 128  # fewest keys one balanced chunk takes (shorter ones cost more in merging than they gain)


def paged_decode_triton(q, k_pool, v_pool, block_tables, n_valid, scale, k_scale=None, v_scale=None,
                        block_n: int | None = None, num_warps: int = 4, num_stages: int = 2,
                        programs: int | None = None, min_chunk: int | None = None):
    """Split-K (flash-decoding) paged decode; fp32 accumulation. Same contract as ``paged_decode_ref``.

    The balanced schedule: the keys of the whole batch are cut into chunks of one size (total keys /
    ``programs`` per KV head, at least ``min_chunk``), so a row gets chunks in proportion to its length
    and every program reads about the same; the sizes are worked out on the device from ``n_valid``, so
    the launch is fixed for a CUDA graph while lengths change. This keeps the GPU evenly loaded when
    full-length rows and sink + window rows share a layer (a lazy batch).
    ``k_scale``/``v_scale``: an fp8 pool's per-row scales, applied in registers (see the module doc).
    ``block_n``/``num_warps``/``num_stages``/``programs``/``min_chunk``: tuning knobs.
    """
    fp8 = k_scale is not None
    if fp8 != (k_pool.dtype == torch.float8_e4m3fn) or (fp8 and v_scale is None):
        raise ValueError(f"an fp8 pool needs k_scale and v_scale and only an fp8 pool takes them; got a "
                         f"{k_pool.dtype} pool with k_scale {'set' if fp8 else 'None'}")
    ks, vs = (k_scale, v_scale) if fp8 else (k_pool, v_pool)  # unread placeholders without scales
    b, h_q, d = q.shape
    bs, h_kv = k_pool.shape[1], k_pool.shape[2]
    g = h_q // h_kv
    q = q.contiguous()
    block_n = min(block_n or 64, bs)
    out = torch.empty_like(q)
    dp, gp = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(g))
    sms = _sm_count(q.device.index or 0) if q.is_cuda else 132
    tph = max(1, -(-(programs or PROGRAMS_PER_SM * sms) // h_kv))  # target programs per KV head
    min_chunk = -(-(min_chunk or MIN_CHUNK) // block_n) * block_n
    # sum over rows of cdiv(n, per) <= total / per + b <= tph + b, and no row takes more than ROW_CHUNKS: a
    # program past both bounds has nothing to do, but still takes its turn on an SM
    n_chunks = min(tph + b, ROW_CHUNKS * b)
    part_o = torch.empty((h_q, n_chunks, d), dtype=torch.float32, device=q.device)
    part_m = torch.empty((h_q, n_chunks), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    bp = max(16, triton.next_power_of_2(b))
    _paged_chunk_kernel[(h_kv, n_chunks)](
        q, k_pool, v_pool, ks, vs, block_tables, n_valid, part_o, part_m, part_l, b,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        ks.stride(0) if fp8 else 0, ks.stride(1) if fp8 else 0, block_tables.stride(0),
        part_o.stride(0), part_o.stride(1), part_m.stride(0),
        scale, G=g, GP=gp, D=d, DP=dp, BS=bs, BLOCK_N=block_n, TPH=tph, MIN_CHUNK=min_chunk, BP=bp,
        IEEE=q.dtype == torch.float32, FP8=fp8, num_warps=num_warps, num_stages=num_stages)
    _combine_chunks_kernel[(b, h_q)](
        n_valid, part_o, part_m, part_l, out, b, part_o.stride(0), part_o.stride(1), part_m.stride(0),
        out.stride(0), out.stride(1), TPH=tph, MIN_CHUNK=min_chunk, BLOCK_N=block_n, BP=bp, D=d, DP=dp,
        SP=32, num_warps=4)
    return out
