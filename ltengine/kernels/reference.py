"""Pure-PyTorch reference twins of the decode-attention and truncation kernels.

These are the ground truth the Triton and CUDA kernels are tested against. They run on CPU and CUDA,
accept any float dtype, compute in float32 (float64 if given float64) and return the input dtype.

Layout is token-major ("NHD"): caches are ``[B, T, H_kv, D]`` with the last dim contiguous; a decode
query is ``[B, H_q, D]`` (one token per sequence). Grouped-query attention follows HF ``repeat_kv``:
query head ``h`` reads kv head ``h // (H_q // H_kv)``.

Sink + window cache of one streaming layer: ``[B, sink + window, H_kv, D]``. Slots ``[0, sink)`` hold
the first ``sink`` tokens; slots ``[sink, sink + window)`` are a ring of the most recent ``window``
tokens. Token at position ``p`` lives in slot ``ring_slot(p, sink, window)``::

    slot(p) = p                              if p < sink
              sink + (p - sink) % window     otherwise

so the engine writes decode token ``p`` to ``slot(p)`` with no per-sequence start offset, and a cache
that has not wrapped yet (``len <= sink + window``) is simply the first ``len`` slots.
``truncate_kv_ref_`` places the last ``window`` tokens of a full cache by the same formula.
"""

from __future__ import annotations

import torch

__all__ = [
    "decode_full_ref",
    "decode_sink_window_ref",
    "truncate_kv_ref_",
    "ring_slot",
]


def ring_slot(pos: torch.Tensor | int, sink: int, window: int) -> torch.Tensor | int:
    """Cache slot of the token at absolute position ``pos`` in a sink + window cache."""
    if isinstance(pos, int):
        return pos if pos < sink else sink + (pos - sink) % window
    return torch.where(pos < sink, pos, sink + (pos - sink).remainder(window))


def _check_decode_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> int:
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q [B, H_q, D] and k, v [B, T, H_kv, D] of one shape; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    b, h_q, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B or D")
    h_kv = k.shape[2]
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"H_q={h_q} must be a multiple of H_kv={h_kv}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must have shape ({b},); got {tuple(lengths.shape)}")
    return h_q // h_kv


def _masked_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention of q [B, H_q, D] over keys where valid [B, T] is True; no valid key -> 0."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h_q, d = q.shape
    h_kv = k.shape[2]
    qf = q.to(acc).reshape(b, h_kv, h_q // h_kv, d)
    scores = torch.einsum("bhgd,bthd->bhgt", qf, k.to(acc)) * scale  # [B, H_kv, G, T]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no valid key: all -inf -> NaN -> 0
    # slots past a sequence's length may hold anything (even NaN): 0 * NaN would poison the sum
    v = v.to(acc).masked_fill(~valid[:, :, None, None], 0.0)
    out = torch.einsum("bhgt,bthd->bhgd", probs, v)
    return out.reshape(b, h_q, d).to(q.dtype)


def decode_full_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """Decode attention over a full cache.

    q: [B, H_q, D]; k, v: [B, T_cap, H_kv, D]; lengths: [B] int, valid tokens per sequence
    (0 <= len <= T_cap; keys [0, len) are attended, len 0 gives a zero output). Returns [B, H_q, D].
    """
    _check_decode_shapes(q, k, v, lengths)
    t = torch.arange(k.shape[1], device=k.device)
    valid = t[None, :] < lengths.to(k.device)[:, None]
    return _masked_decode(q, k, v, valid, scale)


def decode_sink_window_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    sink: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Decode attention over a sink + window cache.

    q: [B, H_q, D]; k, v: [B, sink + window, H_kv, D]; lengths: [B] int, tokens the sequence has seen
    (may exceed sink + window). Valid keys: sink slots [0, min(len, sink)) and ring slots
    [sink, sink + min(max(len - sink, 0), window)). Softmax is order-free, so a wrapped ring needs no
    start offset: which ring slot holds the oldest token does not matter here. Returns [B, H_q, D].
    """
    _check_sink_window(k, sink, window)
    _check_decode_shapes(q, k, v, lengths)
    t = torch.arange(k.shape[1], device=k.device)
    n = lengths.to(k.device)[:, None]
    in_sink = (t[None, :] < sink) & (t[None, :] < n)
    n_ring = (n - sink).clamp(min=0, max=window)
    in_ring = (t[None, :] >= sink) & (t[None, :] < sink + n_ring)
    return _masked_decode(q, k, v, in_sink | in_ring, scale)


def _check_sink_window(k: torch.Tensor, sink: int, window: int) -> None:
    if sink < 0 or window < 1:
        raise ValueError(f"need sink >= 0 and window >= 1; got sink={sink}, window={window}")
    if k.dim() != 4 or k.shape[1] != sink + window:
        raise ValueError(
            f"sink + window cache must be [B, sink + window = {sink + window}, H_kv, D]; got {tuple(k.shape)}"
        )


def truncate_kv_ref_(
    k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, sink: int, window: int
) -> torch.Tensor:
    """Truncate full caches to sink + window, in place.

    k, v: [B, T_cap, H_kv, D]; lengths: [B] int. For each sequence with L = lengths[b] > sink + window,
    the last ``window`` tokens [L - window, L) move to the ring slots [sink, sink + window), token p to
    ``ring_slot(p, sink, window)``; the sink slots are untouched. Sequences with L <= sink + window are
    untouched (their tokens already sit in their ring slots). Source and destination may overlap when
    L < sink + 2 * window; the copy goes through a clone, so the result is exact.
    Returns the new lengths, min(lengths, sink + window).
    """
    if sink < 0 or window < 1:
        raise ValueError(f"need sink >= 0 and window >= 1; got sink={sink}, window={window}")
    if k.dim() != 4 or v.shape != k.shape or lengths.shape != (k.shape[0],):
        raise ValueError(
            f"expected k, v [B, T_cap, H_kv, D] of one shape and lengths [B]; got k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}, lengths {tuple(lengths.shape)}"
        )
    cap = sink + window
    for b, length in enumerate(lengths.tolist()):
        if length > k.shape[1]:
            raise ValueError(f"lengths[{b}]={length} exceeds the cache capacity T_cap={k.shape[1]}")
        if length <= cap:
            continue
        pos = torch.arange(length - window, length, device=k.device)
        slots = ring_slot(pos, sink, window)
        for cache in (k, v):
            cache = cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache  # fp8 moves as bytes
            cache[b, slots] = cache[b, pos].clone()
    return lengths.clamp(max=cap)
