"""Independent references for the engine's tests, built on the model's own HF forward.

``masked_generate`` runs the model's forward (full DynamicCache, greedy) with an attention function that, on
the given lazy layers only, restricts every query after the prompt to sink + window keys — what the
engine's truncated caches must reproduce — and, on ``prefill_layers`` (streaming prefill), the prompt's
queries too. ``eager_lazy_ratios`` scores layers from the attention
probabilities the model's eager attention returns.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

_names = itertools.count()


def _sink_window_attention(lazy_layers, prompt_len, sink, window, prefill_layers=frozenset()):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module.layer_idx not in lazy_layers:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
        q_len, kv_len = query.shape[2], key.shape[2]
        qpos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        kpos = torch.arange(kv_len, device=query.device)[None, :]
        streaming = (kpos < sink) | (kpos > qpos - window)
        prompt_full = (qpos < prompt_len) & (module.layer_idx not in prefill_layers)
        allowed = (kpos <= qpos) & (streaming | prompt_full)  # prompt queries attend fully, unless streamed
        group = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(group, dim=1)
        v = value.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=allowed[None, None], scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return attention


@torch.inference_mode()
def masked_generate(model, ids: list[int], lazy_layers, sink: int, window: int, max_new_tokens: int,
                    full_until: int | None = None, prefill_layers=()) -> list[int]:
    """Greedy tokens of the model's own forward with a full DynamicCache and sink+window masks on
    ``lazy_layers`` for every query after the prompt, or after its first ``full_until`` tokens (a
    document session's document), and on ``prefill_layers`` for the prompt's queries too (an explicit
    loop: the reference stays readable)."""
    from transformers import DynamicCache

    # a fresh name each call: the registry keeps the first function registered under a name
    name = f"ltengine_sink_window_reference_{next(_names)}"
    AttentionInterface.register(name, _sink_window_attention(set(lazy_layers), len(ids) if full_until is None else full_until,
                                                             sink, window, frozenset(prefill_layers)))
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        cache = DynamicCache(config=model.config)
        logits = model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0, -1]
        out = []
        for _ in range(max_new_tokens):
            out.append(int(logits.argmax()))
            logits = model(torch.tensor([[out[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
    finally:
        model.set_attn_implementation(previous)
    return out


@torch.inference_mode()
def eager_lazy_ratios(model, ids: list[int], sink: int, window: int, probe: int) -> list[float]:
    """Lazy ratio of every layer from HF eager attention probabilities ``[1, H_q, T, T]``."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        attentions = model(torch.tensor([ids]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    t = len(ids)
    p = min(probe, t)
    ratios = []
    for probs in attentions:
        rows = probs[0, :, t - p:, :].double()  # [H, P, T]
        total = 0.0
        for i in range(p):
            pos = t - p + i
            keys = [j for j in range(pos + 1) if j < sink or j > pos - window]
            total += rows[:, i, keys].sum().item()
        ratios.append(total / (p * rows.shape[0]))
    return ratios
