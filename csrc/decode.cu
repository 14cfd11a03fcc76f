// Split-K ("flash-decoding") attention of one query token per sequence over a token-major KV cache.
//
// Serves both decode ops: a full cache attends keys [0, min(len, T_cap)), and a sink + window cache
// [B, sink + window, H_kv, D] has exactly the same valid set, slots [0, min(len, sink + window)),
// because the ring fills from slot `sink` and softmax ignores key order. So one kernel reads the sink
// and the ring in place, with no concatenation.
//
// Work split: one CTA (4 warps) per (sequence, kv head, 16-query-head tile, key chunk). The G = H_q/H_kv
// query heads sharing a kv head are the M rows of tensor-core MMAs (m16n8k16, fp32 accumulation), so
// K and V are read from memory once per kv head whatever G is. Each warp takes 16-key blocks
// (interleaved with the other warps), keeps its own online-softmax state, and the CTA merges its 4
// warps through shared memory. With more than one chunk per sequence, a second kernel merges the
// chunks' (output, log-sum-exp) pairs.
//
// Loads go straight from global memory into MMA fragments, 16 bytes per thread per load:
//  * Q.K^T: the dot product may sum over d in any order, so the k index of the MMA is mapped onto d
//    such that each thread's fragment elements are 8 consecutive d values (one 16-byte load); a warp
//    load instruction covers 8 keys x 64 contiguous bytes.
//  * P.V: the output column d may also be permuted (undone when storing), so each thread's n values
//    across the D/8 n-tiles are 8 consecutive d values; again 16-byte loads, 128 contiguous bytes per
//    key per warp instruction. The two keys of a B-fragment register are paired with one byte_perm.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>

namespace ltengine {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockN = 16;                  // keys per warp per step
constexpr int kCtaN = kWarps * kBlockN;      // keys per CTA per step; chunks are multiples of this

struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* o_part;    // [B, H_q, splits, D] fp32, normalised partial outputs (splits > 1)
  float* lse_part;  // [B, H_q, splits]    fp32, log2-sum-exp of each chunk (-inf if empty)
  const void* lengths;
  bool len64;
  int64_t q_sb, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh;  // element strides; last dim contiguous
  int B, H_kv, G, m_tiles, T_cap, splits, chunk;
  float scale_log2;  // softmax scale * log2(e): scores live in the log2 domain (exp2f)
};

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

// 16-byte streaming load: KV is read once per step, so keep it out of L1.
__device__ __forceinline__ uint4 ldg_stream(const void* ptr) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(ptr));
  return r;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ int load_length(const DecodeParams& p, int b) {
  const int64_t len = p.len64 ? static_cast<const int64_t*>(p.lengths)[b] : static_cast<const int32_t*>(p.lengths)[b];
  return static_cast<int>(max(int64_t{0}, min(len, static_cast<int64_t>(p.T_cap))));
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeParams p) {
  constexpr int kChunks = D / 32;  // 16-byte K chunks per thread per key row (2 k-steps each)
  constexpr int kNTiles = D / 8;   // n-tiles of P.V
  constexpr int kVChunks = D / 64; // 16-byte V chunks per thread per key
  constexpr int kPad = 4;          // smem row padding (floats)
  __shared__ float sm_acc[kWarps][16][D + kPad];
  __shared__ float sm_m[kWarps][16];
  __shared__ float sm_l[kWarps][16];

  const int mt = blockIdx.x % p.m_tiles;
  const int bh = blockIdx.x / p.m_tiles;
  const int b = bh / p.H_kv, kvh = bh % p.H_kv;
  const int split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, c = lane & 3;  // MMA groupID (row / key / column) and thread-in-group

  const int n = load_length(p, b);
  const int start = split * p.chunk;
  const int end = min(start + p.chunk, n);
  const int rows = min(16, p.G - mt * 16);  // valid query-head rows of this tile
  const int head0 = kvh * p.G + mt * 16;    // query head of row 0

  // Q as A fragments, one per k-step s = 2i + h: thread (g, c) holds d = 32i + 8c + 4h + {0..3}.
  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb;
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
    const uint4 r0 = g < rows ? *reinterpret_cast<const uint4*>(qb + (head0 + g) * p.q_sh + 32 * i + 8 * c) : zero;
    const uint4 r1 =
        g + 8 < rows ? *reinterpret_cast<const uint4*>(qb + (head0 + g + 8) * p.q_sh + 32 * i + 8 * c) : zero;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      qa[2 * i + h][0] = word(r0, 2 * h);
      qa[2 * i + h][1] = word(r1, 2 * h);
      qa[2 * i + h][2] = word(r0, 2 * h + 1);
      qa[2 * i + h][3] = word(r1, 2 * h + 1);
    }
  }

  float acc[kNTiles][4];
