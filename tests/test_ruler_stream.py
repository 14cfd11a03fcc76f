"""RULER configs with streaming prefill (``peak50-sp``): parsed into an engine-run config whose LazyConfig
prefills the popped layers over sink + window, and run end to end through ``Engine.generate``."""
from __future__ import annotations

import pytest

from ltengine import Engine
from ltengine.eval.ruler import make_samples, run_engine
from ltengine.eval.ruler_configs import parse_config


def test_sp_configs_parse_to_engine_runs_with_streaming_prefill():
    cfg = parse_config("peak50-sp", sink=4, window=128)
    assert cfg.kind == "engine" and cfg.fraction == 0.5 and cfg.score == "peak" and cfg.probe == 16
    lazy = cfg.lazy()
    assert lazy.streaming_prefill and lazy.window == 128 and lazy.score == "peak"
    assert parse_config("ratio25-p32-sp").probe == 32
    assert not parse_config("peak50").lazy().streaming_prefill
    with pytest.raises(ValueError, match="streaming prefill"):
        parse_config("random50-sp")


def test_run_engine_records_one_row_per_sample_with_its_lazy_layers(default_model):
    model, tokenizer = default_model
    engine = Engine(model, tokenizer, lazy=None)
    samples = make_samples(engine.tokenizer, ["niah_single_1"], [512], 2, seed=5)
    cfg = parse_config("peak50-sp", window=64)
    rows = run_engine(engine, samples, [cfg], chunk=2)
    assert [r["sample"] for r in rows] == [0, 1] and all(r["config"] == "peak50-sp" for r in rows)
    n_layers = model.config.num_hidden_layers
    assert all(len(r["lazy_layers"]) == n_layers // 2 for r in rows), [r["lazy_layers"] for r in rows]
    assert all(r["all"] in (0.0, 1.0) and r["output"] is not None for r in rows)


def test_batched_decode_reads_fp8_like_the_harness(default_model):
    """With ``kv_dtype="fp8"`` the RULER batched decode sees K/V as the fp8 pool stores them: the same
    greedy tokens as ``harness.greedy`` over fp8 caches (``build_cache`` in the adapter's KV dtype), full
    and lazy."""
    from ltengine.eval.harness import greedy, shared_prefill
    from ltengine.eval.ruler_decode import Job, batched_greedy
    from ltengine.eval.ruler_tasks import make_sample

    model, tokenizer = default_model
    e8 = Engine(model, tokenizer, lazy=None, kv_dtype="fp8")
    samples = [make_sample(e8.tokenizer, t, 512, 0, 0) for t in ("niah_single_1", "vt")]
    jobs, want = [], []
    for s in samples:
        sp = shared_prefill(e8.adapter, s.ids, 16)
        for layers in ([], parse_config("peak50").eval_config(512, sp.num_layers).lazy_layers(sp)):
            cache = sp.build_cache(layers, 4, 64, len(s.ids) + 16, e8.backend)
            want.append(greedy(e8.adapter, e8.backend, [cache], sp.logits, len(s.ids), 16, set())[0])
            jobs.append(Job(sp.full, frozenset(layers), 4, 64, sp.logits, len(s.ids), 16, ["\x00never"]))
    got = batched_greedy(e8.adapter, jobs, set(), lambda t: e8.tokenizer.decode(t))
    assert got == want
