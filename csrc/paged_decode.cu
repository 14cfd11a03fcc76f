// Paged decode attention: one query token per row over a block pool, the whole batch in one launch.
//
// q [B, H_q, D]; pools [num_blocks, block_size, H_kv, D]; tables [B, MB] int32 (row b's blocks in slot
// order); n_valid [B] int32 on the device (slots [0, n) attended). A sink + window row is the same to
// this op: its valid slots are the prefix [0, min(len, sink + window)) (the ring fills from `sink`).
//
// Balanced split-K (the schedule of ltengine/kernels/paged.py's Triton kernel): every CTA derives, from
// n_valid alone, one chunk size `per` for the whole batch (total keys over the target chunks per KV
// head, at least `min_chunk`, and no row in more than kRowChunks chunks; a multiple of kCtaN) and takes
// the chunk numbered by blockIdx.x (chunks numbered in row order). A row gets chunks in proportion to
// its keys, so full-length and sink + window rows of one layer keep the GPU evenly loaded. The grid is
// fixed by (B, H_kv) alone: one CUDA graph serves any lengths. A second kernel merges each row's chunks
// (output, log2-sum-exp); a row with no keys gets zeros.
//
// Two attention kernels write the same partials:
//  * mma: bf16/fp16, D <= 128 (a multiple of 8; padded to 64 or 128 in registers). The CTA (4 warps)
//    owns (chunk, kv head, 16-query-head tile); the G query heads sharing a kv head are the M rows of
//    m16n8k16 MMAs with fp32 accumulation, so K/V are read once per kv head whatever G is. Operands are
//    16-byte vectors loaded straight into registers (the fragment layout of csrc's former contiguous
//    kernel: the reduction index of Q.K^T and the output columns of P.V are permuted so that each
//    thread's fragments are 8 consecutive d), with rotating prefetch: the next 16-key block's K is
//    requested as soon as S = Q K^T consumed this block's K, the next V once P V consumed this V. On the
//    contiguous cache this reached 99.7% of copy bandwidth on an H100; on the H200 the paged kernel
//    reaches 78-79% at the budget shapes, below the Triton kernel (bench/RESULTS.md, issue 11).
//  * simt: fp32 (exact fp32 dots, no TF32) and 16-bit D > 128. 8 lanes per key, 4 keys per warp step,
//    each lane holding NV 16-byte vectors of the row; up to GT query heads per CTA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace ltengine {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockN = 16;              // keys per warp per step (mma kernel)
constexpr int kCtaN = kWarps * kBlockN;  // chunk sizes are multiples of this
constexpr int kRowChunks = 64;           // a row is cut into at most this many chunks
constexpr int kMinChunk = 128;           // default fewest keys per chunk
constexpr int kProgramsPerSM = 16;       // default target chunks per SM (all kv heads together)

struct PagedParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* o_part;    // [H_q, n_chunks, D] fp32, normalised partial outputs
  float* lse_part;  // [H_q, n_chunks]    fp32, log2-sum-exp of each chunk (-inf if empty)
  const int32_t* tables;
  const int32_t* n_valid;
  int64_t q_sb, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, t_sb;  // element strides; last dims contiguous
  int B, H_kv, G, m_tiles, D, bs, bs_shift, MB;                   // bs_shift: log2(bs), or -1
  int tph, min_chunk, n_chunks;                                   // target chunks per kv head; grid x
  float scale_log2;  // softmax scale * log2(e): scores live in the log2 domain (exp2f)
};

__device__ __forceinline__ int load_n(const PagedParams& p, int r) {
  // Clamped to the table's capacity, so that a bad length can never index past a row's table.
  return max(0, min(__ldg(p.n_valid + r), p.MB * p.bs));
}

// Element offset of slot `t` of a row (table `tbl`) in a pool with block/slot strides sb/st.
__device__ __forceinline__ int64_t slot_offset(const PagedParams& p, const int32_t* tbl, int t, int64_t sb,
                                               int64_t st) {
  int blk, off;
  if (p.bs_shift >= 0) {
    blk = t >> p.bs_shift;
    off = t & (p.bs - 1);
  } else {
    blk = t / p.bs;
    off = t - blk * p.bs;
  }
  return static_cast<int64_t>(__ldg(tbl + blk)) * sb + static_cast<int64_t>(off) * st;
}

