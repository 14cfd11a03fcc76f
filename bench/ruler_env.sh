# Sourced by bench/gpu_ruler.sh and bench/gpu_ruler_sessions.sh (from the repo root): $OUT and $START,
# the device and library versions, gguf (installed from .whl/ when missing), the default model's .gguf
# at $LTENGINE_GGUF, and the engine's cache folder. Exits with 2 when the model or gguf is missing.
OUT=${OUT:-/tmp/ltengine-out}; mkdir -p "$OUT"
START=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if ! python3 -c "import gguf" 2>/dev/null; then
  ls .whl/gguf-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --find-links .whl gguf
  python3 -c "import gguf" 2>/dev/null || { echo "the gguf package is missing and .whl/ has no gguf wheel"; exit 2; }
fi
[ -f "${LTENGINE_GGUF:-}" ] || { echo "LTENGINE_GGUF must name the default model's .gguf file (got '${LTENGINE_GGUF:-}')"; exit 2; }
export LTENGINE_CACHE=${LTENGINE_CACHE:-/tmp/ltengine-cache}
