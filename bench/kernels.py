"""The compiled kernels on one GPU, side by side in one run: CUDA (csrc/) vs Triton paged decode, the
paged truncation, and the decode step's projections (csrc skinny_linear vs F.linear / cuBLAS; and one layer's
projections with the norms, residual adds and SiLU folded into them vs those as separate kernels), as % of
the device-to-device copy bandwidth measured in the same run.

    python3 bench/kernels.py              (writes $OUT/kernels.json when OUT is set)
    python3 bench/kernels.py --knobs      (also: both kernels' target chunks per SM at each shape)
    python3 bench/kernels.py --breakdown  (also: each kernel's device time, from the profiler)
    python3 bench/kernels.py --stages     (also: the CUDA kernel's ring depth, 2-4 stages, at each shape)
    python3 bench/kernels.py --linear-only [--stages]  (only the decode step's projections: skinny_linear vs
                                          F.linear; --stages: also the kernel's ring depths 3, 4, 6)

Decode: bf16 and fp8 pools (e4m3 with per-row fp32 scales; bf16 queries), Llama-3-8B-shaped (32 q heads /
8 kv heads, D 128), 64-token blocks at random places in the pool, 32 layers' calls in one CUDA graph (distinct blocks per layer while they fit 8 GB), median of
5 replays; bytes = K + V of the valid slots (and their scales, fp8). Shapes: 1x8k, 8x8k, 1x32k full, and the 40 GiB budget
points of the 8B model: full = 9 rows of 33k keys (bucket 16), 50% lazy = 19 rows of 33k alternating
with 1,024-key rows (bucket 24), 64 sink + window rows of 1,024. Truncation: N rows of 33k tokens
demoted to sink 4 + window 1020 in one call; bytes = the window's K and V read + written.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paged_probe import graph_point, paged_case  # noqa: E402

from ltengine.kernels import cuda as kcuda  # noqa: E402
from ltengine.kernels.paged import paged_decode_triton, paged_truncate_ref_  # noqa: E402

SMS = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132

SHAPES = [  # name, real rows, keys, bucket, table width (blocks), short rows' keys, budget point
    ("full 1x8k", 1, 8448, 1, None, None, False),
    ("full 8x8k", 8, 8448, 8, None, None, False),
    ("full 1x32k", 1, 33024, 1, None, None, False),
    ("budget full: 9 x 33k (bucket 16)", 9, 33024, 16, None, None, True),
    ("budget 50% lazy: 19 x 33k / 1024 (bucket 24)", 19, 33024, 24, None, 1024, True),
    ("sink+window: 64 x 1024 (2048-block tables)", 64, 1024, 64, 2048, None, True),
]


def copy_bandwidth() -> float:
    """2 GiB device-to-device copy, bytes read + written, median of 30 CUDA-event timings."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    times = []
    for i in range(33):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        e.synchronize()
        if i >= 3:
            times.append(s.elapsed_time(e) / 1e3)
    del x, y
    torch.cuda.empty_cache()
    return 2 * (2 << 30) / statistics.median(times)


