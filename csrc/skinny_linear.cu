// skinny_linear: out[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]) for the decode step's few rows (M <= 8),
// bf16/fp16, fp32 accumulation on tensor cores. Reference twins: kernels/linear.py.
//
// At M <= 8 a linear layer is one pass over its weights, so its time is w's bytes over memory bandwidth.
// cuBLAS's kernels for these shapes reach 63-90% of copy bandwidth on the smaller Llama-3-8B projections
// (o_proj, qkv, down_proj; H200, bench/RESULTS.md, issue 11). Here each CTA owns 16 output rows and its
// kWarps warps split K in 64-wide steps; each warp streams its steps through its own S-stage cp.async
// ring (w through L2 only, x cached in L1), whole 128-byte lines per copy instruction, and feeds
// mma.m16n8k16 with w as the A operand (16 rows) and the activations as B (8 batch rows, zero past M).
//
// The k order inside a step is permuted: lane (g = lane / 4, q = lane % 4) takes the 16 physical k
// q*8 .. q*8+7 and 32+q*8 .. 32+q*8+7 of rows g and g + 8 (two 16-byte reads), and uses words 2j, 2j+1
// of them as its logical k columns 2q, 2q+1 and 2q+8, 2q+9 of the step's j-th k16 slice. A dot
// product does not care about the order of k as long as x is permuted the same way, and it is: B's
// lane (g, q) holds logical k rows 2q, 2q+1, 2q+8, 2q+9 of batch row g, read at the same physical k.
// So every shared-memory read is a plain 16-byte vector and no ldmatrix or shuffle is needed.
//
// The elementwise kernels around the decode step's projections are folded into their epilogues (each one
// was a launch of ~2 us at batch 1; bench/RESULTS.md, session 11), so the main loop stays the plain one:
//  * kScale (x_ss): x is the residual stream h already times the RMSNorm weight, bf16(h * norm_w), and
//    out = rsqrt(sum(h^2) / K + eps) * (x @ w^T) + bias: the norm's per-row factor, applied to the fp32 sum;
//    sum(h^2) is the sum of the x_ss partials [M, P] the producing kernel wrote.
//  * kGlu: w is a fused [gate; up] [2I, K]; the CTA's 16 rows are gate rows 8b..8b+7 and the same up rows,
//    so each thread holds both halves of its outputs: out[M, I] = bf16(bf16(silu(g)) * u), g and u rounded
//    first (the model's silu(gate_proj(x)) * up_proj(x)).
//  * kRes (resid): out = bf16(bf16(x @ w^T + bias) + resid) (the residual add); out_ss [M, gridDim.x] gets
//    each CTA's sum of out^2 over its 16 columns, and with next_norm out_hn = bf16(out * next_norm): the
//    next kScale kernel's x and x_ss.
//
// Programmatic dependent launch (Hopper): the kernel is launched so that it may start while the previous
// kernel in the stream finishes. Each CTA issues its first S - 1 steps of w (weights: nothing a previous
// kernel writes) and only then waits for the previous kernel (griddepcontrol.wait) before it reads x,
// resid or x_ss or writes anything; once its main loop is done it lets the next kernel launch
// (griddepcontrol.launch_dependents). So the next projection's first weight bytes are in flight during
// this one's tail instead of after a launch gap.
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
#include <tuple>

#include "check.h"
#include "device.h"
#include "ptx.h"

