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
