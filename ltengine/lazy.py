"""Where a layer's lazy ratio is scored and where the queue decides which layers go lazy.

``lazy_ratio`` scores one layer from its last ``probe`` queries (the paper's rule); ``peak_score`` and
``cover_score`` are the alternatives chosen by ``LazyConfig(score="peak" | "cover")`` (see their
docstrings and bench/RESULTS.md, issues #5 and 13). A ``LayerPolicy`` sees the layers in
prefill order (``observe``) and answers which layers to demote *now*, before the next layer's cache is
stored; ``finish`` answers what is left to demote once every layer is scored (only the offline
"topk" comparison uses it).
"""
from __future__ import annotations

import random as _random

import torch
from sortedcontainers import SortedList

from .config import LazyConfig, format_bytes


def probe_probs(q: torch.Tensor, k: torch.Tensor, scale: float):
    """Causal attention probabilities of the last P queries over all T prompt keys, in fp32.

    q: ``[H_q, P, D]`` the last P query rows of the prompt (P <= T), already rotated.
    k: ``[H_kv, T, D]`` all prompt keys, rotated. ``H_q`` is a multiple of ``H_kv`` (GQA).
    Returns (probs ``[H_kv, G, P, T]``, query positions ``[P, 1]``, key positions ``[1, T]``).
    """
    h_q, p, _ = q.shape
    h_kv, t, _ = k.shape
    group = h_q // h_kv
    qf = q.float().reshape(h_kv, group * p, -1)
    scores = torch.matmul(qf, k.float().transpose(1, 2)).mul_(scale)  # [H_kv, G*P, T]
    scores = scores.view(h_kv, group, p, t)
    pos_q = torch.arange(t - p, t, device=q.device).view(p, 1)
    pos_k = torch.arange(t, device=q.device).view(1, t)
    scores.masked_fill_(pos_k > pos_q, float("-inf"))
    return scores.softmax(dim=-1), pos_q, pos_k


def kept_mass(q: torch.Tensor, k: torch.Tensor, sink: int, window: int, scale: float) -> torch.Tensor:
    """Per query row, the attention mass on sink and recent keys: ``[H_kv, G, P]``.

    Query i (absolute position T - P + i) counts keys j with ``j < sink`` or ``i - window < j <= i``,
    under the ordinary causal softmax over the whole prompt (``probe_probs``)."""
    probs, pos_q, pos_k = probe_probs(q, k, scale)
    keep = (pos_k < sink) | (pos_k > pos_q - window)  # causal part already has zero probability
    return (probs * keep).sum(dim=-1)


def lazy_ratio(q: torch.Tensor, k: torch.Tensor, sink: int, window: int, scale: float) -> float:
    """Share of attention mass the last queries put on sink and recent keys (``kept_mass``), the mean
    over heads and queries."""
    return float(kept_mass(q, k, sink, window, scale).mean())


def distant_probs(q: torch.Tensor, k: torch.Tensor, sink: int, window: int, scale: float) -> torch.Tensor:
    """``probe_probs`` kept on *distant* keys only (neither sink nor within ``window`` of the query), 0
    elsewhere: ``[H_kv, G, P, T]``."""
    probs, pos_q, pos_k = probe_probs(q, k, scale)
    return probs * ((pos_k >= sink) & (pos_k <= pos_q - window))


PEAK_KEYS = 8  # distant keys counted by peak_score


def distant_peak(q: torch.Tensor, k: torch.Tensor, sink: int, window: int, scale: float,
                 keys: int = PEAK_KEYS) -> torch.Tensor:
    """Per query head, the mean over the P queries of the probability on the ``keys`` most-attended
    *distant* keys (neither sink nor within ``window``). q ``[H_q, P, D]``, k ``[H_kv, T, D]`` -> ``[H_q]``."""
    d = distant_probs(q, k, sink, window, scale)
    return d.topk(min(keys, k.shape[1]), dim=-1).values.sum(dim=-1).mean(dim=-1).reshape(q.shape[0])


