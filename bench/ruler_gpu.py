"""The RULER table on one GPU in a time budget (run by bench/gpu_ruler.sh): the model loads once, then
stages run length by length (main table, held-out seeds, sessions), each length skipped -- and said so --
when the time it is predicted to take (the last length's time x 2.2, the prompts being twice as long)
does not fit in what is left. Writes, per stage, ruler.md / ruler.json / ruler.png, and RESULTS_ruler.md.

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

MAIN = "full,ratio25,ratio50,peak25,peak50,random50,streaming"
HELDOUT = "full,ratio50,peak50,peak50-p64,headmin50"
SESSIONS = "session-full,session-context,session-question"


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
    p.add_argument("--session-n", type=int, default=5)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--workers", type=int, default=12, help="processes generating the samples")
    p.add_argument("--main", default=MAIN)
    p.add_argument("--heldout", default=HELDOUT)
    p.add_argument("--heldout-seed", type=int, default=1000)
    a = p.parse_args(argv)
    t_load = time.perf_counter()
    deadline = a.deadline or time.time() + 400
    model, tok = load_model(None if a.model == "default" else a.model, dtype=a.dtype, device=a.device)
    engine = Engine(model, tok, lazy=None)
    print(f"model loaded in {time.perf_counter() - t_load:.1f} s; backends {engine.backends}", flush=True)
    t0 = time.perf_counter()
    lengths = [int(x) for x in a.lengths.split(",")]
    stages = [("main", a.main, a.n, 0), ("heldout", a.heldout, a.n, a.heldout_seed), ("sessions", SESSIONS, a.session_n, 0)]
    cost: dict = {}  # (stage, length) -> seconds
    log = []
    for stage, names, n, seed in stages:
        configs = [parse_config(k) for k in names.split(",")]
        done = []
        for i, L in enumerate(lengths):
            left = deadline - time.time()
            if i:
                predicted = cost[(stage, lengths[i - 1])] * 2.2
            elif stage != "main" and ("main", L) in cost:  # scale main's time by configs and N
                predicted = cost[("main", L)] * len(configs) / len(a.main.split(",")) * n / a.n
            else:
                predicted = 0.0
            if predicted > left:
                msg = f"{stage} {L}: skipped (predicted {predicted:.0f} s > {left:.0f} s left)"
                print(msg, flush=True)
                log.append(msg)
                continue
            t1 = time.perf_counter()
            out = Path(a.out) / f"{stage}_{L}"
            commands.ruler(engine, out, a.tasks.split(","), [L], n, configs, seed, a.chunk,
                           dict(stage=stage, configs=names, n=n, seed=seed, lengths=[L], device=a.device, dtype=a.dtype),
                           workers=a.workers)
            cost[(stage, L)] = time.perf_counter() - t1
            msg = f"{stage} {L}: {cost[(stage, L)]:.1f} s ({n} x {len(a.tasks.split(','))} prompts, {len(configs)} configs)"
            print(msg, flush=True)
            log.append(msg)
            done.append(out / "ruler.json")
        if done:
            paths = merge(done, Path(a.out) / stage)
            print(f"\n## {stage} (seed {seed})\n" + Path(paths["md"]).read_text(), flush=True)
    snippet = [f"### RULER on {a.device} ({time.strftime('%Y-%m-%d')}), `bash bench/gpu_ruler.sh`", "",
               f"Default model from `{Path(a.model).name}`, {a.dtype}; window 256, sink 4; "
               f"every stage's per-length time below. Stages: main (seed 0), held-out seeds "
               f"(seed {a.heldout_seed}), sessions (N = {a.session_n}).", "", "```", *log, "```"]
    for stage, *_ in stages:
        md = Path(a.out) / stage / "ruler.md"
        if md.exists():
            snippet += ["", f"#### {stage}", "", md.read_text(), f"![{stage}]({stage}/ruler.png)"]
    (Path(a.out) / "RESULTS_ruler.md").write_text("\n".join(snippet) + "\n")
    (Path(a.out) / "timing.json").write_text(json.dumps({f"{s} {L}": c for (s, L), c in cost.items()}, indent=1))
    print(f"total {time.perf_counter() - t0:.1f} s after load", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
