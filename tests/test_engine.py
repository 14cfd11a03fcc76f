"""End-to-end checks of the Engine against Hugging Face's own forward and generate (CPU, fp32)."""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_model
from ltengine import Engine, LazyConfig
from conftest import prefill_requests
from ltengine.lazy import FullPolicy
from ltengine.runners import ReferenceRunner
from reference_attention import masked_generate

# 20 prompt lengths from 10 to 2,000 tokens (acceptance: full mode is token-exact on all of them)
# prompt lengths from 10 to 2000, about 1.4x apart (each costs an HF generate and an engine run on CPU)
DEFAULT_LENGTHS = [10, 17, 29, 48, 75, 110, 160, 220, 300, 490, 730, 1020, 1400, 2000]


def _prompt(tokenizer, text: str, n: int, offset: int) -> list[int]:
    ids = tokenizer(text[offset: offset + 8 * n])["input_ids"][:n]
    assert len(ids) == n
    return ids


def _first_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    runner = ReferenceRunner(engine.adapter, engine.backend, None)
    n = engine.num_layers
    res, = runner.prefill(prefill_requests(engine.backend, [torch.tensor(ids)], [FullPolicy(n, n)], LazyConfig(), 1,
                                           score=False))
    runner.release(res.handle)
    return res.logits


def _assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    rel = (ours - theirs).norm() / theirs.norm()
    assert rel < 1e-4, f"first-step logits differ: relative error {rel:.2e} (allowed 1e-4)"


@pytest.mark.parametrize("family", FAMILIES)
def test_full_mode_token_exact_tiny(family):
    model = tiny_model(family)
    engine = Engine(model, tokenizer=_IdsTokenizer(), lazy=None)
    g = torch.Generator().manual_seed(1)
    for n in (1, 7, 64, 301):
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, n:].tolist()
        ours = _generate_ids(engine, ids, 24)
        assert ours == ref, f"{family}, prompt of {n}: {ours} != HF {ref}"
        with torch.inference_mode():
            hf_logits = model(torch.tensor([ids])).logits[0, -1].float()
        _assert_logits_close(_first_logits(engine, ids), hf_logits)


def _generate_ids(engine: Engine, ids: list[int], n: int) -> list[int]:
    return engine.generate(ids, max_new_tokens=n).token_ids


