#pragma once
#include <ATen/ATen.h>

namespace ltengine {
// Shared argument checks of truncate_kv_ and paged_truncate_ (defined in ops.cpp).
void check_truncate_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths, int64_t sink,
                         int64_t window);
void check_paged_truncate_args(const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& tables,
                               const at::Tensor& lengths, int64_t sink, int64_t window);
}  // namespace ltengine
