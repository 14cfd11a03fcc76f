"""Document sessions across documents (``Engine.documents``) vs one session per document, same prompts.

Per mode (question, context): the RULER prompts of ``--length`` tokens (one sample of each of
``--tasks``), each a document + its question, answered (1) one session at a time (``engine.document``
+ ``ask``, what the RULER harness did before), (2) as one ``engine.documents`` batch (documents
prefilled in ``max_prefill_tokens`` batches, questions decoded as one batch, to each question's own
``max_new_tokens``: the same work, batched). Then both modes through ``ruler.run_sessions`` (2, with
one prefill per document for both modes via ``context_view``, and a question stopped once its answers
are all in its text, as the harness does) against the two modes' (1). Prints the wall times, the
speed-ups and whether (1) and (2) produced the same tokens; writes ``session_batch.md`` to ``--out``.

    OMP_NUM_THREADS=1 python bench/session_batch.py --length 1024 --out /tmp/sb
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltengine import Engine, SamplingParams  # noqa: E402
from ltengine.eval.ruler import make_samples, run_sessions  # noqa: E402
from ltengine.eval.ruler_configs import parse_config  # noqa: E402
from ltengine.models import load_model  # noqa: E402

TASKS = "niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery,vt,cwe,fwe"


def one_at_a_time(engine, samples, cfg):
    outs = []
    for s in samples:
        with engine.document(s.document_ids, lazy=cfg.lazy(), mode=cfg.mode, template=False) as doc:
            outs.append(doc.ask(s.question_ids, max_new_tokens=s.max_new_tokens))
    return outs


def batched(engine, samples, cfg):
    done = {}
    with engine.documents([s.document_ids for s in samples], lazy=cfg.lazy(), mode=cfg.mode, template=False) as docs:
        rids = [docs.add(i, s.question_ids, SamplingParams(max_new_tokens=s.max_new_tokens)) for i, s in enumerate(samples)]
        while docs.has_unfinished():
            for out in docs.step():
                if out.finished:
                    done[out.request_id] = out.output
    return [done[r] for r in rids]


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--modes", default="question,context")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    model, tok = load_model(None if a.model == "default" else a.model, dtype=torch.float32, device=a.device)
    engine = Engine(model, tok, lazy=None)
    samples = make_samples(tok, a.tasks.split(","), [a.length], 1, seed=0)
    tokens = sum(len(s.ids) for s in samples)
    one_at_a_time(engine, samples[:1], parse_config("session-question"))  # warm-up
    lines = [f"Device {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; default model fp32; "
             f"{len(samples)} RULER prompts of {a.length} tokens ({tokens} in all; tasks {a.tasks}), "
             f"50% lazy peak (probe 16, window 256), greedy; max_prefill_tokens {engine.max_prefill_tokens}.", "",
             "| mode | one session at a time, s | `Engine.documents` batch, s | speed-up | same tokens |",
             "|---|---|---|---|---|"]
    modes = a.modes.split(",")
    configs = [parse_config(f"session-{m}") for m in modes]
    t_alone_all = 0.0
    for cfg in configs:
        alone, t_alone = timed(one_at_a_time, engine, samples, cfg)
        batch, t_batch = timed(batched, engine, samples, cfg)
        t_alone_all += t_alone
        same = sum(x.token_ids == y.token_ids for x, y in zip(alone, batch))
        row = f"| {cfg.mode} | {t_alone:.1f} | {t_batch:.1f} | {t_alone / t_batch:.2f}x | {same} of {len(samples)} |"
        print(row, flush=True)
        lines.append(row)
    _, t_harness = timed(run_sessions, engine, samples, configs)
    lines += ["", f"Both modes as the RULER harness runs them (`run_sessions`: one prefill per document for "
              f"{' and '.join(modes)}, answers stop the question): {t_harness:.1f} s vs {t_alone_all:.1f} s one "
              f"session at a time, {t_alone_all / t_harness:.2f}x."]
    text = "\n".join(lines)
    print("\n" + text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "session_batch.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
