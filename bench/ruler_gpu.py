"""The RULER table on one GPU in a time budget (run by bench/gpu_ruler.sh): the model loads once, then
stages run length by length (main table, held-out seeds, sessions), each length skipped -- and said so --
when the time it is predicted to take (the last length's time x 2.2, the prompts being twice as long)
does not fit in what is left. Writes, per stage, ruler.md / ruler.json / ruler.png, and RESULTS_ruler.md.
The sessions stage prefills many documents per batch and decodes their questions as one batch
(``Engine.documents`` through ``ruler.run_sessions``); its log line says where its time went.

    python bench/ruler_gpu.py --model FILE.gguf|default --device cuda --out OUT --deadline UNIX_TIME
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltengine.engine import Engine  # noqa: E402
from ltengine.eval import commands  # noqa: E402
from ltengine.eval.ruler_configs import parse_config  # noqa: E402
from ltengine.eval.ruler_report import merge  # noqa: E402
from ltengine.eval.ruler_tasks import TASKS  # noqa: E402
from ltengine.models import load_model  # noqa: E402

MAIN = "full,ratio25,ratio50,peak25,peak50,cover25,cover50,random50,streaming"
HELDOUT = "full,ratio50,peak50,cover50"  # peak p16 (the old default) vs cover p64 (the default since the scoring study)
SESSIONS = "session-context,session-question"  # session-full (= full through sessions) on request


def _predict(cost: dict, stage: str, before: list[int], L: int, main_scale: float) -> float:
    """Seconds the next length should take: this stage's last length x the growth it showed from the
    one before (else main's growth, else 2x: attention and prefill double, launch-bound decode does not);
    a stage's first length: main's time at that length, scaled by configs x N (0 if unknown)."""
    if not before:
        return cost.get(("main", L), 0.0) * main_scale if stage != "main" else 0.0
    prev = before[-1]
    if stage != "main" and ("main", L) in cost and ("main", prev) in cost:
        g = cost[("main", L)] / cost[("main", prev)]
    elif len(before) >= 2 and (stage, before[-2]) in cost:
        g = cost[(stage, prev)] / cost[(stage, before[-2])]
    else:
        g = 2.0
    return cost[(stage, prev)] * min(2.5, max(1.0, g))


def _session_times(path: Path) -> str:
    """Per session config: batches, seconds in document prefill (or making the view of another config's
    documents) and in question prefill + decode."""
    recs = json.loads(path.read_text())["records"]
    parts = []
    for c in dict.fromkeys(r["config"] for r in recs):
        mine = [r for r in recs if r["config"] == c]
        pre = sum(r["chunk_prefill_s"] / r["chunk_size"] for r in mine)
        dec = sum(r["chunk_decode_s"] / r["chunk_size"] for r in mine)
        shared = mine[0].get("prefill_shared_with")
        docs = f"a view of {shared}'s documents {pre:.1f} s" if shared else f"documents {pre:.1f} s"
        parts.append(f"{c}: {round(sum(1 / r['chunk_size'] for r in mine))} batches of <= {max(r['chunk_size'] for r in mine)}, "
                     f"{docs}, questions {dec:.1f} s")
    return "; " + "; ".join(parts)


def _session_runner(engine) -> str:
    """What decoded the sessions: the runner, its decode kernel, whether CUDA graphs were captured."""
    r = engine._session_runner()
    buckets = sorted(b for b, st in r.batches.static.items() if st.get("graph") is not None)
    return (f"{r.name}, paged_decode {r.attn_name}, fused step {r.fused is not None}, graphs {r.graphs} "
            f"(captured for batch buckets {buckets})")


def _snippet(a, stages, log: list[str], cost: dict) -> None:
    """RESULTS_ruler.md (the log, then each finished stage's table) and timing.json."""
    what = {"main": "main (seed 0)", "heldout": f"held-out seeds (seed {a.heldout_seed})",
            "sessions": f"sessions ({a.sessions}; N = {a.session_n}, seed 0, batched across documents)"}
    lines = [f"### RULER on {a.device} ({time.strftime('%Y-%m-%d')}), `bench/ruler_gpu.py --stages {a.stages}`", "",
             f"Default model from `{Path(a.model).name}`, {a.dtype}; window 256, sink 4. Stages: "
             f"{', '.join(what[s] for s, *_ in stages)}; time per length:", "",
             "```", *log, "```"]
    for stage, *_ in stages:
        md = Path(a.out) / stage / "ruler.md"
        if md.exists():
            lines += ["", f"#### {stage}", "", md.read_text(), f"![{stage}]({stage}/ruler.png)"]
    (Path(a.out) / "RESULTS_ruler.md").write_text("\n".join(lines) + "\n")
    (Path(a.out) / "timing.json").write_text(json.dumps({f"{s} {L}": c for (s, L), c in cost.items()}, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help='a .gguf / model path, or "default" (the embedded model)')
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, default=None, help="Unix time by which every stage is done (default: 400 s from now)")
    p.add_argument("--lengths", default="1024,2048,4096,8192")
    p.add_argument("--n", type=int, default=25)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--session-n", type=int, default=25)
    p.add_argument("--sessions", default=SESSIONS, help="the sessions stage's configs")
    p.add_argument("--session-tokens", type=int, default=None,
                   help="prompt tokens of documents per session batch (default: ruler.run_sessions')")
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--workers", type=int, default=12, help="processes generating the samples")
    p.add_argument("--main", default=MAIN)
    p.add_argument("--heldout", default=HELDOUT)
    p.add_argument("--heldout-seed", type=int, default=1000)
    p.add_argument("--stages", default="main,heldout,sessions", help="which stages, in this order")
    a = p.parse_args(argv)
    t_load = time.perf_counter()
    deadline = a.deadline or time.time() + 400
    model, tok = load_model(None if a.model == "default" else a.model, dtype=a.dtype, device=a.device)
    engine = Engine(model, tok, lazy=None)
    print(f"model loaded in {time.perf_counter() - t_load:.1f} s; backends {engine.backends}", flush=True)
    t0 = time.perf_counter()
    lengths = [int(x) for x in a.lengths.split(",")]
    every = {"main": (a.main, a.n, 0), "heldout": (a.heldout, a.n, a.heldout_seed), "sessions": (a.sessions, a.session_n, 0)}
    stages = [(s, *every[s]) for s in a.stages.split(",")]
    cost: dict = {}  # (stage, length) -> seconds
    log = []
    for stage, names, n, seed in stages:
        configs = [parse_config(k) for k in names.split(",")]
        done = []
        for i, L in enumerate(lengths):
            left = deadline - time.time()
            predicted = _predict(cost, stage, lengths[:i], L, main_scale=len(configs) / len(a.main.split(",")) * n / a.n)
            if predicted > left:  # longer lengths would not fit either
                msg = (f"{stage} {','.join(map(str, lengths[i:]))}: skipped (predicted {predicted:.0f} s for {L} "
                       f"> {left:.0f} s left)")
                print(msg, flush=True)
                log.append(msg)
                break
            t1 = time.perf_counter()
            out = Path(a.out) / f"{stage}_{L}"
            commands.ruler(engine, out, a.tasks.split(","), [L], n, configs, seed, a.chunk,
                           dict(stage=stage, configs=names, n=n, seed=seed, lengths=[L], device=a.device, dtype=a.dtype),
                           workers=a.workers, session_tokens=a.session_tokens)
            cost[(stage, L)] = time.perf_counter() - t1
            msg = f"{stage} {L}: {cost[(stage, L)]:.1f} s ({n} x {len(a.tasks.split(','))} prompts, {len(configs)} configs)"
            if stage == "sessions":
                msg += _session_times(out / "ruler.json")
                if not done:  # once, while the run is alive: what decoded the sessions
                    msg += "\nsessions' runner: " + _session_runner(engine)
            print(msg, flush=True)
            log.append(msg)
            done.append(out / "ruler.json")
            merge(done, Path(a.out) / stage)
            _snippet(a, stages, log, cost)  # after every length: a kill at the time limit keeps what is done
        if done:
            print(f"\n## {stage} (seed {seed})\n" + (Path(a.out) / stage / "ruler.md").read_text(), flush=True)
    _snippet(a, stages, log, cost)
    print(f"total {time.perf_counter() - t0:.1f} s after load", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
