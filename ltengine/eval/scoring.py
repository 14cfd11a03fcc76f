"""Layer-scoring rules compared in the study (higher score = lazier = demoted first).

"ratio": the engine's default, ``lazy.lazy_ratio`` (mean sink + window mass over heads and probe queries).
"headmin": the same mass per query head, then the minimum over heads: a layer counts as lazy only
    if every one of its heads is, so a layer with one retrieval head among lazy ones stays full.
"peak", "peak32": 1 - the largest, over query heads, of the mass the probe queries put on
    their 8 (32) most-attended *distant* keys (neither sink nor recent). A retrieval head puts its
    distant mass on a few tokens (the needle) and scores low (stays full); a layer whose distant
    attention is diffuse, or that has none, scores high (lazy). Needle-agnostic: it never sees the span.
"rowmax": ``peak`` with the *largest* probe row instead of the mean over rows: 1 - max over heads and
    rows of a row's mass on its 8 most-attended distant keys. A retrieval head reads a needle on the
    few rows that name its key (an induction hit on the question's key tokens), not on every row, so
    the mean dilutes it; the max keeps it (RULER scoring study, bench/RESULTS.md).
"cover": the engine's ``lazy.cover_score`` (``LazyConfig(score="cover")``, the default model's since
    this study): 1 - (max over heads of the summed top-16 of each distant key's *largest* probability
    over the probe rows) / 16: how much distinct distant text a head reads across the rows. A head
    reading four needles on four rows covers four needles; a head that every row points at the same
    few instruction tokens covers only those.
"""
from __future__ import annotations

import torch

from ..lazy import PEAK_KEYS, cover_score, distant_peak, distant_probs, kept_mass
from .harness import SharedPrefill


def head_ratios(q: torch.Tensor, k: torch.Tensor, sink: int, window: int, scale: float) -> torch.Tensor:
    """``lazy_ratio`` per query head: q ``[H_q, P, D]``, k ``[H_kv, T, D]`` -> ``[H_q]`` (mean over queries)."""
    return kept_mass(q, k, sink, window, scale).mean(dim=-1).reshape(q.shape[0])


def _headmin(sp: SharedPrefill, sink: int, window: int, probe: int) -> list[float]:
    p = min(probe, len(sp.ids))
    return [float(head_ratios(q[-p:].transpose(0, 1), c.k.transpose(0, 1), sink, window, sp.adapter.scale).min())
            for q, c in zip(sp.q_tail, sp.full)]


def _peak(m: int):
    def rule(sp: SharedPrefill, sink: int, window: int, probe: int) -> list[float]:
        p = min(probe, len(sp.ids))
        return [1.0 - float(distant_peak(q[-p:].transpose(0, 1), c.k.transpose(0, 1), sink, window,
                                         sp.adapter.scale, m).max())
                for q, c in zip(sp.q_tail, sp.full)]
    return rule


def row_peaks(q: torch.Tensor, k: torch.Tensor, sink: int, window: int, scale: float, keys: int = PEAK_KEYS) -> torch.Tensor:
    """Per head and probe row, the mass on the row's ``keys`` most-attended distant keys: ``[H_q, P]``
    (``distant_peak`` is its mean over rows)."""
    d = distant_probs(q, k, sink, window, scale).reshape(q.shape[0], q.shape[1], k.shape[1])  # [H_q, P, T]
    return d.topk(min(keys, d.shape[-1]), dim=-1).values.sum(dim=-1)


def _per_layer(score):
    def rule(sp: SharedPrefill, sink: int, window: int, probe: int) -> list[float]:
        p = min(probe, len(sp.ids))
        if p > sp.q_tail[0].shape[0]:
            raise ValueError(f"probe {probe} exceeds the {sp.q_tail[0].shape[0]} queries kept (max_probe)")
        return [score(q[-p:].transpose(0, 1), c.k.transpose(0, 1), sink, window, sp.adapter.scale)
                for q, c in zip(sp.q_tail, sp.full)]
    return rule


RULES = {
    "ratio": lambda sp, sink, window, probe: sp.ratios(sink, window, probe, "ratio"),
    "headmin": _headmin,
    "peak": lambda sp, sink, window, probe: sp.ratios(sink, window, probe, "peak"),
    "peak32": _peak(32),
    "rowmax": _per_layer(lambda q, k, s, w, sc: 1.0 - float(row_peaks(q, k, s, w, sc).max())),
    "cover": _per_layer(cover_score),  # the engine's LazyConfig(score="cover")
}


def layer_scores(sp: SharedPrefill, sink: int, window: int, probe: int, rule: str = "ratio") -> list[float]:
    """Every layer's score under ``rule`` (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"score rule must be one of {sorted(RULES)}, got {rule!r}")
    return RULES[rule](sp, sink, window, probe)