class _IdsTokenizer:
    """Tiny random models have no real tokenizer: token ids in, their numbers out."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_full_mode_token_exact_default_model(default_model, book_text):
    model, tokenizer = default_model
    engine = Engine(model, tokenizer, lazy=None)
    for k, n in enumerate(DEFAULT_LENGTHS):
        ids = _prompt(tokenizer, book_text, n, offset=7919 * k)
        ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, n:].tolist()
        out = engine.generate(ids, max_new_tokens=8)
        assert out.token_ids == ref, f"prompt of {n} tokens: {out.token_ids} != HF {ref}"
        if n in (10, 490, 2000):
            with torch.inference_mode():
                hf_logits = model(torch.tensor([ids])).logits[0, -1].float()
            _assert_logits_close(_first_logits(engine, ids), hf_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_mode_matches_masked_reference_tiny(family):
    model = tiny_model(family, layers=8)
    lazy = LazyConfig(fraction=0.5, sink=3, window=13, probe=16)
    engine = Engine(model, tokenizer=_IdsTokenizer(), lazy=lazy)
    g = torch.Generator().manual_seed(2)
    for n in (5, 15, 40, 200):  # shorter than, equal to and far past sink + window
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        out = engine.generate(ids, max_new_tokens=30)
        assert len(out.lazy_layers) == 4
        ref = masked_generate(model, ids, out.lazy_layers, lazy.sink, lazy.window, 30)
        assert out.token_ids == ref, f"{family}, prompt {n}, lazy {out.lazy_layers}"


def test_lazy_mode_matches_masked_reference_default_model(default_model, book_text):
    model, tokenizer = default_model
    lazy = LazyConfig(fraction=0.5, sink=4, window=96, probe=32)
    engine = Engine(model, tokenizer, lazy=lazy)
    for k, n in enumerate([60, 99, 150, 230, 320, 410, 520, 640, 800, 1000]):
        ids = _prompt(tokenizer, book_text, n, offset=104729 + 5003 * k)
        out = engine.generate(ids, max_new_tokens=12)
        assert len(out.lazy_layers) == 15
        ref = masked_generate(model, ids, out.lazy_layers, lazy.sink, lazy.window, 12)
        assert out.token_ids == ref, f"prompt of {n}: lazy {out.lazy_layers}: {out.token_ids} != {ref}"


def test_masked_reference_is_not_trivially_equal(default_model, book_text):
    """Guard for the test above: the sink+window mask really changes the output on this prompt,
    so agreement with it is not agreement with full attention."""
    model, tokenizer = default_model
    ids = _prompt(tokenizer, book_text, 800, offset=104729 + 5003 * 8)
    layers = list(range(15, 30))
    masked = masked_generate(model, ids, layers, 4, 32, 12)
    full = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, 800:].tolist()
    assert masked != full


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_kv_bytes_after_prefill_match_formula(family):
    model = tiny_model(family, layers=8)
    sink, window = 2, 10
    engine = Engine(model, _IdsTokenizer(), lazy=LazyConfig(fraction=0.375, sink=sink, window=window))
    per = 2 * 2 * 16 * 4  # K and V, 2 kv heads, head dim 16, fp32
    for t in (5, 12, 100):
        out = engine.generate([i % 256 for i in range(1, t + 1)], max_new_tokens=3)
        lazy, full = len(out.lazy_layers), 8 - len(out.lazy_layers)
        assert lazy == 3
        assert out.stats.kv_bytes_after_prefill == per * (full * t + lazy * min(t, sink + window))
        assert out.stats.full_kv_bytes == per * 8 * t


@pytest.mark.parametrize("runner", ["reference", "paged"])
def test_budget_bounds_peak_kv_and_decides_lazy_layers(runner):
    """The budget decides how many layers stay full, and KV never exceeds it: a layer the queue
    demotes is truncated before the next layer's KV is stored, and every layer gets its decode room
    when it is stored. The reference runner's footprint also counts the sink + window buffer a
    demotion copies out before it frees the full layer."""
    model = tiny_model("llama", layers=8)
    per = 2 * 2 * 16 * 4
    t, n_new, sink, window = 300, 4, 4, 28  # multiples of the paged runner's 16-token blocks
    total = t + n_new
    blocks = -(-total // 16) * 16
    for n_full in (0, 3, 8):
        transient = sink + window if runner == "reference" and n_full < 8 else 0
        budget = per * (n_full * (total if runner == "reference" else blocks) + (8 - n_full) * (sink + window)
                        + transient)
        engine = Engine(model, _IdsTokenizer(), lazy=LazyConfig(sink=sink, window=window), kv_budget=budget,
                        runner=runner, block_size=16)
        out = engine.generate([i % 256 for i in range(t)], max_new_tokens=n_new)
        assert len(out.lazy_layers) == 8 - n_full
        assert out.stats.peak_kv_bytes <= budget, (out.stats.peak_kv_bytes, budget)
        assert out.stats.kv_bytes_after_prefill <= budget
        assert engine.last_stats["runner"] == runner


@pytest.mark.parametrize("runner", ["reference", "paged"])
def test_budget_given_as_string_and_per_prompt_decisions(runner):
    model = tiny_model("llama", layers=8)
    engine = Engine(model, _IdsTokenizer(), lazy=LazyConfig(sink=4, window=28), kv_budget="1MiB", runner=runner)
    outs = engine.generate([[i % 256 for i in range(n)] for n in (50, 200, 700)], max_new_tokens=4)
    assert engine.kv_budget == 2**20
    assert all(o.stats.peak_kv_bytes <= 2**20 for o in outs)
    assert len({len(o.lazy_layers) for o in outs}) > 1  # each prompt gets its own decision
    assert all(o.finish_reason == "length" for o in outs)


def test_batch_equals_one_at_a_time():
    model = tiny_model("qwen2")
    engine = Engine(model, _IdsTokenizer(), lazy=LazyConfig(fraction=0.5, sink=2, window=9))
    prompts = [list(range(3, 40)), list(range(100, 103)), list(range(7, 120))]
    batch = engine.generate(prompts, max_new_tokens=10)
    assert isinstance(batch, list) and len(batch) == 3
    for p, b in zip(prompts, batch):
        single = engine.generate(p, max_new_tokens=10)
        assert b.token_ids == single.token_ids and b.lazy_layers == single.lazy_layers


def test_text_api_stream_chat_stop_and_sampling(default_model):
    model, tokenizer = default_model
    engine = Engine(model, tokenizer, lazy=LazyConfig(fraction=0.25, window=64))
    out = engine.generate("The capital of France is", max_new_tokens=12)
    assert out.finish_reason in ("length", "eos") and out.text and out.layer_scores and len(out.layer_scores) == 30
    assert out.stats.prefill_s > 0 and out.stats.decode_tokens_per_s > 0 and out.stats.peak_kv_bytes > 0
    pieces = list(engine.stream("The capital of France is", max_new_tokens=12))
    assert "".join(pieces) == out.text and len(pieces) > 1
    chat = engine.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=20)
    assert "Paris" in chat.text and chat.finish_reason == "eos"
    assert chat.token_ids[-1] in engine.eos_ids
    stopped = engine.generate("The capital of France is", max_new_tokens=12, stop=[out.text.split()[1]])
    assert stopped.finish_reason == "stop" and len(stopped.text) < len(out.text)
    a = engine.generate("Once upon a time", max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=3)
    b = engine.generate("Once upon a time", max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=3)
    c = engine.generate("Once upon a time", max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=4)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_answer_over_a_shipped_chapter(default_model):
    from ltengine.data import chapter

    model, tokenizer = default_model
    engine = Engine(model, tokenizer, lazy=LazyConfig(fraction=0.25, window=256))
    out = engine.answer(chapter(1), "What is the name of the young man who has taken Netherfield Park?",
                        max_new_tokens=24)
    assert "Bingley" in out.text
    assert len(out.lazy_layers) == 8 and out.stats.kv_saved > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("runner", ["reference", "paged"])
def test_half_precision_on_cpu(dtype, runner):
    """bf16 / fp16 run on CPU: first-step logits agree with the HF forward in the same dtype to the
    precision's tolerance (their rounding differs from ours: 3e-2 relative), and decode runs."""
    model = tiny_model("qwen3", dtype=dtype)
    ids = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(9)).tolist()
    engine = Engine(model, _IdsTokenizer(), lazy=LazyConfig(fraction=0.5, sink=2, window=30), runner=runner)
    out = engine.generate(ids, max_new_tokens=6)
    assert len(out.token_ids) == 6 and len(out.lazy_layers) == 3
    with torch.inference_mode():
        hf = model(torch.tensor([ids])).logits[0, -1].float()
    ours = _first_logits(engine, ids)
    assert ((ours - hf).norm() / hf.norm()) < 3e-2


