// Paged decode attention: one query token per row over a block pool, the whole batch in one launch.
//
// q [B, H_q, D]; pools [num_blocks, block_size, H_kv, D]; tables [B, MB] int32 (row b's blocks in slot
// order); n_valid [B] int32 on the device (slots [0, n) attended). A sink + window row is the same to
// this op: its valid slots are the prefix [0, min(len, sink + window)) (the ring fills from `sink`).
// fp8 pools (float8_e4m3fn) come with per-row fp32 scales [num_blocks, block_size, H_kv]: a key's scale
// multiplies its score, a value's scale its probability (ltengine/kernels/paged.py, fp8.py).
//
// Balanced split-K: every warp derives, from n_valid alone, one chunk size `per` for the whole batch
// (at least `min_chunk`, no row in more than kRowChunks chunks, a multiple of kCtaN); chunks are numbered
// in row order, so a row gets chunks in proportion to its keys and full-length and sink + window rows of
// one layer keep the GPU evenly loaded. The grid is one wave of resident CTAs per kv head (p.slots, from
// the occupancy the host reads), each looping over chunks blockIdx.y, + gridDim.y, ...: no CTA is launched
// only to find it has no work, and the time is about waves x (per + a chunk's fixed cost), so `per` is
// chosen for whole waves (balanced_plan: the cheapest wave count, then the smallest size that fits it),
// which is where this schedule parts from the Triton kernel's (ltengine/kernels/paged.py: total keys over
// a fixed target). The grid is fixed by (B, H_kv) alone: one CUDA graph serves any lengths. A second
// kernel merges each row's chunks (output, log2-sum-exp), a CTA per (row, query head) or, for many short
// rows, a warp, working out the row's chunks from n_valid as the first does; a row with no keys gets zeros.
// (Merging in the attention kernel instead, by the last CTA of each row, was measured slower where a row
// has many chunks: one SM then reads all of them, 88 KB at 1x8k, +5-8 us; bench/RESULTS.md, session 9.)
// The combine kernel is launched with programmatic dependent launch (device.h): the attention kernel lets
// it launch at once, so its CTAs work out their rows' chunks and wait on the SMs (griddepcontrol.wait)
// instead of behind a launch gap, and it lets the next kernel (the output projection: skinny_linear, or the
// next layer's attention) launch. With `overlap` the attention kernel is launched that way too: its
// prologue (n_valid, the schedule, each warp's first block-table entry) runs while the previous kernel
// finishes, and it waits before reading q, the pools or writing partials. That is for callers whose
// tables and n_valid are not being written while the previous kernel runs (the paged runner's step).
//
// Two attention kernels write the same partials:
//  * mma: bf16/fp16 pools (D a multiple of 8) and fp8 pools (D a multiple of 16), D <= 256 padded to 64,
//    128 or 256. The CTA (4 warps) owns (chunk, kv head, 16-query-head tile); the G query heads sharing
//    a kv head are the M rows of m16n8k16 MMAs with fp32 accumulation, so K/V are read once per kv
//    head whatever G is. Each warp streams its own 16 keys per step through an S-stage cp.async ring in
//    shared memory (16-byte copies straight from the pool's blocks, zero-filled past the row's end; one
//    table read per step where the block size is a multiple of 16), so S - 1 steps of K and V are in
//    flight while it computes; fragments are read back with 16-byte (8-byte for fp8) shared loads from
//    swizzled rows, conflict-free (but for fp8 at D <= 64: 2-way). The reduction index of Q.K^T and the
//    output columns of P.V are permuted so that a thread's operands are 8 consecutive d. fp8 pools run
//    fp16 MMAs: e4m3 converts to fp16 exactly (cvt.f16x2.e4m3x2); an fp16 q is read as is, a bf16 / fp32
//    q pre-scaled by the softmax scale and rounded to fp16 (saturating); P times a value's scale enters
//    the P.V MMA times 2^8, so small-magnitude rows stay normal fp16.
//  * simt: fp32 (exact fp32 dots, no TF32). 8 lanes per key, 4 keys per warp step, each lane holding NV
//    16-byte vectors of the row; up to GT query heads per CTA; warp-uniform loop bounds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <type_traits>

#include "check.h"
#include "device.h"
#include "ptx.h"

namespace ltengine {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockN = 16;              // keys per warp per step (mma kernel)
constexpr int kCtaN = kWarps * kBlockN;  // chunk sizes are multiples of this (a CTA's step; 16 measured worse:
                                         // a CTA's time is its steps, bench/RESULTS.md session 12)
constexpr int kRowChunks = 64;           // a row is cut into at most this many chunks
constexpr int kMinChunk = 128;           // default fewest keys per chunk
constexpr int kProgramsPerSM = 12;       // default most chunks per SM (all kv heads together), in whole waves
constexpr int kChunkCost = 2 * kCtaN;    // a chunk's fixed cost (plan, first loads, epilogue), in keys
constexpr float kFp8PvMul = 256.f;       // fp8 pools: P * v_scale is scaled by this in the fp16 MMA (update())

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
  int tph, min_chunk, n_chunks;  // most chunks per kv head (the cap); the grid's chunk dimension (plan_split)
  int slots;                      // CTAs resident at once per (kv head, head tile): one wave
  float score_mul;   // multiplies a raw score into the log2 domain (exp2f): scale * log2(e), or log2(e)
                     // where q was pre-scaled (fp8 pools)
  float q_mul;       // multiplies q as it is converted to the MMA type (fp8 pools: the softmax scale)
  const float* k_scale;  // fp8 pools: [NB, BS, H_kv] fp32 per-row scales (strides s_sb, s_st), else null
  const float* v_scale;
  int64_t s_sb, s_st;
};

__device__ __forceinline__ int load_n(const PagedParams& p, int r) {
  // Clamped to the table's capacity, so that a bad length can never index past a row's table.
  return max(0, min(__ldg(p.n_valid + r), p.MB * p.bs));
}

// Block id and offset of slot `t` of a row whose table is `tbl`.
__device__ __forceinline__ void slot_of(const PagedParams& p, const int32_t* tbl, int t, int& blk, int& off) {
  int i;
  if (p.bs_shift >= 0) {
    i = t >> p.bs_shift;
    off = t & (p.bs - 1);
  } else {
    i = t / p.bs;
    off = t - i * p.bs;
  }
  blk = __ldg(tbl + i);
}

struct Plan {
  int per, total;  // the chunk size; the batch's chunks per kv head
};

struct Where {
  int row, first;  // the row whose chunks contain a chunk; that row's first chunk
};

