"""Sessions across documents (ltengine/session_batch.py): ``Engine.documents`` prefills several documents
together and decodes their questions as one batch. Against one session at a time (fp32, greedy, tiny
random models of all four families, both modes): the same tokens and lazy layers; the pool back to
idle; bad arguments named."""
from __future__ import annotations

import pytest
from conftest import FAMILIES, CharTokenizer, random_prompts, tiny_model

from ltengine import Engine, LazyConfig, SamplingParams

MODES = ("question", "context")
LAZY = LazyConfig(fraction=0.5, sink=4, window=48, probe=8)


def _engine(family="llama", **kw):
    return Engine(tiny_model(family), CharTokenizer(), lazy=None, **kw)


def _one_at_a_time(engine, docs, qs, mode, max_new):
    outs = []
    for d, q in zip(docs, qs):
        with engine.document(d, template=False, lazy=LAZY, mode=mode) as s:
            outs.append(s.ask(q, max_new_tokens=max_new))
    return outs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_sessions_match_one_session_at_a_time(family, mode):
    engine = _engine(family, max_prefill_tokens=700)  # 4 documents in 3 prefill batches
    docs = random_prompts(31, [400, 250, 330, 180])
    qs = random_prompts(32, [12, 30, 9, 20])
    alone = _one_at_a_time(engine, docs, qs, mode, 20)
    idle = engine._session_runner().pool.used_blocks
    with engine.documents(docs, template=False, lazy=LAZY, mode=mode) as batch:
        assert len(batch) == 4 and [s.doc_tokens for s in batch] == [400, 250, 330, 180]
        doc_blocks = sum(len(b) for s in batch for b in s.doc.blocks)
        assert batch[0].runner.pool.used_blocks == idle + doc_blocks
        outs = batch.ask(qs, max_new_tokens=20)
        assert batch[0].runner.pool.used_blocks == idle + doc_blocks  # the questions' own KV went back
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert [o.lazy_layers for o in outs] == [o.lazy_layers for o in alone]
    assert any(o.lazy_layers for o in outs)
    assert engine._session_runner().used == 0 and engine._session_runner().pool.used_blocks == idle


@pytest.mark.parametrize("mode", MODES)
def test_step_level_questions_across_documents(mode):
    # several questions per document, added at different steps, each as its own session would answer it
    engine = _engine("qwen2")
    docs = random_prompts(41, [300, 220])
    qs = random_prompts(42, [14, 10, 25])
    with engine.document(docs[0], template=False, lazy=LAZY, mode=mode) as s:
        expect = s.ask_many(qs[:2], max_new_tokens=16)
    with engine.document(docs[1], template=False, lazy=LAZY, mode=mode) as s:
        expect.append(s.ask(qs[2], max_new_tokens=16))
    params = SamplingParams(max_new_tokens=16)
    tokens, done = {}, {}
    with engine.documents(docs, template=False, lazy=LAZY, mode=mode) as batch:
        rids = [batch.add(0, qs[0], params), batch.add(1, qs[2], params, request_id="late-doc1")]
        for step in range(40):
            if step == 3:
                rids.insert(1, batch.add(0, qs[1], params))
            for out in batch.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finished:
                    done[out.request_id] = out.output
            if not batch.has_unfinished():
                break
    assert [done[r].token_ids for r in rids] == [o.token_ids for o in expect]
    assert all(tokens[r] == done[r].token_ids for r in rids) and rids[2] == "late-doc1"


def test_stop_returns_the_partial_answer_and_frees_it():
    engine = _engine("mistral")
    docs = random_prompts(51, [200, 260])
    q = random_prompts(52, [10])[0]
    with engine.documents(docs, template=False, lazy=LAZY) as batch:
        full = batch.ask([q, q], max_new_tokens=12)
        used = batch[0].runner.used
        rid = batch.add(1, q, SamplingParams(max_new_tokens=12))
        for _ in range(4):
            batch.step()
        part = batch.stop(rid)
        assert part.finish_reason == "abort" and part.token_ids == full[1].token_ids[:5]
        assert batch[0].runner.used == used and batch.stop(rid) is None and not batch.abort(rid)
    assert engine._session_runner().used == 0


