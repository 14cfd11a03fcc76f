"""Thin wrappers over the compiled ops in ``ltengine._C`` (sources in ``csrc/``).

Each wrapper checks its arguments (raising ValueError with the bad value and what is allowed), makes
small inputs contiguous, and calls ``torch.ops.ltengine.*``. Reference twins: ``reference.py``.

- ``truncate_kv_``: CPU and CUDA, any dtype; the CUDA op reads lengths on the device (no host sync).
- ``decode_full`` / ``decode_sink_window``: CUDA only, bfloat16/float16, head dim 64 or 128; q [B, H_q, D],
  k/v [B, T, H_kv, D] with the last dim contiguous and 16-byte aligned rows (else copied contiguous).
"""

from __future__ import annotations

import torch

try:  # importing the extension registers torch.ops.ltengine.*
    from ltengine import _C  # type: ignore[attr-defined]
except ImportError:
    _C = None

DECODE_DTYPES = (torch.bfloat16, torch.float16)
DECODE_HEAD_DIMS = (64, 128)


def has_cpu_ext() -> bool:
    """The extension is built (every build includes the CPU truncate_kv_)."""
    return _C is not None


def has_cuda_ext() -> bool:
    """The extension was built with its CUDA kernels."""
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def decode_supports(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in DECODE_DTYPES and head_dim in DECODE_HEAD_DIMS


def _check_lengths(lengths: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"lengths must be [B={batch}], got shape {tuple(lengths.shape)}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be int32 or int64, got {lengths.dtype}")
    if lengths.device != device or not lengths.is_contiguous():
        lengths = lengths.to(device).contiguous()
    return lengths


def _aligned_rows(t: torch.Tensor) -> bool:
    es = t.element_size()
    return (
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all((t.stride(i) * es) % 16 == 0 for i in range(t.dim() - 1))
    )


def _decode(q, k, v, lengths, scale, out, num_splits):
    if _C is None or not has_cuda_ext():
        raise RuntimeError("ltengine._C was built without CUDA kernels (see setup.py)")
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q [B, H_q, D] and k, v [B, T, H_kv, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if not q.is_cuda or k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one CUDA device; got {q.device}, {k.device}, {v.device}")
    if q.dtype not in DECODE_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtype must be one of {DECODE_DTYPES} for q, k and v alike; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h_q, d = q.shape
    if d not in DECODE_HEAD_DIMS:
        raise ValueError(f"head dim {d} not supported by the CUDA kernel; allowed {DECODE_HEAD_DIMS}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B or D")
    if k.shape[2] == 0 or h_q % k.shape[2] != 0:
        raise ValueError(f"H_q={h_q} must be a multiple of H_kv={k.shape[2]}")
    lengths = _check_lengths(lengths, b, q.device)
    q = q if _aligned_rows(q) else q.contiguous()
    k = k if _aligned_rows(k) else k.contiguous()  # a copy of the cache: correct but slow
    v = v if _aligned_rows(v) else v.contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}")
    torch.ops.ltengine.decode(q, k, v, lengths, float(scale), out, int(num_splits))
    return out


def decode_full(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int = 0,
) -> torch.Tensor:
    """Decode attention over keys [0, lengths[b]) of a full cache k/v [B, T_cap, H_kv, D] -> [B, H_q, D].

    Lengths must be <= T_cap (larger values are clamped on the device). ``num_splits`` = key chunks
    per sequence (0: chosen to fill the GPU).
    """
    return _decode(q, k, v, lengths, scale, out, num_splits)


def decode_sink_window(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    sink: int,
    window: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int = 0,
) -> torch.Tensor:
    """Decode attention over a sink + window cache k/v [B, sink + window, H_kv, D] -> [B, H_q, D].

    The valid slots are [0, min(len, sink + window)) (the ring fills from slot ``sink``), so this is
    the full-cache kernel over the sink and the ring in place.
    """
    if sink < 0 or window < 1:
        raise ValueError(f"need sink >= 0 and window >= 1; got sink={sink}, window={window}")
    if k.dim() != 4 or k.shape[1] != sink + window:
        raise ValueError(f"k must be [B, sink + window = {sink + window}, H_kv, D]; got {tuple(k.shape)}")
    return _decode(q, k, v, lengths, scale, out, num_splits)


def truncate_kv_(k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """In place: move tokens [L - window, L) to their ring slots (see reference.truncate_kv_ref_).

    k, v: [B, T_cap, H_kv, D] with the last dim contiguous, on CPU or CUDA, any dtype. Returns
    min(lengths, sink + window). On CUDA, lengths > T_cap are skipped on the device (not checked).
    """
    if _C is None:
        raise RuntimeError("ltengine._C is not built (see setup.py)")
    if sink < 0 or window < 1:
        raise ValueError(f"need sink >= 0 and window >= 1; got sink={sink}, window={window}")
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"k, v must be [B, T_cap, H_kv, D] of one shape; got {tuple(k.shape)}, {tuple(v.shape)}")
    if v.dtype != k.dtype or v.device != k.device:
        raise ValueError(f"k and v must share dtype and device; got {k.dtype}/{k.device}, {v.dtype}/{v.device}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"k and v need a contiguous last dim; got strides {k.stride()}, {v.stride()}")
    if k.is_cuda and not has_cuda_ext():
        raise RuntimeError("ltengine._C was built without CUDA kernels (see setup.py)")
    dev_lengths = _check_lengths(lengths, k.shape[0], k.device)
    if not k.is_cuda and dev_lengths.numel():  # CPU: free to check here (errors thrown from C++ are avoided)
        lo, hi = int(dev_lengths.min()), int(dev_lengths.max())
        if lo < 0 or hi > k.shape[1]:
            raise ValueError(f"lengths must lie in [0, T_cap={k.shape[1]}]; got min {lo}, max {hi}")
    torch.ops.ltengine.truncate_kv_(k, v, dev_lengths, int(sink), int(window))
    return lengths.clamp(max=sink + window)


if _C is not None:
    # Shapes for torch.compile / meta tensors: the ops return nothing and write in place.
    try:
        @torch.library.register_fake("ltengine::decode")
        def _decode_fake(q, k, v, lengths, scale, out, num_splits):
            return None

        @torch.library.register_fake("ltengine::truncate_kv_")
        def _truncate_fake(k, v, lengths, sink, window):
            return None
    except (AttributeError, RuntimeError):  # older torch, or registered twice on reload
        pass
