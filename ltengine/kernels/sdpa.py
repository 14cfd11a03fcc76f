"""Decode attention over contiguous caches with PyTorch's fused SDPA: the fast path of the reference
runner (one sequence per call) on any device.

Same contract as ``reference.decode_full_ref`` / ``decode_sink_window_ref`` (the twins it is tested
against): a full cache's valid keys are its first ``length`` slots, a sink + window cache's its first
``min(length, sink + window)`` (the ring fills in slot order and softmax is order-free). Each row
attends over exactly that prefix, so no mask and no pass over unused slots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in DTYPES


def _prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: list[int], scale: float):
    """q [B, H_q, D], k/v [B, T, H_kv, D]; row b attends its first counts[b] slots (0: zeros)."""
    b, h_q, d = q.shape
    out = q.new_zeros((b, h_q, d))
    gqa = h_q != k.shape[2]
    for i, n in enumerate(counts):
        if n <= 0:
            continue
        kk = k[i, :n].transpose(0, 1).unsqueeze(0)  # [1, H_kv, n, D]
        vv = v[i, :n].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(q[i].unsqueeze(0).unsqueeze(2), kk, vv, scale=scale, enable_gqa=gqa)
        out[i] = o[0, :, 0]
    return out


def decode_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    counts = [min(int(n), k.shape[1]) for n in lengths.tolist()]
    return _prefix_attention(q, k, v, counts, scale)


def decode_sink_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, sink: int,
                       window: int, scale: float) -> torch.Tensor:
    if k.shape[1] != sink + window:
        raise ValueError(f"k must be [B, sink + window = {sink + window}, H_kv, D]; got {tuple(k.shape)}")
    counts = [min(int(n), sink + window) for n in lengths.tolist()]
    return _prefix_attention(q, k, v, counts, scale)
