"""Executes the model: layer-major prefill with lazy-layer demotion, and one batched decode step.

Two runners share one interface (``footprint``/``capacity``/``free``, ``prefill``, ``decode``,
``release``) so the engine's scheduler is unaware of how KV is stored:
``ReferenceRunner`` (here) keeps contiguous per-sequence caches and is the reference path;
``PagedRunner`` (paged.py) keeps every cache in one block pool and decodes a batch per launch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .cache import FullKV, KVMeter, SequenceKV, demote, truncated
from .lazy import LayerPolicy, lazy_ratio
from .models import DecoderAdapter

try:  # optional: flash-attn's prefill kernel when it is installed
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over a whole prompt. q ``[B, T, H_q, D]``, k/v ``[B, T, H_kv, D]`` -> ``[B, T, H_q, D]``.

    flash-attn when importable (CUDA, fp16/bf16), else PyTorch SDPA (which picks its own fused kernel).
    """
    if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_attn_func(q, k, v, causal=True, softmax_scale=scale)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [V] fp32, the next-token distribution after the prompt
    ratios: list[float]  # lazy ratio of every layer (empty when not scored)
    lazy_layers: list[int]  # demoted layers, sorted
    kv_bytes: int  # this sequence's KV right after prefill
    handle: object  # the runner's per-sequence state


@dataclass
class PrefillJob:
    """One prompt of a (batched) layer-major prefill: its tokens, its own lazy-layer queue, and the
    runner's callbacks that store layer i's KV and demote an already stored layer j."""

    ids: torch.Tensor  # [T]
    policy: LayerPolicy
    store: Callable[[int, torch.Tensor, torch.Tensor, bool], None]  # (i, k [T, H_kv, D], v, lazy)
    demote_: Callable[[int], None]


def layer_major(adapter: DecoderAdapter, jobs: Sequence[PrefillJob], sink: int, window: int, probe: int,
                score: bool = True, progress=None, ratio_fn=lazy_ratio):
    """The prefill loop both runners share: runs prompts through layer 0, then 1, ...

    Several prompts go through each layer together, right-padded to the longest: attention is causal,
    so a prompt's tokens never see the padding after them, and only each prompt's own rows are
    scored, stored and read out. Per prompt, after layer l is computed and scored, its policy names
    layers to demote; those already stored are truncated (``demote_(j)``) *before* layer l is stored
    (``store(l, k, v, lazy)``), so no queue ever holds more than its capacity: the one layer in
    flight is the activations.
    ``ratio_fn``: the scorer (``lazy.lazy_ratio`` or a backend's ``lazy_ratio`` kernel, same contract);
    a policy's own ``scorer`` (``LazyConfig(score="peak")``) takes precedence.
    Returns (last hidden state of each prompt ``[B, hidden]``, each prompt's ratios).
    """
    lengths = [job.ids.shape[0] for job in jobs]
    b, t = len(jobs), max(lengths)
    dev = jobs[0].ids.device
    ids = torch.zeros((b, t), dtype=torch.long, device=dev)
    for n, job in enumerate(jobs):
        ids[n, :lengths[n]] = job.ids
    scorers = [getattr(job.policy, "scorer", None) or ratio_fn for job in jobs]
    h = adapter.embed(ids)
    cos, sin = adapter.rope(h, torch.arange(t, device=dev).expand(b, t))
    ratios: list[list[float]] = [[] for _ in jobs]
    for i in range(adapter.shape.num_layers):
        q, k, v = adapter.qkv(i, h, cos, sin)
        for n, length in enumerate(lengths):
            p = min(probe, length)
            r = scorers[n](q[n, length - p:length].transpose(0, 1), k[n, :length].transpose(0, 1), sink, window,
                           adapter.scale) if score else 0.0
            ratios[n].append(r)
        o = prefill_attention(q, k, v, adapter.scale)
        h = adapter.finish_layer(i, h, o.reshape(b, t, -1))
        del q, o
        for n, (job, length) in enumerate(zip(jobs, lengths)):
            now = job.policy.observe(i, ratios[n][-1])
            for j in now:
                if j != i:
                    job.demote_(j)
            job.store(i, k[n, :length], v[n, :length], i in now)
        del k, v
        if progress is not None:
            progress(i + 1)
    for job in jobs:
        for j in job.policy.finish():
            job.demote_(j)
    last = torch.tensor([length - 1 for length in lengths], device=dev)
    return h[torch.arange(b, device=dev), last], ratios if score else [[] for _ in jobs]


