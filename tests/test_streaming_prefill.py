"""Streaming prefill (``LazyConfig(streaming_prefill=True)``) on CPU: the sink + window prefill kernel's
PyTorch twin against a dense masked softmax, and the engine against the model's own HF forward with
sink + window masks on the streamed layers during prefill as well as decode."""
from __future__ import annotations

import zlib

import pytest
import torch

from conftest import FAMILIES, SpacedIds, random_prompts, tiny_model
from ltengine import Engine, LazyConfig, SamplingParams
from ltengine.kernels import get_backend
from ltengine.kernels.prefill import prefill_sink_window_ref
from ltengine.lazy import LightTransferPolicy
from reference_attention import masked_generate

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.bfloat16: torch.finfo(torch.bfloat16).eps,
       torch.float16: torch.finfo(torch.float16).eps}


def dense_sink_window(q, k, v, sink, window, scale):
    """The T x T masked softmax in float64: query i over keys j <= i with j < sink or j > i - window."""
    b, t, h_q, d = q.shape
    g = h_q // k.shape[2]
    qf = q.double().transpose(1, 2)
    kf = k.double().repeat_interleave(g, 2).transpose(1, 2)
    vf = v.double().repeat_interleave(g, 2).transpose(1, 2)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    s = (qf @ kf.transpose(-1, -2) * scale).masked_fill(~((j <= i) & ((j < sink) | (j > i - window))), float("-inf"))
    return (s.softmax(-1) @ vf).transpose(1, 2)


# (batch, T, H_q, H_kv, D, sink, window): odd sizes, GQA 1:1 / 2:1 / 3:1, window 1, window >= T, sink >= T
SHAPES = [(2, 77, 4, 2, 16, 3, 13), (1, 130, 6, 2, 24, 4, 50), (1, 301, 2, 1, 64, 1, 1), (1, 45, 4, 4, 32, 100, 10),
          (3, 19, 3, 1, 8, 2, 40), (1, 200, 4, 2, 16, 4, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [None, 32])
def test_twin_matches_dense_masked_softmax(shape, dtype, chunk):
    b, t, h_q, h_kv, d, sink, window = shape
    g = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))
    q, k, v = (torch.randn(b, t, h, d, generator=g).to(dtype) for h in (h_q, h_kv, h_kv))
    ref = dense_sink_window(q, k, v, sink, window, d ** -0.5)  # from the same rounded inputs
    out = prefill_sink_window_ref(q, k, v, sink, window, d ** -0.5, chunk=chunk)
    assert out.dtype == dtype and out.shape == q.shape
    # one rounding of the output plus the low-precision softmax / products: a few units of roundoff of
    # the largest |v| (a convex combination of rows of v); fp32 also pays the SDPA's own summation order
    tol = 4 * EPS[dtype] * float(v.abs().max())
    err = float((out.double() - ref).abs().max())
    assert err <= tol, f"{shape} {dtype}: max error {err:.3g} > {tol:.3g}"


def test_twin_refuses_bad_shapes():
    q, k = torch.zeros(1, 8, 3, 16), torch.zeros(1, 8, 2, 16)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        prefill_sink_window_ref(q, k, k, 4, 4, 0.25)
    with pytest.raises(ValueError, match=r"\[B, T, H_q, D\]"):
        prefill_sink_window_ref(q[0], k, k, 4, 4, 0.25)
    with pytest.raises(ValueError, match="window >= 1"):
        prefill_sink_window_ref(k, k, k, 4, 0, 0.25)


def test_backend_op_is_the_twin_on_cpu():
    backend = get_backend("cpu")
    assert backend.impl_for("prefill_sink_window", torch.float32, 16) == "reference"
    q = torch.randn(1, 40, 4, 16)
    k = torch.randn(1, 40, 2, 16)
    assert torch.equal(backend.prefill_sink_window(q, k, k, 2, 5, 0.25), prefill_sink_window_ref(q, k, k, 2, 5, 0.25))


def test_config_validation():
    with pytest.raises(ValueError, match="streaming_prefill must be True or False"):
        LazyConfig(streaming_prefill=1)
    with pytest.raises(ValueError, match="'topk' decides only after"):
        LazyConfig(policy="topk", streaming_prefill=True)
    assert LazyConfig().streaming_prefill is False
    assert LazyConfig(policy=[3, 1], streaming_prefill=True).policy == (1, 3)


LAYERS = (0, 2, 5, 7)  # of 8: the first, the last (its one-row attention path) and two between


