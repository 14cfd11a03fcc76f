"""The serving soak's CPU version (``bench/serve_soak.py --quick``) as a test: 120 mixed requests over
HTTP against a real server process on 127.0.0.1 (bursts past ``--max-waiting``, streamed and not, a
tenth of the clients disconnecting mid-stream); every one of its five checks must pass. And the
``serve`` command's argument checks that must fail before a model loads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("httpx", reason="needs the [serve] extra: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="needs the [serve] extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="needs the [serve] extra: pip install -e '.[serve]'")

ROOT = Path(__file__).resolve().parents[1]


def test_serve_soak_quick(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_soak.py"), "--quick", "--json",
                           str(tmp_path / "soak.json")], env=env, capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("[PASS]") == 5 and "[FAIL]" not in out, out[-3000:]


@pytest.mark.parametrize("argv, message", [
    (["--kv-budget", "lots"], "kv_budget 'lots' is not a size"),
    (["--fraction", "2"], "fraction"),
    (["--max-waiting", "-1"], "--max-waiting must be >= 0"),
    (["--interleave-layers", "-2"], "--interleave-layers must be >= 0"),
])
def test_serve_rejects_bad_arguments_before_loading(monkeypatch, capsys, argv, message):
    from ltengine import engine as E
    from ltengine.serve import cli

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(E.Engine, "from_pretrained", staticmethod(no_load))
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_serve_rejects_cuda_without_a_gpu(monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    from ltengine import engine as E
    from ltengine.serve import cli

    monkeypatch.setattr(E.Engine, "from_pretrained", staticmethod(lambda *a, **k: pytest.fail("model loaded")))
    assert cli.main(["--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
