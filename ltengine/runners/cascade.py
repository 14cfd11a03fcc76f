"""Decode of many questions on one shared prefix, reading the prefix's KV once per step (CPU sessions).

The paged runner's decode gathers every row's blocks into a contiguous cache per layer (the PyTorch
twin on CPU), so eight questions on a 6k-token document copy the document eight times per layer
and step. Here the whole blocks the questions share (a full layer's first ``prefix_len //
block_size`` blocks) are attended by the whole batch in one matmul over a view of the pool (no copy
when the blocks are consecutive, as a fresh prefill allocates them), each question's own part (its
copied partial block, its tokens, or its lazy ring) is gathered on its own, and the two parts meet in
one softmax: cascade attention. Rows, writes and positions are the paged runner's; only the
attention is split. Questions on several documents decode in one step through ``cascade_decode``
(projections and MLPs once for the batch, the cascade per document). The CUDA path keeps the paged
runner's Triton decode and CUDA graphs.
"""
from __future__ import annotations

import torch

from .paged import PagedRunner, PagedSeq


class SharedPrefixDecode:
    """``decode(seqs, tokens [B], positions [B]) -> logits [B, V]`` for ``PagedSeq`` forks of ``prefix``
    (forks of several prefixes in one step: ``cascade_decode``)."""

    def __init__(self, runner: PagedRunner, prefix: PagedSeq, prefix_len: int):
        self.runner = runner
        bs = runner.pool.block_size
        self.shared_len = prefix_len // bs * bs  # positions held in whole shared blocks
        # per layer the shared blocks (a list kept here: closing the session empties the prefix's own)
        self.shared: list[object] = []
        for blocks, lazy in zip(prefix.blocks, prefix.lazy):
            whole = blocks[:prefix_len // bs]
            if lazy or not whole:
                self.shared.append(None)
            elif whole == list(range(whole[0], whole[0] + len(whole))):
                self.shared.append(slice(whole[0], whole[0] + len(whole)))  # a view of the pool
            else:
                self.shared.append(torch.tensor(whole, dtype=torch.long, device=runner.pool.k.device))
        self._tables: dict[int, list[torch.Tensor]] = {}

    def _table(self, seq: PagedSeq) -> list[torch.Tensor]:
        t = self._tables.get(id(seq))
        if t is None or t[0] is not seq:  # a fork's blocks never change: its tables once
            dev = self.runner.pool.k.device
            t = self._tables[id(seq)] = [seq] + [torch.tensor(b, dtype=torch.long, device=dev) for b in seq.blocks]
        return t[1:]

    def _shared_kv(self, layer: int):
        where = self.shared[layer]
        if where is None:
            return None
        pool = self.runner.pool
        k, v = pool.k[where], pool.v[where]  # [nb, BS, H_kv, D]
        return k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])

    def __call__(self, seqs: list[PagedSeq], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return cascade_decode([(self, seqs)], tokens, positions)

    def _own(self, layer: int, seq: PagedSeq, p: int) -> tuple[int, torch.Tensor]:
        """A row's write slot at position ``p`` and the slots it attends outside the shared blocks
        (its own token's included)."""
        if seq.lazy[layer]:
            ring = seq.sink + seq.window
            slot = p if p < seq.sink else seq.sink + (p - seq.sink) % seq.window
            return slot, torch.arange(min(p + 1, ring))
        return p, torch.arange(self.shared_len if self.shared[layer] is not None else 0, p + 1)

    def _attend(self, layer: int, q: torch.Tensor, seqs, own, flat_k, flat_v) -> torch.Tensor:
        """q ``[B, H_q, D]`` -> ``[B, H_q, D]``: one softmax over the shared keys (rows of full layers)
        and each row's own keys."""
        bs = self.runner.pool.block_size
        scale = self.runner.adapter.scale
        b, h_q, d = q.shape
        h_kv = flat_k.shape[1]
        g = h_q // h_kv
        n = max(len(slots) for _, slots in own)
        rows = torch.zeros((b, n), dtype=torch.long)
        valid = torch.zeros((b, n), dtype=torch.bool)
        for j, (table, slots) in enumerate(own):
            rows[j, :len(slots)] = table[slots // bs] * bs + slots % bs
            valid[j, :len(slots)] = True
        rows, valid = rows.to(q.device), valid.to(q.device)
        qf = q.float().view(b, h_kv, g, d)
        ok = flat_k[rows].float().permute(0, 2, 3, 1)  # [B, H_kv, D, n]
        # padding slots point at whatever row 0 of the pool holds (never written: any bits, NaN too); their
        # scores are masked below, and their values zeroed here, since a zero probability times NaN is NaN
        ov = flat_v[rows].float().masked_fill_(~valid[:, :, None, None], 0.0).permute(0, 2, 1, 3)  # [B, H_kv, n, D]
        scores = torch.matmul(qf, ok).mul_(scale).masked_fill_(~valid[:, None, None, :], float("-inf"))
        shared = self._shared_kv(layer)
        if shared is None:
            return (torch.softmax(scores, -1) @ ov).reshape(b, h_q, d).to(q.dtype)
        sk, sv = shared[0].float(), shared[1].float()  # [S, H_kv, D]
        t = sk.shape[0]
        qs = qf.permute(1, 0, 2, 3).reshape(h_kv, b * g, d)
        sscores = torch.matmul(qs, sk.permute(1, 2, 0)).mul_(scale).view(h_kv, b, g, t).permute(1, 0, 2, 3)
        uses = torch.tensor([not s.lazy[layer] for s in seqs], device=q.device)
        sscores = sscores.masked_fill(~uses[:, None, None, None], float("-inf"))
        probs = torch.softmax(torch.cat([sscores, scores], dim=-1), dim=-1)
        ps = probs[..., :t].permute(1, 0, 2, 3).reshape(h_kv, b * g, t)
        out = torch.matmul(ps, sv.permute(1, 0, 2)).view(h_kv, b, g, d).permute(1, 0, 2, 3)
        out = out + probs[..., t:] @ ov
        return out.reshape(b, h_q, d).to(q.dtype)


@torch.inference_mode()
def cascade_decode(groups: list[tuple[SharedPrefixDecode, list[PagedSeq]]], tokens: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
    """One decode step for the forks of several prefixes (one runner), the rows in group order:
    ``tokens``/``positions [B]`` -> logits ``[B, V]``. Embedding, projections and MLPs run once for
    the whole batch; attention runs per prefix (its shared blocks read once for its rows)."""
    r = groups[0][0].runner
    a, bs = r.adapter, r.pool.block_size
    rows = [(dec, s) for dec, g in groups for s in g]
    b = len(rows)
    for dec, g in groups:
        live = {id(s) for s in g}
        dec._tables = {k: t for k, t in dec._tables.items() if k in live}
    tables = [dec._table(s) for dec, s in rows]
    pos = positions.tolist()
    h = a.embed(tokens.view(b, 1))
    cos, sin = a.rope(h, positions.view(b, 1))
    for i in range(a.shape.num_layers):
        q, k, v = a.qkv(i, h, cos, sin)  # [B, 1, H, D]
        own = [dec._own(i, s, p) for (dec, s), p in zip(rows, pos)]
        flat_k, flat_v = r.flat()
        write = torch.stack([t[i][slot // bs] * bs + slot % bs for t, (slot, _) in zip(tables, own)])
        flat_k.index_copy_(0, write, k[:, 0])
        flat_v.index_copy_(0, write, v[:, 0])
        outs, at = [], 0
        for dec, g in groups:
            part = slice(at, at + len(g))
            outs.append(dec._attend(i, q[part, 0], g, [(t[i], slots) for t, (_, slots) in zip(tables[part], own[part])],
                                    flat_k, flat_v))
            at += len(g)
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        h = a.finish_layer(i, h, o.reshape(b, 1, -1))
    return a.logits(h[:, -1])
