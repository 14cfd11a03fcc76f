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
// Fragment layout (no ldmatrix, no transposes): each thread's MMA operands are 16-byte vectors.
//  * Q.K^T: the dot product may sum over d in any order, so the k index of the MMA is mapped onto d
//    such that each thread's fragment elements are 8 consecutive d values: thread (g, c) of n-tile u
//    holds key row 8u + g, d in [32i + 8c, +8) for i < D/32.
//  * P.V: the output column d may also be permuted (undone when storing), so each thread's n values
//    across the D/8 n-tiles are 8 consecutive d values: thread (g, c) holds keys 2c + {0, 1, 8, 9},
//    d in [64j + 8g, +8). The two keys of a B-fragment register are paired with one byte_perm.
// The vectors go straight from global memory into registers (a warp load covers 8 rows x 64 B, with an
// L2 hint to fetch whole 256-byte rows), and the loads rotate through the loop: the next block's K is
// requested as soon as S = Q K^T has consumed this block's K, the next V once P V has consumed this V,
// so every warp keeps a block in flight with no extra registers. (A cp.async shared-memory ring of 2-4
// stages per warp measured the same bandwidth, within 1.5%, and was dropped: bench/KERNELS_NOTES.md.)
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
constexpr int kMaxSplits = 256;              // key chunks per sequence, at most

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

// 16-byte streaming load: KV is read once per step, so keep it out of L1; on an L2 miss fetch the whole
// 256-byte segment (a warp load covers half lines of 8 rows, the next load of the block the rest).
__device__ __forceinline__ uint4 ldg_stream(const void* ptr) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
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

// One warp's share of a CTA: Q fragments, the output accumulator and the online-softmax state of
// query-head rows g and g + 8 (m in the log2 domain; l a per-thread partial sum until finish()).
template <typename T, int D>
struct WarpAttn {
  static constexpr int kChunks = D / 32;   // 16-byte K vectors per thread per key row (2 k-steps each)
  static constexpr int kNTiles = D / 8;    // n-tiles of P.V
  static constexpr int kVChunks = D / 64;  // 16-byte V vectors per thread per key
  using KFrag = uint4[2][kChunks];         // rows 8u + g, d in [32i + 8c, +8)
  using VFrag = uint4[4][kVChunks];        // rows 2c + {0, 1, 8, 9}, d in [64j + 8g, +8)

  uint32_t qa[D / 16][4];
  float acc[kNTiles][4];
  float m0, m1, l0, l1;

  __device__ __forceinline__ void init(const DecodeParams& p, int b, int head0, int rows, int g, int c) {
    // Q as A fragments, one per k-step s = 2i + h: thread (g, c) holds d = 32i + 8c + 4h + {0..3}.
    const T* qb = static_cast<const T*>(p.q) + b * p.q_sb;
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
#pragma unroll
    for (int t = 0; t < kNTiles; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
    m0 = m1 = -INFINITY;
    l0 = l1 = 0.f;
  }

  // S = Q K^T for keys base + [0, 8) (u = 0) and base + [8, 16) (u = 1);
  // thread holds S[row g | g + 8][key 8u + 2c + {0, 1}].
  __device__ __forceinline__ void scores(const KFrag& kr, float (&s)[2][4]) const {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      s[u][0] = s[u][1] = s[u][2] = s[u][3] = 0.f;
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) Mma<T>::run(s[u], qa[2 * i + h], word(kr[u][i], 2 * h), word(kr[u][i], 2 * h + 1));
      }
    }
  }

  // Online softmax over the block's scores, then acc += P V. Keys >= end are masked.
  __device__ __forceinline__ void update(float (&s)[2][4], const VFrag& vr, int base, int end, int c, float scale_log2) {
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool ok = base + 8 * u + 2 * c + e < end;
        s[u][e] = ok ? s[u][e] * scale_log2 : -INFINITY;
        s[u][2 + e] = ok ? s[u][2 + e] * scale_log2 : -INFINITY;
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
      // n-tile t, column g <-> d = 64 (t / 8) + 8 g + t % 8: element t % 8 of V vector t / 8.
      const int j = t / 8, w = (t % 8) / 2;
      const uint32_t sel = (t % 2) ? 0x7632u : 0x5410u;  // high or low halves of the two keys
      const uint32_t b0 = __byte_perm(word(vr[0][j], w), word(vr[1][j], w), sel);
      const uint32_t b1 = __byte_perm(word(vr[2][j], w), word(vr[3][j], w), sel);
      Mma<T>::run(acc[t], pa, b0, b1);
    }
  }

  // Merge the CTA's warps through shared memory (at least epilogue_floats<D>() floats; the caller
  // makes sure nothing else uses it) and store the output or this chunk's partial.
  __device__ __forceinline__ void finish(const DecodeParams& p, float* smem, int warp, int g, int c, int b, int head0,
                                         int rows, int split) {
    constexpr int kRow = D + 4;  // padded row (floats)
    float* sm_acc = smem;                        // [kWarps][16][kRow]
    float* sm_m = smem + kWarps * 16 * kRow;     // [kWarps][16]
    float* sm_l = sm_m + kWarps * 16;            // [kWarps][16]
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, o);
      l1 += __shfl_xor_sync(0xffffffffu, l1, o);
    }
    if (c == 0) {
      sm_m[warp * 16 + g] = m0;
      sm_m[warp * 16 + g + 8] = m1;
      sm_l[warp * 16 + g] = l0;
      sm_l[warp * 16 + g + 8] = l1;
    }
