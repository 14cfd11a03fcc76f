"""The decode step's linear layers, ``x [M, K] @ w[N, K].T (+ bias[N])``, with the elementwise work between
them folded in where the CUDA kernel runs (``linear(x, w, bias, **modes)``):

- ``x_ss=[M, P], eps``: x is an RMSNorm's input h times the norm's weight, ``bf16(h * norm_w)``, and
  ``x_ss`` fp32 partial sums of h^2 over each row (any split P; as ``resid`` below returns them). The
  result is ``rsqrt(sum(x_ss) / K + eps) * (x @ w.T) + bias``: RMSNorm(h) @ w.T with the norm's per-row
  factor applied to the fp32 sum. (The models' RMSNorm rounds ``bf16(norm_w * bf16(h * r))``; this one
  rounds ``bf16(h * norm_w)``, one rounding fewer.)
- ``glu=True``: w is a fused ``[gate; up]`` (2I rows) and the result ``silu(g) * u`` ``[M, I]``, g and u
  rounded first (the gated MLP's ``silu(gate_proj(x)) * up_proj(x)``).
- ``resid=[M, N]``: the result is ``(h, h_ss, hn)``: ``h = resid + out`` (the residual add), h_ss the rows'
  partial sums of h^2, and with ``next_norm=[N]`` ``hn = h * next_norm`` (else None): the next ``x_ss``
  call's x and x_ss.

At decode batch sizes a linear layer is one pass over its weights, so its time is the weights' bytes over
memory bandwidth, and each elementwise kernel between two of them is a ~2 us launch at batch 1. Two
implementations, chosen once by the backend:

- ``cuda``: ``csrc/skinny_linear.cu`` for 1..8 rows of bf16/fp16 with K a multiple of 8 (tensor cores,
  w streamed once through a cp.async ring; 1.00-1.24x cuBLAS on the Llama-3-8B projections, H200); any
  other call goes to the reference (at 16 rows cuBLAS was faster on 4 of 5 shapes).
- ``reference``: the same math in PyTorch (``F.linear``; fp32 where ``x_ss`` scales the sum), the twin the
  kernel is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ltengine.kernels import cuda as _cuda
from ltengine.kernels.fused import silu_mul_ref

SKINNY_ROWS = 8  # the most rows of x the CUDA kernel takes


def _check(x, w, x_ss, glu, resid, next_norm) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: need x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    m, n = x.shape[0], w.shape[0]
    if x_ss is not None and (x_ss.dim() != 2 or x_ss.shape[0] != m):
        raise ValueError(f"linear: x_ss must be [M={m}, P], got {tuple(x_ss.shape)}")
    if glu and (resid is not None or n % 2):
        raise ValueError(f"linear: glu needs w = [gate; up] (an even row count, got {n}) and no resid")
    if resid is not None and tuple(resid.shape) != (m, n):
        raise ValueError(f"linear: resid must be [M={m}, N={n}], got {tuple(resid.shape)}")
    if next_norm is not None and (resid is None or tuple(next_norm.shape) != (n,)):
        raise ValueError(f"linear: next_norm must be [N={n}] and comes with resid")


def linear_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
               x_ss: torch.Tensor | None = None, eps: float = 0.0, glu: bool = False,
               resid: torch.Tensor | None = None, next_norm: torch.Tensor | None = None):
    """The twin of every mode (module docstring)."""
    _check(x, w, x_ss, glu, resid, next_norm)
    if x_ss is None:
        y = F.linear(x, w, bias)
    else:
        r = torch.rsqrt(x_ss.sum(-1, keepdim=True) / x.shape[1] + eps)
        y = r * F.linear(x.float(), w.float())
        y = (y if bias is None else y + bias.float()).to(x.dtype)
    if glu:
        return silu_mul_ref(y)
    if resid is None:
        return y
    h = resid + y
    return h, h.float().pow(2).sum(-1, keepdim=True), (next_norm * h if next_norm is not None else None)


def supports(dtype: torch.dtype, k: int) -> bool:
    """Weights the CUDA kernel reads: bf16/fp16 with K a positive multiple of 8."""
    return dtype in (torch.bfloat16, torch.float16) and k > 0 and k % 8 == 0


def skinny(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """The CUDA kernel takes this call: x ``[M <= 8, K]`` contiguous and 16-byte aligned, w's dtype. The
    choice depends only on shapes and layout, so a CUDA graph captures one of them."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= SKINNY_ROWS and x.dtype == w.dtype and x.is_contiguous()
            and w.is_contiguous() and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
            and (bias is None or bias.is_contiguous()))


def linear_cuda(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                x_ss: torch.Tensor | None = None, eps: float = 0.0, glu: bool = False,
                resid: torch.Tensor | None = None, next_norm: torch.Tensor | None = None):
    """The CUDA kernel where it takes the call (``skinny``), else ``linear_ref``."""
    if skinny(x, w, bias):
        _check(x, w, x_ss, glu, resid, next_norm)
        return _cuda.skinny_linear(x, w, bias, x_ss=x_ss, eps=eps, glu=glu,
                                   resid=resid.contiguous() if resid is not None else None, next_norm=next_norm)
    return linear_ref(x, w, bias, x_ss=x_ss, eps=eps, glu=glu, resid=resid, next_norm=next_norm)
