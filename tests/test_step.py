"""The online core: add_request / step / abort / has_unfinished, on both runners (CPU, fp32)."""
from __future__ import annotations

import pytest

from conftest import SpacedIds as _Ids, random_prompts as _prompts, tiny_model
from ltengine import Engine, LazyConfig, SamplingParams, SequenceStatus

LAZY = LazyConfig(fraction=0.5, sink=2, window=14, probe=8)
RUNNERS = ["paged", "reference"]


def _drain(engine: Engine, limit: int = 10_000) -> dict:
    """Step until nothing is left; request id -> (tokens seen step by step, final output)."""
    seen: dict = {}
    for _ in range(limit):
        if not engine.has_unfinished():
            return seen
        for out in engine.step():
            toks, _ = seen.get(out.request_id, ([], None))
            seen[out.request_id] = (toks + out.new_token_ids, out.output)
    raise AssertionError("engine did not finish")


@pytest.mark.parametrize("runner", RUNNERS)
def test_step_loop_equals_generate(runner):
    model = tiny_model("llama", layers=4)
    prompts = _prompts(1, (30, 7, 64, 19))
    engine = Engine(model, _Ids(), lazy=LAZY, runner=runner, block_size=8)
    want = engine.generate(prompts, max_new_tokens=9)
    rids = [engine.add_request(p, SamplingParams(9)) for p in prompts]
    assert engine.has_unfinished()
    seen = _drain(engine)
    for rid, w in zip(rids, want):
        toks, out = seen[rid]
        assert toks == out.token_ids == w.token_ids  # the step deltas add up to the final tokens
        assert out.lazy_layers == w.lazy_layers and out.finish_reason == w.finish_reason
    assert engine.runner.used == 0 and not engine.has_unfinished()


@pytest.mark.parametrize("runner", RUNNERS)
def test_requests_added_while_others_decode(runner):
    """A request added mid-decode joins the running batch and produces what it produces alone."""
    model = tiny_model("qwen3", layers=4)
    a, b, c = _prompts(2, (40, 25, 50))
    engine = Engine(model, _Ids(), lazy=LAZY, runner=runner, block_size=8)
    alone = [engine.generate(p, max_new_tokens=n, ignore_eos=True) for p, n in ((a, 20), (b, 8), (c, 5))]
    params = [SamplingParams(n, ignore_eos=True) for n in (20, 8, 5)]
    ra = engine.add_request(a, params[0])
    seen = {}
    for i in range(6):
        for out in engine.step():
            seen.setdefault(out.request_id, []).extend(out.new_token_ids)
        if i == 2:
            rb = engine.add_request(b, params[1])
        if i == 4:
            rc = engine.add_request(c, params[2])
    for rid, toks in _drain(engine).items():
        seen.setdefault(rid, []).extend(toks[0])
    assert [seen[r] for r in (ra, rb, rc)] == [o.token_ids for o in alone]


