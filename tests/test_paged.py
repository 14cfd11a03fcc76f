"""The paged runner (one block pool, batched decode) against the reference runner, on CPU."""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, SpacedIds as _Ids, random_prompts as _prompts, tiny_model
from ltengine import Engine, LazyConfig
from ltengine.kernels.paged import paged_decode_ref
from ltengine.kernels.reference import decode_full_ref


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lazy", [None, LazyConfig(fraction=0.5, sink=3, window=13, probe=16)])
def test_paged_equals_reference(family, lazy):
    model = tiny_model(family, layers=6)
    prompts = _prompts(3, (1, 5, 16, 40, 200))
    ref = Engine(model, _Ids(), lazy=lazy, runner="reference").generate(prompts, max_new_tokens=20)
    paged = Engine(model, _Ids(), lazy=lazy, runner="paged", block_size=8).generate(prompts, max_new_tokens=20)
    for r, p in zip(ref, paged):
        assert p.token_ids == r.token_ids and p.lazy_layers == r.lazy_layers
        assert p.layer_scores == pytest.approx(r.layer_scores, rel=1e-5)


def test_continuous_batching_under_a_budget():
    """A pool too small for all prompts at once: they wait, get admitted as others finish, and
    produce what each produces alone; the pool is empty afterwards and never overfull."""
    model = tiny_model("qwen3", layers=6)
    lazy = LazyConfig(fraction=0.5, sink=2, window=14)
    prompts = _prompts(4, (30, 90, 7, 150, 60, 33, 120, 10))
    new = [5, 17, 9, 3, 12, 20, 1, 8]
    engine = Engine(model, _Ids(), lazy=lazy, runner="paged", block_size=16, kv_budget="160KiB")
    outs = [engine.generate(p, max_new_tokens=n) for p, n in zip(prompts, new)]  # one at a time
    assert engine.last_stats["kv_used_after"] == 0
    batch = engine.generate(prompts, max_new_tokens=max(new))
    assert engine.last_stats["kv_used_after"] == 0  # every block came back
    assert 1 < engine.last_stats["max_running"] < len(prompts)  # some waited, some ran together
    assert engine.last_stats["peak_kv_bytes"] <= 160 * 1024
    for one, b, n in zip(outs, batch, new):
        assert b.token_ids[:n] == one.token_ids


@pytest.mark.parametrize("runner", ["paged", "reference"])
def test_per_request_max_new_tokens(runner):
    """``max_new_tokens`` as a list: each request stops at its own limit, admission reserves its own
    worst case, and each output equals the request run alone; bad lists are refused clearly."""
    model = tiny_model("qwen3", layers=6)
    prompts = _prompts(4, (30, 90, 7, 150, 60, 33, 120, 10))
    new = [5, 17, 9, 3, 12, 20, 1, 8]
    engine = Engine(model, _Ids(), lazy=LazyConfig(fraction=0.5, sink=2, window=14), runner=runner,
                    block_size=16, kv_budget="160KiB")
    alone = [engine.generate(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts, new)]
    batch = engine.generate(prompts, max_new_tokens=new, ignore_eos=True)
    assert [len(o.token_ids) for o in batch] == new
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]
    in_flight = 0 if runner == "paged" else engine.runner.per_token_layer * max(map(len, prompts))
    assert engine.last_stats["peak_kv_bytes"] <= 160 * 1024 + in_flight  # reference: + one layer in flight
    with pytest.raises(ValueError, match="one entry per prompt: got 2 for 8 prompts"):
        engine.generate(prompts, max_new_tokens=[1, 2])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        engine.generate(prompts, max_new_tokens=[1] * 7 + [0])
    with pytest.raises(ValueError, match="got 1 for a single prompt"):
        engine.generate([1, 2, 3], max_new_tokens=[4])
    assert engine.generate(prompts[:2], max_new_tokens=[2, 1], ignore_eos=True)[1].token_ids == alone[1].token_ids[:1]


def test_prompt_that_never_fits_fails_alone():
    model = tiny_model("llama", layers=4)
    engine = Engine(model, _Ids(), lazy=LazyConfig(sink=4, window=60), runner="paged", block_size=16,
                    kv_budget=12 * 2 * 16 * 2 * 16 * 4)  # 12 blocks: 3 per layer; 900 tokens need 4
    outs = engine.generate(_prompts(5, (20, 900, 40)), max_new_tokens=4)
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert "prompt 1" in outs[1].error and "too small" in outs[1].error
    with pytest.raises(ValueError, match="too small: even with every layer lazy"):
        engine.generate(_prompts(5, (900,))[0], max_new_tokens=4)
    assert engine.generate([1, 2, 3], max_new_tokens=2).finish_reason == "length"


