"""PagedRunner: every layer's KV of every sequence in one block pool; one decode launch per layer.

Per sequence and layer, a list of pool blocks in slot order. A full layer's slot p is position p; a
lazy layer's slot is ``ring_slot(p, sink, window)``. A sequence is admitted with room for its prompt
and a block of decode tokens, and ``grow`` adds blocks as decode crosses block boundaries. Decode
builds, once per batch change, tensors ``tables [L, B, MB]``, ``lazy [L, B]`` and per-row sink and
window on the device (grown blocks are patched in; a batch that only lost rows, as when requests
finish, is gathered from the last one's on the device); each step then computes write slots, the valid
prefix of each cache and the attention on the device with no host sync inside the step, and can be
captured in a CUDA graph per batch-size bucket (``paged_batch.DecodeBatches``).

An fp8 pool (``kv_dtype="fp8"``) stores every row as it is written (prompt KV in ``store``, each decode
token in the step) through ``fp8.quantize``, scales beside it; demotion and preemption move the scales
with their rows; the decode kernel reads fp8 and the scales.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..kernels import fused
from ..kernels.fp8 import put_rows_, quantize, take_rows
from ..memory.pool import KVPool
from ..models import DecoderAdapter
from .base import LayerMajorPrefill, PrefillJob, PrefillRequest, PrefillResult, PrefillTask, Runner
from .paged_batch import DecodeBatches


@dataclass(eq=False)
class PagedSeq:
    """One sequence's blocks: ``blocks[l]`` in slot order; ``lazy[l]`` whether layer l is sink + window."""

    sink: int
    window: int
    blocks: list[list[int]] = field(default_factory=list)
    lazy: list[bool] = field(default_factory=list)
    room: int = 0  # tokens every layer's blocks can hold (a lazy layer: up to sink + window of them)


@dataclass
class _Swapped:
    seq: PagedSeq  # its block lists hold the block counts; k/v the data
    k: list[torch.Tensor]  # per layer [n_blocks, BS, H_kv, D] on the host
    v: list[torch.Tensor]
    scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # an fp8 pool's, per layer [n_blocks, BS, H_kv]


class _Store:
    """KVStore of one prompt in the pool."""

    def __init__(self, runner: "PagedRunner", seq: PagedSeq, length: int, room: int):
        self.r, self.seq, self.length, self.room = runner, seq, length, room
        self.ring = min(room, seq.sink + seq.window)
        seq.room = room

    def _rows(self, blocks: list[int], slots: torch.Tensor) -> torch.Tensor:
        """Flat pool row of each slot of a block list."""
        bs = self.r.pool.block_size
        table = torch.tensor(blocks, dtype=torch.long, device=slots.device)
        return table[slots // bs] * bs + slots % bs

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, lazy: bool) -> None:
        pool, seq, t = self.r.pool, self.seq, self.length
        blocks = pool.alloc(pool.blocks_for(self.ring if lazy else self.room))
        if lazy:  # stored straight as sink + window: positions kept, written into their ring slots
            sink, window = seq.sink, seq.window
            pos = torch.cat([torch.arange(min(t, sink), device=k.device),
                             torch.arange(max(sink, t - window), max(sink, t), device=k.device)])
            slots = torch.where(pos < sink, pos, sink + (pos - sink) % window)
            self.r.write_rows(self._rows(blocks, slots), k.index_select(0, pos), v.index_select(0, pos))
        else:
            self.r.write_rows(self._rows(blocks, torch.arange(t, device=k.device)), k, v)
        seq.blocks[layer], seq.lazy[layer] = blocks, lazy

    def demote(self, layer: int) -> None:
        """In place (the backend's ``paged_truncate_``), then the tail blocks go back to the pool."""
        seq, pool = self.seq, self.r.pool
        blocks = seq.blocks[layer]
        if self.length > seq.sink + seq.window:
            dev = pool.k.device
            table = torch.tensor([blocks], dtype=torch.int32, device=dev)
            lengths = torch.tensor([self.length], dtype=torch.int32, device=dev)
            self.r.backend.paged_truncate_(pool.k, pool.v, table, lengths, seq.sink, seq.window)
            if pool.scaled:  # the scales move with their rows: the same op over [NB, BS, H_kv, 1]
                self.r.backend.paged_truncate_(pool.k_scale.unsqueeze(-1), pool.v_scale.unsqueeze(-1), table,
                                               lengths, seq.sink, seq.window)
        keep = pool.blocks_for(self.ring)
        pool.free(blocks[keep:])
        seq.blocks[layer], seq.lazy[layer] = blocks[:keep], True


