"""KV caches of one sequence: full layers, sink + window (streaming) layers, truncation, byte accounting.

Layout is token-major, ``[tokens, H_kv, D]`` per layer and sequence, so that the kept prefix after a
truncation is one contiguous block. A full layer holds every token; a streaming layer holds ``sink``
slots followed by a ring of ``window`` slots, where position ``p >= sink`` lives in slot
``sink + (p - sink) % window`` (``kernels.reference.ring_slot``); positions are never renumbered, so
keys keep their RoPE rotation.

Storage dtype: the model's, another float dtype, or fp8 (``encode``): an fp8 layer also holds ``ks``/``vs``
``[slots, H_kv]``, one float32 scale per token and head (``kernels/fp8.py``), moved and grown with
their rows; attention reads ``dequantized`` copies (this is the CPU reference path).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.fp8 import dequantize, is_fp8, quantize
from ..kernels.reference import ring_slot


def encode(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype | None):
    """Prompt K/V ``[T, H_kv, D]`` in storage ``dtype`` (None: as they are): ``(k, v, scales)``, where
    ``scales`` is ``(ks, vs)`` ``[T, H_kv]`` for fp8 and None otherwise."""
    if dtype is None or dtype == k.dtype:
        return k, v, None
    if not is_fp8(dtype):
        return k.to(dtype), v.to(dtype), None
    (k8, ks), (v8, vs) = quantize(k), quantize(v)
    return k8, v8, (ks, vs)


@dataclass
class KVMeter:
    """Bytes of KV held right now and the most held at once (tensor sizes, exact on any device)."""

    current: int = 0
    peak: int = 0

    def add(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def sub(self, nbytes: int) -> None:
        self.current -= nbytes


class _LayerKV:
    """K and V buffers ``[slots, H_kv, D]`` of one layer of one sequence, counted by a meter.

    ``length`` counts the tokens the sequence has seen; subclasses say where token p lives.
    """

    streaming = False

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int, meter: KVMeter, scales=None):
        self.k, self.v, self.meter, self.length = k, v, meter, length
        self.ks, self.vs = scales if scales is not None else (None, None)
        meter.add(self.nbytes)

    @property
    def scales(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.ks is None else (self.ks, self.vs)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + (0 if self.ks is None else self.ks.nbytes + self.vs.nbytes)

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V in ``dtype`` for attention (the buffers themselves when already so)."""
        if self.ks is not None:
            return dequantize(self.k, self.ks, dtype), dequantize(self.v, self.vs, dtype)
        return self.k.to(dtype), self.v.to(dtype)

    @property
    def capacity(self) -> int:
        return self.k.shape[0]

    def slot(self, position: int) -> int:
        raise NotImplementedError

    def _grow(self, slots: int) -> None:
        """Move to buffers of ``slots`` (zeroed past the old ones), releasing the old buffers."""
        if slots <= self.capacity:
            return
        old = self.nbytes
        self.k, self.v = _grown(self.k, slots), _grown(self.v, slots)
        if self.ks is not None:
            self.ks, self.vs = _grown(self.ks, slots), _grown(self.vs, slots)
        self.meter.add(self.nbytes)
        self.meter.sub(old)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the next token's ``[H_kv, D]`` key and value into its slot."""
        s = self.slot(self.length)
        if s >= self.capacity:
            raise RuntimeError(f"KV cache holds {self.capacity} slots, token {self.length} needs slot {s}: more tokens "
                               "than the prompt + max_new_tokens it was allocated for")
        if self.ks is not None:
            (self.k[s], self.ks[s]), (self.v[s], self.vs[s]) = quantize(k), quantize(v)
        else:
            self.k[s] = k
            self.v[s] = v
        self.length += 1

    def release(self) -> None:
        self.meter.sub(self.nbytes)
        self.k = self.v = self.ks = self.vs = None  # type: ignore[assignment]


