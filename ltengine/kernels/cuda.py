"""Thin wrappers over the compiled ops in ``ltengine._C`` (sources in ``csrc/``).

Each wrapper puts small index inputs where the op wants them and calls ``torch.ops.ltengine.*``; the
argument checks live in C++ (``TORCH_CHECK``, raised in Python as ``RuntimeError`` with the bad value).
Reference twins: ``reference.py`` (truncate_kv_), ``paged.py`` (paged_decode_ref, paged_truncate_ref_).

- ``truncate_kv_``: contiguous caches, CPU and CUDA, any dtype; lengths read on the device (no host sync).
- ``paged_truncate_``: CPU and CUDA, any dtype; one launch for N rows.
- ``paged_decode``: CUDA, bf16/fp16 (tensor-core kernel up to D 128) and fp32 (exact fp32 dots); head
  dims a multiple of 8 up to 256; the balanced split-K schedule, CUDA-graph capturable.
"""

from __future__ import annotations

import torch

try:  # importing the extension registers torch.ops.ltengine.*
    from ltengine import _C  # type: ignore[attr-defined]
except ImportError:
    _C = None

PAGED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def has_cpu_ext() -> bool:
    """The extension is built (every build includes the CPU truncations)."""
    return _C is not None


def has_cuda_ext() -> bool:
    """The extension was built with its CUDA kernels."""
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def paged_supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Where the backend runs the CUDA paged decode first: fp32 (exact fp32 dots; 66% of copy bandwidth
    against Triton's 20% at 8x8k on the H200). bf16/fp16 go to Triton, which measured faster on every
    shape (bench/RESULTS.md, issue 11); the op itself computes them too (D % 8 == 0, D <= 256)."""
    return dtype == torch.float32 and 8 <= head_dim <= 256 and head_dim % 8 == 0


def _index(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Lengths / tables as the op reads them: on its device, int32, contiguous (no-ops when already so)."""
    return t.to(device=device, dtype=torch.int32).contiguous()


def truncate_kv_(k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """In place on k/v ``[B, T_cap, H_kv, D]``: token p in [L - window, L) of a sequence of L > sink + window
    tokens moves to slot ``ring_slot(p)``; returns ``min(lengths, sink + window)``."""
    dev_lengths = lengths.to(k.device).contiguous()
    torch.ops.ltengine.truncate_kv_(k, v, dev_lengths, int(sink), int(window))
    return lengths.clamp(max=sink + window)


def paged_truncate_(k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
                    sink: int, window: int) -> None:
    """In place: row n's tokens [L - window, L) (L = lengths[n]) move to their ring slots in the blocks
    ``tables[n]`` (slot order) of pools ``[num_blocks, block_size, H_kv, D]``; rows with L <= sink + window
    are untouched. Same contract as ``paged.paged_truncate_ref_``."""
    torch.ops.ltengine.paged_truncate_(k_pool, v_pool, _index(tables, k_pool.device),
                                       lengths.to(k_pool.device).contiguous(), int(sink), int(window))


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 n_valid: torch.Tensor, scale: float, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None, *, programs: int = 0, min_chunk: int = 0) -> torch.Tensor:
    """Decode attention of q ``[B, H_q, D]`` over slots ``[0, n_valid[b])`` of row b's blocks ``tables[b]``
    in pools ``[num_blocks, block_size, H_kv, D]`` -> ``[B, H_q, D]`` (a row with no keys gets zeros).

    ``programs`` (target chunks over all kv heads; 0: 16 per SM) and ``min_chunk`` (fewest keys per
    chunk; 0: 128) tune the balanced schedule. Same contract as ``paged.paged_decode_ref``, except fp8:
    the csrc kernel reads bf16/fp16/fp32 pools only (fp8 pools decode through Triton or the reference)."""
    if k_scale is not None or v_scale is not None or k_pool.dtype not in PAGED_DTYPES:
        raise NotImplementedError(f"the csrc paged_decode reads {[str(d) for d in PAGED_DTYPES]} pools without "
                                  f"scales, got a {k_pool.dtype} pool; fp8 pools decode through the Triton kernel "
                                  "(paged.paged_decode_triton) or the reference (paged.paged_decode_ref)")
    return torch.ops.ltengine.paged_decode(q, k_pool, v_pool, _index(tables, q.device), _index(n_valid, q.device),
                                           float(scale), int(programs), int(min_chunk))


if _C is not None:
    # Shapes for torch.compile / meta tensors.
    try:
        @torch.library.register_fake("ltengine::truncate_kv_")
        def _truncate_fake(k, v, lengths, sink, window):
            return None

        @torch.library.register_fake("ltengine::paged_truncate_")
        def _paged_truncate_fake(k_pool, v_pool, tables, lengths, sink, window):
            return None

        @torch.library.register_fake("ltengine::paged_decode")
        def _paged_decode_fake(q, k_pool, v_pool, tables, n_valid, scale, programs, min_chunk):
            return torch.empty_like(q, memory_format=torch.contiguous_format)
    except (AttributeError, RuntimeError):  # older torch, or registered twice on reload
        pass
