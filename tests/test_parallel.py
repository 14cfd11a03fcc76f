"""Tensor parallelism on CPU: two gloo processes (rank 0 here, rank 1 spawned by the engine) against
the single-process engine on the same tiny random LLaMA / Qwen3 weights.

Greedy tokens, lazy layers and KV bytes must be equal in full mode, in lazy mode (fraction and byte
budget) and for a batch; scores agree to float rounding (the ranks' partial sums are added in another
order). Each TP engine is built once per (family, runner) and closed, with its worker, at the end.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SpacedIds, random_prompts, tiny_model
from ltengine import Engine, LazyConfig, SamplingParams

CASES = [("llama", "reference"), ("qwen3", "reference"), ("llama", "paged"), ("qwen3", "paged")]
LAZY = LazyConfig(fraction=0.5, sink=4, window=16, probe=8)
LENGTHS = (90, 61, 75)  # one batched prefill (padding under a fifth)


def _model(family):
    return tiny_model(family, layers=6)


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def pair(request):
    """(single-process engine, 2-rank engine) of one family and runner."""
    family, runner = request.param
    old = os.environ.get("LTENGINE_TP_TIMEOUT")
    os.environ["LTENGINE_TP_TIMEOUT"] = "60"  # a hung collective fails the test in a minute
    try:
        single = Engine(_model(family), SpacedIds(), lazy=LAZY, runner=runner, block_size=16)
        tp = Engine(_model(family), SpacedIds(), lazy=LAZY, runner=runner, block_size=16, tensor_parallel=2)
        yield single, tp
        tp.close()
        assert all(not p.is_alive() for p in tp.tp.workers), "the worker outlived close()"
    finally:
        if old is None:
            os.environ.pop("LTENGINE_TP_TIMEOUT", None)
        else:
            os.environ["LTENGINE_TP_TIMEOUT"] = old


def _same(a, b):
    assert a.token_ids == b.token_ids
    assert a.lazy_layers == b.lazy_layers
    assert a.finish_reason == b.finish_reason
    for name in ("kv_bytes_after_prefill", "full_kv_bytes", "peak_kv_bytes"):
        assert getattr(a.stats, name) == getattr(b.stats, name), name
    assert len(a.layer_scores) == len(b.layer_scores)
    # fp32 scores: the ranks' partial projections and the score sums add up in another order
    assert torch.allclose(torch.tensor(a.layer_scores), torch.tensor(b.layer_scores), rtol=0, atol=1e-5)


def test_shards_hold_their_heads(pair):
    single, tp = pair
    s, t = single.adapter.shape, tp.adapter.shape
    assert (t.num_heads, t.num_kv_heads) == (s.num_heads // 2, s.num_kv_heads // 2)
    assert tp.adapter.kv_bytes_per_token_layer * 2 == single.adapter.kv_bytes_per_token_layer
    assert tp.adapter.vocab_size == single.adapter.vocab_size


@pytest.mark.parametrize("mode", ["full", "lazy", "budget"])
def test_batch_equals_single_process(pair, mode):
    single, tp = pair
    prompts = random_prompts(3, LENGTHS)
    lazy = {"full": None, "lazy": LAZY, "budget": LazyConfig(sink=4, window=16, probe=8)}[mode]
    budget = None
    if mode == "budget":  # 350 token-layers: the longest prompt alone (6 x 102 all full) does not fit
        budget = single.adapter.kv_bytes_per_token_layer * 350
    single.kv_budget = tp.kv_budget = budget
    try:
        want = single.generate(prompts, max_new_tokens=12, lazy=lazy)
        got = tp.generate(prompts, max_new_tokens=12, lazy=lazy)
    finally:
        single.kv_budget = tp.kv_budget = None
    for a, b in zip(got, want):
        _same(a, b)
    if mode != "full":
        assert any(o.lazy_layers for o in want), "the lazy case demoted nothing"
    if mode == "budget":
        assert tp.last_stats["peak_kv_bytes"] <= budget
        assert tp.last_stats["peak_kv_bytes"] == single.last_stats["peak_kv_bytes"]


def test_sampling_same_seed_same_tokens(pair):
    single, tp = pair
    prompt = random_prompts(5, (40,))[0]
    kw = dict(max_new_tokens=10, temperature=0.8, top_k=20, seed=7)
    assert tp.generate(prompt, **kw).token_ids == single.generate(prompt, **kw).token_ids


def test_step_api_abort_and_metrics(pair):
    single, tp = pair
    a, b = random_prompts(9, (50, 30))
    keep = tp.add_request(a, SamplingParams(max_new_tokens=8))
    drop = tp.add_request(b, SamplingParams(max_new_tokens=50))
    tokens = []
    for _ in range(3):
        for out in tp.step():
            if out.request_id == keep:
                tokens += out.new_token_ids
    assert tp.abort(drop)
    assert tp.metrics()["running"] == 1
    while tp.has_unfinished():
        for out in tp.step():
            if out.request_id == keep:
                tokens += out.new_token_ids
    assert tokens == single.generate(a, max_new_tokens=8).token_ids
    assert tp.metrics()["kv_bytes_used"] == 0


def test_dead_worker_raises_not_hangs(pair):
    _, tp = pair
    worker = tp.tp.workers[0]
    worker.kill()
    worker.join(10)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="worker rank 1 of 2 has exited"):
        tp.generate([1, 2, 3, 4, 5], max_new_tokens=2)
    assert time.monotonic() - t0 < 30


def test_bad_tensor_parallel_sizes():
    model = _model("llama")  # 4 query heads, 2 KV heads
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        Engine(model, SpacedIds(), tensor_parallel=4)
    with pytest.raises(ValueError, match="tensor_parallel must be an integer >= 1"):
        Engine(model, SpacedIds(), tensor_parallel=0)


def test_torchrun_launch():
    """Both ranks started by torchrun run the same script; rank 0 alone gets past ``Engine(...)``."""
    script = Path(__file__).with_name("tp_torchrun_script.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", LTENGINE_TP_TIMEOUT="60",
               PYTHONPATH=os.pathsep.join([str(script.parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", str(script), "llama"], env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and len(lines) == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    res = json.loads(lines[0].removeprefix("RESULT "))
    assert all(res["tokens"]) and all(res["lazy"]) and all(res["kv"]) and res["demoted"] > 0, res


def test_plan_is_transformers_own_and_checked():
    from ltengine.parallel import tp_plan

    model = _model("qwen3")
    assert model.config.base_model_tp_plan["layers.*.self_attn.o_proj"] == "rowwise"  # what sharding reads
    plan = tp_plan(model)
    assert plan["self_attn.q_proj"] == "colwise" and plan["mlp.down_proj"] == "rowwise"
    model.config.base_model_tp_plan = {"layers.*.self_attn.o_proj": "colwise"}
    with pytest.raises(ValueError, match="shards self_attn.o_proj as 'colwise'"):
        tp_plan(model)
