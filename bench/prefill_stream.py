"""Streaming prefill vs standard prefill, 50% lazy from a fixed layer list, Llama-3-8B-shaped random model.

    python3 bench/prefill_stream.py                  # H200: ~3 min (bench/gpu_stream.sh runs it)
    python3 bench/prefill_stream.py --quick          # CPU smoke: the 8B config shrunk, 512 / 1024 tokens

The model is bench/throughput.py's (``build_model``: random bf16 weights, transformers' own init;
``max_position_embeddings`` raised by 256 so that a 131,072-token prompt plus its one sampled token fits
the context check). Lazy layers: the odd ones (16 of 32), ``LazyConfig(policy=odd, sink=4, window=1020,
probe=64, score="ratio")``; "standard" is that config (every layer attends causally over the whole
prompt in prefill, the lazy ones are stored straight as sink + window), "streaming" the same with
``streaming_prefill=True``. Both score every layer (the fixed policy ignores the scores, but the
engine computes them: the scoring overhead is in both times).

1. Kernels, one layer's attention at each prompt length (q ``[1, T, 32, 128]``, k/v ``[1, T, 8, 128]``
   bf16): the standard path (``runners.base.prefill_attention``: flash-attn if installed, else SDPA),
   the backend's ``prefill_sink_window`` (Triton on CUDA), its PyTorch twin (chunked SDPA) and, with
   ``--flex``, FlexAttention with a sink + window block mask; median of ``--reps`` CUDA-event timings,
   and the Triton output's max error against the twin.
2. Engine: one prompt of each length through ``Engine.generate(max_new_tokens=1)`` per mode, after a
   4k-token warm-up prompt on the same engine (Triton compiles); ``out.stats.prefill_s`` (host clock,
   synchronized: embedding, every layer, scoring, KV stores, logits), best of ``--reps``; peak KV
   (``out.stats.peak_kv_bytes``) against the ``--kv-budget`` pool, and peak GPU memory
   (``torch.cuda.max_memory_allocated`` over the timed calls).

Prints everything and writes ``$OUT/prefill_stream.json`` and ``$OUT/prefill_stream.md`` (a RESULTS.md
snippet). Targets (issue 14): streaming >= 1.4x faster at 128k, >= 1.15x at 32k.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
from throughput import (CONFIG_8B, QUICK_OVERRIDES, IdsTokenizer, build_model, free_memory,  # noqa: E402
                        load_config, random_prompts)

from ltengine import Engine, LazyConfig  # noqa: E402
from ltengine.config import format_bytes  # noqa: E402
from ltengine.kernels import get_backend  # noqa: E402
from ltengine.kernels.prefill import prefill_sink_window_ref  # noqa: E402
from ltengine.runners.base import prefill_attention  # noqa: E402

TARGETS = {131072: 1.4, 32768: 1.15}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, reps: int, dev) -> float:
    """Median seconds of ``reps`` calls after one warm-up call (CUDA events on the GPU)."""
    fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flex_fn(t: int, sink: int, window: int, dev):
    """FlexAttention with a sink + window block mask (compiled once per shape), or None if unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None

    def mask(b, h, i, j):
        return (j <= i) & ((j < sink) | (j > i - window))

    # _compile: build the block mask without materializing T x T booleans (17 GB at 128k)
    block = create_block_mask(mask, B=None, H=None, Q_LEN=t, KV_LEN=t, device=dev, _compile=True)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v, scale: compiled(q, k, v, block_mask=block, scale=scale, enable_gqa=True)


