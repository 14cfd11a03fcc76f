#!/usr/bin/env bash
# RULER's session columns (issue #13) on one CUDA GPU in <= 5.5 minutes: session-context and
# session-question x all 11 task families x 1k/2k/4k/8k x N=25 (seed 0, the main table's samples).
# Each length's documents are prefilled in batches and their questions decoded as one batch across
# documents (Engine.documents); a length predicted past the deadline is skipped and logged as such.
#   (on the device, from the repo root)  LTENGINE_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf bash bench/gpu_ruler_sessions.sh
# Writes $OUT/sessions/ruler.{md,json,png} (merge with the main table's ruler.json files:
# ltengine.eval.ruler_report.merge), $OUT/sessions_<L>/, $OUT/RESULTS_ruler.md, logs; then, with the
# time left, the CUDA session and paged-runner tests (tests/test_session_cuda.py, tests/test_paged_cuda.py).
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=20 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
source bench/ruler_env.sh  # OUT, START, versions, gguf, $LTENGINE_GGUF, LTENGINE_CACHE
# the GGUF load (20-50 s) happens inside; the lengths end by START + RULER_SECONDS (default 270 s)
DEADLINE=$(( START + ${RULER_SECONDS:-270} ))
echo "setup took $(( $(date +%s) - START )) s; the session lengths end by $(date -u -d @$DEADLINE +%T) UTC"
timeout $(( DEADLINE - $(date +%s) + 20 )) python3 bench/ruler_gpu.py --model "$LTENGINE_GGUF" --device cuda --out "$OUT" \
  --deadline "$DEADLINE" --stages sessions --lengths 1024,2048,4096,8192 --session-n 25 "$@" 2>&1 \
  | tee "$OUT/gpu_ruler_sessions.log" | grep -v -e "prompt/s\]$" -e "^|"  # tables: once, from RESULTS_ruler.md below
echo "ruler wall $(( $(date +%s) - START )) s"
LEFT=$(( START + 320 - $(date +%s) ))
if [ "$LEFT" -gt 30 ]; then
  timeout "$LEFT" python3 -m pytest -q -x tests/test_session_cuda.py tests/test_paged_cuda.py -p no:cacheprovider 2>&1 | tail -8
else
  echo "CUDA session tests skipped: $LEFT s left of the 5.5 minutes"
fi
echo "wall $(( $(date +%s) - START )) s"
echo "==== $OUT/RESULTS_ruler.md (the log, then the sessions table: $OUT/sessions/ruler.md)"
cat "$OUT/RESULTS_ruler.md" 2>/dev/null || echo "(no length finished: see the log above)"
