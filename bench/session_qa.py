"""Document sessions vs separate answers: 8 questions on one ~6k-token document (CPU, default model).

    OMP_NUM_THREADS=1 python3 bench/session_qa.py                 # question-scored sessions (the default)
    OMP_NUM_THREADS=1 python3 bench/session_qa.py --mode context  # context-scored
    python3 bench/session_qa.py --tokens 2000 --new-tokens 16     # a quicker run

Measures, on the embedded SmolLM2-135M-Instruct with the engine's default lazy config (fp32, CPU):

1. one session, ``ask_many``: ``engine.document(doc)`` (one prefill of the document) + all questions
   decoded as one batch;
2. one session, ``ask`` one question at a time;
3. ``engine.answer(doc, q)`` for each question: each call prefills document + question again.

Every timed call is wall-clock (``time.perf_counter``) around the whole call, after one warm-up
``answer`` on a short text. Greedy decoding, ``--new-tokens`` each (EOS may end one earlier). Prints
the times, the speed-up of (1) and (2) over (3), and how many answers are token-identical between
the session and the separate calls (question-scored sessions score each question on the same last
``probe`` tokens as a fresh prefill, so they agree unless a question's own tokens are fewer than the
probe; context-scored ones choose other lazy layers and need not agree).
"""
from __future__ import annotations

import argparse
import time

QUESTIONS = [
    "Who has taken Netherfield Park?",
    "How many daughters do Mr. and Mrs. Bennet have?",
    "What does Mrs. Bennet want her husband to do?",
    "Which daughter does Mr. Bennet prefer, and why?",
    "What is said about Mr. Darcy at the ball?",
    "Who is Charlotte Lucas?",
    "How does Elizabeth feel about Mr. Darcy's remark?",
    "What is Mr. Bingley's income said to be?",
]


def document(engine, tokens: int) -> str:
    """Chapters of the shipped novel from chapter 1 on, cut at a paragraph so that the QA prompt
    holds about ``tokens`` tokens."""
    from ltengine.data import book_text

    paras, text = book_text().split("\n\n"), ""
    for p in paras:
        nxt = f"{text}\n\n{p}" if text else p
        if len(engine.prompts.qa(nxt, "?")) > tokens:
            break
        text = nxt
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=6000, help="document + template tokens (default 6000)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--mode", default="question", choices=["question", "context"])
    args = ap.parse_args()
    import torch

    from ltengine import Engine

    engine = Engine.from_pretrained(None, progress=False)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, runner {engine.runner_kind} "
          f"(sessions: paged), lazy {engine.lazy}")
    doc = document(engine, args.tokens)
    qs = QUESTIONS[:args.questions]
    n_doc = len(engine.prompts.qa(doc, qs[0]))
    print(f"document: {len(doc)} characters, {n_doc} prompt tokens with the first question; "
          f"{len(qs)} questions, {args.new_tokens} new tokens each, mode {args.mode}")
    engine.answer("A short warm-up text.", "What is it?", max_new_tokens=4)
    kw = dict(max_new_tokens=args.new_tokens)

    t0 = time.perf_counter()
    with engine.document(doc, mode=args.mode) as s:
        t_doc = time.perf_counter() - t0
        batch = s.ask_many(qs, **kw)
    t_many = time.perf_counter() - t0
    print(f"session ask_many: {t_many:.1f} s (document prefill {t_doc:.1f} s)", flush=True)
    t0 = time.perf_counter()
    with engine.document(doc, mode=args.mode) as s:
        one = [s.ask(q, **kw) for q in qs]
    t_one = time.perf_counter() - t0
    print(f"session ask one by one: {t_one:.1f} s", flush=True)
    t0 = time.perf_counter()
    sep = [engine.answer(doc, q, **kw) for q in qs]
    t_sep = time.perf_counter() - t0
    print(f"{len(qs)} answer calls: {t_sep:.1f} s", flush=True)

    same_batch = sum(a.token_ids == b.token_ids for a, b in zip(batch, sep))
    same_one = sum(a.token_ids == b.token_ids for a, b in zip(one, sep))
    new = sum(len(o.token_ids) for o in sep)
    print(f"\n| way ({len(qs)} questions, ~{n_doc}-token document) | wall s | vs {len(qs)} answer calls |")
    print("|---|---|---|")
    print(f"| one session, ask_many (document prefill {t_doc:.1f} s) | {t_many:.1f} | {t_sep / t_many:.2f}x |")
    print(f"| one session, ask one by one | {t_one:.1f} | {t_sep / t_one:.2f}x |")
    print(f"| {len(qs)} answer calls (each prefills document + question) | {t_sep:.1f} | 1.00x |")
    print(f"\nanswers token-identical to the separate calls: ask_many {same_batch}/{len(qs)}, ask {same_one}/{len(qs)}; "
          f"{new} new tokens over the separate calls")
    print(f"lazy layers: session questions {[o.lazy_layers for o in batch[:2]]}..., separate {[o.lazy_layers for o in sep[:2]]}...")
    for q, a in zip(qs[:3], batch):
        print(f"  Q: {q}\n  A: {a.text.strip()[:120]!r}")
    print(f"\nspeed-up ask_many {t_sep / t_many:.2f}x (target >= 4x), ask one by one {t_sep / t_one:.2f}x")


if __name__ == "__main__":
    main()
