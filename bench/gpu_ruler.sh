#!/usr/bin/env bash
# RULER table (issue #13 part 3) on one CUDA GPU, under 8 minutes: all 11 task families x 1k/2k/4k/8k
# x N=25 x the harness configs (seed 0), held-out seeds (1000) for the scoring variants, and the
# document-session configs (N=5, skipped with the reason where Engine.document is missing).
#   (on the device, from the repo root)  LTENGINE_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf bash bench/gpu_ruler.sh
# Writes $OUT/{main,heldout,sessions}/ruler.{md,json,png}, per-length folders, RESULTS_ruler.md, logs.
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=20
source bench/ruler_env.sh  # OUT, START, versions, gguf, $LTENGINE_GGUF, LTENGINE_CACHE
# the de-quantizing GGUF load (20-50 s) happens inside; every stage ends by START + 440 s (8 min = 480)
DEADLINE=$(( START + ${RULER_SECONDS:-440} ))
echo "setup took $(( $(date +%s) - START )) s; stages end by $(date -u -d @$DEADLINE +%T) UTC"
timeout $(( DEADLINE - $(date +%s) + 25 )) python3 bench/ruler_gpu.py --model "$LTENGINE_GGUF" --device cuda --out "$OUT" --deadline "$DEADLINE" "$@" 2>&1 \
  | tee "$OUT/gpu_ruler.log" | grep -v "prompt/s\]$"
echo "wall $(( $(date +%s) - START )) s"
echo "==== $OUT/RESULTS_ruler.md"; cat "$OUT/RESULTS_ruler.md" 2>/dev/null
