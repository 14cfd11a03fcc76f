"""Shared-prefill harness: one prefill per prompt, then every lazy config decoded from copies of it.

Prefill is the same for every policy (all layers attend fully while the prompt is processed; a policy
only chooses which caches are truncated afterwards), so ``shared_prefill`` runs the runners' own
``LayerMajorPrefill`` once with a store that keeps every layer's full KV and a hook that keeps the
last ``max_probe`` rotated queries, and ``SharedPrefill`` then answers, per ``LazyConfig``: the layer
scores (the backend's scorer on those queries, the same call the runner makes), the demoted layers
(the policy object run over the scores in layer order), and a ``SequenceKV`` built from copies with
``memory.cache.demote``. ``greedy`` and ``teacher_forced_nll`` decode through the reference runner's
``decode_step``. ``tests/test_eval.py`` checks that
tokens and lazy layers equal ``Engine.generate``'s for the same config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..config import LazyConfig
from ..kernels import get_backend
from ..lazy import FullPolicy, make_policy
from ..memory.cache import FullKV, KVMeter, SequenceKV, demote, encode
from ..models import DecoderAdapter
from ..runners.base import LayerHook, LayerMajorPrefill, PrefillJob
from ..runners.reference import decode_step


@dataclass
class SharedPrefill:
    """One prompt prefilled once with every layer's full KV kept. ``q_tail[l]``: ``[P, H_q, D]``."""

    adapter: DecoderAdapter
    ids: list[int]
    logits: torch.Tensor  # [V] next-token logits after the prompt
    full: list[FullKV]
    q_tail: list[torch.Tensor]
    _ratios: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.full)

    def ratios(self, sink: int, window: int, probe: int, score: str = "ratio") -> list[float]:
        """Every layer's score (the backend's ``scorer(score)``), computed exactly as the runners do."""
        key = (sink, window, probe, score)
        if key not in self._ratios:
            p = min(probe, len(self.ids))
            if p > self.q_tail[0].shape[0]:
                raise ValueError(f"probe {probe} exceeds the {self.q_tail[0].shape[0]} queries kept (max_probe)")
            fn = get_backend(self.adapter.device).scorer(score)
            self._ratios[key] = [fn(q[-p:].transpose(0, 1), c.k.transpose(0, 1), sink, window, self.adapter.scale)
                                 for q, c in zip(self.q_tail, self.full)]
        return self._ratios[key]

    def lazy_layers(self, lazy: LazyConfig, ratios: Sequence[float] | None = None) -> list[int]:
        """Layers the config's policy demotes (sorted), the policy fed ``ratios`` in layer order.

        ``ratios`` defaults to the engine's own scores; pass other scores to try another scoring rule
        under the same queue."""
        if not lazy.enabled:
            return []
        n = self.num_layers
        policy = make_policy(lazy, n, n - min(lazy.num_lazy(n), n))
        if ratios is None:
            ratios = self.ratios(lazy.sink, lazy.window, lazy.probe, lazy.score)
        demoted = [j for i, r in enumerate(ratios) for j in policy.observe(i, r)]
        return sorted(demoted + policy.finish())

    def build_cache(self, lazy_layers: Sequence[int], sink: int, window: int, total_tokens: int,
                    backend, kv_dtype: torch.dtype | None = None) -> SequenceKV:
        """A fresh SequenceKV: copies of the full caches stored in ``kv_dtype`` (None: the adapter's,
        e.g. fp8, as the runners store them), ``lazy_layers`` demoted, room reserved."""
        cache = SequenceKV(meter=KVMeter())
        lazy = set(lazy_layers)
        kv_dtype = kv_dtype or self.adapter.kv_dtype
        for i, c in enumerate(self.full):
            k, v, scales = encode(c.k.clone(), c.v.clone(), kv_dtype)
            copy = FullKV(k, v, cache.meter, scales=scales)
            cache.layers.append(demote(copy, sink, window, backend.truncate_kv_) if i in lazy else copy)
        for c in cache.layers:
            c.reserve(total_tokens)
        return cache

    def release(self) -> None:
        for c in self.full:
            c.release()
        self.full, self.q_tail = [], []


