#!/usr/bin/env bash
# Device run for document sessions (issue 13, part 1): their GPU tests, then the 32k-document benchmark.
#   (on the device, from the repo root)  bash bench/gpu_session.sh        # ~4 min on one H200
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/ltengine-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q tests/test_session_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_session_tests.log" | tail -25
python3 bench/session_gpu.py "$@" 2>&1 | tee "$OUT/session_gpu.log"
echo "--- RESULTS-ready snippet ($OUT/session_gpu.md):"
cat "$OUT/session_gpu.md" 2>/dev/null || echo "(not written: see the log above)"