def test_streaming_layers_free_blocks_at_once():
    model = tiny_model("llama", layers=4)
    engine = Engine(model, _Ids(), lazy=LazyConfig(policy="streaming", sink=4, window=12), runner="paged",
                    block_size=16, kv_budget="1MiB")
    out = engine.generate(_prompts(6, (500,))[0], max_new_tokens=3)
    assert out.lazy_layers == [0, 1, 2, 3]
    assert out.stats.kv_bytes_after_prefill == 4 * 2 * 16 * 2 * 16 * 4  # one block per layer
    assert engine.last_stats["peak_kv_bytes"] == out.stats.kv_bytes_after_prefill  # never held a full layer


def test_paged_reference_kernel_matches_contiguous():
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, d, bs, nb = 3, 8, 2, 16, 4, 40
    pool_k = torch.randn(nb, bs, hkv, d, generator=g)
    pool_v = torch.randn(nb, bs, hkv, d, generator=g)
    tables = torch.stack([torch.randperm(nb, generator=g)[:7] for _ in range(b)]).int()
    n = torch.tensor([1, 17, 28], dtype=torch.int32)
    q = torch.randn(b, hq, d, generator=g)
    k = pool_k[tables.long()].reshape(b, 28, hkv, d)
    v = pool_v[tables.long()].reshape(b, 28, hkv, d)
    torch.testing.assert_close(paged_decode_ref(q, pool_k, pool_v, tables, n, 0.25),
                               decode_full_ref(q, k, v, n, 0.25))


@pytest.mark.parametrize("runner", ["paged", "reference"])
def test_overlapped_decode_equals_plain(runner):
    """Decode overlap (step n + 1 launched before step n's tokens are taken in; on by default on
    CUDA) forced on CPU: same tokens, finish reasons and texts, and every block comes back, with
    sequences finishing at different steps, stop strings, and admission waiting on a budget."""
    model = tiny_model("llama", layers=4)
    prompts = _prompts(9, (30, 90, 7, 150, 60, 33, 120, 10, 64, 64))
    new = [5, 17, 9, 3, 12, 20, 1, 8, 30, 2]
    outs = {}
    for overlap in (False, True):
        engine = Engine(model, _Ids(), lazy=LazyConfig(fraction=0.5, sink=2, window=14), runner=runner,
                        block_size=16, kv_budget="200KiB", overlap=overlap)
        outs[overlap] = engine.generate(prompts, max_new_tokens=new)
        stop = engine.generate(prompts[:3], max_new_tokens=20, stop=[" 7"])
        outs[overlap] += stop
        assert engine.last_stats["peak_kv_bytes"] <= 200 * 1024
        assert engine.last_stats["kv_used_after"] == 0
    for a, b in zip(outs[False], outs[True]):
        assert (b.token_ids, b.finish_reason, b.text) == (a.token_ids, a.finish_reason, a.text)
    assert [len(o.token_ids) for o in outs[True][:10]] == new
    assert "stop" in {o.finish_reason for o in outs[True][10:]}


def test_rows_leaving_the_batch_are_gathered_not_rebuilt(monkeypatch):
    """Requests finishing at different steps (blocks growing meanwhile, block_size 4): the decode
    tables of the rows left are gathered on the device instead of rebuilt from the block lists, and
    every request's tokens are the reference runner's."""
    from ltengine.runners.paged_batch import DecodeBatches

    model = tiny_model("llama", layers=6)
    lazy = LazyConfig(fraction=0.5, sink=2, window=9)
    prompts = _prompts(8, (30, 7, 52, 19, 40, 11))
    new = [3, 14, 6, 22, 9, 17]
    ref = Engine(model, _Ids(), lazy=lazy, runner="reference").generate(prompts, max_new_tokens=new, ignore_eos=True)
    builds = []
    tables = DecodeBatches.tables
    monkeypatch.setattr(DecodeBatches, "tables", lambda self, seqs, bucket: builds.append(len(seqs)) or tables(self, seqs, bucket))
    paged = Engine(model, _Ids(), lazy=lazy, runner="paged", block_size=4).generate(prompts, max_new_tokens=new,
                                                                                    ignore_eos=True)
    assert [o.token_ids for o in paged] == [o.token_ids for o in ref]
    assert [b for b in builds if b] == [6]  # one build for the whole run; five departures gathered