__device__ __forceinline__ int warp_sum(int x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ceil(a / b) for a >= 0, b >= 1; 32-bit division where a fits (a 64-bit one is a long subroutine).
__device__ __forceinline__ int cdiv_pos(long long a, int b) {
  if (a <= 0x7fffffffLL) {
    const unsigned ua = static_cast<unsigned>(a), ub = static_cast<unsigned>(b);
    return static_cast<int>(ua / ub + (ua % ub != 0u));
  }
  return static_cast<int>((a + b - 1) / b);
}

// The lengths as one warp reads them: lane l holds rows l, l + 32, ...; the first 32 stay in a register.
struct Lengths {
  int n0;  // row `lane`'s length (0 past B)
  __device__ __forceinline__ int at(const PagedParams& p, int r) const {  // r = lane + 32 k
    return r < 32 ? n0 : load_n(p, r);
  }
  // Chunks of `per` keys the whole batch takes, sum over rows of cdiv(n, per); every lane gets it.
  __device__ __forceinline__ int chunks(const PagedParams& p, int per) const {
    int ch = 0;
    for (int r = threadIdx.x & 31; r < p.B; r += 32) ch += (at(p, r) + per - 1) / per;
    return warp_sum(ch);
  }
};

__device__ __forceinline__ Lengths lengths_of(const PagedParams& p) {
  const int lane = threadIdx.x & 31;
  return Lengths{lane < p.B ? load_n(p, lane) : 0};
}

// The row of chunk `chunk` (chunks numbered in row order, row r taking cdiv(n_r, per)): an inclusive scan
// of the rows' chunk counts, 32 rows at a time; row -1 past the last.
__device__ __forceinline__ Where locate(const PagedParams& p, const Lengths& len, int per, int chunk) {
  const int lane = threadIdx.x & 31;
  Where w{-1, 0};
  int carry = 0;
  for (int t0 = 0; t0 < p.B; t0 += 32) {  // warp-uniform
    const int r = t0 + lane;
    const int ch = r < p.B ? (len.at(p, r) + per - 1) / per : 0;
    int incl = ch;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    incl += carry;
    const int excl = incl - ch;
    const unsigned hit = __ballot_sync(0xffffffffu, ch > 0 && excl <= chunk && chunk < incl);
    if (hit) {
      const int src = __ffs(hit) - 1;
      w.row = t0 + src;
      w.first = __shfl_sync(0xffffffffu, excl, src);
      break;
    }
    carry = __shfl_sync(0xffffffffu, incl, 31);
  }
  return w;
}

// The balanced schedule, worked out by each warp alone from n_valid (lane-strided rows and shuffles: no
// shared memory, no barrier; every warp of every CTA computes the same plan): the chunk size `per` and
// the batch's chunk count.
//
// `per` is a multiple of kCtaN, >= min_chunk, and puts no row in more than kRowChunks chunks. The grid is
// one wave of p.slots CTAs per kv head, each taking chunks y, y + slots, ...; so the time is about waves x
// (per + kChunkCost), waves = ceil(chunks / slots): for each wave count w up to the cap tph, the size
// that fits w waves by construction (sum / per + rows with keys <= w x slots) is counted exactly and
// costed by the waves its chunks fill, the cheapest taken, then shrunk by a binary search to the smallest
// size whose chunk count still fits those waves. Where a wave cannot hold every row's last partial chunk
// the count becomes up to sum / (T / 2) + B, inside the partials' tph + B.
__device__ Plan balanced_plan(const PagedParams& p, const Lengths& len) {
  const int lane = threadIdx.x & 31;
  long long sum = 0;
  int mx = 0, nz = 0;
  for (int r = lane; r < p.B; r += 32) {
    const int n = len.at(p, r);
    sum += n;
    mx = max(mx, n);
    nz += n > 0;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, o);
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    nz += __shfl_xor_sync(0xffffffffu, nz, o);
  }
  const int floor_per = (max(p.min_chunk, (mx + kRowChunks - 1) / kRowChunks) + kCtaN - 1) / kCtaN * kCtaN;
  const int slots = max(1, p.slots), waves_cap = (p.tph + slots - 1) / slots;
  auto fit_of = [&](int t) { return max(t - nz, (t + 1) / 2); };  // chunks of keys that fit t with the tails
  int target = p.tph, per = floor_per, count = 0;
  float best = -1.f;
  for (int w = 1; w <= waves_cap; ++w) {  // warp-uniform
    const int t = min(w * slots, p.tph);
    const int size = max(cdiv_pos(cdiv_pos(sum, fit_of(t)), kCtaN) * kCtaN, floor_per);  // fits t
    const int n = len.chunks(p, size);
    const int waves = max(1, (n + slots - 1) / slots);  // (>= 1: all rows may be empty)
    const float cost = static_cast<float>(waves) * static_cast<float>(size + kChunkCost);
    if (best < 0.f || cost < best) {
      best = cost;
      target = min(waves * slots, p.tph);
      per = size;
      count = n;
    }
    if (size == floor_per) break;  // more waves cannot shrink the chunks further
  }
  // the smallest size whose chunks still fit `target` (per fits it; nothing under sum / target does)
  int lo = max(cdiv_pos(sum, target), floor_per) / kCtaN, hi = per / kCtaN;
  lo = min(lo, hi);
  while (lo < hi) {  // warp-uniform
    const int mid = (lo + hi) / 2;
    const int n = len.chunks(p, mid * kCtaN);
    if (n <= target) {
      hi = mid;
      count = n;
    } else {
      lo = mid + 1;
    }
  }
  return Plan{hi * kCtaN, count};
}

// Row b's chunks as the attention kernel numbers them: the first (the chunks of rows < b) and the count, by
// a warp from n_valid and the plan (the combine kernels: before their griddepcontrol.wait, where the
// attention kernel's prologue reads the same).
__device__ __forceinline__ void row_chunks(const PagedParams& p, int b, int& first, int& count) {
  const Lengths len = lengths_of(p);
  const int per = balanced_plan(p, len).per;
  int before = 0;
  for (int r = threadIdx.x & 31; r < b; r += 32) before += (len.at(p, r) + per - 1) / per;
  first = warp_sum(before);
  count = (load_n(p, b) + per - 1) / per;
}

// ---------------------------------------------------------------------------------------------------
// element types

// Clamp to fp16's finite range (a converted q: saturates instead of becoming inf, then NaN).
__device__ __forceinline__ float sat16(float x) { return fminf(fmaxf(x, -65504.f), 65504.f); }

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// 16-byte streaming load (the simt kernel): KV is read once per step, so keep it out of L1.
__device__ __forceinline__ uint4 ldg_stream(const void* ptr) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(ptr));
  return r;
}

// cp.async of 4 bytes (cp16 and the rest: ptx.h), cached in L1.
__device__ __forceinline__ void cp4(void* dst, const void* src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(ok ? 4 : 0));
}

