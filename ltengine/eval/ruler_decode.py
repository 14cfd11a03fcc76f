"""Greedy decode of many (prompt, lazy layer set) sequences as one padded batch, for the RULER grid.

``reference.decode_step`` attends one sequence at a time (a few dozen small ops per sequence and
layer), which is exact but launch-bound on a GPU with 50 sequences in flight. Here each layer's kept
KV of every sequence is copied once into a padded buffer ``[B, H_kv, S, D]`` and each step attends
with one masked matmul-softmax-matmul per layer. Attention does not depend on the order of its keys
(RoPE is already in them), so a lazy layer's sink + window is the sink followed by the last ``window``
prompt keys and then the new ones, and the ring's eviction is a mask: key ``j`` of a lazy sequence is
visible when ``j < sink`` or it is among the last ``window`` of ``[sink, length)``, exactly the keys
``SinkWindowKV`` holds. Full layers see ``[0, length)``. The numbers differ from the backend kernels
only by rounding (``tests/test_ruler.py`` checks the tokens against ``harness.greedy``). An fp8 adapter
(``kv_dtype="fp8"``) gets every K/V row as the fp8 pool would hold it: quantized per token and head and
dequantized (``kernels/fp8.py``), prompt rows and decoded ones alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels.fp8 import dequantize, is_fp8, quantize
from .ruler_prompt import string_match_all


def _stored(x: torch.Tensor, fp8: bool) -> torch.Tensor:
    """``x`` [..., H_kv, D] as the KV pool returns it: through fp8 and its per-row scale when ``fp8``."""
    return dequantize(*quantize(x), x.dtype) if fp8 else x


@dataclass
class Job:
    """One sequence: a prompt's full per-layer KV (``FullKV`` list from ``shared_prefill``), which of
    its layers are lazy, and what ends it."""

    full: list  # FullKV per layer, k/v [T, H_kv, D]
    lazy: frozenset[int]
    sink: int
    window: int
    logits: torch.Tensor  # [V] after the prompt
    prompt_len: int
    max_new: int
    answers: list[str]


def _layer_buffers(jobs: list[Job], layer: int, room: int, fp8: bool = False):
    """Padded K, V ``[B, H_kv, S, D]``, kept tokens ``[B]``, sink ``[B]`` and window ``[B]`` (0: full)."""
    kept = []
    for j in jobs:
        c, t = j.full[layer], j.prompt_len
        if layer in j.lazy and t > j.sink + j.window:  # what demote keeps: the sink and the last window
            k = torch.cat([c.k[:j.sink], c.k[t - j.window:t]])
            v = torch.cat([c.v[:j.sink], c.v[t - j.window:t]])
        else:
            k, v = c.k[:t], c.v[:t]
        kept.append((_stored(k, fp8), _stored(v, fp8)))
    b, (h, d) = len(jobs), kept[0][0].shape[1:]
    s = max(len(k) for k, _ in kept) + room
    K = kept[0][0].new_zeros((b, h, s, d))
    V = torch.zeros_like(K)
    for i, (k, v) in enumerate(kept):
        K[i, :, :len(k)] = k.transpose(0, 1)
        V[i, :, :len(v)] = v.transpose(0, 1)
    dev = K.device
    n = torch.tensor([len(k) for k, _ in kept], device=dev)
    lazy = [layer in j.lazy for j in jobs]
    sink = torch.tensor([j.sink if z else 0 for j, z in zip(jobs, lazy)], device=dev)
    window = torch.tensor([j.window if z else 0 for j, z in zip(jobs, lazy)], device=dev)
    return K, V, n, sink, window


@torch.inference_mode()
def batched_greedy(adapter, jobs: list[Job], eos_ids: set[int], decode: Callable[[list[int]], str]) -> list[list[int]]:
    """Greedy tokens per job, each stopping at EOS (kept), its ``max_new`` tokens, or once every answer
    is in its decoded text. Finished sequences keep riding along (their outputs ignored)."""
    if not jobs:
        return []
    steps = max(j.max_new for j in jobs)
    bad = [j.window for j in jobs if j.lazy and j.window < steps]
    if bad:
        raise ValueError(f"window {bad[0]} is shorter than the {steps} decoded tokens; use a window >= {steps}")
    fp8 = is_fp8(adapter.kv_dtype)
    buffers = [_layer_buffers(jobs, i, steps, fp8) for i in range(adapter.shape.num_layers)]
    b, dev = len(jobs), buffers[0][0].device
    rows = torch.arange(b, device=dev)
    tokens = [[int(j.logits.argmax())] for j in jobs]

    def finished(i: int) -> bool:
        t, j = tokens[i], jobs[i]
        return t[-1] in eos_ids or len(t) >= j.max_new or string_match_all(decode(t), j.answers) == 1.0

    done = [finished(i) for i in range(b)]
    pos0 = torch.tensor([j.prompt_len for j in jobs], device=dev)
    for step in range(steps - 1):
        if all(done):
            break
        x = torch.tensor([t[-1] for t in tokens], device=dev)
        h = adapter.embed(x.view(b, 1))
        cos, sin = adapter.rope(h, (pos0 + step).view(b, 1))
        for i, (K, V, n, sink, window) in enumerate(buffers):
            q, k, v = adapter.qkv(i, h, cos, sin)  # [B, 1, H, D]
            end = n + step + 1  # keys [0, end) written, the new one at end - 1
            K[rows, :, end - 1] = _stored(k[:, 0], fp8).to(K.dtype)
            V[rows, :, end - 1] = _stored(v[:, 0], fp8).to(V.dtype)
            j = torch.arange(K.shape[2], device=dev).view(1, -1)
            lower = torch.where(window > 0, torch.maximum(sink, end - window), 0).view(-1, 1)
            visible = (j < sink.view(-1, 1)) | ((j >= lower) & (j < end.view(-1, 1)))  # [B, S]
            hk, d = K.shape[1], K.shape[3]
            qq = q.reshape(b, hk, -1, d).to(K.dtype)  # query head h reads KV head h // G
            s = torch.matmul(qq, K.transpose(-1, -2)).float() * adapter.scale  # [B, H_kv, G, S]
            s.masked_fill_(~visible.view(b, 1, 1, -1), float("-inf"))
            o = torch.matmul(s.softmax(-1).to(V.dtype), V)  # [B, H_kv, G, D]
            h = adapter.finish_layer(i, h, o.reshape(b, 1, -1).to(h.dtype))
        nxt = adapter.logits(h[:, -1]).argmax(-1).tolist()
        for i in range(b):
            if not done[i]:
                tokens[i].append(int(nxt[i]))
                done[i] = finished(i)
    return tokens
