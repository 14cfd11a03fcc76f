"""RULER's session configs (``session-context``, ``session-question``, ``session-full``), batched across documents.

Per chunk of samples (as many documents as ``chunk_tokens`` prompt tokens and the largest CUDA-graph
bucket allow), ``engine.documents`` prefills each sample's prompt up to its question (token ids,
``template=False``: the very prompt the harness configs see) and every question (question, the
template's end, the answer prefix) is added on its document and decoded greedily as one batch across
the documents. Configs of one LazyConfig share the prefill: the question-mode documents serve the
context-mode config through ``DocumentBatch.context_view`` (the same lazy layers and tokens as a
context-mode prefill, tested), so ``session-context`` and ``session-question`` cost one prefill per
document. A question is stopped once every answer is in its text, as the harness stops its sequences
(RULER's ``string_match_all`` cannot change after that).
"""
from __future__ import annotations

import time

from tqdm.auto import tqdm

from ..config import SamplingParams
from ..runners.paged_batch import BUCKETS
from ..session_batch import pack
from .ruler_configs import RulerConfig
from .ruler_prompt import RulerSample, record, string_match_all

MAX_SESSION_BATCH = BUCKETS[-1]  # the paged runner's largest CUDA-graph bucket: beyond it, a graph per batch size


def session_chunks(samples: list[RulerSample], tokens: int) -> list[list[RulerSample]]:
    """Consecutive samples, as many per chunk as fit ``tokens`` prompt tokens (one at least) and
    ``MAX_SESSION_BATCH``."""
    return pack(samples, lambda s: len(s.ids), tokens, MAX_SESSION_BATCH)


def run_sessions(engine, samples: list[RulerSample], configs: list[RulerConfig], chunk_tokens: int | None = None,
                 desc: str = "sessions") -> list[dict]:
    """Records for session configs (``chunk_tokens`` prompt tokens of documents per batch; default 256k
    on CUDA, 32k elsewhere); each record's ``chunk_prefill_s`` is its chunk's document prefill (or, for
    a config on another's prefill, named in ``prefill_shared_with``, making the view)."""
    cap = chunk_tokens or (262144 if engine.adapter.device.type == "cuda" else 32768)
    families: dict = {}  # one prefill per LazyConfig: question mode first, it can serve context mode
    for cfg in configs:
        families.setdefault(cfg.lazy(), []).append(cfg)
    records = []
    bar = tqdm(total=len(samples) * len(configs), desc=f"{desc} {','.join(c.key for c in configs)}", unit="prompt")
    for group in session_chunks(samples, cap):
        ids = [s.document_ids for s in group]
        for lazy, cfgs in families.items():
            cfgs = sorted(cfgs, key=lambda c: c.mode != "question")
            base = cfgs[0]
            t0 = time.perf_counter()
            with engine.documents(ids, lazy=lazy, mode=base.mode, template=False) as docs:
                t_docs = time.perf_counter() - t0
                for cfg in cfgs:
                    if cfg.mode == base.mode:
                        records += _ask(engine, docs, group, cfg, t_docs, None)
                        continue
                    t1 = time.perf_counter()
                    with docs.context_view() as view:
                        records += _ask(engine, view, group, cfg, time.perf_counter() - t1, base.key)
            bar.update(len(group) * len(cfgs))
    bar.close()
    return records


def _ask(engine, docs, group: list[RulerSample], cfg: RulerConfig, prefill_s: float, shared: str | None) -> list[dict]:
    """Sample i's question on document i of ``docs``, all decoded as one batch; one record each."""
    decode = lambda t: engine.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    t0 = time.perf_counter()
    rids = [docs.add(i, s.question_ids, SamplingParams(max_new_tokens=s.max_new_tokens)) for i, s in enumerate(group)]
    sample = dict(zip(rids, group))
    outs, tokens = {}, {}
    while docs.has_unfinished():
        for out in docs.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                outs[out.request_id] = out.output
            elif string_match_all(decode(tokens[out.request_id]), sample[out.request_id].answers) == 1.0:
                outs[out.request_id] = docs.stop(out.request_id)
    extra = dict(chunk_size=len(group), chunk_prefill_s=round(prefill_s, 3),
                 chunk_decode_s=round(time.perf_counter() - t0, 3), prefill_shared_with=shared)
    return [record(s, cfg.key, outs[r].text, outs[r].lazy_layers, extra) for r, s in zip(rids, group)]