struct PlanSmem {
  long long sum[kWarps];
  int mx[kWarps], scan[kWarps];
  int row, first, count;
};

struct Plan {
  int per, total, row, first, count;
};

// The balanced schedule, worked out by every thread of the CTA from n_valid (all threads must call).
// chunk >= 0: find the row whose chunks contain `chunk`; else: row `row`'s first chunk and count.
__device__ Plan balanced_plan(const PagedParams& p, int chunk, int row, PlanSmem& sm) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  long long sum = 0;
  int mx = 0;
  for (int r = tid; r < p.B; r += kThreads) {
    const int n = load_n(p, r);
    sum += n;
    mx = max(mx, n);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, o);
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
  if (lane == 0) {
    sm.sum[warp] = sum;
    sm.mx[warp] = mx;
  }
  if (tid == 0) {
    sm.row = -1;
    sm.first = 0;
    sm.count = 0;
  }
  __syncthreads();
  sum = 0;
  mx = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    sum += sm.sum[w];
    mx = max(mx, sm.mx[w]);
  }
  long long per = max((sum + p.tph - 1) / p.tph, static_cast<long long>(p.min_chunk));
  per = max(per, static_cast<long long>((mx + kRowChunks - 1) / kRowChunks));
  per = (per + kCtaN - 1) / kCtaN * kCtaN;
  const int iper = static_cast<int>(per);
  int carry = 0;
  for (int t0 = 0; t0 < p.B; t0 += kThreads) {
    const int r = t0 + tid;
    const int ch = r < p.B ? (load_n(p, r) + iper - 1) / iper : 0;
    int incl = ch;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == 31) sm.scan[warp] = incl;
    __syncthreads();
    int woff = 0, tile = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      woff += w < warp ? sm.scan[w] : 0;
      tile += sm.scan[w];
    }
    incl += carry + woff;
    const int excl = incl - ch;
    const bool hit = chunk >= 0 ? (ch > 0 && excl <= chunk && chunk < incl) : (r == row);
    if (hit) {
      sm.row = r;
      sm.first = excl;
      sm.count = ch;
    }
    carry += tile;
    __syncthreads();
  }
  __syncthreads();
  return Plan{iper, carry, sm.row, sm.first, sm.count};
}

// ---------------------------------------------------------------------------------------------------
// mma kernel (bf16 / fp16)

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
};

