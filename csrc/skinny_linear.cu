// skinny_linear: out[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]) for the decode step's few rows (M <= 8),
// bf16/fp16, fp32 accumulation on tensor cores. Reference twin: F.linear (kernels/linear.py).
//
// At M <= 8 a linear layer is one pass over its weights, so its time is w's bytes over memory bandwidth.
// cuBLAS's kernels for these shapes reach 63-90% of copy bandwidth on the smaller Llama-3-8B projections
// (o_proj, qkv, down_proj; H200, bench/RESULTS.md, issue 11). Here each CTA owns 16 output rows and its
// kWarps warps split K in 64-wide steps; each warp streams its steps through its own S-stage cp.async
// ring (w through L2 only, x cached in L1), whole 128-byte lines per copy instruction, and feeds
// mma.m16n8k16 with w as the A operand (16 rows) and x as B (8 batch rows, zero past M).
//
// The k order inside a step is permuted: lane (g = lane / 4, q = lane % 4) takes the 16 physical k
// q*8 .. q*8+7 and 32+q*8 .. 32+q*8+7 of rows g and g + 8 (two 16-byte reads), and uses words 2j, 2j+1
// of them as its logical k columns 2q, 2q+1 and 2q+8, 2q+9 of the step's j-th k16 slice. A dot
// product does not care about the order of k as long as x is permuted the same way, and it is: B's
// lane (g, q) holds logical k rows 2q, 2q+1, 2q+8, 2q+9 of batch row g, read at the same physical k.
// So every shared-memory read is a plain 16-byte vector and no ldmatrix or shuffle is needed.
//
// The warps' fp32 partials meet in shared memory; the CTA adds them (and the bias) in fp32 and rounds
// once. N and M need no padding (rows past N load row N - 1 and are not stored; batch rows past M are
// zero-filled); K must be a multiple of 8 (16-byte vectors) and rows 16-byte aligned.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "check.h"
#include "device.h"
#include "ptx.h"

