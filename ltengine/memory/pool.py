"""KVPool: one preallocated K and V block pool that every layer of every sequence draws from.

A block holds ``block_size`` tokens of one layer of one sequence, all KV heads: the pool tensors are
``[num_blocks, block_size, H_kv, D]`` (token-major inside a block, like the contiguous caches). A
full layer owns ``ceil(tokens / block_size)`` blocks and gains one more as decode crosses a block
boundary; a lazy layer owns at most ``ceil((sink + window) / block_size)``. Truncation, finishing and
preemption hand blocks back at once.

Blocks are reference-counted so that a document session's prefix is held once and read by every
question on it (``share``): ``free`` drops one reference, and a block returns to the pool with its last.
An fp8 pool (``dtype=float8_e4m3fn``) also holds ``k_scale`` and ``v_scale`` ``[num_blocks, block_size,
H_kv]`` float32: one scale per token and KV head (``kernels/fp8.py`` says why), moved with their rows.
"""
from __future__ import annotations

import torch

from ..kernels.fp8 import SCALE_DTYPE, is_fp8, row_bytes


class PoolExhausted(RuntimeError):
    pass


class KVPool:
    """``num_blocks`` K and V blocks. ``growable``: an unbounded pool (no ``kv_budget`` on CPU) that
    doubles its tensors when it runs out, instead of raising; never used under CUDA graphs, whose
    captured kernels hold the tensors' addresses."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, growable: bool = False):
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self.growable = growable
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.scaled = is_fp8(dtype)
        self.k_scale = torch.ones(shape[:3], dtype=SCALE_DTYPE, device=device) if self.scaled else None
        self.v_scale = torch.ones(shape[:3], dtype=SCALE_DTYPE, device=device) if self.scaled else None
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low block ids first
        self._refs = [0] * num_blocks  # holders of each block (0: free)
        self.peak_used = 0

    @staticmethod
    def block_bytes(block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one K block plus one V block (fp8: their scales included)."""
        return 2 * block_size * num_kv_heads * row_bytes(head_dim, dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def _tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v] + ([self.k_scale, self.v_scale] if self.scaled else [])

    @property
    def bytes_per_block(self) -> int:
        return sum(t[0].nbytes for t in self._tensors())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors())

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            if not self.growable:
                raise PoolExhausted(f"KV pool has {len(self._free)} free blocks, {n} requested")
            self._grow(max(self.num_blocks, n - len(self._free)))
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        self.peak_used = max(self.peak_used, self.used_blocks)
        return out

    def share(self, blocks: list[int]) -> None:
        """One more holder of each of ``blocks`` (already allocated): a session's question reading them."""
        for b in blocks:
            if self._refs[b] < 1:
                raise RuntimeError(f"KV pool block {b} is free; only allocated blocks can be shared")
            self._refs[b] += 1

    def refs(self, block: int) -> int:
        return self._refs[block]

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block with no holder left goes back to the pool."""
        back = []
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                back.append(b)
            elif self._refs[b] < 0:
                raise RuntimeError(f"KV pool block {b} freed more often than it was allocated and shared")
        self._free.extend(reversed(back))

    def _grow(self, extra: int) -> None:
        old = self.num_blocks
        self.k = torch.cat([self.k, self.k.new_empty((extra, *self.k.shape[1:]))])
        self.v = torch.cat([self.v, self.v.new_empty((extra, *self.v.shape[1:]))])
        if self.scaled:
            self.k_scale = torch.cat([self.k_scale, self.k_scale.new_ones((extra, *self.k_scale.shape[1:]))])
            self.v_scale = torch.cat([self.v_scale, self.v_scale.new_ones((extra, *self.v_scale.shape[1:]))])
        self.num_blocks = old + extra
        self._refs += [0] * extra
        self._free = list(range(self.num_blocks - 1, old - 1, -1)) + self._free