#pragma unroll
  for (int t = 0; t < kNTiles; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows g and g + 8

  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;

  for (int base = start + warp * kBlockN; base < end; base += kCtaN) {
    // Issue every load of the block before the first use.
    uint4 kr[2][kChunks];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int key = base + 8 * u + g;
      const T* ptr = kb + static_cast<int64_t>(key) * p.k_st + 8 * c;
#pragma unroll
      for (int i = 0; i < kChunks; ++i) kr[u][i] = key < end ? ldg_stream(ptr + 32 * i) : make_uint4(0, 0, 0, 0);
    }
    uint4 vr[4][kVChunks];  // keys 2c, 2c + 1, 2c + 8, 2c + 9 of the block
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = base + 2 * c + (e & 1) + 8 * (e >> 1);
      const T* ptr = vb + static_cast<int64_t>(key) * p.v_st + 8 * g;
#pragma unroll
      for (int j = 0; j < kVChunks; ++j) vr[e][j] = key < end ? ldg_stream(ptr + 64 * j) : make_uint4(0, 0, 0, 0);
    }

    // S = Q K^T for keys base + [0, 8) (u = 0) and base + [8, 16) (u = 1).
    float s[2][4];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      s[u][0] = s[u][1] = s[u][2] = s[u][3] = 0.f;
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) Mma<T>::run(s[u], qa[2 * i + h], word(kr[u][i], 2 * h), word(kr[u][i], 2 * h + 1));
      }
    }
    // Thread holds S[row g | g + 8][key 8u + 2c + {0, 1}].
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool ok = base + 8 * u + 2 * c + e < end;
        s[u][e] = ok ? s[u][e] * p.scale_log2 : -INFINITY;
        s[u][2 + e] = ok ? s[u][2 + e] * p.scale_log2 : -INFINITY;
        mx0 = fmaxf(mx0, s[u][e]);
        mx1 = fmaxf(mx1, s[u][2 + e]);
      }
    }
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o));
    }
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    // A row with no valid key so far keeps m = -inf; exponentiate against 0 to avoid inf - inf.
    const float ref0 = mn0 == -INFINITY ? 0.f : mn0, ref1 = mn1 == -INFINITY ? 0.f : mn1;
    const float corr0 = exp2f(m0 - ref0), corr1 = exp2f(m1 - ref1);
    m0 = mn0;
    m1 = mn1;
    float ps[2][4];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      ps[u][0] = exp2f(s[u][0] - ref0);
      ps[u][1] = exp2f(s[u][1] - ref0);
      ps[u][2] = exp2f(s[u][2] - ref1);
      ps[u][3] = exp2f(s[u][3] - ref1);
    }
    l0 = l0 * corr0 + (ps[0][0] + ps[0][1] + ps[1][0] + ps[1][1]);
    l1 = l1 * corr1 + (ps[0][2] + ps[0][3] + ps[1][2] + ps[1][3]);
    // The S accumulator layout of the two n-tiles is the A layout of P (FlashAttention-2 register reuse).
    const uint32_t pa[4] = {Mma<T>::pack(ps[0][0], ps[0][1]), Mma<T>::pack(ps[0][2], ps[0][3]),
                            Mma<T>::pack(ps[1][0], ps[1][1]), Mma<T>::pack(ps[1][2], ps[1][3])};
