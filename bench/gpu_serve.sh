#!/usr/bin/env bash
# Serving on the GPU, one command (device-tool call: run(command="bash bench/gpu_serve.sh", carry=[".whl"])):
#   1. bench/serve_soak.py: 1,000 mixed requests through the server under a 2 GiB budget (~3 min);
#   2. bench/serve_load.py on a decode-heavy trace (outputs 768-1536 tokens), full vs 50% lazy (~5 min).
# fastapi / uvicorn / pydantic are not on the device: wheels for its Python go in .whl/ (see
# /work/.library/device/README.md); they are installed into /tmp/site. Logs and JSON under $OUT.
set -o pipefail
export OUT=${OUT:-/tmp/ltengine_serve}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH=/tmp/site:$PWD
fi
echo "== $(date -u +%FT%TZ)  $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
git log --oneline -1 2>/dev/null || true
timeout ${SOAK_S:-220} python3 bench/serve_soak.py "$@" 2>&1 | tee "$OUT/serve_soak.log"
echo "soak rc=$?"
timeout ${LOAD_S:-330} python3 bench/serve_load.py --modes full,lazy --num-requests 48 --rate 4 \
  --output-len 768 1536 2>&1 | tee "$OUT/serve_load_decode.log"
echo "serve_load rc=$?"
