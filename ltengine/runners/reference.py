"""ReferenceRunner: contiguous per-sequence caches (memory/cache.py), decoded one sequence at a time
per layer through the kernel backend. The path the exactness tests hold to Hugging Face.

Contiguous buffers cannot grow without a copy (two buffers for a moment), so this runner makes room
for a request's whole ``max_new_tokens`` when its prompt is stored: it is admitted by its worst case
and never grows. ``used``/``peak`` are tensor bytes, exact on any device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..memory.cache import FullKV, KVMeter, SequenceKV, SinkWindowKV, contiguous_footprint, demote, encode, truncated
from ..models import DecoderAdapter
from .base import LayerMajorPrefill, PrefillJob, PrefillRequest, PrefillResult, PrefillTask, Runner


class _Store:
    """KVStore of one prompt: full layers get buffers with room for the decode tokens at once; lazy
    ones are stored straight as sink + window (their full KV never enters the cache)."""

    def __init__(self, runner: "ReferenceRunner", cache: SequenceKV, total: int, sink: int, window: int):
        self.runner, self.cache, self.total, self.sink, self.window = runner, cache, total, sink, window

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, lazy: bool) -> None:
        r = self.runner
        k, v, scales = encode(k, v, r.adapter.kv_dtype)  # stored in the KV dtype (fp8: quantized here)
        if lazy:
            self.cache.layers[layer] = truncated(k, v, k.shape[0], self.sink, self.window, r.backend.truncate_kv_,
                                                 r.meter, self.total, scales)
        else:
            self.cache.layers[layer] = FullKV(k, v, r.meter, self.total, scales)

    def demote(self, layer: int) -> None:
        self.cache.layers[layer] = demote(self.cache.layers[layer], self.sink, self.window,
                                          self.runner.backend.truncate_kv_)


@dataclass
class _Swapped:
    layers: list  # per layer (streaming, k, v, length, sink, window, scales) with k/v (scales) on the host
    nbytes: int


class ReferenceRunner(Runner):
    name = "reference"

    def __init__(self, adapter: DecoderAdapter, backend, capacity: int | None):
        self.adapter, self.backend, self.capacity = adapter, backend, capacity
        self.meter = KVMeter()
        self.per_token_layer = adapter.kv_bytes_per_token_layer

    # ------------------------------------------------------------------ budget
    @property
    def used(self) -> int:
        return self.meter.current

    @property
    def peak(self) -> int:
        return self.meter.peak

    def reset_peak(self) -> None:
        self.meter.peak = self.meter.current

    grow_chunk = 1  # never grows (see decode_reserve)

    def decode_reserve(self, max_new: int) -> int:
        return max_new  # contiguous buffers: the whole decode room at once

    def footprint(self, tokens: int, n_full: int, sink: int, window: int, demotes: bool = True) -> int:
        return contiguous_footprint(self.per_token_layer, self.adapter.shape.num_layers, tokens, n_full, sink, window,
                                    demotes)

    # ------------------------------------------------------------------ prefill
    def start_prefill(self, requests: Sequence[PrefillRequest]) -> PrefillTask:
        n_layers = self.adapter.shape.num_layers
        caches = [SequenceKV(layers=[None] * n_layers, meter=self.meter) for _ in requests]
        jobs = [PrefillJob(r.ids, r.policy, _Store(self, c, r.ids.shape[0] + r.reserve, r.sink, r.window),
                           r.sink, r.window, r.probe, r.scorer) for r, c in zip(requests, caches)]

        def finish(logits: torch.Tensor) -> list[PrefillResult]:
            # KV bytes of the prompt's kept tokens (the buffers also hold room for the decode tokens)
            held = [sum(c.nbytes // c.capacity * min(c.length, c.capacity) for c in cache.layers) for cache in caches]
            return [PrefillResult(logits[n], list(loop.scores[n]), cache.lazy_layers, held[n], cache)
                    for n, cache in enumerate(caches)]

        loop = LayerMajorPrefill(self.adapter, jobs, backend=self.backend)
        return PrefillTask(self, loop, caches, finish)

    # ------------------------------------------------------------------ decode
    def grow_need(self, cache: SequenceKV, tokens: int) -> int:
        return 0  # every buffer was made for prompt + max_new_tokens

    def grow(self, cache: SequenceKV, tokens: int) -> None:
        for c in cache.layers:
            c.reserve(tokens)

    @torch.inference_mode()
    def decode(self, caches: list[SequenceKV], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return decode_step(self.adapter, caches, tokens, positions, self.backend)

    def release(self, cache: SequenceKV) -> None:
        cache.release()

    # ------------------------------------------------------------------ preemption
    def swap_out(self, cache: SequenceKV) -> _Swapped:
        layers = [(c.streaming, c.k.to("cpu", copy=True), c.v.to("cpu", copy=True), c.length,
                   getattr(c, "sink", 0), getattr(c, "window", 0),
                   None if c.scales is None else tuple(x.to("cpu", copy=True) for x in c.scales))
                  for c in cache.layers]
        nbytes = cache.nbytes
        cache.release()
        return _Swapped(layers, nbytes)

    def swap_in_need(self, swapped: _Swapped) -> int:
        return swapped.nbytes

    def swap_in(self, swapped: _Swapped) -> SequenceKV:
        dev = self.adapter.device
        cache = SequenceKV(layers=[], meter=self.meter)
        for streaming, k, v, length, sink, window, scales in swapped.layers:
            k, v = k.to(dev), v.to(dev)
            scales = None if scales is None else tuple(x.to(dev) for x in scales)
            if streaming:
                cache.layers.append(SinkWindowKV(k, v, length, sink, window, self.meter, scales))
            else:
                c = FullKV(k, v, self.meter, scales=scales)
                c.length = length
                cache.layers.append(c)
        return cache


def _attend(backend, q: torch.Tensor, c, scale: float) -> torch.Tensor:
    """One sequence's decode attention for one layer. q ``[1, H_q, D]`` -> ``[1, H_q, D]`` (an fp8 or
    other-dtype cache is read through a dequantized copy: the reference path, not a fast one)."""
    lengths = torch.tensor([c.length], dtype=torch.int32, device=q.device)
    k, v = c.dequantized(q.dtype)
    if c.streaming and c.capacity == c.sink + c.window:
        return backend.decode_sink_window(q, k.unsqueeze(0), v.unsqueeze(0), lengths, c.sink, c.window, scale)
    # a full layer, or a streaming one that never outgrew sink + window (every slot is in order)
    return backend.decode_full(q, k.unsqueeze(0), v.unsqueeze(0), lengths, scale)


@torch.inference_mode()
def decode_step(adapter: DecoderAdapter, caches: list[SequenceKV], tokens: torch.Tensor,
                positions: torch.Tensor, backend) -> torch.Tensor:
    """Feed one token per sequence; returns next-token logits ``[B, V]`` (fp32).

    tokens, positions: ``[B]``; the position of each new token is its sequence's length so far
    (original positions: streaming layers are never renumbered).
    """
    b = tokens.shape[0]
    h = adapter.embed(tokens.view(b, 1))
    cos, sin = adapter.rope(h, positions.view(b, 1))
    for i in range(adapter.shape.num_layers):
        q, k, v = adapter.qkv(i, h, cos, sin)  # [B, 1, H, D]
        outs = []
        for s, cache in enumerate(caches):
            c = cache.layers[i]
            c.append(k[s, 0], v[s, 0])
            outs.append(_attend(backend, q[s], c, adapter.scale))
        h = adapter.finish_layer(i, h, torch.cat(outs).view(b, 1, -1))
    return adapter.logits(h[:, -1])
