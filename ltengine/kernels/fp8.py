"""fp8 KV storage: ``float8_e4m3fn`` values with one float32 scale per token and KV head.

A stored row ``x [..., D]`` (one token, one KV head) becomes ``x8 = round(x / s)`` in e4m3 and
``s = amax(|x|) / 448`` (448: e4m3's largest finite value; an all-zero row gets ``s = 1``), so the row's
largest element lands on the format's top and ``x ~= x8 * s``: a relative error of at most 2^-4 per
element (3 mantissa bits, round to nearest) where ``|x| >= 2^-6 * s`` (e4m3's normal range), an
absolute one of at most 2^-10 * s below it (its subnormals).

Why per token and head: a row is quantized once, when it is stored, and never again: decode writes a
new token's rows without touching any other, demotion (``paged_truncate_`` / ``truncate_kv_``) moves
a row's scale with it by the same op (scales are a ``[..., H_kv, 1]`` twin of the pool), and a key
row's scale factors out of its dot product (``q . (k8 s) = (q . k8) s``), so the decode kernels
dequantize in registers with one multiply per score and per probability. Coarser scales (per block,
per layer and head) save the 4 bytes per row (3% of a D = 128 fp8 row) but need a running maximum:
a decode token above it forces the block to be requantized or clipped, and even their best case
(amax over tokens not yet seen) measured 24-29% more attention-output error on the default model's K/V
(``bench/fp8_granularity.py``; ``bench/RESULTS.md``, "fp8 KV")."""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_DTYPE = torch.float32
SCALE_BYTES = 4  # one float32 scale per token, KV head and K or V

KV_DTYPES = {"fp8": FP8, "float8_e4m3fn": FP8, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
_FLOATS = (FP8, torch.bfloat16, torch.float16, torch.float32)


def resolve_kv_dtype(value) -> torch.dtype | None:
    """``None`` / ``"auto"`` (the model's dtype) -> None; ``"fp8"`` -> ``float8_e4m3fn``; a name from
    ``KV_DTYPES`` or a torch float dtype -> that dtype. Anything else: ValueError naming what is allowed."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return None
    if isinstance(value, str) and value in KV_DTYPES:
        return KV_DTYPES[value]
    if isinstance(value, torch.dtype) and value in _FLOATS:
        return value
    raise ValueError(f"kv_dtype must be None, 'auto', one of {sorted(KV_DTYPES)} or one of "
                     f"{[str(d) for d in _FLOATS]}, got {value!r}")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8


def element_bytes(dtype: torch.dtype) -> int:
    """Bytes per stored element of one K or V row, scales excluded."""
    return torch.empty((), dtype=dtype).element_size()


def row_bytes(head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one token's K (or V) row of one KV head in storage, its scale included."""
    return head_dim * element_bytes(dtype) + (SCALE_BYTES if is_fp8(dtype) else 0)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` (any float dtype) -> (``[..., D]`` e4m3, scales ``[...]`` float32), per row."""
    xf = x.float()
    scale = xf.abs().amax(-1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (xf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``quantize``: ``x8 [..., D]`` and ``scale [...]`` -> ``[..., D]`` in ``dtype``."""
    return (x8.float() * scale.unsqueeze(-1)).to(dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 view of an fp8 tensor (index_copy_ has no fp8 kernel on the CPU); others unchanged."""
    return t.view(torch.uint8) if is_fp8(t.dtype) else t


def take_rows(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``src[idx]`` for any storage dtype (fp8 gathered as bytes: no fp8 indexing kernel needed)."""
    return as_bytes(src)[idx].view(src.dtype) if is_fp8(src.dtype) else src[idx]


def put_rows_(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.index_copy_(0, rows, src)`` for any storage dtype (``src`` cast to it unless fp8, which
    must come from ``quantize``)."""
    if is_fp8(dst.dtype):
        as_bytes(dst).index_copy_(0, rows, as_bytes(src))
    else:
        dst.index_copy_(0, rows, src.to(dst.dtype))