// 8 e4m3 bytes -> 8 fp16 (exact).
__device__ __forceinline__ uint4 fp8x8_to_half(uint2 raw) {
  uint4 out;
  uint32_t* o = reinterpret_cast<uint32_t*>(&out);
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const uint32_t src = w < 2 ? raw.x : raw.y;
    const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>((src >> (16 * (w & 1))) & 0xffffu);
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
    o[w] = static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// shared-memory tiles: one warp's 16 keys of K and V (and an fp8 pool's scales), rows swizzled so that
// the fragment reads below are free of bank conflicts

// 16-bit pools: rows of DP elements in 16-byte units (8 elements). K is read as (row 8u + g, unit
// 4i + c), V as (row 2c + e, unit 8j + g): XOR-ing bit 2 of a K unit with the row's bit 0, and bits 1-2
// of a V unit with the row's bits 1-2, gives the 8 lanes of each 16-byte load phase distinct banks.
template <int DP>
struct Tile16 {
  static constexpr bool kFp8 = false;
  static constexpr int kRow = DP * 2;               // bytes per row
  static constexpr int kUnits = kRow / 16;          // 16-byte units per row
  static constexpr int kBytes = 2 * 16 * kRow;      // K rows, then V rows
  static constexpr int kScales = kBytes;            // (unused)
  static __device__ __forceinline__ int k_at(int r, int u) { return r * kRow + ((u ^ ((r & 1) << 2)) << 4); }
  static __device__ __forceinline__ int v_at(int r, int u) {
    return 16 * kRow + r * kRow + ((u ^ (((r >> 1) & 3) << 1)) << 4);
  }
  // 8 consecutive elements (d0 a multiple of 8) of K / V row r, as the MMA's type.
  static __device__ __forceinline__ uint4 k_vec(const unsigned char* t, int r, int d0) {
    return *reinterpret_cast<const uint4*>(t + k_at(r, d0 >> 3));
  }
  static __device__ __forceinline__ uint4 v_vec(const unsigned char* t, int r, int d0) {
    return *reinterpret_cast<const uint4*>(t + v_at(r, d0 >> 3));
  }
};

// fp8 pools: rows of DP bytes in 32-byte granules, read as 8-byte pieces; the granule index is XOR-ed
// with the row's low bits (K) or bits 1-2 (V), which spreads each 8-byte phase over all 32 banks
// (DP 128, 256; at DP 64 a row is 64 bytes and the phases are 2-way conflicted: a known cost, not fixed).
template <int DP>
struct Tile8 {
  static constexpr bool kFp8 = true;
  static constexpr int kRow = DP;
  static constexpr int kUnits = kRow / 16;
  static constexpr int kMask = (DP / 32 >= 4 ? 4 : DP / 32) - 1;
  static constexpr int kScales = 2 * 16 * kRow;     // then 16 key scales and 16 value scales (fp32)
  static constexpr int kBytes = kScales + 2 * 16 * 4;
  static __device__ __forceinline__ int k_byte(int r, int b) { return r * kRow + ((((b >> 5) ^ (r & kMask))) << 5) + (b & 31); }
  static __device__ __forceinline__ int v_byte(int r, int b) {
    return 16 * kRow + r * kRow + ((((b >> 5) ^ ((r >> 1) & kMask))) << 5) + (b & 31);
  }
  static __device__ __forceinline__ int k_at(int r, int u) { return k_byte(r, u << 4); }
  static __device__ __forceinline__ int v_at(int r, int u) { return v_byte(r, u << 4); }
  static __device__ __forceinline__ uint4 k_vec(const unsigned char* t, int r, int d0) {
    return fp8x8_to_half(*reinterpret_cast<const uint2*>(t + k_byte(r, d0)));
  }
  static __device__ __forceinline__ uint4 v_vec(const unsigned char* t, int r, int d0) {
    return fp8x8_to_half(*reinterpret_cast<const uint2*>(t + v_byte(r, d0)));
  }
};

// Write one chunk's partial for query head `head`: o normalised, lse = m + log2(l) (-inf if empty).
__device__ __forceinline__ void store_partial(const PagedParams& p, int head, int chunk, int d, float o, float m,
                                              float l) {
  const int64_t part = static_cast<int64_t>(head) * p.n_chunks + chunk;
  p.o_part[part * p.D + d] = l > 0.f ? o / l : 0.f;
  if (d == 0) p.lse_part[part] = l > 0.f ? m + log2f(l) : -INFINITY;
}

// One warp's share: Q fragments, the output accumulator and the online-softmax state of query-head rows
// g and g + 8 (m in the log2 domain; l a per-thread partial sum until finish()). DP: D padded (64/128/256).
template <typename T, int DP>
struct WarpAttn {
  static constexpr int kChunks = DP / 32;   // K vectors per thread per key row (2 k-steps each)
  static constexpr int kNTiles = DP / 8;    // n-tiles of P.V
  static constexpr int kVChunks = DP / 64;  // V vectors per thread per key

  uint32_t qa[DP / 16][4];
  float acc[kNTiles][4];
  float m0, m1, l0, l1;

  // Q as A fragments, one per k-step s = 2i + h: thread (g, c) holds d = 32i + 8c + 4h + {0..3}. TQ: q's
  // storage type; kConvert (fp8 pools): converted to the MMA type times p.q_mul, else read as it is.
  template <typename TQ, bool kConvert>
  __device__ __forceinline__ void init(const PagedParams& p, int b, int head0, int rows, int g, int c) {
    const TQ* qb = static_cast<const TQ*>(p.q) + b * p.q_sb;
    auto load = [&](int row, int d0) -> uint4 {
      uint4 r = make_uint4(0, 0, 0, 0);
      if (row >= rows || d0 >= p.D) return r;
      const TQ* src = qb + (head0 + row) * p.q_sh + d0;
      if constexpr (!kConvert) {
        static_assert(std::is_same_v<TQ, T>, "q is read as the MMA type");
        r = *reinterpret_cast<const uint4*>(src);
      } else {
        uint32_t* w = reinterpret_cast<uint32_t*>(&r);
#pragma unroll
        for (int e = 0; e < 4; ++e) w[e] = Mma<T>::pack(sat16(to_f(src[2 * e]) * p.q_mul), sat16(to_f(src[2 * e + 1]) * p.q_mul));
      }
      return r;
    };
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const uint4 r0 = load(g, 32 * i + 8 * c), r1 = load(g + 8, 32 * i + 8 * c);
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

  // S = Q K^T for the tile's keys [0, 8) (u = 0) and [8, 16) (u = 1);
  // thread holds S[row g | g + 8][key 8u + 2c + {0, 1}]. Padding columns of K are zeros.
  template <typename Tile>
  __device__ __forceinline__ void scores(const unsigned char* tile, float (&s)[2][4], int g, int c) const {
#pragma unroll
    for (int u = 0; u < 2; ++u) s[u][0] = s[u][1] = s[u][2] = s[u][3] = 0.f;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const uint4 kr = Tile::k_vec(tile, 8 * u + g, 32 * i + 8 * c);
#pragma unroll
        for (int h = 0; h < 2; ++h) Mma<T>::run(s[u], qa[2 * i + h], word(kr, 2 * h), word(kr, 2 * h + 1));
      }
    }
  }

  // Online softmax over the tile's scores, then acc += P V. Keys >= end are masked; fp8 tiles weight a
  // key's score by its scale and its probability by its value's scale (l sums the unweighted ones).
  template <typename Tile>
  __device__ __forceinline__ void update(float (&s)[2][4], const unsigned char* tile, int base, int end, int g,
                                         int c, float mul) {
    const float* ks = reinterpret_cast<const float*>(tile + Tile::kScales);
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = 8 * u + 2 * c + e;
        const bool ok = base + key < end;
        const float f = Tile::kFp8 ? mul * ks[key] : mul;
        s[u][e] = ok ? s[u][e] * f : -INFINITY;
        s[u][2 + e] = ok ? s[u][2 + e] * f : -INFINITY;
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
    if constexpr (Tile::kFp8) {
      // p * v_scale goes into the fp16 MMA times kFp8PvMul (finish() divides it out): v_scale = amax / 448,
      // so without it a row of amax < ~1 puts p * v_scale under fp16's smallest normal (6.1e-5), where it
      // keeps only a few bits or flushes to zero; 2^8 is exact, and overflows only past amax ~ 1.1e5.
      const float* vs = ks + 16;
#pragma unroll
      for (int u = 0; u < 2; ++u) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float w = vs[8 * u + 2 * c + e] * kFp8PvMul;
          ps[u][e] *= w;
          ps[u][2 + e] *= w;
        }
      }
    }
    // The S accumulator layout of the two n-tiles is the A layout of P (FlashAttention-2 register reuse).
    const uint32_t pa[4] = {Mma<T>::pack(ps[0][0], ps[0][1]), Mma<T>::pack(ps[0][2], ps[0][3]),
                            Mma<T>::pack(ps[1][0], ps[1][1]), Mma<T>::pack(ps[1][2], ps[1][3])};
    if (__any_sync(0xffffffffu, corr0 != 1.f || corr1 != 1.f)) {  // a row's max grew (rare after a few steps)
#pragma unroll
      for (int t = 0; t < kNTiles; ++t) {
        acc[t][0] *= corr0;
        acc[t][1] *= corr0;
        acc[t][2] *= corr1;
        acc[t][3] *= corr1;
      }
    }
