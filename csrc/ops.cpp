// ltengine._C: op schemas, the CPU truncations and the Python module stub.
//
// Ops live in torch.ops.ltengine (dispatcher-registered, so CUDA-graph capture and torch.compile
// see real ops); importing ltengine._C loads this library and registers them.
//   truncate_kv_(k, v, lengths, sink, window)                      CPU + CUDA, any dtype, in place
//   paged_truncate_(k_pool, v_pool, tables, lengths, sink, window) CPU + CUDA, any dtype, in place
//   paged_decode(q, k_pool, v_pool, tables, n_valid, scale, k_scale, v_scale, programs, min_chunk, stages,
//                overlap) -> out
//                                                                  CUDA; bf16/fp16/fp32 pools (D % 8 == 0) and
//                                                                  fp8 e4m3 pools with scales (D % 16 == 0), D <= 256
//   skinny_linear(x, w, bias, stages, x_ss, eps, glu, resid, next_norm) -> (out, out_ss, out_hn)
//                                                                  CUDA; x @ w.T + bias for 1..8 rows, bf16/fp16,
//                                                                  K % 8 == 0; the RMSNorm factor, silu(gate) * up,
//                                                                  the residual add folded into the epilogue
// Argument checks are LT_CHECK (check.h): TORCH_CHECK's message formatting crashed on the device image.
#include <torch/extension.h>

#include <cstring>

#include "check.h"
#include "truncate_kv.h"

namespace ltengine {

void check_truncate_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths, int64_t sink,
                         int64_t window) {
  LT_CHECK(sink >= 0 && window >= 1, "truncate_kv_: need sink >= 0 and window >= 1, got sink=", sink,
              ", window=", window);
  LT_CHECK(k.dim() == 4, "truncate_kv_: k must be [B, T_cap, H_kv, D], got ", k.sizes());
  LT_CHECK(v.sizes() == k.sizes(), "truncate_kv_: v ", v.sizes(), " must match k ", k.sizes());
  LT_CHECK(v.dtype() == k.dtype(), "truncate_kv_: v dtype ", v.dtype(), " must match k dtype ", k.dtype());
  LT_CHECK(v.device() == k.device(), "truncate_kv_: k and v must be on one device");
  LT_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "truncate_kv_: the last dim of k and v must be contiguous");
  LT_CHECK(lengths.dim() == 1 && lengths.size(0) == k.size(0), "truncate_kv_: lengths must be [B=", k.size(0),
              "], got ", lengths.sizes());
  LT_CHECK(lengths.scalar_type() == at::kInt || lengths.scalar_type() == at::kLong,
              "truncate_kv_: lengths must be int32 or int64, got ", lengths.scalar_type());
  LT_CHECK(lengths.device() == k.device(), "truncate_kv_: lengths on ", lengths.device(), " but k on ",
              k.device());
}

// Source slot of ring slot j (0 <= j < window) for a sequence of L > sink + window tokens: the token
// p in [L - window, L) with (p - sink) % window == j. A read slot is either its own destination (no-op)
// or >= sink + window (never written), so the copies never conflict and their order is free.
static inline int64_t ring_source(int64_t L, int64_t j, int64_t sink, int64_t window) {
  int64_t r = (j - (L - window - sink)) % window;
  if (r < 0) r += window;
  return L - window + r;
}

void truncate_kv_cpu(at::Tensor k, at::Tensor v, const at::Tensor& lengths, int64_t sink, int64_t window) {
  check_truncate_args(k, v, lengths, sink, window);
  LT_CHECK(k.device().is_cpu(), "truncate_kv_ (CPU): tensors must be on the CPU");
  const at::Tensor lens = lengths.to(at::kLong).contiguous();
  const int64_t* L = lens.data_ptr<int64_t>();
  const int64_t B = k.size(0), T = k.size(1), H = k.size(2);
  const int64_t row_bytes = k.size(3) * k.element_size();
  for (int64_t b = 0; b < B; ++b) {
    LT_CHECK(L[b] >= 0 && L[b] <= T, "truncate_kv_: lengths[", b, "]=", L[b], " outside [0, T_cap=", T, "]");
  }
  for (at::Tensor* t : {&k, &v}) {
    char* base = static_cast<char*>(t->data_ptr());
    const int64_t es = t->element_size();
    const int64_t sb = t->stride(0) * es, st = t->stride(1) * es, sh = t->stride(2) * es;
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (L[b] <= sink + window) continue;
        for (int64_t j = 0; j < window; ++j) {
          const int64_t src = ring_source(L[b], j, sink, window), dst = sink + j;
          if (src == dst) continue;
          for (int64_t h = 0; h < H; ++h) {
            std::memcpy(base + b * sb + dst * st + h * sh, base + b * sb + src * st + h * sh, row_bytes);
          }
        }
      }
    });
  }
}