class FullKV(_LayerKV):
    """Every token of one layer: token p in slot p; the first ``length`` slots are valid."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, meter: KVMeter, capacity: int | None = None, scales=None):
        """The ``k.shape[0]`` tokens of ``k``/``v`` (and their fp8 ``scales``, from ``encode``);
        ``capacity``: slots to allocate at once (room for the decode tokens), so that no later
        ``reserve`` holds two buffers at a time."""
        length = k.shape[0]
        if capacity is not None and capacity > length:
            k, v = _grown(k, capacity), _grown(v, capacity)
            scales = None if scales is None else tuple(_grown(x, capacity) for x in scales)
        scales = None if scales is None else tuple(x.contiguous() for x in scales)
        super().__init__(k.contiguous(), v.contiguous(), length, meter, scales)

    def slot(self, position: int) -> int:
        return position

    def reserve(self, total_tokens: int) -> None:
        """Room for ``total_tokens`` (prompt + decode), made before decode starts."""
        self._grow(total_tokens)


class SinkWindowKV(_LayerKV):
    """A streaming layer: ``sink`` first tokens plus a ring of the last ``window`` tokens.

    ``k``, ``v``: ``[min(capacity, sink + window), H_kv, D]``; the valid slots are always
    ``[0, min(length, sink + window))``; a full ring overwrites its oldest slot.
    """

    streaming = True

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int, sink: int, window: int, meter: KVMeter,
                 scales=None):
        self.sink, self.window = sink, window
        super().__init__(k, v, length, meter, scales)

    def slot(self, position: int) -> int:
        return ring_slot(position, self.sink, self.window)

    def reserve(self, total_tokens: int) -> None:
        """A cache that never filled its sink + window grows up to that size, never beyond."""
        self._grow(min(total_tokens, self.sink + self.window))


def truncated(k: torch.Tensor, v: torch.Tensor, length: int, sink: int, window: int, truncate_kv_,
              meter: KVMeter, capacity: int | None = None, scales=None) -> SinkWindowKV:
    """A streaming cache from a full buffer ``k``/``v`` ``[capacity, H_kv, D]`` holding ``length`` tokens.

    ``truncate_kv_`` (a kernel backend's op) compacts the buffer in place: the sink stays, the last
    ``window`` tokens move into their ring slots right behind it. The compacted prefix is then moved
    into a buffer of exactly that size (or of ``min(capacity, sink + window)`` slots when larger:
    room for the decode tokens), so the allocator gets the whole old buffer back. fp8 ``scales``
    ``[capacity, H_kv]`` move with their rows by the same op (as ``[1, capacity, H_kv, 1]``).
    """
    if length > sink + window:
        lengths = torch.tensor([length], dtype=torch.int32, device=k.device)
        truncate_kv_(k.unsqueeze(0), v.unsqueeze(0), lengths, sink, window)
        if scales is not None:
            truncate_kv_(scales[0][None, :, :, None], scales[1][None, :, :, None], lengths, sink, window)
    # (a buffer of <= sink + window tokens already has token p in slot p = its ring slot)
    keep = min(k.shape[0], sink + window)
    slots = max(keep, min(capacity or 0, sink + window))
    if scales is not None:
        scales = tuple(_grown(x[:keep], slots) for x in scales)
    return SinkWindowKV(_grown(k[:keep], slots), _grown(v[:keep], slots), length, sink, window, meter, scales)


def demote(full: FullKV, sink: int, window: int, truncate_kv_) -> SinkWindowKV:
    """Truncate a stored full layer to sink + window in place, and free the rest."""
    if full.capacity <= sink + window:  # already in ring layout (slot p = p): nothing to move or free
        full.meter.sub(full.nbytes)
        lazy = SinkWindowKV(full.k, full.v, full.length, sink, window, full.meter, full.scales)
        full.k = full.v = full.ks = full.vs = None  # type: ignore[assignment]
        return lazy
    lazy = truncated(full.k, full.v, full.length, sink, window, truncate_kv_, full.meter, full.capacity, full.scales)
    full.release()  # counted after the copy: both buffers exist for a moment
    return lazy


def contiguous_footprint(per_token_layer: int, num_layers: int, tokens: int, n_full: int, sink: int, window: int,
                         demotes: bool = True) -> int:
    """Most bytes contiguous caches of one ``tokens``-token sequence hold: ``n_full`` full layers at
    ``tokens``, the others at sink + window, and one more sink + window buffer while a demotion copies
    the kept tokens out of a stored full layer (only when some layers are stored full first and a full
    layer is larger than the ring)."""
    lazy = num_layers - n_full
    ring = min(tokens, sink + window)
    copy = demotes and 0 < n_full and lazy > 0 and tokens > ring
    return per_token_layer * (n_full * tokens + lazy * ring + (ring if copy else 0))


def _grown(x: torch.Tensor, tokens: int) -> torch.Tensor:
    out = x.new_zeros((tokens, *x.shape[1:]))
    out[: x.shape[0]] = x
    return out


@dataclass
class SequenceKV:
    """All layers' caches of one sequence."""

    layers: list = field(default_factory=list)  # FullKV | SinkWindowKV per layer
    meter: KVMeter = field(default_factory=KVMeter)

    @property
    def lazy_layers(self) -> list[int]:
        return [i for i, c in enumerate(self.layers) if c.streaming]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    def release(self) -> None:
        for c in self.layers:
            if c is not None:  # a prefill that failed part-way has not stored every layer
                c.release()
        self.layers = []
