"""Document sessions (ltengine/session.py): one document prefilled once, many questions on its KV.

Sharing (the document's blocks held once, the pool idle after close), exactness against fresh
``generate`` calls on document + question, the two modes' lazy layers, the budget, closing while a
question decodes, and every bad argument's message. Tiny random models of all four families
(token ids, ``template=False``) and the default model with the QA chat template.
"""
from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, CharTokenizer, random_prompts, tiny_model
from reference_attention import masked_generate

from ltengine import Engine, LazyConfig, SamplingParams
from ltengine.runners.cascade import SharedPrefixDecode
from ltengine.runners.prefix import fork_blocks

MODES = ("question", "context")
LAZY = LazyConfig(fraction=0.5, sink=4, window=48, probe=8)


def _engine(family="llama", **kw):
    return Engine(tiny_model(family), CharTokenizer(), lazy=None, **kw)


def _own_blocks(session, q_len: int, max_new: int, lazy_layers) -> int:
    room = session.doc_tokens + q_len + max_new
    return sum(fork_blocks(session.runner, session.doc_tokens, room, i in lazy_layers, session.lazy.sink,
                           session.lazy.window) for i in range(session.engine.num_layers))


@pytest.mark.parametrize("mode", MODES)
def test_questions_never_read_unwritten_pool_slots(mode):
    """The whole pool is NaN before the document is prefilled (what ``torch.empty`` may hand out): the
    answers are still the fresh ``generate``'s, so no attention reads a slot nothing wrote (nor multiplies
    one by a zero probability)."""
    engine = _engine("llama")
    doc, *qs = random_prompts(4, [333, 12, 40, 1])
    fresh = engine.generate([doc + q for q in qs], max_new_tokens=12)
    with engine.document(doc, template=False, mode=mode) as s:
        pool = s.runner.pool
    pool.k.fill_(float("nan"))  # the runner's own padding block too: rows pad with it, masked
    pool.v.fill_(float("nan"))
    with engine.document(doc, template=False, mode=mode) as s:
        assert s.runner.pool is pool
        many = s.ask_many(qs, max_new_tokens=12)
    assert [o.token_ids for o in many] == [o.token_ids for o in fresh]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_attention_is_token_exact_with_generate(family):
    engine = _engine(family)
    doc, *qs = random_prompts(3, [333, 12, 40, 1])
    fresh = engine.generate([doc + q for q in qs], max_new_tokens=20)
    for mode in MODES:
        with engine.document(doc, template=False, mode=mode) as s:
            many = s.ask_many(qs, max_new_tokens=20)
            one = [s.ask(q, max_new_tokens=20) for q in qs]
        assert [o.token_ids for o in many] == [o.token_ids for o in fresh], mode
        assert [o.token_ids for o in one] == [o.token_ids for o in fresh], mode
        assert all(o.lazy_layers == [] for o in many)