template <typename T>
__device__ __forceinline__ T to_t(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 to_t<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half to_t<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ float to_t<float>(float x) { return x; }

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f<float>(float x) { return x; }

// 16-byte streaming load: KV is read once per step, so keep it out of L1; on an L2 miss fetch the whole
// 256-byte segment.
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

// Write one chunk's partial for query head `head`: o normalised, lse = m + log2(l) (-inf if empty).
__device__ __forceinline__ void store_partial(const PagedParams& p, int head, int chunk, int d, float o, float m,
                                              float l) {
  const int64_t part = static_cast<int64_t>(head) * p.n_chunks + chunk;
  p.o_part[part * p.D + d] = l > 0.f ? o / l : 0.f;
  if (d == 0) p.lse_part[part] = l > 0.f ? m + log2f(l) : -INFINITY;
}

// One warp's share: Q fragments, the output accumulator and the online-softmax state of query-head rows
// g and g + 8 (m in the log2 domain; l a per-thread partial sum until finish()). DP: D padded (64/128).
template <typename T, int DP>
struct WarpAttn {
  static constexpr int kChunks = DP / 32;   // 16-byte K vectors per thread per key row (2 k-steps each)
  static constexpr int kNTiles = DP / 8;    // n-tiles of P.V
  static constexpr int kVChunks = DP / 64;  // 16-byte V vectors per thread per key
  using KFrag = uint4[2][kChunks];          // rows 8u + g, d in [32i + 8c, +8)
  using VFrag = uint4[4][kVChunks];         // rows 2c + {0, 1, 8, 9}, d in [64j + 8g, +8)

  uint32_t qa[DP / 16][4];
  float acc[kNTiles][4];
  float m0, m1, l0, l1;

  __device__ __forceinline__ void init(const PagedParams& p, int b, int head0, int rows, int g, int c) {
    // Q as A fragments, one per k-step s = 2i + h: thread (g, c) holds d = 32i + 8c + 4h + {0..3}.
    const T* qb = static_cast<const T*>(p.q) + b * p.q_sb;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const uint4 zero = make_uint4(0, 0, 0, 0);
      const bool dok = 32 * i + 8 * c < p.D;
      const uint4 r0 =
          dok && g < rows ? *reinterpret_cast<const uint4*>(qb + (head0 + g) * p.q_sh + 32 * i + 8 * c) : zero;
      const uint4 r1 = dok && g + 8 < rows
                           ? *reinterpret_cast<const uint4*>(qb + (head0 + g + 8) * p.q_sh + 32 * i + 8 * c)
                           : zero;
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

  // Merge the CTA's warps through shared memory and store this chunk's partial.
  __device__ __forceinline__ void finish(const PagedParams& p, float* smem, int warp, int g, int c, int head0, int rows,
                                         int chunk) {
    constexpr int kRow = DP + 4;  // padded row (floats)
    float* sm_acc = smem;                     // [kWarps][16][kRow]
    float* sm_m = smem + kWarps * 16 * kRow;  // [kWarps][16]
    float* sm_l = sm_m + kWarps * 16;         // [kWarps][16]
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
    for (int idx = threadIdx.x; idx < rows * p.D; idx += kThreads) {
      const int row = idx / p.D, d = idx % p.D;
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
      store_partial(p, head0 + row, chunk, d, o, mmax, lsum);
    }
  }
};

template <int DP>
constexpr int epilogue_floats() {
  return kWarps * 16 * (DP + 4) + 2 * kWarps * 16;
}

// Register loads with rotating prefetch: the next 16-key block's K is requested as soon as S = Q K^T
// consumed this block's K, the next V once P V consumed this V. (A per-thread cp.async shared-memory
// ring of 3 stages measured slower on the H200, 54% vs 78% of copy bandwidth: bench/RESULTS.md, issue 11.)
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) paged_mma_kernel(const PagedParams p) {
  using W = WarpAttn<T, DP>;
  __shared__ __align__(16) float smem[epilogue_floats<DP>()];
  __shared__ PlanSmem plan_sm;
  const int chunk = blockIdx.x;
  const int mt = blockIdx.y % p.m_tiles, kvh = blockIdx.y / p.m_tiles;
  const Plan plan = balanced_plan(p, chunk, -1, plan_sm);
  if (chunk >= plan.total) return;  // uniform: past the batch's chunk count
  const int b = plan.row;
  const int start = (chunk - plan.first) * plan.per;
  const int end = min(start + plan.per, load_n(p, b));
  const int rows = min(16, p.G - mt * 16);  // valid query-head rows of this tile
  const int head0 = kvh * p.G + mt * 16;    // query head of row 0
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, c = lane & 3;  // MMA groupID (row / key / column) and thread-in-group
  W st;
  st.init(p, b, head0, rows, g, c);
  const int32_t* tbl = p.tables + b * p.t_sb;
  const T* kb = static_cast<const T*>(p.k) + kvh * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + kvh * p.v_sh;

  typename W::KFrag kr;
  typename W::VFrag vr;
  auto load_k = [&](int base) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int key = base + 8 * u + g;
      const bool ok = key < end;
      const T* ptr = kb + (ok ? slot_offset(p, tbl, key, p.k_sb, p.k_st) : 0) + 8 * c;
#pragma unroll
      for (int i = 0; i < W::kChunks; ++i)
        kr[u][i] = ok && 32 * i + 8 * c < p.D ? ldg_stream(ptr + 32 * i) : make_uint4(0, 0, 0, 0);
    }
  };
  auto load_v = [&](int base) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = base + 2 * c + (e & 1) + 8 * (e >> 1);
      const bool ok = key < end;
      const T* ptr = vb + (ok ? slot_offset(p, tbl, key, p.v_sb, p.v_st) : 0) + 8 * g;
#pragma unroll
      for (int j = 0; j < W::kVChunks; ++j)
        vr[e][j] = ok && 64 * j + 8 * g < p.D ? ldg_stream(ptr + 64 * j) : make_uint4(0, 0, 0, 0);
    }
  };

  int base = start + warp * kBlockN;
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
  st.finish(p, smem, warp, g, c, head0, rows, chunk);
}