class _KeepAll:
    """A KVStore that keeps every layer's full KV (no policy ever demotes here)."""

    def __init__(self, n_layers: int):
        self.meter = KVMeter()
        self.layers: list = [None] * n_layers

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, lazy: bool) -> None:
        self.layers[layer] = FullKV(k, v, self.meter)

    def demote(self, layer: int) -> None:
        raise AssertionError("shared_prefill keeps every layer full")


def shared_prefill(adapter: DecoderAdapter, ids: Sequence[int], max_probe: int = 64,
                   hook: LayerHook | None = None) -> SharedPrefill:
    """The runners' layer-major prefill with no demotion: full KV of every layer and the last
    ``max_probe`` queries kept (the same loop and adapter calls, so the same numbers)."""
    t, n = len(ids), adapter.shape.num_layers
    x = torch.tensor(list(ids), dtype=torch.long, device=adapter.device)
    store, q_tail = _KeepAll(n), []
    p = min(max_probe, t)

    def keep(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        if hook is not None:
            hook(layer, q, k)
        q_tail.append(q[-p:].clone())

    loop = LayerMajorPrefill(adapter, [PrefillJob(x, FullPolicy(n, n), store, 1, 1, p, None)], hook=keep)
    loop.advance()
    with torch.inference_mode():
        logits = adapter.logits(loop.last_hidden())[0]
    return SharedPrefill(adapter, list(ids), logits, store.layers, q_tail)


@torch.inference_mode()
def greedy(adapter: DecoderAdapter, backend, caches: list[SequenceKV], first_logits: torch.Tensor,
           prompt_len: int, max_new_tokens: int, eos_ids: set[int],
           done: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy-decode one or more caches of the same prompt, the way ``Engine.generate`` does.

    ``caches`` must have room for ``prompt_len + max_new_tokens`` tokens; they are consumed (released).
    Sequences stop at an EOS token (kept, as the engine keeps it), at ``max_new_tokens``, or when
    ``done(tokens)`` is True (an early exit for the caller's metric; the tokens so far are then a prefix
    of what the engine returns). Caches decode one at a time: a batched step runs the projections at
    another matrix shape and is not bit-identical to the engine's single-prompt step.
    """
    outs = []
    first = int(first_logits.argmax())
    for cache in caches:
        tokens = [first]
        while not (tokens[-1] in eos_ids or len(tokens) >= max_new_tokens or (done and done(tokens))):
            pos = torch.tensor([prompt_len + len(tokens) - 1], device=adapter.device)
            logits = decode_step(adapter, [cache], torch.tensor([tokens[-1]], device=adapter.device), pos, backend)
            tokens.append(int(logits[0].argmax()))
        cache.release()
        outs.append(tokens)
    return outs


@torch.inference_mode()
def teacher_forced_nll(adapter: DecoderAdapter, backend, cache: SequenceKV, first_logits: torch.Tensor,
                       targets: Sequence[int], prompt_len: int) -> torch.Tensor:
    """NLL ``[M]`` of ``targets`` following the prompt: target m is scored from the logits after the
    prompt and targets[:m], fed one decode step at a time through ``cache`` (so a lazy layer sees only
    its sink + window). The cache needs room for ``prompt_len + M - 1`` tokens; it is released."""
    nll = torch.empty(len(targets))
    logits = first_logits.float()
    for m, tok in enumerate(targets):
        nll[m] = -torch.log_softmax(logits, dim=-1)[tok]
        if m + 1 < len(targets):
            pos = torch.tensor([prompt_len + m], device=adapter.device)
            logits = decode_step(adapter, [cache], torch.tensor([tok], device=adapter.device), pos, backend)[0]
    cache.release()
    return nll