@pytest.mark.parametrize("family", FAMILIES)
def test_question_mode_scores_each_question_like_a_fresh_prefill(family):
    # questions at least ``probe`` tokens long: their probe queries are those of a fresh prefill of
    # document + question, so the lazy layers and the tokens must be generate()'s
    engine = _engine(family)
    doc, *qs = random_prompts(5, [400, 16, 30])
    fresh = engine.generate([doc + q for q in qs], max_new_tokens=24, lazy=LAZY)
    with engine.document(doc, template=False, lazy=LAZY, mode="question") as s:
        outs = s.ask_many(qs, max_new_tokens=24)
        assert s.lazy_layers == []  # the document itself stays full
    assert [o.lazy_layers for o in outs] == [o.lazy_layers for o in fresh]
    assert len(outs[0].lazy_layers) == 3
    assert [o.token_ids for o in outs] == [o.token_ids for o in fresh]
    assert outs[0].layer_scores == pytest.approx(fresh[0].layer_scores, abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_context_mode_demotes_on_the_document_and_decodes_by_the_streaming_rule(family):
    engine = _engine(family)
    doc, *qs = random_prompts(7, [400, 9, 70])
    doc_only = engine.generate(doc, max_new_tokens=1, lazy=LAZY)  # the document scored on its own tail
    with engine.document(doc, template=False, lazy=LAZY, mode="context") as s:
        assert s.lazy_layers == doc_only.lazy_layers and len(s.lazy_layers) == 3
        outs = s.ask_many(qs, max_new_tokens=16)
    for q, out in zip(qs, outs):
        assert out.lazy_layers == doc_only.lazy_layers
        # the model's own forward: document queries attend fully, every later query (question and
        # answer) by sink + window on the document's lazy layers
        ref = masked_generate(engine.model, doc + q, out.lazy_layers, LAZY.sink, LAZY.window, 16, full_until=len(doc))
        assert out.token_ids == ref


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("runner", ["reference", "paged"])
def test_questions_share_the_document_blocks_and_close_returns_them(mode, runner):
    engine = _engine("qwen2", runner=runner)
    doc, q1, q2 = random_prompts(9, [300, 10, 25])
    s = engine.document(doc, template=False, lazy=LAZY, mode=mode)
    pool = s.runner.pool
    doc_blocks = sum(len(b) for b in s.doc.blocks)
    idle = pool.used_blocks - doc_blocks  # the runner's scratch block
    assert s.runner.used == doc_blocks * pool.bytes_per_block
    r1, r2 = s.add(q1), s.add(q2)
    seqs = [s._live[r1].handle, s._live[r2].handle]
    own = [_own_blocks(s, len(q), 64, seq_lazy) for q, seq_lazy in
           ((q1, s._live[r1].lazy_layers), (q2, s._live[r2].lazy_layers))]
    assert pool.used_blocks == idle + doc_blocks + sum(own)  # the document once
    full = [i for i in range(engine.num_layers) if not seqs[0].lazy[i] and not seqs[1].lazy[i]]
    shared = s.doc.blocks[full[0]][:s.doc_tokens // pool.block_size]
    assert shared and all(pool.refs(b) == 3 for b in shared)  # the document + two questions
    assert set(shared) <= set(seqs[0].blocks[full[0]]) & set(seqs[1].blocks[full[0]])
    partial = s.doc.blocks[full[0]][-1]  # 300 % 64 != 0: copied, never shared
    assert pool.refs(partial) == 1 and partial not in seqs[0].blocks[full[0]]
    while s.has_unfinished():
        s.step()
    assert pool.used_blocks == idle + doc_blocks
    s.close()
    assert s.runner.used == 0 and pool.used_blocks == idle


@pytest.mark.parametrize("mode", MODES)
def test_a_question_that_does_not_fit_is_refused_and_the_session_stays_usable(mode):
    probe = _engine("mistral")
    doc, q1, q2 = random_prompts(11, [256, 20, 20])
    with probe.document(doc, template=False, lazy=LAZY, mode=mode) as s:
        expected = s.ask(q1, max_new_tokens=30)
        doc_blocks = sum(len(b) for b in s.doc.blocks)
        own = _own_blocks(s, len(q1), 30, expected.lazy_layers)
        bpb = s.runner.pool.bytes_per_block
    engine = Engine(probe.model, CharTokenizer(), lazy=None, kv_budget=(doc_blocks + own + own // 2) * bpb)
    with engine.document(doc, template=False, lazy=LAZY, mode=mode) as s:
        with pytest.raises(ValueError, match=r"needs \d+ KV bytes of its own beyond the shared document, \d+ are free"):
            s.ask_many([q1, q2], max_new_tokens=30)
        assert s.runner.used == doc_blocks * bpb  # the first question of the call was given back
        again = s.ask(q1, max_new_tokens=30)
        assert again.token_ids == expected.token_ids
        r = s.add(q1, request_id="held")
        with pytest.raises(ValueError, match="of its own"):
            s.add(q2)
        s.abort(r)
        assert s.ask(q2, max_new_tokens=30).finish_reason == "length"
    assert engine._session_runner().used == 0


@pytest.mark.parametrize("mode", MODES)
def test_close_while_a_question_decodes(mode):
    engine = _engine("llama")
    doc, q1, q2 = random_prompts(13, [200, 12, 12])
    with engine.document(doc, template=False, lazy=LAZY, mode=mode) as s:
        expected = s.ask(q1, max_new_tokens=12).token_ids
    s = engine.document(doc, template=False, lazy=LAZY, mode=mode)
    rid = s.add(q1, SamplingParams(max_new_tokens=12))
    s.add(q2, request_id="aborted")
    for _ in range(3):
        s.step()
    used = s.runner.used
    s.close()
    assert 0 < s.runner.used < used  # the document's unshared blocks went back, the shared ones stay read
    with pytest.raises(ValueError, match="session is closed"):
        s.add(q2)
    s.abort("aborted")
    done = None
    while s.has_unfinished():
        for out in s.step():
            done = out.output if out.finished else done
    assert done.request_id == rid and done.token_ids == expected
    assert s.runner.used == 0  # the last question finishing after close gave the document back
    with engine.document(doc, template=False, mode=mode) as s:  # leaving a block aborts what still decodes
        s.add(q1)
        s.step()
    assert s.runner.used == 0 and not s.has_unfinished()


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="both"), r"mode must be one of \('context', 'question'\)"),
    (dict(template="yes"), "template must be True or False"),
    (dict(lazy="half"), "lazy must be a LazyConfig or None"),
    (dict(lazy=LazyConfig(policy=(99,)), mode="context"), r"names layers \[99\], but the model has layers 0..5"),
])
def test_bad_document_arguments(kwargs, message):
    engine = _engine()
    with pytest.raises(ValueError, match=message):
        engine.document(random_prompts(1, [50])[0], **{"template": False, **kwargs})