// ---------------------------------------------------------------------------------------------------
// simt kernel (fp32; 16-bit D > 128): 8 lanes per key, lane j of a key holds vectors i * 8 + j of the row
// (VE elements each), 4 keys per warp step; each lane group runs its own online softmax, merged at the end.

template <typename T, int NV, int GT>
__global__ void __launch_bounds__(kThreads) paged_simt_kernel(const PagedParams p) {
  constexpr int VE = 16 / sizeof(T);  // elements per 16-byte vector
  constexpr int E = NV * VE;          // elements per lane
  constexpr int DPAD = E * 8;
  __shared__ float sm_acc[kWarps][GT][DPAD];
  __shared__ float sm_ml[kWarps][GT][2];
  __shared__ PlanSmem plan_sm;
  const int tile = blockIdx.x % p.m_tiles, chunk = blockIdx.x / p.m_tiles, kvh = blockIdx.y;
  const Plan plan = balanced_plan(p, chunk, -1, plan_sm);
  if (chunk >= plan.total) return;
  const int b = plan.row;
  const int start = (chunk - plan.first) * plan.per;
  const int end = min(start + plan.per, load_n(p, b));
  const int rows = min(GT, p.G - tile * GT);
  const int head0 = kvh * p.G + tile * GT;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, grp = lane / 8, j = lane % 8;
  auto dof = [&](int i) { return (i * 8 + j) * VE; };  // first d of this lane's vector i

  float q[GT][E], acc[GT][E], m[GT], l[GT];
  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb;
#pragma unroll
  for (int h = 0; h < GT; ++h) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (h < rows && dof(i) < p.D) raw = *reinterpret_cast<const uint4*>(qb + (head0 + h) * p.q_sh + dof(i));
      const T* el = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int t = 0; t < VE; ++t) q[h][i * VE + t] = to_f(el[t]) * p.scale_log2;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) acc[h][e] = 0.f;
    m[h] = -INFINITY;
    l[h] = 0.f;
  }
  const int32_t* tbl = p.tables + b * p.t_sb;
  const T* kb = static_cast<const T*>(p.k) + kvh * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + kvh * p.v_sh;
  uint4 kr[NV], vr[NV];
  auto load = [&](int key) {
    const int64_t ko = slot_offset(p, tbl, key, p.k_sb, p.k_st), vo = slot_offset(p, tbl, key, p.v_sb, p.v_st);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const bool ok = dof(i) < p.D;
      kr[i] = ok ? ldg_stream(kb + ko + dof(i)) : make_uint4(0, 0, 0, 0);
      vr[i] = ok ? ldg_stream(vb + vo + dof(i)) : make_uint4(0, 0, 0, 0);
    }
  };
  int key = start + warp * 4 + grp;
  if (key < end) load(key);
  for (; key < end; key += 4 * kWarps) {
    float kf[E], vf[E];
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const T* ke = reinterpret_cast<const T*>(&kr[i]);
      const T* ve = reinterpret_cast<const T*>(&vr[i]);
#pragma unroll
      for (int t = 0; t < VE; ++t) {
        kf[i * VE + t] = to_f(ke[t]);
        vf[i * VE + t] = to_f(ve[t]);
      }
    }
    if (key + 4 * kWarps < end) load(key + 4 * kWarps);  // keep the next key in flight
#pragma unroll
    for (int h = 0; h < GT; ++h) {
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) s = fmaf(q[h][e], kf[e], s);
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      s += __shfl_xor_sync(0xffffffffu, s, 4);
      const float mn = fmaxf(m[h], s);  // s is finite: mn is too
      const float corr = exp2f(m[h] - mn), pe = exp2f(s - mn);
      l[h] = l[h] * corr + pe;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[h][e] = fmaf(acc[h][e], corr, pe * vf[e]);
      m[h] = mn;
    }
  }
  // Merge the warp's 4 lane groups (lanes j, j + 8, j + 16, j + 24 hold the same d).