#pragma unroll
    for (int j = 0; j < kVChunks; ++j) {
      // keys 2c + {0, 1, 8, 9}, d in [64j + 8g, +8)
      uint4 vr[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) vr[e] = Tile::v_vec(tile, 2 * c + (e & 1) + 8 * (e >> 1), 64 * j + 8 * g);
#pragma unroll
      for (int tt = 0; tt < 8; ++tt) {
        // n-tile t = 8j + tt, column g <-> d = 64j + 8g + tt: element tt of V vector j.
        const int w = tt / 2;
        const uint32_t sel = (tt % 2) ? 0x7632u : 0x5410u;  // high or low halves of the two keys
        const uint32_t b0 = __byte_perm(word(vr[0], w), word(vr[1], w), sel);
        const uint32_t b1 = __byte_perm(word(vr[2], w), word(vr[3], w), sel);
        Mma<T>::run(acc[8 * j + tt], pa, b0, b1);
      }
    }
  }

  // Merge the CTA's warps through shared memory and store this chunk's partial; acc_mul undoes a scaling
  // of P (kFp8PvMul for fp8 tiles, else 1).
  __device__ __forceinline__ void finish(const PagedParams& p, float* smem, int warp, int g, int c, int head0, int rows,
                                         int chunk, float acc_mul) {
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
    for (int t = 0; t < kNTiles; ++t) {  // (the tile's rows past `rows` are padding: not stored)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = 64 * (t / 8) + 8 * (2 * c + e) + t % 8;  // accumulator column 2c + e of n-tile t
        if (g < rows) sm_acc[(warp * 16 + g) * kRow + d] = acc[t][e] * acc_mul;
        if (g + 8 < rows) sm_acc[(warp * 16 + g + 8) * kRow + d] = acc[t][2 + e] * acc_mul;
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
constexpr int epilogue_bytes() {
  return 4 * (kWarps * 16 * (DP + 4) + 2 * kWarps * 16);
}

template <typename Tile, int DP, int S>
constexpr int mma_smem_bytes() {
  return std::max(kWarps * S * Tile::kBytes, epilogue_bytes<DP>());
}

// T: the MMA type; TQ: q's (and the output's) type; Tile: the pool's tile layout; S: pipeline stages.
// Launch bound: 3 CTAs per SM (168 registers) for 2 stages and for fp8 pools (D 128, 4 stages: 168 registers
// and no spill, where the chunk loop had taken it to 193 and 2 CTAs per SM: budget shapes 72% -> 76% of
// copy, bench/RESULTS.md session 9); 2 for 16-bit 3-4 stages; 1 at D 256.
template <typename T, typename TQ, typename Tile, int DP, int S>
__global__ void __launch_bounds__(kThreads, DP >= 256 ? 1 : (S == 2 || Tile::kFp8) ? 3 : 2)
    paged_mma_kernel(const PagedParams p) {
  using W = WarpAttn<T, DP>;
  using KV = std::conditional_t<Tile::kFp8, uint8_t, T>;
  extern __shared__ __align__(16) unsigned char smem[];
  // x: (kv head, head tile), fastest; y: the CTA's first chunk, then every gridDim.y-th (one wave of CTAs
  // loops over the chunks). CTAs running together read the same keys of every kv head, i.e. whole token
  // rows of the pool (H_kv x D contiguous), not one head's slice of each.
  grid_dep_launch();  // the combine kernel may launch now (it waits for this grid before reading)
  const int mt = blockIdx.x % p.m_tiles, kvh = blockIdx.x / p.m_tiles;
  const bool one_block = p.bs % kBlockN == 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // The prologue reads only n_valid and the tables: launched with `overlap` (programmatic dependent launch),
  // it runs while the previous kernel finishes, and everything else waits for that kernel below. It yields
  // the schedule, this CTA's first chunk and (one_block) the block of each warp's first step.
  const Lengths len = lengths_of(p);
  const Plan plan = balanced_plan(p, len);
  Where at{-1, 0};
  int blk_first = 0;  // the block of this warp's first step of chunk `at` (one_block)
  auto first_step = [&](int chunk) {
    at = locate(p, len, plan.per, chunk);
    blk_first = 0;  // (a step past the row's end copies nothing, from any address in the pool)
    const int base = (chunk - at.first) * plan.per + warp * kBlockN;
    int off;
    if (one_block && base < load_n(p, at.row)) slot_of(p, p.tables + at.row * p.t_sb, base, blk_first, off);
  };
  if (blockIdx.y < plan.total) first_step(blockIdx.y);
  grid_dep_wait();  // from here: q and the pools as the previous kernels wrote them, the partials' memory free
  const int rows = min(16, p.G - mt * 16);  // valid query-head rows of this tile
  const int head0 = kvh * p.G + mt * 16;    // query head of row 0
  const int g = lane >> 2, c = lane & 3;  // MMA groupID (row / key / column) and thread-in-group
  const int units = p.D * static_cast<int>(sizeof(KV)) / 16;  // 16-byte units of a real row

  // Step `it` of this warp: keys [start + 64 it + 16 warp, +16) into stage it % S. Lane l copies unit
  // l % kUnits of key rows l / kUnits + kRowStep i. Where the block size is a multiple of 16 (the engine's
  // pools) the step's 16 keys lie in one block: one table read and one row address per step, the other
  // rows a stride away; otherwise each row looks up its own block.
  constexpr int kPer = 16 * Tile::kUnits / 32;  // units per lane of K (and of V)
  constexpr int kRowStep = 32 / Tile::kUnits;   // key rows between a lane's units
  static_assert(32 % Tile::kUnits == 0, "a row's units divide a warp");
  const int u = lane % Tile::kUnits, r0 = lane / Tile::kUnits;
  const bool u_ok = u < units;
  const int u_src = u_ok ? u * (16 / static_cast<int>(sizeof(KV))) : 0;  // a unit of the real row
  for (int chunk = blockIdx.y; chunk < plan.total; chunk += gridDim.y) {  // CTA-uniform
    const int b = at.row;
    const int start = (chunk - at.first) * plan.per;
    const int end = min(start + plan.per, load_n(p, b));
    const int32_t* tbl = p.tables + b * p.t_sb;
    const int n_iter = (end - start + kCtaN - 1) / kCtaN;
    // (kb, vb, ring: loop-invariant, but set here: hoisted above the loop they cost 48 bytes of spills at
    // the 168 registers of 3 CTAs per SM, here 8)
    const KV* kb = static_cast<const KV*>(p.k) + kvh * p.k_sh;
    const KV* vb = static_cast<const KV*>(p.v) + kvh * p.v_sh;
    unsigned char* ring = smem + warp * (S * Tile::kBytes);
    auto issue = [&](int it) {
      unsigned char* tile = ring + (it % S) * Tile::kBytes;
      const int base = start + it * kCtaN + warp * kBlockN;
      int blk = 0, off = 0;  // the step's block and first key's slot in it (one_block)
      if (one_block) {  // warp-uniform
        if (it == 0) {  // (the block was read before the loop)
          blk = blk_first;
          off = p.bs_shift >= 0 ? base & (p.bs - 1) : base % p.bs;
        } else if (base < end) {
          slot_of(p, tbl, base, blk, off);
        }
        // (every source address lies in the block, also for rows past the end, which copy nothing)
        const KV* kr = kb + static_cast<int64_t>(blk) * p.k_sb + static_cast<int64_t>(off + r0) * p.k_st + u_src;
        const KV* vr = vb + static_cast<int64_t>(blk) * p.v_sb + static_cast<int64_t>(off + r0) * p.v_st + u_src;
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const int r = r0 + kRowStep * i;
          const bool ok = base + r < end && u_ok;
          cp16(tile + Tile::k_at(r, u), kr + kRowStep * i * p.k_st, ok);
          cp16(tile + Tile::v_at(r, u), vr + kRowStep * i * p.v_st, ok);
        }
      } else {
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const int r = r0 + kRowStep * i;
          const bool ok = base + r < end && u_ok;
          int64_t ko = 0, vo = 0;
          if (ok) {
            int b_r, o_r;
            slot_of(p, tbl, base + r, b_r, o_r);
            ko = static_cast<int64_t>(b_r) * p.k_sb + static_cast<int64_t>(o_r) * p.k_st + u * (16 / sizeof(KV));
            vo = static_cast<int64_t>(b_r) * p.v_sb + static_cast<int64_t>(o_r) * p.v_st + u * (16 / sizeof(KV));
          }
          cp16(tile + Tile::k_at(r, u), kb + ko, ok);
          cp16(tile + Tile::v_at(r, u), vb + vo, ok);
        }
      }
      if constexpr (Tile::kFp8) {  // lanes 0-15: the keys' scales, 16-31: the values'
        const int r = lane & 15;
        const bool ok = base + r < end;
        int64_t so = 0;
        if (ok) {
          int b_r = blk, o_r = off + r;
          if (!one_block) slot_of(p, tbl, base + r, b_r, o_r);
          so = static_cast<int64_t>(b_r) * p.s_sb + static_cast<int64_t>(o_r) * p.s_st + kvh;
        }
        cp4(tile + Tile::kScales + 4 * lane, (lane < 16 ? p.k_scale : p.v_scale) + so, ok);
      }
    };

#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
      if (s < n_iter) issue(s);
      cp_commit();
    }
    // q after the first copies are in flight: its load latency hides under theirs
    W st;
    st.template init<TQ, Tile::kFp8 && !std::is_same_v<TQ, __half>>(p, b, head0, rows, g, c);
    for (int it = 0; it < n_iter; ++it) {
      if (it + S - 1 < n_iter) issue(it + S - 1);
      cp_commit();  // (an empty group past the end keeps the count of groups in flight fixed)
      cp_wait<S - 1>();
      __syncwarp();
      const int base = start + it * kCtaN + warp * kBlockN;
      if (base < end) {  // warp-uniform
        const unsigned char* tile = ring + (it % S) * Tile::kBytes;
        float s[2][4];
        st.template scores<Tile>(tile, s, g, c);
        st.template update<Tile>(s, tile, base, end, g, c, p.score_mul);
      }
      __syncwarp();  // the stage is rewritten by the next step's issue
    }
    if (chunk + gridDim.y < plan.total) first_step(chunk + gridDim.y);  // (its table read hides under the epilogue)
    cp_wait<0>();
    __syncthreads();  // the ring becomes the epilogue's buffer
    st.finish(p, reinterpret_cast<float*>(smem), warp, g, c, head0, rows, chunk, Tile::kFp8 ? 1.f / kFp8PvMul : 1.f);
    __syncthreads();  // and the ring again, for the next chunk's copies
  }
}