@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_layers_match_masked_reference(family):
    model = tiny_model(family, layers=8)
    lazy = LazyConfig(policy=LAYERS, sink=3, window=13, probe=16, streaming_prefill=True)
    standard = Engine(model, tokenizer=SpacedIds(), lazy=LazyConfig(policy=LAYERS, sink=3, window=13, probe=16))
    engine = Engine(model, tokenizer=SpacedIds(), lazy=lazy)
    differs = 0
    for ids in random_prompts(3, (5, 16, 40, 200)):  # shorter than, at and far past sink + window
        out = engine.generate(ids, max_new_tokens=20)
        assert out.lazy_layers == list(LAYERS)
        ref = masked_generate(model, ids, LAYERS, lazy.sink, lazy.window, 20, prefill_layers=LAYERS)
        assert out.token_ids == ref, f"{family}, prompt {len(ids)}"
        differs += out.token_ids != standard.generate(ids, max_new_tokens=20).token_ids
    assert differs > 0, "streaming prefill never changed the output: the test would not see it ignored"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_online_queue_streams_the_layers_it_pops_at_once(family):
    model = tiny_model(family, layers=8)
    lazy = LazyConfig(fraction=0.5, sink=3, window=13, probe=16, streaming_prefill=True)
    engine = Engine(model, tokenizer=SpacedIds(), lazy=lazy)
    streamed_any = 0
    for ids in random_prompts(4, (40, 200)):
        out = engine.generate(ids, max_new_tokens=20)
        assert len(out.lazy_layers) == 4
        queue = LightTransferPolicy(8, 4)  # which layers the queue pops at their own step, from the scores
        streamed = [i for i, s in enumerate(out.layer_scores) if i in queue.observe(i, s)]
        assert set(streamed) <= set(out.lazy_layers)
        streamed_any += len(streamed)
        ref = masked_generate(model, ids, out.lazy_layers, lazy.sink, lazy.window, 20, prefill_layers=streamed)
        assert out.token_ids == ref, f"{family}, prompt {len(ids)}, lazy {out.lazy_layers}, streamed {streamed}"
    assert streamed_any > 0


@pytest.mark.parametrize("runner", ["reference", "paged"])
def test_runners_agree_and_budget_holds(runner):
    model = tiny_model("llama", layers=8)
    sink, window, t, n_new = 4, 28, 300, 6
    per = 2 * 2 * 16 * 4  # K and V, 2 kv heads, head dim 16, fp32
    budget = per * (4 * 320 + 4 * (sink + window) + sink + window)  # 4 full layers (paged blocks of 16)
    kw = dict(sink=sink, window=window, probe=16)
    ids = random_prompts(5, (t,))[0]
    outs = {}
    for streaming in (False, True):
        engine = Engine(model, SpacedIds(), lazy=LazyConfig(streaming_prefill=streaming, **kw), kv_budget=budget,
                        runner=runner, block_size=16)
        out = engine.generate(ids, max_new_tokens=n_new)
        assert out.stats.peak_kv_bytes <= budget and out.stats.kv_bytes_after_prefill <= budget
        assert len(out.lazy_layers) == 4
        outs[streaming] = out
    ref_engine = Engine(model, SpacedIds(), lazy=LazyConfig(streaming_prefill=True, **kw), kv_budget=budget,
                        runner="reference")
    assert outs[True].token_ids == ref_engine.generate(ids, max_new_tokens=n_new).token_ids
    # streamed layers store only sink + window, as the standard prefill stores a layer popped at once
    assert outs[True].stats.peak_kv_bytes <= outs[False].stats.peak_kv_bytes


def test_batched_prefill_mixes_streaming_and_standard_prompts():
    """One padded prefill batch where one prompt streams its lazy layers and the other attends fully:
    each gets the tokens it gets alone."""
    model = tiny_model("mistral", layers=8)
    engine = Engine(model, SpacedIds(), lazy=None, max_prefill_tokens=4096)
    configs = [LazyConfig(policy=LAYERS, sink=3, window=13, streaming_prefill=True),
               LazyConfig(policy=LAYERS, sink=3, window=13), LazyConfig(policy=(1, 2), sink=2, window=9,
                                                                        streaming_prefill=True)]
    prompts = random_prompts(6, (120, 100, 111))
    alone = [engine.generate(p, max_new_tokens=12, lazy=c).token_ids for p, c in zip(prompts, configs)]
    rids = [engine.add_request(p, SamplingParams(max_new_tokens=12), lazy=c) for p, c in zip(prompts, configs)]
    got = {rid: [] for rid in rids}
    batches = set()
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
            if o.finished:
                batches.add(o.output.stats.prefill_batch)
    assert batches == {3}, f"the prompts were not prefilled as one batch: {batches}"
    assert [got[r] for r in rids] == alone


def test_hf_drop_in_refuses_streaming_prefill():
    from ltengine.hf import LightTransferCache

    with pytest.raises(ValueError, match="does not support LazyConfig.streaming_prefill"):
        LightTransferCache(tiny_model("llama", layers=2), lazy=LazyConfig(policy=(1,), streaming_prefill=True))