def decode_table(bw: float, knobs: bool, stages: bool = False) -> list[dict]:
    """Every shape: Triton vs CUDA over bf16 pools, then over fp8 pools (per-row scales counted). The CUDA
    kernel is launched as the paged runner launches it (``overlap=True``: its prologue runs while the previous
    call's combine finishes; the tables and lengths are static in the graph, as in the engine's step), and
    also without (``cuda_plain``), side by side."""
    rows = []
    print(f"{'shape':46s} {'triton':>16s} {'cuda':>16s}  cuda/triton | {'cuda, no overlap':>16s}  /triton | "
          f"{'triton fp8':>16s} {'cuda fp8':>16s}  ratio")
    cuda = functools.partial(kcuda.paged_decode, overlap=True)
    impls = (("triton", paged_decode_triton, False), ("cuda", cuda, False), ("cuda_plain", kcuda.paged_decode, False),
             ("triton_fp8", paged_decode_triton, True), ("cuda_fp8", cuda, True))
    for name, b, t, bucket, width, short, budget in SHAPES:
        res = {impl: graph_point(b, t, bucket, width, fn, short=short, fp8=fp8) for impl, fn, fp8 in impls}
        row = {"shape": name, "budget": budget, **{f"{k}_gbs": v / 1e9 for k, v in res.items()},
               **{f"{k}_pct_copy": 100 * v / bw for k, v in res.items()}}
        cells = [f"{res[k] / 1e9:6.0f} GB/s {row[f'{k}_pct_copy']:5.1f}%" for k, _, _ in impls]
        print(f"{name:46s} {cells[0]} {cells[1]}  {res['cuda'] / res['triton']:5.2f}x      | {cells[2]}  "
              f"{res['cuda_plain'] / res['triton']:5.2f}x | {cells[3]} {cells[4]}  "
              f"{res['cuda_fp8'] / res['triton_fp8']:5.2f}x", flush=True)
        if knobs:  # chunks per SM: the Triton kernel's target; the CUDA kernel's cap (default ~12, whole waves)
            sweep = {}
            for impl, fn, values in (("cuda", kcuda.paged_decode, (4, 8, 12, 16, 24, 32)),
                                     ("triton", paged_decode_triton, (8, 20, 32))):
                for per in values:
                    sweep[f"{impl} {per}/SM"] = 100 * graph_point(b, t, bucket, width, fn, short=short,
                                                                  programs=per * SMS) / bw
            row["knobs_pct_copy"] = sweep
            print("    knobs: " + "  ".join(f"{k} {v:.1f}%" for k, v in sweep.items()), flush=True)
        if stages:  # the CUDA kernel's ring depth (2: the default, 3 CTAs per SM; 3: 2; 4: 1)
            depth = {st: 100 * graph_point(b, t, bucket, width, kcuda.paged_decode, short=short, stages=st) / bw
                     for st in (2, 3, 4)}
            row["cuda_stages_pct_copy"] = depth
            print("    cuda stages: " + "  ".join(f"{k}: {v:.1f}%" for k, v in depth.items()), flush=True)
        rows.append(row)
    return rows


