"""``ltengine eval ruler``: RULER's synthetic tasks over lazy configs, one shared prefill per prompt.

Harness configs (full, lighttransfer at a score and fraction, random, streaming) decode from one
prefill per prompt (``harness.shared_prefill``), as passkey and NIAH do; every distinct layer set of
a chunk of prompts decodes together as one padded batch (``ruler_decode.batched_greedy``), each
sequence finishing at EOS, at its task's ``max_new_tokens``, or once every answer is in its text
(RULER's ``string_match_all`` cannot change after that). The batch runs other matrix shapes and a
plain matmul attention instead of the backend's kernels, so a near-tie can resolve differently from
``Engine.generate`` (the per-prompt passkey harness is the bit-exact one). Session configs prefill each
document through ``Engine.documents`` (many documents per batch; one prefill serves both modes) and
decode the questions as one batch across the documents (``ruler_sessions.run_sessions``); they are
reported as skipped (with the reason) where the engine has no ``documents``.
"""
from __future__ import annotations

import time

from tqdm.auto import tqdm

from .harness import shared_prefill
from .ruler_decode import Job, batched_greedy
from .ruler_configs import RulerConfig
from .ruler_sessions import run_sessions  # noqa: F401 - commands.ruler runs the session configs through it
from .ruler_prompt import record
from .ruler_tasks import RulerSample, make_sample, novel_sentences, novel_words


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


def run_harness(engine, samples: list[RulerSample], configs: list[RulerConfig], chunk: int = 4,
                desc: str = "ruler") -> list[dict]:
    """Records for the harness configs: per chunk of samples, one prefill each, then one batched decode."""
    adapter, tok = engine.adapter, engine.tokenizer
    decode = lambda t: tok.decode(t, skip_special_tokens=True)  # noqa: E731
    max_probe = max(c.probe for c in configs)
    records = []
    bar = tqdm(total=len(samples), desc=desc, unit="prompt")
    for c0 in range(0, len(samples), chunk):
        group, jobs, plan, prefills = samples[c0:c0 + chunk], [], [], []
        t0 = time.perf_counter()
        for s in group:
            sp = shared_prefill(adapter, s.ids, max_probe)
            prefills.append(sp)
            done: dict = {}
            for cfg in configs:
                ec = cfg.eval_config(len(s.ids), sp.num_layers)
                layers = ec.lazy_layers(sp, s.index)
                key = (tuple(layers), ec.sink, ec.window) if layers else ()
                if key not in done:
                    done[key] = len(jobs)
                    jobs.append(Job(sp.full, frozenset(layers), ec.sink, ec.window, sp.logits, len(s.ids),
                                    s.max_new_tokens, s.answers))
                plan.append((s, cfg, layers, done[key], ec.window))
        t_prefill = time.perf_counter() - t0
        outs = batched_greedy(adapter, jobs, engine.eos_ids, decode)
        for sp in prefills:
            sp.release()
        t_decode = time.perf_counter() - t0 - t_prefill
        for s, cfg, layers, j, window in plan:
            records.append(record(s, cfg.key, decode(outs[j]), layers,
                                   dict(window=window, chunk_prefill_s=round(t_prefill, 3),
                                        chunk_decode_s=round(t_decode, 3))))
        bar.update(len(group))
    bar.close()
    return records


def run_engine(engine, samples: list[RulerSample], configs: list[RulerConfig], chunk: int = 4,
               desc: str = "engine") -> list[dict]:
    """Records for configs whose prefill is their own (kind "engine": streaming prefill): per config, the
    samples in chunks through ``engine.generate`` (greedy, each its own ``max_new_tokens``)."""
    records = []
    for cfg in configs:
        lazy = cfg.lazy()
        for c0 in tqdm(range(0, len(samples), chunk), desc=f"{desc} {cfg.key}", unit="chunk"):
            group = samples[c0:c0 + chunk]
            t0 = time.perf_counter()
            outs = engine.generate([s.ids for s in group], max_new_tokens=[s.max_new_tokens for s in group], lazy=lazy)
            wall = round(time.perf_counter() - t0, 3)
            for s, out in zip(group, outs):
                records.append(record(s, cfg.key, out.text, out.lazy_layers or [], dict(chunk_s=wall)))
    return records


def sessions_missing(engine) -> str | None:
    """Why session configs cannot run on this engine, or None."""
    if not callable(getattr(type(engine), "documents", None)):
        return "Engine.documents is missing (document sessions, issue #13 part 1, are not in this build)"
    return None
