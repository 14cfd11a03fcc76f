"""One eager call of each paged decode kernel (CUDA and Triton, bf16) at shapes of bench/kernels.py, for
Nsight Compute to profile (tables over fresh blocks each call, after a warm-up call on other blocks):

    ncu --clock-control none -k regex:'paged|combine' --section SpeedOfLight ... python3 bench/ncu_probe.py 1x8k 64x1024

A shape is named by any part of its name in ``kernels.SHAPES`` without spaces (default: 1x8k, 64x1024).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import SHAPES  # noqa: E402
from paged_probe import paged_case  # noqa: E402

from ltengine.kernels import cuda as kcuda  # noqa: E402
from ltengine.kernels.paged import paged_decode_triton  # noqa: E402


def main():
    for key in sys.argv[1:] or ["1x8k", "64x1024"]:
        found = [s for s in SHAPES if key in s[0].replace(" ", "")]
        if not found:
            raise SystemExit(f"no shape of bench/kernels.py matches {key!r}: {[s[0] for s in SHAPES]}")
        name, b, t, bucket, width, short, _ = found[0]
        q, k, v, tables, n = paged_case(b, t, 4, bucket, width, short=short)
        for i, fn in enumerate((paged_decode_triton, kcuda.paged_decode)):
            fn(q, k, v, tables[2 * i], n, 0.1)  # compile / warm up on other blocks
            torch.cuda.synchronize()
            fn(q, k, v, tables[2 * i + 1], n, 0.1)
            torch.cuda.synchronize()
        print(name, "done", flush=True)


if __name__ == "__main__":
    main()
