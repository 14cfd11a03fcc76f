"""The process groups of one tensor-parallel engine and the few collectives it uses.

Two groups over the same ranks: ``data`` (NCCL on CUDA, gloo on CPU) carries the activations: one
all-reduce after each row-parallel projection and the all-gather of the vocabulary-parallel logits;
``control`` (always gloo, on the host) carries what rank 0 broadcasts before every step (new requests,
aborts) and the per-layer score sums, so neither waits on the GPU stream. Collectives on ``data`` time
out after ``LTENGINE_TP_TIMEOUT`` seconds (300), so a rank that dies mid-step makes the others raise
instead of hanging; ``control`` waits up to ``LTENGINE_TP_IDLE_TIMEOUT`` (7 days) between steps, since
an idle server sends nothing, and gloo raises at once when the peer's connection closes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; 2.11 has only the old name
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _seconds(name: str, default: float) -> timedelta:
    value = os.environ.get(name)
    try:
        return timedelta(seconds=float(value) if value else default)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None


def step_timeout() -> timedelta:
    return _seconds("LTENGINE_TP_TIMEOUT", 300.0)


def idle_timeout() -> timedelta:
    return _seconds("LTENGINE_TP_IDLE_TIMEOUT", 7 * 24 * 3600.0)


@dataclass
class TPGroup:
    """This process's place in a tensor-parallel engine of ``world`` ranks on one host."""

    rank: int
    world: int
    device: torch.device
    data: object = None  # ProcessGroup for activations
    control: object = None  # gloo ProcessGroup for host-side messages
    workers: list = field(default_factory=list)  # spawned worker processes (rank 0 of a spawned engine)
    torchrun: bool = False  # launched by torchrun (every rank runs the user's script)
    owns_default: bool = False  # this engine initialised the default process group (and destroys it)
    default_budget: int | None = None  # the CUDA default KV budget all ranks agreed on (total bytes)

    @property
    def driver(self) -> bool:
        """Rank 0 owns the inputs and returns the outputs."""
        return self.rank == 0

    # ------------------------------------------------------------------ activations
    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over ranks, in place (every rank gets the same bits)."""
        dist.all_reduce(x, group=self.data)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` ``[..., n]`` along the last dim, rank order: ``[..., world * n]``."""
        lead, n = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, n).contiguous()
        out = flat.new_empty((self.world * flat.shape[0], n))
        _all_gather(out, flat, group=self.data)
        return out.view(self.world, -1, n).transpose(0, 1).reshape(*lead, self.world * n)

    # ------------------------------------------------------------------ host messages
    def broadcast(self, obj=None):
        """Rank 0's ``obj`` on every rank (pickled over the control group)."""
        box = [obj if self.driver else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def reduce_host(self, values: list[float], op: str) -> list[float]:
        """Element-wise ``op`` ("sum", "min") of host floats over ranks, in float64."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN, group=self.control)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier(group=self.control)

    def check_workers(self) -> None:
        """Raise if a spawned worker process has exited (rank 0 checks before every step)."""
        for rank, proc in enumerate(self.workers, start=1):
            if not proc.is_alive():
                raise RuntimeError(f"tensor-parallel worker rank {rank} of {self.world} has exited "
                                   f"(exit code {proc.exitcode}); this engine cannot step any more: close it "
                                   "and build a new one")