#pragma unroll
    for (int t = 0; t < kNTiles; ++t) {
      acc[t][0] *= corr0;
      acc[t][1] *= corr0;
      acc[t][2] *= corr1;
      acc[t][3] *= corr1;
      // n-tile t, column g <-> d = 64 (t / 8) + 8 g + t % 8: element t % 8 of V chunk t / 8.
      const int j = t / 8, w = (t % 8) / 2;
      const uint32_t sel = (t % 2) ? 0x7632u : 0x5410u;  // high or low halves of the two keys
      const uint32_t b0 = __byte_perm(word(vr[0][j], w), word(vr[1][j], w), sel);
      const uint32_t b1 = __byte_perm(word(vr[2][j], w), word(vr[3][j], w), sel);
      Mma<T>::run(acc[t], pa, b0, b1);
    }
  }

  // Merge the 4 warps: row sums are per-thread partials until here.
#pragma unroll
  for (int o = 1; o < 4; o <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o);
  }
  if (c == 0) {
    sm_m[warp][g] = m0;
    sm_m[warp][g + 8] = m1;
    sm_l[warp][g] = l0;
    sm_l[warp][g + 8] = l1;
  }
#pragma unroll
  for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int d = 64 * (t / 8) + 8 * (2 * c + e) + t % 8;  // accumulator column 2c + e of n-tile t
      sm_acc[warp][g][d] = acc[t][e];
      sm_acc[warp][g + 8][d] = acc[t][2 + e];
    }
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
    const int row = idx / D, d = idx % D;
    float mmax = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mmax = fmaxf(mmax, sm_m[w][row]);
    float lsum = 0.f, o = 0.f;
    if (mmax != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = exp2f(sm_m[w][row] - mmax);
        lsum += sm_l[w][row] * f;
        o += sm_acc[w][row][d] * f;
      }
    }
    const int head = head0 + row;
    const float val = lsum > 0.f ? o / lsum : 0.f;
    if (p.splits == 1) {
      static_cast<T*>(p.out)[(static_cast<int64_t>(b) * p.H_kv * p.G + head) * D + d] = Mma<T>::from_float(val);
    } else {
      const int64_t part = (static_cast<int64_t>(b) * p.H_kv * p.G + head) * p.splits + split;
      p.o_part[part * D + d] = val;
      if (d == 0) p.lse_part[part] = lsum > 0.f ? mmax + log2f(lsum) : -INFINITY;
    }
  }
}

// Merge the key chunks: out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M); no valid key -> 0.
template <typename T, int D>
__global__ void __launch_bounds__(D) combine_kernel(const DecodeParams p) {
  const int64_t bh = blockIdx.x;  // b * H_q + head
  const int d = threadIdx.x;
  const float* lse = p.lse_part + bh * p.splits;
  float mmax = -INFINITY;
  for (int s = 0; s < p.splits; ++s) mmax = fmaxf(mmax, lse[s]);
  float wsum = 0.f, o = 0.f;
  if (mmax != -INFINITY) {
    for (int s = 0; s < p.splits; ++s) {
      const float w = exp2f(lse[s] - mmax);
      wsum += w;
      o += w * p.o_part[(bh * p.splits + s) * D + d];
    }
  }
  static_cast<T*>(p.out)[bh * D + d] = Mma<T>::from_float(wsum > 0.f ? o / wsum : 0.f);
}

