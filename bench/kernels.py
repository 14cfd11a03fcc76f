"""Decode-attention and truncation kernels on one GPU: achieved bandwidth vs a device copy.

    python3 bench/kernels.py            (writes $OUT/kernels.json when OUT is set)

1. Copy baseline: a 2 GiB device-to-device copy, bytes read + written, median of CUDA-event timings.
2. Decode ops, each implementation on the same inputs: cuda (csrc/), triton, the PyTorch reference, and
   torch SDPA given (a) the NHD cache as a transposed [B, H_kv, T, D] view and (b) a pre-made contiguous
   [B, H_kv, T, D] copy (copy not timed); SDPA gets no mask (every slot is valid at these points) and
   enable_gqa=True. Bytes counted = K + V actually read + q + out. One timed rep runs the op over
   several distinct layer buffers (>= 1 GB in all at the large points), so L2 cannot serve it; the
   median over reps is divided by the layer count.
3. truncate_kv_: cuda vs reference, and the memory story: truncate + shrink frees the full cache, and the
   allocator reuses the freed block (memory_reserved does not grow for a new tensor of that size).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ltengine.kernels import cuda as kcuda  # noqa: E402
from ltengine.kernels import reference as kref  # noqa: E402
from ltengine.kernels import triton_decode as ktriton  # noqa: E402

DEV = "cuda"
GB = 1e9


SLEEP_CYCLES = 20_000_000  # ~10 ms of GPU spin before each timed rep


def time_ms(fn, reps: int, warmup: int = 2) -> tuple[float, float]:
    """Median and spread (max - min) of CUDA-event timings of fn(), in ms.

    A GPU spin kernel runs first so that the host enqueues the whole rep before the start event
    fires: the time is the GPU's, not the launch overhead of a cold queue."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), max(times) - min(times)


def host_us(fn, calls: int) -> float:
    """Host time to enqueue fn() (while the GPU is busy spinning), per call, in microseconds."""
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES * 5)
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def copy_bandwidth() -> float:
    n = 2 * 1024**3  # bytes
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms, spread = time_ms(lambda: dst.copy_(src), reps=30, warmup=3)
    bw = 2 * n / (ms * 1e-3) / GB
    print(f"copy: {n / 2**30:.0f} GiB, median {ms:.3f} ms (spread {spread:.3f}), {bw:.0f} GB/s (read + write)")
    del src, dst
    torch.cuda.empty_cache()
    return bw