def breakdown(bw: float) -> list[dict]:
    """Device time of each kernel (attention, combine) of both implementations at every bf16 shape, from
    the profiler over 16 eager calls (tables rotating over distinct blocks, so nothing is re-read from
    L2); the attention kernel's own % of copy bandwidth beside it."""
    from torch.profiler import ProfilerActivity, profile
    out, row = [], 8 * 128 * 2  # bytes of one token's K (or V): paged_case's 8 kv heads x D 128, bf16
    for name, b, t, bucket, width, short, _ in SHAPES:
        copies = max(1, min(16, int(8e9 // (2 * b * t * row))))
        q, k, v, tables, n = paged_case(b, t, copies, bucket, width, short=short)
        bytes_read = 2 * int(n.sum()) * row
        for impl, fn in (("triton", paged_decode_triton), ("cuda", kcuda.paged_decode)):
            fn(q, k, v, tables[0], n, 0.1)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for i in range(16):
                    fn(q, k, v, tables[i % copies], n, 0.1)
                torch.cuda.synchronize()
            kernels = sorted(((e.key, e.device_time_total / max(1, e.count)) for e in prof.key_averages()
                              if e.device_time_total > 0 and e.count >= 16), key=lambda x: -x[1])
            cells = "  ".join(f"{key[:34]} {us:7.1f} us" for key, us in kernels[:3])
            main_us = kernels[0][1] if kernels else float("nan")
            print(f"{name[:30]:30s} {impl:6s}: {cells}; first kernel {100 * bytes_read / (main_us * 1e-6) / bw:5.1f}% "
                  "of copy", flush=True)
            out.append({"shape": name, "impl": impl, "kernels_us": dict(kernels)})
        del k, v
        torch.cuda.empty_cache()
    return out


def other_dtypes(bw: float) -> list[dict]:
    """fp32 and D 256 (the SIMT kernel) and fp16 at one full shape: which implementation to run first."""
    out = []
    for label, dtype, d in (("fp16 D128", torch.float16, 128), ("fp32 D128", torch.float32, 128),
                            ("bf16 D256", torch.bfloat16, 256), ("bf16 D64", torch.bfloat16, 64)):
        res = {impl: graph_point(8, 8448, 8, None, fn, d=d, dtype=dtype)
               for impl, fn in (("triton", paged_decode_triton), ("cuda", kcuda.paged_decode))}
        print(f"8x8k {label:10s}: triton {100 * res['triton'] / bw:5.1f}%  cuda {100 * res['cuda'] / bw:5.1f}% of copy",
              flush=True)
        out.append({"shape": f"8x8k {label}", **{f"{k}_pct_copy": 100 * v / bw for k, v in res.items()}})
    return out


def truncate_table(bw: float) -> list[dict]:
    """One paged_truncate_ call demoting N rows of 33k tokens: CUDA vs the PyTorch reference."""
    sink, window, h_kv, d = 4, 1020, 8, 128
    out = []
    for rows in (1, 19, 64):
        q, k, v, tables, n = paged_case(rows, 33024, 1, h_kv=h_kv, d=d)
        tables, lens = tables[0], n.long()
        moved = 2 * 2 * rows * window * h_kv * d * k.element_size()  # K and V, read + written
        res = {}
        for impl, fn in (("reference", paged_truncate_ref_), ("cuda", kcuda.paged_truncate_)):
            fn(k, v, tables, lens, sink, window)  # repeatable: the sources (>= sink + window) are never written
            times = []
            for _ in range(7):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn(k, v, tables, lens, sink, window)
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) / 1e3)
            res[impl] = statistics.median(times)
        print(f"truncate {rows:3d} x 33k -> 4 + 1020: {moved / 1e6:7.1f} MB moved; reference {res['reference'] * 1e6:8.1f} us "
              f"({100 * moved / res['reference'] / bw:5.1f}% of copy), cuda {res['cuda'] * 1e6:7.1f} us "
              f"({100 * moved / res['cuda'] / bw:5.1f}% of copy)", flush=True)
        out.append({"rows": rows, "bytes": moved, **{f"{k}_us": t * 1e6 for k, t in res.items()},
                    **{f"{k}_pct_copy": 100 * moved / t / bw for k, t in res.items()}})
        del k, v
        torch.cuda.empty_cache()
    return out


LINEAR_SHAPES = [  # the Llama-3-8B decode step's projections: name, N (outputs), K (inputs)
    ("qkv 6144 x 4096", 6144, 4096), ("o 4096 x 4096", 4096, 4096), ("gate_up 28672 x 4096", 28672, 4096),
    ("down 4096 x 14336", 4096, 14336), ("lm_head 128256 x 4096", 128256, 4096),
]


def _graph_bandwidth(fn, ws, nbytes: int) -> float:
    """Bytes of w read per second by ``fn(w)`` over the copies ``ws``: one CUDA graph of one pass, median of 7
    replays after a warm one."""
    for w in ws:  # warm (cuBLAS heuristics, the kernel's shared-memory attribute)
        fn(w)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for w in ws:
            fn(w)
    times = []
    for _ in range(8):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return len(ws) * nbytes / statistics.median(times[1:])


def linear_table(bw: float, rows=(1, 2, 4, 8), stages: bool = False) -> list[dict]:
    """The decode step's projections, bf16: csrc skinny_linear vs F.linear (cuBLAS) at M rows of x, as
    bytes of w read / time vs copy bandwidth. Copies of w rotate so that >= 1 GiB is read between two
    reads of one copy (nothing comes from L2, as in a step over 32 layers). ``stages``: also the kernel's
    ring depths."""
    import torch.nn.functional as F
    out = []
    depths = (3, 4, 6) if stages else ()
    head = "".join(f"{'cuda s' + str(d):>8s}" for d in depths)
    print(f"{'linear (bf16)':24s} {'M':>3s} {'F.linear':>17s} {'skinny_linear':>17s}  ratio {head}")
    for name, n, k in LINEAR_SHAPES:
        nbytes = n * k * 2
        copies = max(2, min(32, -(-(1 << 30) // nbytes)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            res = {"torch": _graph_bandwidth(lambda w: F.linear(x, w), ws, nbytes),
                   "cuda": _graph_bandwidth(lambda w: kcuda.skinny_linear(x, w), ws, nbytes)}
            for d in depths:
                res[f"cuda_s{d}"] = _graph_bandwidth(lambda w: kcuda.skinny_linear(x, w, stages=d), ws, nbytes)
            row = {"shape": name, "m": m, **{f"{k2}_pct_copy": 100 * v / bw for k2, v in res.items()}}
            sweep = "".join(f"{row[f'cuda_s{d}_pct_copy']:7.1f}%" for d in depths)
            print(f"{name:24s} {m:3d} {res['torch'] / 1e9:6.0f} GB/s {row['torch_pct_copy']:5.1f}% "
                  f"{res['cuda'] / 1e9:6.0f} GB/s {row['cuda_pct_copy']:5.1f}%  {res['cuda'] / res['torch']:5.2f}x {sweep}",
                  flush=True)
            out.append(row)
        del ws
        torch.cuda.empty_cache()
    return out


def fold_table(bw: float, rows=(1, 8), layers: int = 16) -> list[dict]:
    """One decode layer's projections of Llama-3-8B, bf16, ``layers`` of them (distinct weights) in one CUDA
    graph: skinny_linear with the norms, residual adds and SiLU folded in (the engine's step at <= 8 rows)
    against the same kernel with them as the fused Triton kernels (session 10's step), as weights' bytes /
    time vs copy bandwidth. The attention is left out: o's input is a fixed tensor."""
    from ltengine.kernels import fused
    hid, inter, qkv_n, eps = 4096, 14336, 6144, 1e-5
    shapes = ((hid, hid), (2 * inter, hid), (hid, inter), (qkv_n, hid))
    ws = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in shapes] for _ in range(layers)]
    nw = torch.rand(hid, device="cuda", dtype=torch.bfloat16) + 0.5
    nbytes = layers * sum(n * k * 2 for n, k in shapes)
    out = []
    print(f"{'layer projections':24s} {'M':>3s} {'separate kernels':>17s} {'folded':>17s}  ratio")
    for m in rows:
        o = torch.randn(m, hid, device="cuda", dtype=torch.bfloat16)
        x0 = torch.randn(m, hid, device="cuda", dtype=torch.bfloat16)

        def separate(_):
            resid = x0
            for w in ws:
                normed, resid = fused.add_rmsnorm(kcuda.skinny_linear(o, w[0]), resid, nw, eps)
                mm = kcuda.skinny_linear(fused.silu_mul(kcuda.skinny_linear(normed, w[1])), w[2])
                normed, resid = fused.add_rmsnorm(mm, resid, nw, eps)
                kcuda.skinny_linear(normed, w[3])

        def folded(_):
            resid = x0
            for w in ws:
                resid, ss, hn = kcuda.skinny_linear(o, w[0], resid=resid, next_norm=nw)
                mm = kcuda.skinny_linear(hn, w[1], x_ss=ss, eps=eps, glu=True)
                resid, ss, hn = kcuda.skinny_linear(mm, w[2], resid=resid, next_norm=nw)
                kcuda.skinny_linear(hn, w[3], x_ss=ss, eps=eps)

        res = {"separate": _graph_bandwidth(separate, [None], nbytes), "folded": _graph_bandwidth(folded, [None], nbytes)}
        row = {"m": m, **{f"{k}_pct_copy": 100 * v / bw for k, v in res.items()},
               "us_per_layer": {k: 1e6 * nbytes / v / layers for k, v in res.items()}}
        print(f"{'o, gate_up, down, qkv':24s} {m:3d} {row['us_per_layer']['separate']:6.1f} us {row['separate_pct_copy']:5.1f}% "
              f"{row['us_per_layer']['folded']:6.1f} us {row['folded_pct_copy']:5.1f}%  "
              f"{res['folded'] / res['separate']:5.2f}x", flush=True)
        out.append(row)
    del ws
    torch.cuda.empty_cache()
    return out


def main():
    if not (torch.cuda.is_available() and kcuda.has_cuda_ext()):
        sys.exit("needs a CUDA GPU and ltengine._C built with CUDA (setup.py)")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    linear_only = "--linear-only" in sys.argv  # there --stages sweeps skinny_linear's ring, else the decode's
    result = {"device": torch.cuda.get_device_name(), "copy_gbs": bw / 1e9,
              "linear": linear_table(bw, stages=linear_only and "--stages" in sys.argv), "fold": fold_table(bw)}
    if not linear_only:
        result.update(decode=decode_table(bw, "--knobs" in sys.argv, "--stages" in sys.argv),
                      other_dtypes=other_dtypes(bw), truncate=truncate_table(bw))
        if "--breakdown" in sys.argv:
            result["breakdown"] = breakdown(bw)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "kernels.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
