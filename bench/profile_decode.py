"""Where a decode step's time goes at the throughput benchmark's budget point (device only).

    python3 bench/profile_decode.py [--batch-full 9] [--batch-lazy 19] [--prompt 32768] [--steps 16]
                                    [--linear auto|unfused|torch]

Llama-3-8B-shaped random model (bench/llama3_8b_config.json), bf16. For full mode and 50% lazy it
prefills the batch through ``Engine.generate`` with a 40 GiB pool, then profiles ``--steps`` decode
steps (CUDA graphs off, so each kernel is listed) and prints GPU time per step by kernel group:
GEMMs, paged attention (split + combine), fused elementwise, other, next to the bandwidth floor of
the step (weights + KV read over measured copy bandwidth). ``--linear``: the projections as the engine
runs them (auto: the CUDA kernel with the norms, residual adds and SiLU folded in, at <= 8 rows), the CUDA
kernel with those as separate kernels (unfused), or F.linear (torch). Kernels launched with programmatic
dependent launch start while the previous one finishes, and the profiler counts that wait as theirs: run
with ``LTENGINE_PDL=0`` for a per-kernel breakdown (bench/throughput.py gives the end-to-end rate).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
from throughput import IdsTokenizer, build_model, copy_bandwidth, decode_weight_bytes, load_config, random_prompts  # noqa: E402

from ltengine import Engine, LazyConfig  # noqa: E402
from ltengine.lazy import make_policy  # noqa: E402
from ltengine.runners import PrefillRequest  # noqa: E402


def group(name: str) -> str:
    n = name.lower()
    if "paged_chunk" in n or "paged_mma" in n or "paged_simt" in n or "combine" in n:  # Triton / csrc kernels
        return "attention"
    if "gemm" in n or "gemv" in n or "cutlass" in n or "sm90" in n or "nvjet" in n or "splitk" in n:
        return "gemm"
    if "rmsnorm" in n or "rope" in n or "silu" in n:
        return "fused elementwise"
    return "other"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-full", type=int, default=9)
    p.add_argument("--batch-lazy", type=int, default=19)
    p.add_argument("--prompt", type=int, default=32768)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--linear", choices=("auto", "unfused", "torch"), default="auto")
    a = p.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev, 2 << 30)
    config = load_config()
    model, _ = build_model(config, dev, torch.bfloat16)
    weights = decode_weight_bytes(model)
    per_tl = 2 * config.num_key_value_heads * config.head_dim * 2
    for mode, batch in (("full", a.batch_full), ("lazy", a.batch_lazy)):
        lazy = LazyConfig(fraction=0.5, sink=4, window=1020) if mode == "lazy" else None
        eng = Engine(model, IdsTokenizer(), lazy=lazy, kv_budget="40GiB", progress=False)
        prompts = random_prompts(batch, a.prompt, config.vocab_size, 11)
        eng.generate(prompts[:1], max_new_tokens=2, ignore_eos=True)  # builds the pool and the runner
        runner = eng.runner
        runner.graphs = False  # every kernel shows in the profile
        eng.backend.fold_linear = a.linear == "auto"
        if a.linear == "torch":
            eng.backend.drop("linear", "cuda")
        steps, L = a.steps, config.num_hidden_layers
        n_lazy = lazy.num_lazy(L) if lazy else 0
        seqs = []  # drive the runner directly: one prefill per prompt, then decode steps of the batch
        cfg = lazy or LazyConfig(fraction=0.0)
        for ids in prompts:
            req = PrefillRequest(torch.tensor(ids, device=dev), make_policy(cfg, L, L - n_lazy), cfg.sink, cfg.window,
                                 cfg.probe, eng.backend.scorer(cfg.score) if lazy else None, steps + 4)
            seqs.append(runner.prefill([req])[0].handle)
        kv = per_tl * batch * ((L - n_lazy) * (a.prompt + 1) + n_lazy * min(a.prompt + 1, 1024))
        floor_ms = 1e3 * (weights + kv) / bw
        times = defaultdict(float)
        toks = torch.zeros(batch, dtype=torch.long, device=dev)
        pos = torch.full((batch,), a.prompt, dtype=torch.long, device=dev)
        runner.decode(seqs, toks, pos)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(steps):
                runner.decode(seqs, toks, pos + 1 + i)
            torch.cuda.synchronize()
        kernels = [(getattr(ev, "self_device_time_total", 0) / 1e3 / steps, ev.key) for ev in prof.key_averages()]
        kernels = [(t, k) for t, k in kernels if t > 0]
        for t, k in kernels:
            times[group(k)] += t
        top = sorted(kernels, reverse=True)[:8]
        for s in seqs:
            runner.release(s)
        total = sum(times.values())
        print(f"\n{mode}: batch {batch} x {a.prompt}, {n_lazy} lazy layers; floor {floor_ms:.2f} ms/step; "
              f"GPU kernels {total:.2f} ms/step ({100 * floor_ms / total:.0f}% of floor)")
        for g, t in sorted(times.items(), key=lambda x: -x[1]):
            print(f"  {g:18s} {t:7.2f} ms")
        for t, k in top:
            print(f"    {t:7.3f} ms  {k[:110]}")
        del eng, runner, seqs
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
