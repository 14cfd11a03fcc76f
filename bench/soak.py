"""Soak: many mixed-length requests through one ``engine.generate`` call under a small KV budget.

    python3 bench/soak.py            # device: 1,000 requests of 64..4096 tokens, 4 GiB pool (~3 min)
    python3 bench/soak.py --quick    # CPU: tiny random model, 100 requests of 64..1024 tokens (~2 min)

Model on CUDA: the Llama-3-8B shape cut to 4 layers, in fp32. Why fp32: check 4 wants the same greedy
tokens alone and in a batch, but a batch of another size runs other GEMM tilings, and a random model's
logits are nearly flat, so bf16 rounding alone flips argmaxes; in fp32 a flip means a bug. For the
full-size stress run ``--layers 0 --dtype bf16`` (then read check 4's first_diff with that in mind).

The budget holds only a few of the requests at once, so the call exercises admission, waiting and
finishing sequences out of order (continuous batching). Checks, each printed as PASS / FAIL:

1. no request fails (finish_reason "error"), and each one made exactly its max_new_tokens (ignore_eos);
2. the pool is back to idle after the call: ``last_stats["kv_used_after"]`` is 0, and equals what the same
   engine reports after a warm-up call on an empty pool;
3. peak KV (``last_stats["peak_kv_bytes"]``) is within the budget;
4. 20 sampled requests, each run alone on the same engine, give the same greedy tokens and the same
   lazy layers as inside the big call.

Per-request max_new_tokens (random 1..64) are passed as a list when the engine accepts one; otherwise
every request gets ``--new-max`` and the report says so. Writes ``--json`` (default ``$OUT/soak.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
from throughput import CONFIG_8B, QUICK_OVERRIDES, IdsTokenizer, build_model, load_config  # noqa: E402

from ltengine import Engine, LazyConfig  # noqa: E402
from ltengine.config import format_bytes, parse_bytes  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU: tiny model, 100 requests of 64..1024 tokens")
    p.add_argument("--requests", type=int, help="default 1000 (quick 100)")
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, help="default 4096 (quick 1024)")
    p.add_argument("--new-max", type=int, default=64, help="max_new_tokens drawn from 1..new-max")
    p.add_argument("--kv-budget", help="default 4GiB (quick 4MiB)")
    p.add_argument("--fraction", type=float, default=0.5, help="lazy fraction (0 = full attention)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, help="default 1020 (quick 60)")
    p.add_argument("--runner", default="auto")
    p.add_argument("--max-prefill-tokens", type=int, help="engine's batched-prefill cap (default: the engine's; 1 = off)")
    p.add_argument("--samples", type=int, default=20, help="requests re-run one at a time")
    p.add_argument("--config", default=CONFIG_8B)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default fp32")
    p.add_argument("--layers", type=int, help="cut the config to this many layers; 0 = all (default 4 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    return p.parse_args(argv)


def generate(engine: Engine, prompts, new_tokens: list[int]):
    """One call with per-request max_new_tokens; falls back to one value when the engine takes only an int.
    Returns (outputs, the max_new_tokens each request was given, whether the list was accepted)."""
    try:
        return engine.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True), new_tokens, True
    except (ValueError, TypeError) as e:
        if "max_new_tokens" not in str(e):
            raise
    n = max(new_tokens)
    return engine.generate(prompts, max_new_tokens=n, ignore_eos=True), [n] * len(prompts), False


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.quick:
        torch.set_num_threads(1)  # steady on a shared CPU (OpenMP spin-waits otherwise)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype or "fp32"]
    layers = a.layers if a.layers is not None else (4 if device.type == "cuda" and not a.quick else 0)
    n_req = a.requests or (100 if a.quick else 1000)
    max_len = a.max_len or (1024 if a.quick else 4096)
    budget = parse_bytes(a.kv_budget or ("4MiB" if a.quick else "4GiB"))
    lazy = LazyConfig(fraction=a.fraction, sink=a.sink, window=a.window or (60 if a.quick else 1020)) \
        if a.fraction > 0 else None
    json_path = a.json or (os.path.join(os.environ["OUT"], "soak.json") if os.environ.get("OUT") else None)

    overrides = dict(QUICK_OVERRIDES) if a.quick else {}
    if layers:
        overrides["num_hidden_layers"] = layers
    config = load_config(a.config, **overrides)
    model, init_s = build_model(config, device, dtype, seed=a.seed)
    rng = random.Random(a.seed)
    lengths = [rng.randint(a.min_len, max_len) for _ in range(n_req)]
    new_tokens = [rng.randint(1, a.new_max) for _ in range(n_req)]
    g = torch.Generator().manual_seed(a.seed)
    prompts = [torch.randint(0, config.vocab_size, (t,), generator=g).tolist() for t in lengths]
    print(f"soak: {n_req} requests, prompts {min(lengths)}..{max(lengths)} tokens (sum {sum(lengths)}), "
          f"max_new_tokens 1..{a.new_max}, KV budget {format_bytes(budget)}, lazy {lazy}, runner {a.runner}, "
          f"{config.num_hidden_layers} layers, {device} {dtype} (model built in {init_s:.1f} s)", flush=True)

    engine = Engine(model, IdsTokenizer(), lazy=lazy, kv_budget=budget, runner=a.runner, progress=False,
                    max_prefill_tokens=a.max_prefill_tokens)
    engine.generate([prompts[0][:64]], max_new_tokens=2, ignore_eos=True)  # warm-up; an idle pool's free space
    idle_free = engine.last_stats.get("kv_used_after")

    t0 = time.perf_counter()
    outs, given, per_request = generate(engine, prompts, new_tokens)
    wall = time.perf_counter() - t0
    stats = dict(engine.last_stats)
    print(f"one call: {wall:.1f} s; last_stats: " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()), flush=True)

    checks: list[tuple[str, bool, str]] = []
    errors = [(i, o.error) for i, o in enumerate(outs) if o.finish_reason == "error"]
    checks.append(("no request failed", not errors, f"{len(errors)} failed" + (f", first: {errors[0]}" if errors else "")))
    short = [i for i, (o, n) in enumerate(zip(outs, given)) if o.finish_reason != "error" and len(o.token_ids) != n]
    checks.append(("every request made its max_new_tokens", not short,
                   f"{len(short)} wrong" + (f", e.g. #{short[0]}: {len(outs[short[0]].token_ids)} of {given[short[0]]}"
                                            if short else "")))
    free_after = stats.get("kv_used_after")
    checks.append(("pool back to idle after the call", free_after is not None and free_after == idle_free,
                   f"kv_used_after {free_after}, idle {idle_free} (pool_bytes {stats.get('pool_bytes')})"))
    peak = stats.get("peak_kv_bytes")
    checks.append(("peak KV within the budget", peak is not None and peak <= budget,
                   f"peak {format_bytes(peak or 0)} of {format_bytes(budget)}"))
    running = stats.get("max_running")
    batches = [o.stats.prefill_batch for o in outs if o.finish_reason != "error"]
    print(f"prefill: {stats.get('prefill_s', 0):.1f} s in {sum(1 / b for b in batches):.0f} batches "
          f"(max_prefill_tokens {engine.max_prefill_tokens}; largest {max(batches, default=0)} prompts)", flush=True)
    print(f"continuous batching: at most {running} of {n_req} requests decoded at once", flush=True)

    idx = sorted(random.Random(a.seed + 1).sample(range(n_req), min(a.samples, n_req)))
    mismatches = []
    t1 = time.perf_counter()
    for i in idx:
        alone = engine.generate([prompts[i]], max_new_tokens=given[i], ignore_eos=True)[0]
        if alone.token_ids != outs[i].token_ids or alone.lazy_layers != outs[i].lazy_layers:
            first = next((k for k, (x, y) in enumerate(zip(alone.token_ids, outs[i].token_ids)) if x != y),
                         min(len(alone.token_ids), len(outs[i].token_ids)))
            mismatches.append(dict(request=i, prompt_tokens=lengths[i], first_diff=first,
                                   lazy_same=alone.lazy_layers == outs[i].lazy_layers))
    checks.append((f"{len(idx)} sampled requests equal one-at-a-time runs", not mismatches,
                   f"{len(mismatches)} differ" + (f", first: {mismatches[0]}" if mismatches else "")
                   + f" ({time.perf_counter() - t1:.1f} s)"))

    notes = []
    if not per_request:
        notes.append(f"the engine takes one max_new_tokens per call: every request got {given[0]} "
                     "(per-request lengths need generate(max_new_tokens=[...]))")
    print()
    for name, ok, detail in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    for n in notes:
        print(f"  note: {n}")
    passed = all(ok for _, ok, _ in checks)
    print(f"\nsoak {'PASSED' if passed else 'FAILED'}: {n_req} requests, "
          f"{sum(len(o.token_ids) for o in outs)} tokens generated in {wall:.1f} s")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(dict(requests=n_req, budget=budget, wall_s=wall, last_stats=stats, idle_free=idle_free,
                           per_request_max_new=per_request, checks=[dict(check=c, ok=o, detail=d) for c, o, d in checks],
                           mismatches=mismatches, notes=notes, device=str(device), dtype=str(dtype)), f, indent=1,
                      default=str)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