def test_bad_arguments_are_named():
    engine = _engine()
    docs = random_prompts(61, [120, 90])
    for bad in ([], "a document", None):
        with pytest.raises(ValueError, match="documents.. needs a non-empty list of documents"):
            engine.documents(bad, template=False)
    with pytest.raises(ValueError, match=r"document 1: token ids \[300\] out of range"):
        engine.documents([docs[0], [1, 300]], template=False)
    with pytest.raises(ValueError, match=r"mode must be one of"):
        engine.documents(docs, template=False, mode="both")
    with engine.documents(docs, template=False) as batch:
        with pytest.raises(ValueError, match=r"one question per document \(2\), got 1 questions"):
            batch.ask([[5, 6]])
        with pytest.raises(ValueError, match=r"one question per document \(2\), got 'q'"):
            batch.ask("q")
        for index in (2, -1, "0", True):
            with pytest.raises(ValueError, match=r"document index must be an integer in 0..1"):
                batch.add(index, [5, 6])
        batch.add(0, [5, 6], request_id="x")
        with pytest.raises(ValueError, match="request_id must be a new non-empty string, got 'x'"):
            batch.add(1, [5, 6], request_id="x")
    assert engine._session_runner().used == 0


def test_documents_over_the_budget_are_refused_with_nothing_held():
    probe = _engine("llama")
    docs = random_prompts(71, [300, 300, 300])
    with probe.document(docs[0], template=False) as s:
        one = sum(len(b) for b in s.doc.blocks) * s.runner.pool.bytes_per_block
    engine = Engine(probe.model, CharTokenizer(), lazy=None, kv_budget=int(2.5 * one))
    with pytest.raises(ValueError, match=r"3 documents \(900 tokens\) need \d+ KV bytes, \d+ are free"):
        engine.documents(docs, template=False)
    assert engine._session_runner().used == 0
    with engine.documents(docs[:2], template=False) as batch:  # two fit
        assert len(batch.ask([[3, 4], [5]], max_new_tokens=4)) == 2
    assert engine._session_runner().used == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_context_view_equals_a_context_mode_prefill(family):
    # one question-mode prefill serves both modes: the view's lazy layers, scores and answers are those
    # of a document prefilled in context mode; it shares the full layers' blocks and owns the rings
    engine = _engine(family)
    doc, q1, q2 = random_prompts(81, [420, 12, 30])
    with engine.document(doc, template=False, lazy=LAZY, mode="context") as direct:
        expect = direct.ask_many([q1, q2], max_new_tokens=16)
        lazy, scores = direct.lazy_layers, direct.layer_scores
    pool = engine._session_runner().pool
    idle = pool.used_blocks
    s = engine.document(doc, template=False, lazy=LAZY, mode="question")
    doc_blocks = sum(len(b) for b in s.doc.blocks)
    view = s.context_view()
    assert view.mode == "context" and view.lazy_layers == lazy and len(lazy) == 3
    assert view.layer_scores == pytest.approx(scores, abs=1e-6)
    ring = pool.blocks_for(LAZY.sink + LAZY.window)
    assert pool.used_blocks == idle + doc_blocks + len(lazy) * ring
    s.close()  # the view still reads the shared blocks
    assert [o.token_ids for o in view.ask_many([q1, q2], max_new_tokens=16)] == [o.token_ids for o in expect]
    view.close()
    assert pool.used_blocks == idle
    with engine.document(doc, template=False, lazy=LAZY, mode="context") as c:
        with pytest.raises(ValueError, match="needs an open question-mode session, this one is context-mode"):
            c.context_view()
    with pytest.raises(ValueError, match="needs an open question-mode session, this one is closed"):
        s.context_view()


def test_batch_context_view_across_documents():
    engine = _engine("qwen3")
    docs = random_prompts(91, [300, 380])
    qs = random_prompts(92, [12, 20])
    alone = _one_at_a_time(engine, docs, qs, "context", 12)
    with engine.documents(docs, template=False, lazy=LAZY, mode="question") as batch:
        with batch.context_view() as view:
            assert view.mode == "context" and len(view) == 2
            outs = view.ask(qs, max_new_tokens=12)
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert engine._session_runner().used == 0
