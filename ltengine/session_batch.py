"""Many documents' sessions at once: prefilled together, their questions decoded as one batch.

``engine.documents([doc, doc, ...])`` is what a server or a pipeline with many documents needs (and
what the RULER harness runs): a ``DocumentSession`` per document (``batch[i]``, each usable alone),
whose prefills run as few layer-major batches as ``max_prefill_tokens`` allows
(``prefill_documents``), and one decode step for every question in flight on any of them
(``step_sessions``). All sessions of an engine share its sessions' paged runner, so on CUDA a step is
one paged decode (Triton, CUDA graphs per batch-size bucket) over questions of different documents;
on the CPU it is cascade attention per document (``runners/cascade.py``) inside one pass of the
layers, so the weights are read once per step for the whole batch. A question's own prefill on its
document (``runners/prefix.py``) and its lazy layers are the same as in a session of its own.
``context_view`` gives question-mode sessions their context-scored twins without a second prefill
(the RULER harness runs both session columns on one prefill per document).
"""
from __future__ import annotations

import copy
import itertools
import time

import torch

from .config import SamplingParams
from .lazy import make_policy, plan_full_layers
from .memory.pool import PoolExhausted
from .runners.base import PrefillResult
from .runners.cascade import cascade_decode
from .runners.prefix import demoted_view
from .sequence import GenerationOutput, RequestOutput
from .stepper import _sample


def pack(items: list, tokens, budget: int, most: int | None = None) -> list[list]:
    """Consecutive ``items`` in groups of at most ``budget`` tokens (``tokens(item)``; one item at least)
    and at most ``most`` items; [] for no items."""
    groups, n = [[]], 0
    for item in items:
        if groups[-1] and (n + tokens(item) > budget or len(groups[-1]) == most):
            groups.append([])
            n = 0
        groups[-1].append(item)
        n += tokens(item)
    return groups if groups[0] else []


def prefill_documents(sessions: list) -> float:
    """Prefill the documents of ``sessions`` (not yet prefilled, one engine) in layer-major batches of
    at most ``engine.max_prefill_tokens`` tokens (one document at least). ValueError, with nothing
    held, when their KV together does not fit the free budget; a failure part-way gives back what
    the sessions prefilled so far and re-raises. Returns the seconds it took."""
    e, r = sessions[0].engine, sessions[0].runner
    need = sum(s.need for s in sessions)
    if r.free is not None and need > r.free:
        what = f"the document ({sessions[0].doc_tokens} tokens" if len(sessions) == 1 else \
            f"{len(sessions)} documents ({sum(s.doc_tokens for s in sessions)} tokens"
        raise ValueError(f"{what}) need {need} KV bytes, {r.free} are free in the pool (kv_budget {e.kv_budget})")
    done, total = [], 0.0
    try:
        for group in pack(sessions, lambda s: s.doc_tokens, e.max_prefill_tokens):
            t0 = e._timed()
            task = r.start_prefill([s.request for s in group])
            task.advance()
            results = task.results()  # a failure releases what this batch stored and re-raises
            seconds = e._timed() - t0
            total += seconds
            for s, res in zip(group, results):
                s._prefilled(res, seconds)
                done.append(s)
    except BaseException:
        for s in done:
            s.close()
        raise
    return total


def step_sessions(sessions: list) -> list[RequestOutput]:
    """One decode step of every question in flight on any of ``sessions`` (one engine), as one batch;
    returns what each question gained, the first tokens of questions added since included."""
    outs: list[RequestOutput] = []
    for s in sessions:
        outs += s._outbox
        s._outbox = []
    groups = [(s, list(s._live.values())) for s in sessions if s._live]
    if not groups:
        return outs
    e = sessions[0].engine
    t0 = time.perf_counter()
    live = [q for _, g in groups for q in g]
    dev = e.adapter.device
    toks = torch.tensor([q.tokens[-1] for q in live], device=dev)
    pos = torch.tensor([q.length - 1 for q in live], device=dev)
    if any(s._cascade is None for s, _ in groups):  # CUDA: the paged runner's decode over every fork
        logits = groups[0][0].runner.decode([q.handle for q in live], toks, pos)
    else:
        logits = cascade_decode([(s._cascade, [q.handle for q in g]) for s, g in groups], toks, pos)
    nxt = iter(_sample(logits, live).tolist())
    e.totals["decode_s"] += time.perf_counter() - t0
    by_id = {o.request_id: o for o in outs}
    for s, g in groups:
        for seq in g:
            out = by_id.get(seq.request_id)
            if out is None:
                out = by_id[seq.request_id] = RequestOutput(seq.request_id, [])
                outs.append(out)
            s._accept(seq, next(nxt), out)
    return outs