namespace ltengine {
namespace {

constexpr int kWarps = 4;  // K split this many ways inside a CTA

template <typename T>
struct LinearArgs {
  const T* x;          // [M, K]
  const T* w;          // [N, K] (kGlu: [2 I, K], gate rows then up rows)
  const T* bias;       // [N] or null
  T* out;              // [M, N] (kGlu: [M, I])
  const float* x_ss;   // kScale: [M, ss_n], partial sums of squares of the rows x was normed from
  const T* resid;      // kRes: [M, N]
  float* out_ss;       // kRes: [M, gridDim.x]
  const T* next_norm;  // kRes, optional: [N]
  T* out_hn;           // kRes with next_norm: [M, N]
  int M, N, K, ss_n;
  float eps;
};

// One k step of a warp: w's 16 rows x 64 k (128 bytes a row), then x's 8 batch rows, 128 bytes each.
// The copy gives each instruction whole 128-byte lines (lane l of instruction c: row 4c + l / 8, 16-byte
// column l % 8); the reads want lane (g, q) to have row g's columns q and 4 + q (its 16 physical k), and
// the same of row g + 8 and of x rows g. Column j of row r sits at j ^ 4 (r & 1) so that neither side has
// bank conflicts. A lane reads what other lanes copied: __syncwarp after the wait (and before a stage is
// refilled).
template <int S>
struct Ring {
  static constexpr int kRows = 16 + 8;
  static constexpr int kCopies = kRows * 8 / 32;  // 16-byte copies per lane and step (w: the first 4)
  static constexpr int kStageBytes = kRows * 128;
  static constexpr int kWarpBytes = S * kStageBytes;
  static constexpr int kRedBytes = kWarps * 16 * 8 * 4;
  static constexpr int kBytes = kWarps * kWarpBytes + kRedBytes;
};

__device__ __forceinline__ int swz(int row, int col) { return row * 128 + ((col ^ ((row & 1) << 2)) << 4); }

template <typename T>
__device__ __forceinline__ float round_t(float x) {  // x rounded to T and back
  return to_f(to_t<T>(x));
}

// M <= 8 batch rows (one n8 tile), S stages. Grid: (cdiv(N, 16)), kGlu (cdiv(I, 8)); block: kWarps warps;
// dynamic shared memory Ring<S>::kBytes.
template <typename T, int S, bool kScale, bool kGlu, bool kRes>
__global__ void __launch_bounds__(kWarps * 32) skinny_gemm_kernel(const LinearArgs<T> p) {
  static_assert(!(kGlu && kRes), "no residual after a gated output");
  using R = Ring<S>;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float s_r[8];  // kScale: each batch row's rsqrt(mean(h^2) + eps)
  float(*red)[16][8] = reinterpret_cast<float(*)[16][8]>(smem + kWarps * R::kWarpBytes);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int M = p.M, N = p.N, K = p.K;
  const int half_n = N / 2;  // kGlu: I
  // row r of the CTA's 16 is w row wrow(r) (kGlu: gate rows 8b + r, then the same up rows), clamped
  auto wrow = [&](int r) {
    if constexpr (kGlu) {
      const int j = min(8 * static_cast<int>(blockIdx.x) + (r & 7), half_n - 1);
      return r < 8 ? j : half_n + j;
    } else {
      return min(16 * static_cast<int>(blockIdx.x) + r, N - 1);
    }
  };
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
      src[c] = p.w + static_cast<int64_t>(wrow(r)) * K + col * 8;
      live[c] = true;
    } else {
      live[c] = r - 16 < M;
      src[c] = p.x + static_cast<int64_t>(live[c] ? r - 16 : 0) * K + col * 8;
    }
    dst[c] = ring + swz(r, col);
  }
  const int steps = (K + 63) / 64;
  const int mine = steps > warp ? (steps - warp + kWarps - 1) / kWarps : 0;  // steps warp, warp + kWarps, ...

  // step i of this warp into stage i % S: w's rows (from: 0) and / or x's (from: 4, to: kCopies)
  auto issue = [&](int i, int from, int to) {
    const int s = warp + i * kWarps;
    const bool ok = i < mine && s * 64 + col * 8 < K;
    const unsigned stage = (i % S) * R::kStageBytes;
#pragma unroll
    for (int c = 0; c < R::kCopies; ++c) {
      if (c < from || c >= to) continue;
      const T* src_c = ok ? src[c] + s * 64 : src[c];
      if (c < 4) {
        cp16(dst[c] + stage, src_c, ok);  // w: read once
      } else {
        cp16_l1(dst[c] + stage, src_c, ok && live[c]);  // x: read by every warp
      }
    }
  };

#pragma unroll
  for (int i = 0; i < S - 1; ++i) {  // the weights' first steps, before the previous kernel is done
    issue(i, 0, 4);
    cp_commit();
  }
  grid_dep_wait();  // the previous kernel's writes (x, resid, x_ss) are visible from here on
#pragma unroll
  for (int i = 0; i < S - 1; ++i) issue(i, 4, R::kCopies);
  cp_commit();  // one group: the first S - 1 steps' x
  if constexpr (kScale) {  // (while those copies fly; read in the epilogue, after its barrier)
    for (int m = warp; m < M; m += kWarps) {  // warp-uniform
      float t = 0.f;
      for (int j = lane; j < p.ss_n; j += 32) t += p.x_ss[static_cast<int64_t>(m) * p.ss_n + j];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
      if (lane == 0) s_r[m] = rsqrtf(t / static_cast<float>(K) + p.eps);
    }
  }