#pragma unroll
    for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = 64 * (t / 8) + 8 * (2 * c + e) + t % 8;  // accumulator column 2c + e of n-tile t
        sm_acc[(warp * 16 + g) * kRow + d] = acc[t][e];
        sm_acc[(warp * 16 + g + 8) * kRow + d] = acc[t][2 + e];
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
      const int row = idx / D, d = idx % D;
      float mmax = -INFINITY;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) mmax = fmaxf(mmax, sm_m[w * 16 + row]);
      float lsum = 0.f, o = 0.f;
      if (mmax != -INFINITY) {
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          const float f = exp2f(sm_m[w * 16 + row] - mmax);
          lsum += sm_l[w * 16 + row] * f;
          o += sm_acc[(w * 16 + row) * kRow + d] * f;
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
};

template <int D>
constexpr int epilogue_floats() {
  return kWarps * 16 * (D + 4) + 2 * kWarps * 16;
}

// Which (sequence, kv head, head tile, chunk) this CTA owns and its key range [start, end).
struct CtaWork {
  int b, kvh, split, head0, rows, start, end;
  __device__ __forceinline__ explicit CtaWork(const DecodeParams& p) {
    const int mt = blockIdx.x % p.m_tiles;
    const int bh = blockIdx.x / p.m_tiles;
    b = bh / p.H_kv;
    kvh = bh % p.H_kv;
    split = blockIdx.y;
    rows = min(16, p.G - mt * 16);  // valid query-head rows of this tile
    head0 = kvh * p.G + mt * 16;    // query head of row 0
    const int n = load_length(p, b);
    start = split * p.chunk;
    end = min(start + p.chunk, n);
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeParams p) {
  using W = WarpAttn<T, D>;
  __shared__ __align__(16) float smem[epilogue_floats<D>()];
  const CtaWork cw(p);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, c = lane & 3;  // MMA groupID (row / key / column) and thread-in-group
  const int end = cw.end;
  W st;
  st.init(p, cw.b, cw.head0, cw.rows, g, c);
  const T* kb = static_cast<const T*>(p.k) + cw.b * p.k_sb + cw.kvh * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + cw.b * p.v_sb + cw.kvh * p.v_sh;

  typename W::KFrag kr;
  typename W::VFrag vr;
  auto load_k = [&](int base) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int key = base + 8 * u + g;
      const T* ptr = kb + static_cast<int64_t>(key) * p.k_st + 8 * c;
#pragma unroll
      for (int i = 0; i < W::kChunks; ++i)
        kr[u][i] = key < end ? ldg_stream(ptr + 32 * i) : make_uint4(0, 0, 0, 0);
    }
  };
  auto load_v = [&](int base) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = base + 2 * c + (e & 1) + 8 * (e >> 1);
      const T* ptr = vb + static_cast<int64_t>(key) * p.v_st + 8 * g;
#pragma unroll
      for (int j = 0; j < W::kVChunks; ++j)
        vr[e][j] = key < end ? ldg_stream(ptr + 64 * j) : make_uint4(0, 0, 0, 0);
    }
  };

  int base = cw.start + warp * kBlockN;
  if (base < end) {
    load_k(base);
    load_v(base);
  }
  for (; base < end; base += kCtaN) {
    const int next = base + kCtaN;
    float s[2][4];
    st.scores(kr, s);
    if (next < end) load_k(next);  // this block's K is consumed: keep the next one in flight
    st.update(s, vr, base, end, c, p.scale_log2);
    if (next < end) load_v(next);
  }
  st.finish(p, smem, warp, g, c, cw.b, cw.head0, cw.rows, cw.split);
}

