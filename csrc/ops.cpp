// ltengine._C: op schemas, the CPU truncate_kv_ and the Python module stub.
//
// Ops live in torch.ops.ltengine (dispatcher-registered, so CUDA-graph capture and torch.compile
// see real ops); importing ltengine._C loads this library and registers them.
//   truncate_kv_(k, v, lengths, sink, window)            CPU + CUDA, any dtype, in place
//   decode(q, k, v, lengths, scale, out, num_splits)     CUDA only, bf16/fp16, D in {64, 128}
#include <torch/extension.h>

#include <cstring>

#include "truncate_kv.h"

namespace ltengine {

void check_truncate_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths, int64_t sink,
                         int64_t window) {
  TORCH_CHECK(sink >= 0 && window >= 1, "truncate_kv_: need sink >= 0 and window >= 1, got sink=", sink,
              ", window=", window);
  TORCH_CHECK(k.dim() == 4, "truncate_kv_: k must be [B, T_cap, H_kv, D], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "truncate_kv_: v ", v.sizes(), " must match k ", k.sizes());
  TORCH_CHECK(v.dtype() == k.dtype(), "truncate_kv_: v dtype ", v.dtype(), " must match k dtype ", k.dtype());
  TORCH_CHECK(v.device() == k.device(), "truncate_kv_: k and v must be on one device");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "truncate_kv_: the last dim of k and v must be contiguous");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == k.size(0), "truncate_kv_: lengths must be [B=", k.size(0),
              "], got ", lengths.sizes());
  TORCH_CHECK(lengths.scalar_type() == at::kInt || lengths.scalar_type() == at::kLong,
              "truncate_kv_: lengths must be int32 or int64, got ", lengths.scalar_type());
  TORCH_CHECK(lengths.device() == k.device(), "truncate_kv_: lengths on ", lengths.device(), " but k on ",
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
  TORCH_CHECK(k.device().is_cpu(), "truncate_kv_ (CPU): tensors must be on the CPU");
  const at::Tensor lens = lengths.to(at::kLong).contiguous();
  const int64_t* L = lens.data_ptr<int64_t>();
  const int64_t B = k.size(0), T = k.size(1), H = k.size(2);
  const int64_t row_bytes = k.size(3) * k.element_size();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(L[b] >= 0 && L[b] <= T, "truncate_kv_: lengths[", b, "]=", L[b], " outside [0, T_cap=", T, "]");
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

}  // namespace ltengine

TORCH_LIBRARY(ltengine, m) {
  m.def("truncate_kv_(Tensor(a!) k, Tensor(b!) v, Tensor lengths, int sink, int window) -> ()");
  m.def("decode(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale, Tensor(a!) out, int num_splits) -> ()");
}

TORCH_LIBRARY_IMPL(ltengine, CPU, m) { m.impl("truncate_kv_", &ltengine::truncate_kv_cpu); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ltengine kernels; the ops are registered in torch.ops.ltengine";
#ifdef LTENGINE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