  float acc[4] = {};
  for (int i = 0; i < mine; ++i) {
    __syncwarp();  // every lane has read the stage step i - 1 used
    issue(i + S - 1, 0, R::kCopies);  // refills it; an empty group past the end
    cp_commit();
    // this lane's part of step i has landed: at i == 0 everything but the group just committed (x's first
    // group came after the prologue's w groups), then the steady S - 1
    if (i == 0) cp_wait<1>();
    else cp_wait<S - 1>();
    __syncwarp();  // and every other lane's
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
  grid_dep_launch();  // the next kernel may launch now: its weight prefetch overlaps this tail
  cp_wait<0>();
  // c0, c1: (row g, batch 2q, 2q + 1); c2, c3: (row g + 8, same batch rows)
  red[warp][g][2 * q] = acc[0];
  red[warp][g][2 * q + 1] = acc[1];
  red[warp][g + 8][2 * q] = acc[2];
  red[warp][g + 8][2 * q + 1] = acc[3];
  __syncthreads();
  static_assert(kWarps * 32 >= 16 * 8, "one output per thread");
  const int i = threadIdx.x;
  auto sum_of = [&](int r, int m) {  // the fp32 dot of CTA row r and batch row m, scaled (kScale)
    float t = 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) t += red[v][r][m];
    if constexpr (kScale) t *= s_r[m];
    return t;
  };
  if constexpr (kGlu) {  // outputs (m, 8b + j): 8 a batch row
    if (i < 8 * M) {
      const int m = i / 8, j = i % 8, n = 8 * blockIdx.x + j;
      if (n < half_n) {
        float gs = sum_of(j, m), us = sum_of(8 + j, m);
        if (p.bias != nullptr) {
          gs += to_f(p.bias[n]);
          us += to_f(p.bias[half_n + n]);
        }
        const float gr = round_t<T>(gs), ur = round_t<T>(us);
        p.out[static_cast<int64_t>(m) * half_n + n] = to_t<T>(round_t<T>(gr / (1.f + expf(-gr))) * ur);
      }
    }
  } else if (i < 16 * M) {  // outputs (m, 16b + r): whole 16-lane groups per m
    const int m = i / 16, r = i % 16, n = 16 * blockIdx.x + r;
    const int64_t at = static_cast<int64_t>(m) * N + n;
    float sq = 0.f;
    if (n < N) {
      float t = sum_of(r, m);
      if (p.bias != nullptr) t += to_f(p.bias[n]);
      T o = to_t<T>(t);
      if constexpr (kRes) {
        o = to_t<T>(to_f(o) + to_f(p.resid[at]));
        sq = to_f(o) * to_f(o);
        if (p.next_norm != nullptr) p.out_hn[at] = to_t<T>(to_f(o) * to_f(p.next_norm[n]));
      }
      p.out[at] = o;
    }
    if constexpr (kRes) {
      const unsigned half = 0xffffu << (lane & 16);
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) sq += __shfl_xor_sync(half, sq, o);
      if (r == 0) p.out_ss[static_cast<int64_t>(m) * gridDim.x + blockIdx.x] = sq;
    }
  }
}

template <typename T, int S, bool kScale, bool kGlu, bool kRes>
void launch_kernel(const LinearArgs<T>& a, cudaStream_t stream, int device) {
  constexpr int bytes = Ring<S>::kBytes;
  auto* kernel = &skinny_gemm_kernel<T, S, kScale, kGlu, kRes>;
  static bool attr = [&] {  // above the 48 KB default: opt in once per instantiation
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) == cudaSuccess;
  }();
  LT_CHECK(attr, "skinny_linear: cannot reserve ", bytes, " bytes of shared memory per CTA");
  const int ctas = kGlu ? (a.N / 2 + 7) / 8 : (a.N + 15) / 16;
  launch_pdl(kernel, dim3(ctas), dim3(kWarps * 32), bytes, stream, pdl_enabled(device), a);
}

template <typename T, bool kScale, bool kGlu, bool kRes>
void launch_stages(const LinearArgs<T>& a, int stages, cudaStream_t stream, int device) {
  switch (stages) {
    case 3: return launch_kernel<T, 3, kScale, kGlu, kRes>(a, stream, device);
    case 6: return launch_kernel<T, 6, kScale, kGlu, kRes>(a, stream, device);
    default: return launch_kernel<T, 4, kScale, kGlu, kRes>(a, stream, device);
  }
}

