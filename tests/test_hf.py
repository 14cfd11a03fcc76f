"""The transformers drop-in (``ltengine.hf.LightTransferCache``) against ``Engine.generate`` (CPU, fp32).

Same lazy layers, same KV bytes and the same greedy tokens inside Hugging Face's own ``generate``; and
HF's generation features on top: sampling, ``TextStreamer``, stopping criteria, ``pipeline``.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList, TextStreamer

from conftest import FAMILIES, SpacedIds, random_prompts, tiny_model
from ltengine import Engine, LazyConfig
from ltengine.hf import LightTransferCache

# sink + window = 16: prompts shorter than, equal to and far past one ring; 20 new tokens wrap it
LAZY = LazyConfig(fraction=0.5, sink=3, window=13, probe=16)
LENGTHS = [1, 4, 9, 16, 17, 31, 64, 100, 150, 257]
NEW = 20

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are bound by per-op overhead: a second thread only contends (CI has 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return {family: tiny_model(family) for family in FAMILIES}


def hf_generate(model, ids: list[int], cache, max_new_tokens: int = NEW, **kwargs) -> list[int]:
    """``model.generate`` with the cache; an explicit all-ones mask (token 0 is the tiny models' pad id)."""
    x = torch.tensor([ids])
    kwargs.setdefault("do_sample", False)
    out = model.generate(x, attention_mask=torch.ones_like(x), past_key_values=cache,
                         max_new_tokens=max_new_tokens, **kwargs)
    return out[0, len(ids):].tolist()


def held_bytes(model, cache: LightTransferCache, tokens: int) -> int:
    """KV bytes after ``tokens`` tokens: every token in full layers, sink + window in lazy ones."""
    c = model.config
    per_token = 2 * c.num_key_value_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads) * 4
    lazy = len(cache.lazy_layers)
    return per_token * ((c.num_hidden_layers - lazy) * tokens + lazy * min(tokens, cache.lazy.sink + cache.lazy.window))


@pytest.mark.parametrize("mode", ["full", "lazy"])
@pytest.mark.parametrize("family", FAMILIES)
def test_token_exact_with_engine(models, family, mode):
    model = models[family]
    lazy = LazyConfig(fraction=0.0) if mode == "full" else LAZY
    engine = Engine(model, SpacedIds(), lazy=lazy)
    full = Engine(model, SpacedIds(), lazy=None)
    changed = 0  # prompts whose lazy-mode tokens differ from full attention's: the lazy path is exercised
    for ids in random_prompts(11, LENGTHS):
        out = engine.generate(ids, max_new_tokens=NEW)
        if mode == "lazy":
            changed += out.token_ids != full.generate(ids, max_new_tokens=NEW).token_ids
        cache = LightTransferCache(model, lazy=lazy)
        tokens = hf_generate(model, ids, cache)
        where = f"{family} {mode}, prompt of {len(ids)}"
        assert tokens == out.token_ids, f"{where}: {tokens} != engine {out.token_ids}"
        assert cache.lazy_layers == out.lazy_layers, where
        assert len(cache.lazy_layers) == (0 if mode == "full" else 3), where
        if mode == "lazy":
            scores = out.layer_scores if hasattr(out, "layer_scores") else out.lazy_ratios  # (the older name)
            assert cache.layer_scores == pytest.approx(scores, abs=1e-6) and cache.lazy_ratios == cache.layer_scores
        else:
            assert cache.layer_scores == []
        assert cache.nbytes_after_prefill == out.stats.kv_bytes_after_prefill, where
        assert cache.nbytes == held_bytes(model, cache, len(ids) + NEW - 1), where  # the last token is never fed
        assert cache.get_seq_length() == len(ids) + NEW - 1
    assert mode == "full" or changed >= len(LENGTHS) // 2, f"lazy layers changed only {changed} outputs"


@pytest.mark.parametrize("lazy", [
    LazyConfig(fraction=0.5, sink=3, window=13, probe=8, score="peak"),
    LazyConfig(fraction=0.5, sink=3, window=13, probe=16, score="cover"),
    LazyConfig(fraction=0.34, sink=3, window=13, probe=16, policy="topk"),
    LazyConfig(sink=2, window=7, policy="streaming"),
    LazyConfig(fraction=0.5, sink=3, window=13, policy="random", seed=3),
    LazyConfig(sink=3, window=13, policy=(0, 4)),
], ids=["peak", "cover", "topk", "streaming", "random", "fixed"])
def test_scores_and_policies_match_engine(models, lazy):
    model = models["qwen3"]
    engine = Engine(model, SpacedIds(), lazy=lazy)
    for ids in random_prompts(5, [12, 40, 130]):
        out = engine.generate(ids, max_new_tokens=12)
        cache = LightTransferCache(model, lazy=lazy)
        assert hf_generate(model, ids, cache, 12) == out.token_ids, f"{lazy}, prompt of {len(ids)}"
        assert cache.lazy_layers == out.lazy_layers
        assert cache.nbytes_after_prefill == out.stats.kv_bytes_after_prefill