def peak_score(q: torch.Tensor, k: torch.Tensor, sink: int, window: int, scale: float) -> float:
    """1 - the largest, over query heads, of the mass put on the ``PEAK_KEYS`` most-attended distant
    keys (``distant_peak``); same contract as ``lazy_ratio``, higher = lazier.

    A retrieval head (one that reads a fact far back, e.g. a needle) puts its distant mass on a few
    tokens, so its layer scores low and stays full; a layer whose distant attention is diffuse, or
    absent, scores high. On SmolLM2-135M the mean ``lazy_ratio`` ranks several retrieval layers among
    the laziest (their other heads are local) and demotes them; this rule keeps them.
    """
    return 1.0 - float(distant_peak(q, k, sink, window, scale).max())


COVER_KEYS = 16  # distinct distant keys counted by cover_score


def distant_cover(q: torch.Tensor, k: torch.Tensor, sink: int, window: int, scale: float,
                  keys: int = COVER_KEYS) -> torch.Tensor:
    """Per query head, the sum of the ``keys`` largest, over distant keys (neither sink nor within
    ``window``), of each key's *largest* probability over the P probe queries: how much distinct distant
    text the head reads across the rows, in ``[0, keys]``. q ``[H_q, P, D]``, k ``[H_kv, T, D]`` -> ``[H_q]``."""
    per_key = distant_probs(q, k, sink, window, scale).amax(dim=2)  # [H_kv, G, T]: each key's best row
    return per_key.topk(min(keys, k.shape[1]), dim=-1).values.sum(dim=-1).reshape(q.shape[0])


def cover_score(q: torch.Tensor, k: torch.Tensor, sink: int, window: int, scale: float) -> float:
    """1 - the largest, over query heads, of ``distant_cover`` / ``COVER_KEYS``; same contract as
    ``lazy_ratio``, higher = lazier.

    A question naming several keys retrieves each on the one probe row that names it (an induction hit
    on the key's earlier occurrence beside the needle), so a mean over rows (``peak_score``) dilutes
    it, while the instruction look-back that every row repeats survives the mean; the per-key max over
    rows counts each needle once and the repeated look-back once. With the question span as probe (64
    rows) it keeps the needle-reading layers of SmolLM2-135M that ``peak`` demotes (RULER study,
    bench/RESULTS.md, issue 13).
    """
    return 1.0 - float(distant_cover(q, k, sink, window, scale).max()) / COVER_KEYS


class LayerPolicy:
    """Decides, layer by layer during prefill, which layers' KV caches to demote."""

    name = "base"
    streaming_prefill = False  # LazyConfig.streaming_prefill (set by make_policy)

    def __init__(self, num_layers: int, full_capacity: int):
        self.num_layers = num_layers
        self.full_capacity = full_capacity

    def attends_streaming(self, layer: int, ratio: float) -> bool:
        """Streaming prefill: whether ``layer``, scored ``ratio`` but not yet attended, may compute its
        prefill attention over sink + window only, because ``observe(layer, ratio)`` will demote it."""
        return self.streaming_prefill and self._lazy_before_attention(layer, ratio)

    def _lazy_before_attention(self, layer: int, ratio: float) -> bool:
        return False

    def observe(self, layer: int, ratio: float) -> list[int]:
        """Called after ``layer`` is scored and its full KV stored; returns layers to demote now."""
        raise NotImplementedError

    def finish(self) -> list[int]:
        """Called after the last layer; returns layers still to demote."""
        return []


class LightTransferPolicy(LayerPolicy):
    """The paper's online queue: once more than ``full_capacity`` layers hold full KV, demote the
    laziest layer processed so far. Ties pop the higher layer index first."""

    name = "lighttransfer"

    def __init__(self, num_layers: int, full_capacity: int):
        super().__init__(num_layers, full_capacity)
        self.queue: SortedList = SortedList()  # (ratio, layer); max = laziest

    def observe(self, layer: int, ratio: float) -> list[int]:
        self.queue.add((ratio, layer))
        demoted = []
        while len(self.queue) > self.full_capacity:
            _, j = self.queue.pop(-1)
            demoted.append(j)
        return demoted

    def _lazy_before_attention(self, layer: int, ratio: float) -> bool:
        # the queue is at capacity and this layer would be its maximum: ``observe`` pops it at once
        return len(self.queue) >= self.full_capacity and (not self.queue or (ratio, layer) > self.queue[-1])


