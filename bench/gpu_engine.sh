#!/usr/bin/env bash
# Device run for the engine's GPU path: GPU tests of the paged kernel and engine, then a speed probe.
#   (on the device, from the repo root)  bash bench/gpu_engine.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ltengine-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q tests/test_paged_kernels.py tests/test_fused_kernels.py tests/test_engine_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_engine_tests.log" | tail -25
python3 bench/paged_probe.py "$@" 2>&1 | tee "$OUT/paged_probe.log"