template <typename T, int D>
void launch(DecodeParams& p, const at::Tensor& q, cudaStream_t stream) {
  at::Tensor o_part, lse_part;
  if (p.splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    o_part = at::empty({p.B, p.H_kv * p.G, p.splits, D}, f32);
    lse_part = at::empty({p.B, p.H_kv * p.G, p.splits}, f32);
    p.o_part = o_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  const dim3 grid(static_cast<unsigned>(p.B * p.H_kv * p.m_tiles), static_cast<unsigned>(p.splits));
  decode_kernel<T, D><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.splits > 1) {
    combine_kernel<T, D><<<static_cast<unsigned>(p.B * p.H_kv * p.G), D, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

int multiprocessor_count(int device) {
  static int cache[64] = {};  // per device; benign race: every writer stores the same value
  if (device < 0 || device >= 64) return 132;
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n;
  }
  return cache[device];
}

bool aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d + 1 < t.dim(); ++d)
    if ((t.stride(d) * t.element_size()) % 16 != 0) return false;
  return t.stride(-1) == 1;
}

void decode_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                 double scale, at::Tensor out, int64_t num_splits) {
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device() && out.device() == q.device() &&
                  lengths.device() == q.device(),
              "decode: q, k, v, lengths and out must be on one CUDA device");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "decode (CUDA): dtype must be bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "decode: q, k, v and out must share one dtype");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(), "decode: need q [B, H_q, D], k, v [B, T, H_kv, D]");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), T = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "decode: q ", q.sizes(), " and k ", k.sizes(), " disagree");
  TORCH_CHECK(D == 64 || D == 128, "decode (CUDA): head dim must be 64 or 128, got ", D);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "decode: H_q=", Hq, " is not a multiple of H_kv=", Hkv);
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous(), "decode: out must be a contiguous [B, H_q, D]");
  TORCH_CHECK(aligned16(q) && aligned16(k) && aligned16(v),
              "decode (CUDA): q, k, v need a contiguous last dim, 16-byte aligned pointers and strides");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B && lengths.is_contiguous() &&
                  (lengths.scalar_type() == at::kInt || lengths.scalar_type() == at::kLong),
              "decode: lengths must be a contiguous int32/int64 [B]");
  TORCH_CHECK(T < (int64_t{1} << 30) && B * Hq < (int64_t{1} << 30), "decode: sizes too large");
  if (B == 0 || Hq == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());

  DecodeParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lengths = lengths.data_ptr();
  p.len64 = lengths.scalar_type() == at::kLong;
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.k_sb = k.stride(0);
  p.k_st = k.stride(1);
  p.k_sh = k.stride(2);
  p.v_sb = v.stride(0);
  p.v_st = v.stride(1);
  p.v_sh = v.stride(2);
  p.B = static_cast<int>(B);
  p.H_kv = static_cast<int>(Hkv);
  p.G = static_cast<int>(Hq / Hkv);
  p.m_tiles = (p.G + 15) / 16;
  p.T_cap = static_cast<int>(T);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  // Key chunks: enough CTAs for ~`waves` CTAs per SM even at B = 1, chunks a multiple of kCtaN.
  const int64_t blocks = std::max<int64_t>(1, (T + kCtaN - 1) / kCtaN);
  int64_t splits = num_splits;
  if (splits <= 0) {
    const int64_t sms = multiprocessor_count(q.get_device());
    const int64_t ctas = B * Hkv * p.m_tiles;
    splits = (4 * sms + ctas - 1) / ctas;
  }
  splits = std::min(std::max<int64_t>(splits, 1), blocks);
  const int64_t chunk_blocks = (blocks + splits - 1) / splits;
  p.chunk = static_cast<int>(chunk_blocks * kCtaN);
  p.splits = static_cast<int>((blocks + chunk_blocks - 1) / chunk_blocks);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kBFloat16) {
    D == 64 ? launch<__nv_bfloat16, 64>(p, q, stream) : launch<__nv_bfloat16, 128>(p, q, stream);
  } else {
    D == 64 ? launch<__half, 64>(p, q, stream) : launch<__half, 128>(p, q, stream);
  }
}

}  // namespace
}  // namespace ltengine

TORCH_LIBRARY_IMPL(ltengine, CUDA, m) { m.impl("decode", &ltengine::decode_cuda); }