def kernels(args, cfg, dev, dtype, engine_backend, lengths) -> list[dict]:
    rows = []
    h_q, h_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    scale = d ** -0.5
    for t in lengths:
        g = torch.Generator(device=dev).manual_seed(t)
        q, k, v = (torch.randn(1, t, h, d, generator=g, device=dev, dtype=dtype) for h in (h_q, h_kv, h_kv))
        rec = dict(tokens=t, impl=engine_backend.impl_for("prefill_sink_window", dtype, d))
        rec["causal_s"] = timed(lambda: prefill_attention(q, k, v, scale), args.reps, dev)
        rec["sink_window_s"] = timed(lambda: engine_backend.prefill_sink_window(q, k, v, args.sink, args.window, scale),
                                     args.reps, dev)
        rec["twin_s"] = timed(lambda: prefill_sink_window_ref(q, k, v, args.sink, args.window, scale), 1, dev)
        out = engine_backend.prefill_sink_window(q, k, v, args.sink, args.window, scale)
        ref = prefill_sink_window_ref(q, k, v, args.sink, args.window, scale)
        rec["max_err_vs_twin"] = float((out.float() - ref.float()).abs().max())
        if args.flex and dev.type == "cuda":
            try:
                fx = flex_fn(t, args.sink, args.window, dev)
                qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                rec["flex_s"] = timed(lambda: fx(qt, kt, vt, scale), args.reps, dev) if fx else None
            except Exception as e:  # noqa: BLE001
                rec["flex_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print("kernel", json.dumps(rec), flush=True)
        rows.append(rec)
        del q, k, v, out, ref
        free_memory()
    return rows


def engine_runs(args, model, cfg, dev, lengths) -> list[dict]:
    odd = tuple(range(1, cfg.num_hidden_layers, 2))
    base = LazyConfig(policy=odd, sink=args.sink, window=args.window, probe=args.probe, score="ratio")
    modes = [("standard", base), ("streaming", LazyConfig(policy=odd, sink=args.sink, window=args.window,
                                                          probe=args.probe, score="ratio", streaming_prefill=True))]
    rows = []
    for t in lengths:
        prompt = random_prompts(1, t, cfg.vocab_size, seed=t)[0]
        warm = random_prompts(1, min(4096, t), cfg.vocab_size, seed=1)[0]
        for name, lazy in modes:
            rec = dict(tokens=t, mode=name, lazy_layers=len(odd), kv_budget=args.kv_budget_bytes)
            engine = None
            try:
                engine = Engine(model, IdsTokenizer(), lazy=lazy, kv_budget=args.kv_budget_bytes)
                engine.generate(warm, max_new_tokens=1, ignore_eos=True)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                times = []
                for _ in range(args.reps_engine if t < 100_000 else max(1, args.reps_engine - 1)):
                    out = engine.generate(prompt, max_new_tokens=1, ignore_eos=True)
                    if out.finish_reason == "error":
                        raise RuntimeError(f"prefill failed: {getattr(out, 'error', None)}")
                    times.append(out.stats.prefill_s)
                rec.update(status="ok", prefill_s=min(times), prefill_all_s=times, peak_kv_bytes=out.stats.peak_kv_bytes,
                           lazy_ok=out.lazy_layers == list(odd),
                           peak_gpu_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None)
            except Exception as e:  # noqa: BLE001
                rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
            print("engine", json.dumps(rec), flush=True)
            rows.append(rec)
            del engine
            free_memory()
    return rows


def report(info, krows, erows) -> str:
    lines = [f"### Streaming prefill (issue 14), {info['device']}, {info['dtype']}, Llama-3-8B-shaped random model, "
             f"50% lazy (odd layers), sink {info['sink']}, window {info['window']}, probe {info['probe']}",
             "", "`python3 bench/prefill_stream.py` (bench/gpu_stream.sh); commit " + str(info.get("commit")), "",
             "| prompt | standard prefill s | streaming prefill s | speed-up | target | peak KV / budget | peak GPU mem (std / stream) | lazy layers as listed |",
             "|---|---|---|---|---|---|---|---|"]
    for t in sorted({r["tokens"] for r in erows}):
        std = next((r for r in erows if r["tokens"] == t and r["mode"] == "standard"), {})
        st = next((r for r in erows if r["tokens"] == t and r["mode"] == "streaming"), {})
        if std.get("status") != "ok" or st.get("status") != "ok":
            lines.append(f"| {t} | {std.get('prefill_s', std.get('error'))} | {st.get('prefill_s', st.get('error'))} "
                         f"| - | {TARGETS.get(t, '-')} | | | |")
            continue
        sp = std["prefill_s"] / st["prefill_s"]
        tgt = TARGETS.get(t)
        verdict = "-" if tgt is None else f">= {tgt}x: {'met' if sp >= tgt else 'MISSED'}"
        mem = " / ".join(format_bytes(r["peak_gpu_bytes"]) if r.get("peak_gpu_bytes") else "-" for r in (std, st))
        lines.append(f"| {t:,} | {std['prefill_s']:.3f} | {st['prefill_s']:.3f} | {sp:.2f}x | {verdict} | "
                     f"{format_bytes(st['peak_kv_bytes'])} / {format_bytes(st['kv_budget']) if st['kv_budget'] else 'none'} | {mem} | "
                     f"{std['lazy_ok'] and st['lazy_ok']} |")
    lines += ["", f"One layer's attention (q [1, T, {info['heads']}], k/v [1, T, {info['kv_heads']}]), median of "
              "CUDA-event timings:", "",
              "| T | causal (prefill_attention) ms | sink + window (backend: impl) ms | PyTorch twin ms | FlexAttention ms | max err vs twin |",
              "|---|---|---|---|---|---|"]
    for r in krows:
        flex = f"{r['flex_s'] * 1e3:.2f}" if r.get("flex_s") else r.get("flex_error", "-")
        lines.append(f"| {r['tokens']:,} | {r['causal_s'] * 1e3:.2f} | {r['sink_window_s'] * 1e3:.2f} ({r['impl']}) | "
                     f"{r['twin_s'] * 1e3:.2f} | {flex} | {r['max_err_vs_twin']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--lengths", help="comma list (default 32768,131072; quick 512,1024)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, help="default 1020 (quick 60)")
    p.add_argument("--probe", type=int, default=64)
    p.add_argument("--kv-budget", default=None, help="default 24GiB (quick: none)")
    p.add_argument("--reps", type=int, default=5, help="kernel timings")
    p.add_argument("--reps-engine", type=int, default=2, help="timed prefills per mode (128k: one fewer, >= 1)")
    p.add_argument("--flex", action="store_true", help="also time FlexAttention (torch.compile, ~1 min)")
    p.add_argument("--skip-kernels", action="store_true")
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    lengths = [int(x) for x in (args.lengths or ("512,1024" if args.quick else "32768,131072")).split(",")]
    args.window = args.window or (60 if args.quick else 1020)
    from ltengine.config import parse_bytes
    args.kv_budget_bytes = parse_bytes(args.kv_budget or (None if args.quick else "24GiB"))
    overrides = dict(QUICK_OVERRIDES) if args.quick else {}
    overrides["max_position_embeddings"] = max(lengths) + 256
    cfg = load_config(CONFIG_8B, **overrides)
    model, build_s = build_model(cfg, dev, dtype)
    commit = os.popen("git log -1 --format=%h 2>/dev/null").read().strip() or None
    info = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", dtype=str(dtype).split(".")[-1],
                sink=args.sink, window=args.window, probe=args.probe, commit=commit, build_s=round(build_s, 1),
                torch=torch.__version__, heads=f"{cfg.num_attention_heads}, {cfg.head_dim}",
                kv_heads=f"{cfg.num_key_value_heads}, {cfg.head_dim}")
    print("info", json.dumps(info), flush=True)
    backend = get_backend(dev)
    print("prefill_sink_window:", backend.describe()["prefill_sink_window"], flush=True)
    out = os.environ.get("OUT")

    def write(krows, erows):
        md = report(info, krows, erows)
        print("\n" + md, flush=True)
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "prefill_stream.json"), "w") as f:
                json.dump(dict(info=info, kernels=krows, engine=erows), f, indent=1)
            with open(os.path.join(out, "prefill_stream.md"), "w") as f:
                f.write(md)

    erows = engine_runs(args, model, cfg, dev, lengths)  # the targets first: a killed run keeps them
    write([], erows)
    if not args.skip_kernels:
        write(kernels(args, cfg, dev, dtype, backend, lengths), erows)

if __name__ == "__main__":
    main()
