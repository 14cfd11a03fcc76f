// CUDA paged_truncate_: demote N rows of one layer's pool to sink + window, in place, one launch.
//
// Row n (L = lengths[n] > sink + window): token p in [L - window, L) moves from slot p to ring slot
// sink + (p - sink) % window, both inside the blocks tables[n] (slot t in block tables[n][t / bs]). As
// in the contiguous truncate_kv_, every slot that is read is either its own destination (skipped) or
// >= sink + window (never written), so the copies are independent: one thread per (k|v, row, ring slot,
// head, vector), no barriers, exact when sources and destinations overlap. Lengths stay on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <numeric>

#include "check.h"
#include "truncate_kv.h"

namespace ltengine {
namespace {

struct PagedTruncParams {
  char* base[2];                // k, v
  int64_t sb[2], st[2], sh[2];  // strides in bytes
  const int32_t* tables;
  int64_t t_sb;
  const void* lengths;
  bool len64;
  int64_t sink, window, H, vecs_per_row, capacity;  // capacity: MB * bs slots per row
  int bs;
};

template <typename Vec>
__global__ void paged_truncate_kernel(PagedTruncParams p) {
  const int which = blockIdx.z;  // 0: k, 1: v
  const int64_t n = blockIdx.y;
  const int64_t L = p.len64 ? static_cast<const int64_t*>(p.lengths)[n] : static_cast<const int32_t*>(p.lengths)[n];
  // L past the row's table is invalid input: skip rather than read out of bounds (no host sync to check).
  if (L <= p.sink + p.window || L > p.capacity) return;
  // 32-bit index math (the host checks window * H * vectors < 2^31): 64-bit divisions cost more than the copy.
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  const int vecs = static_cast<int>(p.vecs_per_row), per_slot = static_cast<int>(p.H) * vecs;
  const int window = static_cast<int>(p.window), sink = static_cast<int>(p.sink);
  if (idx >= window * per_slot) return;
  const int j = idx / per_slot, rem = idx - j * per_slot;
  const int h = rem / vecs, e = rem - h * vecs;
  const int len = static_cast<int>(L);
  int r = (j - (len - window - sink)) % window;
  if (r < 0) r += window;
  const int src = len - window + r, dst = sink + j;
  if (src == dst) return;
  const int32_t* tbl = p.tables + n * p.t_sb;
  const bool is_v = which == 1;  // ternaries: a run-time index into the param arrays would go to local memory
  const int64_t sb = is_v ? p.sb[1] : p.sb[0], st = is_v ? p.st[1] : p.st[0];
  char* head = (is_v ? p.base[1] : p.base[0]) + h * (is_v ? p.sh[1] : p.sh[0]);
  const char* from = head + static_cast<int64_t>(tbl[src / p.bs]) * sb + static_cast<int64_t>(src % p.bs) * st;
  char* to = head + static_cast<int64_t>(tbl[dst / p.bs]) * sb + static_cast<int64_t>(dst % p.bs) * st;
  reinterpret_cast<Vec*>(to)[e] = reinterpret_cast<const Vec*>(from)[e];
}

template <typename Vec>
void launch(const PagedTruncParams& p, int64_t N) {
  const int threads = 256;
  const int64_t n = p.window * p.H * p.vecs_per_row;
  const dim3 grid(static_cast<unsigned>((n + threads - 1) / threads), static_cast<unsigned>(N), 2);
  paged_truncate_kernel<Vec><<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void paged_truncate_cuda(at::Tensor k_pool, at::Tensor v_pool, const at::Tensor& tables, const at::Tensor& lengths,
                         int64_t sink, int64_t window) {
  check_paged_truncate_args(k_pool, v_pool, tables, lengths, sink, window);
  LT_CHECK(k_pool.is_cuda(), "paged_truncate_ (CUDA): tensors must be on a CUDA device");
  LT_CHECK(tables.size(0) <= 65535, "paged_truncate_ (CUDA): ", tables.size(0), " rows exceed 65535");
  LT_CHECK(window * k_pool.size(2) * k_pool.size(3) * k_pool.element_size() < (int64_t{1} << 31) &&
                  tables.size(1) * k_pool.size(1) < (int64_t{1} << 31),
              "paged_truncate_ (CUDA): window ", window, " x row ", k_pool.sizes(), " too large");
  if (k_pool.numel() == 0 || tables.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(k_pool.device());
  const at::Tensor lens = lengths.contiguous();
  PagedTruncParams p{};
  const int64_t es = k_pool.element_size();
  const int64_t row_bytes = k_pool.size(3) * es;
  // Widest vector that divides the row and every byte stride and pointer of both pools.
  int64_t g = row_bytes;
  for (const at::Tensor* t : {&k_pool, &v_pool}) {
    const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16);
    g = std::gcd(g, mis == 0 ? int64_t{16} : mis);
    for (int d = 0; d < 3; ++d) g = std::gcd(g, t->stride(d) * es);
  }
  int64_t vec = 16;
  while (vec > 1 && g % vec != 0) vec /= 2;
  const at::Tensor* ts[2] = {&k_pool, &v_pool};
  for (int i = 0; i < 2; ++i) {
    p.base[i] = static_cast<char*>(ts[i]->data_ptr());
    p.sb[i] = ts[i]->stride(0) * es;
    p.st[i] = ts[i]->stride(1) * es;
    p.sh[i] = ts[i]->stride(2) * es;
  }
  p.tables = tables.data_ptr<int32_t>();
  p.t_sb = tables.stride(0);
  p.lengths = lens.data_ptr();
  p.len64 = lens.scalar_type() == at::kLong;
  p.sink = sink;
  p.window = window;
  p.H = k_pool.size(2);
  p.vecs_per_row = row_bytes / vec;
  p.bs = static_cast<int>(k_pool.size(1));
  p.capacity = tables.size(1) * k_pool.size(1);
  switch (vec) {
    case 16: launch<uint4>(p, tables.size(0)); break;
    case 8: launch<uint2>(p, tables.size(0)); break;
    case 4: launch<uint32_t>(p, tables.size(0)); break;
    case 2: launch<uint16_t>(p, tables.size(0)); break;
    default: launch<uint8_t>(p, tables.size(0)); break;
  }
}

}  // namespace
}  // namespace ltengine

TORCH_LIBRARY_IMPL(ltengine, CUDA, m) { m.impl("paged_truncate_", &ltengine::paged_truncate_cuda); }
