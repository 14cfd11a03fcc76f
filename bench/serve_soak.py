"""Soak through the server: many mixed-length requests over HTTP under a small KV budget.

    python3 bench/serve_soak.py            # device: 1,000 requests of 64..4096 tokens, 2 GiB budget (~3 min)
    python3 bench/serve_soak.py --quick    # CPU: tiny random model, 120 requests of 16..384 tokens (~1 min)

The server is this script in ``--serve`` mode (a child process: the random model of bench/throughput.py,
on CUDA the Llama-3-8B shape cut to 4 layers in fp32, so that a batch and a lone run give the same
greedy tokens; see bench/soak.py), 50% lazy, interleaved prefill, ``--max-waiting`` set low. The
client replays one seeded trace with the ``httpx`` async client:

- arrivals in bursts (a burst of up to ``--burst`` requests at one instant, bursts Poisson in time), so
  the waiting queue overflows: those requests get 503 + Retry-After and retry after that delay;
- half the requests stream (SSE, ``stream_options.include_usage``), half do not;
- a tenth of the requests stream and disconnect after a random number of chunks.

Checks, each printed as PASS / FAIL:

1. no response is a 5xx other than the backpressure 503, and every 503 carries Retry-After;
2. every request that was not disconnected completes with exactly its ``max_tokens`` (ignore_eos), and
   ``usage`` agrees;
3. after the trace the server is idle: no running or waiting requests, ``ltengine_kv_bytes_used`` 0;
4. the peak KV (``ltengine_peak_kv_bytes``) is within the budget;
5. ``--samples`` completed requests, run alone in this process on the same model through
   ``Engine.generate``, give the same tokens as the server gave.

Writes ``--json`` (default ``$OUT/serve_soak.json``, else ./serve_soak.json). Exit status 0 when all pass.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from serve_load import NumberTokenizer, scrape, stop_server, wait_healthy  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU: tiny model, 120 requests of 16..384 tokens")
    p.add_argument("--requests", type=int, help="default 1000 (quick 120)")
    p.add_argument("--min-len", type=int, help="default 64 (quick 16)")
    p.add_argument("--max-len", type=int, help="default 4096 (quick 384)")
    p.add_argument("--new-max", type=int, default=None, help="max_tokens drawn from 2..new-max (default 64; quick 16)")
    p.add_argument("--kv-budget", help="default 2GiB (quick 1MiB)")
    p.add_argument("--max-waiting", type=int, default=None, help="server's --max-waiting (default 32; quick 8)")
    p.add_argument("--burst", type=int, default=None, help="largest burst of simultaneous arrivals (default 96; quick 24)")
    p.add_argument("--rate", type=float, default=None, help="bursts per second (default 2; quick 4)")
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, help="default 1020 (quick 60)")
    p.add_argument("--interleave-layers", type=int, default=1)
    p.add_argument("--samples", type=int, default=20, help="completed requests re-run alone in-process")
    p.add_argument("--layers", type=int, help="cut the 8B config to this many layers (default 4 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="bound on the whole trace, seconds")
    p.add_argument("--json")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)  # what the server child is started with
    q = a.quick
    a.requests = a.requests or (120 if q else 1000)
    a.min_len = a.min_len or (16 if q else 64)
    a.max_len = a.max_len or (384 if q else 4096)
    a.new_max = a.new_max or (16 if q else 64)
    a.kv_budget = a.kv_budget or ("1MiB" if q else "2GiB")
    a.max_waiting = a.max_waiting if a.max_waiting is not None else (8 if q else 32)
    a.burst = a.burst or (24 if q else 96)
    a.rate = a.rate or (4.0 if q else 2.0)
    a.window = a.window or (60 if q else 1020)
    if a.min_len < 1 or a.max_len < a.min_len or a.new_max < 2:
        p.error("need 1 <= --min-len <= --max-len and --new-max >= 2")
    return a


# ---------------------------------------------------------------------------------------------- model
def build_engine(a):
    """The random model (same seed = same weights in the server and in this process) in an Engine."""
    import torch

    from ltengine import Engine, LazyConfig
    from throughput import CONFIG_8B, QUICK_OVERRIDES, build_model, load_config

    if a.quick:
        torch.set_num_threads(1)
    cuda = torch.cuda.is_available() and not a.quick
    overrides = dict(QUICK_OVERRIDES) if a.quick else {}
    layers = a.layers if a.layers is not None else (4 if cuda else 0)
    if layers:
        overrides["num_hidden_layers"] = layers
    config = load_config(CONFIG_8B, **overrides)
    model, _ = build_model(config, torch.device("cuda" if cuda else "cpu"), torch.float32, seed=a.seed)
    lazy = LazyConfig(fraction=a.fraction, sink=a.sink, window=a.window) if a.fraction > 0 else None
    engine = Engine(model, NumberTokenizer(), lazy=lazy, kv_budget=a.kv_budget, interleave_layers=a.interleave_layers,
                    progress=False)
    return engine, config.vocab_size


def serve_main(a) -> int:
    import uvicorn

    from ltengine.serve.app import create_app
    from ltengine.serve.loop import EngineLoop
    from ltengine.serve.metrics import ServerMetrics

    engine, _ = build_engine(a)
    metrics = ServerMetrics(engine.num_layers)
    loop = EngineLoop(engine, metrics, max_waiting=a.max_waiting)
    metrics.attach(loop)
    app = create_app(loop, metrics, ["random"], engine.lazy)
    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=a.port, log_level="warning",
                                  timeout_graceful_shutdown=5)).run()
    return 0


def start_server(a) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [x for x in a.argv if x != "--serve"]
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--serve", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, 600)
    return proc, url


# ---------------------------------------------------------------------------------------------- trace
def make_trace(a, vocab: int) -> list[dict]:
    rng = random.Random(a.seed)
    trace, t = [], 0.0
    while len(trace) < a.requests:
        t += rng.expovariate(a.rate)
        for _ in range(min(rng.randint(1, a.burst), a.requests - len(trace))):
            n = len(trace)
            kind = "disconnect" if n % 10 == 3 else ("stream" if n % 2 else "plain")
            max_tokens = rng.randint(2, a.new_max)
            trace.append({"id": n, "t": t, "kind": kind, "max_tokens": max_tokens,
                          "cut_after": rng.randint(1, max_tokens - 1),
                          "prompt": [rng.randrange(3, vocab) for _ in range(rng.randint(a.min_len, a.max_len))]})
    return trace


def _ids(text: str) -> list[int]:
    return [int(x) for x in text.split()]


async def one(client, req: dict, t0: float, rec: dict) -> None:
    await asyncio.sleep(max(0.0, t0 + req["t"] - time.perf_counter()))
    body = {"model": "random", "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "ignore_eos": True}
    stream = req["kind"] != "plain"
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    for _ in range(1000):  # retries after 503 + Retry-After
        if not stream:
            r = await client.post("/v1/completions", json=body)
            status = r.status_code
            if status == 200:
                out = r.json()
                rec.update(status=200, ids=_ids(out["choices"][0]["text"]), usage=out["usage"]["completion_tokens"],
                           finish=out["choices"][0]["finish_reason"])
                return
            retry = r.headers.get("retry-after")
            error = r.text[:300]
        else:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                status = r.status_code
                if status == 200:
                    text, chunks = "", 0
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            rec["done"] = True
                            break
                        if not line.startswith("data: {"):
                            continue
                        ev = json.loads(line[6:])
                        if "error" in ev:
                            rec["stream_error"] = ev["error"]
                            break
                        if ev.get("usage"):
                            rec["usage"] = ev["usage"]["completion_tokens"]
                        if ev["choices"]:
                            text += ev["choices"][0]["text"]
                            chunks += 1
                            if req["kind"] == "disconnect" and chunks >= req["cut_after"]:
                                rec.update(status=200, ids=_ids(text), disconnected=True)
                                return  # leaving the block closes the connection mid-stream
                    rec.update(status=200, ids=_ids(text))
                    return
                retry = r.headers.get("retry-after")
                error = (await r.aread())[:300].decode(errors="replace")
        rec.setdefault("statuses", []).append(status)
        if status != 503:
            rec.update(status=status, error=error)
            return
        if retry is None:
            rec["no_retry_after"] = True
        await asyncio.sleep(min(float(retry or 1), 2.0))
    rec.update(status=503, error="still 503 after 1000 tries")


async def run_trace(url: str, trace: list[dict], timeout: float) -> tuple[list[dict], float]:
    import httpx

    recs = [{"id": r["id"], "kind": r["kind"]} for r in trace]
    limits = httpx.Limits(max_connections=len(trace) + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout), limits=limits) as client:
        t0 = time.perf_counter()

        async def guarded(req, rec):
            try:
                await one(client, req, t0, rec)
            except Exception as e:  # noqa: BLE001 - a transport error is a result of the soak, not a crash
                rec.update(status=None, error=f"{type(e).__name__}: {e}")

        await asyncio.wait_for(asyncio.gather(*(guarded(q, r) for q, r in zip(trace, recs))), timeout)
        wall = time.perf_counter() - t0
    return recs, wall


def wait_idle(url: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if (m.get("ltengine_requests_running", 1) == 0 and m.get("ltengine_requests_waiting", 1) == 0
                and m.get("ltengine_kv_bytes_used", 1) == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.25)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    a = parse_args(argv)
    if a.serve:
        return serve_main(a)
    from ltengine.config import format_bytes, parse_bytes

    from throughput import QUICK_OVERRIDES

    budget = parse_bytes(a.kv_budget)
    vocab = QUICK_OVERRIDES["vocab_size"] if a.quick else 128256  # the Llama-3-8B vocabulary
    trace = make_trace(a, vocab)
    kinds = {k: sum(r["kind"] == k for r in trace) for k in ("plain", "stream", "disconnect")}
    print(f"serve soak: {len(trace)} requests ({kinds}), prompts {a.min_len}..{a.max_len} tokens, max_tokens "
          f"2..{a.new_max}, bursts of up to {a.burst} at {a.rate}/s, --max-waiting {a.max_waiting}, "
          f"budget {format_bytes(budget)}, fraction {a.fraction}", flush=True)
    proc, url = start_server(a)
    try:
        recs, wall = asyncio.run(run_trace(url, trace, a.timeout))
        idle = wait_idle(url)
    finally:
        stop_server(proc)
    print(f"trace done in {wall:.1f} s; server stopped (exit {proc.returncode})", flush=True)

    by_id = {r["id"]: r for r in trace}
    statuses = [s for r in recs for s in r.get("statuses", [])] + [r.get("status") for r in recs]
    n503 = sum(s == 503 for s in statuses)
    bad5xx = [r for r in recs if r.get("status") is None or (r["status"] >= 500 and r["status"] != 503)]
    bad = [r for r in recs if r.get("status") != 200]
    short = [r for r in recs if r.get("status") == 200 and not r.get("disconnected") and (
        len(r["ids"]) != by_id[r["id"]]["max_tokens"] or r.get("usage") != by_id[r["id"]]["max_tokens"]
        or (r["kind"] == "stream" and not r.get("done")))]
    cut = sum(bool(r.get("disconnected")) for r in recs)
    checks = [
        ("no 5xx but backpressure 503s, each with Retry-After", not bad5xx and not any(r.get("no_retry_after") for r in recs),
         f"{n503} x 503 (retried), {len(bad5xx)} other 5xx/transport errors"
         + (f", first: {bad5xx[0].get('error')}" if bad5xx else "")),
        ("every request accepted; each completes or is cut by its client", not bad and not short,
         f"{len(recs) - len(bad) - cut} completed, {cut} disconnected, {len(bad)} not accepted, {len(short)} wrong length"
         + (f", first bad: {(bad or short)[0]}" if bad or short else "")),
        ("server idle afterwards (nothing running/waiting, KV 0)",
         idle.get("ltengine_requests_running") == 0 and idle.get("ltengine_requests_waiting") == 0
         and idle.get("ltengine_kv_bytes_used") == 0,
         f"running {idle.get('ltengine_requests_running')}, waiting {idle.get('ltengine_requests_waiting')}, "
         f"kv {idle.get('ltengine_kv_bytes_used')}"),
        ("peak KV within the budget", 0 < idle.get("ltengine_peak_kv_bytes", 0) <= budget,
         f"peak {format_bytes(idle.get('ltengine_peak_kv_bytes', 0))} of {format_bytes(budget)}; "
         f"peak running {idle.get('ltengine_requests_running_peak')}, preemptions {idle.get('ltengine_preemptions_total')}"),
    ]
    done = [r for r in recs if r.get("status") == 200 and not r.get("disconnected")]
    sample = random.Random(a.seed + 1).sample(done, min(a.samples, len(done)))
    engine, _ = build_engine(a)
    t1 = time.perf_counter()
    diffs = []
    for r in sample:
        req = by_id[r["id"]]
        alone = engine.generate(req["prompt"], max_new_tokens=req["max_tokens"], ignore_eos=True)
        if alone.token_ids != r["ids"]:
            diffs.append({"id": r["id"], "prompt_tokens": len(req["prompt"]),
                          "first_diff": next((i for i, (x, y) in enumerate(zip(alone.token_ids, r["ids"])) if x != y), None)})
    checks.append((f"{len(sample)} sampled outputs equal in-process runs", bool(sample) and not diffs,
                   f"{len(diffs)} differ ({time.perf_counter() - t1:.1f} s)" + (f", first: {diffs[0]}" if diffs else "")))
    engine.close()
    print()
    for name, ok, detail in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    passed = all(ok for _, ok, _ in checks)
    tokens = sum(len(r.get("ids", [])) for r in recs)
    print(f"\nserve soak {'PASSED' if passed else 'FAILED'}: {len(recs)} requests, {tokens} tokens in {wall:.1f} s")
    path = a.json or os.path.join(os.environ.get("OUT", "."), "serve_soak.json")
    with open(path, "w") as f:
        json.dump({"args": vars(a), "wall_s": wall, "n503": n503, "metrics_after": idle,
                   "checks": [dict(check=c, ok=o, detail=d) for c, o, d in checks], "mismatches": diffs}, f, indent=1,
                  default=str)
    print(f"json: {path}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