def test_bad_documents_and_questions():
    engine = _engine()
    with pytest.raises(ValueError, match="template=True needs a tokenizer with a chat template"):
        engine.document("some text")
    with pytest.raises(ValueError, match="needs the document as non-empty text"):
        engine.document([1, 2, 3])
    with pytest.raises(ValueError, match=r"token ids \[300\] out of range"):
        engine.document([1, 300], template=False)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.document("   ", template=False)
    with pytest.raises(ValueError, match="document has 1100 tokens, longer than the model's context of 1024"):
        engine.document([1] * 1100, template=False)
    with engine.document([5] * 990, template=False) as s:
        with pytest.raises(ValueError, match=r"document \+ question \(1000 tokens\) \+ max_new_tokens \(64\)"):
            s.ask([7] * 10, max_new_tokens=64)
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
            s.ask([7], max_new_tokens=0)
        with pytest.raises(ValueError, match="a question must be non-empty text"):
            s.ask("  ")
        with pytest.raises(ValueError, match="ask_many.. needs a non-empty list of questions"):
            s.ask_many("one question as a string")
        with pytest.raises(ValueError, match="ask_many.. needs a non-empty list of questions"):
            s.ask_many([])
        with pytest.raises(ValueError, match="a question is one text or one list of token ids"):
            s.ask([[1, 2], [3]])
        s.add([1], SamplingParams(max_new_tokens=4), request_id="a")
        with pytest.raises(ValueError, match="request_id must be a new non-empty string, got 'a'"):
            s.add([2], SamplingParams(max_new_tokens=4), request_id="a")
        with pytest.raises(ValueError, match="params must be a SamplingParams, got dict"):
            s.add([2], {"max_new_tokens": 4})
        assert s.ask([3], max_new_tokens=2).finish_reason == "length"  # still usable after every error


def test_default_model_with_the_qa_template(default_model):
    model, tokenizer = default_model
    from ltengine.data import chapter

    engine = Engine(model, tokenizer, lazy=None)
    doc = chapter(1)[:2400]  # ~600 tokens: this machine's CPU time
    qs = ["Who has taken Netherfield Park?", "How many daughters do the Bennets have?"]
    fresh = [engine.answer(doc, q, max_new_tokens=20) for q in qs]
    with engine.document(doc) as s:  # the prompt split at the document's end tokenizes as a whole
        assert [s.doc_ids + s._question_ids(q) for q in qs] == [engine.prompts.qa(doc, q) for q in qs]
        outs = s.ask_many(qs, max_new_tokens=20)
    assert [o.token_ids for o in outs] == [o.token_ids for o in fresh]
    assert [o.token_ids for o in engine.answer(doc, qs, max_new_tokens=20)] == [o.token_ids for o in fresh]
    lazy = LazyConfig(fraction=0.25, sink=4, window=256, probe=16, score="peak")
    fresh = engine.answer(doc, qs[0], max_new_tokens=20, lazy=lazy)
    with engine.document(doc, lazy=lazy) as s:  # question-scored: the same last 16 queries score it
        out = s.ask(qs[0], max_new_tokens=20)
    assert out.lazy_layers == fresh.lazy_layers and out.token_ids == fresh.token_ids
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("mode", MODES)
def test_cascade_decode_matches_the_paged_runner(mode):
    # CPU sessions decode by cascade attention (the shared blocks read once for the batch); the paged
    # runner's own decode over the same block tables must give the same logits (fp32 rounding apart)
    engine = _engine("qwen3")
    doc, q1, q2, q3 = random_prompts(17, [450, 9, 20, 3])
    with engine.document(doc, template=False, lazy=LAZY, mode=mode) as s:
        rids = [s.add(q) for q in (q1, q2, q3)]
        for _ in range(5):
            s.step()
        seqs = [s._live[r] for r in rids]
        handles = [x.handle for x in seqs]
        toks = torch.tensor([x.tokens[-1] for x in seqs])
        pos = torch.tensor([x.length - 1 for x in seqs])
        cascade = s._cascade(handles, toks, pos)  # writes the same K/V to the same slots as the next call
        paged = s.runner.decode(handles, toks, pos)
    assert isinstance(s._cascade, SharedPrefixDecode)
    torch.testing.assert_close(cascade, paged, rtol=1e-5, atol=1e-5)


def test_fp8_engine_refuses_sessions_clearly():
    engine = Engine(tiny_model("llama"), CharTokenizer(), lazy=None, kv_dtype="fp8", runner="paged")
    with pytest.raises(ValueError, match="fp8"):
        engine.document(list(range(3, 40)), template=False)
    assert engine.generate(list(range(3, 20)), max_new_tokens=2).token_ids  # the engine stays usable
