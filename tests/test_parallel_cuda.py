"""Tensor parallelism on two GPUs (NCCL): the paged runner, CUDA graphs with the all-reduces captured,
the fused bf16 decode step. Skipped with a reason on machines with fewer than two GPUs (CI).

fp32: greedy tokens, lazy layers and KV bytes equal to the single-GPU engine's (the rounding of a
split reduction is far below the tiny models' top-2 logit gaps). bf16: the fused path runs end to end
at TP=2 and its KV bytes in full mode equal TP=1's (tokens may differ by bf16 rounding; bench/tp.py
measures that against an fp32 reference).
"""
from __future__ import annotations

import pytest
import torch

from conftest import SpacedIds, random_prompts, tiny_model
from ltengine import Engine, LazyConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (tensor_parallel=2)")]

LAZY = LazyConfig(fraction=0.5, sink=4, window=16, probe=8)


def _pair(family, dtype):
    kw = dict(lazy=LAZY, kv_budget="256MiB", block_size=16)
    single = Engine(tiny_model(family, layers=6, dtype=dtype).to("cuda:0"), SpacedIds(), **kw)
    tp = Engine(tiny_model(family, layers=6, dtype=dtype).to("cuda:0"), SpacedIds(), tensor_parallel=2, **kw)
    return single, tp


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tp2_fp32_equals_one_gpu(family):
    single, tp = _pair(family, torch.float32)
    try:
        assert tp.runner_kind == "paged" and tp.runner.graphs
        prompts = random_prompts(3, (90, 61, 75))
        for lazy in (None, LAZY):
            want = single.generate(prompts, max_new_tokens=12, lazy=lazy)
            got = tp.generate(prompts, max_new_tokens=12, lazy=lazy)
            for a, b in zip(got, want):
                assert a.token_ids == b.token_ids
                assert a.lazy_layers == b.lazy_layers
                assert a.stats.kv_bytes_after_prefill == b.stats.kv_bytes_after_prefill
                assert a.stats.peak_kv_bytes == b.stats.peak_kv_bytes
    finally:
        tp.close()
        single.close()


def test_tp2_bf16_fused_path_runs():
    single, tp = _pair("llama", torch.bfloat16)
    try:
        assert tp.runner.fused is not None, "the fused bf16 decode step is not in use"
        prompts = random_prompts(4, (80, 80))
        want = single.generate(prompts, max_new_tokens=16, lazy=None)
        got = tp.generate(prompts, max_new_tokens=16, lazy=None)
        for a, b in zip(got, want):
            assert len(a.token_ids) == 16 and a.finish_reason == "length"
            assert a.stats.kv_bytes_after_prefill == b.stats.kv_bytes_after_prefill
    finally:
        tp.close()
        single.close()