#pragma unroll
  for (int h = 0; h < GT; ++h) {
#pragma unroll
    for (int o = 8; o < 32; o <<= 1) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[h], o), lo = __shfl_xor_sync(0xffffffffu, l[h], o);
      const float mn = fmaxf(m[h], mo);
      const float ref = mn == -INFINITY ? 0.f : mn;
      const float cs = exp2f(m[h] - ref), co = exp2f(mo - ref);
      l[h] = l[h] * cs + lo * co;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[h][e], o);
        acc[h][e] = acc[h][e] * cs + ao * co;
      }
      m[h] = mn;
    }
    if (grp == 0) {
#pragma unroll
      for (int i = 0; i < NV; ++i)
#pragma unroll
        for (int t = 0; t < VE; ++t) sm_acc[warp][h][dof(i) + t] = acc[h][i * VE + t];
      if (j == 0) {
        sm_ml[warp][h][0] = m[h];
        sm_ml[warp][h][1] = l[h];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < rows * p.D; idx += kThreads) {
    const int h = idx / p.D, d = idx % p.D;
    float mmax = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mmax = fmaxf(mmax, sm_ml[w][h][0]);
    float lsum = 0.f, o = 0.f;
    if (mmax != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = exp2f(sm_ml[w][h][0] - mmax);
        lsum += sm_ml[w][h][1] * f;
        o += sm_acc[w][h][d] * f;
      }
    }
    store_partial(p, head0 + h, chunk, d, o, mmax, lsum);
  }
}

// ---------------------------------------------------------------------------------------------------
// Merge row b's chunks: out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M); a row with no key -> 0.
template <typename T>
__global__ void __launch_bounds__(kThreads) paged_combine_kernel(const PagedParams p) {
  __shared__ PlanSmem plan_sm;
  __shared__ float w[kRowChunks];
  const int b = blockIdx.x, head = blockIdx.y;
  const Plan plan = balanced_plan(p, -1, b, plan_sm);
  const int count = plan.count;  // <= kRowChunks: per >= cdiv(max n, kRowChunks)
  const float* lse = p.lse_part + static_cast<int64_t>(head) * p.n_chunks + plan.first;
  for (int s = threadIdx.x; s < count; s += kThreads) w[s] = lse[s];
  __syncthreads();
  float mx = -INFINITY;
  for (int s = 0; s < count; ++s) mx = fmaxf(mx, w[s]);
  const float ref = mx == -INFINITY ? 0.f : mx;
  __syncthreads();
  for (int s = threadIdx.x; s < count; s += kThreads) w[s] = exp2f(w[s] - ref);
  __syncthreads();
  const float* part = p.o_part + (static_cast<int64_t>(head) * p.n_chunks + plan.first) * p.D;
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.H_kv * p.G + head) * p.D;
  for (int d = threadIdx.x; d < p.D; d += kThreads) {
    float wsum = 0.f, o = 0.f;
#pragma unroll 8
    for (int s = 0; s < count; ++s) {
      wsum += w[s];
      o = fmaf(w[s], part[static_cast<int64_t>(s) * p.D + d], o);
    }
    out[d] = to_t<T>(wsum > 0.f ? o / wsum : 0.f);
  }
}

// ---------------------------------------------------------------------------------------------------
// host side

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

