"""Quick device probe of the paged path: kernel GB/s vs copy bandwidth, engine decode tok/s at 1x8k.

    python3 bench/paged_probe.py             # on a CUDA machine
    python3 bench/paged_probe.py --schedule  # the balanced schedule's knobs at the engine's decode shapes

The CUDA-vs-Triton table of the paged kernels (and truncation) is ``bench/kernels.py``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltengine import Engine, LazyConfig  # noqa: E402
from ltengine.kernels import get_backend  # noqa: E402
from ltengine.kernels.paged import paged_decode_triton  # noqa: E402


def copy_bandwidth() -> float:
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        y.copy_(x)
    e.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (s.elapsed_time(e) / 1e3)


def paged_case(b, tokens, copies, bucket=None, width=None, bs=64, h_kv=8, h_q=32, d=128, short=None,
               dtype=torch.bfloat16):
    """A random bf16 pool and ``copies`` layers of tables: ``b`` sequences of ``tokens`` keys on blocks
    placed at random, padded to ``bucket`` rows (pad rows: 0 keys, the scratch block 0), tables ``width``
    blocks wide, as the engine's CUDA-graph buckets run them; ``short``: every other row attends only
    that many keys (a layer that is sink + window in half the sequences). Returns (q, k, v, tables, n)."""
    blocks = -(-tokens // bs)
    bucket, width = bucket or b, max(width or blocks, blocks)
    nb = b * blocks * copies + 1
    k = torch.randn(nb, bs, h_kv, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    tables = torch.zeros(copies, bucket, width, dtype=torch.int32, device="cuda")
    tables[:, :b, :blocks] = (torch.randperm(nb - 1, device="cuda")[: copies * b * blocks] + 1).int().view(copies, b, blocks)
    n = torch.zeros(bucket, dtype=torch.int32, device="cuda")
    n[:b] = tokens
    if short:
        n[1:b:2] = short
    q = torch.randn(bucket, h_q, d, device="cuda", dtype=dtype)
    return q, k, v, tables, n


def kernel_point(name, b, tokens, layers, bw, h_kv=8, d=128, fn=None, **knobs):
    """GB/s of ``layers`` paged decode calls launched from Python (mean of 5 passes); ``fn``: the
    implementation (default: the backend's choice for bf16, D 128)."""
    fn = fn or get_backend("cuda").paged_decode
    q, k, v, tables, n = paged_case(b, tokens, layers, h_kv=h_kv, d=d)
    for i in range(layers):
        fn(q, k, v, tables[i], n, 0.1, **knobs)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 5
    s.record()
    for _ in range(reps):
        for i in range(layers):
            fn(q, k, v, tables[i], n, 0.1, **knobs)
    e.record()
    torch.cuda.synchronize()
    sec = s.elapsed_time(e) / 1e3 / reps
    read = 2 * int(n.sum()) * h_kv * d * 2 * layers
    name = f"{name} {knobs}" if knobs else name
    print(f"{name:60s} KV read {read / 1e9:6.2f} GB  {sec * 1e3:7.2f} ms  {read / sec / 1e9:7.0f} GB/s "
          f"= {100 * read / sec / bw:5.1f}% of copy")
    del k, v
    torch.cuda.empty_cache()
    return read / sec


def graph_point(b, tokens, bucket, width, fn=paged_decode_triton, layers=32, bs=64, h_kv=8, h_q=32, d=128, reps=5,
                short=None, dtype=torch.bfloat16, fp8=False, **knobs):
    """GB/s of ``layers`` paged decode calls of ``fn`` replayed from one CUDA graph (no launch overhead),
    ``b`` real rows of ``tokens`` keys padded to ``bucket`` rows (every other one of ``short`` keys when
    set); distinct blocks per layer while they fit 8 GB (so small caches are not re-read from L2), else
    layers share one set of blocks. ``fp8``: the pools are float8_e4m3fn with random per-row fp32
    scales (bytes read count the scales). ``knobs`` go to ``fn``."""
    row = d * (1 if fp8 else torch.finfo(dtype).bits // 8) + (4 if fp8 else 0)  # bytes of one K (or V) row
    per_layer = 2 * b * -(-tokens // bs) * bs * h_kv * row
    copies = max(1, min(layers, int(8e9 // per_layer)))
    q, k, v, tables, n = paged_case(b, tokens, copies, bucket, width, bs, h_kv, h_q, d, short, dtype)
    scales = ()
    if fp8:
        k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
        scales = tuple(torch.rand(k.shape[:3], device="cuda") + 0.5 for _ in range(2))
    fn(q, k, v, tables[0], n, 0.1, *scales, **knobs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            fn(q, k, v, tables[i % copies], n, 0.1, *scales, **knobs)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    read = 2 * int(n.sum()) * h_kv * row * layers
    del graph, k, v, scales
    torch.cuda.empty_cache()
    return read / sorted(times)[len(times) // 2]


def schedule_sweep(bw):
    """The balanced schedule's knobs (target programs per SM) for both implementations at the engine's
    decode shapes in CUDA graphs, including "mixed" layers where every other row is sink + window (1024
    keys), as in a 50% lazy batch; each shape twice (block placement is random)."""
    from ltengine.kernels import cuda as kcuda

    impls = {"triton": paged_decode_triton}
    if kcuda.has_cuda_ext():
        impls["cuda"] = kcuda.paged_decode
    shapes = [("full 9 in bucket 16, T=33k", 9, 33024, 16, None, None),
              ("mixed 19 in bucket 24, T=33k / 1024", 19, 33024, 24, None, 1024),
              ("full 8x8k", 8, 8448, 8, None, None), ("full 1x8k", 1, 8448, 1, None, None),
              ("full 1x32k", 1, 33024, 1, None, None), ("lazy 64, W=1024", 64, 1024, 64, 2048, None)]
    for name, b, t, bucket, width, short in shapes:
        for _ in range(2):
            res = [(f"{impl} {per}/SM", graph_point(b, t, bucket, width, fn, short=short, programs=per * 132))
                   for impl, fn in impls.items() for per in (8, 16, 32)]
            print(f"{name:38s} " + "  ".join(f"{k}: {100 * g / bw:5.1f}%" for k, g in res), flush=True)


def main():
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    if "--schedule" in sys.argv:
        schedule_sweep(bw)
        return
    kernel_point("sink+window B=64 W=1024", 64, 1024, 32, bw)
    kernel_point("full B=8 T=32k", 8, 32768, 32, bw)
    kernel_point("full B=1 T=8k", 1, 8192, 32, bw)
    if "--sweep" in sys.argv:  # each setting three times: block placement in the pool is random
        for knobs in ({}, {"block_n": 32, "num_stages": 3}, {"block_n": 32, "num_stages": 4},
                      {"block_n": 64, "num_stages": 3, "num_warps": 8}):
            for point in (("sink+window B=64 W=1024", 64, 1024), ("full B=8 T=32k", 8, 32768)):
                for _ in range(3):
                    kernel_point(*point, 32, bw, fn=paged_decode_triton, **knobs)
    import transformers as tf

    cfg = json.loads((Path(__file__).parent / "llama3_8b_config.json").read_text())
    config = tf.LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    t0 = time.time()
    torch.manual_seed(0)
    with torch.device("cuda"):
        config.dtype = torch.bfloat16
        model = tf.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    print(f"model built in {time.time() - t0:.1f} s, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, 128000, (8192,)).tolist()
    for name, lazy in (("full", None), ("lazy 50%", LazyConfig(fraction=0.5, window=1020))):
        eng = Engine(model, tokenizer=None, lazy=lazy, kv_budget="20GiB")
        eng.generate(ids[:512], max_new_tokens=8, ignore_eos=True)  # warm-up: compile + capture
        out = eng.generate(ids, max_new_tokens=128, ignore_eos=True)
        st = eng.last_stats
        kv = 2 * 8 * 128 * 2 * (8192 + 64) * (32 - len(out.lazy_layers)) + 2 * 8 * 128 * 2 * 1024 * len(out.lazy_layers)
        floor = (weights + kv) / bw
        print(f"engine 1x8k {name:9s} prefill {st['prefill_s']:.2f} s  decode {st['decode_tokens_per_s']:.1f} tok/s "
              f"(floor {1 / floor:.0f} tok/s, {100 * st['decode_tokens_per_s'] * floor:.0f}%)  attention={st['attention']}")


if __name__ == "__main__":
    main()
