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


def test_qa_several_questions_as_one_batch(patched_engine, capsys, tmp_path):
    qs = tmp_path / "qs.txt"
    qs.write_text("Who is Mr. Bennet's wife?\n\nHow many daughters do the Bennets have?\n")
    assert cli.main(["qa", "--chapters", "1", "--question", "Who has taken Netherfield Park?", "--questions", str(qs),
                     "--max-new-tokens", "16"]) == 0
    out, err = capsys.readouterr()
    assert out.count("Q: ") == 3 and err.count("lazy layers") == 3
    assert "Bingley" in out.split("Q: ")[1]


@pytest.fixture
def no_load(monkeypatch):
    """Bad arguments must fail before the model loads."""
    def from_pretrained(*a, **k):
        pytest.fail("the model was loaded before the arguments were checked")

    monkeypatch.setattr(Engine, "from_pretrained", staticmethod(from_pretrained))


def _exit_code(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--fraction", "2"], r"--fraction: must be a number in \[0, 1\], got '2'"),
    (["generate", "hi", "--kv-budget", "lots"], "--kv-budget: kv_budget 'lots' is not a size"),
    (["generate", "hi", "--kv-budget", "0"], "kv_budget must be positive"),
    (["generate", "hi", "--max-new-tokens", "-1"], "--max-new-tokens: must be an integer >= 1, got '-1'"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens: must be an integer >= 1, got '0'"),
    (["generate", "hi", "--window", "0"], "--window: must be an integer >= 1"),
    (["generate", "hi", "--top-k", "-1"], "--top-k: must be an integer >= 0"),
    (["generate", "hi", "--temperature", "nan"], "--temperature: must be a finite number, got 'nan'"),
    (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0 and finite"),
    (["generate", "hi", "--top-p", "0"], r"top_p must be in \(0, 1\]"),
    (["generate", "hi", "--policy", "fastest"], "policy must be one of"),
    (["generate", "hi", "--policy", "1,x"], "--policy '1,x': a layer list is comma-separated integers"),
    (["generate", "   "], "the prompt is empty"),
    (["generate", "hi", "--model", "/nonexistent/model"], "model path '/nonexistent/model' does not exist"),
    (["qa", "--question", ""], "--question is empty"),
    (["qa", "--chapters", "999"], "chapter must be one of 1..")
])
def test_bad_arguments_fail_before_loading(no_load, capsys, argv, message):
    import re

    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_bad_files_are_named(no_load, capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    (tmp_path / "nul.txt").write_bytes(b"text\x00with a NUL")
    for argv, message in [
        (["qa", "--doc", str(tmp_path)], f"--doc {tmp_path}: is a directory; give a text file"),
        (["qa", "--doc", str(tmp_path / "empty.txt")], "empty.txt: the file is empty"),
        (["qa", "--doc", str(tmp_path / "blob.bin")], "blob.bin: not UTF-8 text (a binary file?): byte 128"),
        (["qa", "--doc", str(tmp_path / "nul.txt")], "nul.txt: holds NUL bytes"),
        (["qa", "--doc", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
        (["generate", "--file", str(tmp_path / "blob.bin")], "--file " + str(tmp_path / "blob.bin")),
        (["generate", "hi", "--model", str(tmp_path)], "is not a model directory: it has no config.json"),
    ]:
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err


def test_device_errors(no_load, capsys):
    import torch

    assert cli.main(["generate", "hi", "--device", "gpu0"]) == 2
    assert "--device 'gpu0' is not a device; use cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["generate", "hi", "--device", "cuda"]) == 2
        assert "--device cuda: CUDA is not available" in capsys.readouterr().err
        assert cli.main(["info", "--device", "cuda:0"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_max_new_tokens_default_and_given(monkeypatch):
    import types

    args = types.SimpleNamespace(max_new_tokens=None, temperature=0.0, top_p=1.0, top_k=0, seed=None)
    assert cli._sampling(args, 64)["max_new_tokens"] == 64
    args.max_new_tokens = 3
    assert cli._sampling(args, 64)["max_new_tokens"] == 3


def test_prompt_and_file_are_exclusive(no_load):
    with pytest.raises(SystemExit):
        cli.main(["generate"])  # neither a prompt nor --file


def test_python_dash_m():
    """``python -m ltengine`` is the ``ltengine`` command (here: its error path, no model load)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "ltengine", "generate", "hi", "--max-new-tokens", "0"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "usage: ltengine generate" in run.stderr
    assert "--max-new-tokens: must be an integer >= 1, got '0'" in run.stderr


def test_info(capsys):
    assert cli.main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "decode_full" in out and "truncate_kv_" in out