def test_kv_budget_plans_as_the_engine(models):
    """Under a byte budget the number of lazy layers is an outcome of the prompt's length, as in the engine."""
    model = models["mistral"]
    lazy = LazyConfig(sink=3, window=13, probe=16)
    budget = 60_000  # 256 bytes per token and layer: 10-token prompts keep every layer full, 150 none
    engine = Engine(model, SpacedIds(), lazy=lazy, kv_budget=budget)
    counts = set()
    for ids in random_prompts(7, [10, 45, 60, 100, 150]):
        out = engine.generate(ids, max_new_tokens=8)
        cache = LightTransferCache(model, lazy=lazy, kv_budget=budget, max_new_tokens=8)
        assert hf_generate(model, ids, cache, 8) == out.token_ids, f"prompt of {len(ids)}"
        assert cache.lazy_layers == out.lazy_layers, f"prompt of {len(ids)}"
        assert cache.full_capacity == model.config.num_hidden_layers - len(out.lazy_layers)
        counts.add(len(cache.lazy_layers))
    assert len(counts) > 2, f"the budget should make the lazy count depend on the length, got {counts}"
    ids = random_prompts(8, [400])[0]  # all-lazy rings would fit; full attention over 400 tokens does not
    with pytest.raises(ValueError, match="kv_budget .* too small"):
        hf_generate(model, ids, LightTransferCache(model, lazy=LazyConfig(fraction=0.0), kv_budget=budget), 4)
    with pytest.raises(ValueError, match="kv_budget .* too small"):
        engine.generate(ids, max_new_tokens=4, lazy=LazyConfig(fraction=0.0))


class _Collect(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True)
        self.pieces: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.pieces.append(text)


def test_text_streamer(models):
    model = models["llama"]
    ids = random_prompts(3, [80])[0]
    out = Engine(model, SpacedIds(), lazy=LAZY).generate(ids, max_new_tokens=NEW)
    streamer = _Collect(SpacedIds())
    cache = LightTransferCache(model, lazy=LAZY)
    tokens = hf_generate(model, ids, cache, streamer=streamer)
    assert tokens == out.token_ids
    assert len(streamer.pieces) > 2  # it streamed, not one piece at the end
    assert "".join(streamer.pieces) == SpacedIds().decode(tokens)


def test_sampling(models):
    """Full mode samples what HF's own cache samples under one seed; lazy mode is reproducible per seed
    and its lazy layers are the prefill's decision (the engine's), whatever is sampled after."""
    model = models["qwen2"]
    ids = random_prompts(4, [70])[0]
    sample = dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.95)

    def sampled(cache, seed):
        torch.manual_seed(seed)
        return hf_generate(model, ids, cache, **sample)

    full = sampled(LightTransferCache(model, lazy=None), 5)
    assert full == sampled(DynamicCache(config=model.config), 5)
    first, cache = sampled(LightTransferCache(model, lazy=LAZY), 5), LightTransferCache(model, lazy=LAZY)
    assert sampled(cache, 5) == first
    assert sampled(LightTransferCache(model, lazy=LAZY), 6) != first
    assert cache.lazy_layers == Engine(model, SpacedIds(), lazy=LAZY).generate(ids, max_new_tokens=1).lazy_layers


class _StopAt(StoppingCriteria):
    def __init__(self, n: int):
        self.n = n

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.n, dtype=torch.bool)


def test_stopping_criteria(models):
    model = models["llama"]
    ids = random_prompts(9, [60])[0]
    greedy = hf_generate(model, ids, LightTransferCache(model, lazy=LAZY))
    cache = LightTransferCache(model, lazy=LAZY)
    stopped = hf_generate(model, ids, cache, stopping_criteria=StoppingCriteriaList([_StopAt(len(ids) + 5)]))
    assert stopped == greedy[:5]
    assert cache.get_seq_length() == len(ids) + 4


