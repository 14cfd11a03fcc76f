"""The decode step's linear layers: ``x [M, K] @ w[N, K].T (+ bias[N]) -> [M, N]``.

At decode batch sizes a linear layer is one pass over its weights, so its time is the weights' bytes
over memory bandwidth. Two implementations, chosen once by the backend:

- ``cuda``: ``csrc/skinny_linear.cu`` for 1..8 rows of bf16/fp16 with K a multiple of 8 (tensor cores,
  w streamed once through a cp.async ring; 1.00-1.24x cuBLAS on the Llama-3-8B projections, H200); any
  other call goes to ``F.linear`` (at 16 rows cuBLAS was faster on 4 of 5 shapes).
- ``reference``: ``F.linear`` (cuBLAS on a GPU), the twin the kernel is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ltengine.kernels import cuda as _cuda

SKINNY_ROWS = 8  # the most rows of x the CUDA kernel takes


def linear_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, bias)


def supports(dtype: torch.dtype, k: int) -> bool:
    """Weights the CUDA kernel reads: bf16/fp16 with K a positive multiple of 8."""
    return dtype in (torch.bfloat16, torch.float16) and k > 0 and k % 8 == 0


def linear_cuda(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The CUDA kernel for x ``[M <= 8, K]`` (contiguous, 16-byte aligned, w's dtype), else ``F.linear``.
    The choice depends only on shapes and layout, so a CUDA graph captures one of them."""
    if (x.dim() == 2 and 1 <= x.shape[0] <= SKINNY_ROWS and x.dtype == w.dtype and x.is_contiguous()
            and w.is_contiguous() and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
            and (bias is None or bias.is_contiguous())):
        return _cuda.skinny_linear(x, w, bias)
    return F.linear(x, w, bias)