// The ring's depth: 3 stages (38 KB a CTA, 5 CTAs per SM) where the grid has >= 2 CTAs per SM, else 4 (50 KB,
// more bytes in flight per CTA). H200, Llama-3-8B projections at 1-8 rows (bench/RESULTS.md, issue 11):
// qkv / gate_up / lm_head 1-2 points faster at 3, o / down 2 points faster at 4; 6 and 8 slower.
template <typename T>
void launch(const LinearArgs<T>& a, bool scale, bool glu, bool res, int stages, int device) {
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  if (stages == 0) stages = (a.N + 15) / 16 >= 2 * multiprocessor_count(device) ? 3 : 4;
  if (glu) {
    scale ? launch_stages<T, true, true, false>(a, stages, stream, device)
          : launch_stages<T, false, true, false>(a, stages, stream, device);
  } else if (res) {
    scale ? launch_stages<T, true, false, true>(a, stages, stream, device)
          : launch_stages<T, false, false, true>(a, stages, stream, device);
  } else {
    scale ? launch_stages<T, true, false, false>(a, stages, stream, device)
          : launch_stages<T, false, false, false>(a, stages, stream, device);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_like(const at::Tensor& t, const at::Tensor& w, c10::IntArrayRef shape, const char* name) {
  LT_CHECK(t.device() == w.device() && t.scalar_type() == w.scalar_type() && t.sizes() == shape && t.is_contiguous(),
           "skinny_linear: ", name, " must be a contiguous ", shape, " tensor of w's dtype ", w.scalar_type(), " on ",
           w.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> skinny_linear_cuda(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t stages,
    const std::optional<at::Tensor>& x_ss, double eps, bool glu, const std::optional<at::Tensor>& resid,
    const std::optional<at::Tensor>& next_norm) {
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
  LT_CHECK(!(glu && resid.has_value()), "skinny_linear: glu and resid exclude each other");
  LT_CHECK(!glu || w.size(0) % 2 == 0, "skinny_linear: glu needs w = [gate; up] with an even row count, got ",
           w.size(0));
  LT_CHECK(!next_norm.has_value() || resid.has_value(), "skinny_linear: next_norm comes with resid");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  if (bias.has_value()) check_like(*bias, w, {N}, "bias");
  if (x_ss.has_value()) {
    const at::Tensor& ss = *x_ss;
    LT_CHECK(ss.device() == w.device() && ss.scalar_type() == at::kFloat && ss.dim() == 2 && ss.size(0) == M &&
                 ss.size(1) >= 1 && ss.size(1) < (int64_t{1} << 30) && ss.is_contiguous(),
             "skinny_linear: x_ss must be a contiguous float32 [M=", M, ", P >= 1] tensor on ", w.device(),
             ", got ", ss.scalar_type(), " ", ss.sizes(), " on ", ss.device());
    LT_CHECK(eps >= 0.0, "skinny_linear: eps must be >= 0, got ", eps);
  }
  if (resid.has_value()) check_like(*resid, w, {M, N}, "resid");
  if (next_norm.has_value()) check_like(*next_norm, w, {N}, "next_norm");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n_out = glu ? N / 2 : N;
  at::Tensor out = at::empty({M, n_out}, x.options());
  at::Tensor out_ss = at::empty({resid.has_value() ? M : 0, (N + 15) / 16}, x.options().dtype(at::kFloat));
  at::Tensor out_hn = at::empty({next_norm.has_value() ? M : 0, N}, x.options());
  const auto fill = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    LinearArgs<T> a{};
    a.x = reinterpret_cast<const T*>(x.data_ptr());
    a.w = reinterpret_cast<const T*>(w.data_ptr());
    a.bias = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
    a.out = reinterpret_cast<T*>(out.data_ptr());
    a.x_ss = x_ss.has_value() ? x_ss->data_ptr<float>() : nullptr;
    a.resid = resid.has_value() ? reinterpret_cast<const T*>(resid->data_ptr()) : nullptr;
    a.out_ss = resid.has_value() ? out_ss.data_ptr<float>() : nullptr;
    a.next_norm = next_norm.has_value() ? reinterpret_cast<const T*>(next_norm->data_ptr()) : nullptr;
    a.out_hn = next_norm.has_value() ? reinterpret_cast<T*>(out_hn.data_ptr()) : nullptr;
    a.M = static_cast<int>(M);
    a.N = static_cast<int>(N);
    a.K = static_cast<int>(K);
    a.ss_n = x_ss.has_value() ? static_cast<int>(x_ss->size(1)) : 0;
    a.eps = static_cast<float>(eps);
    launch<T>(a, x_ss.has_value(), glu, resid.has_value(), static_cast<int>(stages), x.get_device());
  };
  if (x.scalar_type() == at::kBFloat16) {
    fill(static_cast<__nv_bfloat16*>(nullptr));
  } else {
    fill(static_cast<__half*>(nullptr));
  }
  return {out, out_ss, out_hn};
}

}  // namespace ltengine

TORCH_LIBRARY_IMPL(ltengine, CUDA, m) { m.impl("skinny_linear", &ltengine::skinny_linear_cuda); }
