"""Streaming prefill's attention plumbing for ``LayerMajorPrefill``: a padded batch whose prompts attend
causally or, on a layer already known to be lazy, over sink + window keys only (the kernel is the
backend's ``prefill_sink_window``)."""
from __future__ import annotations

from typing import Callable

import torch

# (sink, window) for a prompt that attends over sink + window in the layer in flight, None: causal
Stream = tuple[int, int] | None


def mixed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stream: list[Stream], scale: float,
                    full: Callable, sink_window: Callable) -> torch.Tensor:
    """q ``[B, T, H_q, D]``, k/v ``[B, T, H_kv, D]`` -> ``[B, T, H_q, D]``: ``full(q, k, v, scale)`` for the
    rows where ``stream[n]`` is None, ``sink_window(q, k, v, sink, window, scale)`` for the others; one
    call per distinct kind of row (one call, no gather, when the whole batch is of one kind)."""
    groups: dict[Stream, list[int]] = {}
    for n, s in enumerate(stream):
        groups.setdefault(s, []).append(n)

    def run(key: Stream, q, k, v):
        return full(q, k, v, scale) if key is None else sink_window(q, k, v, key[0], key[1], scale)

    if len(groups) == 1:
        return run(stream[0], q, k, v)
    o = torch.empty_like(q)
    for key, rows in groups.items():
        idx = torch.tensor(rows, device=q.device)
        o[idx] = run(key, q[idx], k[idx], v[idx])
    return o


def last_row_keys(length: int, sink: int, window: int, device: torch.device) -> torch.Tensor:
    """Key indices the last query of a ``length``-token prompt attends in a sink + window layer."""
    s = min(sink, length)
    return torch.cat([torch.arange(s), torch.arange(max(s, length - window), length)]).to(device)
