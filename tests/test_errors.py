"""Every bad input gets a clear ValueError naming the problem, and the engine works right after."""
from __future__ import annotations

import pytest

from conftest import tiny_model
from ltengine import Engine, LazyConfig, SamplingParams
from ltengine.config import parse_bytes
from ltengine.loading import load_model


class _Tok:
    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode())}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode(errors="replace")


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model("llama", layers=4), _Tok(), lazy=LazyConfig(fraction=0.5, sink=2, window=8))


def _still_works(engine):
    out = engine.generate("hello there", max_new_tokens=3)
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


@pytest.mark.parametrize("prompt, message", [
    ("", "empty prompt"),
    ("   ", "empty prompt"),
    ([], "non-empty string"),
    (["abc", [1, 2, 3]], "mixes text prompts and token-id prompts"),
    (["abc", ""], r"empty prompt \(batch item 1\)"),
    ([1, 2, 999], r"token ids \[999\] out of range; the vocabulary is 0..255"),
    ([1.5, 2], r"a list of int token ids, or a batch \(list\) of those; got \[1.5, 2\]"),
    (None, "non-empty string"),
])
def test_bad_prompts(engine, prompt, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(prompt, max_new_tokens=3)
    _still_works(engine)


def test_prompt_longer_than_context(engine):
    with pytest.raises(ValueError, match="1100 tokens, longer than the model's context of 1024"):
        engine.generate([1] * 1100, max_new_tokens=3)
    with pytest.raises(ValueError, match="exceeds the model's context of 1024; lower max_new_tokens"):
        engine.generate([1] * 1000, max_new_tokens=30)
    _still_works(engine)


@pytest.mark.parametrize("kwargs, message", [
    (dict(fraction=1.5), r"fraction must be a number in \[0, 1\] \(or None\), got 1.5"),
    (dict(fraction=-0.1), r"fraction must be a number in \[0, 1\]"),
    (dict(sink=0), r"sink must be a positive integer \(>= 1\), got 0"),
    (dict(window=-3), r"window must be a positive integer \(>= 1\), got -3"),
    (dict(probe=0), r"probe must be a positive integer \(>= 1\), got 0"),
    (dict(window=2.5), r"window must be a positive integer"),
    (dict(policy="fastest"), r"policy must be one of \('lighttransfer', 'topk', 'random', 'streaming'\)"),
    (dict(policy=[1, 1]), "lists a layer twice"),
    (dict(policy=5), r"policy must be one of \('lighttransfer', 'topk', 'random', 'streaming'\) or a list of layer "
                     r"indices, got int 5"),
    (dict(policy=None), "policy must be one of .* got NoneType None"),
    (dict(seed="abc"), "LazyConfig.seed must be an integer, got 'abc'"),
])
def test_bad_lazy_config(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LazyConfig(**kwargs)
    _still_works(engine)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), r"max_new_tokens must be an integer >= 1, got 0"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be an integer >= 0"),
    (dict(stop=[""]), "stop must be a non-empty string"),
    (dict(stop=""), r"stop must be a non-empty string or a list of non-empty strings, got ''"),
    (dict(stop=123), "stop must be a non-empty string or a list of non-empty strings, got 123"),
    (dict(stop=["ok", 7]), r"got \['ok', 7\]"),
    (dict(temperature=float("nan")), r"temperature must be >= 0 and finite \(0 = greedy\), got nan"),
    (dict(temperature=float("inf")), "temperature must be >= 0 and finite .*got inf"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
    (dict(seed="abc"), r"seed must be None or an integer in \[-2\*\*63, 2\*\*64\), got 'abc'"),
    (dict(seed=1.5), "seed must be None or an integer"),
    (dict(seed=2**64), "seed must be None or an integer"),
    (dict(lazy="half"), "lazy must be a LazyConfig or None"),
])
def test_bad_generate_arguments(engine, kwargs, message):
    kwargs.setdefault("max_new_tokens", 3)
    with pytest.raises(ValueError, match=message):
        engine.generate("hello", **kwargs)
    _still_works(engine)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stop=""), "stop must be a non-empty string"),
    (dict(stop=[""]), "stop must be a non-empty string"),
    (dict(stop=123), "stop must be a non-empty string or a list of non-empty strings, got 123"),
    (dict(temperature=float("nan")), "temperature must be >= 0 and finite"),
    (dict(seed="abc"), "seed must be None or an integer"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_stop_forms():
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(stop=["x", "yz"]).stop == ("x", "yz")
    assert SamplingParams(stop=None).stop == SamplingParams().stop == ()
    assert SamplingParams(seed=-1).seed == -1


def test_layer_list_outside_the_model(engine):
    with pytest.raises(ValueError, match=r"names layers \[7\], but the model has layers 0..3"):
        engine.generate("hello", max_new_tokens=3, lazy=LazyConfig(policy=[1, 7]))
    _still_works(engine)


def test_model_path_that_does_not_exist(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match=f"model path '{missing}' does not exist"):
        Engine.from_pretrained(missing)
    with pytest.raises(ValueError, match="model path './nowhere/model' does not exist"):
        Engine("./nowhere/model")
    with pytest.raises(ValueError, match="model path 'missing.gguf' does not exist"):
        load_model("missing.gguf")


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=f"model '{tmp_path}' is not a model directory: it has no config.json"):
        Engine.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="is a file but not a .gguf"):
        load_model(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="model must be a path, a .gguf file or a hub id, got int"):
        load_model(5)


