"""Which fp8 scale granularity: quantization error of the default model's real K/V (CPU).

One prompt of ``--tokens`` novel tokens is prefilled (``eval.harness.shared_prefill``, unquantized);
every layer's K and V ``[T, H_kv, D]`` are then quantized to e4m3 with a float32 scale per

- token and head (what ltengine stores: ``kernels/fp8.py``),
- block of ``--block`` tokens and head (the scale of a block is its amax: a decode token above it would
  force requantizing the block, ignored here, so this is the best case of that layout),
- layer and head (amax over the prompt: the best case of a static scale; decode tokens above it clip),

and the table reports, over layers: the relative RMS error of K and of V, and of the decode attention
output of the prompt's last ``--queries`` queries over the whole quantized cache (fp32 math), against
the unquantized cache; plus each layout's scale bytes per token and layer.

``python3 bench/fp8_granularity.py --tokens 1024``
"""
from __future__ import annotations

import argparse
import random

import torch

from ltengine import Engine
from ltengine.eval.harness import shared_prefill
from ltengine.eval.tasks import novel_ids
from ltengine.kernels.fp8 import FP8, FP8_MAX


def quantize_grouped(x: torch.Tensor, group: str, block: int) -> torch.Tensor:
    """Dequantized copy of ``x [T, H, D]`` after e4m3 with one scale per group."""
    a = x.abs()
    if group == "token":
        amax = a.amax(-1, keepdim=True)
    elif group == "block":
        t = x.shape[0]
        pad = -t % block
        ap = torch.cat([a, a.new_zeros((pad, *a.shape[1:]))]).view(-1, block, *a.shape[1:])
        amax = ap.amax(dim=(1, 3), keepdim=True).expand(-1, block, -1, 1).reshape(-1, a.shape[1], 1)[:t]
    else:  # layer (and head)
        amax = a.amax(dim=(0, 2), keepdim=True)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x / s).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * s


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [P, H_q, D] over all of k/v [T, H_kv, D] (no causal mask: decode-like)."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    p = torch.softmax(torch.einsum("phd,thd->pht", q, kk) * scale, -1)
    return torch.einsum("pht,thd->phd", p, vv)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    engine = Engine.from_pretrained(None)
    book, _ = novel_ids(engine.tokenizer)
    start = random.Random(args.seed).randrange(len(book) - args.tokens)
    sp = shared_prefill(engine.adapter, book[start:start + args.tokens], args.queries)
    a = engine.adapter
    h_kv, d = a.shape.num_kv_heads, a.shape.head_dim
    groups = ("token", "block", "layer")
    errs = {g: {"k": [], "v": [], "out": []} for g in groups}
    for q, c in zip(sp.q_tail, sp.full):
        k, v = c.k.float(), c.v.float()
        ref = attend(q.float(), k, v, a.scale)
        for g in groups:
            kq, vq = quantize_grouped(k, g, args.block), quantize_grouped(v, g, args.block)
            errs[g]["k"].append(rel(kq, k))
            errs[g]["v"].append(rel(vq, v))
            errs[g]["out"].append(rel(attend(q.float(), kq, vq, a.scale), ref))
    scale_bytes = {"token": 2 * h_kv * 4, "block": 2 * h_kv * 4 / args.block, "layer": 0.0}
    row_bytes = 2 * h_kv * d
    print(f"Default model, one {args.tokens}-token prompt (novel offset {start}), {len(sp.full)} layers, "
          f"last {args.queries} queries; relative RMS error against the unquantized cache, mean [max] over layers.\n")
    print("| scale per | K error | V error | attention output error | scale bytes per token and layer (fp8 data "
          f"{row_bytes}) |\n|---|---|---|---|---|")
    for g in groups:
        e = errs[g]
        cells = [f"{sum(x) / len(x):.4f} [{max(x):.4f}]" for x in (e["k"], e["v"], e["out"])]
        name = {"token": "token and head", "block": f"block of {args.block} and head", "layer": "layer and head"}[g]
        print(f"| {name} | {' | '.join(cells)} | {scale_bytes[g]:g} ({100 * scale_bytes[g] / row_bytes:.1f}%) |")
    print(f"\n`python3 bench/fp8_granularity.py --tokens {args.tokens} --queries {args.queries} --block {args.block}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
