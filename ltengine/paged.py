"""PagedRunner: every layer's KV of every sequence in one block pool; one decode launch per layer.

Per sequence and layer, a list of pool blocks in slot order. A full layer's slot p is position p; a
lazy layer's slot is ``ring_slot(p, sink, window)``. Decode builds, once per batch change, tensors
``tables [L, B, MB]`` and ``lazy [L, B]`` on the device; each step then computes write slots, the
valid prefix of each cache and the attention on the device with no host sync inside the step, and
can be captured in a CUDA graph per batch-size bucket.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .kernels import fused
from .kernels.paged import pick_paged_decode
from .lazy import LayerPolicy
from .models import DecoderAdapter
from .pool import KVPool
from .runner import PrefillJob, PrefillResult, Runner, layer_major

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class PagedSeq:
    """One sequence's blocks: ``blocks[l]`` in slot order; ``lazy[l]`` whether layer l is sink + window."""

    blocks: list[list[int]] = field(default_factory=list)
    lazy: list[bool] = field(default_factory=list)


class PagedRunner(Runner):
    """Budget units are pool blocks."""

    name = "paged"

    def __init__(self, adapter: DecoderAdapter, backend, sink: int, window: int, pool: KVPool,
                 prefer: str | None = None, graphs: bool | None = None):
        self.adapter, self.backend, self.sink, self.window, self.pool = adapter, backend, sink, window, pool
        s = adapter.shape
        self.attn_name, self.attn = pick_paged_decode(pool.k.device, pool.k.dtype, s.head_dim, prefer)
        self.scratch = pool.alloc(1)[0]  # padded batch rows write here, never into a live block
        self.capacity = pool.num_blocks - 1
        self.max_blocks = max(1, pool.blocks_for(min(s.max_context, pool.num_blocks * pool.block_size)))
        self.graphs = (pool.k.device.type == "cuda") if graphs is None else graphs
        # fused decode kernels (CUDA, fp16/bf16); the HF modules otherwise
        self.fused = adapter.fused_weights() if fused.available(pool.k.device, pool.k.dtype) and prefer != "reference" \
            else None
        self._batch: tuple | None = None
        self._static: dict[int, dict] = {}

    # ------------------------------------------------------------------ budget
    def footprint(self, prompt_len: int, max_new: int, n_full: int) -> int:
        total = prompt_len + max_new
        lazy = self.adapter.shape.num_layers - n_full
        return n_full * self.pool.blocks_for(total) + lazy * self.pool.blocks_for(min(total, self.sink + self.window))

    @property
    def free(self) -> int:
        return self.pool.free_blocks

    @property
    def kv_bytes(self) -> int:
        return (self.pool.used_blocks - 1) * self.pool.bytes_per_block

    @property
    def peak_kv_bytes(self) -> int:
        return (self.pool.peak_used - 1) * self.pool.bytes_per_block

    # ------------------------------------------------------------------ prefill
    def _slots(self, blocks: list[int], slots: torch.Tensor) -> torch.Tensor:
        """Flat pool row of each slot of a block list."""
        bs = self.pool.block_size
        table = torch.tensor(blocks, dtype=torch.long, device=slots.device)
        return table[slots // bs] * bs + slots % bs

    @torch.inference_mode()
    def prefill_batch(self, prompts: Sequence[tuple[torch.Tensor, LayerPolicy, int]], probe: int, score: bool = True,
                      progress=None) -> list[PrefillResult]:
        """Prefill ``(ids [T], policy, max_new)`` prompts together (``layer_major``); one result each.
        Each prompt takes exactly its ``footprint`` of blocks at its peak."""
        pool, sink, window = self.pool, self.sink, self.window
        flat_k = pool.k.view(-1, *pool.k.shape[2:])
        flat_v = pool.v.view(-1, *pool.v.shape[2:])
        n_layers = self.adapter.shape.num_layers
        seqs = [PagedSeq(blocks=[[] for _ in range(n_layers)], lazy=[False] * n_layers) for _ in prompts]
        dev = prompts[0][0].device

        def ring_positions(length):  # positions a sink + window cache keeps, and their slots
            pos = torch.cat([torch.arange(min(length, sink), device=dev),
                             torch.arange(max(sink, length - window), max(sink, length), device=dev)])
            slots = torch.where(pos < sink, pos, sink + (pos - sink) % window)
            return pos, slots

        def job(ids, policy, max_new, seq):
            t = ids.shape[0]
            total = t + max_new
            lazy_blocks = pool.blocks_for(min(total, sink + window))

            def store(i, k, v, lazy):
                if lazy:
                    blocks = pool.alloc(lazy_blocks)
                    pos, slots = ring_positions(t)
                    rows = self._slots(blocks, slots)
                    flat_k.index_copy_(0, rows, k.index_select(0, pos))
                    flat_v.index_copy_(0, rows, v.index_select(0, pos))
                else:
                    blocks = pool.alloc(pool.blocks_for(total))
                    rows = self._slots(blocks, torch.arange(t, device=dev))
                    flat_k.index_copy_(0, rows, k)
                    flat_v.index_copy_(0, rows, v)
                seq.blocks[i], seq.lazy[i] = blocks, lazy

            def demote_(j):
                # in place: gather the kept tokens (a copy of sink + window rows, so overlap is harmless),
                # write them into their ring slots of the same blocks, then hand the tail blocks back
                blocks = seq.blocks[j]
                pos, slots = ring_positions(t)
                src, dst = self._slots(blocks, pos), self._slots(blocks, slots)
                flat_k.index_copy_(0, dst, flat_k.index_select(0, src))
                flat_v.index_copy_(0, dst, flat_v.index_select(0, src))
                pool.free(blocks[lazy_blocks:])
                seq.blocks[j], seq.lazy[j] = blocks[:lazy_blocks], True

            return PrefillJob(ids, policy, store, demote_)

        try:
            h, ratios = layer_major(self.adapter, [job(*p, seq) for p, seq in zip(prompts, seqs)], sink, window,
                                    probe, score, progress, self.backend.lazy_ratio)
            logits = self.adapter.logits(h)
        except BaseException:  # (an out-of-memory error included): the blocks go back, the pool stays whole
            for seq in seqs:
                self.release(seq)
            raise
        self._batch = None
        return [PrefillResult(logits[n], ratios[n], [i for i, z in enumerate(seq.lazy) if z],
                              sum(len(b) for b in seq.blocks) * pool.bytes_per_block, seq)
                for n, seq in enumerate(seqs)]

    def release(self, seq: PagedSeq) -> None:
        for blocks in seq.blocks:
            self.pool.free(blocks)
        seq.blocks = []
        self._batch = None

    # ------------------------------------------------------------------ decode
    def _bucket(self, b: int) -> int:
        return next((x for x in BUCKETS if x >= b), b)

    def _state(self, seqs: list[PagedSeq], bucket: int) -> dict:
        """Device tensors for this batch, padded to ``bucket`` rows (pad rows use the scratch block)."""
        n_layers = self.adapter.shape.num_layers
        tables = torch.full((n_layers, bucket, self.max_blocks), self.scratch, dtype=torch.int32)
        lazy = torch.zeros((n_layers, bucket), dtype=torch.bool)
        for b, seq in enumerate(seqs):
            for layer, blocks in enumerate(seq.blocks):
                tables[layer, b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
                lazy[layer, b] = seq.lazy[layer]
        dev = self.pool.k.device
        return {"tables": tables.to(dev), "lazy": lazy.to(dev)}

    def _step(self, st: dict) -> torch.Tensor:
        """One decode step on static tensors: ``tokens``/``pos`` ``[Bk]`` -> writes ``logits``."""
        a, pool, sink, window = self.adapter, self.pool, self.sink, self.window
        bs = pool.block_size
        pos, tables, lazy = st["pos"], st["tables"], st["lazy"]
        b = pos.shape[0]
        slot = torch.where(lazy & (pos >= sink), sink + (pos - sink) % window, pos)  # [L, Bk]
        blk = torch.gather(tables, 2, (slot // bs).to(torch.int64).unsqueeze(-1)).squeeze(-1).long()
        row = blk * bs + slot % bs
        n_valid = torch.where(lazy, torch.clamp(pos + 1, max=sink + window), pos + 1).to(torch.int32)
        flat_k = pool.k.view(-1, *pool.k.shape[2:])
        flat_v = pool.v.view(-1, *pool.v.shape[2:])
        h = a.embed(st["tokens"].view(b, 1))
        cos, sin = a.rope(h, pos.view(b, 1))
        if self.fused is not None:
            return self._step_fused(st, h[:, 0], cos[:, 0], sin[:, 0], row, tables, n_valid, flat_k, flat_v)
        for i in range(a.shape.num_layers):
            q, k, v = a.qkv(i, h, cos, sin)
            flat_k.index_copy_(0, row[i], k[:, 0])
            flat_v.index_copy_(0, row[i], v[:, 0])
            o = self.attn(q[:, 0], pool.k, pool.v, tables[i], n_valid[i], a.scale)
            h = a.finish_layer(i, h, o.reshape(b, 1, -1))
        st["logits"].copy_(a.logits(h[:, -1]))
        return st["logits"]

    def _step_fused(self, st, x, cos, sin, row, tables, n_valid, flat_k, flat_v) -> torch.Tensor:
        """The decode step with merged projections and fused elementwise kernels: per layer two
        norms, three GEMMs, one RoPE + KV-store kernel, the attention and the gated MLP."""
        a, shape = self.adapter, self.adapter.shape
        h_q, h_kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        layers = self.fused
        b = x.shape[0]
        eps = layers[0]["ln1"].variance_epsilon
        normed, resid = fused.add_rmsnorm(x, None, layers[0]["ln1"].weight, eps)
        for i, w in enumerate(layers):
            qkv = torch.nn.functional.linear(normed, w["qkv_w"], w["qkv_b"])
            q = fused.rope_store(qkv, cos, sin, h_q, h_kv, d, flat_k, flat_v, row[i], w["qn"], w["kn"], eps)
            o = self.attn(q, self.pool.k, self.pool.v, tables[i], n_valid[i], a.scale)
            o = w["o"](o.reshape(b, -1))
            normed, resid = fused.add_rmsnorm(o, resid, w["ln2"].weight, eps)
            m = w["down"](fused.silu_mul(torch.nn.functional.linear(normed, w["gate_up_w"])))
            nxt = layers[i + 1]["ln1"].weight if i + 1 < len(layers) else a.inner.norm.weight
            normed, resid = fused.add_rmsnorm(m, resid, nxt, eps)
        st["logits"].copy_(a.model.lm_head(normed).float())
        return st["logits"]

    @torch.inference_mode()
    def decode(self, seqs: list[PagedSeq], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b = len(seqs)
        bucket = self._bucket(b)
        key = tuple(id(s) for s in seqs)
        st = self._static.get(bucket)
        if st is None:
            dev = self.pool.k.device
            st = {"tokens": torch.zeros(bucket, dtype=torch.long, device=dev),
                  "pos": torch.zeros(bucket, dtype=torch.long, device=dev),
                  "logits": torch.zeros(bucket, self.adapter.vocab_size, dtype=torch.float32, device=dev),
                  "graph": None}
            st.update(self._state([], bucket))
            self._static[bucket] = st
        if self._batch != (bucket, key):
            fresh = self._state(seqs, bucket)
            st["tables"].copy_(fresh["tables"])
            st["lazy"].copy_(fresh["lazy"])
            self._batch = (bucket, key)
        st["tokens"].zero_()
        st["pos"].zero_()
        st["tokens"][:b].copy_(tokens)
        st["pos"][:b].copy_(positions)
        if not self.graphs:
            return self._step(st)[:b]
        if st["graph"] is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step(st)  # warm-up: compiles the Triton kernels outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(st)
            st["graph"] = graph
        st["graph"].replay()
        return st["logits"][:b]