// ---------------------------------------------------------------------------------------------------
// simt kernel (fp32): 8 lanes per key, lane j of a key holds vectors i * 8 + j of the row (4 elements
// each), 4 keys per warp step; each lane group runs its own online softmax, merged at the end. The key
// loop is warp-uniform (a lane group past the end computes with zeros and skips its update), so every
// shuffle has all 32 lanes.

template <int NV, int GT>
__global__ void __launch_bounds__(kThreads) paged_simt_kernel(const PagedParams p) {
  constexpr int VE = 4;  // floats per 16-byte vector
  constexpr int E = NV * VE;
  constexpr int DPAD = E * 8;
  __shared__ float sm_acc[kWarps][GT][DPAD];
  __shared__ float sm_ml[kWarps][GT][2];
  grid_dep_launch();
  const int tile = blockIdx.x % p.m_tiles, kvh = blockIdx.x / p.m_tiles;  // heads fastest; y: chunks (as mma)
  const Lengths len = lengths_of(p);
  const Plan plan = balanced_plan(p, len);  // (before the wait: n_valid only, as the mma kernel's prologue)
  grid_dep_wait();
  for (int chunk = blockIdx.y; chunk < plan.total; chunk += gridDim.y) {  // CTA-uniform
    const Where at = locate(p, len, plan.per, chunk);
    const int b = at.row;
    const int start = (chunk - at.first) * plan.per;
    const int end = min(start + plan.per, load_n(p, b));
    const int rows = min(GT, p.G - tile * GT);
    const int head0 = kvh * p.G + tile * GT;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, grp = lane / 8, j = lane % 8;
    auto dof = [&](int i) { return (i * 8 + j) * VE; };  // first d of this lane's vector i

    float q[GT][E], acc[GT][E], m[GT], l[GT];
    const float* qb = static_cast<const float*>(p.q) + b * p.q_sb;
#pragma unroll
    for (int h = 0; h < GT; ++h) {
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        float4 raw = make_float4(0.f, 0.f, 0.f, 0.f);
        if (h < rows && dof(i) < p.D) raw = *reinterpret_cast<const float4*>(qb + (head0 + h) * p.q_sh + dof(i));
        q[h][i * VE + 0] = raw.x * p.score_mul;
        q[h][i * VE + 1] = raw.y * p.score_mul;
        q[h][i * VE + 2] = raw.z * p.score_mul;
        q[h][i * VE + 3] = raw.w * p.score_mul;
      }
#pragma unroll
      for (int e = 0; e < E; ++e) acc[h][e] = 0.f;
      m[h] = -INFINITY;
      l[h] = 0.f;
    }
    const int32_t* tbl = p.tables + b * p.t_sb;
    const float* kb = static_cast<const float*>(p.k) + kvh * p.k_sh;
    const float* vb = static_cast<const float*>(p.v) + kvh * p.v_sh;
    uint4 kr[NV], vr[NV];
    auto load = [&](int key) {  // zeros past the end
      const bool ok = key < end;
      int64_t ko = 0, vo = 0;
      if (ok) {
        int blk, off;
        slot_of(p, tbl, key, blk, off);
        ko = static_cast<int64_t>(blk) * p.k_sb + static_cast<int64_t>(off) * p.k_st;
        vo = static_cast<int64_t>(blk) * p.v_sb + static_cast<int64_t>(off) * p.v_st;
      }
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const bool in = ok && dof(i) < p.D;
        kr[i] = in ? ldg_stream(kb + ko + dof(i)) : make_uint4(0, 0, 0, 0);
        vr[i] = in ? ldg_stream(vb + vo + dof(i)) : make_uint4(0, 0, 0, 0);
      }
    };
    int key0 = start + warp * 4;  // this warp's first key; lane group grp takes key0 + grp
    load(key0 + grp);
    for (; key0 < end; key0 += 4 * kWarps) {
      float kf[E], vf[E];
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const float* ke = reinterpret_cast<const float*>(&kr[i]);
        const float* ve = reinterpret_cast<const float*>(&vr[i]);
#pragma unroll
        for (int t = 0; t < VE; ++t) {
          kf[i * VE + t] = ke[t];
          vf[i * VE + t] = ve[t];
        }
      }
      const bool mine = key0 + grp < end;
      if (key0 + 4 * kWarps < end) load(key0 + 4 * kWarps + grp);  // keep the next key in flight
#pragma unroll
      for (int h = 0; h < GT; ++h) {
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) s = fmaf(q[h][e], kf[e], s);
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        s += __shfl_xor_sync(0xffffffffu, s, 4);
        if (mine) {
          const float mn = fmaxf(m[h], s);  // s is finite: mn is too
          const float corr = exp2f(m[h] - mn), pe = exp2f(s - mn);
          l[h] = l[h] * corr + pe;
#pragma unroll
          for (int e = 0; e < E; ++e) acc[h][e] = fmaf(acc[h][e], corr, pe * vf[e]);
          m[h] = mn;
        }
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
    __syncthreads();  // the merge buffers, rewritten by the next chunk
  }
}

