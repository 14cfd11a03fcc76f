"""Document sessions on the GPU: the engine's own paged runner (CUDA graphs, Triton decode) serves the
sessions. Skipped with a reason without a CUDA GPU (the CPU side is tests/test_session.py)."""
from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, random_prompts, tiny_model

from ltengine import Engine, LazyConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
LAZY = LazyConfig(fraction=0.5, sink=4, window=48, probe=8)


def _engine(family, dtype=torch.float32):
    return Engine(tiny_model(family, dtype=dtype).to("cuda"), None, lazy=None, kv_budget="64MiB")


@pytest.mark.parametrize("family", FAMILIES)
def test_sessions_match_generate_on_cuda(family):
    engine = _engine(family)
    assert engine.runner_kind == "paged"
    doc, *qs = random_prompts(21, [700, 16, 33, 9])
    fresh = engine.generate([doc + q for q in qs], max_new_tokens=24)
    fresh_lazy = engine.generate([doc + q for q in qs[:2]], max_new_tokens=24, lazy=LAZY)
    for mode in ("question", "context"):
        with engine.document(doc, template=False, mode=mode) as s:
            assert s.runner is engine.runner  # one pool for the engine and its sessions
            assert [o.token_ids for o in s.ask_many(qs, max_new_tokens=24)] == [o.token_ids for o in fresh]
    with engine.document(doc, template=False, lazy=LAZY, mode="question") as s:
        outs = s.ask_many(qs[:2], max_new_tokens=24)  # questions of >= probe tokens: generate's layers
    assert [o.lazy_layers for o in outs] == [o.lazy_layers for o in fresh_lazy]
    assert [o.token_ids for o in outs] == [o.token_ids for o in fresh_lazy]
    assert engine.runner.used == 0


@pytest.mark.parametrize("mode", ["question", "context"])
def test_sharing_and_close_on_cuda_bf16(mode):
    engine = _engine("llama", torch.bfloat16)
    doc, q1, q2 = random_prompts(23, [900, 12, 20])  # + question + 64 new within the 1024 context
    s = engine.document(doc, template=False, lazy=LAZY, mode=mode)
    pool = s.runner.pool
    doc_blocks = sum(len(b) for b in s.doc.blocks)
    r1, _ = s.add(q1), s.add(q2)
    shared = s.doc.blocks[next(i for i in range(engine.num_layers) if not s._live[r1].handle.lazy[i])]
    assert all(pool.refs(b) == 3 for b in shared[:s.doc_tokens // pool.block_size])
    for _ in range(4):
        s.step()
    used = engine.runner.used
    assert used > doc_blocks * pool.bytes_per_block
    s.close()
    assert 0 < engine.runner.used < used  # what no question reads went back; the shared blocks stay read
    while s.has_unfinished():
        s.step()
    assert engine.runner.used == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_documents_batch_matches_one_session_at_a_time_on_cuda(family):
    # questions of several documents decoded as one batch by the paged runner (CUDA graphs)
    engine = _engine(family)
    docs = random_prompts(25, [400, 250, 330])
    qs = random_prompts(26, [12, 30, 9])
    for mode in ("question", "context"):
        alone = []
        for d, q in zip(docs, qs):
            with engine.document(d, template=False, lazy=LAZY, mode=mode) as s:
                alone.append(s.ask(q, max_new_tokens=20))
        with engine.documents(docs, template=False, lazy=LAZY, mode=mode) as batch:
            outs = batch.ask(qs, max_new_tokens=20)
        assert [o.token_ids for o in outs] == [o.token_ids for o in alone], mode
        assert [o.lazy_layers for o in outs] == [o.lazy_layers for o in alone], mode
    with engine.documents(docs, template=False, lazy=LAZY, mode="question") as batch:
        with batch.context_view() as view:  # context mode on the question-mode prefill
            views = view.ask(qs, max_new_tokens=20)
    assert [o.token_ids for o in views] == [o.token_ids for o in alone]  # the loop's last mode: context
    assert engine.runner.used == 0
    assert engine.runner.graphs and any(st["graph"] is not None for st in engine.runner.batches.static.values())
