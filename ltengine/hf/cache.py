"""``LightTransferCache`` and the attention function it registers (see ``ltengine.hf``)."""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..config import FULL, LazyConfig, format_bytes, parse_bytes
from ..kernels import get_backend
from ..lazy import make_policy, plan_full_layers
from ..memory.cache import contiguous_footprint
from ..models import DecoderAdapter
from .layer import LightTransferLayer

ATTN_IMPLEMENTATION = "ltengine_lighttransfer"


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
        if lazy is not None and lazy.streaming_prefill:  # HF's forward attends every layer fully in prefill
            raise ValueError("LightTransferCache does not support LazyConfig.streaming_prefill=True (the model's own "
                             "forward runs the prefill); use Engine for streaming prefill")
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
        self._per_token_layer = adapter.kv_bytes_per_token_layer
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
        """How ``layer_scores`` were computed: ``LazyConfig.score`` ("ratio", "peak" or "cover")."""
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
        """Plan the prompt's full layers (``full_capacity``) and make its policy: the engine scheduler's
        rule (``lazy.plan_full_layers``) with this cache's footprint."""
        num_layers, lazy, n = self.shape.num_layers, self.lazy, self.max_new_tokens
        n_full = plan_full_layers(lazy, num_layers, self.kv_budget, t, n,
                                  lambda n_full: self.footprint(t, n, n_full))
        self.full_capacity = n_full
        self._policy = make_policy(lazy, num_layers, n_full) if lazy.enabled else None

    def footprint(self, prompt_len: int, max_new: int, n_full: int) -> int:
        """Most bytes this cache holds for a prompt + ``max_new`` tokens with ``n_full`` full layers: full
        layers hold every token, lazy ones sink + window, plus one ring while a demotion copies the kept
        tokens out of a stored full layer (the engine's reference runner counts the same way)."""
        return contiguous_footprint(self._per_token_layer, self.shape.num_layers, prompt_len + max_new, n_full,
                                    self.lazy.sink, self.lazy.window)

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
