"""One engine iteration (``Engine.step``) and the loop ``generate`` runs over it.

A step: (1) the scheduler admits what fits and swaps preempted requests back in; (2) the prefill in
flight runs (all of it, or ``interleave_layers`` layers) and, once done, its requests sample their
first token; (3) every running request gets room for its next token (growing, or preempting the
newest) and one decode step is launched; with ``overlap`` the previous step's tokens are taken in
while this one runs on the GPU. Tokens are checked for EOS, stop strings and length here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import LazyConfig, SamplingParams
from .sampling import sample
from .sequence import GenerationOutput, GenerationStats, RequestOutput, Sequence, SequenceStatus

RUNNING = SequenceStatus.RUNNING


@dataclass
class _Launched:
    """A decode step enqueued on the device: its sequences, their sampled tokens and positions."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # [B] on the device
    positions: torch.Tensor
    host: torch.Tensor  # the tokens' host copy (non-blocking)
    event: object  # CUDA event after the copy, or None


def step(engine) -> list[RequestOutput]:
    sched = engine.scheduler
    outs: dict[str, RequestOutput] = {}
    if engine._prefill is None:
        _, groups = sched.admit()
        engine._prefill_queue.extend(groups)
        _start_next_prefill(engine)
    # without interleaving, every batch admitted now is prefilled before the next decode step (one
    # decode batch, as large as admission allows); with it, ``interleave_layers`` layers per step
    while engine._prefill is not None:
        _advance_prefill(engine, outs)
        if engine.config.interleave_layers:
            break
        _start_next_prefill(engine)
    prefilling = engine._prefill[1] if engine._prefill is not None else []
    running = [s for s in sched.running if s.status is RUNNING and s not in prefilling]
    launched = None
    if running:
        t0 = time.perf_counter()
        running = _make_room(engine, running, outs)
        if running:
            launched = _launch(engine, running)
        engine.totals["decode_s"] += time.perf_counter() - t0
    if engine._pending is not None or (launched is not None and not engine.overlap):
        done, launched = (engine._pending, launched) if engine.overlap else (launched, None)
        t0 = time.perf_counter()
        if done is not None:
            _take(engine, done, outs)
        engine.totals["decode_s"] += time.perf_counter() - t0
    engine._pending = launched
    return list(outs.values())


def _start_next_prefill(engine) -> None:
    while engine._prefill_queue and engine._prefill is None:
        group = [s for s in engine._prefill_queue.popleft() if s.finish_reason != "abort"]
        if group:
            engine._prefill = (engine.runner.start_prefill([engine._prefill_request(s) for s in group]), group, 0.0)


def _advance_prefill(engine, outs: dict) -> None:
    task, group, spent = engine._prefill
    sched = engine.scheduler
    t0 = time.perf_counter()
    try:
        done = _run_layers(engine, task, group)
        results = task.results() if done else None
    except BaseException:
        engine._prefill = None
        for seq in group:  # the task gave its KV back; the engine stays usable
            sched.remove(seq)
            engine._requests.pop(seq.request_id, None)
        raise
    dt = engine._timed() - t0
    engine.totals["prefill_s"] += dt
    if not done:
        engine._prefill = (task, group, spent + dt)
        return
    engine._prefill = None
    tokens = sum(len(s.prompt) for s in group)
    per_token = engine.adapter.kv_bytes_per_token_layer * engine.num_layers * (engine.tp.world if engine.tp else 1)
    live = []
    for seq, res in zip(group, results):
        sched.prefilled(seq)
        engine.totals["prompt_tokens"] += len(seq.prompt)
        seq.handle, seq.scores, seq.lazy_layers = res.handle, res.scores, res.lazy_layers
        s = seq.stats
        s.prefill_s, s.prefill_batch, s.prefill_batch_tokens = spent + dt, len(group), tokens
        s.kv_bytes_after_prefill, s.full_kv_bytes = res.kv_bytes, per_token * len(seq.prompt)
        if seq.finish_reason == "abort":  # aborted while its batch prefilled
            sched.remove(seq)
            continue
        seq.status = RUNNING
        sched.running.append(seq)
        live.append((seq, res.logits))
    if live:
        first = _sample(torch.stack([logits for _, logits in live]), [s for s, _ in live]).tolist()
        now = time.perf_counter()
        for (seq, _), tok in zip(live, first):
            seq.decode_start = now
            seq.stats.first_token_s = now - seq.arrival
            _accept(engine, seq, tok, outs)


