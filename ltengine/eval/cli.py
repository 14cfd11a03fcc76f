"""Arguments of ``ltengine profile`` and ``ltengine eval passkey|niah|ppl`` (registered by ``ltengine.cli``)."""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from ..config import POLICIES
from .scoring import RULES


def _list(kind):
    def parse(s: str):
        try:
            return [kind(x) for x in s.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {s!r}") from e
    return parse


def _policies(s: str) -> list[str]:
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [p for p in out if p != "full" and p not in POLICIES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown policies {bad}; choose from full, {', '.join(POLICIES)}")
    return out


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--model", default=None, help="local path, .gguf or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-dtype", default=None, choices=["auto", "fp8", "bfloat16", "float16", "float32"],
                   help="what the decode caches store (fp8: float8_e4m3fn + per-token scales; default: the weights' dtype)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--probe", type=int, default=64, help="last prompt queries that score a layer")
    p.add_argument("--score", default="ratio", choices=sorted(RULES),
                   help="layer scoring rule: ratio (the paper's lazy ratio), peak (LazyConfig(score='peak')), or a study rule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=out, help=f"output folder (default {out})")


def _grid_args(p: argparse.ArgumentParser, windows: str) -> None:
    p.add_argument("--policy", type=_policies, default=["lighttransfer", "topk", "random", "streaming"],
                   help="comma-separated: lighttransfer,topk,random,streaming (full attention is always included)")
    p.add_argument("--fraction", type=_list(float), default=[0.25, 0.5], help="lazy fractions, e.g. 0.25,0.5")
    p.add_argument("--window", type=_list(int), default=_list(int)(windows), help=f"windows (default {windows})")


def add_subcommands(sub) -> None:
    """Register ``profile`` and ``eval`` on the ``ltengine`` subparsers."""
    p = sub.add_parser("profile", help="per-layer lazy ratios over prompts -> JSON profile + PNG chart")
    p.add_argument("--task", default="passkey", choices=["passkey", "novel"], help="built-in prompts (unless --file)")
    p.add_argument("--file", nargs="+", default=None, help="text files, one prompt each (raw text)")
    p.add_argument("--n", type=int, default=8, help="built-in prompts per length")
    p.add_argument("--lengths", type=_list(int), default=[1500])
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--window", type=int, default=256)
    _common(p, "out/profile")
    p.set_defaults(func=cmd_profile)

    e = sub.add_parser("eval", help="passkey / needle-in-a-haystack / perplexity / RULER across lazy policies")
    tasks = e.add_subparsers(dest="task", required=True)
    pk = tasks.add_parser("passkey", help="pass key in novel text at a random depth; exact match")
    pk.add_argument("--n", type=int, default=50, help="prompts per length")
    pk.add_argument("--lengths", type=_list(int), default=[1500, 3000])
    pk.add_argument("--max-new-tokens", type=int, default=8)
    _grid_args(pk, "256,512")
    _common(pk, "out/eval")
    nh = tasks.add_parser("niah", help="needle in a haystack over a length x depth grid; heatmap per config")
    nh.add_argument("--n", type=int, default=4, help="needles per (length, depth) cell")
    nh.add_argument("--lengths", type=_list(int), default=[1000, 2000, 3000])
    nh.add_argument("--depths", type=_list(float), default=[0.0, 0.25, 0.5, 0.75, 1.0])
    nh.add_argument("--max-new-tokens", type=int, default=12)
    _grid_args(nh, "256")
    _common(nh, "out/eval")
    pp = tasks.add_parser("ppl", help="perplexity of novel text after a long prefix, lazy layers truncated")
    pp.add_argument("--n", type=int, default=2, help="text segments")
    pp.add_argument("--context", type=int, default=3840, help="prefix tokens prefilled (the policy decides here)")
    pp.add_argument("--scored", type=int, default=256, help="tokens scored by teacher-forced decode steps")
    pp.add_argument("--equal-bytes", action="store_true",
                    help="streaming at the window whose KV after prefill equals each fraction's (instead of --window)")
    _grid_args(pp, "256")
    _common(pp, "out/eval")
    for q in (pk, nh, pp):
        q.set_defaults(func=cmd_eval)
    _ruler_args(tasks.add_parser("ruler", help="RULER's synthetic tasks (NIAH x8, vt, cwe, fwe) x lengths x configs"))


def _lengths(s: str) -> list[int]:
    """"1k,2k,4096" -> [1024, 2048, 4096] (k = 1024, as RULER's 4k = 4096)."""
    out = []
    for x in (x.strip().lower() for x in s.split(",") if x.strip()):
        try:
            out.append(int(float(x[:-1]) * 1024) if x.endswith("k") else int(x))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"lengths are comma-separated token counts like 1k,2k,4096; got {x!r}") from e
    if not out or min(out) < 256:
        raise argparse.ArgumentTypeError(f"every length must be at least 256 tokens (the template and answer need room), got {s!r}")
    return out


def _ruler_args(p: argparse.ArgumentParser) -> None:
    from .ruler_configs import DEFAULT_CONFIGS
    from .ruler_tasks import TASKS

    p.add_argument("--lengths", type=_lengths, default=_lengths("1k,2k,4k,8k"),
                   help="prompt + generated tokens per sample, e.g. 1k,2k,4k,8k (k = 1024)")
    p.add_argument("--n", type=int, default=25, help="samples per task and length (RULER-style tables use >= 25)")
    p.add_argument("--tasks", type=_choices(TASKS), default=list(TASKS), help=f"comma-separated from {','.join(TASKS)}")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="comma-separated: full, ratio50, peak25, cover50, peak50-p64, rowmax50, headmin50, random50, streaming (equal KV "
                        "bytes to 50%% lazy), session-full, session-context, session-question")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--chunk", type=int, default=4, help="prompts prefilled, then decoded together as one batch")
    p.add_argument("--workers", type=int, default=1, help="processes that generate the samples (tokenizing)")
    p.add_argument("--model", default=None, help="local path, .gguf or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-dtype", default=None, choices=["auto", "fp8", "bfloat16", "float16", "float32"],
                   help="what the decode caches store (fp8: float8_e4m3fn + per-token scales; default: the weights' dtype)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="out/ruler", help="output folder (default out/ruler)")
    p.set_defaults(func=cmd_ruler)


def _choices(allowed):
    def parse(s: str) -> list[str]:
        out = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in out if x not in allowed]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"unknown {bad or s!r}; choose from {', '.join(allowed)}")
        return out
    return parse


