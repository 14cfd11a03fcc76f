"""Document sessions on the GPU: 8 questions on one long document, one session vs 8 separate prefills.

    python3 bench/session_gpu.py                        # Llama-3-8B-shaped random model, bf16, 32k document
    python3 bench/session_gpu.py --doc-tokens 8192      # shorter
    python3 bench/session_gpu.py --quick                # 2-layer model: a CPU / smoke run in seconds

Random weights (``bench/llama3_8b_config.json``; nothing to download), token-id prompts: a document of
``--doc-tokens`` and ``--questions`` questions of ``--q-tokens`` each, ``--new-tokens`` greedy tokens
each (``ignore_eos``). ``LazyConfig(fraction=0.5)``, ``kv_budget`` 40 GiB, the engine's paged runner
(CUDA graphs). Timed (wall clock, synchronized, after a warm-up of every path on a short document):

- ``separate``: ``engine.generate(document + question)`` once per question (each its own prefill);
- ``session question`` / ``session context``: ``engine.document(document, mode=...)`` + ``ask_many``.

Prints a markdown table (also written to ``$OUT/session_gpu.md``, JSON to ``$OUT/session_gpu.json``):
seconds, the document prefill, speed-up over separate, the pool's KV bytes after the questions were
prefilled (the shared document once plus every question's own part) and how many answers are
token-identical to the separate calls (random weights and bf16: a near-tie can flip a token, so this
is reported, not asserted).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import QUICK_OVERRIDES, IdsTokenizer, build_model, load_config

from ltengine import Engine, LazyConfig, SamplingParams


def sync(dev) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def run_session(engine, doc, qs, new, mode, dev) -> dict:
    t0 = sync(dev)
    s = engine.document(doc, template=False, mode=mode)
    t_doc = sync(dev) - t0
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    rids = [s.add(q, params) for q in qs]
    kv_after = s.runner.used
    done = {}
    while s.has_unfinished():
        for out in s.step():
            if out.finished:
                done[out.request_id] = out.output
    s.close()
    wall = sync(dev) - t0
    return {"wall_s": wall, "doc_prefill_s": t_doc, "kv_bytes": kv_after, "outs": [done[r] for r in rids],
            "doc_kv_bytes": s.kv_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--doc-tokens", type=int, default=32768)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--q-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    config = load_config(**(QUICK_OVERRIDES if args.quick else {}))
    model, build_s = build_model(config, dev, dtype)
    budget = "40GiB" if dev.type == "cuda" else None
    engine = Engine(model, IdsTokenizer(), lazy=LazyConfig(fraction=0.5), kv_budget=budget, progress=False)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {config.num_hidden_layers} layers, {dtype}, model built in "
          f"{build_s:.1f} s, runner {engine.runner_kind}, backends {engine.backends}")
    g = torch.Generator().manual_seed(0)
    vocab = config.vocab_size
    doc = torch.randint(0, vocab, (args.doc_tokens,), generator=g).tolist()
    qs = [torch.randint(0, vocab, (args.q_tokens,), generator=g).tolist() for _ in range(args.questions)]
    new = args.new_tokens

    # warm-up: Triton compiles and the CUDA graphs of batch 1 and of the question batch
    short = doc[:2048]
    engine.generate(short + qs[0], max_new_tokens=4, ignore_eos=True)
    for mode in ("question", "context"):
        run_session(engine, short, qs, 4, mode, dev)

    rows, recs = [], {}
    t0 = sync(dev)
    sep = [engine.generate(doc + q, max_new_tokens=new, ignore_eos=True) for q in qs]
    t_sep = sync(dev) - t0
    recs["separate"] = {"wall_s": t_sep, "prefill_s": sum(o.stats.prefill_s for o in sep)}
    rows.append(f"| {len(qs)} separate generate calls | {t_sep:.2f} | {recs['separate']['prefill_s']:.2f} (sum) "
                f"| 1.00x | - | - |")
    for mode in ("question", "context"):
        r = run_session(engine, doc, qs, new, mode, dev)
        same = sum(a.token_ids == b.token_ids for a, b in zip(r["outs"], sep))
        recs[mode] = {k: v for k, v in r.items() if k != "outs"} | {"identical": same,
                                                                      "lazy_layers": r["outs"][0].lazy_layers}
        rows.append(f"| session, mode {mode} (ask_many) | {r['wall_s']:.2f} | {r['doc_prefill_s']:.2f} | "
                    f"{t_sep / r['wall_s']:.2f}x | {r['kv_bytes'] / 2**30:.2f} GiB | {same}/{len(qs)} |")
    head = (f"Document sessions, {name}: Llama-3-8B-shaped random model ({config.num_hidden_layers} layers, {dtype}), "
            f"document {args.doc_tokens} tokens, {len(qs)} questions x {args.q_tokens} tokens, {new} new tokens each, "
            f"LazyConfig(fraction=0.5), kv_budget {budget}; `python3 bench/session_gpu.py`\n\n"
            "| way | wall s | document prefill s | speed-up | KV held with all questions prefilled | "
            "answers identical to separate |\n|---|---|---|---|---|---|\n")
    table = head + "\n".join(rows) + "\n"
    print("\n" + table)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "session_gpu.md"), "w") as f:
            f.write(table)
        with open(os.path.join(out, "session_gpu.json"), "w") as f:
            json.dump(recs, f, indent=1)


if __name__ == "__main__":
    main()