def context_view(session):
    """``DocumentSession.context_view``: replay the context-scored queue over the document's own tail
    scores, give its choice rings of their own (``runners.prefix.demoted_view``), and return a session
    object of its own on that view."""
    e, r, lazy = session.engine, session.runner, session.lazy
    if session.mode != "question" or session.closed:
        raise ValueError(f"context_view() needs an open question-mode session, this one is "
                         f"{'closed' if session.closed else session.mode + '-mode'}")
    if lazy.streaming_prefill:
        raise ValueError("context_view() reuses the fully attended prefill; with streaming_prefill=True a "
                         "context-mode prefill attends otherwise: open it with mode='context'")
    t0 = e._timed()
    n_layers, n = e.num_layers, session.doc_tokens
    n_full = plan_full_layers(lazy, n_layers, r.capacity, n, 0, lambda k: r.footprint(n, k, lazy.sink, lazy.window))
    policy, chosen = make_policy(lazy, n_layers, n_full), set()
    scores = session.layer_scores or [0.0] * n_layers
    for i in range(n_layers):  # what LayerMajorPrefill asks the policy, layer by layer
        chosen.update(policy.observe(i, scores[i]))
    chosen.update(policy.finish())
    try:
        doc = demoted_view(r, session.doc, n, chosen)
    except PoolExhausted as err:
        raise ValueError(f"context_view(): the lazy layers' rings do not fit the pool ({err})") from None
    view = copy.copy(session)  # the document's ids, template and runner; its own questions and KV view
    view.mode, view._ids, view._live, view._outbox, view.closed = "context", itertools.count(), {}, [], False
    view._prefilled(PrefillResult(None, list(session.layer_scores), sorted(chosen),
                                  sum(len(b) for b in doc.blocks) * r.pool.bytes_per_block, doc), e._timed() - t0)
    return view


def answer_all(owner, questions: list[tuple], params: SamplingParams, what: str) -> list[GenerationOutput]:
    """Add each question (``owner.add(*args, params)``: a ``DocumentSession`` takes ``(question,)``, a
    ``DocumentBatch`` ``(index, question)``), step ``owner`` until all of them finished, and return their
    outputs in order; on the way out, however it ends, every question of this call still running is
    aborted. ``what`` names the call in the error for a question aborted while it decoded."""
    rids: list[str] = []
    results: dict[str, GenerationOutput] = {}
    try:
        for args in questions:
            rids.append(owner.add(*args, params))
        wanted = set(rids)
        while len(results) < len(rids):
            for out in owner.step():
                if out.finished and out.request_id in wanted:
                    results[out.request_id] = out.output
            if not owner.has_unfinished() and len(results) < len(rids):
                raise RuntimeError(f"{what}: a question was aborted while it decoded")
    finally:
        for rid in rids:
            owner.abort(rid)  # no-op for the finished ones
    return [results[rid] for rid in rids]


