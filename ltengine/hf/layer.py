"""One layer of ``LightTransferCache``: token-major K/V buffers, full or sink + ring (see ``ltengine.hf``)."""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ..kernels.reference import ring_slot


class LightTransferLayer(CacheLayerMixin):
    """One layer's K/V of one sequence, in token-major buffers ``[1, slots, H_kv, D]`` (the layout of
    ltengine's kernels). Full: token p in slot p. Lazy: ``sink`` slots, then a ring of ``window``
    slots, token p in ``ring_slot(p, sink, window)``. ``length`` counts the tokens seen (positions
    are never renumbered); ``keys``/``values`` are ``[1, H_kv, n, D]`` views of the held slots."""

    is_sliding = False  # masks are sized for every token seen; lazy layers narrow them themselves
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, sink: int, window: int):
        super().__init__()
        self.sink, self.window = sink, window
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0
        self.lazy = False

    # ---------------------------------------------------------------- CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store ``[1, H_kv, T, D]`` new keys/values; returns the held ``keys``/``values``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.append(key_states.transpose(1, 2), value_states.transpose(1, 2))
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.k = self.v = self.keys = self.values = None
        self.length, self.lazy, self.is_initialized = 0, False, False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError("LightTransferCache cannot be cropped: lazy layers have dropped the tokens a rollback "
                             "needs (assisted decoding and prompt lookup are not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if beam_idx.numel() != 1 or int(beam_idx[0]) != 0:
            raise ValueError(f"LightTransferCache holds one sequence; beam search (reorder by {beam_idx.tolist()}) "
                             "is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise ValueError(f"LightTransferCache holds one sequence; it cannot be repeated {repeats} times "
                             "(num_beams / num_return_sequences > 1 are not supported)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.numel() != 1 or int(indices.reshape(-1)[0]) != 0:
            raise ValueError("LightTransferCache holds one sequence; it cannot select batch rows")

    # ---------------------------------------------------------------- storage
    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    @property
    def held(self) -> int:
        """Slots holding a token: every token (full), at most sink + window (lazy)."""
        return min(self.length, self.sink + self.window) if self.lazy else self.length

    @property
    def nbytes(self) -> int:
        """Bytes of the held tokens' K and V (the buffers may keep room to grow, as the engine's do)."""
        return 0 if self.k is None else 2 * self.held * self.k[0, 0].nbytes

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the next ``T`` tokens ``[1, T, H_kv, D]`` into their slots (a lazy layer keeps the
        sink ones and the last ``window``)."""
        t = k.shape[1]
        pos = torch.arange(self.length, self.length + t, device=k.device)
        if self.lazy:
            keep = (pos < self.sink) | (pos >= self.length + t - self.window)
            pos, k, v = pos[keep], k[:, keep], v[:, keep]
            self._grow(min(self.length + t, self.sink + self.window), k)
            slots = ring_slot(pos, self.sink, self.window)
        else:
            self._grow(self.length + t, k)
            slots = pos
        self.k[:, slots] = k
        self.v[:, slots] = v
        self.length += t
        self._expose()

    def _grow(self, slots: int, like: torch.Tensor) -> None:
        if slots <= self.capacity:
            return
        if self.k is not None and not self.lazy:
            slots += max(64, slots // 8)  # room ahead: a decode step rarely copies the buffer
        if self.lazy:
            slots = self.sink + self.window  # a ring that outgrows its prompt gets its whole size at once
        k = like.new_zeros((1, slots, *like.shape[2:]))
        v = like.new_zeros((1, slots, *like.shape[2:]))
        if self.k is not None:
            k[:, :self.capacity] = self.k
            v[:, :self.capacity] = self.v
        self.k, self.v = k, v

    def _expose(self) -> None:
        n = min(self.held, self.capacity)
        self.keys, self.values = self.k[:, :n].transpose(1, 2), self.v[:, :n].transpose(1, 2)

    def demote(self, truncate_kv_) -> None:
        """Truncate this full layer to sink + window in place and free the rest."""
        cap = self.sink + self.window
        if self.length > cap:
            lengths = torch.tensor([self.length], dtype=torch.int32, device=self.k.device)
            truncate_kv_(self.k, self.v, lengths, self.sink, self.window)
        keep = min(self.length, cap)
        self.k, self.v = self.k[:, :keep].clone(), self.v[:, :keep].clone()
        self.lazy = True
        self._expose()

    def kept_positions(self) -> torch.Tensor:
        """Original positions of the held tokens, in slot order."""
        if not self.lazy:
            return torch.arange(self.length, device=self.k.device)
        sink = torch.arange(min(self.length, self.sink), device=self.k.device)
        recent = torch.arange(max(self.sink, self.length - self.window), self.length, device=self.k.device)
        pos = torch.cat([sink, recent])
        return pos[torch.argsort(ring_slot(pos, self.sink, self.window))]