// ---------------------------------------------------------------------------------------------------
// Merge each (row b, query head)'s chunk partials: out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), a
// row with no key -> 0. Warp w takes the row's chunks w, w + kWarps, ...: it
// loads their log2-sum-exps and (16 bytes a lane) their outputs at once, merges them against its own
// max, and the CTA then merges the warps' (max, sum, output) through shared memory: every load of a
// row is issued in one round trip after the wait (the row's chunks are worked out before it).
template <typename T>
__global__ void __launch_bounds__(kThreads) paged_combine_kernel(const PagedParams p) {
  constexpr int kPer = kRowChunks / kWarps;  // chunks per warp, at most
  constexpr int kVecs = 256 / 4;             // float4s of the longest row (D <= 256)
  static_assert(kRowChunks % kWarps == 0, "chunks split evenly over the warps");
  __shared__ float4 sm_o[kWarps][kVecs];
  __shared__ float sm_m[kWarps], sm_l[kWarps];
  grid_dep_launch();  // the next kernel (the output projection) may launch and prefetch its weights
  const int b = blockIdx.x, head = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int first, count;  // row b's chunks (count <= kRowChunks), from n_valid before the wait
  row_chunks(p, b, first, count);
  grid_dep_wait();    // the attention kernel's partials are visible from here on (plain loads below: an
                      // __ldg may be hoisted above the wait, and read the previous replay's values)
  const int64_t base = static_cast<int64_t>(head) * p.n_chunks + first;
  const float* lse = p.lse_part + base;
  const float4* part = reinterpret_cast<const float4*>(p.o_part + base * p.D);  // D % 4 == 0
  const int vecs = p.D / 4;
  float ls[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = warp + kWarps * i;
    ls[i] = c < count ? lse[c] : -INFINITY;
  }
  for (int v0 = 0; v0 < vecs; v0 += 32) {  // passes of 32 float4s (one for D <= 128)
    const int v = v0 + lane;
    float4 x[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {  // issued before the weights are known: one round trip
      const int c = warp + kWarps * i;
      x[i] = c < count && v < vecs ? part[static_cast<int64_t>(c) * vecs + v] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPer; ++i) m = fmaxf(m, ls[i]);
    const float ref = m == -INFINITY ? 0.f : m;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    float l = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const float w = ls[i] == -INFINITY ? 0.f : exp2f(ls[i] - ref);
      l += w;
      acc.x = fmaf(w, x[i].x, acc.x);
      acc.y = fmaf(w, x[i].y, acc.y);
      acc.z = fmaf(w, x[i].z, acc.z);
      acc.w = fmaf(w, x[i].w, acc.w);
    }
    if (v < vecs) sm_o[warp][v] = acc;
    if (v0 == 0 && lane == 0) {
      sm_m[warp] = m;
      sm_l[warp] = l;
    }
  }
  __syncthreads();
  float mx = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_m[w]);
  float f[kWarps], lsum = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    f[w] = sm_m[w] == -INFINITY ? 0.f : exp2f(sm_m[w] - mx);
    lsum += f[w] * sm_l[w];
  }
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.H_kv * p.G + head) * p.D;
  for (int d = threadIdx.x; d < p.D; d += kThreads) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o = fmaf(f[w], reinterpret_cast<const float*>(&sm_o[w][d / 4])[d % 4], o);
    out[d] = to_t<T>(lsum > 0.f ? o / lsum : 0.f);
  }
}

// The same merge with one warp per (row b, query head), kWarps of them per CTA: for batches of many rows
// with few chunks each (64 sink + window rows of 2 chunks: 16 loads in flight a lane and a CTA per row and
// head, as above, is 80 registers and 2,048 CTAs in ~2.6 waves, 10.6 us; this kernel's warps fit in one).
// A lane holds float4 v = lane (+ 32) of the row and chunks' weights lane and lane + 32; the chunks' outputs
// are loaded kBatch at a time, the first batch issued before the weights are known.
template <typename T>
__global__ void __launch_bounds__(kThreads) paged_combine_warps_kernel(const PagedParams p) {
  constexpr int kBatch = 8;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  grid_dep_launch();
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kWarps + warp;  // b * H_q + head
  const int hq = p.H_kv * p.G;
  if (task >= static_cast<int64_t>(p.B) * hq) return;  // (warp-uniform; no barrier below)
  const int b = static_cast<int>(task / hq), head = static_cast<int>(task - static_cast<int64_t>(b) * hq);
  int first, count;  // row b's chunks (count <= kRowChunks), from n_valid before the wait
  row_chunks(p, b, first, count);
  grid_dep_wait();  // the attention kernel's partials (plain loads below, as above)
  const int64_t base = static_cast<int64_t>(head) * p.n_chunks + first;
  const float4* part = reinterpret_cast<const float4*>(p.o_part + base * p.D);  // D % 4 == 0
  const int vecs = p.D / 4;
  T* out = static_cast<T*>(p.out) + task * p.D;
  float4 x[kBatch];
  auto load = [&](int c0, int v) {
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      x[i] = c0 + i < count && v < vecs ? part[static_cast<int64_t>(c0 + i) * vecs + v]
                                        : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };
  load(0, lane);
  static_assert(kRowChunks <= 64, "two chunks per lane");
  const float a = lane < count ? p.lse_part[base + lane] : -INFINITY;
  const float z = lane + 32 < count ? p.lse_part[base + lane + 32] : -INFINITY;
  float m = fmaxf(a, z);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  const float ref = m == -INFINITY ? 0.f : m;
  const float wa = exp2f(a - ref), wz = exp2f(z - ref);  // (0 for an empty chunk)
  float sum = wa + wz;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int v0 = 0; v0 < vecs; v0 += 32) {  // passes of 32 float4s (one for D <= 128)
    const int v = v0 + lane;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int c0 = 0; c0 < count; c0 += kBatch) {  // warp-uniform
      if (c0 > 0 || v0 > 0) load(c0, v);
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int c = c0 + i;  // its weight lives in lane c % 32's wa (c < 32) or wz
        const float w = __shfl_sync(0xffffffffu, c < 32 ? wa : wz, c & 31) * inv;
        acc.x = fmaf(w, x[i].x, acc.x);
        acc.y = fmaf(w, x[i].y, acc.y);
        acc.z = fmaf(w, x[i].z, acc.z);
        acc.w = fmaf(w, x[i].w, acc.w);
      }
    }
    if (v < vecs) {
      out[4 * v] = to_t<T>(acc.x);
      out[4 * v + 1] = to_t<T>(acc.y);
      out[4 * v + 2] = to_t<T>(acc.z);
      out[4 * v + 3] = to_t<T>(acc.w);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// host side


// The schedule's grid and partial buffers, once the kernel (hence its resident CTAs per SM) is known.
struct Split {
  int64_t programs;  // most chunks over all kv heads; 0: whole waves of resident CTAs, ~kProgramsPerSM per SM
  bool overlap;      // launch the attention kernel by programmatic dependent launch (its prologue, n_valid and
                     // the tables only, runs while the previous kernel finishes)
  at::TensorOptions f32;
  at::Tensor o_part, lse_part;
};

// Resident CTAs are equal work in lockstep waves, so a chunk count just past a multiple of the resident
// slots costs a nearly empty wave (16 per SM at 3 resident CTAs was 5.05 waves on the 50% lazy budget
// shape). The default target is a whole number of waves, ~kProgramsPerSM per SM; balanced_plan keeps the
// chunk count at or under it.
// `resident`: CTAs per SM (resident_ctas, >= 1).
// Returns the grid: (kv head x head tile) x one wave of CTAs, min(n_chunks, slots).
dim3 plan_split(PagedParams& p, Split& split, int resident, int device) {
  const int sms = multiprocessor_count(device);
  const int64_t progs = split.programs > 0 ? split.programs
                                           : int64_t{std::max(1, (kProgramsPerSM + resident / 2) / resident)} * resident * sms;
  p.tph = static_cast<int>(std::max<int64_t>(1, progs / p.H_kv));
  p.slots = static_cast<int>(std::max<int64_t>(1, int64_t{resident} * sms / (int64_t{p.H_kv} * p.m_tiles)));
  // balanced_plan makes at most max(tph, tph / 2 + B) chunks per kv head, and at most kRowChunks a row; the
  // grid is one wave (min(n_chunks, slots) CTAs per kv head and tile), each CTA looping over its chunks
  p.n_chunks = static_cast<int>(std::min<int64_t>(int64_t{p.tph} + p.B, int64_t{kRowChunks} * p.B));
  split.o_part = at::empty({static_cast<int64_t>(p.H_kv) * p.G, p.n_chunks, p.D}, split.f32);
  split.lse_part = at::empty({static_cast<int64_t>(p.H_kv) * p.G, p.n_chunks}, split.f32);
  p.o_part = split.o_part.data_ptr<float>();
  p.lse_part = split.lse_part.data_ptr<float>();
  return dim3(static_cast<unsigned>(p.H_kv * p.m_tiles), static_cast<unsigned>(std::min(p.n_chunks, p.slots)));
}

// Resident CTAs per SM of `kernel` (cached per kernel and device by the caller's static).
template <typename K>
int resident_ctas(K* kernel, int smem, int device, int (&cache)[64]) {
  if (device < 0 || device >= 64) return 1;
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem));
    cache[device] = std::max(1, n);
  }
  return cache[device];
}

