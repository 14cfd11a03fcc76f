"""The command line, on the default model (loaded once per session, handed to the CLI)."""
from __future__ import annotations

import pytest

from ltengine import Engine, cli


@pytest.fixture
def patched_engine(default_model, monkeypatch):
    model, tokenizer = default_model
    made = {}

    def from_pretrained(name=None, lazy="default", kv_budget=None, dtype=None, device=None, **kw):
        assert name is None and device == "cpu"
        made["engine"] = Engine(model, tokenizer, lazy=lazy, kv_budget=kv_budget, **kw)
        return made["engine"]

    monkeypatch.setattr(Engine, "from_pretrained", staticmethod(from_pretrained))
    return made


def test_generate_prints_answer_and_summary(patched_engine, capsys):
    assert cli.main(["generate", "The capital of France is", "--max-new-tokens", "8", "--fraction", "0.2",
                     "--window", "64"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert "lazy layers 6/30" in err and "KV after prefill" in err and "finish: length" in err
    assert patched_engine["engine"].lazy.window == 64


def test_generate_from_file_with_chat_and_budget(patched_engine, capsys, tmp_path):
    doc = tmp_path / "q.txt"
    doc.write_text("What is the capital of France? Answer in one word.")
    assert cli.main(["generate", "--file", str(doc), "--chat", "--max-new-tokens", "10", "--kv-budget", "8MiB"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out and "finish: eos" in err
    assert patched_engine["engine"].kv_budget == 8 * 2**20


def test_qa_on_shipped_chapter(patched_engine, capsys):
    assert cli.main(["qa", "--chapters", "1", "--question", "Who has taken Netherfield Park?",
                     "--max-new-tokens", "24"]) == 0
    out, err = capsys.readouterr()
    assert "Bingley" in out and "lazy layers 8/30" in err


def test_bad_input_is_an_error_message_not_a_traceback(patched_engine, capsys):
    assert cli.main(["generate", "hi", "--fraction", "2"]) == 2
    assert "fraction must be a number in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate"])  # neither a prompt nor --file


def test_info(capsys):
    assert cli.main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "decode_full" in out and "truncate_kv_" in out