class PagedRunner(Runner):
    name = "paged"

    def __init__(self, adapter: DecoderAdapter, backend, pool: KVPool, graphs: bool | None = None,
                 fused_step: bool = True):
        self.adapter, self.backend, self.pool = adapter, backend, pool
        s = adapter.shape
        self.scratch = pool.alloc(1)[0]  # padded batch rows write here, never into a live block
        self.capacity = None if pool.growable else (pool.num_blocks - 1) * pool.bytes_per_block
        # a growable pool's tables must reach the model's context, not its first size
        reach = min(s.max_context, 1 << 20) if pool.growable else min(s.max_context, pool.num_blocks * pool.block_size)
        self.max_blocks = max(1, pool.blocks_for(reach))
        self.graphs = (pool.k.device.type == "cuda" and not pool.growable) if graphs is None else graphs
        # fused decode kernels (CUDA, fp16/bf16); the HF modules otherwise
        fast = fused_step and fused.available(pool.k.device, adapter.dtype, pool.dtype)
        self.fused = adapter.fused_weights() if fast else None
        if self.fused is not None:
            self.proj = [{k: self._bind(w[k]) for k in ("o", "down")} for w in self.fused]
            self.head = self._bind(adapter.model.lm_head)
        self.attn_name = backend.impl_for("paged_decode", pool.dtype, s.head_dim)
        self.batches = DecodeBatches(s.num_layers, self.max_blocks, self.scratch, adapter.vocab_size, pool.k.device,
                                     self.graphs)

    def _bind(self, m: torch.nn.Module):
        """A projection as the fused step calls it: a plain ``nn.Linear`` through the backend's linear (the
        CUDA kernel at decode batch sizes); any other module (tensor-parallel ones carry collectives) itself."""
        if type(m) is not torch.nn.Linear:
            return m
        linear = self.backend.linear
        return lambda x: linear(x, m.weight, m.bias)

    # ------------------------------------------------------------------ budget
    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool as ``[blocks * block_size, H_kv, D]`` rows (a view; a growable pool may move)."""
        k, v = self.pool.k, self.pool.v
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])

    def flat_scales(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """An fp8 pool's scales as ``[blocks * block_size, H_kv]`` rows (None, None otherwise)."""
        if not self.pool.scaled:
            return None, None
        return self.pool.k_scale.view(-1, self.pool.k_scale.shape[2]), self.pool.v_scale.view(-1, self.pool.v_scale.shape[2])

    def write_rows(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V ``[N, H_kv, D]`` into flat pool ``rows`` ``[N]``, quantized (fp8) or cast to the pool's dtype."""
        flat_k, flat_v = self.flat()
        if self.pool.scaled:
            flat_ks, flat_vs = self.flat_scales()
            for flat, flat_s, x in ((flat_k, flat_ks, k), (flat_v, flat_vs, v)):
                x8, sc = quantize(x)
                put_rows_(flat, rows, x8)
                flat_s.index_copy_(0, rows, sc)
        else:
            put_rows_(flat_k, rows, k)
            put_rows_(flat_v, rows, v)

    @property
    def used(self) -> int:
        return (self.pool.used_blocks - 1) * self.pool.bytes_per_block

    @property
    def peak(self) -> int:
        return (self.pool.peak_used - 1) * self.pool.bytes_per_block

    def reset_peak(self) -> None:
        self.pool.peak_used = self.pool.used_blocks

    @property
    def grow_chunk(self) -> int:
        return self.pool.block_size

    def decode_reserve(self, max_new: int) -> int:
        return min(max_new, self.pool.block_size)  # admitted by need: one block of decode room, then grow

    def footprint(self, tokens: int, n_full: int, sink: int, window: int, demotes: bool = True) -> int:
        lazy = self.adapter.shape.num_layers - n_full
        blocks = n_full * self.pool.blocks_for(tokens) + lazy * self.pool.blocks_for(min(tokens, sink + window))
        return blocks * self.pool.bytes_per_block

    # ------------------------------------------------------------------ prefill
    def start_prefill(self, requests: Sequence[PrefillRequest]) -> PrefillTask:
        n_layers = self.adapter.shape.num_layers
        seqs = [PagedSeq(r.sink, r.window, [[] for _ in range(n_layers)], [False] * n_layers) for r in requests]
        jobs = [PrefillJob(r.ids, r.policy, _Store(self, seq, r.ids.shape[0], r.ids.shape[0] + r.reserve),
                           r.sink, r.window, r.probe, r.scorer) for r, seq in zip(requests, seqs)]
        bpb = self.pool.bytes_per_block

        def finish(logits: torch.Tensor) -> list[PrefillResult]:
            self.batches.forget()
            return [PrefillResult(logits[n], list(loop.scores[n]), [i for i, z in enumerate(seq.lazy) if z],
                                  sum(len(b) for b in seq.blocks) * bpb, seq) for n, seq in enumerate(seqs)]

        loop = LayerMajorPrefill(self.adapter, jobs, backend=self.backend)
        return PrefillTask(self, loop, seqs, finish)

    def release(self, seq: PagedSeq) -> None:
        for blocks in seq.blocks:
            self.pool.free(blocks)
        seq.blocks = []
        self.batches.forget()

    # ------------------------------------------------------------------ growth and preemption
    def _missing(self, seq: PagedSeq, tokens: int) -> list[int]:
        ring = seq.sink + seq.window
        return [max(0, self.pool.blocks_for(min(tokens, ring) if lazy else tokens) - len(blocks))
                for blocks, lazy in zip(seq.blocks, seq.lazy)]

    def grow_need(self, seq: PagedSeq, tokens: int) -> int:
        if tokens <= seq.room:
            return 0
        return sum(self._missing(seq, tokens)) * self.pool.bytes_per_block

    def grow(self, seq: PagedSeq, tokens: int) -> None:
        if tokens <= seq.room:
            return
        seq.room = tokens
        missing = self._missing(seq, tokens)
        new = iter(self.pool.alloc(sum(missing)))
        for layer, n in enumerate(missing):
            for _ in range(n):
                blk = next(new)
                self.batches.grown.append((seq, layer, len(seq.blocks[layer]), blk))
                seq.blocks[layer].append(blk)

    def swap_out(self, seq: PagedSeq) -> _Swapped:
        ks, vs, scales = [], [], [] if self.pool.scaled else None
        for blocks in seq.blocks:
            idx = torch.tensor(blocks, dtype=torch.long, device=self.pool.k.device)
            ks.append(take_rows(self.pool.k, idx).to("cpu"))
            vs.append(take_rows(self.pool.v, idx).to("cpu"))
            if scales is not None:
                scales.append((self.pool.k_scale.index_select(0, idx).to("cpu"),
                               self.pool.v_scale.index_select(0, idx).to("cpu")))
        swapped = _Swapped(PagedSeq(seq.sink, seq.window, [list(b) for b in seq.blocks], list(seq.lazy), seq.room),
                           ks, vs, scales)
        self.release(seq)
        return swapped

    def swap_in_need(self, swapped: _Swapped) -> int:
        return sum(len(b) for b in swapped.seq.blocks) * self.pool.bytes_per_block

    def swap_in(self, swapped: _Swapped) -> PagedSeq:
        seq = swapped.seq
        dev = self.pool.k.device
        seq.blocks = [self.pool.alloc(len(b)) for b in seq.blocks]
        for layer, (blocks, k, v) in enumerate(zip(seq.blocks, swapped.k, swapped.v)):
            idx = torch.tensor(blocks, dtype=torch.long, device=dev)
            put_rows_(self.pool.k, idx, k.to(dev))
            put_rows_(self.pool.v, idx, v.to(dev))
            if swapped.scales is not None:
                self.pool.k_scale.index_copy_(0, idx, swapped.scales[layer][0].to(dev))
                self.pool.v_scale.index_copy_(0, idx, swapped.scales[layer][1].to(dev))
        self.batches.forget()
        return seq

    # ------------------------------------------------------------------ decode
    def _step(self, st: dict) -> torch.Tensor:
        """One decode step on static tensors: ``tokens``/``pos`` ``[Bk]`` -> writes ``logits``."""
        a, bs = self.adapter, self.pool.block_size
        pos, tables, lazy, sink, window = st["pos"], st["tables"], st["lazy"], st["sink"], st["window"]
        b = pos.shape[0]
        slot = torch.where(lazy & (pos >= sink), sink + (pos - sink) % window, pos)  # [L, Bk]: ring_slot
        blk = torch.gather(tables, 2, (slot // bs).to(torch.int64).unsqueeze(-1)).squeeze(-1).long()
        row = blk * bs + slot % bs
        n_valid = torch.where(lazy, torch.minimum(pos + 1, sink + window), pos + 1).to(torch.int32)
        h = a.embed(st["tokens"].view(b, 1))
        cos, sin = a.rope(h, pos.view(b, 1))
        if self.fused is not None:
            return self._step_fused(st, h[:, 0], cos[:, 0], sin[:, 0], row, tables, n_valid)
        p = self.pool
        for i in range(a.shape.num_layers):
            q, k, v = a.qkv(i, h, cos, sin)
            self.write_rows(row[i], k[:, 0], v[:, 0])
            o = self.backend.paged_decode(q[:, 0], p.k, p.v, tables[i], n_valid[i], a.scale, p.k_scale, p.v_scale,
                                          overlap=True)  # (n_valid and tables are set at the step's start)
            h = a.finish_layer(i, h, o.reshape(b, 1, -1))
        st["logits"].copy_(a.logits(h[:, -1]))
        return st["logits"]

    def _step_fused(self, st, x, cos, sin, row, tables, n_valid) -> torch.Tensor:
        """The decode step with merged projections and fused elementwise kernels: per layer two
        norms, three GEMMs, one RoPE + KV-store kernel, the attention and the gated MLP. Where the backend's
        linear is the CUDA kernel for this batch (``_fold_linear``), the norms, the residual adds and the SiLU
        gate run inside the projections instead (``kernels/linear.py``): 7 launches a layer instead of 10."""
        a, shape = self.adapter, self.adapter.shape
        h_q, h_kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        layers, p = self.fused, self.pool
        flat_k, flat_v = self.flat()
        flat_ks, flat_vs = self.flat_scales()
        b = x.shape[0]
        fold = self._fold_linear(b)
        eps = layers[0]["ln1"].variance_epsilon
        normed, resid = fused.add_rmsnorm(x, None, layers[0]["ln1"].weight, eps)
        ss = None  # fold: the residual stream's partial sums of squares; `normed` is then resid * norm weight
        linear = self.backend.linear
        for i, w in enumerate(layers):
            if fold and i > 0:
                qkv = linear(normed, w["qkv_w"], w["qkv_b"], x_ss=ss, eps=w["ln1"].variance_epsilon)
            else:
                qkv = linear(normed, w["qkv_w"], w["qkv_b"])
            q = fused.rope_store(qkv, cos, sin, h_q, h_kv, d, flat_k, flat_v, row[i], w["qn"], w["kn"], eps,
                                 flat_ks, flat_vs)
            o = self.backend.paged_decode(q, p.k, p.v, tables[i], n_valid[i], a.scale, p.k_scale, p.v_scale,
                                          overlap=True)  # (n_valid and tables are set at the step's start)
            nxt = layers[i + 1]["ln1"] if i + 1 < len(layers) else a.inner.norm
            if fold:
                resid, ss, normed = linear(o.reshape(b, -1), w["o"].weight, w["o"].bias, resid=resid,
                                           next_norm=w["ln2"].weight)
                m = linear(normed, w["gate_up_w"], x_ss=ss, eps=w["ln2"].variance_epsilon, glu=True)
                resid, ss, normed = linear(m, w["down"].weight, w["down"].bias, resid=resid, next_norm=nxt.weight)
                continue
            o = self.proj[i]["o"](o.reshape(b, -1))
            normed, resid = fused.add_rmsnorm(o, resid, w["ln2"].weight, eps)
            m = fused.silu_mul(linear(normed, w["gate_up_w"]))
            m = self.proj[i]["down"](m)
            normed, resid = fused.add_rmsnorm(m, resid, nxt.weight, eps)
        if fold:
            head = a.model.lm_head
            logits = linear(normed, head.weight, head.bias, x_ss=ss, eps=a.inner.norm.variance_epsilon)
        else:
            logits = self.head(normed)
        st["logits"].copy_(logits.float())
        return st["logits"]

    def _fold_linear(self, b: int) -> bool:
        """The step folds its norms, residual adds and SiLU into the projections: the backend's linear is the
        CUDA kernel at ``b`` rows and every projection is a plain ``nn.Linear`` (tensor-parallel ones carry
        collectives and keep their forward)."""
        if not self.backend.linear_fuses(b, self.fused[0]["qkv_w"]):
            return False
        mods = [w[k] for w in self.fused for k in ("o", "down")] + [self.adapter.model.lm_head]
        return all(type(m) is torch.nn.Linear for m in mods)

    @torch.inference_mode()
    def decode(self, seqs: list[PagedSeq], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.batches.run(seqs, tokens, positions, self._step)
