#!/usr/bin/env bash
# Kernels on a GPU machine, in one go: build ltengine._C for sm_90 in place, run the kernel tests,
# dump the decode kernels' SASS facts, run the kernel benchmark.
#   bash bench/gpu_kernels.sh            (from the repo root; logs under $OUT, default /tmp/ltengine_kernels)
# Device-tool call used: run(command="bash bench/gpu_kernels.sh", timeout_s=540)
set -o pipefail
export OUT=${OUT:-/tmp/ltengine_kernels}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

{
echo "== $(date -u +%FT%TZ)  $(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader)"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
nvcc --version | tail -1

echo "== build"
rm -rf build ltengine/_C*.so
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 LTENGINE_CUDA=1 LTENGINE_STRICT_BUILD=1 LTENGINE_PTXAS_VERBOSE=1 \
  python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start )) s"
grep -E "error" "$OUT/build.log" | head -20
grep -A2 -E "Compiling entry function '.*(decode|combine|truncate)" "$OUT/build.log" | grep -E "entry|Used" | \
  sed -E "s/.*entry function '_ZN8ltengine[^']*(decode_kernel|combine_kernel|truncate_kv_kernel)I([^']*)'.*/\1 \2/" | paste - - | head -20
[ $rc -eq 0 ] || exit $rc
python3 -c "import ltengine.kernels as K; print(K.available_backends('cuda')); print(K.get_backend('cuda').describe())"

echo "== SASS (default decode kernel, bf16 D=128)"
so=$(ls ltengine/_C*.so)
cuobjdump -sass "$so" > "$OUT/sass.txt" 2>&1
awk '/Function : .*decode_kernelI13__nv_bfloat16Li128/{f=1;next} /Function :/{f=0} f' "$OUT/sass.txt" > "$OUT/sass_decode_bf16_128.txt"
for ins in "LDG.E.NA.LTC256B.128" "LDG" "HMMA.16816.F32.BF16" "LDL" "STL" "SHFL" "MUFU.EX2" "PRMT" "BAR"; do
  printf "  %-22s %s\n" "$ins" "$(grep -c "$ins" "$OUT/sass_decode_bf16_128.txt")"
done
echo "== does a TORCH_CHECK thrown in the extension reach Python? (run 1 segfaulted on one)"
python3 -c "
import torch, ltengine.kernels.cuda
k = torch.zeros(2, 8, 1, 4)
try:
    torch.ops.ltengine.truncate_kv_(k, k.clone(), torch.tensor([1, 9]), 1, 2)
except Exception as e:
    print('raised', type(e).__name__)
"
echo "rc=$?"
python3 -c "import torch; print('torch cxx11 abi', torch._C._GLIBCXX_USE_CXX11_ABI)"
/opt/gcc/bin/gcc --version | head -1; gcc --version | head -1; ldd ltengine/_C*.so | grep -E "stdc|gcc_s"

echo "== tests"
start=$(date +%s)
timeout 300 python3 -m pytest -q -rs --durations=12 -p no:cacheprovider tests/test_kernels.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - start )) s"
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
grep -E "^SKIPPED" "$OUT/pytest.log" | head -10
grep -A14 "slowest" "$OUT/pytest.log"

echo "== bench"
timeout 240 python3 bench/kernels.py
echo "bench rc=$?"
} 2>&1 | tee "$OUT/log"