namespace ltengine {
namespace {

constexpr int kWarps = 4;   // K split this many ways inside a CTA

// One k step of a warp: w's 16 rows x 64 k (128 bytes a row), then x's 8 batch rows, 128 bytes each.
// The copy gives each instruction whole 128-byte lines (lane l of instruction c: row 4c + l / 8, 16-byte
// column l % 8); the reads want lane (g, q) to have row g's columns q and 4 + q (its 16 physical k), and
// the same of row g + 8 and of x rows g. Column j of row r sits at j ^ 4 (r & 1) so that neither side
// has bank conflicts. A lane reads what other lanes copied: __syncwarp after the wait (and before a stage
// is refilled).
template <int S>
struct Ring {
  static constexpr int kRows = 16 + 8;
  static constexpr int kCopies = kRows * 8 / 32;  // 16-byte copies per lane and step
  static constexpr int kStageBytes = kRows * 128;
  static constexpr int kWarpBytes = S * kStageBytes;
  static constexpr int kRedBytes = kWarps * 16 * 8 * 4;
  static constexpr int kBytes = kWarps * kWarpBytes + kRedBytes;
};

__device__ __forceinline__ int swz(int row, int col) { return row * 128 + ((col ^ ((row & 1) << 2)) << 4); }

// M <= 8 batch rows (one n8 tile), S stages. Grid: (cdiv(N, 16)); block: kWarps warps; dynamic shared
// memory Ring<S>::kBytes.
template <typename T, int S>
__global__ void __launch_bounds__(kWarps * 32) skinny_gemm_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                                  const T* __restrict__ bias, T* __restrict__ out,
                                                                  int M, int N, int K) {
  using R = Ring<S>;
  extern __shared__ __align__(128) unsigned char smem[];
  float(*red)[16][8] = reinterpret_cast<float(*)[16][8]>(smem + kWarps * R::kWarpBytes);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int row0 = blockIdx.x * 16;
  // this lane's copies: row r = 4c + lane / 8 of the step (w rows, then x rows), column lane % 8
  const int col = lane & 7;
  const T* src[R::kCopies];
  bool live[R::kCopies];  // an x row past M: zeros
  unsigned dst[R::kCopies];
  const unsigned ring = smem_addr(smem + warp * R::kWarpBytes);
#pragma unroll
  for (int c = 0; c < R::kCopies; ++c) {
    const int r = 4 * c + (lane >> 3);
    if (r < 16) {
      src[c] = w + static_cast<int64_t>(min(row0 + r, N - 1)) * K + col * 8;
      live[c] = true;
    } else {
      live[c] = r - 16 < M;
      src[c] = x + static_cast<int64_t>(live[c] ? r - 16 : 0) * K + col * 8;
    }
    dst[c] = ring + swz(r, col);
  }
  const bool col_in = col * 8 < K;  // for the tail step
  const int steps = (K + 63) / 64;
  const int mine = steps > warp ? (steps - warp + kWarps - 1) / kWarps : 0;  // steps warp, warp + kWarps, ...

  auto issue = [&](int i) {  // step i of this warp into stage i % S
    const int s = warp + i * kWarps;
    const bool ok = i < mine && s * 64 + col * 8 < K;
    const unsigned stage = (i % S) * R::kStageBytes;
#pragma unroll
    for (int c = 0; c < R::kCopies; ++c) {
      const T* p = ok ? src[c] + s * 64 : src[c];
      if (c < 4) {
        cp16(dst[c] + stage, p, ok && col_in);  // w: read once
      } else {
        cp16_l1(dst[c] + stage, p, ok && live[c]);  // x: read by every warp
      }
    }
  };

  float acc[4] = {};
#pragma unroll
  for (int i = 0; i < S - 1; ++i) {
    issue(i);
    cp_commit();
  }
  for (int i = 0; i < mine; ++i) {
    __syncwarp();  // every lane has read the stage step i - 1 used
    issue(i + S - 1);  // refills it; an empty group past the end
    cp_commit();
    cp_wait<S - 1>();  // this lane's part of step i has landed
    __syncwarp();      // and every other lane's
    const unsigned char* st = smem + warp * R::kWarpBytes + (i % S) * R::kStageBytes;
    uint4 v[6];  // row g: columns q, 4 + q; row g + 8: the same; x row g: the same
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      v[h] = *reinterpret_cast<const uint4*>(st + swz(g, q + 4 * h));
      v[2 + h] = *reinterpret_cast<const uint4*>(st + swz(g + 8, q + 4 * h));
      v[4 + h] = *reinterpret_cast<const uint4*>(st + swz(16 + g, q + 4 * h));
    }
    const uint32_t* u = reinterpret_cast<const uint32_t*>(v);  // v[c]'s words: u[4c .. 4c + 3]
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // the step's four k16 slices: words 2j, 2j + 1 of the lane's 16 k
      const int c = j >> 1, o = (j & 1) * 2;
      const uint32_t a[4] = {u[4 * c + o], u[4 * (c + 2) + o], u[4 * c + o + 1], u[4 * (c + 2) + o + 1]};
      Mma<T>::run(acc, a, u[4 * (4 + c) + o], u[4 * (4 + c) + o + 1]);
    }
  }
  cp_wait<0>();
  // c0, c1: (row g, batch 2q, 2q + 1); c2, c3: (row g + 8, same batch rows)
  red[warp][g][2 * q] = acc[0];
  red[warp][g][2 * q + 1] = acc[1];
  red[warp][g + 8][2 * q] = acc[2];
  red[warp][g + 8][2 * q + 1] = acc[3];
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * M; i += kWarps * 32) {
    const int m = i / 16, r = i % 16, n = row0 + r;  // consecutive threads: consecutive outputs of a row m
    if (n >= N) continue;
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) sum += red[v][r][m];
    if (bias != nullptr) sum += to_f(bias[n]);
    out[static_cast<int64_t>(m) * N + n] = to_t<T>(sum);
  }
}

