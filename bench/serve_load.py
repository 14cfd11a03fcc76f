"""Load generator for ``ltengine serve``: Poisson arrivals over HTTP, against full mode, 50% lazy and
interleaving off under one KV budget, plus the same trace driven in-process through add_request/step.

    python3 bench/serve_load.py                 # the device run: Llama-3-8B-shaped random model, 40 GiB budget
    python3 bench/serve_load.py --quick         # CPU smoke: 2 layers, hidden 256, prompts 64-512 tokens

One arrival trace (seeded: arrival times, prompt lengths, output lengths, prompt token ids) is replayed
against each server configuration:

- ``full``        --fraction 0,   --interleave-layers K
- ``lazy``        --fraction 0.5, --interleave-layers K
- ``lazy-noint``  --fraction 0.5, --interleave-layers 0 (the long-prefill stall, for the ITL target)
- ``inproc``      the ``lazy`` engine driven in this process through ``Engine.add_request/step`` (no HTTP):
                  the baseline of the "server adds <= 5%" target

Each server is this script itself in ``--serve`` mode (a child process that builds the same random
model from the same seed and serves it with ``ltengine.serve``'s app; nothing is written to disk). The
client streams every request (SSE via httpx; the server's tokenizer renders one token as one piece, so
one chunk = one token), with ``ignore_eos`` so outputs have their drawn lengths. Reported per mode:
request throughput, output tok/s, TTFT and ITL p50/p99, peak concurrent running requests, preemptions,
peak KV vs the budget (from ``/metrics``). Table on stdout, JSON in ``--json`` (default $OUT/serve_load.json).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

MODES = ("full", "lazy", "lazy-noint", "inproc")


class NumberTokenizer:
    """Renders token ids as numbers, one ' n' per token: each streamed chunk is exactly one token."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


# ---------------------------------------------------------------------------------------------- engine
def build_engine(args, fraction: float, interleave: int):
    """The random model of bench/throughput.py (same seed = same weights) in an Engine."""
    import torch

    from ltengine import Engine, LazyConfig
    from throughput import CONFIG_8B, QUICK_OVERRIDES, build_model, load_config

    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = load_config(CONFIG_8B, **(QUICK_OVERRIDES if args.quick else {}))
    model, _ = build_model(config, device, dtype, seed=0)
    from ltengine.serve.cli import engine_accepts

    kwargs = {"interleave_layers": interleave} if engine_accepts("interleave_layers") else {}
    if interleave and not kwargs:
        print(f"note: this engine has no interleave_layers=; running without (asked {interleave})", file=sys.stderr)
    lazy = LazyConfig(fraction=fraction, sink=args.sink, window=args.window)
    return Engine(model, NumberTokenizer(), lazy=lazy, kv_budget=args.kv_budget, **kwargs)


def serve_main(args) -> int:
    """``--serve``: one server process for one mode."""
    import uvicorn

    from ltengine.serve.app import create_app
    from ltengine.serve.loop import EngineLoop
    from ltengine.serve.metrics import ServerMetrics

    engine = build_engine(args, args.fraction, args.interleave_layers)
    metrics = ServerMetrics(engine.num_layers)
    loop = EngineLoop(engine, metrics, max_waiting=None)
    metrics.attach(loop)
    app = create_app(loop, metrics, ["random"], engine.lazy)
    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning",
                                  timeout_graceful_shutdown=5)).run()
    return 0


