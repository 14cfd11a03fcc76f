"""The runner protocol: both runners pass the same contract (CPU, fp32)."""
from __future__ import annotations

import pytest
import torch

from conftest import SpacedIds as _Ids, prefill_requests, random_prompts as _prompts, tiny_model
from ltengine import Engine, LazyConfig
from ltengine.lazy import make_policy
from ltengine.memory.pool import KVPool
from ltengine.runners import PagedRunner, ReferenceRunner, Runner

LAZY = LazyConfig(fraction=0.5, sink=2, window=6, probe=4)


def _runner(kind: str, engine: Engine) -> Runner:
    a = engine.adapter
    if kind == "reference":
        return ReferenceRunner(a, engine.backend, None)
    pool = KVPool(400, 8, a.shape.num_kv_heads, a.shape.head_dim, a.dtype, a.device)
    return PagedRunner(a, engine.backend, pool)


@pytest.fixture(params=["reference", "paged"])
def setup(request):
    model = tiny_model("qwen2", layers=4)
    engine = Engine(model, _Ids(), lazy=LAZY, runner="reference")
    return request.param, engine, _runner(request.param, engine)


def _decode(runner, handle, first: int, length: int, steps: int) -> list[int]:
    toks = [first]
    for s in range(steps):
        runner.grow(handle, length + s + 1)
        logits = runner.decode([handle], torch.tensor([toks[-1]]), torch.tensor([length + s]))
        toks.append(int(logits[0].argmax()))
    return toks


def test_contract(setup):
    kind, engine, runner = setup
    ids = torch.tensor(_prompts(3, (37,))[0])
    n = engine.num_layers
    reserve = runner.decode_reserve(20)
    assert runner.used == 0 and runner.peak == 0
    res, = runner.prefill(prefill_requests(engine.backend, [ids], [make_policy(LAZY, n, 2)], LAZY, reserve))
    assert len(res.lazy_layers) == 2 and len(res.scores) == n
    assert 0 < runner.used <= runner.footprint(37 + reserve, 2, LAZY.sink, LAZY.window)
    assert runner.peak <= runner.footprint(37 + reserve, 2, LAZY.sink, LAZY.window)
    assert runner.footprint(37 + 20, 2, LAZY.sink, LAZY.window) >= runner.footprint(37 + reserve, 2, LAZY.sink, LAZY.window)
    first = int(res.logits.argmax())
    plain = _decode(runner, res.handle, first, 37, 12)
    runner.release(res.handle)
    assert runner.used == 0

    # the same, swapped out and back in half-way: identical tokens, the budget's share freed meanwhile
    res, = runner.prefill(prefill_requests(engine.backend, [ids], [make_policy(LAZY, n, 2)], LAZY, reserve))
    head = _decode(runner, res.handle, first, 37, 5)
    held = runner.used
    swapped = runner.swap_out(res.handle)
    assert runner.used == 0 and runner.swap_in_need(swapped) == held
    handle = runner.swap_in(swapped)
    assert runner.used == held
    tail = _decode(runner, handle, head[-1], 37 + 5, 7)
    assert head + tail[1:] == plain
    runner.release(handle)
    assert runner.used == 0


def test_grow_need_and_growth(setup):
    kind, engine, runner = setup
    ids = torch.tensor(_prompts(4, (16,))[0])
    n = engine.num_layers
    reserve = runner.decode_reserve(40)
    res, = runner.prefill(prefill_requests(engine.backend, [ids], [make_policy(LAZY, n, 2)], LAZY, reserve))
    assert runner.grow_need(res.handle, 16 + reserve) == 0
    need = runner.grow_need(res.handle, 16 + 40)
    before = runner.used
    runner.grow(res.handle, 16 + 40)
    assert runner.used - before == need and runner.grow_need(res.handle, 16 + 40) == 0
    if kind == "paged":  # 2 full layers from 3 to 7 blocks of 8 tokens (lazy layers stop at sink + window)
        assert need == 2 * 4 * runner.pool.bytes_per_block
    else:  # the contiguous runner made room for every decode token up front
        assert need == 0
    runner.release(res.handle)
    assert runner.used == 0