template <typename T, int DP>
void launch_mma(PagedParams& p, cudaStream_t stream) {
  p.m_tiles = (p.G + 15) / 16;
  const dim3 grid(static_cast<unsigned>(p.n_chunks), static_cast<unsigned>(p.H_kv * p.m_tiles));
  paged_mma_kernel<T, DP><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int NV, int GT>
void launch_simt(PagedParams& p, cudaStream_t stream) {
  p.m_tiles = (p.G + GT - 1) / GT;
  const dim3 grid(static_cast<unsigned>(p.n_chunks * p.m_tiles), static_cast<unsigned>(p.H_kv));
  paged_simt_kernel<T, NV, GT><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Heads per CTA: the group padded to 1/2/4, with at most 64 fp32 registers of q (and as many of acc) per
// thread, and one head for 32-element lanes (two spilled there).
template <typename T, int NV>
void dispatch_gt(PagedParams& p, cudaStream_t stream) {
  constexpr int E = NV * (16 / static_cast<int>(sizeof(T)));
  constexpr int kMaxGT = E >= 32 ? 1 : 64 / E >= 4 ? 4 : 2;
  const int want = p.G >= 4 ? 4 : p.G >= 2 ? 2 : 1;
  const int gt = want < kMaxGT ? want : kMaxGT;
  if (gt == 4) {
    if constexpr (kMaxGT >= 4) launch_simt<T, NV, 4>(p, stream);
  } else if (gt == 2) {
    if constexpr (kMaxGT >= 2) launch_simt<T, NV, 2>(p, stream);
  } else {
    launch_simt<T, NV, 1>(p, stream);
  }
}

template <typename T>
void dispatch_simt(PagedParams& p, cudaStream_t stream) {
  constexpr int VE = 16 / static_cast<int>(sizeof(T));
  const int vectors = (p.D + VE - 1) / VE;  // per row
  if constexpr (sizeof(T) == 2) {  // 16-bit rows come here only for D in (128, 256]: 17-32 vectors
    dispatch_gt<T, 4>(p, stream);
  } else if (vectors <= 8) {
    dispatch_gt<T, 1>(p, stream);
  } else if (vectors <= 16) {
    dispatch_gt<T, 2>(p, stream);
  } else if (vectors <= 32) {
    dispatch_gt<T, 4>(p, stream);
  } else {
    dispatch_gt<T, 8>(p, stream);
  }
}

template <typename T>
void launch_combine(PagedParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.B), static_cast<unsigned>(p.H_kv * p.G));
  paged_combine_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_pool_strides(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(3) == 1, "paged_decode: ", name, " needs a contiguous last dim, got strides ", t.strides());
  const int64_t es = t.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * es) % 16 == 0 &&
                  (t.stride(1) * es) % 16 == 0 && (t.stride(2) * es) % 16 == 0,
              "paged_decode: ", name, " needs a 16-byte aligned pointer and strides, got strides ", t.strides());
}

}  // namespace

