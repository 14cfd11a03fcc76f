"""``ltengine serve [MODEL]``: load the engine, start its loop thread and the HTTP server (uvicorn).

SIGTERM / Ctrl-C: stop accepting, let in-flight requests finish for ``--shutdown-timeout`` seconds,
abort the rest, exit."""
from __future__ import annotations

import argparse
import inspect
import logging
import os
import signal
import sys

from ..cli import KV_DTYPE_CHOICES
from ..config import SCORES


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the [serve] extra)",
                              description="Serve MODEL over the OpenAI API: /v1/completions, /v1/chat/completions, "
                                          "/v1/models, /health, /metrics.")
    p.add_argument("model", nargs="?", default=None,
                   help="local path, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: from MODEL)")
    p.add_argument("--kv-budget", default=None, help="KV bytes the engine may hold, e.g. 40GiB (admission waits for room)")
    p.add_argument("--fraction", type=float, default=None, help="share of layers made lazy, 0..1 (0 = full attention)")
    p.add_argument("--window", type=int, default=None, help="recent tokens a lazy layer keeps")
    p.add_argument("--sink", type=int, default=None, help="first tokens a lazy layer keeps")
    p.add_argument("--score", default=None, choices=list(SCORES), help="how layers are scored")
    p.add_argument("--policy", default=None, help="lighttransfer | topk | random | streaming | comma-separated layers")
    p.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + max_tokens (default: the model's context)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="requests waiting for KV beyond which new ones get 503 + Retry-After (default: no limit)")
    p.add_argument("--api-key", default=os.environ.get("LTENGINE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LTENGINE_API_KEY, else open)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--kv-dtype", default=None, choices=KV_DTYPE_CHOICES,
                   help="what the KV cache stores: auto (the weights' dtype) or fp8 (float8_e4m3fn + per-token scales)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="shard the model over N GPUs of this host (ranks 1..N-1 are spawned; README 'Tensor parallelism')")
    p.add_argument("--interleave-layers", type=int, default=0,
                   help="between every k layers of a prefill, one decode step of the running requests (0 = off)")
    p.add_argument("--max-body-bytes", type=int, default=None, help="request bodies over this get 413 (default 4 MiB)")
    p.add_argument("--shutdown-timeout", type=int, default=30,
                   help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def _lazy(args):
    from ..config import LazyConfig
    from ..engine import DEFAULT_MODEL_LAZY

    base = DEFAULT_MODEL_LAZY if args.model is None else LazyConfig()
    fields = {k: getattr(args, k) for k in ("fraction", "sink", "window", "score") if getattr(args, k) is not None}
    if args.policy:
        fields["policy"] = tuple(int(x) for x in args.policy.split(",")) if args.policy[0].isdigit() else args.policy
    return LazyConfig(**{**base.__dict__, **fields})


def build_server(args):
    """(uvicorn.Server, EngineLoop) for parsed ``serve`` arguments; raises ValueError on bad ones."""
    try:
        import uvicorn

        from .app import MAX_BODY_BYTES, create_app
        from .loop import EngineLoop
        from .metrics import ServerMetrics
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"{e}; install the server's dependencies: pip install -e '.[serve]'") from None
    import torch

    from ..engine import Engine

    for name in ("max_model_len", "max_waiting", "max_body_bytes"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "max_waiting" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'max_waiting' else '>= 1'}, got {value}")
    if args.interleave_layers < 0:
        raise ValueError(f"--interleave-layers must be >= 0 (0 = off), got {args.interleave_layers}")
    lazy = _lazy(args)
    from ..config import parse_bytes

    parse_bytes(args.kv_budget)  # a bad size fails here, before the model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    kwargs = {"interleave_layers": args.interleave_layers} if engine_accepts("interleave_layers") else {}
    if args.interleave_layers and not kwargs:
        raise ValueError("--interleave-layers: this engine build has no interleaved prefill")
    if args.tensor_parallel != 1:
        kwargs["tensor_parallel"] = args.tensor_parallel
    print(f"ltengine serve: loading {args.model or 'SmolLM2-135M-Instruct (embedded)'} on {device} ...", file=sys.stderr)
    if args.kv_dtype is not None:
        kwargs["kv_dtype"] = args.kv_dtype
    engine = Engine.from_pretrained(args.model, lazy=lazy, kv_budget=args.kv_budget, dtype=args.dtype, device=device,
                                    **kwargs)
    names = [args.served_model_name or _model_name(args.model)]
    if args.model and args.model not in names:
        names.append(args.model)  # the path / hub id as given works as a name too
    metrics = ServerMetrics(engine.num_layers)
    loop = EngineLoop(engine, metrics, max_waiting=args.max_waiting, max_model_len=args.max_model_len)
    metrics.attach(loop)
    app = create_app(loop, metrics, names, lazy, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes or MAX_BODY_BYTES)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=args.log_level == "debug")
    return uvicorn.Server(config), loop


def engine_accepts(name: str) -> bool:
    """Whether ``Engine(...)`` takes the keyword ``name`` (its own or an ``EngineConfig`` field)."""
    import dataclasses

    from .. import engine as E

    if name in inspect.signature(E.Engine.__init__).parameters:
        return True
    config = getattr(E, "EngineConfig", None)
    return config is not None and dataclasses.is_dataclass(config) and name in {f.name for f in dataclasses.fields(config)}


def _model_name(model: str | None) -> str:
    if model is None:
        return "SmolLM2-135M-Instruct"
    return os.path.basename(os.path.normpath(model)) if os.path.exists(model) else model


def cmd_serve(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    server, loop = build_server(args)
    print(f"ltengine serve: http://{args.host}:{args.port}/v1", file=sys.stderr)
    # uvicorn handles SIGINT / SIGTERM (stop accepting, drain, lifespan shutdown aborts the rest), then
    # re-raises the signal under the previous handler: make that a clean exit instead of a kill
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_after_drain)
    try:
        server.run()
    except SystemExit:
        pass
    return 0 if loop.error is None else 1


def _exit_after_drain(signum, frame) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltengine.serve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommand(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"ltengine serve: error: {e}", file=sys.stderr)
        return 2