def test_reference_budget_for_all_lazy_and_short_prompts_is_exact():
    """The reference runner's footprint adds the demotion copy only when a stored full layer is
    demoted and is larger than the ring: an all-lazy prompt fits exactly 8 rings, and a prompt no
    longer than sink + window fits exactly its tokens in every layer (its demotion moves nothing)."""
    model = tiny_model("llama", layers=8)
    per = 2 * 2 * 16 * 4
    sink, window = 4, 28
    for t, n_new, budget, lazy_layers in ((300, 4, per * 8 * (sink + window), 8), (20, 4, per * 8 * 24, None)):
        engine = Engine(model, _IdsTokenizer(), lazy=LazyConfig(fraction=0.5, sink=sink, window=window),
                        kv_budget=budget, runner="reference")
        out = engine.generate([i % 256 for i in range(t)], max_new_tokens=n_new)
        assert out.finish_reason == "length" and out.stats.peak_kv_bytes <= budget
        if lazy_layers is not None:
            assert len(out.lazy_layers) == lazy_layers
        else:
            assert len(out.lazy_layers) == 4 and out.stats.peak_kv_bytes == budget


def test_close_hands_the_model_back():
    """close() frees the engine's KV and un-shares any fused weights; the model still generates the same."""
    from conftest import SpacedIds, tiny_model

    model = tiny_model("qwen2", layers=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = list(range(3, 40))
    want = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)[0, len(ids):].tolist()
    engine = Engine(model, SpacedIds(), lazy=None, runner="paged", block_size=8)
    engine.adapter.fused_weights()  # what the CUDA fused step does
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == engine.adapter._fused[0]["qkv_w"].data_ptr()  # shared storage while fused
    assert engine.generate(ids, max_new_tokens=5).token_ids == want
    engine.close()
    assert q.untyped_storage().nbytes() == q.nbytes  # its own storage again
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)[0, len(ids):].tolist() == want
    assert not engine.has_unfinished()