class DocumentBatch:
    """The sessions of several documents (``Engine.documents`` makes one), prefilled together.

    ``batch[i]`` is document i's ``DocumentSession``; ``ask(questions)`` answers one question per
    document as one decode batch; ``add(i, question)`` / ``step()`` / ``abort`` / ``stop`` drive
    questions on any document one step at a time (several per document allowed). ``close()`` (or
    leaving a ``with`` block) closes every session, aborting what still decodes when left by ``with``.
    """

    def __init__(self, engine, sessions: list, prefill_s: float):
        self.engine, self.sessions, self.prefill_s = engine, sessions, prefill_s
        self.mode, self.lazy = sessions[0].mode, sessions[0].lazy
        self._owner: dict[str, int] = {}  # request id -> document index
        self._ids = itertools.count()

    @classmethod
    def open(cls, engine, documents, lazy, mode: str | None, template: bool) -> "DocumentBatch":
        """Every document's session, prefilled together (``Engine.documents``)."""
        from .session import DocumentSession

        if isinstance(documents, (str, bytes)) or not isinstance(documents, (list, tuple)) or not documents:
            raise ValueError(f"documents() needs a non-empty list of documents, got {documents!r:.80}")
        sessions = []
        for i, doc in enumerate(documents):
            try:
                sessions.append(DocumentSession(engine, doc, lazy, mode, template, prefill=False))
            except ValueError as err:
                raise ValueError(f"document {i}: {err}") from None
        return cls(engine, sessions, prefill_documents(sessions))  # prefill_s: every prefill batch's time

    def context_view(self) -> "DocumentBatch":
        """Every (question-mode) session's ``context_view``: the same documents context-scored, with no
        second prefill. ValueError as ``DocumentSession.context_view``; on one, the views made are closed."""
        views = []
        try:
            for s in self.sessions:
                views.append(s.context_view())
        except BaseException:
            for v in views:
                v.close()
            raise
        return DocumentBatch(self.engine, views, sum(v.prefill_s for v in views))

    def __len__(self) -> int:
        return len(self.sessions)

    def __getitem__(self, i: int):
        return self.sessions[i]

    def __iter__(self):
        return iter(self.sessions)

    def add(self, index: int, question, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Prefill ``question`` on document ``index`` and sample its first token; returns its id (unique
        in the batch; its tokens come from ``step``). ValueError as ``DocumentSession.add``."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.sessions):
            raise ValueError(f"document index must be an integer in 0..{len(self.sessions) - 1}, got {index!r}")
        rid = request_id if request_id is not None else f"d{index}-q{next(self._ids)}"
        if not isinstance(rid, str) or not rid or rid in self._owner:
            raise ValueError(f"request_id must be a new non-empty string, got {rid!r}")
        self.sessions[index].add(question, params, rid)
        self._owner[rid] = index
        return rid

    def step(self) -> list[RequestOutput]:
        """One decode step of every question in flight on every document, as one batch."""
        outs = step_sessions(self.sessions)
        for o in outs:
            if o.finished:
                self._owner.pop(o.request_id, None)
        return outs

    def has_unfinished(self) -> bool:
        return any(s.has_unfinished() for s in self.sessions)

    def abort(self, request_id: str) -> bool:
        """Stop a question now and give its own KV back; False if unknown or finished."""
        return self.stop(request_id) is not None

    def stop(self, request_id: str) -> GenerationOutput | None:
        """Stop a question now and return what it generated (``DocumentSession.stop``)."""
        index = self._owner.pop(request_id, None)
        return None if index is None else self.sessions[index].stop(request_id)

    def ask(self, questions, max_new_tokens: int = 128, *, temperature: float = 0.0, top_p: float = 1.0,
            top_k: int = 0, seed: int | None = None, stop=None, ignore_eos: bool = False) -> list[GenerationOutput]:
        """Question i on document i (one per document), all decoded as one batch; outputs in order.
        A question that does not fit raises ValueError and the others of this call are dropped."""
        if isinstance(questions, str) or not isinstance(questions, (list, tuple)) or len(questions) != len(self):
            got = f"{len(questions)} questions" if isinstance(questions, (list, tuple)) else repr(questions)[:80]
            raise ValueError(f"ask() needs a list of one question per document ({len(self)}), got {got}")
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, stop if stop is not None else (),
                                ignore_eos)
        return answer_all(self, [(i, q) for i, q in enumerate(questions)], params, "ask")

    def close(self) -> None:
        """No more questions on any document (``DocumentSession.close`` for each)."""
        for s in self.sessions:
            s.close()

    def __enter__(self) -> "DocumentBatch":
        return self

    def __exit__(self, *exc) -> None:
        for s in self.sessions:
            s.__exit__(*exc)
        self._owner.clear()
