"""The one Triton import guard of the kernels package: ``triton``/``tl`` are None without Triton."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - CPU-only installs (or a broken Triton): the references run
    triton = None
    tl = None


def available() -> bool:
    """Triton is importable and a CUDA GPU is visible."""
    return triton is not None and torch.cuda.is_available()
