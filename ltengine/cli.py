"""Command line: ``ltengine generate | qa | info`` (also ``python -m ltengine``)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .config import SCORES

KV_DTYPE_CHOICES = ("auto", "fp8", "bfloat16", "float16", "float32")  # --kv-dtype (EngineConfig.kv_dtype)
DEMO_QUESTION = "Who is Mr. Bingley, and what does Mrs. Bennet want from him?"


# argparse types: a bad value fails at parse time (exit 2), before torch or the model load
def _arg_type(name: str, convert, check, allowed: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not check(value):
            raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}")
        return value
    parse.__name__ = name
    return parse


_positive = _arg_type("positive int", int, lambda v: v >= 1, "must be an integer >= 1")
_nonnegative = _arg_type("int", int, lambda v: v >= 0, "must be an integer >= 0")
_fraction = _arg_type("fraction", float, lambda v: 0.0 <= v <= 1.0, "must be a number in [0, 1]")
_finite = _arg_type("number", float, math.isfinite, "must be a finite number")


def _budget(text: str) -> int:
    from .config import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="local path, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype (default float32)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--backend", default=None, choices=["reference"], help="force the pure-PyTorch kernels")
    g.add_argument("--kv-dtype", default=None, choices=KV_DTYPE_CHOICES,
                   help="what the KV cache stores: auto (the weights' dtype) or fp8 (float8_e4m3fn + per-token scales)")
    lz = p.add_argument_group("lazy layers (LightTransfer-Test)")
    lz.add_argument("--fraction", type=_fraction, default=None, help="share of layers made lazy, 0..1 (0 = full attention)")
    lz.add_argument("--sink", type=_positive, default=None, help="sink tokens kept by a lazy layer")
    lz.add_argument("--window", type=_positive, default=None, help="recent tokens kept by a lazy layer")
    lz.add_argument("--probe", type=_positive, default=None, help="last prompt queries that score a layer")
    lz.add_argument("--policy", default=None, help="lighttransfer | topk | random | streaming | comma-separated layers")
    lz.add_argument("--score", default=None, choices=list(SCORES), help="how layers are scored (LazyConfig.score)")
    lz.add_argument("--kv-budget", type=_budget, default=None, help="KV bytes the call may hold, e.g. 512MiB (then the budget decides)")
    p.add_argument("--max-new-tokens", type=_positive, default=None, help="tokens to generate, >= 1")
    p.add_argument("--temperature", type=_finite, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=_finite, default=1.0)
    p.add_argument("--top-k", type=_nonnegative, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)


def _lazy(args):
    """The LazyConfig the flags ask for (ValueError for a bad combination)."""
    from .config import LazyConfig
    from .engine import DEFAULT_MODEL_LAZY

    base = DEFAULT_MODEL_LAZY if args.model is None else LazyConfig()
    fields = {k: getattr(args, k) for k in ("fraction", "sink", "window", "probe", "score") if getattr(args, k) is not None}
    if args.policy:
        if args.policy[0].isdigit():
            try:
                fields["policy"] = tuple(int(x) for x in args.policy.split(","))
            except ValueError:
                raise ValueError(f"--policy {args.policy!r}: a layer list is comma-separated integers, e.g. 3,7,12") from None
        else:
            fields["policy"] = args.policy
    return LazyConfig(**{**base.__dict__, **fields})


def _sampling(args, default_tokens: int) -> dict:
    """generate() keyword arguments, checked by SamplingParams (ValueError for a bad value)."""
    from .config import SamplingParams

    kw = dict(max_new_tokens=default_tokens if args.max_new_tokens is None else args.max_new_tokens,
              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    SamplingParams(**kw)
    return kw


def _device(name: str | None) -> str:
    """``name``, or the default device; ValueError when this machine cannot run on it."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {name}: CUDA is not available ({why}, torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (0..{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: ltengine runs on cpu or cuda, not {device.type}")
    return name


