#!/usr/bin/env bash
# End-to-end throughput on the GPU, one command (the baseline runs in the same process):
#   bash bench/gpu_throughput.sh            HF vs ltengine full vs 50% lazy on a Llama-3-8B-shaped model, ~7 min
#   bash bench/gpu_throughput.sh soak       1,000 mixed requests through one generate call under a 4 GiB pool
# Extra arguments go to the Python script (e.g. --points 1x8k,budget --skip-hf); BUILD=1 builds
# ltengine._C for sm_90 first.
# Logs and JSON under $OUT (default /tmp/ltengine_throughput). Device-tool call:
#   run(command="bash bench/gpu_throughput.sh", timeout_s=600)
# The script stops itself (SIGTERM -> partial table + JSON) before the device's 10-minute limit.
set -o pipefail
export OUT=${OUT:-/tmp/ltengine_throughput}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

what=throughput
if [ "${1:-}" = "soak" ] || [ "${1:-}" = "throughput" ]; then what=$1; shift; fi

{
echo "== $(date -u +%FT%TZ)  $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
if [ "${BUILD:-0}" = 1 ]; then  # the CUDA extension, as bench/gpu_kernels.sh builds it (takes minutes)
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 LTENGINE_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "build rc=$?"
fi
python3 -c "import ltengine.kernels as K; print('kernels:', K.get_backend('cuda').describe())" || true
git log --oneline -1 2>/dev/null || true
} 2>&1 | tee "$OUT/$what.log"

if [ "$what" = soak ]; then
  timeout -s TERM 570 python3 bench/soak.py --json "$OUT/soak.json" "$@" 2>&1 | tee -a "$OUT/$what.log"
else
  timeout -s TERM 575 python3 bench/throughput.py --json "$OUT/throughput.json" --deadline-s 480 "$@" 2>&1 | tee -a "$OUT/$what.log"
fi
