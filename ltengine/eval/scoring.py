"""Layer-scoring rules compared in the study (higher score = lazier = demoted first).

"ratio": the engine's default, ``lazy.lazy_ratio`` (mean sink + window mass over heads and probe queries).
"headmin": the same mass per query head, then the minimum over heads: a layer counts as lazy only
    if every one of its heads is, so a layer with one retrieval head among lazy ones stays full.
"peak", "peak32": 1 - the largest, over query heads, of the mass the probe queries put on
    their 8 (32) most-attended *distant* keys (neither sink nor recent). A retrieval head puts its
    distant mass on a few tokens (the needle) and scores low (stays full); a layer whose distant
    attention is diffuse, or that has none, scores high (lazy). Needle-agnostic: it never sees the span.
"""
from __future__ import annotations

import torch

from ..lazy import distant_peak, kept_mass
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


RULES = {
    "ratio": lambda sp, sink, window, probe: sp.ratios(sink, window, probe, "ratio"),
    "headmin": _headmin,
    "peak": lambda sp, sink, window, probe: sp.ratios(sink, window, probe, "peak"),
    "peak32": _peak(32),
    "cover": lambda sp, sink, window, probe: sp.ratios(sink, window, probe, "cover"),  # lazy.cover_score
}


def layer_scores(sp: SharedPrefill, sink: int, window: int, probe: int, rule: str = "ratio") -> list[float]:
    """Every layer's score under ``rule`` (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"score rule must be one of {sorted(RULES)}, got {rule!r}")
    return RULES[rule](sp, sink, window, probe)
