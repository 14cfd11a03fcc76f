"""Tensor parallelism over the GPUs of one host (or CPU processes with gloo).

``Engine(model, tensor_parallel=N)`` shards the model Megatron-style (``sharding.py``: column-parallel
q/k/v and gate/up, row-parallel o and down with one all-reduce each, vocabulary-parallel head gathered
for sampling), starts or joins the ranks (``launch.py``: torchrun or spawned workers), and drives them
SPMD from rank 0 (``mirror.py``). LightTransfer stays one decision per layer: each rank scores its own
heads and the scores' sums are all-reduced before the queue decides (``runner.reduced_scorer``); each
rank's pool holds its share of the KV heads and ``kv_budget`` is the total (``runner.ShardedRunner``).
"""
from __future__ import annotations

from dataclasses import replace

from ..runners import default_cuda_budget
from .comm import TPGroup
from .launch import close_at_exit, serve, start, stop_workers
from .mirror import Mirror
from .runner import ShardedRunner, reduced_scorer
from .sharding import shard_model, tp_plan

__all__ = ["Mirror", "ShardedRunner", "TPGroup", "attach", "reduced_scorer", "serve", "shard_model", "start",
           "stop_workers", "tp_plan"]


def attach(engine) -> None:
    """Hook a freshly built engine into its group: scores reduced over ranks, rank 0's inputs mirrored,
    one KV budget every rank can hold, and no progress bars on ranks > 0."""
    group: TPGroup = engine.tp
    base = engine.backend.scorer
    engine.backend.scorer = lambda rule: reduced_scorer(rule, base(rule), group)
    engine.mirror = Mirror(group)
    if engine.kv_budget is None and engine.adapter.device.type == "cuda":
        # the runners' default from each rank's free memory; the smallest share wins
        share = group.reduce_host([default_cuda_budget(engine.adapter.device)], "min")[0]
        group.default_budget = engine._kv_budget = int(share) * group.world
    if group.driver:
        close_at_exit(engine)
    else:
        engine.config = replace(engine.config, progress=False)
