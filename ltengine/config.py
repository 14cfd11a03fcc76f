"""Configuration dataclasses: which layers go lazy (LazyConfig) and how tokens are sampled."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .kernels.fp8 import resolve_kv_dtype

POLICIES = ("lighttransfer", "topk", "random", "streaming")
SCORES = ("ratio", "peak", "cover")


@dataclass(frozen=True)
class LazyConfig:
    """How LightTransfer-Test turns layers lazy (sink + window KV cache).

    fraction: share of layers demoted to streaming attention, in [0, 1]; 0 = plain full attention.
              None (the default) means 0.5 without a ``kv_budget``, and "as few as the budget
              allows" with one. A set fraction under a budget is a floor: a prompt too long for
              the budget gets more lazy layers, never fewer.
    sink:     first tokens every streaming layer keeps (attention sinks), >= 1.
    window:   most recent tokens a streaming layer keeps, >= 1 (the query itself included).
    probe:    last prompt queries whose attention scores a layer's lazy ratio, >= 1.
    policy:   "lighttransfer" (online priority queue, the paper's method), "topk" (offline: score
              every layer, then demote the laziest), "random" (seeded), "streaming" (all layers), or
              an explicit sequence of layer indices.
    seed:     seed of the "random" policy.
    score:    how "lighttransfer" / "topk" score a layer (higher = lazier): "ratio" (the paper's lazy
              ratio, ``lazy.lazy_ratio``), "peak" (1 - the largest mass any head puts on its 8
              most-attended distant keys, ``lazy.peak_score``: keeps layers with retrieval heads) or
              "cover" (1 - the most distinct distant text any head reads across the probe rows: its
              16 distant keys' best probabilities over the rows, summed, / 16, ``lazy.cover_score``;
              keeps the layers that read several needles, one per question row).
    streaming_prefill: a layer already known to be lazy before its own attention runs (every layer of
              a layer list, "random" or "streaming"; with "lighttransfer", the layer whose probe score
              makes the full queue pop it at once) computes its prefill attention over sink + window
              only (O(T * window)) and stores only sink + window KV; its probe scores still see every
              key. Changes prefill hidden states (DuoAttention's trick), so off by default; "topk"
              decides only after every layer ran and is refused.
    """

    fraction: float | None = None
    sink: int = 4
    window: int = 1020
    probe: int = 64
    policy: str | tuple[int, ...] = "lighttransfer"
    seed: int = 0
    score: str = "ratio"
    streaming_prefill: bool = False

    def __post_init__(self) -> None:
        if self.fraction is not None and (isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float))
                                          or not 0.0 <= self.fraction <= 1.0):
            raise ValueError(f"LazyConfig.fraction must be a number in [0, 1] (or None), got {self.fraction!r}")
        for name in ("sink", "window", "probe"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LazyConfig.{name} must be a positive integer (>= 1), got {value!r}")
        if self.score not in SCORES:
            raise ValueError(f"LazyConfig.score must be one of {SCORES}, got {self.score!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"LazyConfig.seed must be an integer, got {self.seed!r}")
        if isinstance(self.policy, str):
            if self.policy not in POLICIES:
                raise ValueError(f"LazyConfig.policy must be one of {POLICIES} or a list of layer indices, got {self.policy!r}")
        else:
            if not isinstance(self.policy, (list, tuple, range)):
                raise ValueError(f"LazyConfig.policy must be one of {POLICIES} or a list of layer indices, "
                                 f"got {type(self.policy).__name__} {self.policy!r}")
            layers = tuple(self.policy)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(f"LazyConfig.policy as a layer list must hold non-negative ints, got {self.policy!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"LazyConfig.policy lists a layer twice: {self.policy!r}")
            object.__setattr__(self, "policy", tuple(sorted(layers)))
        if not isinstance(self.streaming_prefill, bool):
            raise ValueError(f"LazyConfig.streaming_prefill must be True or False, got {self.streaming_prefill!r}")
        if self.streaming_prefill and self.policy == "topk":
            raise ValueError("LazyConfig.streaming_prefill needs a policy that knows a layer is lazy before its "
                             "attention runs (a layer list, 'random', 'streaming' or 'lighttransfer'); "
                             "'topk' decides only after every layer is scored")

    @property
    def enabled(self) -> bool:
        """False when this config can never demote a layer (plain full attention)."""
        if isinstance(self.policy, tuple):
            return len(self.policy) > 0
        return self.policy == "streaming" or self.fraction is None or self.fraction > 0

    def num_lazy(self, num_layers: int, budget: bool = False) -> int:
        """Lazy layers the config asks for: round(fraction * L); with a budget and no fraction, 0
        (the budget alone then decides)."""
        if isinstance(self.policy, tuple):
            return len(self.policy)
        if self.policy == "streaming":
            return num_layers
        fraction = (0.0 if budget else 0.5) if self.fraction is None else self.fraction
        return int(round(fraction * num_layers))

    @classmethod
    def from_profile(cls, path: str | Path, **overrides) -> "LazyConfig":
        """A fixed-layer config from a JSON profile holding ``{"lazy_layers": [...], ...}``."""
        data = json.loads(Path(path).read_text())
        if "lazy_layers" not in data:
            raise ValueError(f"{path}: profile has no 'lazy_layers' key (keys: {sorted(data)})")
        kwargs = {k: data[k] for k in ("sink", "window", "probe") if k in data}
        kwargs.update(overrides)
        return cls(policy=tuple(int(i) for i in data["lazy_layers"]), **kwargs)


FULL = LazyConfig(fraction=0.0)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. temperature 0 (the default) is greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # a str, a list, or None are taken too
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
                or not math.isfinite(self.temperature) or self.temperature < 0):
            raise ValueError(f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**64), got {self.seed!r}")
        # None = no stop strings; "" and [""] are both refused (an empty string would stop at once)
        if self.stop is None:
            stop = ()
        elif isinstance(self.stop, str):
            stop = (self.stop,)
        elif isinstance(self.stop, (list, tuple)):
            stop = tuple(self.stop)
        else:
            stop = None
        if stop is None or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str | None) -> int | None:
    """``12GiB`` / ``1.5 GB`` / ``500000000`` -> bytes. None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"kv_budget must be bytes (int) or a string like '12GiB', got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"kv_budget {value!r} is not a size; use an int of bytes or e.g. '512MiB', '12GiB', '1.5GB'")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ValueError(f"kv_budget must be bytes (int) or a string like '12GiB', got {type(value).__name__}")
    if n <= 0:
        raise ValueError(f"kv_budget must be positive, got {value!r}")
    return n


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


RUNNERS = ("auto", "paged", "reference")


@dataclass(frozen=True)
class EngineConfig:
    """What shapes an engine's runner, fixed at construction (``Engine.config``).

    runner:             "paged" (one block pool, batched decode, CUDA graphs; default on CUDA),
                        "reference" (contiguous per-sequence caches; default on CPU), or "auto".
    backend:            None (fastest kernels per op) or "reference" / "cuda" / "cpp" / "triton" first.
    block_size:         tokens per pool block (paged runner).
    max_prefill_tokens: prompts admitted together are prefilled as one batch, right-padded to the
                        longest, while it holds at most this many tokens (padding included) and
                        padding is at most a fifth of them. 1 = one prompt at a time. None: 16384 on
                        CUDA, 2048 on CPU (where a GEMM is compute bound at a few thousand rows).
    overlap:            launch decode step n + 1 before taking in step n's tokens on the host
                        (None: on CUDA, where a launch returns before the step ends).
    score_layers:       False skips layer scoring (only for policies that need no scores).
    interleave_layers:  0: a prefill runs to the end within one ``step``; k >= 1: ``step`` runs k
                        layers of the prefill in flight, then one decode step of the running
                        requests, so a long prompt stalls them for k layers at a time.
    progress:           progress bars (None: for batches of 16+ prompts and long CPU prefills).
    graphs:             capture paged decode steps in CUDA graphs (None: on CUDA).
    kv_dtype:           what K/V are stored in: None / "auto" (the model's dtype), "fp8" (float8_e4m3fn
                        with a float32 scale per token and KV head: half of bf16's bytes + 3% at D = 128;
                        prefill attention still runs on the unquantized K/V), or a torch float dtype
                        (or its name, e.g. "bfloat16"). Normalized to a ``torch.dtype`` or None.
    """

    runner: str = "auto"
    backend: str | None = None
    block_size: int = 64
    max_prefill_tokens: int | None = None
    overlap: bool | None = None
    score_layers: bool = True
    interleave_layers: int = 0
    progress: bool | None = None
    graphs: bool | None = None
    kv_dtype: "torch.dtype | str | None" = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kv_dtype", resolve_kv_dtype(self.kv_dtype))
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        for name, low, what in (("block_size", 1, "a positive integer"),
                                ("max_prefill_tokens", 1, "a positive integer (1 = no batched prefill)"),
                                ("interleave_layers", 0, "an integer >= 0 (0 = off)")):
            value = getattr(self, name)
            if value is None and name == "max_prefill_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be {what}, got {value!r}")
        for name in ("overlap", "progress", "graphs"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name} must be True, False or None (automatic), got {getattr(self, name)!r}")
        if not isinstance(self.score_layers, bool):
            raise ValueError(f"score_layers must be True or False, got {self.score_layers!r}")
