"""Thin wrappers over the compiled ops in ``ltengine._C`` (sources in ``csrc/``).

Each wrapper puts small index inputs where the op wants them and calls ``torch.ops.ltengine.*``; the
argument checks live in C++ (``TORCH_CHECK``, raised in Python as ``RuntimeError`` with the bad value).
Reference twins: ``reference.py`` (truncate_kv_), ``paged.py`` (paged_decode_ref, paged_truncate_ref_).

- ``truncate_kv_``: contiguous caches, CPU and CUDA, any dtype; lengths read on the device (no host sync).
- ``paged_truncate_``: CPU and CUDA, any dtype; one launch for N rows.
- ``paged_decode``: CUDA; bf16/fp16 pools (tensor cores, a cp.async ring per warp) and fp8 e4m3 pools with
  per-row scales (fp16 tensor cores after an exact e4m3 -> fp16 conversion), head dims a multiple of 8
  (fp8: 16) up to 256; fp32 pools by exact fp32 dots. The balanced split-K schedule, CUDA-graph capturable.
- ``skinny_linear``: CUDA; ``x [M, K] @ w[N, K].T + bias`` for 1..8 rows, bf16/fp16, K % 8 == 0, with the
  RMSNorm factor, silu(gate) * up or the residual add in its epilogue (the decode step's projections with the
  elementwise kernels around them folded in; reference twin ``linear.linear_ref``, chosen in ``linear.py``).
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
    """Pools the CUDA paged decode reads (``dtype`` is the pool's): bf16/fp16/fp32 with D a multiple of 8,
    and fp8 e4m3 (with scales) with D a multiple of 16; D up to 256."""
    if dtype == torch.float8_e4m3fn:
        return 16 <= head_dim <= 256 and head_dim % 16 == 0
    return dtype in PAGED_DTYPES and 8 <= head_dim <= 256 and head_dim % 8 == 0


# Pools where the CUDA kernel runs before Triton: every pool it reads, but for 16-bit pools with D > 128,
# where its ring holds one CTA per SM (H200, bench/RESULTS.md, issue 11, session 8: bf16 at D 256 75% of
# copy vs Triton's 89%; at D <= 128 0.97-1.05x Triton on the engine's shapes, 1.02-1.05x on the budget ones;
# fp8 1.0-1.9x, fp32 4x).
def paged_first(dtype: torch.dtype, head_dim: int) -> bool:
    """The backend puts the CUDA paged decode before Triton for this pool."""
    return paged_supports(dtype, head_dim) and not (dtype in (torch.bfloat16, torch.float16) and head_dim > 128)


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
                 v_scale: torch.Tensor | None = None, *, programs: int = 0, min_chunk: int = 0,
                 stages: int = 0, overlap: bool = False) -> torch.Tensor:
    """Decode attention of q ``[B, H_q, D]`` over slots ``[0, n_valid[b])`` of row b's blocks ``tables[b]``
    in pools ``[num_blocks, block_size, H_kv, D]`` -> ``[B, H_q, D]`` (a row with no keys gets zeros).
    An fp8 pool passes its per-row scales ``k_scale``/``v_scale`` ``[num_blocks, block_size, H_kv]``.

    ``programs`` (the most chunks over all kv heads; 0: whole waves of resident CTAs, ~12 per SM; the
    kernel picks the cheapest wave count under it) and ``min_chunk`` (fewest keys per chunk; 0: 128)
    tune the balanced schedule; ``stages`` (0: the default, 2; or 3, 4 for 16-bit D in (64, 128])
    the depth of each warp's cp.async ring. Same contract as ``paged.paged_decode_ref``.

    ``overlap``: launch by programmatic dependent launch (sm_90+, unless ``LTENGINE_PDL=0``), so that the
    kernel's prologue (the schedule from ``n_valid``, the first block-table reads) runs while the previous
    kernel in the stream finishes; q, the pools and everything else are read after it. Only for callers whose
    previous kernel does not write ``tables`` or ``n_valid`` (the paged runner's step: they are set at its
    start); a caller that computes them right before this call keeps the default."""
    return torch.ops.ltengine.paged_decode(q, k_pool, v_pool, _index(tables, q.device), _index(n_valid, q.device),
                                           float(scale), k_scale, v_scale, int(programs), int(min_chunk), int(stages),
                                           bool(overlap))


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, stages: int = 0,
                  x_ss: torch.Tensor | None = None, eps: float = 0.0, glu: bool = False,
                  resid: torch.Tensor | None = None, next_norm: torch.Tensor | None = None):
    """``x [M, K] @ w[N, K].T (+ bias[N]) -> [M, N]`` for 1 <= M <= 8, bf16/fp16, K % 8 == 0, contiguous
    16-byte-aligned x and w; fp32 accumulation, with the decode step's elementwise work in the epilogue:
    ``x_ss [M, P]`` (x is RMSNorm's input times its weight; the rows' partial sums of squares of that input)
    scales each row by rsqrt(sum / K + eps) before the bias; ``glu`` (w = [gate; up], 2I rows) gives
    silu(gate) * up ``[M, I]``; ``resid [M, N]`` adds the residual and returns ``(h, h_ss, hn)``: h_ss
    ``[M, ceil(N / 16)]`` fp32 partial sums of h^2 and hn = h * next_norm (None without it), the next
    ``x_ss`` call's inputs. Same contract as ``linear.linear_ref``. ``stages``: the depth of each warp's
    cp.async ring (0: 3 or 4 by the shape; 3, 4 or 6)."""
    out, out_ss, out_hn = torch.ops.ltengine.skinny_linear(x, w, bias, int(stages), x_ss, float(eps), bool(glu),
                                                           resid, next_norm)
    if resid is None:
        return out
    return out, out_ss, (out_hn if next_norm is not None else None)


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
        def _paged_decode_fake(q, k_pool, v_pool, tables, n_valid, scale, k_scale, v_scale, programs, min_chunk, stages,
                               overlap=False):
            return torch.empty_like(q, memory_format=torch.contiguous_format)

        @torch.library.register_fake("ltengine::skinny_linear")
        def _skinny_linear_fake(x, w, bias, stages, x_ss, eps, glu, resid, next_norm):
            m, n = x.shape[0], w.shape[0]
            return (x.new_empty((m, n // 2 if glu else n)),
                    x.new_empty((m if resid is not None else 0, -(-n // 16)), dtype=torch.float32),
                    x.new_empty((m if next_norm is not None else 0, n)))
    except (AttributeError, RuntimeError):  # older torch, or registered twice on reload
        pass