// Merge the key chunks: out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M); no valid key -> 0.
// One CTA of D threads per (sequence, query head); the weights go through shared memory and the
// partial loads are unrolled so that many are in flight (a serial loop here cost ~10 us at B = 1).
template <typename T, int D>
__global__ void __launch_bounds__(D) combine_kernel(const DecodeParams p) {
  __shared__ float w[kMaxSplits];
  __shared__ float warp_max[D / 32];
  const int64_t bh = blockIdx.x;  // b * H_q + head
  const int d = threadIdx.x;
  const float* lse = p.lse_part + bh * p.splits;
  float mx = -INFINITY;
  for (int s = d; s < p.splits; s += D) {
    w[s] = lse[s];
    mx = fmaxf(mx, w[s]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (d % 32 == 0) warp_max[d / 32] = mx;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < D / 32; ++i) mx = fmaxf(mx, warp_max[i]);
  const float ref = mx == -INFINITY ? 0.f : mx;  // every chunk empty: all weights 0
  for (int s = d; s < p.splits; s += D) w[s] = exp2f(w[s] - ref);
  __syncthreads();
  const float* part = p.o_part + bh * p.splits * D + d;
  float wsum = 0.f, o = 0.f;
#pragma unroll 8
  for (int s = 0; s < p.splits; ++s) {
    wsum += w[s];
    o += w[s] * part[static_cast<int64_t>(s) * D];
  }
  static_cast<T*>(p.out)[bh * D + d] = Mma<T>::from_float(wsum > 0.f ? o / wsum : 0.f);
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

// Key chunks per sequence: the smallest count whose CTAs fill the GPU's resident slots in whole waves
// (>= 90% wave efficiency, the flash-attention rule) and, where the keys allow, at least 1.5 waves,
// so that enough loads are in flight at B = 1 and the last wave is not mostly idle.
int choose_splits(int64_t ctas_per_split, int64_t slots, int64_t blocks) {
  const int64_t max_splits = std::min<int64_t>(blocks, kMaxSplits);
  auto eligible = [&](int64_t s) { return s == 1 || (blocks + s - 1) / s != (blocks + s - 2) / (s - 1); };
  auto waves = [&](int64_t s) { return static_cast<double>(ctas_per_split * s) / static_cast<double>(slots); };
  auto eff = [&](int64_t s) { return waves(s) / std::ceil(waves(s)); };
  double best = 0.0;
  for (int64_t s = 1; s <= max_splits; ++s)
    if (eligible(s)) best = std::max(best, eff(s));
  for (int64_t s = 1; s <= max_splits; ++s)
    if (eligible(s) && eff(s) >= 0.9 * best && (waves(s) >= 1.5 || waves(max_splits) < 1.5)) return static_cast<int>(s);
  return static_cast<int>(max_splits);
}

template <typename T, int D>
void launch(DecodeParams& p, const at::Tensor& q, int64_t num_splits, cudaStream_t stream) {
  static int resident = 0;  // CTAs per SM (same on every device we build for)
  if (resident == 0)
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, decode_kernel<T, D>, kThreads, 0));
  const int dev = q.get_device();
  const int64_t blocks = std::max<int64_t>(1, (p.T_cap + kCtaN - 1) / kCtaN);
  int64_t splits = num_splits > 0 ? num_splits
                                  : choose_splits(static_cast<int64_t>(p.B) * p.H_kv * p.m_tiles,
                                                  static_cast<int64_t>(multiprocessor_count(dev)) *
                                                      std::max(resident, 1),
                                                  blocks);
  splits = std::min({std::max<int64_t>(splits, 1), blocks, static_cast<int64_t>(kMaxSplits)});
  const int64_t chunk_blocks = (blocks + splits - 1) / splits;
  p.chunk = static_cast<int>(chunk_blocks * kCtaN);
  p.splits = static_cast<int>((blocks + chunk_blocks - 1) / chunk_blocks);

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

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kBFloat16) {
    D == 64 ? launch<__nv_bfloat16, 64>(p, q, num_splits, stream) : launch<__nv_bfloat16, 128>(p, q, num_splits, stream);
  } else {
    D == 64 ? launch<__half, 64>(p, q, num_splits, stream) : launch<__half, 128>(p, q, num_splits, stream);
  }
}

}  // namespace
}  // namespace ltengine

TORCH_LIBRARY_IMPL(ltengine, CUDA, m) { m.impl("decode", &ltengine::decode_cuda); }