class TopKPolicy(LayerPolicy):
    """Offline comparison: score every layer first, then demote the laziest. Holds every full cache
    until the end of prefill, so it can exceed a byte budget by design."""

    name = "topk"

    def __init__(self, num_layers: int, full_capacity: int):
        super().__init__(num_layers, full_capacity)
        self.scores: list[tuple[float, int]] = []

    def observe(self, layer: int, ratio: float) -> list[int]:
        self.scores.append((ratio, layer))
        return []

    def finish(self) -> list[int]:
        n_lazy = max(0, len(self.scores) - self.full_capacity)
        return [j for _, j in sorted(self.scores, reverse=True)[:n_lazy]]


class FixedPolicy(LayerPolicy):
    """Demotes a fixed set of layers as soon as each is processed (ignores the scores)."""

    name = "fixed"

    def __init__(self, num_layers: int, full_capacity: int, layers: set[int]):
        super().__init__(num_layers, full_capacity)
        self.layers = layers

    def observe(self, layer: int, ratio: float) -> list[int]:
        return [layer] if layer in self.layers else []

    def _lazy_before_attention(self, layer: int, ratio: float) -> bool:
        return layer in self.layers


class FullPolicy(LayerPolicy):
    """Plain full attention: never demotes."""

    name = "full"

    def observe(self, layer: int, ratio: float) -> list[int]:
        return []


def plan_full_layers(lazy: LazyConfig, num_layers: int, capacity: int | None, prompt_len: int, max_new: int,
                     footprint) -> int:
    """Full-KV layers one request keeps (its queue's capacity): the config's count, and, under a
    ``capacity`` in bytes, fewer while ``footprint(n_full)`` (the request's peak bytes alone, at prompt
    + ``max_new``) does not fit. ValueError if even the config's laziest layout does not fit."""
    n_full = num_layers - min(lazy.num_lazy(num_layers, budget=capacity is not None), num_layers) \
        if lazy.enabled else num_layers
    adaptive = lazy.enabled and not isinstance(lazy.policy, tuple) and lazy.policy != "streaming"
    if capacity is not None and adaptive:
        while n_full > 0 and footprint(n_full) > capacity:
            n_full -= 1
    if capacity is not None and footprint(n_full) > capacity:
        what = (f"even with every layer lazy (sink {lazy.sink} + window {lazy.window})" if adaptive or
                (lazy.enabled and lazy.policy == "streaming") else "with this lazy-layer policy")
        raise ValueError(f"kv_budget {format_bytes(capacity)} is too small: {what} a prompt of {prompt_len} "
                         f"tokens + {max_new} new tokens needs {format_bytes(footprint(n_full))} of KV")
    return n_full


def needs_scores(lazy: LazyConfig) -> bool:
    """Whether the config's policy reads layer scores (the online queue and the offline top-k)."""
    return lazy.enabled and lazy.policy in ("lighttransfer", "topk")


def make_policy(lazy: LazyConfig, num_layers: int, full_capacity: int) -> LayerPolicy:
    """The policy object for one prompt's prefill; how layers are scored is ``lazy.score``, which the
    runner resolves through the kernel backend (``Backend.scorer``)."""
    policy = _make_policy(lazy, num_layers, full_capacity)
    policy.streaming_prefill = lazy.streaming_prefill
    return policy


def _make_policy(lazy: LazyConfig, num_layers: int, full_capacity: int) -> LayerPolicy:
    if not lazy.enabled:
        return FullPolicy(num_layers, num_layers)
    n_lazy = num_layers - full_capacity
    if isinstance(lazy.policy, tuple):
        bad = [i for i in lazy.policy if i >= num_layers]
        if bad:
            raise ValueError(f"LazyConfig.policy names layers {bad}, but the model has layers 0..{num_layers - 1}")
        return FixedPolicy(num_layers, full_capacity, set(lazy.policy))
    if lazy.policy == "lighttransfer":
        return LightTransferPolicy(num_layers, full_capacity)
    if lazy.policy == "topk":
        return TopKPolicy(num_layers, full_capacity)
    if lazy.policy == "random":
        chosen = _random.Random(lazy.seed).sample(range(num_layers), n_lazy)
        policy = FixedPolicy(num_layers, full_capacity, set(chosen))
        policy.name = "random"
        return policy
    if lazy.policy == "streaming":
        policy = FixedPolicy(num_layers, 0, set(range(num_layers)))
        policy.name = "streaming"
        return policy
    raise ValueError(f"unknown policy {lazy.policy!r}")