template <typename T, typename TQ, typename Tile, int DP, int S>
void launch_mma(PagedParams& p, Split& split, int device, cudaStream_t stream) {
  constexpr int smem = mma_smem_bytes<Tile, DP, S>();
  auto* kernel = &paged_mma_kernel<T, TQ, Tile, DP, S>;
  static bool raised[64] = {};  // once per device: the opt-in above 48 KB of dynamic shared memory, and
  static int resident[64] = {};
  if (device >= 0 && device < 64 && !raised[device]) {  // all of L1 as shared memory (CTAs per SM)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        cudaSharedmemCarveoutMaxShared));
    raised[device] = true;
    if (std::getenv("LTENGINE_KERNEL_INFO")) {
      cudaFuncAttributes fa{};
      C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
      std::fprintf(stderr, "paged_mma_kernel<DP=%d, S=%d, fp8=%d>: %d registers, %d B dynamic + %zu B static smem, "
                   "%d CTAs per SM\n", DP, S, int(Tile::kFp8), fa.numRegs, smem, fa.sharedSizeBytes,
                   resident_ctas(kernel, smem, device, resident));
    }
  }
  p.m_tiles = (p.G + 15) / 16;
  const dim3 grid = plan_split(p, split, resident_ctas(kernel, smem, device, resident), device);
  launch_pdl(kernel, grid, dim3(kThreads), smem, stream, split.overlap, p);
}

// Pipeline depth per tile size: 64 KB of ring per CTA for 16-bit rows up to 128 (2 stages, three CTAs per
// SM: measured faster than 3 stages at two CTAs, or 4 at one, on every shape of bench/kernels.py), 52-100 KB
// for fp8 (rows half as long), 128 KB for 16-bit 256 (one CTA per SM).
// `stages` (0: the default, 2) picks another depth (3, 4) for 16-bit D in (64, 128], for tuning.
template <typename T, typename TQ>
void dispatch_mma(PagedParams& p, Split& split, bool fp8, int stages, int device, cudaStream_t stream) {
  if (fp8) {
    if (p.D <= 64) launch_mma<__half, TQ, Tile8<64>, 64, 6>(p, split, device, stream);
    else if (p.D <= 128) launch_mma<__half, TQ, Tile8<128>, 128, 4>(p, split, device, stream);
    else launch_mma<__half, TQ, Tile8<256>, 256, 3>(p, split, device, stream);
  } else if constexpr (!std::is_same_v<T, float>) {
    if (p.D <= 64) launch_mma<T, T, Tile16<64>, 64, 4>(p, split, device, stream);
    else if (p.D <= 128 && stages == 3) launch_mma<T, T, Tile16<128>, 128, 3>(p, split, device, stream);
    else if (p.D <= 128 && stages == 4) launch_mma<T, T, Tile16<128>, 128, 4>(p, split, device, stream);
    else if (p.D <= 128) launch_mma<T, T, Tile16<128>, 128, 2>(p, split, device, stream);
    else launch_mma<T, T, Tile16<256>, 256, 2>(p, split, device, stream);
  }
}

template <int NV, int GT>
void launch_simt(PagedParams& p, Split& split, int device, cudaStream_t stream) {
  static int resident[64] = {};
  p.m_tiles = (p.G + GT - 1) / GT;
  const dim3 grid = plan_split(p, split, resident_ctas(&paged_simt_kernel<NV, GT>, 0, device, resident), device);
  launch_pdl(&paged_simt_kernel<NV, GT>, grid, dim3(kThreads), 0, stream, split.overlap, p);
}

// Heads per CTA: the group padded to 1/2/4, with at most 64 fp32 registers of q (and as many of acc) per
// thread, and one head for 32-element lanes.
template <int NV>
void dispatch_gt(PagedParams& p, Split& split, int device, cudaStream_t stream) {
  constexpr int E = NV * 4;
  constexpr int kMaxGT = E >= 32 ? 1 : 64 / E >= 4 ? 4 : 2;
  const int want = p.G >= 4 ? 4 : p.G >= 2 ? 2 : 1;
  const int gt = want < kMaxGT ? want : kMaxGT;
  if (gt == 4) {
    if constexpr (kMaxGT >= 4) launch_simt<NV, 4>(p, split, device, stream);
  } else if (gt == 2) {
    if constexpr (kMaxGT >= 2) launch_simt<NV, 2>(p, split, device, stream);
  } else {
    launch_simt<NV, 1>(p, split, device, stream);
  }
}

void dispatch_simt(PagedParams& p, Split& split, int device, cudaStream_t stream) {
  const int vectors = (p.D + 3) / 4;  // 16-byte vectors per fp32 row
  if (vectors <= 8) dispatch_gt<1>(p, split, device, stream);
  else if (vectors <= 16) dispatch_gt<2>(p, split, device, stream);
  else if (vectors <= 32) dispatch_gt<4>(p, split, device, stream);
  else dispatch_gt<8>(p, split, device, stream);
}

// A CTA per (row, query head) where rows average many chunks (few rows: its four warps share a row's
// chunks); a warp per (row, head) where they average at most kWarpCombineChunks (many short rows). The grid
// depends on (B, H_q, n_chunks) alone, as the attention kernel's does.
constexpr int kWarpCombineChunks = 8;

template <typename T>
void launch_combine(PagedParams& p, int device, cudaStream_t stream) {
  const int64_t tasks = int64_t{p.B} * p.H_kv * p.G;
  const bool pdl = pdl_enabled(device);  // launched while the attention kernel runs (it waits for it)
  if (p.n_chunks <= int64_t{kWarpCombineChunks} * p.B) {
    launch_pdl(&paged_combine_warps_kernel<T>, dim3(static_cast<unsigned>((tasks + kWarps - 1) / kWarps)),
               dim3(kThreads), 0, stream, pdl, p);
  } else {
    const dim3 grid(static_cast<unsigned>(p.B), static_cast<unsigned>(p.H_kv * p.G));
    launch_pdl(&paged_combine_kernel<T>, grid, dim3(kThreads), 0, stream, pdl, p);
  }
}

void check_aligned(const at::Tensor& t, const char* name) {
  LT_CHECK(t.stride(-1) == 1, "paged_decode: ", name, " needs a contiguous last dim, got strides ", t.strides());
  const int64_t es = t.element_size();
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.stride(d) * es) % 16 == 0;
  LT_CHECK(ok, "paged_decode: ", name, " needs a 16-byte aligned pointer and strides, got strides ", t.strides());
}

}  // namespace

