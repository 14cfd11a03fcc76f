#!/usr/bin/env bash
# Streaming prefill (issue 14, part 2) on one GPU, ~4 min (at most 5: every step has its own timeout):
#   1. the sink + window prefill kernel's tests (Triton vs its PyTorch twin, every dtype, odd sizes, GQA)
#      and the engine's streaming-prefill tests (tests/test_prefill_cuda.py, tests/test_streaming_prefill.py);
#   2. bench/prefill_stream.py: Llama-3-8B-shaped random model, 50% lazy (odd layers), one 32k and one
#      128k prompt, standard vs streaming prefill side by side, then one layer's attention per kernel
#      (causal SDPA, Triton sink + window, the twin, FlexAttention).
# Run from the repo root: bash bench/gpu_stream.sh   (logs, JSON and a RESULTS.md snippet in $OUT)
set -o pipefail
export OUT=${OUT:-/tmp/ltengine_stream}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
{
echo "== $(date -u +%FT%TZ)  $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__)"
git log --oneline -1 2>/dev/null || true
echo "== tests"
timeout -s TERM 120 python3 -m pytest -q -rs tests/test_prefill_cuda.py tests/test_streaming_prefill.py -p no:cacheprovider 2>&1 | tail -25
echo "tests rc=$?"
echo "== bench/prefill_stream.py"
timeout -s TERM 170 python3 bench/prefill_stream.py --flex "$@"
echo "bench rc=$?"
echo "== $(date -u +%FT%TZ) done; RESULTS snippet: $OUT/prefill_stream.md"
} 2>&1 | tee "$OUT/gpu_stream.log"
