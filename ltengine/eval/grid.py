"""The configurations an evaluation compares, and how each decides its lazy layers on one prompt."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import POLICIES, SCORES, LazyConfig
from .harness import SharedPrefill
from .scoring import RULES, layer_scores


@dataclass(frozen=True)
class EvalConfig:
    """One row of a results table: full attention, or a policy at a lazy fraction and window.

    score: how layers are scored for the queue ("ratio" and "peak" are the engine's ``LazyConfig.score``
    options; the others are study options, see ``scoring.py``). The random policy draws a new layer set per prompt
    (seed = prompt index), so its accuracy averages over layer sets instead of one lucky or unlucky draw.
    """

    policy: str
    fraction: float = 0.0
    window: int = 256
    sink: int = 4
    probe: int = 64
    score: str = "ratio"

    def __post_init__(self) -> None:
        if self.policy != "full" and self.policy not in POLICIES:
            raise ValueError(f"policy must be 'full' or one of {POLICIES}, got {self.policy!r}")
        if self.score not in RULES:
            raise ValueError(f"score must be one of {sorted(RULES)}, got {self.score!r}")

    @property
    def name(self) -> str:
        if self.policy == "full":
            return "full"
        frac = "" if self.policy == "streaming" else f" {round(100 * self.fraction)}%"
        extra = "" if (self.sink, self.probe) == (4, 64) else f" s{self.sink} p{self.probe}"
        score = "" if self.score == "ratio" or self.policy in ("random", "streaming") else f" [{self.score}]"
        return f"{self.policy}{frac} w{self.window}{extra}{score}"

    def lazy(self, index: int = 0) -> LazyConfig | None:
        """The engine's LazyConfig for prompt ``index`` (None = full attention)."""
        if self.policy == "full":
            return None
        return LazyConfig(fraction=self.fraction if self.policy != "streaming" else 1.0, sink=self.sink,
                          window=self.window, probe=self.probe, policy=self.policy, seed=index,
                          score=self.score if self.score in SCORES else "ratio")

    def lazy_layers(self, sp: SharedPrefill, index: int = 0) -> list[int]:
        lazy = self.lazy(index)
        if lazy is None:
            return []
        ratios = None if self.score in SCORES else layer_scores(sp, self.sink, self.window, self.probe, self.score)
        return sp.lazy_layers(lazy, ratios)


def make_grid(policies: list[str], fractions: list[float], windows: list[int], sink: int = 4, probe: int = 64,
              score: str = "ratio", with_full: bool = True) -> list[EvalConfig]:
    """full (once) + every policy x fraction x window; "streaming" once per window (it has no fraction)."""
    out = [EvalConfig("full")] if with_full else []
    for w in windows:
        for f in fractions:
            for p in policies:
                if p in ("full", "streaming"):
                    continue
                out.append(EvalConfig(p, f, w, sink, probe, score))
        if "streaming" in policies:
            out.append(EvalConfig("streaming", 1.0, w, sink, probe))
    return out
