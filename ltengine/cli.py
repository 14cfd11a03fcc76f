"""Command line: ``ltengine generate | qa | info``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_QUESTION = "Who is Mr. Bingley, and what does Mrs. Bennet want from him?"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="local path, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype (default float32)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--backend", default=None, choices=["reference"], help="force the pure-PyTorch kernels")
    lz = p.add_argument_group("lazy layers (LightTransfer-Test)")
    lz.add_argument("--fraction", type=float, default=None, help="share of layers made lazy, 0..1 (0 = full attention)")
    lz.add_argument("--sink", type=int, default=None, help="sink tokens kept by a lazy layer")
    lz.add_argument("--window", type=int, default=None, help="recent tokens kept by a lazy layer")
    lz.add_argument("--probe", type=int, default=None, help="last prompt queries that score a layer")
    lz.add_argument("--policy", default=None, help="lighttransfer | topk | random | streaming | comma-separated layers")
    lz.add_argument("--score", default=None, choices=["ratio", "peak"], help="how layers are scored (LazyConfig.score)")
    lz.add_argument("--kv-budget", default=None, help="KV bytes the call may hold, e.g. 512MiB (then the budget decides)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _engine(args):
    import torch

    from . import Engine, LazyConfig
    from .engine import DEFAULT_MODEL_LAZY

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = DEFAULT_MODEL_LAZY if args.model is None else LazyConfig()
    fields = {k: getattr(args, k) for k in ("fraction", "sink", "window", "probe", "score") if getattr(args, k) is not None}
    if args.policy:
        fields["policy"] = (tuple(int(x) for x in args.policy.split(",")) if args.policy[0].isdigit() else args.policy)
    lazy = LazyConfig(**{**base.__dict__, **fields})
    print(f"loading {args.model or 'SmolLM2-135M-Instruct (embedded)'} on {device} ...", file=sys.stderr)
    return Engine.from_pretrained(args.model, lazy=lazy, kv_budget=args.kv_budget, dtype=args.dtype,
                                  device=device, backend=args.backend)


def _sampling(args, default_tokens: int) -> dict:
    return dict(max_new_tokens=args.max_new_tokens or default_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def _print_result(out) -> None:
    print(out.text.strip())
    print(f"\n[ltengine] {out.summary()} | finish: {out.finish_reason}", file=sys.stderr)


def cmd_generate(args) -> int:
    if (args.prompt is None) == (args.file is None):
        raise SystemExit("ltengine generate: give a prompt or --file FILE (one of them)")
    text = Path(args.file).read_text(encoding="utf-8") if args.file else args.prompt
    engine = _engine(args)
    kw = _sampling(args, 64)
    if args.chat:
        out = engine.chat([{"role": "user", "content": text}], **kw)
    else:
        out = engine.generate(text, **kw)
    _print_result(out)
    return 0


def cmd_qa(args) -> int:
    from .data import chapter

    if args.doc:
        document = Path(args.doc).read_text(encoding="utf-8")
        name = args.doc
    else:
        document = "\n\n".join(chapter(n) for n in args.chapters)
        name = f"Pride and Prejudice, chapters {', '.join(map(str, args.chapters))} (shipped with ltengine)"
    engine = _engine(args)
    print(f"document: {name}, {len(document)} characters\nquestion: {args.question}\n", file=sys.stderr)
    out = engine.answer(document, args.question, **_sampling(args, 96))
    _print_result(out)
    return 0


def cmd_info(args) -> int:
    import torch

    from .kernels import available_backends, get_backend

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"torch {torch.__version__}, device {device}")
    print("selected:", get_backend(device, prefer=args.backend).describe())
    print("available:", available_backends(device))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ltengine", description="LightTransfer-Test inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate from a prompt or a file")
    g.add_argument("prompt", nargs="?")
    g.add_argument("--file", help="read the prompt from this text file")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)
    q = sub.add_parser("qa", help="answer a question about a long document (default: chapters of a shipped novel)")
    q.add_argument("--doc", help="text file of the document (default: shipped Pride and Prejudice chapters)")
    q.add_argument("--chapters", type=int, nargs="+", default=[1, 2, 3], help="chapters used when --doc is not given")
    q.add_argument("--question", default=DEMO_QUESTION)
    _add_model_args(q)
    q.set_defaults(func=cmd_qa)
    i = sub.add_parser("info", help="which kernel backend runs each op")
    i.add_argument("--device", default=None)
    i.add_argument("--backend", default=None, choices=["reference"])
    i.set_defaults(func=cmd_info)
    from .eval.cli import add_subcommands
    add_subcommands(sub)  # profile, eval (ltengine/eval/)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"ltengine: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
