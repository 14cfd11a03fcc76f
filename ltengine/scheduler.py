"""Which sequences run now: waiting / swapped / running queues, admission by need under the KV
budget, prefill grouping, room for decode and preemption.

Every request is *planned* once, when it is added: the number of full layers it keeps is chosen so
that it alone, at prompt + ``max_new_tokens``, fits the whole budget (a request that can never fit is
refused then). It is *admitted* by what it needs now: its prompt after demotion plus the runner's
decode reserve (a block on the paged runner; the whole ``max_new_tokens`` on the contiguous reference
runner). Decode grows a sequence as it crosses a block; when the budget runs dry the newest running
sequence is preempted: its KV is swapped to host memory and it is readmitted, ahead of new requests,
once it fits again. Swapping moves the exact KV back, so a preempted request's tokens are the ones it
would have produced unpreempted.
"""
from __future__ import annotations

from collections import deque

from .config import LazyConfig
from .lazy import plan_full_layers
from .runners.base import Runner
from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, runner: Runner, num_layers: int, max_prefill_tokens: int):
        self.runner, self.num_layers, self.max_prefill_tokens = runner, num_layers, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.swapped: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.prefilling: list[Sequence] = []  # admitted, their prefill not yet done
        self.reserved = 0  # bytes admitted prefills may still take
        self.preemptions = 0

    # ------------------------------------------------------------------ planning
    def plan(self, prompt_len: int, max_new: int, lazy: LazyConfig) -> int:
        """Full-KV layers a request keeps (its queue's capacity); ValueError if it can never fit."""
        total = prompt_len + max_new
        return plan_full_layers(lazy, self.num_layers, self.runner.capacity, prompt_len, max_new,
                                lambda n_full: self.runner.footprint(total, n_full, lazy.sink, lazy.window))

    def admission_need(self, seq: Sequence) -> int:
        tokens = len(seq.prompt) + self.runner.decode_reserve(seq.params.max_new_tokens)
        return self.runner.footprint(tokens, seq.n_full, seq.lazy.sink, seq.lazy.window)

    # ------------------------------------------------------------------ admission
    def available(self) -> int | None:
        """Free bytes not promised to an admitted prefill (None: unbounded)."""
        free = self.runner.free
        return None if free is None else free - self.reserved

    def _fits(self, need: int) -> bool:
        avail = self.available()
        return avail is None or need <= avail

    def admit(self) -> tuple[list[Sequence], list[list[Sequence]]]:
        """Swap back in what fits (oldest preempted first), then admit waiting requests while their need
        fits. Returns (swapped back in, prefill groups). New requests wait while any preempted one does."""
        back = []
        while self.swapped and self._fits(self.runner.swap_in_need(self.swapped[0].handle)):
            seq = self.swapped.popleft()
            seq.handle = self.runner.swap_in(seq.handle)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            back.append(seq)
        admitted = []
        while self.waiting and not self.swapped:
            seq = self.waiting[0]
            need = self.admission_need(seq)
            if not self._fits(need):
                if not self.running and not admitted and not self.prefilling and self.runner.used == 0:
                    raise RuntimeError(f"scheduler: {need} KV bytes needed, {self.available()} free in an idle pool")
                break  # wait until running sequences finish
            self.waiting.popleft()
            seq.status = SequenceStatus.PREFILLING
            self.reserved += need
            seq.reserved = need
            admitted.append(seq)
        self.prefilling.extend(admitted)
        return back, self.prefill_groups(admitted)

    def prefill_groups(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """Split admitted prompts into prefill batches: longest first, each batch at most
        ``max_prefill_tokens`` padded tokens with at most a fifth of them padding."""
        groups: list[list[Sequence]] = []
        real = 0
        for seq in sorted(seqs, key=lambda s: len(s.prompt), reverse=True):
            n = len(seq.prompt)
            if groups:
                cur = groups[-1]
                padded = (len(cur) + 1) * len(cur[0].prompt)
                if padded <= self.max_prefill_tokens and 5 * (real + n) >= 4 * padded:
                    cur.append(seq)
                    real += n
                    continue
            groups.append([seq])
            real = n
        return groups

    def prefilled(self, seq: Sequence) -> None:
        """A sequence's prefill ended (stored, failed or aborted): its promise is settled."""
        if seq in self.prefilling:
            self.prefilling.remove(seq)
            self.reserved -= seq.reserved
            seq.reserved = 0

    # ------------------------------------------------------------------ decode room and preemption
    def room_shortfall(self, rows: list[tuple[Sequence, int]]) -> int:
        """Bytes missing for every ``(seq, tokens)`` to hold ``tokens`` tokens (0: it all fits now)."""
        avail = self.available()
        if avail is None:
            return 0
        need = sum(self.runner.grow_need(s.handle, t) for s, t in rows)
        return max(0, need - avail)

    def make_room(self, rows: list[tuple[Sequence, int]], chunk: int) -> list[Sequence]:
        """Grow each ``(seq, tokens)`` (oldest first) to hold ``tokens`` tokens, ``chunk`` more at once
        (capped at prompt + max_new_tokens), preempting the newest running sequence while the budget
        is short. Returns the preempted ones."""
        preempted = []
        for seq, tokens in rows:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if self.runner.grow_need(seq.handle, tokens) == 0:
                continue
            target = max(tokens, min(len(seq.prompt) + seq.params.max_new_tokens, tokens + chunk))
            while not self._fits(self.runner.grow_need(seq.handle, target)):
                victim = self.running[-1]
                self.preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.runner.grow(seq.handle, target)
        return preempted

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.handle = self.runner.swap_out(seq.handle)
        seq.status = SequenceStatus.SWAPPED
        seq.stats.preemptions += 1
        self.preemptions += 1
        self.swapped.appendleft(seq)

    # ------------------------------------------------------------------ finishing
    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of every queue and give its KV back (finished or aborted)."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.swapped:
            self.swapped.remove(seq)
        self.prefilled(seq)
        if seq.handle is not None and seq.status is not SequenceStatus.SWAPPED:
            self.runner.release(seq.handle)
        seq.handle = None
        seq.status = SequenceStatus.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.swapped or self.running or self.prefilling)