def cmd_ruler(args, engine=None) -> int:
    """Validate everything the arguments say, then load the model and run (``commands.ruler``)."""
    from . import commands
    from .ruler_configs import parse_config

    try:
        configs = [parse_config(k, args.sink, args.window) for k in args.configs.split(",") if k.strip()]
    except ValueError as e:
        raise SystemExit(f"ltengine eval ruler: error: --configs: {e}")
    checks = [(args.n >= 1, f"--n must be >= 1, got {args.n}"), (args.chunk >= 1, f"--chunk must be >= 1, got {args.chunk}"),
              (args.workers >= 1, f"--workers must be >= 1, got {args.workers}"),
              (args.sink >= 0, f"--sink must be >= 0, got {args.sink}"), (args.window >= 1, f"--window must be >= 1, got {args.window}"),
              (bool(configs), "--configs is empty"), (len({c.key for c in configs}) == len(configs), f"--configs repeats a name: {args.configs}")]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(f"ltengine eval ruler: error: {msg}")
    engine = engine or _engine(args)
    paths = commands.ruler(engine, args.out, args.tasks, args.lengths, args.n, configs, args.seed, args.chunk,
                           _args_dict(args), workers=args.workers)
    print(Path(paths["md"]).read_text())
    _print_paths(paths)
    return 0


def _engine(args):
    import torch

    from ..engine import Engine
    from ..models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"loading {args.model or 'SmolLM2-135M-Instruct (embedded)'} on {args.device} ...", file=sys.stderr)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    return Engine(model, tok, lazy=None, kv_dtype=getattr(args, "kv_dtype", None))


def _args_dict(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def cmd_profile(args, engine=None) -> int:
    from . import commands
    from .tasks import novel_ids, passkey_sample

    engine = engine or _engine(args)
    if args.file:
        prompts = [engine.tokenizer(Path(f).read_text(encoding="utf-8"))["input_ids"] for f in args.file]
        sources = list(args.file)
    else:
        rng = random.Random(args.seed)
        prompts, sources = [], []
        book, _ = novel_ids(engine.tokenizer) if args.task == "novel" else (None, None)
        for L in args.lengths:
            for _ in range(args.n):
                if args.task == "passkey":
                    prompts.append(passkey_sample(engine.tokenizer, L, rng).ids)
                else:
                    start = rng.randrange(len(book) - L)
                    prompts.append(book[start:start + L])
                sources.append(f"{args.task} {L}")
    paths = commands.profile(engine, args.out, prompts, sources, args.fraction, args.sink, args.window,
                             args.probe, args.score, _args_dict(args))
    _print_paths(paths)
    return 0


def cmd_eval(args, engine=None) -> int:
    from . import commands

    engine = engine or _engine(args)
    configs = commands.grid_from_args(args, engine.num_layers)
    meta = _args_dict(args)
    if args.task == "passkey":
        paths = commands.passkey(engine, args.out, configs, args.lengths, args.n, args.seed, args.max_new_tokens, meta)
    elif args.task == "niah":
        paths = commands.niah(engine, args.out, configs, args.lengths, args.depths, args.n, args.seed,
                              args.max_new_tokens, meta)
    else:
        paths = commands.ppl(engine, args.out, configs, args.context, args.scored, args.n, args.seed, meta)
    print(Path(paths["md"]).read_text())
    _print_paths(paths)
    return 0


def _print_paths(paths: dict) -> None:
    for name, path in paths.items():
        print(f"[ltengine] wrote {name}: {path}", file=sys.stderr)