class Runner:
    """The interface the engine's scheduler sees; subclasses implement ``prefill_batch``."""

    def prefill(self, ids: torch.Tensor, policy: LayerPolicy, probe: int, max_new: int, score: bool = True,
                progress=None) -> PrefillResult:
        """One prompt: a ``prefill_batch`` of one."""
        return self.prefill_batch([(ids, policy, max_new)], probe, score, progress)[0]


class ReferenceRunner(Runner):
    """Contiguous per-sequence caches (cache.py); decode loops over sequences per layer.

    Budget units are bytes; ``capacity`` None means unbounded.
    """

    name = "reference"

    def __init__(self, adapter: DecoderAdapter, backend, sink: int, window: int, capacity: int | None):
        self.adapter, self.backend, self.sink, self.window = adapter, backend, sink, window
        self.meter = KVMeter()
        self.capacity = capacity
        s = adapter.shape
        self.per_token_layer = 2 * s.num_kv_heads * s.head_dim * torch.empty((), dtype=adapter.dtype).element_size()

    def footprint(self, prompt_len: int, max_new: int, n_full: int) -> int:
        """Worst-case bytes: full layers at prompt + new tokens, lazy ones at sink + window, and one
        more sink + window buffer while a demotion copies the kept tokens out of a stored full layer
        (only when some layers are stored full first and a full layer is larger than the ring)."""
        total = prompt_len + max_new
        lazy = self.adapter.shape.num_layers - n_full
        ring = min(total, self.sink + self.window)
        demotes = 0 < n_full and lazy > 0 and total > ring
        return self.per_token_layer * (n_full * total + lazy * ring + (ring if demotes else 0))

    @property
    def free(self) -> int | None:
        return None if self.capacity is None else self.capacity - self.meter.current

    @property
    def kv_bytes(self) -> int:
        return self.meter.current

    @torch.inference_mode()
    def prefill_batch(self, prompts: Sequence[tuple[torch.Tensor, LayerPolicy, int]], probe: int, score: bool = True,
                      progress=None) -> list[PrefillResult]:
        """Prefill ``(ids [T], policy, max_new)`` prompts together (``layer_major``); one result each."""
        sink, window = self.sink, self.window
        caches = [SequenceKV(layers=[None] * self.adapter.shape.num_layers, meter=self.meter) for _ in prompts]

        def job(ids, policy, max_new, cache):
            total = ids.shape[0] + max_new  # buffers get room for the decode tokens at once

            def store(i, k, v, lazy):
                if lazy:  # stored straight as sink + window: its full KV never enters the cache
                    cache.layers[i] = truncated(k, v, k.shape[0], sink, window, self.backend.truncate_kv_, self.meter,
                                                total)
                else:
                    cache.layers[i] = FullKV(k, v, self.meter, total)

            def demote_(j):
                cache.layers[j] = demote(cache.layers[j], sink, window, self.backend.truncate_kv_)

            return PrefillJob(ids, policy, store, demote_)

        try:
            h, ratios = layer_major(self.adapter, [job(*p, c) for p, c in zip(prompts, caches)],
                                    sink, window, probe, score, progress, self.backend.lazy_ratio)
            logits = self.adapter.logits(h)
        except BaseException:  # (an out-of-memory error included): the caches go back, the engine stays usable
            for cache in caches:
                cache.release()
            raise
        # KV bytes of the prompt's kept tokens (the buffers also hold room for the decode tokens)
        held = [sum(c.nbytes // c.capacity * min(c.length, c.capacity) for c in cache.layers) for cache in caches]
        return [PrefillResult(logits[n], ratios[n], cache.lazy_layers, held[n], cache)
                for n, cache in enumerate(caches)]

    @torch.inference_mode()
    def decode(self, caches: list[SequenceKV], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return decode_step(self.adapter, caches, tokens, positions, self.backend)

    def release(self, cache: SequenceKV) -> None:
        cache.release()


def _attend(backend, q: torch.Tensor, c, scale: float) -> torch.Tensor:
    """One sequence's decode attention for one layer. q ``[1, H_q, D]`` -> ``[1, H_q, D]``."""
    lengths = torch.tensor([c.length], dtype=torch.int32, device=q.device)
    if c.streaming and c.capacity == c.sink + c.window:
        return backend.decode_sink_window(q, c.k.unsqueeze(0), c.v.unsqueeze(0), lengths, c.sink, c.window, scale)
    # a full layer, or a streaming one that never outgrew sink + window (every slot is in order)
    return backend.decode_full(q, c.k.unsqueeze(0), c.v.unsqueeze(0), lengths, scale)


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