# ---------------------------------------------------------------------------------------------- trace
def make_trace(args, vocab: int) -> list[dict]:
    rng = random.Random(args.seed)
    t, trace = 0.0, []
    for n in range(args.num_requests):
        t += rng.expovariate(args.rate)
        plen = rng.randint(*args.prompt_len)
        trace.append({"id": n, "t": t, "prompt": [rng.randrange(3, vocab) for _ in range(plen)],
                      "max_tokens": rng.randint(*args.output_len)})
    return trace


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize(mode: str, recs: list[dict], wall: float, server: dict, budget: int | None) -> dict:
    ok = [r for r in recs if r.get("error") is None]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    itl = [d for r in ok for d in r["itl"]]
    out_tokens = sum(r["tokens"] for r in ok)
    return {"mode": mode, "requests": len(recs), "ok": len(ok), "errors": len(recs) - len(ok),
            "error_sample": next((r["error"] for r in recs if r.get("error")), None),
            "wall_s": wall, "req_per_s": len(ok) / wall if wall else 0.0, "output_tok_per_s": out_tokens / wall if wall else 0.0,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
            "itl_p99_over_p50": (pct(itl, 99) / pct(itl, 50)) if itl and pct(itl, 50) else None,
            "peak_running": server.get("peak_running"), "preemptions": server.get("preemptions"),
            "peak_kv_bytes": server.get("peak_kv_bytes"), "kv_budget_bytes": budget,
            "peak_kv_over_budget": (server["peak_kv_bytes"] / budget) if budget and server.get("peak_kv_bytes") else None}


# ---------------------------------------------------------------------------------------------- HTTP run
async def _one(client, req: dict, t0: float) -> dict:
    import httpx

    await asyncio.sleep(max(0.0, t0 + req["t"] - time.perf_counter()))
    body = {"model": "random", "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "ignore_eos": True, "stream": True}
    sent = time.perf_counter()
    rec = {"id": req["id"], "ttft": None, "itl": [], "tokens": 0, "error": None}
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    rec["error"] = ev["error"]["message"]
                    break
                text = ev["choices"][0]["text"] if ev["choices"] else ""
                if not text:
                    continue
                now = time.perf_counter()
                n = text.count(" ")  # tokens in this chunk (one, unless a step delivered several)
                if last is None:
                    rec["ttft"] = now - sent
                else:
                    rec["itl"].extend([(now - last) / n] * n)
                last = now
                rec["tokens"] += n
    except httpx.HTTPError as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    return rec


def scrape(url: str) -> dict:
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def _poll(url: str, stop: asyncio.Event, seen: dict) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=30) as c:
        while not stop.is_set():
            try:
                text = (await c.get(f"{url}/metrics")).text
                for line in text.splitlines():
                    if line.startswith(("ltengine_requests_running ", "ltengine_kv_bytes_used ")):
                        name, value = line.rsplit(" ", 1)
                        seen[name] = max(seen.get(name, 0.0), float(value))
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)


async def run_trace_http(url: str, trace: list[dict], timeout: float) -> tuple[list[dict], float, dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(trace) + 8, max_keepalive_connections=len(trace) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout), limits=limits) as client:
        stop, seen = asyncio.Event(), {}
        poller = asyncio.ensure_future(_poll(url, stop, seen))
        t0 = time.perf_counter()
        recs = await asyncio.gather(*(_one(client, r, t0) for r in trace))
        wall = time.perf_counter() - t0
        stop.set()
        await poller
    return list(recs), wall, seen


