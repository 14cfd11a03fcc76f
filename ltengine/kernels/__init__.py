"""Decode-attention and KV-truncation kernels, and the backend that picks one per op, once.

Ops (shapes token-major, ``[B, T, H_kv, D]`` caches, ``[B, H_q, D]`` queries):
  decode_full(q, k, v, lengths, scale)                       -> [B, H_q, D]
  decode_sink_window(q, k, v, lengths, sink, window, scale)  -> [B, H_q, D]
  truncate_kv_(k, v, lengths, sink, window)                  -> new lengths (in place on k, v)
  score_ratio(q, k, sink, window, scale)                     -> float (prefill scoring, the paper's lazy ratio;
                                                                q [H_q, P, D] last P queries, k [H_kv, T, D])
  score_peak(q, k, sink, window, scale)                      -> float (1 - best head's mass on its 8 top distant keys)
  score_cover(q, k, sink, window, scale)                     -> float (1 - best head's distinct distant text / 16)
  paged_decode(q, k_pool, v_pool, tables, n_valid, scale[, k_scale, v_scale], overlap=False)
                                                             -> [B, H_q, D] (pool [NB, BS, H_kv, D], tables [B, MB];
                                                                an fp8 pool's scales [NB, BS, H_kv]; overlap: the CUDA
                                                                kernel's prologue may overlap the previous kernel)
  paged_truncate_(k_pool, v_pool, tables, lengths, sink, window) -> None (in place: each row's kept tokens into
                                                                their ring slots of its own blocks; tables [N, MB])
  prefill_sink_window(q, k, v, sink, window, scale)          -> [B, T, H_q, D] (streaming prefill: causal attention
                                                                over sink + window keys; q [B, T, H_q, D], k/v [B, T, H_kv, D])
  linear(x, w, bias[, x_ss, eps, glu, resid, next_norm])    -> [M, N] (the decode step's projections: x [M, K],
                                                                w [N, K]; the CUDA kernel for M <= 8, with the RMSNorm
                                                                factor, SiLU gate or residual add in its epilogue:
                                                                linear.py)

Implementations, fastest first: ``cuda`` (csrc/, via cuda.py: paged_decode, paged_truncate_, truncate_kv_, linear),
``cpp`` (the CPU truncations of the same extension), ``triton`` (paged.py's paged decode, lazy_score.py,
prefill.py's sink + window prefill),
``reference`` (reference.py, paged.py, lazy.py: the ground truth; decode_full / decode_sink_window have only
it, for the CPU reference runner). ``get_backend(device)`` resolves each op to an ordered list of usable
implementations once; at call time the first that supports the input's (dtype, head dim) runs, a
dict lookup cached per key, never a device check in the decode loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ltengine.kernels import cuda as _cuda
from ltengine.kernels import linear as _linear
from ltengine.kernels.reference import decode_full_ref, decode_sink_window_ref, ring_slot, truncate_kv_ref_

__all__ = [
    "Backend",
    "available_backends",
    "get_backend",
    "decode_full_ref",
    "decode_sink_window_ref",
    "ring_slot",
    "truncate_kv_ref_",
]

OPS = ("decode_full", "decode_sink_window", "truncate_kv_", "score_ratio", "score_peak", "score_cover", "paged_decode",
       "paged_truncate_", "prefill_sink_window", "linear")
SCORE_OPS = {"ratio": "score_ratio", "peak": "score_peak", "cover": "score_cover"}  # LazyConfig.score -> op
IMPLS = ("cuda", "cpp", "triton", "sdpa", "reference")  # cpp: the CPU truncate_kv_ of ltengine._C

_Supports = Callable[[torch.dtype, int], bool]


def _any(dtype: torch.dtype, head_dim: int) -> bool:
    return True


@dataclass(frozen=True)
class _Impl:
    name: str
    fn: Callable
    supports: _Supports = _any


def _lazy_score():
    from ltengine.kernels import lazy_score  # imports triton itself only if installed

    return lazy_score


def _candidates(device: torch.device) -> dict[str, list[_Impl]]:
    """Every usable implementation per op on this device, fastest first."""
    from ltengine.kernels import paged, prefill
    from ltengine.lazy import cover_score, lazy_ratio, peak_score  # the reference scorers live with the policies

    ref = {
        "decode_full": _Impl("reference", decode_full_ref),
        "decode_sink_window": _Impl("reference", decode_sink_window_ref),
        "truncate_kv_": _Impl("reference", truncate_kv_ref_),
        "score_ratio": _Impl("reference", lazy_ratio),
        "score_peak": _Impl("reference", peak_score),
        "score_cover": _Impl("reference", cover_score),
        "paged_decode": _Impl("reference", paged.paged_decode_ref),
        "paged_truncate_": _Impl("reference", paged.paged_truncate_ref_),
        "prefill_sink_window": _Impl("reference", prefill.prefill_sink_window_ref),
        "linear": _Impl("reference", _linear.linear_ref),
    }
    out: dict[str, list[_Impl]] = {op: [] for op in OPS}
    from ltengine.kernels import sdpa  # contiguous-cache decode (the reference runner's fast path), any device

    out["decode_full"].append(_Impl("sdpa", sdpa.decode_full, sdpa.supports))
    out["decode_sink_window"].append(_Impl("sdpa", sdpa.decode_sink_window, sdpa.supports))
    if device.type == "cuda":
        if _cuda.has_cuda_ext():
            out["truncate_kv_"].append(_Impl("cuda", _cuda.truncate_kv_))
            out["paged_truncate_"].append(_Impl("cuda", _cuda.paged_truncate_))
            out["linear"].append(_Impl("cuda", _linear.linear_cuda, _linear.supports))
            # before Triton where it measured faster (all but 16-bit pools with D > 128); for every pool it
            # reads where Triton is missing
            out["paged_decode"].append(_Impl("cuda", _cuda.paged_decode,
                                             _cuda.paged_first if paged.triton is not None else _cuda.paged_supports))
        score = _lazy_score()
        if score.available():
            out["score_ratio"].append(_Impl("triton", score.lazy_ratio_triton, score.supports))
        if paged.triton is not None:
            out["paged_decode"].append(_Impl("triton", paged.paged_decode_triton, paged.triton_supports))
        if prefill.available():
            out["prefill_sink_window"].append(_Impl("triton", prefill.prefill_sink_window_triton, prefill.supports))
    elif device.type == "cpu" and _cuda.has_cpu_ext():  # the CPU ops of the compiled extension
        out["truncate_kv_"].append(_Impl("cpp", _cuda.truncate_kv_))
        out["paged_truncate_"].append(_Impl("cpp", _cuda.paged_truncate_))
    for op in OPS:
        out[op].append(ref[op])
    return out


def available_backends(device: torch.device | str) -> dict[str, list[str]]:
    """op -> names of the implementations usable on ``device``, fastest first."""
    return {op: [i.name for i in impls] for op, impls in _candidates(torch.device(device)).items()}


@dataclass
class _Dispatch:
    """One op: the ordered implementations and a cache (dtype, head_dim) -> first that supports it."""

    impls: list[_Impl]
    cache: dict[tuple[torch.dtype, int], _Impl] = field(default_factory=dict)

    def pick(self, dtype: torch.dtype, head_dim: int) -> _Impl:
        impl = self.cache.get((dtype, head_dim))
        if impl is None:
            impl = next(i for i in self.impls if i.supports(dtype, head_dim))
            self.cache[(dtype, head_dim)] = impl
        return impl


class Backend:
    """The kernels one engine uses, chosen once per device (see ``get_backend``)."""

    def __init__(self, name: str, impls: dict[str, list[_Impl]]):
        self.name = name
        self._ops = {op: _Dispatch(impls[op]) for op in OPS}
        self.fold_linear = True  # linear_fuses: the decode step folds its elementwise kernels into the projections
        self.overlap_decode = True  # paged_decode(overlap=True) reaches the CUDA kernel (off: side-by-side runs)

    def decode_full(self, q, k, v, lengths, scale):
        """q [B, H_q, D], k/v [B, T_cap, H_kv, D], lengths [B] -> [B, H_q, D]."""
        return self._ops["decode_full"].pick(q.dtype, q.shape[-1]).fn(q, k, v, lengths, scale)

    def decode_sink_window(self, q, k, v, lengths, sink, window, scale):
        """q [B, H_q, D], k/v [B, sink + window, H_kv, D], lengths [B] (tokens seen) -> [B, H_q, D]."""
        return self._ops["decode_sink_window"].pick(q.dtype, q.shape[-1]).fn(q, k, v, lengths, sink, window, scale)

    def truncate_kv_(self, k, v, lengths, sink, window):
        """In place on k/v [B, T_cap, H_kv, D]; returns min(lengths, sink + window)."""
        return self._ops["truncate_kv_"].pick(k.dtype, k.shape[-1]).fn(k, v, lengths, sink, window)

    def lazy_ratio(self, q, k, sink, window, scale) -> float:
        """Prefill scoring: q [H_q, P, D] (last P queries), k [H_kv, T, D] -> mean kept attention mass."""
        return self._ops["score_ratio"].pick(q.dtype, q.shape[-1]).fn(q, k, sink, window, scale)

    def scorer(self, rule: str) -> Callable:
        """The op that scores a layer under ``LazyConfig.score == rule`` (higher = lazier):
        ``fn(q [H_q, P, D], k [H_kv, T, D], sink, window, scale) -> float``."""
        if rule not in SCORE_OPS:
            raise ValueError(f"score rule must be one of {tuple(SCORE_OPS)}, got {rule!r}")
        disp = self._ops[SCORE_OPS[rule]]
        return lambda q, k, sink, window, scale: disp.pick(q.dtype, q.shape[-1]).fn(q, k, sink, window, scale)

    def paged_decode(self, q, k_pool, v_pool, tables, n_valid, scale, k_scale=None, v_scale=None, *,
                     overlap: bool = False):
        """q [B, H_q, D], pools [NB, BS, H_kv, D], tables [B, MB] int32, n_valid [B] int32 -> [B, H_q, D].
        Chosen by the pool's dtype; an fp8 pool passes its scales ``[NB, BS, H_kv]``. ``overlap``: ``tables``
        and ``n_valid`` were not written by the kernel just before, so the CUDA kernel may read them while
        that kernel finishes (``cuda.paged_decode``); the other implementations ignore it."""
        impl = self._ops["paged_decode"].pick(k_pool.dtype, q.shape[-1])
        kw = {"overlap": True} if overlap and self.overlap_decode and impl.name == "cuda" else {}
        if k_scale is None:
            return impl.fn(q, k_pool, v_pool, tables, n_valid, scale, **kw)
        return impl.fn(q, k_pool, v_pool, tables, n_valid, scale, k_scale, v_scale, **kw)

    def paged_truncate_(self, k_pool, v_pool, tables, lengths, sink, window) -> None:
        """In place: row n's tokens [lengths[n] - window, lengths[n]) move to their ring slots in the
        blocks ``tables[n]`` (slot order), the sink stays; rows with length <= sink + window are untouched."""
        self._ops["paged_truncate_"].pick(k_pool.dtype, k_pool.shape[-1]).fn(k_pool, v_pool, tables, lengths,
                                                                            sink, window)

    def prefill_sink_window(self, q, k, v, sink, window, scale):
        """Streaming prefill: q [B, T, H_q, D], k/v [B, T, H_kv, D] -> [B, T, H_q, D], query i over keys
        j <= i with j < sink or j > i - window."""
        return self._ops["prefill_sink_window"].pick(q.dtype, q.shape[-1]).fn(q, k, v, sink, window, scale)

    def linear(self, x, w, bias=None, **modes):
        """x [M, K] @ w[N, K].T (+ bias [N]) -> [M, N], with the decode step's RMSNorm factor (``x_ss``, ``eps``),
        SiLU gate (``glu``) or residual add (``resid``, ``next_norm``) folded in (``kernels/linear.py``); chosen
        by w's dtype and K (the CUDA kernel takes M <= 8, the PyTorch twin the rest)."""
        return self._ops["linear"].pick(w.dtype, w.shape[1]).fn(x, w, bias, **modes)

    def linear_fuses(self, rows: int, w: torch.Tensor) -> bool:
        """``linear`` runs the CUDA kernel, elementwise modes included, for ``rows`` rows of x against w (where
        it does not, the modes run as separate PyTorch ops: a caller keeps its own fused kernels instead).
        ``fold_linear = False`` turns the folding off (side-by-side benchmarks)."""
        return (self.fold_linear and self._ops["linear"].pick(w.dtype, w.shape[1]).name == "cuda"
                and 1 <= rows <= _linear.SKINNY_ROWS)

    def drop(self, op: str, name: str) -> None:
        """Remove implementation ``name`` of ``op`` (its next one runs instead), for side-by-side benchmarks;
        call before a runner captures CUDA graphs. The reference stays."""
        if name == "reference":
            raise ValueError("the reference implementation cannot be dropped")
        disp = self._ops[op]
        disp.impls = [i for i in disp.impls if i.name != name]
        disp.cache.clear()

    def impl_for(self, op: str, dtype: torch.dtype, head_dim: int) -> str:
        """Name of the implementation that runs ``op`` for this dtype and head dim."""
        return self._ops[op].pick(dtype, head_dim).name

    def describe(self) -> dict[str, str]:
        """op -> implementations in order, with the dtypes/head dims each covers, e.g.
        ``'cuda (bf16/fp16: D % 8 == 0, D <= 128; ...) > triton > reference'``."""
        out = {}
        for op, disp in self._ops.items():
            parts = []
            for impl in disp.impls:
                if impl.supports is _cuda.paged_first:
                    parts.append(f"{impl.name} (bf16/fp16: D % 8 == 0, D <= 128; fp32: D % 8 == 0, "
                                 "fp8: D % 16 == 0; D <= 256)")
                elif impl.supports is _linear.supports:
                    parts.append("cuda (bf16/fp16, K % 8 == 0, <= 8 rows, RMSNorm factor / SiLU gate / residual add "
                                 "in the epilogue; the PyTorch twin otherwise)")
                elif impl.supports is _cuda.paged_supports:
                    parts.append(f"{impl.name} (bf16/fp16/fp32: D % 8 == 0, fp8: D % 16 == 0; D <= 256)")
                else:
                    parts.append(impl.name)
            out[op] = " > ".join(parts)
        return out

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, {self.describe()})"


def get_backend(device: torch.device | str, prefer: str | None = None) -> Backend:
    """The kernels for ``device``. ``prefer``: None (fastest available per op), or one of
    ``"cuda"``, ``"cpp"``, ``"triton"``, ``"reference"`` to force that implementation first where it exists
    (``"reference"`` makes every op the pure-PyTorch reference)."""
    if prefer is not None and prefer not in IMPLS:
        raise ValueError(f"prefer must be one of {IMPLS} or None, got {prefer!r}")
    cands = _candidates(torch.device(device))
    if prefer == "reference":
        cands = {op: [i for i in impls if i.name == "reference"] for op, impls in cands.items()}
    elif prefer is not None:
        cands = {op: sorted(impls, key=lambda i: i.name != prefer) for op, impls in cands.items()}
    firsts = {impls[0].name for impls in cands.values()}
    name = prefer or ("+".join(n for n in IMPLS if n in firsts))
    return Backend(name, cands)