at::Tensor paged_decode_cuda(const at::Tensor& q_in, const at::Tensor& k_pool, const at::Tensor& v_pool,
                             const at::Tensor& tables, const at::Tensor& n_valid, double scale,
                             const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                             int64_t programs, int64_t min_chunk, int64_t stages, bool overlap) {
  LT_CHECK(q_in.is_cuda(), "paged_decode (CUDA): q must be on a CUDA device, got ", q_in.device());
  LT_CHECK(k_pool.device() == q_in.device() && v_pool.device() == q_in.device() &&
               tables.device() == q_in.device() && n_valid.device() == q_in.device(),
           "paged_decode: q, k_pool, v_pool, tables and n_valid must be on one device; got ", q_in.device(), ", ",
           k_pool.device(), ", ", v_pool.device(), ", ", tables.device(), ", ", n_valid.device());
  const auto dt = q_in.scalar_type(), kvt = k_pool.scalar_type();
  const bool fp8 = kvt == at::kFloat8_e4m3fn;
  LT_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat,
           "paged_decode (CUDA): q must be bfloat16, float16 or float32, got ", dt);
  LT_CHECK(v_pool.scalar_type() == kvt && (fp8 || kvt == dt),
           "paged_decode: k_pool and v_pool must share q's dtype (or be float8_e4m3fn with scales); got q ", dt,
           ", k_pool ", kvt, ", v_pool ", v_pool.scalar_type());
  LT_CHECK(fp8 == (k_scale.has_value() && v_scale.has_value()) && k_scale.has_value() == v_scale.has_value(),
           "paged_decode: an fp8 pool needs k_scale and v_scale, and only an fp8 pool takes them; got a ", kvt,
           " pool with k_scale ", k_scale.has_value() ? "set" : "None", " and v_scale ",
           v_scale.has_value() ? "set" : "None");
  LT_CHECK(q_in.dim() == 3 && k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(),
           "paged_decode: need q [B, H_q, D] and k_pool, v_pool [num_blocks, block_size, H_kv, D] of one shape; "
           "got q ", q_in.sizes(), ", k_pool ", k_pool.sizes(), ", v_pool ", v_pool.sizes());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t NB = k_pool.size(0), BS = k_pool.size(1), Hkv = k_pool.size(2);
  LT_CHECK(k_pool.size(3) == D, "paged_decode: q head dim ", D, " != pool head dim ", k_pool.size(3));
  if (fp8) {
    LT_CHECK(D >= 16 && D <= 256 && D % 16 == 0,
             "paged_decode (CUDA): an fp8 pool's head dim must be a multiple of 16 in [16, 256], got ", D);
  } else {
    LT_CHECK(D >= 8 && D <= 256 && D % 8 == 0, "paged_decode (CUDA): head dim must be a multiple of 8 in [8, 256], got ",
             D);
  }
  LT_CHECK(Hkv > 0 && Hq % Hkv == 0, "paged_decode: H_q=", Hq, " is not a multiple of H_kv=", Hkv);
  LT_CHECK(BS >= 1 && NB >= 1, "paged_decode: empty pool ", k_pool.sizes());
  LT_CHECK(tables.dim() == 2 && tables.size(0) == B && tables.scalar_type() == at::kInt && tables.stride(1) == 1,
           "paged_decode: tables must be int32 [B=", B, ", MB] with a contiguous last dim; got ",
           tables.scalar_type(), " ", tables.sizes());
  LT_CHECK(n_valid.dim() == 1 && n_valid.size(0) == B && n_valid.scalar_type() == at::kInt && n_valid.is_contiguous(),
           "paged_decode: n_valid must be a contiguous int32 [B=", B, "]; got ", n_valid.scalar_type(), " ",
           n_valid.sizes());
  LT_CHECK(tables.size(1) >= 1 && tables.size(1) * BS < (int64_t{1} << 31), "paged_decode: table width ",
           tables.size(1), " x block size ", BS, " out of range");
  LT_CHECK(Hq / Hkv <= 65535 / Hkv && B < (1 << 20), "paged_decode: sizes too large: q ", q_in.sizes());
  LT_CHECK(programs >= 0 && programs <= 65535 && min_chunk >= 0 && min_chunk <= (int64_t{1} << 30),
           "paged_decode: programs must be in [0, 65535] and min_chunk in [0, 2^30] (0: default), got ", programs, ", ",
           min_chunk);
  LT_CHECK(stages >= 0 && stages <= 4 && stages != 1, "paged_decode: stages must be 0 (the default) or 2-4, got ",
           stages);
  check_aligned(k_pool, "k_pool");
  check_aligned(v_pool, "v_pool");
  if (fp8) {
    const at::Tensor &ks = *k_scale, &vs = *v_scale;
    LT_CHECK(ks.scalar_type() == at::kFloat && vs.scalar_type() == at::kFloat && ks.dim() == 3 &&
                 ks.size(0) == NB && ks.size(1) == BS && ks.size(2) == Hkv && vs.sizes() == ks.sizes() &&
                 vs.strides() == ks.strides() && ks.stride(2) == 1,
             "paged_decode: k_scale and v_scale must be float32 [num_blocks=", NB, ", block_size=", BS, ", H_kv=", Hkv,
             "] with one layout and a contiguous last dim; got ", ks.scalar_type(), " ", ks.sizes(), " strides ",
             ks.strides(), " and ", vs.scalar_type(), " ", vs.sizes(), " strides ", vs.strides());
    LT_CHECK(ks.device() == q_in.device() && vs.device() == q_in.device(),
             "paged_decode: k_scale and v_scale must be on q's device ", q_in.device(), "; got ", ks.device(), ", ",
             vs.device());
  }
  const int64_t qes = q_in.element_size();
  const at::Tensor q = q_in.stride(2) == 1 && (q_in.stride(1) * qes) % 16 == 0 && (q_in.stride(0) * qes) % 16 == 0 &&
                               reinterpret_cast<uintptr_t>(q_in.data_ptr()) % 16 == 0
                           ? q_in
                           : q_in.clone(at::MemoryFormat::Contiguous);  // (a contiguous view can still be misaligned)
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
  const int device = q.get_device();
  const int64_t mc = min_chunk > 0 ? min_chunk : kMinChunk;
  p.min_chunk = static_cast<int>(std::min<int64_t>((mc + kCtaN - 1) / kCtaN * kCtaN, int64_t{1} << 30));
  // fp8 pools run fp16 MMAs: an fp16 q is read as it is; a bf16 / fp32 q is converted, pre-scaled by the
  // softmax scale (|q * scale| must stay under fp16's 65504), and its scores need only log2(e).
  constexpr double kLog2e = 1.4426950408889634;
  const bool convert_q = fp8 && dt != at::kHalf;
  p.score_mul = static_cast<float>(convert_q ? kLog2e : scale * kLog2e);
  p.q_mul = static_cast<float>(convert_q ? scale : 1.0);
  if (fp8) {
    p.k_scale = k_scale->data_ptr<float>();
    p.v_scale = v_scale->data_ptr<float>();
    p.s_sb = k_scale->stride(0);
    p.s_st = k_scale->stride(1);
  }

  // (the grid and the partials: set by the launch, plan_split)
  Split split{programs, overlap && pdl_enabled(device), q.options().dtype(at::kFloat), {}, {}};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (dt == at::kBFloat16) {
    dispatch_mma<__nv_bfloat16, __nv_bfloat16>(p, split, fp8, stages, device, stream);
    launch_combine<__nv_bfloat16>(p, device, stream);
  } else if (dt == at::kHalf) {
    dispatch_mma<__half, __half>(p, split, fp8, stages, device, stream);
    launch_combine<__half>(p, device, stream);
  } else {
    if (fp8) dispatch_mma<float, float>(p, split, true, stages, device, stream);
    else dispatch_simt(p, split, device, stream);
    launch_combine<float>(p, device, stream);
  }
  return out;
}

}  // namespace ltengine

TORCH_LIBRARY_IMPL(ltengine, CUDA, m) { m.impl("paged_decode", &ltengine::paged_decode_cuda); }
