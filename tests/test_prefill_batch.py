"""Batched prefill: prompts admitted together go through each layer as one right-padded batch and
give what each gives when prefilled alone (tokens, lazy layers, ratios, KV), on both runners."""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, SpacedIds as _Ids, random_prompts as _prompts, tiny_model
from ltengine import Engine, LazyConfig
from conftest import prefill_requests
from ltengine.config import SamplingParams
from ltengine.sequence import Sequence
from ltengine.lazy import make_policy
from ltengine.runners import ReferenceRunner


LAZY = LazyConfig(fraction=0.5, sink=3, window=13, probe=16)


@pytest.mark.parametrize("runner", ["paged", "reference"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_prefill_equals_one_at_a_time(family, runner):
    model = tiny_model(family, layers=6)
    # lengths within a fifth of each other batch together; 1 and 5 pad too much and run apart
    prompts = _prompts(7, (40, 37, 33, 39, 1, 5, 120, 111))
    alone = Engine(model, _Ids(), lazy=LAZY, runner=runner, block_size=8, max_prefill_tokens=1)
    batched = Engine(model, _Ids(), lazy=LAZY, runner=runner, block_size=8)
    want = alone.generate(prompts, max_new_tokens=12)
    got = batched.generate(prompts, max_new_tokens=12)
    assert [o.stats.prefill_batch for o in want] == [1] * len(prompts)
    assert [o.stats.prefill_batch for o in got] == [4, 4, 4, 4, 1, 1, 2, 2]
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        assert g.lazy_layers == w.lazy_layers
        assert g.layer_scores == pytest.approx(w.layer_scores, rel=1e-4, abs=1e-6)
        assert g.stats.kv_bytes_after_prefill == w.stats.kv_bytes_after_prefill


def test_prefill_batch_results_match_single_prefill():
    """The runner level: per-prompt logits and cached K/V of a padded batch equal single prefills."""
    model = tiny_model("llama", layers=4)
    engine = Engine(model, _Ids(), lazy=LAZY, runner="reference")
    runner = ReferenceRunner(engine.adapter, engine.backend, None)
    prompts = [torch.tensor(p) for p in _prompts(1, (50, 29, 64))]
    policies = lambda: [make_policy(LAZY, 4, 2) for _ in prompts]  # noqa: E731
    batch = runner.prefill(prefill_requests(engine.backend, prompts, policies(), LAZY, 3))
    for ids, pol, res in zip(prompts, policies(), batch):
        one, = runner.prefill(prefill_requests(engine.backend, [ids], [pol], LAZY, 3))
        torch.testing.assert_close(res.logits, one.logits, rtol=1e-4, atol=1e-4)
        assert res.lazy_layers == one.lazy_layers and res.kv_bytes == one.kv_bytes
        for a, b in zip(res.handle.layers, one.handle.layers):
            assert a.length == b.length == ids.shape[0]
            torch.testing.assert_close(a.k, b.k, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.v, b.v, rtol=1e-4, atol=1e-5)
        runner.release(one.handle)
        runner.release(res.handle)
    assert runner.used == 0


def test_prefill_groups_respect_cap_and_padding():
    model = tiny_model("llama", layers=2)
    engine = Engine(model, _Ids(), lazy=None, runner="reference", max_prefill_tokens=100)
    seqs = [Sequence(f"r{i}", list(range(n)), SamplingParams(), LAZY, 2)
            for i, n in enumerate((10, 30, 9, 25, 24, 8, 200, 10, 10, 10, 10))]
    groups = engine.scheduler.prefill_groups(seqs)
    assert sorted(len(s.prompt) for g in groups for s in g) == sorted(len(s.prompt) for s in seqs)
    for g in groups:
        longest = max(len(s.prompt) for s in g)
        padded = longest * len(g)
        assert len(g) == 1 or padded <= 100  # a prompt over the cap runs alone
        assert 5 * sum(len(s.prompt) for s in g) >= 4 * padded  # at most a fifth is padding
    assert [len(g) for g in groups] == [1, 3, 7]  # 200 | 30 25 24 | 10 10 10 10 10 9 8


def test_batched_prefill_stays_within_a_budget():
    """Admission reserves each prompt's worst case before the batch runs, so a batch never
    overfills the pool; the pool is empty again afterwards."""
    model = tiny_model("qwen3", layers=6)
    lazy = LazyConfig(fraction=0.5, sink=2, window=14)
    prompts = _prompts(5, (60, 58, 55, 61, 59, 57, 62, 56))
    budget = 300 * 1024  # 4 of these prompts at a time (72 KiB each at worst)
    engine = Engine(model, _Ids(), lazy=lazy, runner="paged", block_size=16, kv_budget=budget)
    alone = [engine.generate(p, max_new_tokens=6) for p in prompts]
    assert engine.last_stats["kv_used_after"] == 0
    outs = engine.generate(prompts, max_new_tokens=6)
    assert engine.last_stats["peak_kv_bytes"] <= budget
    assert engine.last_stats["kv_used_after"] == 0
    assert 1 < max(o.stats.prefill_batch for o in outs) < len(prompts)  # the budget split the batch
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "16k"])
def test_bad_max_prefill_tokens(bad):
    with pytest.raises(ValueError, match="max_prefill_tokens must be a positive integer"):
        Engine(tiny_model("llama", layers=2), _Ids(), max_prefill_tokens=bad)


@pytest.mark.parametrize("runner", ["paged", "reference"])
def test_failed_batch_prefill_gives_back_all_kv(runner):
    """A prefill that fails part-way (here a policy raising at layer 2 of one prompt) re-raises that
    error and hands back every prompt's KV, so the engine's runner can be used again."""
    model = tiny_model("llama", layers=4)
    engine = Engine(model, _Ids(), lazy=LAZY, runner=runner, block_size=8, kv_budget="1MiB")
    prompts = _prompts(2, (40, 37, 39))
    engine.generate(prompts, max_new_tokens=2)  # builds the runner (and its pool)
    run = engine.runner
    free = run.free

    class Boom(RuntimeError):
        pass

    def policies():
        out = [make_policy(LAZY, 4, 2) for _ in prompts]
        observe = out[1].observe
        out[1].observe = lambda i, r: (_ for _ in ()).throw(Boom("layer 2")) if i == 2 else observe(i, r)
        return out

    with pytest.raises(Boom, match="layer 2"):
        run.prefill(prefill_requests(engine.backend, [torch.tensor(p) for p in prompts], policies(), LAZY, 2))
    assert run.free == free and run.used == 0
    outs = engine.generate(prompts, max_new_tokens=2)
    assert all(o.finish_reason == "length" for o in outs)