def _run_layers(engine, task, group: list[Sequence]) -> bool:
    """``interleave_layers`` layers of the prefill, or all of them (with a progress bar over layers for
    a long CPU prefill); True once it is done."""
    if engine.config.interleave_layers:
        return task.advance(engine.config.interleave_layers)
    tokens = sum(len(s.prompt) for s in group)
    show = engine.config.progress
    if show is None:
        show = tokens >= 4096 and engine.adapter.device.type == "cpu"
    if not show:
        return task.advance()
    from tqdm.auto import tqdm

    what = f"{len(group)} prompts, " if len(group) > 1 else ""
    with tqdm(total=engine.num_layers, desc=f"prefill {what}{tokens} tokens", unit="layer", leave=False) as bar:
        while not task.advance(1):
            bar.update(1)
    return True


def _make_room(engine, running: list[Sequence], outs: dict) -> list[Sequence]:
    """Room for every running sequence's next token; preempts (after taking in the step in flight,
    whose tokens the preempted sequences need) when the budget is short."""
    sched = engine.scheduler
    pending = {id(s) for s in engine._pending.seqs} if engine._pending is not None else set()

    def rows():
        return [(s, s.length + (id(s) in pending)) for s in running if s.status is RUNNING]

    if sched.room_shortfall(rows()) > 0 and engine._pending is not None:
        _take(engine, engine._pending, outs)
        engine._pending, pending = None, set()
        running = [s for s in running if s.status is RUNNING]
    sched.make_room(rows(), engine.runner.grow_chunk)
    return [s for s in running if s.status is RUNNING]


def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token per row, each by its own request's parameters and generator."""
    tokens = logits.argmax(dim=-1)
    for r, seq in enumerate(seqs):
        if not seq.params.greedy:
            tokens[r] = sample(logits[r:r + 1], seq.params, seq.generator)[0]
    return tokens


def _launch(engine, running: list[Sequence]) -> _Launched:
    """Enqueue one decode step for ``running`` and the sampling of its tokens, without waiting.

    Sequences that were in the pending step (not yet taken in on the host) feed its sampled token
    straight from the device; the others feed their last host token."""
    device = engine.adapter.device
    pending = engine._pending
    rows = {id(s): r for r, s in enumerate(pending.seqs)} if pending is not None else {}
    carried = [rows.get(id(s), -1) for s in running]
    if pending is not None and carried == list(range(len(pending.seqs))):
        toks, positions = pending.tokens, pending.positions + 1  # the same batch as the last step
    else:
        positions = torch.tensor([s.length - 1 + (c >= 0) for s, c in zip(running, carried)], device=device)
        toks = torch.tensor([s.tokens[-1] if c < 0 else 0 for s, c in zip(running, carried)], device=device)
        if any(c >= 0 for c in carried):
            idx = torch.tensor([max(c, 0) for c in carried], device=device)
            from_pending = torch.tensor([c >= 0 for c in carried], device=device)
            toks = torch.where(from_pending, pending.tokens.index_select(0, idx), toks)
    logits = engine.runner.decode([s.handle for s in running], toks, positions)
    nxt = _sample(logits, running)
    event = None
    host = nxt.to("cpu", non_blocking=True)
    if device.type == "cuda":  # after the copy on the model's device's stream (not the current device's)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
    return _Launched(list(running), nxt, positions, host, event)


def _take(engine, launched: _Launched, outs: dict) -> None:
    """Take in a launched step's tokens on the host (waiting for that step only); a sequence that
    finished or was aborted since it was launched was a spare row and is skipped."""
    if launched.event is not None:
        launched.event.synchronize()
    for seq, tok in zip(launched.seqs, launched.host.tolist()):
        if seq.status is RUNNING and seq.finish_reason is None:
            _accept(engine, seq, tok, outs)


def append_token(engine, seq: Sequence, token: int) -> None:
    """Append a sampled token and set ``finish_reason`` if the sequence is done (its ``text`` is set
    then: running sequences are not detokenized every step). Shared with document sessions."""
    seq.tokens.append(token)
    seq.stats.new_tokens = len(seq.tokens)
    engine.totals["generation_tokens"] += 1
    params, decode = seq.params, engine.prompts.decode
    if token in engine.eos_ids and not params.ignore_eos:
        seq.finish_reason, seq.text = "eos", decode(seq.tokens[:-1])
    elif params.stop and _stopped(seq, decode):
        pass
    elif len(seq.tokens) >= params.max_new_tokens:
        seq.text, seq.finish_reason = decode(seq.tokens), "length"