def make_point(name, kind, batch, cap, h_kv, h_q, dim, layers, sink=0, window=0, length=None):
    """Distinct random caches per layer, every slot valid."""
    g = torch.Generator(device=DEV).manual_seed(hash(name) % 2**31)
    ks = [torch.randn(batch, cap, h_kv, dim, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(layers)]
    vs = [torch.randn(batch, cap, h_kv, dim, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(layers)]
    qs = [torch.randn(batch, h_q, dim, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(layers)]
    lengths = torch.full((batch,), length if length is not None else cap, dtype=torch.int32, device=DEV)
    kv_bytes = 2 * batch * cap * h_kv * dim * 2
    qo_bytes = 2 * batch * h_q * dim * 2
    return dict(name=name, kind=kind, batch=batch, cap=cap, h_kv=h_kv, h_q=h_q, dim=dim, layers=layers, sink=sink,
                window=window, ks=ks, vs=vs, qs=qs, lengths=lengths, bytes=kv_bytes + qo_bytes)


def decode_impls(pt):
    scale = pt["dim"] ** -0.5
    sink, window, lengths = pt["sink"], pt["window"], pt["lengths"]
    if pt["kind"] == "sink_window":
        cu = lambda q, k, v, **kw: kcuda.decode_sink_window(q, k, v, lengths, sink, window, scale, **kw)  # noqa: E731
        tr = lambda q, k, v, **kw: ktriton.decode_sink_window(q, k, v, lengths, sink, window, scale, **kw)  # noqa: E731
        rf = lambda q, k, v: kref.decode_sink_window_ref(q, k, v, lengths, sink, window, scale)  # noqa: E731
    else:
        cu = lambda q, k, v, **kw: kcuda.decode_full(q, k, v, lengths, scale, **kw)  # noqa: E731
        tr = lambda q, k, v, **kw: ktriton.decode_full(q, k, v, lengths, scale, **kw)  # noqa: E731
        rf = lambda q, k, v: kref.decode_full_ref(q, k, v, lengths, scale)  # noqa: E731

    def sdpa(q, k, v):  # k, v: [B, H_kv, T, D] (view or copy)
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale, enable_gqa=True).squeeze(2)

    out = {}
    if kcuda.has_cuda_ext():
        out["cuda"] = cu
    if ktriton.available():
        out["triton"] = tr
    out["reference"] = rf
    out["sdpa_view"] = lambda q, k, v: sdpa(q, k.transpose(1, 2), v.transpose(1, 2))
    out["sdpa_bhtd_copy"] = "copy"
    out["_sdpa"] = sdpa
    return out


def bench_point(pt, copy_bw, results, tune=False):
    impls = decode_impls(pt)
    layers = pt["layers"]
    total = pt["bytes"] * layers
    print(f"\n== {pt['name']}: {pt['kind']} B={pt['batch']} slots={pt['cap']} H_kv={pt['h_kv']} H_q={pt['h_q']} "
          f"D={pt['dim']} bf16, {layers} layers, {total / GB:.2f} GB read per rep")
    ref_out = kref.decode_full_ref(pt["qs"][0].double(), pt["ks"][0].double(), pt["vs"][0].double(), pt["lengths"],
                                   pt["dim"] ** -0.5) if pt["batch"] * pt["cap"] <= 64 * 1024 else None

    def run_all(fn, extra=None):
        ks, vs = (extra if extra is not None else (pt["ks"], pt["vs"]))
        for i in range(layers):
            fn(pt["qs"][i], ks[i], vs[i])

    for name, fn in impls.items():
        if name.startswith("_"):
            continue
        extra = None
        if fn == "copy":
            extra = ([k.transpose(1, 2).contiguous() for k in pt["ks"]], [v.transpose(1, 2).contiguous() for v in pt["vs"]])
            fn = impls["_sdpa"]
        reps = 5 if name == "reference" else 20
        try:
            out = fn(pt["qs"][0], (extra or (pt["ks"], pt["vs"]))[0][0], (extra or (pt["ks"], pt["vs"]))[1][0])
            err = None
            if ref_out is not None:
                err = ((out.double() - ref_out).norm() / ref_out.norm()).item()
            ms, spread = time_ms(lambda: run_all(fn, extra), reps=reps)
            h_us = host_us(lambda: run_all(fn, extra), layers)
        except Exception as exc:  # report, keep going
            print(f"  {name:16s} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            results.append(dict(point=pt["name"], impl=name, error=f"{type(exc).__name__}: {exc}"[:500]))
            continue
        finally:
            del extra
        per = ms / layers
        bw = pt["bytes"] / (per * 1e-3) / GB
        row = dict(point=pt["name"], impl=name, ms_per_layer=per, spread_ms=spread / layers, gbps=bw,
                   pct_copy=100 * bw / copy_bw, rel_err=err, host_us_per_call=h_us)
        results.append(row)
        print(f"  {name:16s} {per * 1e3:9.1f} us/layer  {bw:7.0f} GB/s  {100 * bw / copy_bw:5.1f}% of copy"
              f"  host {h_us:6.1f} us/call" + (f"  rel err {err:.1e}" if err is not None else ""))
        torch.cuda.empty_cache()

    if tune and kcuda.has_cuda_ext():
        sp = {}
        for ns in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
            if (ns - 1) * 64 >= pt["cap"]:
                continue
            ms, _ = time_ms(lambda: run_all(lambda q, k, v: impls["cuda"](q, k, v, num_splits=ns)), reps=10)
            sp[ns] = pt["bytes"] / (ms / layers * 1e-3) / GB
        print("  cuda num_splits -> GB/s: " + ", ".join(f"{k}:{v:.0f}" for k, v in sp.items()))
        results.append(dict(point=pt["name"], impl="cuda_splits_sweep", gbps_by_splits=sp))
    if tune and ktriton.available():
        sw = {}
        for bn, nw, ns in [(32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 8, 3), (64, 4, 4)]:
            try:
                ms, _ = time_ms(lambda: run_all(lambda q, k, v: impls["triton"](q, k, v, block_n=bn, num_warps=nw,
                                                                              num_stages=ns)), reps=10)
                sw[f"n{bn}w{nw}s{ns}"] = pt["bytes"] / (ms / layers * 1e-3) / GB
            except Exception as exc:
                sw[f"n{bn}w{nw}s{ns}"] = f"{type(exc).__name__}"
        print("  triton config -> GB/s: " + ", ".join(f"{k}:{v if isinstance(v, str) else round(v)}" for k, v in sw.items()))
        results.append(dict(point=pt["name"], impl="triton_config_sweep", gbps_by_config=sw))


def bench_truncate(results):
    print("\n== truncate_kv_ (bf16, H_kv=8, D=128, sink=4, window=1020)")
    sink, window, h_kv, dim = 4, 1020, 8, 128
    for batch, t_cap in ((1, 32768), (8, 32768)):
        k = torch.randn(batch, t_cap, h_kv, dim, device=DEV, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lengths = torch.full((batch,), t_cap - 5, dtype=torch.int32, device=DEV)
        moved = 2 * 2 * batch * window * h_kv * dim * 2  # k and v, read + write
        impls = {"reference": kref.truncate_kv_ref_}
        if kcuda.has_cuda_ext():
            impls = {"cuda": kcuda.truncate_kv_, **impls}
        for name, fn in impls.items():
            # repeated truncation of the same buffer moves the same number of bytes each time
            ms, _ = time_ms(lambda: fn(k, v, lengths, sink, window), reps=10 if name == "reference" else 50)
            print(f"  B={batch} T_cap={t_cap} {name:10s} {ms * 1e3:9.1f} us  {moved / (ms * 1e-3) / GB:7.0f} GB/s moved")
            results.append(dict(point=f"truncate B={batch} T_cap={t_cap}", impl=name, us=ms * 1e3,
                                gbps=moved / (ms * 1e-3) / GB))
        del k, v
        torch.cuda.empty_cache()

    # Memory: truncate + shrink frees the full cache; a new tensor of that size reuses the freed block.
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    a0, r0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    k = torch.randn(8, 32768, h_kv, dim, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    a1, r1 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    lengths = torch.full((8,), 30000, dtype=torch.int32, device=DEV)
    trunc = kcuda.truncate_kv_ if kcuda.has_cuda_ext() else kref.truncate_kv_ref_
    new_len = trunc(k, v, lengths, sink, window)
    ks, vs = k[:, : sink + window].clone(), v[:, : sink + window].clone()  # the shrink: keep the prefix
    shape = k.shape
    del k, v
    a2, r2 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    # the next layer's full caches, of the freed size: served from the freed blocks
    reuse = (torch.empty(shape, device=DEV, dtype=torch.bfloat16), torch.empty(shape, device=DEV, dtype=torch.bfloat16))
    a3, r3 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    mib = 2**20
    print("  memory (MiB)            allocated  reserved")
    print(f"  before                  {a0 / mib:9.0f} {r0 / mib:9.0f}")
    print(f"  full caches k, v        {a1 / mib:9.0f} {r1 / mib:9.0f}")
    print(f"  truncated + shrunk      {a2 / mib:9.0f} {r2 / mib:9.0f}   (new lengths {new_len.tolist()[:2]}...)")
    print(f"  next layer's k, v       {a3 / mib:9.0f} {r3 / mib:9.0f}   reserved grew by {(r3 - r2) / mib:.0f} MiB")
    results.append(dict(point="memory", allocated_mib=[a0 / mib, a1 / mib, a2 / mib, a3 / mib],
                        reserved_mib=[r0 / mib, r1 / mib, r2 / mib, r3 / mib]))
    del ks, vs, reuse
    torch.cuda.empty_cache()


def main():
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    info = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=getattr(ktriton.triton, "__version__", None), cuda_ext=kcuda.has_cuda_ext(),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    print(json.dumps(info))
    results: list[dict] = []
    copy_bw = copy_bandwidth()
    points = [
        ("sw_B64", dict(kind="sink_window", batch=64, cap=1024, h_kv=8, h_q=32, dim=128, layers=8, sink=4, window=1020,
                        length=5000)),
        ("full_B8_32k", dict(kind="full", batch=8, cap=32768, h_kv=8, h_q=32, dim=128, layers=4)),
        ("sw_B1", dict(kind="sink_window", batch=1, cap=1024, h_kv=8, h_q=32, dim=128, layers=32, sink=4, window=1020,
                       length=5000)),
        ("full_B1_4k", dict(kind="full", batch=1, cap=4096, h_kv=8, h_q=32, dim=128, layers=32)),
    ]
    for name, kw in points:
        pt = make_point(name, **kw)
        bench_point(pt, copy_bw, results, tune=True)
        del pt
        torch.cuda.empty_cache()
    bench_truncate(results)

    print(f"\n== summary (copy baseline {copy_bw:.0f} GB/s, {info['device']})")
    print(f"{'point':14s} {'impl':16s} {'us/layer':>10s} {'GB/s':>8s} {'% copy':>7s} {'host us':>8s}")
    for r in results:
        if "gbps" in r and "ms_per_layer" in r:
            print(f"{r['point']:14s} {r['impl']:16s} {r['ms_per_layer'] * 1e3:10.1f} {r['gbps']:8.0f} {r['pct_copy']:7.1f}"
                  f" {r['host_us_per_call']:8.1f}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "kernels.json"), "w") as f:
            json.dump(dict(info=info, copy_gbps=copy_bw, results=results), f, indent=1, default=str)


if __name__ == "__main__":
    main()
