"""``ltengine eval ruler``: RULER's synthetic tasks over lazy configs, one shared prefill per prompt.

Harness configs (full, lighttransfer at a score and fraction, random, streaming) decode from copies of
one prefill per prompt (``harness.shared_prefill``), as passkey and NIAH do; the caches of a chunk of
prompts (and of every distinct layer set per prompt) decode together as one batch, one
``reference.decode_step`` per token, each sequence leaving the batch at EOS, at its task's
``max_new_tokens``, or once every answer is in its text (RULER's ``string_match_all`` cannot change
after that). Batched steps run the projections at another matrix shape than a single-sequence step,
so a near-tie can resolve differently from ``Engine.generate`` (the per-prompt passkey harness is the
bit-exact one). Session configs prefill the document once per config through ``Engine.document``
and ask the question; they are reported as skipped (with the reason) where the engine has no
``document``.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..runners.reference import decode_step
from .harness import shared_prefill
from .ruler_configs import RulerConfig
from .ruler_tasks import RulerSample, make_sample, novel_sentences, novel_words, string_match_all, string_match_part


_TOKENIZER = None  # the forked workers' tokenizer (inherited, never pickled)


def _make(job: tuple) -> RulerSample:
    return make_sample(_TOKENIZER, *job)


def make_samples(tokenizer, tasks: list[str], lengths: list[int], n: int, seed: int,
                 workers: int = 1) -> list[RulerSample]:
    """``n`` samples per (task, length); sample i of a cell depends only on (seed, task, length, i).
    ``workers`` > 1 tokenizes in forked processes (the same samples, in the same order)."""
    global _TOKENIZER
    jobs = [(t, L, seed, i) for L in lengths for t in tasks for i in range(n)]
    if workers <= 1 or len(jobs) < 2 * workers:
        return [make_sample(tokenizer, *j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    _TOKENIZER = tokenizer
    novel_sentences(), novel_words()  # built once here, inherited by the workers
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            return list(pool.map(_make, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    finally:
        _TOKENIZER = None


@torch.inference_mode()
def greedy_batch(adapter, backend, jobs: list[dict], eos_ids: set[int], decode) -> list[list[int]]:
    """Greedy-decode many caches together. A job: ``cache`` (room for its prompt + max_new tokens),
    ``logits`` (``[V]`` after its prompt), ``prompt_len``, ``max_new``, ``answers``. Caches are released."""
    tokens = [[int(j["logits"].argmax())] for j in jobs]

    def finished(i: int) -> bool:
        t, j = tokens[i], jobs[i]
        return t[-1] in eos_ids or len(t) >= j["max_new"] or string_match_all(decode(t), j["answers"]) == 1.0

    active = [i for i in range(len(jobs)) if not finished(i)]
    for i in set(range(len(jobs))) - set(active):
        jobs[i]["cache"].release()
    dev = adapter.device
    while active:
        tok = torch.tensor([tokens[i][-1] for i in active], device=dev)
        pos = torch.tensor([jobs[i]["prompt_len"] + len(tokens[i]) - 1 for i in active], device=dev)
        nxt = decode_step(adapter, [jobs[i]["cache"] for i in active], tok, pos, backend).argmax(-1).tolist()
        still = []
        for i, t in zip(active, nxt):
            tokens[i].append(int(t))
            if finished(i):
                jobs[i]["cache"].release()
            else:
                still.append(i)
        active = still
    return tokens


def _record(s: RulerSample, cfg: RulerConfig, text: str, layers, extra: dict) -> dict:
    return dict(task=s.task, length=s.length, sample=s.index, config=cfg.key, prompt_tokens=len(s.ids),
                answers=s.answers, output=text, lazy_layers=list(layers), all=string_match_all(text, s.answers),
                part=string_match_part(text, s.answers), **extra)


def run_harness(engine, samples: list[RulerSample], configs: list[RulerConfig], chunk: int = 4,
                desc: str = "ruler") -> list[dict]:
    """Records for the harness configs: per chunk of samples, one prefill each, then one batched decode."""
    adapter, backend, tok = engine.adapter, engine.backend, engine.tokenizer
    decode = lambda t: tok.decode(t, skip_special_tokens=True)  # noqa: E731
    max_probe = max(c.probe for c in configs)
    records = []
    bar = tqdm(total=len(samples), desc=desc, unit="prompt")
    for c0 in range(0, len(samples), chunk):
        group, jobs, plan = samples[c0:c0 + chunk], [], []
        t0 = time.perf_counter()
        for s in group:
            sp = shared_prefill(adapter, s.ids, max_probe)
            done: dict = {}
            for cfg in configs:
                ec = cfg.eval_config(len(s.ids), sp.num_layers)
                layers = ec.lazy_layers(sp, s.index)
                key = (tuple(layers), ec.sink, ec.window) if layers else ()
                if key not in done:
                    done[key] = len(jobs)
                    jobs.append(dict(cache=sp.build_cache(layers, ec.sink, ec.window, len(s.ids) + s.max_new_tokens,
                                                          backend),
                                     logits=sp.logits, prompt_len=len(s.ids), max_new=s.max_new_tokens,
                                     answers=s.answers))
                plan.append((s, cfg, layers, done[key], ec.window))
            sp.release()
        t_prefill = time.perf_counter() - t0
        outs = greedy_batch(adapter, backend, jobs, engine.eos_ids, decode)
        t_decode = time.perf_counter() - t0 - t_prefill
        for s, cfg, layers, j, window in plan:
            records.append(_record(s, cfg, decode(outs[j]), layers,
                                   dict(window=window, chunk_prefill_s=round(t_prefill, 3),
                                        chunk_decode_s=round(t_decode, 3))))
        bar.update(len(group))
    bar.close()
    return records


def sessions_missing(engine) -> str | None:
    """Why session configs cannot run on this engine, or None."""
    if not callable(getattr(type(engine), "document", None)):
        return "Engine.document is missing (document sessions, issue #13 part 1, are not in this build)"
    return None


def run_sessions(engine, samples: list[RulerSample], configs: list[RulerConfig], desc: str = "sessions") -> list[dict]:
    """Records for session configs: per sample and config, ``engine.document(instruction + context)``
    prefilled once, then ``.ask(question)`` greedily."""
    records = []
    for cfg in configs:
        for s in tqdm(samples, desc=f"{desc} {cfg.key}", unit="prompt"):
            t0 = time.perf_counter()
            doc = engine.document(s.document, lazy=cfg.lazy(), mode=cfg.mode)
            try:
                out = doc.ask(s.question, max_new_tokens=s.max_new_tokens)
            finally:
                doc.close()
            layers = getattr(out, "lazy_layers", None) or []
            records.append(_record(s, cfg, out.text, layers, dict(session_s=round(time.perf_counter() - t0, 3))))
    return records