def start_server(args, mode: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fraction = 0.0 if mode == "full" else 0.5
    interleave = 0 if mode == "lazy-noint" else args.interleave_layers
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--port", str(port), "--fraction", str(fraction),
           "--interleave-layers", str(interleave), "--kv-budget", str(args.kv_budget), "--sink", str(args.sink),
           "--window", str(args.window)] + (["--quick"] if args.quick else [])
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, args.start_timeout, mode)
    return proc, url


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, name: str = "the") -> None:
    """Until ``url/health`` answers 200; the server is killed (by its pid) and this raises on timeout."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            os.kill(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"{name} server not healthy after {timeout} s")
        time.sleep(0.5)


def run_server_mode(args, mode: str, trace: list[dict]) -> dict:
    proc, url = start_server(args, mode)
    try:
        warm = [dict(r, t=0.0, max_tokens=min(4, r["max_tokens"])) for r in trace[:2]]
        asyncio.run(run_trace_http(url, warm, args.request_timeout))  # first-call costs (graphs, allocator)
        base = scrape(url)
        recs, wall, seen = asyncio.run(run_trace_http(url, trace, args.request_timeout))
        m = scrape(url)
        server = {"peak_running": max(m.get("ltengine_requests_running_peak", 0), seen.get("ltengine_requests_running", 0)),
                  "preemptions": m.get("ltengine_preemptions_total", 0) - base.get("ltengine_preemptions_total", 0),
                  "peak_kv_bytes": max(m.get("ltengine_peak_kv_bytes", 0), seen.get("ltengine_kv_bytes_used", 0))}
        return summarize(mode, recs, wall, server, args.kv_budget)
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains and exits), SIGKILL after 30 s; both by its pid."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------- in-process
def run_inproc(args, trace: list[dict]) -> dict:
    """The same trace through ``Engine.add_request/step`` in this process: the server's baseline."""
    from ltengine import SamplingParams

    engine = build_engine(args, 0.5, args.interleave_layers)
    for r in trace[:2]:  # the same warm-up as the servers get
        engine.add_request(r["prompt"], SamplingParams(max_new_tokens=min(4, r["max_tokens"]), ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    base = engine.metrics()
    pending = sorted(trace, key=lambda r: r["t"])
    recs = {r["id"]: {"id": r["id"], "ttft": None, "itl": [], "tokens": 0, "error": None, "sent": None, "last": None}
            for r in trace}
    rid_of = {}
    peak_running = peak_kv = 0
    t0 = time.perf_counter()
    i = 0
    while i < len(pending) or engine.has_unfinished():
        now = time.perf_counter()
        while i < len(pending) and t0 + pending[i]["t"] <= now:
            r = pending[i]
            try:
                rid = engine.add_request(r["prompt"], SamplingParams(max_new_tokens=r["max_tokens"], ignore_eos=True))
                rid_of[rid] = r["id"]
                recs[r["id"]]["sent"] = now
            except ValueError as e:
                recs[r["id"]]["error"] = str(e)
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(0.01, t0 + pending[i]["t"] - time.perf_counter())))
            continue
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            rec = recs[rid_of[out.request_id]]
            n = len(out.new_token_ids)
            if n:
                if rec["last"] is None:
                    rec["ttft"] = now - rec["sent"]
                else:
                    rec["itl"].extend([(now - rec["last"]) / n] * n)
                rec["last"] = now
                rec["tokens"] += n
            if out.finished and out.output.finish_reason == "error":
                rec["error"] = out.output.error
        m = engine.metrics()
        peak_running = max(peak_running, m.get("running", 0))
        peak_kv = max(peak_kv, m.get("kv_bytes_used", 0) or 0)
    wall = time.perf_counter() - t0
    m = engine.metrics()
    server = {"peak_running": peak_running, "preemptions": m.get("preemptions_total", 0) - base.get("preemptions_total", 0),
              "peak_kv_bytes": peak_kv}
    return summarize("inproc", list(recs.values()), wall, server, args.kv_budget)


# ---------------------------------------------------------------------------------------------- report
def targets(rows: dict) -> list[str]:
    out = []
    full, lazy, noint, inproc = (rows.get(m) for m in MODES)
    if full and lazy and full["output_tok_per_s"] and full["peak_running"]:
        out.append(f"lazy / full output tok/s: {lazy['output_tok_per_s'] / full['output_tok_per_s']:.2f}x (target >= 1.8x)")
        out.append(f"lazy / full peak running: {lazy['peak_running'] / full['peak_running']:.2f}x (target >= 1.9x)")
    for r in rows.values():
        if r.get("peak_kv_over_budget") is not None:
            out.append(f"{r['mode']}: peak KV {r['peak_kv_over_budget']:.3f} of the budget (target <= 1)")
    for r in (lazy, noint):
        if r and r.get("itl_p99_over_p50") is not None:
            out.append(f"{r['mode']}: ITL p99/p50 {r['itl_p99_over_p50']:.2f} (target <= 3 with interleaving on)")
    if lazy and inproc and inproc["output_tok_per_s"]:
        loss = 1 - lazy["output_tok_per_s"] / inproc["output_tok_per_s"]
        out.append(f"server vs in-process output tok/s: {100 * loss:+.1f}% lost (target <= 5%)")
    return out


