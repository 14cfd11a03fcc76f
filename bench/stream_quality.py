"""Streaming prefill vs standard LightTransfer-Test at the same lazy layers, on the default model (CPU).

    OMP_NUM_THREADS=1 python3 bench/stream_quality.py --n 20 --length 1000 --ppl-n 3 --context 1024 --scored 128  # ~12 min, one busy core

Lazy layers come from a profile, as ``LazyConfig.from_profile`` would give them: the default model's
scoring (``score="peak"``, probe 16, sink 4, window 256) on ``--calib`` passkey prompts of their own seed,
the layers with the highest mean score at 25% and 50% lazy. Each fixed list runs twice, standard
(every layer attends fully in prefill, the paper's method: decoded from copies of one shared prefill,
``eval.harness``) and ``streaming_prefill=True`` (the listed layers attend over sink + window in
prefill too: its own prefill through the engine). Full attention is a row.

- passkey: ``--n`` prompts of ``--length`` tokens (key at a random depth), 8 greedy tokens through
  ``Engine.generate``; accuracy with a 95% Wilson interval.
- perplexity: ``--ppl-n`` novel segments, ``--context`` tokens prefilled through the engine's runner,
  then ``--scored`` tokens teacher-forced through its caches (``eval.harness.teacher_forced_nll``);
  ppl with a 95% block-bootstrap interval, and the paired ratio to full attention and to the standard
  prefill of the same layers (same tokens).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ltengine import Engine, LazyConfig  # noqa: E402
from ltengine.engine import DEFAULT_MODEL_LAZY  # noqa: E402
from ltengine.eval.harness import greedy, shared_prefill, teacher_forced_nll  # noqa: E402
from ltengine.eval.stats import block_bootstrap_ppl, wilson  # noqa: E402
from ltengine.eval.tasks import passkey_sample, ppl_segments  # noqa: E402
from ltengine.lazy import make_policy  # noqa: E402
from ltengine.runners import PrefillRequest  # noqa: E402


def profile_layers(scores: list[list[float]], fraction: float) -> tuple[int, ...]:
    """The ``round(fraction * L)`` layers with the highest mean score over the calibration prompts."""
    n_layers = len(scores[0])
    mean = [sum(s[i] for s in scores) / len(scores) for i in range(n_layers)]
    return tuple(sorted(sorted(range(n_layers), key=lambda i: -mean[i])[:int(round(fraction * n_layers))]))


def nll_of(engine: Engine, seg: list[int], context: int, lazy: LazyConfig | None) -> torch.Tensor:
    a, n = engine.adapter, engine.num_layers
    cfg = lazy or LazyConfig(fraction=0.0)
    n_full = n - cfg.num_lazy(n) if cfg.enabled else n
    req = PrefillRequest(torch.tensor(seg[:context]), make_policy(cfg, n, n_full), cfg.sink, cfg.window, cfg.probe,
                         engine.backend.scorer(cfg.score) if cfg.enabled else None, len(seg) - context)
    res, = engine.runner.prefill([req])
    return teacher_forced_nll(a, engine.backend, res.handle, res.logits, seg[context:], context)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--length", type=int, default=1500)
    p.add_argument("--calib", type=int, default=3)
    p.add_argument("--ppl-n", type=int, default=4)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--scored", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(None)
    tok, base = engine.tokenizer, DEFAULT_MODEL_LAZY
    a, backend = engine.adapter, engine.backend
    calib = [passkey_sample(tok, args.length, random.Random(10_000 + i)).ids for i in range(args.calib)]
    scores = []
    for ids in calib:
        sp = shared_prefill(a, ids, base.probe)
        scores.append(sp.ratios(base.sink, base.window, base.probe, base.score))
        sp.release()
    configs: list[tuple[str, LazyConfig | None, str | None]] = [("full", None, None)]
    for fraction in (0.25, 0.5):
        layers = profile_layers(scores, fraction)
        print(f"profile {fraction:.0%}: layers {list(layers)}", flush=True)
        fixed = LazyConfig(policy=layers, sink=base.sink, window=base.window, probe=base.probe, score=base.score)
        name = f"fixed {fraction:.0%}"
        configs += [(f"{name} standard", fixed, None),
                    (f"{name} streaming", replace(fixed, streaming_prefill=True), f"{name} standard")]

    def standard(lazy):  # no streaming prefill: decoded from copies of one shared prefill
        return lazy is None or not lazy.streaming_prefill

    rng = random.Random(args.seed)
    samples = [passkey_sample(tok, args.length, rng) for _ in range(args.n)]
    correct = {name: 0 for name, _, _ in configs}
    for i, s in enumerate(samples):
        sp = shared_prefill(a, s.ids, base.probe)
        for name, lazy, _ in configs:
            if standard(lazy):
                cache = sp.build_cache(lazy.policy if lazy else [], base.sink, base.window, len(s.ids) + 8, backend)
                text = tok.decode(greedy(a, backend, [cache], sp.logits, len(s.ids), 8, engine.eos_ids)[0],
                                  skip_special_tokens=True)
            else:
                text = engine.generate(s.ids, max_new_tokens=8, lazy=lazy).text
            correct[name] += s.answer in text
        sp.release()
        print(f"passkey {i + 1}/{len(samples)} {time.perf_counter() - t0:.0f}s "
              + " ".join(f"{c}" for c in correct.values()), flush=True)

    segs = ppl_segments(tok, args.context, args.scored, args.ppl_n, seed=args.seed) if args.ppl_n else []
    nll = {name: [] for name, _, _ in configs}
    for i, seg in enumerate(segs):
        sp = shared_prefill(a, seg[:args.context], base.probe)
        for name, lazy, _ in configs:
            if standard(lazy):
                cache = sp.build_cache(lazy.policy if lazy else [], base.sink, base.window, len(seg), backend)
                nll[name].append(teacher_forced_nll(a, backend, cache, sp.logits, seg[args.context:], args.context))
            else:
                nll[name].append(nll_of(engine, seg, args.context, lazy))
        sp.release()
        print(f"ppl segment {i + 1}/{len(segs)} {time.perf_counter() - t0:.0f}s", flush=True)

    print(f"\n### Streaming prefill vs standard (SmolLM2-135M-Instruct fp32, CPU, sink {base.sink}, window "
          f"{base.window}, score {base.score}, probe {base.probe}; passkey N = {args.n} at {args.length} tokens; "
          f"ppl: {args.ppl_n} segments x {args.scored} scored tokens after {args.context})\n")
    print("| config | lazy layers | passkey acc [95% CI] | ppl [95% CI] | ppl / full [95% CI] | ppl / standard [95% CI] |")
    print("|---|---|---|---|---|---|")
    for name, lazy, pair in configs:
        lo, hi = wilson(correct[name], args.n)
        ppl, plo, phi = block_bootstrap_ppl(nll[name]) if segs else (float("nan"),) * 3
        ratio = "1" if name == "full" or not segs else "%.4f [%.4f, %.4f]" % block_bootstrap_ppl(
            [a - b for a, b in zip(nll[name], nll["full"])])
        vs = "" if pair is None or not segs else "%.4f [%.4f, %.4f]" % block_bootstrap_ppl(
            [a - b for a, b in zip(nll[name], nll[pair])])
        mean_lazy = len(lazy.policy) if lazy else 0
        print(f"| {name} | {mean_lazy} | {correct[name]}/{args.n} = {correct[name] / args.n:.2f} "
              f"[{lo:.2f}, {hi:.2f}] | {ppl:.3f} [{plo:.3f}, {phi:.3f}] | {ratio} | {vs} |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all; `OMP_NUM_THREADS=1 python3 bench/stream_quality.py "
          + " ".join(argv if argv is not None else sys.argv[1:]) + "`")


if __name__ == "__main__":
    main()