def _read_text(path: str, option: str) -> str:
    """A UTF-8 text file's contents; ValueError naming the file when it is missing, binary or empty."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {path}: is a directory; give a text file")
    if not p.is_file():
        raise ValueError(f"{option} {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{option} {path}: not UTF-8 text (a binary file?): byte {e.start} cannot be decoded") from None
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot be read ({e.strerror})") from None
    if "\x00" in text:
        raise ValueError(f"{option} {path}: holds NUL bytes, not text (a binary file?)")
    if not text.strip():
        raise ValueError(f"{option} {path}: the file is empty")
    return text


def _checked(args, default_tokens: int) -> tuple:
    """Everything the command needs that can be checked before the model loads (30+ s on a first run):
    the lazy config, the sampling settings, the model path and the device."""
    from .loading import resolve_source

    lazy, sampling = _lazy(args), _sampling(args, default_tokens)
    resolve_source(args.model)  # a path that does not exist, a directory that is not a model
    return lazy, sampling, _device(args.device)


def _engine(args, lazy, device):
    from . import Engine

    print(f"loading {args.model or 'SmolLM2-135M-Instruct (embedded)'} on {device} ...", file=sys.stderr)
    return Engine.from_pretrained(args.model, lazy=lazy, kv_budget=args.kv_budget, dtype=args.dtype,
                                  device=device, backend=args.backend, kv_dtype=args.kv_dtype)


def _print_result(out) -> None:
    print(out.text.strip())
    print(f"\n[ltengine] {out.summary()} | finish: {out.finish_reason}", file=sys.stderr)


def cmd_generate(args) -> int:
    if (args.prompt is None) == (args.file is None):
        raise SystemExit("ltengine generate: give a prompt or --file FILE (one of them)")
    text = _read_text(args.file, "--file") if args.file else args.prompt
    if not text.strip():
        raise ValueError("the prompt is empty")
    lazy, kw, device = _checked(args, 64)
    engine = _engine(args, lazy, device)
    if args.chat:
        out = engine.chat([{"role": "user", "content": text}], **kw)
    else:
        out = engine.generate(text, **kw)
    _print_result(out)
    return 0


def cmd_qa(args) -> int:
    from .data import chapter

    if args.doc:
        document = _read_text(args.doc, "--doc")
        name = args.doc
    else:
        document = "\n\n".join(chapter(n) for n in args.chapters)
        name = f"Pride and Prejudice, chapters {', '.join(map(str, args.chapters))} (shipped with ltengine)"
    questions = list(args.question or [])
    if args.questions:
        questions += [line.strip() for line in _read_text(args.questions, "--questions").splitlines() if line.strip()]
    questions = questions or [DEMO_QUESTION]
    empty = [n for n, q in enumerate(questions) if not q.strip()]
    if empty:
        raise ValueError(f"--question is empty (question {empty[0] + 1})")
    lazy, kw, device = _checked(args, 96)
    engine = _engine(args, lazy, device)
    print(f"document: {name}, {len(document)} characters", file=sys.stderr)
    # one document session: the document is prefilled once, the questions decode as one batch
    with engine.document(document, mode=args.mode) as doc:
        print(f"document prefilled once: {doc.doc_tokens} tokens in {doc.prefill_s:.2f} s "
              f"(session mode {doc.mode!r}; each question's own prefill and decode follow)", file=sys.stderr)
        outs = doc.ask_many(questions, **kw)
    if len(questions) == 1:
        print(f"question: {questions[0]}\n", file=sys.stderr)
        _print_result(outs[0])
        return 0
    for q, out in zip(questions, outs):
        print(f"\nQ: {q}")
        _print_result(out)
    return 0


def cmd_info(args) -> int:
    import torch

    from .kernels import available_backends, get_backend

    device = torch.device(_device(args.device))
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
    q.add_argument("--question", action="append", help="a question (repeat for several, answered as one batch; "
                   "default: one about the shipped chapters)")
    q.add_argument("--questions", help="a text file of questions, one a line")
    q.add_argument("--mode", default=None, choices=["question", "context"],
                   help="document session: lazy layers chosen per question (default) or once on the document's tail")
    _add_model_args(q)
    q.set_defaults(func=cmd_qa)
    i = sub.add_parser("info", help="which kernel backend runs each op")
    i.add_argument("--device", default=None)
    i.add_argument("--backend", default=None, choices=["reference"])
    i.set_defaults(func=cmd_info)
    from .eval.cli import add_subcommands
    add_subcommands(sub)  # profile, eval (ltengine/eval/)
    from .serve.cli import add_subcommand as add_serve
    add_serve(sub)  # serve (ltengine/serve/)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        print(f"ltengine: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