void check_paged_truncate_args(const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& tables,
                               const at::Tensor& lengths, int64_t sink, int64_t window) {
  LT_CHECK(sink >= 0 && window >= 1, "paged_truncate_: need sink >= 0 and window >= 1, got sink=", sink,
              ", window=", window);
  LT_CHECK(k_pool.dim() == 4, "paged_truncate_: k_pool must be [num_blocks, block_size, H_kv, D], got ",
              k_pool.sizes());
  LT_CHECK(v_pool.sizes() == k_pool.sizes(), "paged_truncate_: v_pool ", v_pool.sizes(), " must match k_pool ",
              k_pool.sizes());
  LT_CHECK(v_pool.dtype() == k_pool.dtype(), "paged_truncate_: v_pool dtype ", v_pool.dtype(),
              " must match k_pool dtype ", k_pool.dtype());
  LT_CHECK(v_pool.device() == k_pool.device() && tables.device() == k_pool.device() &&
                  lengths.device() == k_pool.device(),
              "paged_truncate_: k_pool, v_pool, tables and lengths must be on one device; got ", k_pool.device(), ", ",
              v_pool.device(), ", ", tables.device(), ", ", lengths.device());
  LT_CHECK(k_pool.stride(3) == 1 && v_pool.stride(3) == 1,
              "paged_truncate_: the last dim of k_pool and v_pool must be contiguous");
  LT_CHECK(tables.dim() == 2 && tables.scalar_type() == at::kInt,
              "paged_truncate_: tables must be int32 [N, MB], got ", tables.scalar_type(), " ", tables.sizes());
  LT_CHECK(lengths.dim() == 1 && lengths.size(0) == tables.size(0), "paged_truncate_: lengths must be [N=",
              tables.size(0), "], got ", lengths.sizes());
  LT_CHECK(lengths.scalar_type() == at::kInt || lengths.scalar_type() == at::kLong,
              "paged_truncate_: lengths must be int32 or int64, got ", lengths.scalar_type());
}

void paged_truncate_cpu(at::Tensor k_pool, at::Tensor v_pool, const at::Tensor& tables, const at::Tensor& lengths,
                        int64_t sink, int64_t window) {
  check_paged_truncate_args(k_pool, v_pool, tables, lengths, sink, window);
  LT_CHECK(k_pool.device().is_cpu(), "paged_truncate_ (CPU): tensors must be on the CPU");
  const at::Tensor lens = lengths.to(at::kLong).contiguous();
  const at::Tensor tbl = tables.contiguous();
  const int64_t* L = lens.data_ptr<int64_t>();
  const int32_t* T = tbl.data_ptr<int32_t>();
  const int64_t N = tbl.size(0), MB = tbl.size(1), NB = k_pool.size(0), BS = k_pool.size(1), H = k_pool.size(2);
  const int64_t row_bytes = k_pool.size(3) * k_pool.element_size();
  for (int64_t n = 0; n < N; ++n) {
    LT_CHECK(L[n] >= 0 && L[n] <= MB * BS, "paged_truncate_: lengths[", n, "]=", L[n], " outside [0, ", MB,
                " blocks x ", BS, "]");
    if (L[n] <= sink + window) continue;
    for (int64_t i = 0; i < (L[n] + BS - 1) / BS; ++i) {
      LT_CHECK(T[n * MB + i] >= 0 && T[n * MB + i] < NB, "paged_truncate_: tables[", n, ", ", i, "]=",
                  T[n * MB + i], " outside [0, num_blocks=", NB, ")");
    }
  }
  for (at::Tensor* t : {&k_pool, &v_pool}) {
    char* base = static_cast<char*>(t->data_ptr());
    const int64_t es = t->element_size();
    const int64_t sb = t->stride(0) * es, st = t->stride(1) * es, sh = t->stride(2) * es;
    // Rows own disjoint blocks, and within a row the copies are independent (ring_source): any order.
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        if (L[n] <= sink + window) continue;
        const int32_t* row = T + n * MB;
        for (int64_t j = 0; j < window; ++j) {
          const int64_t src = ring_source(L[n], j, sink, window), dst = sink + j;
          if (src == dst) continue;
          char* from = base + row[src / BS] * sb + (src % BS) * st;
          char* to = base + row[dst / BS] * sb + (dst % BS) * st;
          for (int64_t h = 0; h < H; ++h) std::memcpy(to + h * sh, from + h * sh, row_bytes);
        }
      }
    });
  }
}

}  // namespace ltengine

TORCH_LIBRARY(ltengine, m) {
  m.def("truncate_kv_(Tensor(a!) k, Tensor(b!) v, Tensor lengths, int sink, int window) -> ()");
  m.def("paged_truncate_(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor tables, Tensor lengths, int sink, "
        "int window) -> ()");
  m.def("paged_decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor tables, Tensor n_valid, float scale, "
        "Tensor? k_scale, Tensor? v_scale, int programs, int min_chunk, int stages, bool overlap=False) -> Tensor");
  m.def("skinny_linear(Tensor x, Tensor w, Tensor? bias, int stages, Tensor? x_ss, float eps, bool glu, "
        "Tensor? resid, Tensor? next_norm) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ltengine, CPU, m) {
  m.impl("truncate_kv_", &ltengine::truncate_kv_cpu);
  m.impl("paged_truncate_", &ltengine::paged_truncate_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ltengine kernels; the ops are registered in torch.ops.ltengine";
#ifdef LTENGINE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
