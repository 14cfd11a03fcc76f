"""Why does 50% lazy lose the pass key on a small model? A study over passkey prompts (issue #5).

For each prompt, one shared prefill with a hook that measures, per layer and query head, the
attention mass the last ``answer_queries`` prompt queries (the "The pass key is" answer prefix) put on
the needle's tokens: the layers that *read* the needle. Then each candidate layer choice (scoring
rule, probe, sink, window; plus an oracle that demotes the layers reading the needle least) is
decoded from copies of the caches, as in ``run.run_retrieval``.

    python -m ltengine.eval.study --n 30 --length 3000 --fraction 0.5 --out out/study

Writes ``study.json`` (per-prompt needle mass, lazy ratios, layer sets, outputs) and ``study.md``.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import LazyConfig
from .harness import greedy, shared_prefill
from .scoring import layer_scores
from .stats import wilson
from .tasks import passkey_sample


def needle_mass(q: torch.Tensor, k: torch.Tensor, span: tuple[int, int], last: int, scale: float) -> torch.Tensor:
    """Per query head, the mean over the last ``last`` queries of the causal-softmax mass on keys in
    ``span``. q ``[T, H_q, D]``, k ``[T, H_kv, D]`` -> ``[H_q]``."""
    t, h_q, d = q.shape
    h_kv = k.shape[1]
    g = h_q // h_kv
    qq = q[-last:].float().permute(1, 0, 2).reshape(h_kv, g * last, d)
    s = torch.matmul(qq, k.float().permute(1, 2, 0)).mul_(scale).view(h_kv, g, last, t)
    pos_q = torch.arange(t - last, t).view(last, 1)
    s.masked_fill_(torch.arange(t).view(1, t) > pos_q, float("-inf"))
    p = s.softmax(-1)[..., span[0]:span[1]].sum(-1)  # [H_kv, G, last]
    return p.mean(-1).reshape(h_q)


@dataclass(frozen=True)
class Candidate:
    """A layer choice to try: a policy over some score, at a sink / window / probe."""

    name: str
    policy: str = "lighttransfer"  # lighttransfer | topk | oracle | fixed
    score: str = "ratio"
    sink: int = 4
    window: int = 256
    probe: int = 64
    layers: tuple[int, ...] = ()  # for "fixed"

    def choose(self, sp, fraction: float, mass: torch.Tensor) -> list[int]:
        n = sp.num_layers
        n_lazy = int(round(fraction * n))
        if self.policy == "full":
            return []
        if self.policy == "fixed":
            return list(self.layers)
        if self.policy == "oracle":  # demote the layers whose best head reads the needle least
            order = sorted(range(n), key=lambda i: float(mass[i].max()))
            return sorted(order[:n_lazy])
        lazy = LazyConfig(fraction=fraction, sink=self.sink, window=self.window, probe=self.probe, policy=self.policy)
        ratios = None if self.score == "ratio" else layer_scores(sp, self.sink, self.window, self.probe, self.score)
        return sp.lazy_layers(lazy, ratios)


def default_candidates(window: int) -> list[Candidate]:
    c = [Candidate("full", "full"), Candidate("oracle (needle mass)", "oracle", window=window)]
    for policy in ("lighttransfer", "topk"):
        c.append(Candidate(f"{policy} p64 s4", policy, window=window))
        c.append(Candidate(f"{policy} headmin p64 s4", policy, "headmin", window=window))
    for probe in (1, 8, 16, 32, 128, 256):
        c.append(Candidate(f"lighttransfer p{probe} s4", probe=probe, window=window))
        c.append(Candidate(f"lighttransfer headmin p{probe} s4", score="headmin", probe=probe, window=window))
    for sink in (16, 64):
        c.append(Candidate(f"lighttransfer p64 s{sink}", sink=sink, window=window))
        c.append(Candidate(f"lighttransfer p16 s{sink}", sink=sink, probe=16, window=window))
    return c


def peak_candidates(window: int) -> list[Candidate]:
    """Second round: the needle-agnostic "peak" rules (scoring.py) against the baseline and the oracle."""
    c = [Candidate("full", "full"), Candidate("oracle (needle mass)", "oracle", window=window),
         Candidate("lighttransfer p64 s4", window=window)]
    for rule in ("peak", "peak32"):
        for probe in (8, 16, 64):
            c.append(Candidate(f"lighttransfer {rule} p{probe} s4", score=rule, probe=probe, window=window))
    c.append(Candidate("topk peak p16 s4", "topk", "peak", probe=16, window=window))
    c.append(Candidate("lighttransfer peak p16 s16", score="peak", sink=16, probe=16, window=window))
    return c


CANDIDATE_SETS = {"first": default_candidates, "peak": peak_candidates}


def run(engine, n: int, length: int, fraction: float, window: int, seed: int, out: Path,
        answer_queries: int = 8, candidates: list[Candidate] | None = None, max_new_tokens: int = 8) -> dict:
    adapter, backend, tok = engine.adapter, engine.backend, engine.tokenizer
    candidates = candidates or default_candidates(window)
    rng = random.Random(seed)
    samples = [passkey_sample(tok, length, rng) for _ in range(n)]
    max_probe = max(c.probe for c in candidates)
    records, masses = [], []
    t0 = time.perf_counter()
    for i, s in enumerate(tqdm(samples, desc="study", unit="prompt")):
        per_layer = {}

        def hook(layer, q, k, s=s):
            per_layer[layer] = needle_mass(q, k, s.needle, answer_queries, adapter.scale)

        sp = shared_prefill(adapter, s.ids, max_probe, hook=hook)
        mass = torch.stack([per_layer[j] for j in range(sp.num_layers)])  # [L, H_q]
        masses.append(mass)
        done = {}
        for c in candidates:
            layers = c.choose(sp, fraction, mass)
            key = (tuple(layers), c.sink, c.window) if layers else ()
            if key not in done:
                cache = sp.build_cache(layers, c.sink, c.window, len(s.ids) + max_new_tokens, backend)
                done[key] = greedy(adapter, backend, [cache], sp.logits, len(s.ids), max_new_tokens, engine.eos_ids,
                                   done=lambda t, a=s.answer: a in tok.decode(t, skip_special_tokens=True))[0]
            text = tok.decode(done[key], skip_special_tokens=True)
            records.append(dict(candidate=c.name, sample=i, depth=round(s.depth, 3), lazy_layers=layers,
                                output=text, correct=s.answer in text))
        records.append(dict(candidate="_ratios", sample=i, mean=sp.ratios(4, window, 64),
                            headmin=layer_scores(sp, 4, window, 64, "headmin")))
        sp.release()
    m = torch.stack(masses)  # [N, L, H]
    rows = []
    for c in candidates:
        recs = [r for r in records if r["candidate"] == c.name]
        k = sum(r["correct"] for r in recs)
        lo, hi = wilson(k, len(recs))
        demoted = defaultdict(int)
        for r in recs:
            for j in r["lazy_layers"]:
                demoted[j] += 1
        rows.append(dict(name=c.name, correct=k, n=len(recs), acc=k / max(1, len(recs)), lo=lo, hi=hi,
                         demoted_counts=dict(sorted(demoted.items()))))
    data = dict(n=n, length=length, fraction=fraction, window=window, seed=seed, answer_queries=answer_queries,
                runtime_s=round(time.perf_counter() - t0, 1), rows=rows,
                needle_mass_max_head_mean=m.amax(-1).mean(0).tolist(), needle_mass_mean_head_mean=m.mean(-1).mean(0).tolist(),
                needle_mass=m.tolist(), records=records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(data) + "\n")
    lines = ["| candidate | accuracy [95% CI] (k/N) |", "|---|---|"]
    lines += [f"| {r['name']} | {100 * r['acc']:.0f}% [{100 * r['lo']:.0f}, {100 * r['hi']:.0f}] ({r['correct']}/{r['n']}) |"
              for r in rows]
    (out / "study.md").write_text("\n".join(lines) + "\n")
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ltengine.eval.study", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--length", type=int, default=3000)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", default="first", choices=sorted(CANDIDATE_SETS), help="candidate set")
    p.add_argument("--out", default="out/study")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..engine import Engine
    from ..models import load_model

    model, tok = load_model(None)
    data = run(Engine(model, tok, lazy=None), args.n, args.length, args.fraction, args.window, args.seed, Path(args.out),
               candidates=CANDIDATE_SETS[args.set](args.window))
    print((Path(args.out) / "study.md").read_text())
    print("needle mass (best head) per layer:", " ".join(f"{j}:{x:.2f}" for j, x in enumerate(data["needle_mass_max_head_mean"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
