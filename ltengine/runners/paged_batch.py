"""The paged runner's decode batches: static device tensors per batch-size bucket, and a CUDA graph each.

A bucket's tensors are the step's inputs and output (``tokens``, ``pos``, ``logits``) and the batch's
``tables [L, B, MB]``, ``lazy [L, B]`` and per-row ``sink`` and ``window`` (pad rows read the scratch
block). They change only when the batch does: rebuilt from the block lists when a sequence joined,
gathered on the device from the last batch's rows when sequences only left it (as when requests
finish), and patched where blocks were grown since (``grown``). The step itself (``PagedRunner._step``)
reads them with no host sync, so one capture per bucket replays for any lengths.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def bucket_of(b: int) -> int:
    """The smallest bucket holding ``b`` rows (``b`` itself past the largest)."""
    return next((x for x in BUCKETS if x >= b), b)


class DecodeBatches:
    """Per-bucket static tensors and graphs of one runner; ``grown`` takes ``(seq, layer, index, block)``
    for every block a sequence gains after its tables were built."""

    def __init__(self, num_layers: int, max_blocks: int, scratch: int, vocab_size: int, device: torch.device,
                 graphs: bool):
        self.num_layers, self.max_blocks, self.scratch = num_layers, max_blocks, scratch
        self.vocab_size, self.device, self.graphs = vocab_size, device, graphs
        self.static: dict[int, dict] = {}
        self.grown: list[tuple[object, int, int, int]] = []
        self._key: tuple | None = None
        self._last: tuple[list, dict] | None = None  # the last batch's sequences (held: ids stay unique) and tensors

    def forget(self) -> None:
        """The next batch is rebuilt from the block lists (its sequences' blocks changed otherwise than by
        growth: released, swapped in, shared)."""
        self._key = None

    def tables(self, seqs: Sequence, bucket: int) -> dict:
        """Device tensors for ``seqs``, padded to ``bucket`` rows (pad rows use the scratch block)."""
        tables = torch.full((self.num_layers, bucket, self.max_blocks), self.scratch, dtype=torch.int32)
        lazy = torch.zeros((self.num_layers, bucket), dtype=torch.bool)
        sink = torch.ones(bucket, dtype=torch.long)
        window = torch.ones(bucket, dtype=torch.long)
        for b, seq in enumerate(seqs):
            sink[b], window[b] = seq.sink, seq.window
            for layer, blocks in enumerate(seq.blocks):
                tables[layer, b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
                lazy[layer, b] = seq.lazy[layer]
        dev = self.device
        return {"tables": tables.to(dev), "lazy": lazy.to(dev), "sink": sink.to(dev), "window": window.to(dev)}

    def _kept_rows(self, seqs: Sequence) -> list[int] | None:
        """Each sequence's row in the last batch, or None when one was not in it. The last batch's
        sequences are held, so an ``id`` names one object; a sequence's tables change only by growth,
        which ``grown`` patches (a swapped-in sequence is a new object)."""
        if self._last is None:
            return None
        last = {id(s): r for r, s in enumerate(self._last[0])}
        rows = [last.get(id(s)) for s in seqs]
        return None if None in rows else rows

    def _gather_rows(self, st: dict, keep: list[int]) -> None:
        """``st``'s tables, lazy flags, sinks and windows: the last batch's rows ``keep``, then pad rows."""
        old = self._last[1]
        b = len(keep)
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        rows = {"tables": old["tables"].index_select(1, idx), "lazy": old["lazy"].index_select(1, idx),
                "sink": old["sink"].index_select(0, idx), "window": old["window"].index_select(0, idx)}
        st["tables"][:, b:] = self.scratch
        st["lazy"][:, b:] = False
        st["sink"][b:] = 1
        st["window"][b:] = 1
        st["tables"][:, :b] = rows["tables"]
        st["lazy"][:, :b] = rows["lazy"]
        st["sink"][:b] = rows["sink"]
        st["window"][:b] = rows["window"]

    def _static_for(self, bucket: int) -> dict:
        st = self.static.get(bucket)
        if st is None:
            dev = self.device
            st = {"tokens": torch.zeros(bucket, dtype=torch.long, device=dev),
                  "pos": torch.zeros(bucket, dtype=torch.long, device=dev),
                  "logits": torch.zeros(bucket, self.vocab_size, dtype=torch.float32, device=dev),
                  "graph": None}
            st.update(self.tables([], bucket))
            self.static[bucket] = st
        return st

    def _patch_grown(self, st: dict, seqs: Sequence) -> None:
        rows = {id(s): r for r, s in enumerate(seqs)}
        patch = [(layer, rows[id(s)], j, blk) for s, layer, j, blk in self.grown if id(s) in rows]
        if patch:
            idx = torch.tensor(patch, dtype=torch.long).t().to(self.device)
            st["tables"][idx[0], idx[1], idx[2]] = idx[3].to(torch.int32)

    def run(self, seqs: Sequence, tokens: torch.Tensor, positions: torch.Tensor,
            step: Callable[[dict], torch.Tensor]) -> torch.Tensor:
        """``step`` on this batch's bucket (replayed from its graph when graphs are on): logits ``[B, V]``."""
        b = len(seqs)
        bucket = bucket_of(b)
        st = self._static_for(bucket)
        key = (bucket, tuple(id(s) for s in seqs))
        stale = bool(self.grown)
        if self._key != key:
            keep = self._kept_rows(seqs)
            if keep is None:  # built from the block lists (grown blocks included): nothing to patch
                fresh = self.tables(seqs, bucket)
                for name in ("tables", "lazy", "sink", "window"):
                    st[name].copy_(fresh[name])
                stale = False
            else:  # rows left the last batch: the rest are gathered on the device, no host rebuild
                self._gather_rows(st, keep)
            self._key, self._last = key, (list(seqs), st)
        if stale:  # blocks grown since the tables were built: patch them in
            self._patch_grown(st, seqs)
        self.grown.clear()
        st["tokens"].zero_()
        st["pos"].zero_()
        st["tokens"][:b].copy_(tokens)
        st["pos"][:b].copy_(positions)
        if not self.graphs:
            return step(st)[:b]
        if st["graph"] is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step(st)  # warm-up: compiles the Triton kernels outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step(st)
            st["graph"] = graph
        st["graph"].replay()
        return st["logits"][:b]
