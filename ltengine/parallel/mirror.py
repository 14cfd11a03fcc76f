"""SPMD driving: rank 0 owns the inputs, the other ranks mirror them.

Every rank runs the same deterministic scheduler and stepper on the same inputs, so all make the same
admission, preemption and demotion decisions and issue the same collectives in the same order. Rank
0 records each call that changes the engine's inputs (``add_request``, ``abort``, a new ``kv_budget``)
as it applies it, and at the start of every ``step`` broadcasts the calls recorded since the last one;
the other ranks replay them (``launch.apply``), then run the step. Greedy tokens agree because every
rank argmaxes the same gathered logits; sampled ones because every rank's generator has rank 0's seed.
"""
from __future__ import annotations

from .comm import TPGroup


class Mirror:
    def __init__(self, group: TPGroup):
        self.group, self.ops, self.stopped = group, [], False

    def record(self, *op) -> None:
        if self.group.driver:
            self.ops.append(op)

    def sync(self, action: str = "step") -> None:
        """Rank 0: send what was recorded and what to do next ("step" or "stop")."""
        if self.stopped:
            raise RuntimeError("this tensor-parallel engine is closed (its workers have stopped); build a new one")
        self.group.check_workers()
        ops, self.ops = self.ops, []
        self.group.broadcast((ops, action))
        if action == "stop":
            self.stopped = True