at::Tensor paged_decode_cuda(const at::Tensor& q_in, const at::Tensor& k_pool, const at::Tensor& v_pool,
                             const at::Tensor& tables, const at::Tensor& n_valid, double scale, int64_t programs,
                             int64_t min_chunk) {
  TORCH_CHECK(q_in.is_cuda(), "paged_decode (CUDA): q must be on a CUDA device, got ", q_in.device());
  TORCH_CHECK(k_pool.device() == q_in.device() && v_pool.device() == q_in.device() &&
                  tables.device() == q_in.device() && n_valid.device() == q_in.device(),
              "paged_decode: q, k_pool, v_pool, tables and n_valid must be on one device; got ", q_in.device(), ", ",
              k_pool.device(), ", ", v_pool.device(), ", ", tables.device(), ", ", n_valid.device());
  const auto dt = q_in.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat,
              "paged_decode (CUDA): dtype must be bfloat16, float16 or float32, got ", dt);
  TORCH_CHECK(k_pool.scalar_type() == dt && v_pool.scalar_type() == dt,
              "paged_decode: q, k_pool and v_pool must share one dtype; got ", dt, ", ", k_pool.scalar_type(), ", ",
              v_pool.scalar_type());
  TORCH_CHECK(q_in.dim() == 3 && k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(),
              "paged_decode: need q [B, H_q, D] and k_pool, v_pool [num_blocks, block_size, H_kv, D] of one shape; "
              "got q ", q_in.sizes(), ", k_pool ", k_pool.sizes(), ", v_pool ", v_pool.sizes());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t NB = k_pool.size(0), BS = k_pool.size(1), Hkv = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == D, "paged_decode: q head dim ", D, " != pool head dim ", k_pool.size(3));
  TORCH_CHECK(D >= 8 && D <= 256 && D % 8 == 0, "paged_decode (CUDA): head dim must be a multiple of 8 in [8, 256], got ",
              D);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "paged_decode: H_q=", Hq, " is not a multiple of H_kv=", Hkv);
  TORCH_CHECK(BS >= 1 && NB >= 1, "paged_decode: empty pool ", k_pool.sizes());
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && tables.scalar_type() == at::kInt && tables.stride(1) == 1,
              "paged_decode: tables must be int32 [B=", B, ", MB] with a contiguous last dim; got ", tables.scalar_type(),
              " ", tables.sizes());
  TORCH_CHECK(n_valid.dim() == 1 && n_valid.size(0) == B && n_valid.scalar_type() == at::kInt &&
                  n_valid.is_contiguous(),
              "paged_decode: n_valid must be a contiguous int32 [B=", B, "]; got ", n_valid.scalar_type(), " ",
              n_valid.sizes());
  TORCH_CHECK(tables.size(1) >= 1 && tables.size(1) * BS < (int64_t{1} << 31), "paged_decode: table width ",
              tables.size(1), " x block size ", BS, " out of range");
  TORCH_CHECK(Hq / Hkv <= 65535 / Hkv && B < (1 << 20), "paged_decode: sizes too large: q ", q_in.sizes());
  TORCH_CHECK(programs >= 0 && min_chunk >= 0, "paged_decode: programs and min_chunk must be >= 0 (0: default), got ",
              programs, ", ", min_chunk);
  check_pool_strides(k_pool, "k_pool");
  check_pool_strides(v_pool, "v_pool");
  const at::Tensor q = q_in.stride(2) == 1 && (q_in.stride(1) * q_in.element_size()) % 16 == 0 &&
                               (q_in.stride(0) * q_in.element_size()) % 16 == 0 &&
                               reinterpret_cast<uintptr_t>(q_in.data_ptr()) % 16 == 0
                           ? q_in
                           : q_in.contiguous();
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  if (B == 0 || Hq == 0) return out;
  const c10::cuda::CUDAGuard guard(q.device());

  PagedParams p{};
  p.q = q.data_ptr();
  p.k = k_pool.data_ptr();
  p.v = v_pool.data_ptr();
  p.out = out.data_ptr();
  p.tables = tables.data_ptr<int32_t>();
  p.n_valid = n_valid.data_ptr<int32_t>();
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.k_sb = k_pool.stride(0);
  p.k_st = k_pool.stride(1);
  p.k_sh = k_pool.stride(2);
  p.v_sb = v_pool.stride(0);
  p.v_st = v_pool.stride(1);
  p.v_sh = v_pool.stride(2);
  p.t_sb = tables.stride(0);
  p.B = static_cast<int>(B);
  p.H_kv = static_cast<int>(Hkv);
  p.G = static_cast<int>(Hq / Hkv);
  p.D = static_cast<int>(D);
  p.bs = static_cast<int>(BS);
  p.bs_shift = (BS & (BS - 1)) == 0 ? __builtin_ctzll(static_cast<unsigned long long>(BS)) : -1;
  p.MB = static_cast<int>(tables.size(1));
  const int64_t progs = programs > 0 ? programs : int64_t{kProgramsPerSM} * multiprocessor_count(q.get_device());
  p.tph = static_cast<int>(std::max<int64_t>(1, (progs + Hkv - 1) / Hkv));
  const int64_t mc = min_chunk > 0 ? min_chunk : kMinChunk;
  p.min_chunk = static_cast<int>(std::min<int64_t>((mc + kCtaN - 1) / kCtaN * kCtaN, int64_t{1} << 30));
  p.n_chunks = p.tph + p.B;  // sum over rows of cdiv(n, per) <= total / per + B <= tph + B
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor o_part = at::empty({Hq, p.n_chunks, D}, f32);
  at::Tensor lse_part = at::empty({Hq, p.n_chunks}, f32);
  p.o_part = o_part.data_ptr<float>();
  p.lse_part = lse_part.data_ptr<float>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (dt == at::kFloat) {
    dispatch_simt<float>(p, stream);
    launch_combine<float>(p, stream);
  } else if (dt == at::kBFloat16) {
    if (D <= 64) launch_mma<__nv_bfloat16, 64>(p, stream);
    else if (D <= 128) launch_mma<__nv_bfloat16, 128>(p, stream);
    else dispatch_simt<__nv_bfloat16>(p, stream);
    launch_combine<__nv_bfloat16>(p, stream);
  } else {
    if (D <= 64) launch_mma<__half, 64>(p, stream);
    else if (D <= 128) launch_mma<__half, 128>(p, stream);
    else dispatch_simt<__half>(p, stream);
    launch_combine<__half>(p, stream);
  }
  return out;
}

}  // namespace ltengine

TORCH_LIBRARY_IMPL(ltengine, CUDA, m) { m.impl("paged_decode", &ltengine::paged_decode_cuda); }