def print_table(rows: dict) -> None:
    def f(x, scale=1.0, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x * scale)

    print(f"{'mode':<11} {'ok/req':>7} {'req/s':>6} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'p99/p50':>7} {'peak run':>8} {'preempt':>7} {'peak KV/budget':>14}")
    for r in rows.values():
        print(f"{r['mode']:<11} {r['ok']:>3}/{r['requests']:<3} {r['req_per_s']:>6.2f} {r['output_tok_per_s']:>9.1f} "
              f"{f(r['ttft_p50_s']):>9} {f(r['ttft_p99_s']):>9} {f(r['itl_p50_s'], 1e3, '{:.1f}ms'):>8} "
              f"{f(r['itl_p99_s'], 1e3, '{:.1f}ms'):>8} {f(r['itl_p99_over_p50'], 1, '{:.2f}'):>7} "
              f"{r['peak_running'] or 0:>8.0f} {r['preemptions'] or 0:>7.0f} {f(r['peak_kv_over_budget'], 1, '{:.3f}'):>14}")
        if r["error_sample"]:
            print(f"    first error: {r['error_sample'][:200]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run on a tiny random model")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    p.add_argument("--num-requests", type=int, default=None, help="requests in the trace (default 64; quick 48)")
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default 1.0; quick 40)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="prompt tokens, uniform (default 8192 32768; quick 64 512)")
    p.add_argument("--output-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="output tokens, uniform (default 64 256; quick 8 32)")
    p.add_argument("--kv-budget", default=None, help="KV budget of every mode (default 40GiB; quick 2MiB)")
    p.add_argument("--window", type=int, default=None, help="lazy layers' window (default 1020; quick 60)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--interleave-layers", type=int, default=None, help="K of the interleaving modes (default 4; quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=1800.0)
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--json", default=None, help="results file (default $OUT/serve_load.json, else ./serve_load.json)")
    # --serve: the child server process of one mode
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--fraction", type=float, default=0.5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from ltengine.config import parse_bytes

    q = args.quick
    args.kv_budget = parse_bytes(args.kv_budget or ("2MiB" if q else "40GiB"))
    args.window = args.window or (60 if q else 1020)
    args.interleave_layers = args.interleave_layers if args.interleave_layers is not None else (1 if q else 4)
    if args.serve:
        return serve_main(args)
    args.num_requests = args.num_requests or (48 if q else 64)
    args.rate = args.rate or (40.0 if q else 1.0)
    args.prompt_len = tuple(args.prompt_len or ((64, 512) if q else (8192, 32768)))
    args.output_len = tuple(args.output_len or ((8, 32) if q else (64, 256)))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; choose from {MODES}")
    from throughput import QUICK_OVERRIDES

    vocab = QUICK_OVERRIDES["vocab_size"] if q else 128256
    trace = make_trace(args, vocab)
    print(f"trace: {len(trace)} requests at {args.rate}/s, prompts {args.prompt_len}, outputs {args.output_len}, "
          f"budget {args.kv_budget} B, interleave K={args.interleave_layers}", file=sys.stderr)
    path = args.json or os.path.join(os.environ.get("OUT", "."), "serve_load.json")
    rows: dict = {}
    for mode in modes:
        t0 = time.perf_counter()
        try:
            rows[mode] = run_inproc(args, trace) if mode == "inproc" else run_server_mode(args, mode, trace)
        except Exception as e:  # noqa: BLE001 - a failed mode leaves the others' results
            print(f"{mode}: failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        print(f"{mode}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        with open(path, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "results": rows, "targets": targets(rows)},
                      f, indent=1, default=str)
    print_table(rows)
    for line in targets(rows):
        print(line)
    print(f"json: {path}")
    return 0 if rows and all(r["errors"] == 0 for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
