"""The configs ``ltengine eval ruler`` compares, by name (``--configs full,ratio50,peak50,...``).

- ``full``: every layer attends to its whole cache.
- ``{score}{pct}[-p{probe}]``: lighttransfer (the online queue) at ``pct``% lazy, layers scored by a rule
  of ``scoring.RULES`` (``ratio``: the paper's lazy ratio, probe 64; ``peak``: the default model's
  default, probe 16; ``headmin``, ``peak32``: study rules), e.g. ``ratio50``, ``peak25``, ``peak50-p64``.
- ``random{pct}``: random layers at ``pct``% (a new draw per prompt).
- ``streaming``: every layer sink + window, the window chosen per prompt length so the KV after prefill
  equals the 50%-lazy configs' (``run.equal_bytes_window``; ``streaming{pct}`` for another fraction).
- ``{score}{pct}[-p{probe}]-sp``: the same lighttransfer config with streaming prefill
  (``LazyConfig(streaming_prefill=True)``: a layer the queue pops at once also prefills over sink +
  window), run through ``Engine.generate`` (its prefill differs from the shared one), e.g. ``peak50-sp``.
- ``session-full``, ``session-context``, ``session-question``: ``Engine.document(prompt up to the
  question, lazy=..., mode=..., template=False)`` then ``.ask(the question's tokens)``, on the very prompt
  the harness configs see; 50% lazy with the peak score (``session-full``: fraction 0, which must
  equal ``full``: a check of the session path).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import SCORES, LazyConfig
from .grid import EvalConfig
from .run import equal_bytes_window
from .scoring import RULES

DEFAULT_CONFIGS = ("full", "ratio25", "ratio50", "peak25", "peak50", "cover25", "cover50", "random50", "streaming",
                   "session-context", "session-question")
SESSION_MODES = {"session-full": "context", "session-context": "context", "session-question": "question"}
_RULES = "|".join(sorted([*RULES, "random", "streaming"], key=len, reverse=True))
_LAZY = re.compile(rf"^(?P<rule>{_RULES})(?P<pct>\d{{1,3}})(?:-p(?P<probe>\d+))?(?P<sp>-sp)?$")
PROBES = {"ratio": 64, "peak": 16, "cover": 64}  # each rule's measured default probe (bench/RESULTS.md, issues #5, 13); others 64


@dataclass(frozen=True)
class RulerConfig:
    """One column of the RULER table. ``kind``: "harness" (decoded from the shared prefill), "streaming"
    (harness, window set per length), "engine" (``Engine.generate``: streaming prefill) or "session"
    (through ``Engine.document``)."""

    key: str
    kind: str
    policy: str = "full"
    fraction: float = 0.0
    score: str = "ratio"
    probe: int = 64
    sink: int = 4
    window: int = 256
    mode: str | None = None

    @property
    def name(self) -> str:
        return self.key

    def eval_config(self, context: int, num_layers: int) -> EvalConfig:
        """The harness config for a prompt of ``context`` tokens."""
        if self.kind == "streaming":
            w = equal_bytes_window(num_layers, int(round(self.fraction * num_layers)), context, self.sink, self.window)
            return EvalConfig("streaming", 1.0, max(1, w), self.sink, self.probe)
        return EvalConfig(self.policy, self.fraction, self.window, self.sink, self.probe, self.score)

    def lazy(self) -> LazyConfig:
        """The session's (or, kind "engine", the streaming-prefill request's) LazyConfig."""
        return LazyConfig(fraction=self.fraction, sink=self.sink, window=self.window, probe=self.probe,
                          score=self.score if self.score in SCORES else "ratio",
                          streaming_prefill=self.kind == "engine")


def parse_config(key: str, sink: int = 4, window: int = 256) -> RulerConfig:
    """``RulerConfig`` for a name (see the module docstring); ValueError naming what is allowed."""
    key = key.strip()
    if key == "full":
        return RulerConfig(key, "harness", sink=sink, window=window)
    if key in SESSION_MODES:
        frac = 0.0 if key == "session-full" else 0.5
        return RulerConfig(key, "session", "lighttransfer", frac, "peak", PROBES["peak"], sink, window, SESSION_MODES[key])
    m = _LAZY.match(key)
    if m:
        rule, pct = m["rule"], int(m["pct"])
        if not 0 < pct <= 100:
            raise ValueError(f"config {key!r}: the lazy percentage must be in 1..100, got {pct}")
        probe = int(m["probe"]) if m["probe"] else PROBES.get(rule, 64)
        if m["sp"]:
            if rule not in SCORES:
                raise ValueError(f"config {key!r}: streaming prefill (-sp) runs the engine's own scores "
                                 f"({', '.join(SCORES)}), got {rule!r}")
            return RulerConfig(key, "engine", "lighttransfer", pct / 100, rule, probe, sink, window)
        if rule == "streaming":
            return RulerConfig(key, "streaming", "streaming", pct / 100, "ratio", probe, sink, window)
        if rule == "random":
            return RulerConfig(key, "harness", "random", pct / 100, "ratio", probe, sink, window)
        if rule in RULES:
            return RulerConfig(key, "harness", "lighttransfer", pct / 100, rule, probe, sink, window)
    if key == "streaming":
        return RulerConfig(key, "streaming", "streaming", 0.5, "ratio", 64, sink, window)
    raise ValueError(f"unknown RULER config {key!r}; use full, {{{'|'.join(sorted(RULES))}}}<pct>[-p<probe>] "
                     f"(e.g. ratio50, peak25-p16; -sp for streaming prefill: peak50-sp), random<pct>, streaming[<pct>], "
                     f"or {', '.join(SESSION_MODES)}")