template <typename T, int S>
void launch_stages(const T* x, const T* w, const T* bias, T* out, int M, int N, int K, cudaStream_t stream) {
  constexpr int bytes = Ring<S>::kBytes;
  static bool attr = [] {  // above the 48 KB default: opt in once per instantiation
    return cudaFuncSetAttribute(skinny_gemm_kernel<T, S>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) ==
           cudaSuccess;
  }();
  LT_CHECK(attr, "skinny_linear: cannot reserve ", bytes, " bytes of shared memory per CTA");
  skinny_gemm_kernel<T, S><<<dim3((N + 15) / 16), dim3(kWarps * 32), bytes, stream>>>(x, w, bias, out, M, N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The ring's depth: 3 stages (38 KB a CTA, 5 CTAs per SM) where the grid has >= 2 CTAs per SM, else 4 (50 KB,
// more bytes in flight per CTA). H200, Llama-3-8B projections at 1-8 rows (bench/RESULTS.md, issue 11):
// qkv / gate_up / lm_head 1-2 points faster at 3, o / down 2 points faster at 4; 6 and 8 slower.
template <typename T>
void launch(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, at::Tensor& out,
            int stages) {
  const int M = x.size(0), N = w.size(0), K = w.size(1);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* wp = reinterpret_cast<const T*>(w.data_ptr());
  const T* bp = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
  T* op = reinterpret_cast<T*>(out.data_ptr());
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  if (stages == 0) {
    stages = (N + 15) / 16 >= 2 * multiprocessor_count(x.get_device()) ? 3 : 4;
  }
  switch (stages) {
    case 3: return launch_stages<T, 3>(xp, wp, bp, op, M, N, K, stream);
    case 6: return launch_stages<T, 6>(xp, wp, bp, op, M, N, K, stream);
    default: return launch_stages<T, 4>(xp, wp, bp, op, M, N, K, stream);
  }
}

}  // namespace

at::Tensor skinny_linear_cuda(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                              int64_t stages) {
  LT_CHECK(stages == 0 || stages == 3 || stages == 4 || stages == 6,
           "skinny_linear: stages must be 0 (the default for the shape), 3, 4 or 6, got ", stages);
  LT_CHECK(x.is_cuda() && w.is_cuda(), "skinny_linear: x and w must be CUDA tensors, got ", x.device(), " and ",
           w.device());
  LT_CHECK(x.device() == w.device(), "skinny_linear: x on ", x.device(), " but w on ", w.device());
  LT_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
           "skinny_linear: x must be bf16 or fp16, got ", x.scalar_type());
  LT_CHECK(w.scalar_type() == x.scalar_type(), "skinny_linear: w dtype ", w.scalar_type(), " must match x's ",
           x.scalar_type());
  LT_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "skinny_linear: need x [M, K] and w [N, K], got ",
           x.sizes(), " and ", w.sizes());
  LT_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "skinny_linear: x must have 1..8 rows, got ", x.size(0));
  LT_CHECK(w.size(0) >= 1, "skinny_linear: w has no rows");
  LT_CHECK(w.size(1) % 8 == 0 && w.size(1) > 0, "skinny_linear: K must be a positive multiple of 8, got ", w.size(1));
  LT_CHECK(x.is_contiguous() && w.is_contiguous(), "skinny_linear: x and w must be contiguous");
  LT_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
           "skinny_linear: x and w must be 16-byte aligned");
  LT_CHECK(w.size(0) < (int64_t{1} << 31) / 16 && w.numel() < (int64_t{1} << 62), "skinny_linear: w too large");
  if (bias.has_value()) {
    LT_CHECK(bias->device() == w.device() && bias->scalar_type() == w.scalar_type() && bias->dim() == 1 &&
                 bias->size(0) == w.size(0) && bias->is_contiguous(),
             "skinny_linear: bias must be a contiguous [N=", w.size(0), "] tensor of w's dtype and device, got ",
             bias->scalar_type(), " ", bias->sizes());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    launch<__nv_bfloat16>(x, w, bias, out, static_cast<int>(stages));
  } else {
    launch<__half>(x, w, bias, out, static_cast<int>(stages));
  }
  return out;
}

}  // namespace ltengine

TORCH_LIBRARY_IMPL(ltengine, CUDA, m) { m.impl("skinny_linear", &ltengine::skinny_linear_cuda); }