def test_bad_dtype_name():
    with pytest.raises(ValueError, match="dtype 'float33' is not a torch dtype"):
        load_model(None, dtype="float33")


def test_unknown_model_type():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'; ltengine supports llama, mistral, qwen2, qwen3"):
        Engine(model, _Tok())


def test_model_sliding_window_is_refused_past_its_window():
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, sliding_window=16,
                                             max_position_embeddings=256)).eval()
    engine = Engine(model, _Tok(), lazy=None)
    with pytest.raises(ValueError, match="16-token sliding window"):
        engine.generate([1] * 20, max_new_tokens=2)
    assert len(engine.generate([1] * 5, max_new_tokens=2).token_ids) == 2


@pytest.mark.parametrize("budget, message", [
    ("12 parsecs", "is not a size"),
    (0, "must be positive"),
    (-5, "must be positive"),
    (True, "must be bytes"),
    (1.5, "must be bytes"),
])
def test_bad_budget_values(budget, message):
    with pytest.raises(ValueError, match=message):
        Engine(tiny_model("llama", layers=2), _Tok(), kv_budget=budget)


def test_budget_too_small_fails_before_any_work(engine):
    small = Engine(engine.model, _Tok(), lazy=LazyConfig(sink=2, window=8), kv_budget="4KiB")
    with pytest.raises(ValueError, match=r"kv_budget 4.0 KiB is too small: even with every layer lazy \(sink 2 \+ window 8\)"):
        small.generate("x" * 100, max_new_tokens=4)
    small.kv_budget = parse_bytes("1MiB")
    assert len(small.generate("x" * 100, max_new_tokens=4).token_ids) == 4


def test_parse_bytes():
    assert parse_bytes("12GiB") == 12 * 2**30
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes(1000) == 1000
    assert parse_bytes(None) is None


def test_batch_stream_refused(engine):
    with pytest.raises(ValueError, match="stream\\(\\) takes one prompt"):
        list(engine.stream(["a", "b"], max_new_tokens=2))
    _still_works(engine)


def test_bad_messages(engine):
    with pytest.raises(ValueError, match="messages must be a non-empty list"):
        engine.chat([], max_new_tokens=2)
    with pytest.raises(ValueError, match="no chat template"):
        engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)
    with pytest.raises(ValueError, match="non-empty document"):
        engine.answer("", "why?")
    _still_works(engine)