def _accept(engine, seq: Sequence, token: int, outs: dict) -> None:
    """Append a sampled token, finish the sequence if it is done, and report it."""
    append_token(engine, seq, token)
    out = outs.get(seq.request_id)
    if out is None:
        out = outs[seq.request_id] = RequestOutput(seq.request_id, [])
    out.new_token_ids.append(token)
    if seq.finish_reason is not None:
        seq.stats.decode_s = time.perf_counter() - seq.decode_start
        seq.stats.peak_kv_bytes = engine.runner.peak
        engine.scheduler.remove(seq)
        engine._requests.pop(seq.request_id, None)
        out.finished, out.output = True, seq.output(engine.num_layers)


def _stopped(seq: Sequence, decode) -> bool:
    # a stop string that just completed lies in the last few tokens (a character is at most 4 byte
    # tokens): decode only that tail each step, the whole text once one is found
    stops = seq.params.stop
    tail = decode(seq.tokens[-(4 * max(map(len, stops)) + 8):])
    if not any(stop in tail for stop in stops):
        return False
    text = decode(seq.tokens)
    at = min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=-1)
    if at < 0:
        return False
    seq.text, seq.finish_reason = text[:at], "stop"
    return True


def run_to_completion(engine, prompts: list[list[int]], params: list[SamplingParams], lazy: LazyConfig,
                      single: bool) -> list[GenerationOutput]:
    """``generate``: add every prompt, step until all finish, outputs in prompt order. A prompt of a
    batch that can never fit the budget finishes with ``finish_reason="error"`` while the others run."""
    if engine.has_unfinished():
        raise ValueError("generate() runs its own requests to completion, but this engine has requests in flight "
                         "(added with add_request): drive them with step() first")
    for n, ids in enumerate(prompts):
        engine.prompts.check_length(len(ids), params[n].max_new_tokens, f"prompt {n}" if len(prompts) > 1 else "prompt")
    runner, device = engine.runner, engine.adapter.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    runner.reset_peak()
    totals0 = dict(engine.totals)
    rids, results = [], {}
    for n, (ids, p) in enumerate(zip(prompts, params)):
        try:
            rids.append(engine.add_request(ids, p, lazy))
        except ValueError as e:
            if single:
                raise
            rid = f"error-{n}"
            rids.append(rid)
            results[rid] = GenerationOutput("", [], "error", [], [], GenerationStats(prompt_tokens=len(ids)),
                                            engine.num_layers, f"prompt {n}: {e}", lazy.score, rid)
    show = engine.config.progress if engine.config.progress is not None else len(prompts) >= 16
    bar = None
    if show and len(prompts) > 1:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(prompts), initial=len(results), desc="requests", unit="req")
    t_start = time.perf_counter()
    max_running = 0
    try:
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out.output
                    if bar is not None:
                        bar.update(1)
            max_running = max(max_running, len(engine.scheduler.running))
    finally:
        if bar is not None:
            bar.close()
        for rid in rids:
            if rid not in results:
                engine.abort(rid)
    wall = time.perf_counter() - t_start
    peak_cuda = torch.cuda.max_memory_allocated(device) if cuda else None
    outs = [results[rid] for rid in rids]
    for out in outs:
        out.stats.peak_kv_bytes = runner.peak
        out.stats.peak_cuda_allocated_bytes = peak_cuda
    decode_s = engine.totals["decode_s"] - totals0["decode_s"]
    decode_tokens = sum(max(0, len(o.token_ids) - 1) for o in outs)
    engine.last_stats = {
        "runner": runner.name, "attention": getattr(runner, "attn_name", "per-sequence"),
        "wall_s": wall, "prefill_s": engine.totals["prefill_s"] - totals0["prefill_s"], "decode_s": decode_s,
        "decode_tokens": decode_tokens, "decode_tokens_per_s": decode_tokens / decode_s if decode_s else 0.0,
        "peak_kv_bytes": runner.peak, "peak_cuda_allocated_bytes": peak_cuda, "max_running": max_running,
        "pool_bytes": runner.pool.nbytes if hasattr(runner, "pool") else engine.kv_budget,
        "kv_free_after": runner.free, "kv_used_after": runner.used,
        "preemptions": sum(o.stats.preemptions for o in outs),
    }
    return outs
