"""What the engine sees of one rank: its runner in model-wide bytes, and scores reduced over ranks.

Every rank's pool holds its 1/N of the KV heads, so each byte quantity of a rank's runner is exactly
1/N of the single-process engine's. ``ShardedRunner`` multiplies them back: the scheduler plans and
admits against the total ``kv_budget`` and outputs report the whole model's KV bytes, with the same
decisions as one process (``N * a > N * b`` iff ``a > b``).
"""
from __future__ import annotations

from .comm import TPGroup


class ShardedRunner:
    """A rank's runner with every byte figure scaled to all ``world`` ranks; the rest passes through."""

    def __init__(self, runner, world: int):
        self._runner, self._world = runner, world

    def __getattr__(self, name):
        return getattr(self._runner, name)

    @property
    def capacity(self) -> int | None:
        c = self._runner.capacity
        return None if c is None else c * self._world

    @property
    def used(self) -> int:
        return self._runner.used * self._world

    @property
    def free(self) -> int | None:
        f = self._runner.free
        return None if f is None else f * self._world

    @property
    def peak(self) -> int:
        return self._runner.peak * self._world

    def footprint(self, *args, **kwargs) -> int:
        return self._runner.footprint(*args, **kwargs) * self._world

    def grow_need(self, handle, tokens: int) -> int:
        return self._runner.grow_need(handle, tokens) * self._world

    def swap_in_need(self, swapped) -> int:
        return self._runner.swap_in_need(swapped) * self._world

    def start_prefill(self, requests):
        task = self._runner.start_prefill(requests)
        finish = task._finish

        def scaled(logits):
            results = finish(logits)
            for res in results:
                res.kv_bytes *= self._world
            return results

        task._finish = scaled
        return task

    def prefill(self, requests):
        task = self.start_prefill(requests)
        task.advance()
        return task.results()


def reduced_scorer(rule: str, local, group: TPGroup):
    """A layer scorer whose score covers every rank's query heads (one host all-reduce per layer).

    "ratio": the mean kept mass over heads and probe rows, so the per-rank *sums* (local mean x local
    rows) and row counts are summed, then divided. "peak" / "cover": 1 - the largest head's distant
    mass (coverage), so the minimum of the ranks' scores (exact)."""
    if rule == "ratio":
        def score(q, k, sink, window, scale):
            rows = q.shape[0] * q.shape[1]  # this rank's query heads x probe rows
            total, count = group.reduce_host([local(q, k, sink, window, scale) * rows, rows], "sum")
            return total / count
    elif rule in ("peak", "cover"):
        def score(q, k, sink, window, scale):
            return group.reduce_host([local(q, k, sink, window, scale)], "min")[0]
    else:
        raise ValueError(f"tensor parallelism has no reduction for score rule {rule!r} (ratio, peak, cover)")
    return score
