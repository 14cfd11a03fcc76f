"""The transformers drop-in: LightTransfer-Test inside Hugging Face's own ``model.generate``.

    cache = LightTransferCache(model, lazy=LazyConfig(fraction=0.5))
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)  # (or cache=cache)
    cache.lazy_layers, cache.lazy_ratios, cache.nbytes

How it hooks in, through transformers' own extension points only:
- ``LightTransferCache`` is a ``transformers.Cache`` (one ``LightTransferLayer`` per decoder layer);
  the model's attention module calls ``cache.update(k, v, layer)`` and then the attention function.
- That function is registered as ``"ltengine_lighttransfer"`` in ``AttentionInterface`` (with SDPA's
  mask builder in ``AttentionMaskInterface``), and the cache sets it as the model's attention
  implementation. ``update`` leaves a note naming the tensors it returned; the attention function
  sees the query, finds the note by identity and lets the cache attend. Any other call (another
  cache, no cache) is plain SDPA.
- Prefill (the first forward on an empty cache) reproduces the engine's ``layer_major``: each layer attends
  fully and causally, is scored from its last ``probe`` queries over all prompt keys
  (``Backend.scorer(lazy.score)``), and the policy (``lazy.make_policy``) names layers to demote; a
  demoted layer is truncated in place to sink + ring (``Backend.truncate_kv_``), keys keep their RoPE
  rotation. Decode attends full layers with ``Backend.decode_full`` and lazy ones with
  ``Backend.decode_sink_window``, the engine's own kernels.

Limits: one sequence per cache (batch 1, no padding); no beam search, assisted decoding or ``crop``
(lazy layers have dropped the tokens a rollback would need). A later ``generate`` on the same cache
continues the sequence (multi-turn) without rescoring: its chunk attends like decode.
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .config import FULL, LazyConfig, format_bytes, parse_bytes
from .kernels import get_backend
from .kernels.reference import ring_slot
from .lazy import make_policy
from .models import DecoderAdapter

ATTN_IMPLEMENTATION = "ltengine_lighttransfer"


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


@dataclass
class _Note:
    """What ``update`` returned for one layer, for the attention function that comes next."""

    cache: "LightTransferCache"
    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    mode: str  # "prefill", "decode" or "chunk" (several tokens after the prefill)
    key_pos: torch.Tensor | None = None  # chunk mode: the original position of every returned key


_NOTE: ContextVar[_Note | None] = ContextVar("ltengine_lighttransfer_note", default=None)


class LightTransferCache(Cache):
    """A ``transformers`` cache that runs LightTransfer-Test inside ``model.generate``.

    Args:
        model: a loaded ``transformers`` causal LM (LLaMA, Mistral, Qwen2, Qwen3). Its attention
            implementation becomes ``"ltengine_lighttransfer"`` (SDPA for every call not through a
            ``LightTransferCache``; ``model.set_attn_implementation("sdpa")`` restores the default).
        lazy: which layers go lazy, as for ``Engine`` (``None`` = full attention).
        kv_budget: KV bytes (int or ``"512MiB"``), or None: the fraction alone decides. With a budget the
            prompt keeps as many full layers as fit (at most ``1 - lazy.fraction`` of them when a fraction
            is set), by the engine's rule (``Engine._plan``) over this cache's ``footprint``: prompt +
            ``max_new_tokens`` tokens in full layers, sink + window in lazy ones, one ring more while a
            demotion copies (+ the layer in flight); a budget too small even all-lazy raises ValueError.
        max_new_tokens: decode tokens the budget leaves room for (pass ``generate``'s own value to plan
            exactly as ``Engine.generate`` does); unused without a budget. The budget is a plan made at
            prefill, not a limit checked during decode.

    After the prefill: ``lazy_layers`` (sorted), ``layer_scores`` (every layer's score under
    ``score_rule`` = ``lazy.score``, higher = lazier; alias ``lazy_ratios``; empty in full mode), ``full_capacity`` (full
    layers the plan allowed), ``nbytes`` (K/V bytes held now) and ``nbytes_after_prefill``. One cache serves one
    sequence (batch 1); use a fresh cache per prompt.
    """

    def __init__(self, model, lazy: LazyConfig | None = LazyConfig(), kv_budget: int | str | None = None, *,
                 max_new_tokens: int = 0):
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise ValueError(f"model must be a loaded transformers causal LM, got {type(model).__name__}")
        if lazy is not None and not isinstance(lazy, LazyConfig):
            raise ValueError(f"lazy must be a LazyConfig or None, got {type(lazy).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        adapter = DecoderAdapter(model)  # raises for unsupported model types
        self.lazy = lazy if lazy is not None else FULL
        self.kv_budget = parse_bytes(kv_budget)
        self.max_new_tokens = max_new_tokens
        self.shape = adapter.shape
        if isinstance(self.lazy.policy, tuple):
            make_policy(self.lazy, self.shape.num_layers, self.shape.num_layers)  # layer indices checked now
        self.backend = get_backend(adapter.device)
        self._scorer = self.backend.scorer(self.lazy.score)
        self._per_token_layer = 2 * self.shape.num_kv_heads * self.shape.head_dim * adapter.dtype.itemsize
        super().__init__(layers=[LightTransferLayer(self.lazy.sink, self.lazy.window)
                                 for _ in range(self.shape.num_layers)])
        self._clear_decisions()
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)

    def _clear_decisions(self) -> None:
        self.layer_scores: list[float] = []
        self.full_capacity: int | None = None
        self.nbytes_after_prefill = 0
        self._policy = None

    # ---------------------------------------------------------------- reports
    @property
    def score_rule(self) -> str:
        """How ``layer_scores`` were computed: ``LazyConfig.score`` ("ratio" or "peak")."""
        return self.lazy.score

    @property
    def lazy_ratios(self) -> list[float]:
        """``layer_scores`` under the issue's name (the scores are lazy ratios when ``score_rule`` is "ratio")."""
        return self.layer_scores

    @property
    def lazy_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.lazy]

    @property
    def nbytes(self) -> int:
        """K/V bytes of the tokens held now (full layers: every token; lazy: sink + window)."""
        return sum(layer.nbytes for layer in self.layers)

    def __repr__(self) -> str:
        return (f"LightTransferCache(tokens={self.get_seq_length()}, lazy_layers={self.lazy_layers}, "
                f"nbytes={format_bytes(self.nbytes)})")

    # ---------------------------------------------------------------- Cache
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store layer ``layer_idx``'s new keys/values ``[1, H_kv, T, D]``; returns what its attention reads."""
        b, _, t, _ = key_states.shape
        if b != 1:
            raise ValueError(f"LightTransferCache holds one sequence (batch size 1), got a batch of {b}; "
                             "use one cache per prompt, or ltengine.Engine for batches")
        layer = self.layers[layer_idx]
        window = self.shape.sliding_window
        if window is not None and layer.length + t > window:
            raise ValueError(f"the model config uses a {window}-token sliding window and the sequence reaches "
                             f"{layer.length + t} tokens; ltengine supports full-attention configs only")
        if layer.length == 0:
            if layer_idx == 0:
                self._start_prefill(t)
            mode, pos = "prefill", None
        elif t == 1:
            mode, pos = "decode", None
        else:
            mode = "chunk"
            if layer.lazy:  # the chunk's early queries need ring slots its later tokens overwrite
                pos = torch.cat([layer.kept_positions(), torch.arange(layer.length, layer.length + t,
                                                                      device=key_states.device)])
                keys = torch.cat([layer.keys, key_states], dim=2)
                values = torch.cat([layer.values, value_states], dim=2)
                layer.update(key_states, value_states)
                _NOTE.set(_Note(self, layer_idx, keys, values, mode, pos))
                return keys, values
            pos = torch.arange(layer.length + t, device=key_states.device)
        keys, values = layer.update(key_states, value_states)
        _NOTE.set(_Note(self, layer_idx, keys, values, mode, pos))
        return keys, values

    def reset(self) -> None:
        super().reset()
        self._clear_decisions()

    # ---------------------------------------------------------------- planning and attention
    def _start_prefill(self, t: int) -> None:
        """Plan the prompt's full layers (``full_capacity``) and make its policy: ``Engine._plan``'s rule."""
        num_layers, lazy, budget = self.shape.num_layers, self.lazy, self.kv_budget
        n_full = num_layers - min(lazy.num_lazy(num_layers, budget=budget is not None), num_layers) \
            if lazy.enabled else num_layers
        adaptive = lazy.enabled and not isinstance(lazy.policy, tuple) and lazy.policy != "streaming"
        footprint = self.footprint
        n = self.max_new_tokens
        if budget is not None and adaptive:
            while n_full > 0 and footprint(t, n, n_full) > budget:
                n_full -= 1
        if budget is not None and footprint(t, n, n_full) > budget:
            what = (f"even with every layer lazy (sink {lazy.sink} + window {lazy.window})"
                    if adaptive or (lazy.enabled and lazy.policy == "streaming") else "with this lazy-layer policy")
            raise ValueError(f"kv_budget {format_bytes(budget)} is too small: {what} a prompt of {t} tokens + "
                             f"{n} new tokens needs {format_bytes(footprint(t, n, n_full))} of KV")
        self.full_capacity = n_full
        self._policy = make_policy(lazy, num_layers, n_full) if lazy.enabled else None

    def footprint(self, prompt_len: int, max_new: int, n_full: int) -> int:
        """Most bytes this cache holds for a prompt + ``max_new`` tokens with ``n_full`` full layers: full
        layers hold every token, lazy ones sink + window, plus one ring while a demotion copies the kept
        tokens out of a stored full layer (the engine's reference runner counts the same way)."""
        total = prompt_len + max_new
        n_lazy = self.shape.num_layers - n_full
        ring = min(total, self.lazy.sink + self.lazy.window)
        copy = 0 < n_full and n_lazy > 0 and total > ring
        return self._per_token_layer * (n_full * total + n_lazy * ring + (ring if copy else 0))

    def _attend(self, note: _Note, query: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Attention of layer ``note.layer``: query ``[1, H_q, T, D]`` -> ``[1, T, H_q, D]``."""
        layer = self.layers[note.layer]
        keys, values = note.keys, note.values
        gqa = query.shape[1] != keys.shape[1]
        if note.mode == "prefill":
            if mask is not None and not bool(mask[..., -1, :].all()):
                raise ValueError("LightTransferCache does not support padding: pass one unpadded prompt "
                                 "(attention_mask all ones)")
            t = query.shape[2]
            p = min(self.lazy.probe, t)
            score = self._scorer(query[0, :, t - p:], keys[0], self.lazy.sink, self.lazy.window, scale) \
                if self.lazy.enabled else None  # full attention needs no scores (nor does the engine take them)
            out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
            self._decide(note.layer, score)
            return out.transpose(1, 2)
        if note.mode == "decode":
            q = query[:, :, 0]  # [1, H_q, D]
            lengths = torch.tensor([layer.length], dtype=torch.int32, device=q.device)
            if layer.lazy and layer.capacity == layer.sink + layer.window:
                out = self.backend.decode_sink_window(q, layer.k, layer.v, lengths, layer.sink, layer.window, scale)
            else:  # a full layer, or a lazy one that never outgrew its prompt (slot p = p)
                out = self.backend.decode_full(q, layer.k, layer.v, lengths, scale)
            return out.unsqueeze(1)
        # chunk: causal, and on a lazy layer sink + window per query, by original positions
        t = query.shape[2]
        qpos = torch.arange(layer.length - t, layer.length, device=query.device)[:, None]
        kpos = note.key_pos[None, :]
        allowed = kpos <= qpos
        if layer.lazy:
            allowed &= (kpos < layer.sink) | (kpos > qpos - layer.window)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed[None, None], scale=scale,
                                             enable_gqa=gqa)
        return out.transpose(1, 2)

    def _decide(self, layer_idx: int, score: float | None) -> None:
        """The queue's turn after layer ``layer_idx`` is scored: demote what it names (``layer_major``)."""
        if self._policy is not None:
            self.layer_scores.append(score)
            for j in self._policy.observe(layer_idx, score):
                self.layers[j].demote(self.backend.truncate_kv_)
        if layer_idx == self.shape.num_layers - 1:
            if self._policy is not None:
                for j in self._policy.finish():
                    self.layers[j].demote(self.backend.truncate_kv_)
            self.nbytes_after_prefill = self.nbytes


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: LightTransfer attention for the tensors a
    ``LightTransferCache`` just returned, SDPA for anything else."""
    note = _NOTE.get()
    if note is None or note.keys is not key or note.values is not value:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    _NOTE.set(None)
    scale = scaling if scaling is not None else module.scaling
    return note.cache._attend(note, query, attention_mask, scale), None


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # padding masks, as SDPA gets them
