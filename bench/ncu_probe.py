"""One eager call of each paged decode kernel (CUDA and Triton, bf16) at the small shapes, for Nsight
Compute to profile (the engine's shapes from bench/kernels.py; tables over fresh blocks each call):

    ncu --clock-control none -k regex:'paged|combine' --section SpeedOfLight ... python3 bench/ncu_probe.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paged_probe import paged_case  # noqa: E402

from ltengine.kernels import cuda as kcuda  # noqa: E402
from ltengine.kernels.paged import paged_decode_triton  # noqa: E402

SHAPES = {"1x8k": (1, 8448, 1, None, None), "64x1024": (64, 1024, 64, 2048, None), "8x8k": (8, 8448, 8, None, None)}


def main():
    names = sys.argv[1:] or ["1x8k", "64x1024"]
    for name in names:
        b, t, bucket, width, short = SHAPES[name]
        q, k, v, tables, n = paged_case(b, t, 4, bucket, width, short=short)
        for i, fn in enumerate((paged_decode_triton, kcuda.paged_decode)):
            fn(q, k, v, tables[2 * i], n, 0.1)  # compile / warm up on other blocks
            torch.cuda.synchronize()
            fn(q, k, v, tables[2 * i + 1], n, 0.1)
            torch.cuda.synchronize()
        print(name, "done", flush=True)


if __name__ == "__main__":
    main()
