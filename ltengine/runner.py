"""Executes the model: layer-major prefill with lazy-layer demotion, and one batched decode step.

Two runners share one interface (``footprint``/``capacity``/``free``, ``prefill``, ``decode``,
``release``) so the engine's scheduler is unaware of how KV is stored:
``ReferenceRunner`` (here) keeps contiguous per-sequence caches and is the reference path;
``PagedRunner`` (paged.py) keeps every cache in one block pool and decodes a batch per launch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import FullKV, KVMeter, SequenceKV, demote, truncated
from .lazy import LayerPolicy, lazy_ratio
from .models import DecoderAdapter

try:  # optional: flash-attn's prefill kernel when it is installed
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over a whole prompt. q ``[B, T, H_q, D]``, k/v ``[B, T, H_kv, D]`` -> ``[B, T, H_q, D]``.

    flash-attn when importable (CUDA, fp16/bf16), else PyTorch SDPA (which picks its own fused kernel).
    """
    if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_attn_func(q, k, v, causal=True, softmax_scale=scale)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [V] fp32, the next-token distribution after the prompt
    ratios: list[float]  # lazy ratio of every layer (empty when not scored)
    lazy_layers: list[int]  # demoted layers, sorted
    kv_bytes: int  # this sequence's KV right after prefill
    handle: object  # the runner's per-sequence state


def layer_major(adapter: DecoderAdapter, ids: torch.Tensor, policy: LayerPolicy, sink: int, window: int,
                probe: int, store, demote_, score: bool = True, progress=None, ratio_fn=lazy_ratio):
    """The prefill loop both runners share. Runs prompt ``ids`` ``[T]`` through layer 0, then 1, ...

    After layer l is computed and scored, the policy names layers to demote; those already stored
    are truncated (``demote_(j)``) *before* layer l is stored (``store(l, k, v, lazy)``), so the
    queue never holds more than its capacity: the one layer in flight is the activations.
    ``ratio_fn``: the scorer (``lazy.lazy_ratio`` or a backend's ``lazy_ratio`` kernel, same contract).
    Returns (last hidden state ``[1, hidden]``, ratios).
    """
    t = ids.shape[0]
    ratio_fn = getattr(policy, "scorer", None) or ratio_fn  # LazyConfig(score="peak"): lazy.peak_score
    h = adapter.embed(ids.view(1, t))
    cos, sin = adapter.rope(h, torch.arange(t, device=ids.device).view(1, t))
    ratios: list[float] = []
    p = min(probe, t)
    for i in range(adapter.shape.num_layers):
        q, k, v = adapter.qkv(i, h, cos, sin)
        r = ratio_fn(q[0, -p:].transpose(0, 1), k[0].transpose(0, 1), sink, window, adapter.scale) if score else 0.0
        ratios.append(r)
        o = prefill_attention(q, k, v, adapter.scale)
        h = adapter.finish_layer(i, h, o.reshape(1, t, -1))
        del q, o
        now = policy.observe(i, r)
        for j in now:
            if j != i:
                demote_(j)
        store(i, k[0], v[0], i in now)
        del k, v
        if progress is not None:
            progress(i + 1)
    for j in policy.finish():
        demote_(j)
    return h[:, -1], ratios if score else []


class ReferenceRunner:
    """Contiguous per-sequence caches (cache.py); decode loops over sequences per layer.

    Budget units are bytes; ``capacity`` None means unbounded.
    """

    name = "reference"

    def __init__(self, adapter: DecoderAdapter, backend, sink: int, window: int, capacity: int | None):
        self.adapter, self.backend, self.sink, self.window = adapter, backend, sink, window
        self.meter = KVMeter()
        self.capacity = capacity
        s = adapter.shape
        self.per_token_layer = 2 * s.num_kv_heads * s.head_dim * torch.empty((), dtype=adapter.dtype).element_size()

    def footprint(self, prompt_len: int, max_new: int, n_full: int) -> int:
        total = prompt_len + max_new
        lazy = self.adapter.shape.num_layers - n_full
        return self.per_token_layer * (n_full * total + lazy * min(total, self.sink + self.window))

    @property
    def free(self) -> int | None:
        return None if self.capacity is None else self.capacity - self.meter.current

    @property
    def kv_bytes(self) -> int:
        return self.meter.current

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, policy: LayerPolicy, probe: int, max_new: int, score: bool = True,
                progress=None) -> PrefillResult:
        cache = SequenceKV(layers=[None] * self.adapter.shape.num_layers, meter=self.meter)
        sink, window = self.sink, self.window

        def store(i, k, v, lazy):
            if lazy:  # stored straight as sink + window: its full KV never enters the cache
                cache.layers[i] = truncated(k, v, k.shape[0], sink, window, self.backend.truncate_kv_, self.meter)
            else:
                cache.layers[i] = FullKV(k, v, self.meter)

        def demote_(j):
            cache.layers[j] = demote(cache.layers[j], sink, window, self.backend.truncate_kv_)

        try:
            h, ratios = layer_major(self.adapter, ids, policy, sink, window, probe, store, demote_, score, progress,
                                    self.backend.lazy_ratio)
        except BaseException:
            cache.release()
            raise
        kv_bytes = cache.nbytes
        for c in cache.layers:  # room for the decode tokens, counted in the footprint
            c.reserve(ids.shape[0] + max_new)
        return PrefillResult(self.adapter.logits(h)[0], ratios, cache.lazy_layers, kv_bytes, cache)

    @torch.inference_mode()
    def decode(self, caches: list[SequenceKV], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return decode_step(self.adapter, caches, tokens, positions, self.backend)

    def release(self, cache: SequenceKV) -> None:
        cache.release()


def _attend(backend, q: torch.Tensor, c, scale: float) -> torch.Tensor:
    """One sequence's decode attention for one layer. q ``[1, H_q, D]`` -> ``[1, H_q, D]``."""
    lengths = torch.tensor([c.length], dtype=torch.int32, device=q.device)
    if c.streaming and c.capacity == c.sink + c.window:
        return backend.decode_sink_window(q, c.k.unsqueeze(0), c.v.unsqueeze(0), lengths, c.sink, c.window, scale)
    # a full layer, or a streaming one that never outgrew sink + window (every slot is in order)
    return backend.decode_full(q, c.k.unsqueeze(0), c.v.unsqueeze(0), lengths, scale)


@torch.inference_mode()
def decode_step(adapter: DecoderAdapter, caches: list[SequenceKV], tokens: torch.Tensor,
                positions: torch.Tensor, backend) -> torch.Tensor:
    """Feed one token per sequence; returns next-token logits ``[B, V]`` (fp32).

    tokens, positions: ``[B]``; the position of each new token is its sequence's length so far
    (original positions: streaming layers are never renumbered).
    """
    b = tokens.shape[0]
    h = adapter.embed(tokens.view(b, 1))
    cos, sin = adapter.rope(h, positions.view(b, 1))
    for i in range(adapter.shape.num_layers):
        q, k, v = adapter.qkv(i, h, cos, sin)  # [B, 1, H, D]
        outs = []
        for s, cache in enumerate(caches):
            c = cache.layers[i]
            c.append(k[s, 0], v[s, 0])
            outs.append(_attend(backend, q[s], c, adapter.scale))
        h = adapter.finish_layer(i, h, torch.cat(outs).view(b, 1, -1))
    return adapter.logits(h[:, -1])
