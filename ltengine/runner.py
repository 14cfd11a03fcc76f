"""Executes the model: layer-major prefill with lazy-layer demotion, and one batched decode step."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import FullKV, KVMeter, SequenceKV, demote
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
    cache: SequenceKV
    ratios: list[float]  # lazy ratio of every layer
    demotion_order: list[int]  # layers in the order the policy demoted them


@torch.inference_mode()
def prefill(adapter: DecoderAdapter, ids: torch.Tensor, policy: LayerPolicy, backend, meter: KVMeter,
            sink: int, window: int, probe: int, progress=None) -> PrefillResult:
    """Run one prompt ``ids`` ``[T]`` through the model layer by layer.

    After layer l: its full KV is stored, its lazy ratio scored, and the policy may demote layers
    processed so far (truncated in place before layer l + 1 stores anything), so at most one
    layer's full KV is in flight beyond what the policy keeps.
    """
    t = ids.shape[0]
    h = adapter.embed(ids.view(1, t))
    positions = torch.arange(t, device=ids.device).view(1, t)
    cos, sin = adapter.rope(h, positions)
    cache = SequenceKV(meter=meter)
    ratios: list[float] = []
    order: list[int] = []
    p = min(probe, t)
    for i in range(adapter.shape.num_layers):
        q, k, v = adapter.qkv(i, h, cos, sin)
        ratios.append(lazy_ratio(q[0, -p:].transpose(0, 1), k[0].transpose(0, 1), sink, window, adapter.scale))
        o = prefill_attention(q, k, v, adapter.scale)
        h = adapter.finish_layer(i, h, o.reshape(1, t, -1))
        cache.layers.append(FullKV(k[0], v[0], meter))
        del q, k, v, o
        for j in policy.observe(i, ratios[-1]):
            cache.layers[j] = demote(cache.layers[j], sink, window, backend.truncate_kv_)
            order.append(j)
        if progress is not None:
            progress(i + 1)
    for j in policy.finish():
        cache.layers[j] = demote(cache.layers[j], sink, window, backend.truncate_kv_)
        order.append(j)
    logits = adapter.logits(h[:, -1])[0]
    return PrefillResult(logits, cache, ratios, order)


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
