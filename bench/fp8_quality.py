"""fp8 KV vs unquantized KV on the real default model (CPU): perplexity ratio and passkey accuracy.

Every prompt is prefilled once (``eval.harness.shared_prefill``: prefill attention is unquantized, as
in the engine); each lazy config's caches are then built twice from copies, in the model's dtype and
in fp8 (``build_cache(kv_dtype=...)``: quantized per token and head as the runners store them), and
decoded through the reference runner's ``decode_step``. So the two rows of a config see the same
tokens, the same lazy layers and the same first logits, and differ only in the stored KV.

- perplexity: teacher-forced NLL of ``--scored`` tokens after a ``--context``-token prefix; the fp8 /
  unquantized ratio is exp(mean paired NLL difference) with a 95% block-bootstrap interval
  (``eval.stats.block_bootstrap_ppl`` on the differences), N = segments x scored tokens.
- passkey: greedy answer contains the key; 95% Wilson intervals, N prompts.

Prints a markdown table for bench/RESULTS.md (and writes it to ``--out`` as fp8_quality.md / .json).
``python3 bench/fp8_quality.py --ppl-n 4 --context 1024 --scored 256 --passkey-n 20 --length 1500``
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from ltengine import Engine
from ltengine.eval.grid import EvalConfig
from ltengine.eval.harness import greedy, shared_prefill, teacher_forced_nll
from ltengine.eval.stats import block_bootstrap_ppl, wilson
from ltengine.eval.tasks import passkey_sample, ppl_segments
from ltengine.kernels.fp8 import FP8


def configs(window: int) -> list[EvalConfig]:
    """Full attention and the default model's lighttransfer settings at 25% and 50% lazy."""
    return [EvalConfig("full")] + [EvalConfig("lighttransfer", f, window, 4, 16, "peak") for f in (0.25, 0.5)]


def ppl_rows(engine, segments, context: int, cfgs, dtypes) -> list[dict]:
    a, backend = engine.adapter, engine.backend
    nll = {(c.name, str(d)): [] for c in cfgs for d in dtypes}
    for i, seg in enumerate(segments):
        t0 = time.perf_counter()
        sp = shared_prefill(a, seg[:context], max(c.probe for c in cfgs))
        for c in cfgs:
            layers = c.lazy_layers(sp, i)
            for d in dtypes:
                cache = sp.build_cache(layers, c.sink, c.window, len(seg), backend, kv_dtype=d)
                nll[(c.name, str(d))].append(teacher_forced_nll(a, backend, cache, sp.logits, seg[context:], context))
        sp.release()
        print(f"  ppl segment {i + 1}/{len(segments)}: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    base = str(dtypes[0])
    for c in cfgs:
        for d in dtypes[1:]:
            ref, q = nll[(c.name, base)], nll[(c.name, str(d))]
            p0, lo0, hi0 = block_bootstrap_ppl(ref)
            p1, lo1, hi1 = block_bootstrap_ppl(q)
            r, rlo, rhi = block_bootstrap_ppl([x - y for x, y in zip(q, ref)])
            rows.append(dict(config=c.name, tokens=sum(len(x) for x in q), ppl_base=p0, base_lo=lo0, base_hi=hi0,
                             ppl_fp8=p1, fp8_lo=lo1, fp8_hi=hi1, ratio=r, ratio_lo=rlo, ratio_hi=rhi))
    return rows


def passkey_rows(engine, samples, cfgs, dtypes, max_new: int = 8) -> list[dict]:
    a, backend, tok = engine.adapter, engine.backend, engine.tokenizer
    hits = {(c.name, str(d)): 0 for c in cfgs for d in dtypes}
    for i, s in enumerate(samples):
        sp = shared_prefill(a, s.ids, max(c.probe for c in cfgs))
        for c in cfgs:
            layers = c.lazy_layers(sp, i)
            for d in dtypes:
                cache = sp.build_cache(layers, c.sink, c.window, len(s.ids) + max_new, backend, kv_dtype=d)
                out = greedy(a, backend, [cache], sp.logits, len(s.ids), max_new, engine.eos_ids,
                             done=lambda t, k=s.answer: k in tok.decode(t, skip_special_tokens=True))[0]
                hits[(c.name, str(d))] += s.answer in tok.decode(out, skip_special_tokens=True)
        sp.release()
    rows = []
    for c in cfgs:
        for d in dtypes:
            n, k = len(samples), hits[(c.name, str(d))]
            lo, hi = wilson(k, n)
            rows.append(dict(config=c.name, kv=str(d).replace("torch.", ""), n=n, correct=k, acc=k / n, lo=lo, hi=hi))
    return rows


def markdown(ppl: list[dict], pk: list[dict], args, base: str, kv_bytes: dict) -> str:
    lines = [f"Default model (SmolLM2-135M-Instruct, {base} weights, CPU), KV bytes per token and layer: "
             + ", ".join(f"{k} {v}" for k, v in kv_bytes.items()) + ".", "",
             f"Perplexity: {args.ppl_n} segments x {args.scored} scored tokens after a {args.context}-token prefix "
             "(paired: the same tokens and lazy layers; ratio = exp(mean NLL difference), 95% block-bootstrap).", "",
             f"| config | tokens | ppl {base} KV [95%] | ppl fp8 KV [95%] | fp8 / {base} [95%] |", "|---|---|---|---|---|"]
    for r in ppl:
        lines.append(f"| {r['config']} | {r['tokens']} | {r['ppl_base']:.3f} [{r['base_lo']:.3f}, {r['base_hi']:.3f}] | "
                     f"{r['ppl_fp8']:.3f} [{r['fp8_lo']:.3f}, {r['fp8_hi']:.3f}] | "
                     f"{r['ratio']:.4f} [{r['ratio_lo']:.4f}, {r['ratio_hi']:.4f}] |")
    lines += ["", f"Passkey: {args.passkey_n} prompts of {args.length} tokens (greedy, key in output; 95% Wilson).", "",
              "| config | KV | N | correct | accuracy [95%] |", "|---|---|---|---|---|"]
    for r in pk:
        lines.append(f"| {r['config']} | {r['kv']} | {r['n']} | {r['correct']} | {r['acc']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ppl-n", type=int, default=4)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--scored", type=int, default=256)
    p.add_argument("--passkey-n", type=int, default=20)
    p.add_argument("--length", type=int, default=1500)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/fp8_quality")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(None)
    base = engine.adapter.dtype
    dtypes = [base, FP8]
    cfgs = configs(args.window)
    kv_bytes = {}
    for d in dtypes:
        kv_bytes[str(d).replace("torch.", "")] = Engine(engine.model, engine.tokenizer, kv_dtype=d).adapter.kv_bytes_per_token_layer
    ppl = ppl_rows(engine, ppl_segments(engine.tokenizer, args.context, args.scored, args.ppl_n, args.seed),
                   args.context, cfgs, dtypes) if args.ppl_n else []
    rng = random.Random(args.seed)
    samples = [passkey_sample(engine.tokenizer, args.length, rng) for _ in range(args.passkey_n)]
    pk = passkey_rows(engine, samples, cfgs, dtypes) if args.passkey_n else []
    md = markdown(ppl, pk, args, str(base).replace("torch.", ""), kv_bytes)
    md += f"\n\n`python3 bench/fp8_quality.py {' '.join(argv or __import__('sys').argv[1:])}`: {time.perf_counter() - t0:.0f} s"
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_quality.md").write_text(md + "\n")
    (out / "fp8_quality.json").write_text(json.dumps(dict(args=vars(args), ppl=ppl, passkey=pk, kv_bytes=kv_bytes), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
