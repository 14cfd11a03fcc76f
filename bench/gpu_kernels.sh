#!/usr/bin/env bash
# The compiled kernels on a GPU machine, in one go (~4 min on an H200; each step has its own timeout):
#   1. build ltengine._C for sm_90 in place (register / spill report of every kernel);
#   2. a failed LT_CHECK inside the extension raises in Python (in a child process: a crash fails the line);
#   3. the kernel tests: csrc paged decode (every dtype, fp8 too), truncation and skinny_linear (its folded
#      RMSNorm / SiLU / residual modes and a PDL chain in a CUDA graph) against their PyTorch twins, the Triton
#      kernels beside them, the backend's choice, and the fused decode step against an fp32 reference;
#   4. bench/kernels.py: the decode step's projections (csrc skinny_linear vs cuBLAS; one layer's projections
#      with the elementwise kernels folded in vs separate), CUDA vs Triton paged
#      decode (bf16 and fp8 pools) on the engine's shapes as % of the copy bandwidth measured in the same
#      run, the CUDA kernel's schedule knobs, the truncation.
#   bash bench/gpu_kernels.sh [--no-knobs] [--breakdown]   (from the repo root; logs and kernels.json under $OUT)
#   run(command="bash bench/gpu_kernels.sh", timeout_s=420)
set -o pipefail
export OUT=${OUT:-/tmp/ltengine_kernels}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
KNOBS=--knobs
EXTRA=()
for a in "$@"; do case "$a" in --no-knobs) KNOBS= ;; *) EXTRA+=("$a") ;; esac; done

{
echo "== $(date -u +%FT%TZ)  $(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader)"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
nvcc --version | tail -1; g++ --version | head -1
git log --oneline -1 2>/dev/null || true

echo "== build"
rm -rf build ltengine/_C*.so
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 LTENGINE_CUDA=1 LTENGINE_STRICT_BUILD=1 LTENGINE_PTXAS_VERBOSE=1 \
  timeout 240 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start )) s"
grep -E "error" "$OUT/build.log" | head -20
grep -A2 -E "Compiling entry function" "$OUT/build.log" | grep -E "entry|Used|spill" | \
  sed -E "s/.*entry function '_ZN8ltengine[^']*_GLOBAL__N_[^0-9]*[0-9]*_?[0-9a-f]*_?[0-9]*([a-z_]+kernel)I?([^']*)'.*/\1 \2/" | paste - - - | \
  sed -E 's/ptxas info *: //g' | cut -c1-190
[ $rc -eq 0 ] || exit $rc
python3 -c "import ltengine.kernels as K; print(K.get_backend('cuda').describe())"
echo "ostream symbols defined in _C.so: $(nm -C --defined-only ltengine/_C*.so | grep -c 'basic_ostream')"

echo "== a failed check inside the extension"
timeout 60 python3 -c "
import torch, ltengine.kernels.cuda as kc
q = torch.zeros(2, 8, 36, device='cuda', dtype=torch.bfloat16)
k = torch.zeros(4, 16, 2, 36, device='cuda', dtype=torch.bfloat16)
t = torch.zeros(2, 3, dtype=torch.int32, device='cuda'); n = torch.ones(2, dtype=torch.int32, device='cuda')
for call in (lambda: kc.paged_decode(q, k, k, t, n, 1.0), lambda: kc.paged_truncate_(k, k, t, n, 4, 0),
             lambda: kc.truncate_kv_(torch.zeros(2, 8, 1, 4), torch.zeros(2, 8, 1, 4), torch.tensor([1, 9]), 1, 2)):
    try:
        call()
        print('no error raised')
    except RuntimeError as e:
        print('raised RuntimeError:', str(e).splitlines()[0][:150])
"
echo "child rc=$? (0: every check raised; 139: a segfault)"

echo "== tests"
start=$(date +%s)
timeout 240 python3 -m pytest -q -x -rs --durations=8 -p no:cacheprovider tests/test_paged_cuda.py tests/test_fp8_cuda.py \
  tests/test_kernels.py tests/test_linear_cuda.py "tests/test_engine_gpu.py::test_bf16_fused_paged_decode_agrees_with_reference" \
  > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - start )) s"
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/pytest.log" | head -30
grep -E "^SKIPPED" "$OUT/pytest.log" | head -10
grep -A10 "slowest" "$OUT/pytest.log"

echo "== bench"
LTENGINE_KERNEL_INFO=1 timeout 300 python3 bench/kernels.py $KNOBS "${EXTRA[@]}"
echo "bench rc=$?"
} 2>&1 | tee "$OUT/log"