@pytest.mark.parametrize("runner", RUNNERS)
def test_abort_mid_decode_returns_kv_at_once(runner):
    model = tiny_model("mistral", layers=4)
    p, q = _prompts(3, (60, 33))
    engine = Engine(model, _Ids(), lazy=LAZY, runner=runner, block_size=8)
    alone = engine.generate(q, max_new_tokens=12, ignore_eos=True)
    r1 = engine.add_request(p, SamplingParams(50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    held = engine.runner.used
    assert held > 0
    assert engine.abort(r1) is True
    assert engine.runner.used == 0  # returned at once, not at the next step
    assert engine.abort(r1) is False and engine.abort("no-such-id") is False
    assert not engine.has_unfinished()
    r2 = engine.add_request(q, SamplingParams(12, ignore_eos=True))  # the engine goes on
    assert _drain(engine)[r2][1].token_ids == alone.token_ids


def test_abort_waiting_and_during_prefill():
    model = tiny_model("llama", layers=4)
    engine = Engine(model, _Ids(), lazy=LAZY, runner="paged", block_size=8, interleave_layers=1)
    r1 = engine.add_request(_prompts(4, (50,))[0], SamplingParams(5))
    engine.step()  # one layer of r1's prefill
    assert engine.scheduler.prefilling
    assert engine.abort(r1)
    assert engine.runner.used == 0 and not engine.has_unfinished()
    r2 = engine.add_request(_prompts(5, (20,))[0], SamplingParams(5))
    assert engine.abort(r2) and not engine.has_unfinished()


@pytest.mark.parametrize("runner", RUNNERS)
def test_interleaved_prefill_equals_plain(runner):
    """interleave_layers=k: a long prefill runs k layers per step while the others decode; tokens are
    those of the plain engine, and requests already running keep getting tokens during the prefill."""
    model = tiny_model("llama", layers=6)
    short, long_ = _prompts(6, (20, 300))
    plain = Engine(model, _Ids(), lazy=LAZY, runner=runner, block_size=8)
    want = [plain.generate(p, max_new_tokens=n, ignore_eos=True) for p, n in ((short, 30), (long_, 6))]
    engine = Engine(model, _Ids(), lazy=LAZY, runner=runner, block_size=8, interleave_layers=2)
    ra = engine.add_request(short, SamplingParams(30, ignore_eos=True))
    seen = {ra: []}
    while engine.scheduler.prefilling or not engine.scheduler.running:
        for out in engine.step():
            seen[ra] += out.new_token_ids
    rb = engine.add_request(long_, SamplingParams(6, ignore_eos=True))
    gained_during_prefill = 0
    seen[rb] = []
    while engine.has_unfinished():
        in_prefill = any(s.request_id == rb for s in engine.scheduler.prefilling)
        for out in engine.step():
            seen[out.request_id] += out.new_token_ids
            if in_prefill and out.request_id == ra:
                gained_during_prefill += len(out.new_token_ids)
    assert [seen[ra], seen[rb]] == [w.token_ids for w in want]
    assert gained_during_prefill >= 2  # 6 layers, 2 per step: decode went on between them


def test_bad_add_request_keeps_engine_usable():
    model = tiny_model("llama", layers=2)
    engine = Engine(model, _Ids(), lazy=LAZY, runner="reference", kv_budget="64KiB")
    with pytest.raises(ValueError, match="params must be a SamplingParams"):
        engine.add_request([1, 2, 3], params={"max_new_tokens": 3})
    with pytest.raises(ValueError, match="one prompt"):
        engine.add_request([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="too small"):
        engine.add_request(list(range(1, 200)) * 4, SamplingParams(5), lazy=None)
    rid = engine.add_request([5, 6, 7], SamplingParams(3), request_id="mine")
    with pytest.raises(ValueError, match="request_id must be a new"):
        engine.add_request([5, 6, 7], request_id="mine")
    out = _drain(engine)[rid][1]
    assert out.finish_reason in ("length", "eos") and out.request_id == "mine"
    with pytest.raises(ValueError, match="in flight"):
        engine.add_request([1, 2], SamplingParams(2))
        engine.generate([3, 4], max_new_tokens=2)


def test_sampling_uses_its_own_generator():
    """A seeded request reproduces itself and leaves the global RNG alone."""
    import torch

    model = tiny_model("llama", layers=2)
    engine = Engine(model, _Ids(), lazy=None, runner="paged", block_size=8)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = engine.generate([1, 2, 3, 4], max_new_tokens=10, temperature=1.0, seed=7)
    b = engine.generate([1, 2, 3, 4], max_new_tokens=10, temperature=1.0, seed=7)
    assert a.token_ids == b.token_ids
    assert torch.equal(torch.get_rng_state(), before)
    engine.generate([1, 2, 3, 4], max_new_tokens=4, temperature=1.0)  # unseeded: no global reseed either
    assert torch.equal(torch.get_rng_state(), before)


def test_sequence_status_is_an_enum():
    model = tiny_model("llama", layers=2)
    engine = Engine(model, _Ids(), lazy=None, runner="reference")
    rid = engine.add_request([1, 2, 3], SamplingParams(2))
    assert engine._requests[rid].status is SequenceStatus.WAITING
    _drain(engine)
