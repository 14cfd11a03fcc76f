#!/usr/bin/env bash
# Tensor parallelism on an nvidia-h200-x2 (issue 15), one command, ~6 min:
#   1. tests/test_parallel_cuda.py: TP=2 vs one GPU on tiny models (fp32 token-exact, graphs, fused bf16)
#   2. bench/tp.py: Llama-3-8B-shaped bf16 model, TP=2 vs TP=1 at the 40 GiB budget point (decode tok/s,
#      % of the two GPUs' bandwidth floor), greedy output vs TP=1 and an fp32 reference, fp32 token-exact
# Extra arguments go to bench/tp.py (e.g. --graphs off, --quick). Logs, tp.json and tp.md (a RESULTS.md
# snippet) under $OUT (default /tmp/ltengine_tp). Device-tool call:
#   run(kind="nvidia-h200-x2", command="bash bench/gpu_tp.sh", timeout_s=600)
set -o pipefail
export OUT=${OUT:-/tmp/ltengine_tp}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# NVLink multicast stays off (the device notes: it can take the host's GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
echo "== $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -4
python3 -c "import torch, transformers, torch.distributed as d; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count(), 'nccl', torch.cuda.nccl.version())"
git log --oneline -1 2>/dev/null || true
echo "== tests/test_parallel_cuda.py"
timeout -s TERM 150 python3 -m pytest -q -x -rs -p no:cacheprovider tests/test_parallel_cuda.py
echo "tests rc=$?"
} 2>&1 | tee "$OUT/tp.log"

echo "== bench/tp.py" | tee -a "$OUT/tp.log"
LTENGINE_TP_TIMEOUT=120 timeout -s TERM 420 python3 bench/tp.py --deadline-s 330 "$@" 2>&1 | grep --line-buffered -v "FutureWarning\|return func(" | tee -a "$OUT/tp.log"
echo "bench rc=$?" | tee -a "$OUT/tp.log"
[ -f "$OUT/tp.md" ] && { echo "== RESULTS snippet ($OUT/tp.md)"; cat "$OUT/tp.md"; }
