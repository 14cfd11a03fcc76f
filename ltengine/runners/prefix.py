"""A prompt prefilled on top of a prefix already in the paged pool, and the prompt's own copy-on-write
view of that prefix (document sessions, ``ltengine/session.py``).

The prefix (a document) was prefilled once, layer-major, into a ``PagedSeq``. A question then runs
layer by layer like any prefill (``prefill_on_prefix``), its RoPE positions continuing from the
prefix length, its queries attending to the prefix's cached K/V of that layer (gathered from the
pool) plus its own keys. In a layer the prefix holds as sink + window (a context-scored session), a
query at position p sees the sinks and the keys within ``window`` positions of p, the rule decode
uses there; in a full layer it sees every earlier key, so at ``fraction=0`` the question's hidden
states are those of one prefill of prefix + question.

``fork`` then builds the question's own ``PagedSeq``: in a full layer the prefix's whole blocks are
shared (one more reference each in the pool), its partly filled last block is copied and fresh
blocks follow, so the question never writes into a shared block; in a lazy layer the question gets
its own ring holding sink + the last window of (prefix + question). ``demoted_view`` gives a full
prefix a second, context-scored face without a second prefill: the same blocks, some layers as rings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..lazy import LayerPolicy
from .base import Scorer
from .paged import PagedRunner, PagedSeq


@dataclass
class PrefixResult:
    logits: torch.Tensor  # [V] fp32 after the prompt's last token
    scores: list[float]  # every layer's score on the prompt's own probe queries ([] when unscored)
    lazy: set[int]  # layers the policy demoted (the prefix's lazy layers stay lazy)
    k: list[torch.Tensor]  # per layer the prompt's own keys [Tq, H_kv, D] (rotated)
    v: list[torch.Tensor]


def _positions_kept(length: int, sink: int, window: int, device) -> torch.Tensor:
    """Positions a sink + window cache of ``length`` tokens holds, in order."""
    return torch.cat([torch.arange(min(length, sink), device=device),
                      torch.arange(max(sink, length - window), max(sink, length), device=device)])


def _rows(runner: PagedRunner, blocks: list[int], slots: torch.Tensor) -> torch.Tensor:
    bs = runner.pool.block_size
    table = torch.tensor(blocks, dtype=torch.long, device=slots.device)
    return table[slots // bs] * bs + slots % bs


def _slots(pos: torch.Tensor, lazy: bool, sink: int, window: int) -> torch.Tensor:
    return torch.where(pos < sink, pos, sink + (pos - sink) % window) if lazy else pos


def prefix_kv(runner: PagedRunner, prefix: PagedSeq, layer: int, length: int):
    """The valid K/V of one layer of a prefix of ``length`` tokens and their positions:
    k/v ``[N, H_kv, D]``, positions ``[N]`` (N = length, or sink + window in a lazy layer)."""
    dev = runner.pool.k.device
    lazy = prefix.lazy[layer]
    pos = _positions_kept(length, prefix.sink, prefix.window, dev) if lazy else torch.arange(length, device=dev)
    rows = _rows(runner, prefix.blocks[layer], _slots(pos, lazy, prefix.sink, prefix.window))
    flat_k, flat_v = runner.flat()
    return flat_k.index_select(0, rows), flat_v.index_select(0, rows), pos


@torch.inference_mode()
def prefill_on_prefix(runner: PagedRunner, prefix: PagedSeq, prefix_len: int, ids: torch.Tensor,
                      policy: LayerPolicy, scorer: Scorer | None, probe: int) -> PrefixResult:
    """One prompt ``ids [Tq]`` through every layer on top of ``prefix``. ``policy`` sees each layer's
    score on the prompt's last ``probe`` queries over all keys (prefix + prompt; the prefix is full
    in every layer when a scorer is given); layers the prefix already holds lazy stay lazy."""
    a = runner.adapter
    sink, window = prefix.sink, prefix.window
    tq = ids.shape[0]
    qpos = torch.arange(prefix_len, prefix_len + tq, device=ids.device)
    h = a.embed(ids.view(1, tq))
    cos, sin = a.rope(h, qpos.view(1, tq))
    scores, lazy, ks, vs = [], {i for i, z in enumerate(prefix.lazy) if z}, [], []
    for i in range(a.shape.num_layers):
        q, k, v = a.qkv(i, h, cos, sin)  # [1, Tq, H, D]
        kd, vd, kpos = prefix_kv(runner, prefix, i, prefix_len)
        keys, values = torch.cat([kd, k[0]]), torch.cat([vd, v[0]])
        kpos = torch.cat([kpos, qpos])
        allowed = kpos.view(1, -1) <= qpos.view(-1, 1)
        if prefix.lazy[i]:  # the streaming rule: sinks and the last ``window`` positions, itself included
            allowed &= (kpos.view(1, -1) < sink) | (kpos.view(1, -1) > qpos.view(-1, 1) - window)
        score = 0.0
        if scorer is not None and not prefix.lazy[i]:
            p = min(probe, tq)
            score = scorer(q[0, tq - p:].transpose(0, 1), keys.transpose(0, 1), sink, window, a.scale)
            scores.append(score)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(0, 1).unsqueeze(0),
                                           values.transpose(0, 1).unsqueeze(0), attn_mask=allowed, scale=a.scale,
                                           enable_gqa=q.shape[2] != k.shape[2])
        h = a.finish_layer(i, h, o.transpose(1, 2).reshape(1, tq, -1))
        ks.append(k[0].clone())
        vs.append(v[0].clone())
        lazy.update(policy.observe(i, score))
    lazy.update(policy.finish())
    return PrefixResult(a.logits(h[:, -1])[0], scores, lazy, ks, vs)


def fork_blocks(runner: PagedRunner, prefix_len: int, room: int, lazy: bool, sink: int, window: int) -> int:
    """Blocks a prompt's own part of one layer takes in ``fork`` (a lazy layer: its ring; a full one:
    the copied partial block and the tail up to ``room`` tokens)."""
    pool = runner.pool
    if lazy:
        return pool.blocks_for(min(room, sink + window))
    return pool.blocks_for(room) - prefix_len // pool.block_size


@torch.inference_mode()
def fork(runner: PagedRunner, prefix: PagedSeq, prefix_len: int, result: PrefixResult, room: int) -> PagedSeq:
    """The prompt's own ``PagedSeq`` with room for ``room`` tokens (prefix + prompt + decode), its keys
    written in; shares the prefix's whole blocks of every full layer (raises ``PoolExhausted`` with
    nothing taken when the pool is short)."""
    pool, dev = runner.pool, runner.pool.k.device
    bs, sink, window = pool.block_size, prefix.sink, prefix.window
    n_layers = len(prefix.blocks)
    tq = result.k[0].shape[0]
    total = prefix_len + tq
    need = [fork_blocks(runner, prefix_len, room, i in result.lazy, sink, window) for i in range(n_layers)]
    own = pool.alloc(sum(need))  # all at once: a short pool raises before anything is shared
    seq = PagedSeq(sink, window, [], [], room)
    flat_k, flat_v = runner.flat()
    at = 0
    for i in range(n_layers):
        mine, at = own[at:at + need[i]], at + need[i]
        if i in result.lazy:
            # sink + last window of (prefix + prompt): from the prefix's cache, then the prompt's own keys
            pos = _positions_kept(total, sink, window, dev)
            old = pos[pos < prefix_len]
            src = _rows(runner, prefix.blocks[i], _slots(old, prefix.lazy[i], sink, window))
            k = torch.cat([flat_k.index_select(0, src), result.k[i][pos[pos >= prefix_len] - prefix_len]])
            v = torch.cat([flat_v.index_select(0, src), result.v[i][pos[pos >= prefix_len] - prefix_len]])
            rows = _rows(runner, mine, _slots(pos, True, sink, window))
            seq.blocks.append(mine)
        else:
            whole = prefix.blocks[i][:prefix_len // bs]
            pool.share(whole)
            if prefix_len % bs:  # copy-on-write of the partly filled last block
                part = prefix.blocks[i][prefix_len // bs]
                pool.k[mine[0]] = pool.k[part]
                pool.v[mine[0]] = pool.v[part]
            seq.blocks.append(whole + mine)
            rows = _rows(runner, seq.blocks[i], torch.arange(prefix_len, total, device=dev))
            k, v = result.k[i], result.v[i]
        flat_k.index_copy_(0, rows, k)
        flat_v.index_copy_(0, rows, v)
        seq.lazy.append(i in result.lazy)
    runner.batches.forget()
    return seq


@torch.inference_mode()
def demoted_view(runner: PagedRunner, prefix: PagedSeq, length: int, lazy: set[int]) -> PagedSeq:
    """A read-only view of a prefix of ``length`` tokens with the layers ``lazy`` as sink + window:
    what demoting them in place during its prefill would have left (prefill attends fully in every
    layer either way, so the hidden states, the K/V and the scores are the same). Every other layer
    shares the prefix's blocks (one more reference each); each newly lazy layer gets a ring of its own
    holding the sink and the last window. Raises ``PoolExhausted`` with nothing taken."""
    pool, dev = runner.pool, runner.pool.k.device
    sink, window = prefix.sink, prefix.window
    fresh = [i in lazy and not z for i, z in enumerate(prefix.lazy)]
    ring = pool.blocks_for(min(length, sink + window))
    own = iter(pool.alloc(ring * sum(fresh)))
    seq = PagedSeq(sink, window, [], [], prefix.room)
    flat_k, flat_v = runner.flat()
    pos = _positions_kept(length, sink, window, dev)
    for i, blocks in enumerate(prefix.blocks):
        if fresh[i]:
            mine = [next(own) for _ in range(ring)]
            src, dst = _rows(runner, blocks, pos), _rows(runner, mine, _slots(pos, True, sink, window))
            flat_k.index_copy_(0, dst, flat_k.index_select(0, src))
            flat_v.index_copy_(0, dst, flat_v.index_select(0, src))
            seq.blocks.append(mine)
        else:
            pool.share(blocks)
            seq.blocks.append(list(blocks))
        seq.lazy.append(prefix.lazy[i] or fresh[i])
    runner.batches.forget()
    return seq
