"""Start the ranks of a tensor-parallel engine: under ``torchrun``, or spawned by the engine itself.

``torchrun --nproc-per-node N script.py`` runs the script on every rank: ``Engine(..., tensor_parallel=N)``
reads RANK / WORLD_SIZE / LOCAL_RANK, joins the process group, and on ranks > 0 serves rank 0 until it
closes, then exits the process (the code after ``Engine(...)`` runs on rank 0 only). In a plain process,
``Engine(..., tensor_parallel=N)`` spawns ranks 1..N-1 itself (``torch.multiprocessing``, spawn context,
daemonic), hands each the full model (CPU tensors through shared memory, CUDA tensors through IPC) and
the tokenizer; each copies out its shard. Either way rank 0 broadcasts its engine settings, so every
rank builds the same engine. Rank r runs on ``cuda:r`` (``cuda:LOCAL_RANK``) for a CUDA model, NCCL
for activations; a CPU model uses gloo.
"""
from __future__ import annotations

import atexit
import datetime
import os
import time
import traceback
import weakref

import torch
import torch.distributed as dist

from .comm import TPGroup, idle_timeout, step_timeout
from .sharding import check_divisible, shard_model

_UP = "ltengine/tp/up/{}"


def _device(model_device: torch.device, rank: int) -> torch.device:
    if model_device.type != "cuda":
        return torch.device("cpu")
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def _groups(rank: int, world: int, device: torch.device, **init) -> TPGroup:
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=step_timeout(), **init)
    elif dist.get_world_size() != world:
        raise ValueError(f"tensor_parallel={world}, but the process group already running has "
                         f"{dist.get_world_size()} ranks; launch with torchrun --nproc-per-node {world}")
    control = dist.new_group(backend="gloo", timeout=idle_timeout())
    return TPGroup(rank, world, device, data=dist.group.WORLD, control=control, owns_default=owns)


def start(n, model, tokenizer, settings: dict):
    """This rank's sharded model, tokenizer, engine settings (rank 0's) and group.

    ``n`` is the requested rank count, or the TPGroup of a spawned worker that joined already."""
    if isinstance(n, TPGroup):  # a spawned worker: the group and the settings came from rank 0
        group = n
        shard_model(model, group)
        group.barrier()  # rank 0 shards its own copy only once every worker has copied its slices
        return model, tokenizer, settings, group
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel must be an integer >= 1, got {n!r}")
    check_divisible(model.config, n)
    model_device = next(model.parameters()).device
    if model_device.type == "cuda" and torch.cuda.device_count() < n:
        raise ValueError(f"tensor_parallel={n} needs {n} GPUs, but {torch.cuda.device_count()} are visible")
    if "WORLD_SIZE" in os.environ:
        group = _join_torchrun(n, model_device)
        settings = group.broadcast(settings)
        shard_model(model, group)
        return model, tokenizer, settings, group
    group = _spawn(n, model, tokenizer, model_device)
    group.broadcast(settings)
    group.barrier()
    shard_model(model, group)
    return model, tokenizer, settings, group


def _join_torchrun(n: int, model_device: torch.device) -> TPGroup:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world != n:
        raise ValueError(f"tensor_parallel={n}, but torchrun started WORLD_SIZE={world} ranks; "
                         f"run torchrun --nproc-per-node {n}")
    group = _groups(rank, world, _device(model_device, int(os.environ.get("LOCAL_RANK", rank))))
    group.torchrun = True
    return group


def _spawn(n: int, model, tokenizer, model_device: torch.device) -> TPGroup:
    store = dist.TCPStore("127.0.0.1", 0, n, True, timeout=step_timeout(), wait_for_workers=False)
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(r, n, store.port, model, tokenizer), daemon=True,
                         name=f"ltengine-tp-rank{r}") for r in range(1, n)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + step_timeout().total_seconds()
    try:
        for r, p in enumerate(procs, start=1):  # wait for each worker, failing fast if one dies starting
            while not store.check([_UP.format(r)]):
                if not p.is_alive():
                    raise RuntimeError(f"tensor-parallel worker rank {r} exited while starting (exit code "
                                       f"{p.exitcode}; its traceback is on stderr). A script that builds the "
                                       "engine must do so under `if __name__ == \"__main__\":` (spawned "
                                       "workers import it)")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tensor-parallel worker rank {r} did not start within "
                                       f"{step_timeout()} (LTENGINE_TP_TIMEOUT)")
                time.sleep(0.05)
        group = _groups(0, n, _device(model_device, 0), store=store)
    except BaseException:
        for p in procs:
            p.kill()
            p.join(5)
        raise
    group.workers = procs
    return group


def _worker_main(rank: int, world: int, port: int, model, tokenizer) -> None:
    """A spawned rank: join, build the same engine as rank 0, mirror its steps until it stops."""
    device = _device(next(model.parameters()).device, rank)
    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=step_timeout())
    store.set(_UP.format(rank), "1")
    group = _groups(rank, world, device, store=store)
    settings = group.broadcast()
    from ..engine import Engine

    engine = Engine(model, tokenizer, tensor_parallel=group, **settings)
    serve(engine)


def serve(engine) -> None:
    """Ranks > 0: apply rank 0's inputs and run the same step, until rank 0 stops the engine. An error
    that a step raises was raised on rank 0 too (the state is the same), so it is reported and the
    loop goes on; a broken group ends it."""
    from ..stepper import step

    group = engine.tp
    try:
        while True:
            ops, action = group.broadcast()
            apply(engine, ops)
            if action == "stop":
                break
            try:
                step(engine)
            except Exception:  # noqa: BLE001 - mirrored: rank 0 raised the same and reported it
                if not dist.is_initialized():
                    raise
                traceback.print_exc()
    finally:
        shutdown(group)


def apply(engine, ops: list[tuple]) -> None:
    """Replay rank 0's calls since the last step on this rank's engine, in order."""
    for op in ops:
        if op[0] == "add":
            _, ids, params, lazy, rid = op
            engine.add_request(ids, params, lazy, request_id=rid)
        elif op[0] == "abort":
            engine.abort(op[1])
        elif op[0] == "budget":
            engine.kv_budget = op[1]


def stop_workers(engine) -> None:
    """Rank 0: tell the other ranks to stop (after ``close`` has aborted everything), wait for spawned
    workers, and leave the process group."""
    group = engine.tp
    try:
        group.check_workers()
        engine.mirror.sync("stop")
    except Exception:  # noqa: BLE001 - a dead worker: nothing to stop
        pass
    shutdown(group)  # (before the joins: a worker leaves only once every rank is past the barrier)
    for p in group.workers:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join(5)


SHUTDOWN_BARRIER_S = 10.0  # how long a rank waits for the others at shutdown before leaving anyway


def shutdown(group: TPGroup) -> None:
    """Leave the process group, after a barrier on the control group: a rank that tore its connections
    down while another was still in its last collective made that one abort (gloo, SIGABRT at exit,
    seen once in CI). A dead peer costs the barrier's timeout, then the rank leaves anyway."""
    if group.owns_default and dist.is_initialized():
        try:
            dist.monitored_barrier(group=group.control, timeout=datetime.timedelta(seconds=SHUTDOWN_BARRIER_S))
        except Exception:  # noqa: BLE001 - a peer already gone: nothing left to wait for
            pass
        dist.destroy_process_group()
    group.owns_default = False


def close_at_exit(engine) -> None:
    """Stop the workers when rank 0's interpreter exits with the engine still open."""
    ref = weakref.ref(engine)

    def _close():
        e = ref()
        if e is not None and e.tp is not None and dist.is_initialized():
            e.close()

    atexit.register(_close)
