"""Admission by need and preemption on the paged runner (CPU): a pool that admits requests by their
prompts and runs dry while they decode swaps the newest out and back in; outputs equal unpreempted
runs, the budget is never exceeded, and the pool ends idle."""
from __future__ import annotations

import pytest

from conftest import FAMILIES, SpacedIds as _Ids, random_prompts as _prompts, tiny_model
from ltengine import Engine, LazyConfig

LAZY = LazyConfig(fraction=0.5, sink=2, window=14, probe=8)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lazy", [None, LAZY])
def test_preemption_keeps_outputs_and_budget(family, lazy):
    model = tiny_model(family, layers=4)
    prompts = _prompts(11, (40, 24, 33, 17, 48, 29))
    # 4 layers x 2 KV heads x 16 dims x fp32 x 2 = 1 KiB per token: 6 prompts of ~32 tokens + 1 block
    # of decode room fit at once (~240 KiB), their 60 decode tokens each (~360 KiB more) do not
    budget = 300 * 1024
    engine = Engine(model, _Ids(), lazy=lazy, runner="paged", block_size=8, kv_budget=budget)
    alone = [engine.generate(p, max_new_tokens=60, ignore_eos=True) for p in prompts]
    outs = engine.generate(prompts, max_new_tokens=60, ignore_eos=True)
    stats = engine.last_stats
    assert stats["preemptions"] > 0, "the budget was meant to force preemption"
    assert stats["peak_kv_bytes"] <= budget
    assert stats["kv_used_after"] == 0
    assert stats["max_running"] == len(prompts)  # admitted by need, all at once
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
    assert sum(o.stats.preemptions for o in outs) == stats["preemptions"]


def test_admission_by_need_admits_more_than_worst_case():
    """max_new_tokens far above what requests use: worst-case admission would run one at a time."""
    model = tiny_model("llama", layers=4)
    prompts = _prompts(12, (30, 30, 30, 30))
    engine = Engine(model, _Ids(), lazy=None, runner="paged", block_size=8, kv_budget="200KiB")
    outs = engine.generate(prompts, max_new_tokens=150, stop=None)
    assert engine.last_stats["max_running"] == 4
    assert engine.last_stats["peak_kv_bytes"] <= 200 * 1024 and engine.last_stats["kv_used_after"] == 0
    assert all(o.finish_reason in ("length", "eos") for o in outs)


def test_request_that_can_never_fit_errors_while_others_run():
    model = tiny_model("llama", layers=4)
    prompts = _prompts(13, (30, 400, 20))
    engine = Engine(model, _Ids(), lazy=None, runner="paged", block_size=8, kv_budget="128KiB")
    outs = engine.generate(prompts, max_new_tokens=10, ignore_eos=True)
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert "too small" in outs[1].error