def _byte_tokenizer():
    """A real (fast) tokenizer for the tiny models: one token per character code < 256."""
    from tokenizers import Regex, Tokenizer, decoders, models as tk_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(tk_models.WordLevel(vocab={chr(i): i for i in range(256)}, unk_token=chr(0)))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def test_pipeline(models):
    from transformers import pipeline

    model, tok = models["mistral"], _byte_tokenizer()
    prompt = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    out = Engine(model, tok, lazy=LAZY).generate(prompt, max_new_tokens=12)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    cache = LightTransferCache(model, lazy=LAZY)
    text = pipe(prompt, past_key_values=cache, max_new_tokens=12, do_sample=False, return_full_text=False)
    assert text[0]["generated_text"] == tok.decode(out.token_ids)
    assert cache.lazy_layers == out.lazy_layers and len(cache.lazy_layers) == 3


def test_continuation_attends_like_decode(models):
    """A second ``generate`` on the same cache feeds several tokens at once (no rescoring): full layers
    attend causally, lazy ones to sink + window per query, as if the tokens came one at a time."""
    model = models["qwen3"]
    ids = random_prompts(12, [90])[0]
    extra = [7, 70, 170, 17, 77, 200, 1, 2, 3, 4, 5, 6, 8, 9]  # longer than the window: the chunk wraps the ring
    for lazy in (None, LAZY):
        a = LightTransferCache(model, lazy=lazy)
        first = hf_generate(model, ids, a, 6)
        chunk = [first[-1]] + extra  # the last sampled token was never fed
        with torch.inference_mode():
            at_once = model(torch.tensor([chunk]), past_key_values=a).logits[0, -1]
        b = LightTransferCache(model, lazy=lazy)
        assert hf_generate(model, ids, b, 6) == first
        with torch.inference_mode():
            for tok in chunk:
                one_by_one = model(torch.tensor([[tok]]), past_key_values=b).logits[0, -1]
        torch.testing.assert_close(at_once, one_by_one, rtol=1e-5, atol=1e-5)
        assert a.lazy_layers == b.lazy_layers and a.nbytes == b.nbytes
    # full mode continues exactly as HF's own cache does
    hf, plain = DynamicCache(config=model.config), LightTransferCache(model, lazy=None)
    first = hf_generate(model, ids, hf, 6)
    assert hf_generate(model, ids, plain, 6) == first
    more = ids + first + extra
    assert hf_generate(model, more, plain, 8) == hf_generate(model, more, hf, 8)


def test_other_caches_still_use_sdpa(models):
    """The registered attention is plain SDPA for every call that is not through a LightTransferCache."""
    model = tiny_model("llama", seed=4)
    ids = random_prompts(13, [50])[0]
    before = hf_generate(model, ids, DynamicCache(config=model.config))
    LightTransferCache(model, lazy=LAZY)
    assert model.config._attn_implementation == "ltengine_lighttransfer"
    assert hf_generate(model, ids, DynamicCache(config=model.config)) == before
    assert hf_generate(model, ids, None) == before


def test_bad_arguments(models):
    model = models["llama"]
    with pytest.raises(ValueError, match="model must be a loaded transformers causal LM"):
        LightTransferCache("not a model")
    with pytest.raises(ValueError, match="lazy must be a LazyConfig"):
        LightTransferCache(model, lazy=0.5)
    with pytest.raises(ValueError, match="kv_budget"):
        LightTransferCache(model, kv_budget="lots")
    with pytest.raises(ValueError, match="kv_budget must be positive"):
        LightTransferCache(model, kv_budget=-1)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        LightTransferCache(model, max_new_tokens=-3)
    with pytest.raises(ValueError, match=r"names layers \[9\]"):
        LightTransferCache(model, lazy=LazyConfig(policy=(1, 9)))
    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'"):
        LightTransferCache(gpt2)
    ids = random_prompts(14, [20])[0]
    x = torch.tensor([ids, ids])
    with pytest.raises(ValueError, match="one sequence \\(batch size 1\\), got a batch of 2"):
        model.generate(x, attention_mask=torch.ones_like(x), past_key_values=LightTransferCache(model, lazy=LAZY),
                       max_new_tokens=2)
    with pytest.raises(ValueError, match="does not support padding"):
        x = torch.tensor([ids])
        mask = torch.ones_like(x)
        mask[0, :3] = 0
        model.generate(x, attention_mask=mask, past_key_values=LightTransferCache(model, lazy=LAZY), max_new_tokens=2)
    with pytest.raises(ValueError, match="batch size 1"):
        hf_generate(model, ids, LightTransferCache(model, lazy=LAZY), 2, num_beams=2)
    cache = LightTransferCache(model, lazy=LAZY)
    hf_generate(model, ids, cache, 2)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)
