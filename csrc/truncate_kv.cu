// CUDA truncate_kv_: move the last `window` tokens of each long sequence into its ring slots, in place.
//
// Token p in [L - window, L) goes to slot sink + (p - sink) % window (ltengine.kernels.reference.ring_slot).
// Every slot that is read is either its own destination (skipped) or >= sink + window (never
// written), so all copies are independent: one thread per (k|v, b, ring slot, head, vector), no
// barriers, exact even when source and destination ranges overlap. Lengths stay on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <numeric>

#include "check.h"
#include "truncate_kv.h"

namespace ltengine {
namespace {

struct TruncParams {
  char* base[2];           // k, v
  int64_t sb[2], st[2], sh[2];  // strides in bytes
  const void* lengths;
  bool len64;
  int64_t T, sink, window, H, vecs_per_row;  // vecs_per_row: row bytes / sizeof(Vec)
};

template <typename Vec>
__global__ void truncate_kv_kernel(TruncParams p) {
  const int which = blockIdx.z;  // 0: k, 1: v
  const int64_t b = blockIdx.y;
  const int64_t L = p.len64 ? static_cast<const int64_t*>(p.lengths)[b] : static_cast<const int32_t*>(p.lengths)[b];
  // L > T_cap is invalid input: skip rather than read out of bounds (the host cannot check without a sync).
  if (L <= p.sink + p.window || L > p.T) return;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_slot = p.H * p.vecs_per_row;
  if (idx >= p.window * per_slot) return;
  const int64_t j = idx / per_slot, rem = idx % per_slot;
  const int64_t h = rem / p.vecs_per_row, e = rem % p.vecs_per_row;
  int64_t r = (j - (L - p.window - p.sink)) % p.window;
  if (r < 0) r += p.window;
  const int64_t src = L - p.window + r, dst = p.sink + j;
  if (src == dst) return;
  // Select by ternaries: a run-time index into the parameter arrays would copy them to local memory.
  const bool is_v = which == 1;
  char* row = (is_v ? p.base[1] : p.base[0]) + b * (is_v ? p.sb[1] : p.sb[0]) + h * (is_v ? p.sh[1] : p.sh[0]);
  const int64_t st = is_v ? p.st[1] : p.st[0];
  const Vec val = reinterpret_cast<const Vec*>(row + src * st)[e];
  reinterpret_cast<Vec*>(row + dst * st)[e] = val;
}

template <typename Vec>
void launch(const TruncParams& p, int64_t B) {
  const int threads = 256;
  const int64_t n = p.window * p.H * p.vecs_per_row;
  const dim3 grid(static_cast<unsigned>((n + threads - 1) / threads), static_cast<unsigned>(B), 2);
  truncate_kv_kernel<Vec><<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void truncate_kv_cuda(at::Tensor k, at::Tensor v, const at::Tensor& lengths, int64_t sink, int64_t window) {
  check_truncate_args(k, v, lengths, sink, window);
  LT_CHECK(k.is_cuda(), "truncate_kv_ (CUDA): tensors must be on a CUDA device");
  LT_CHECK(k.size(0) <= 65535, "truncate_kv_ (CUDA): batch ", k.size(0), " exceeds 65535");
  if (k.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(k.device());
  const at::Tensor lens = lengths.contiguous();
  TruncParams p{};
  const int64_t es = k.element_size();
  const int64_t row_bytes = k.size(3) * es;
  // Widest vector that divides the row and every byte stride and pointer of both tensors.
  int64_t g = row_bytes;
  for (const at::Tensor* t : {&k, &v}) {
    const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16);
    g = std::gcd(g, mis == 0 ? int64_t{16} : mis);
    for (int d = 0; d < 3; ++d) g = std::gcd(g, t->stride(d) * es);
  }
  int64_t vec = 16;
  while (vec > 1 && g % vec != 0) vec /= 2;
  const at::Tensor* ts[2] = {&k, &v};
  for (int i = 0; i < 2; ++i) {
    p.base[i] = static_cast<char*>(ts[i]->data_ptr());
    p.sb[i] = ts[i]->stride(0) * es;
    p.st[i] = ts[i]->stride(1) * es;
    p.sh[i] = ts[i]->stride(2) * es;
  }
  p.lengths = lens.data_ptr();
  p.len64 = lens.scalar_type() == at::kLong;
  p.T = k.size(1);
  p.sink = sink;
  p.window = window;
  p.H = k.size(2);
  p.vecs_per_row = row_bytes / vec;
  switch (vec) {
    case 16: launch<uint4>(p, k.size(0)); break;
    case 8: launch<uint2>(p, k.size(0)); break;
    case 4: launch<uint32_t>(p, k.size(0)); break;
    case 2: launch<uint16_t>(p, k.size(0)); break;
    default: launch<uint8_t>(p, k.size(0)); break;
  }
}

}  // namespace
}  // namespace ltengine

TORCH_LIBRARY_IMPL(ltengine, CUDA, m) { m.impl("truncate_kv_", &ltengine::truncate_kv_cuda); }
