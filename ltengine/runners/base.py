"""The runner protocol the scheduler sees, and the one layer-major prefill every runner uses.

A runner owns the KV of its sequences and executes the model: ``start_prefill`` (a resumable
layer-major prefill of a batch of prompts), ``decode`` (one token for every running sequence),
``grow`` (room for more tokens), ``swap_out`` / ``swap_in`` (preemption), ``release``. Its budget unit
is bytes: ``capacity`` (None = unbounded), ``used``, ``free``, ``peak``, and ``footprint(tokens,
n_full)``, the bytes a sequence of that many tokens holds with ``n_full`` full layers.

``LayerMajorPrefill`` runs prompts through layer 0, then 1, ... and writes each layer's KV through
a ``KVStore`` (``store`` / ``demote``), so the same loop serves the reference runner, the paged
runner and the evaluation harness.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from ..lazy import LayerPolicy
from ..models import DecoderAdapter
from .streaming import last_row_keys, mixed_attention

try:  # optional: flash-attn's prefill kernel when it is installed
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None

# scorer(q [H_q, P, D], k [H_kv, T, D], sink, window, scale) -> float, higher = lazier (Backend.scorer)
Scorer = Callable[[torch.Tensor, torch.Tensor, int, int, float], float]
# hook(layer, q, k) with q [T, H_q, D], k [T, H_kv, D] of one prompt (rotated), for studies and the harness
LayerHook = Callable[[int, torch.Tensor, torch.Tensor], None]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over a whole prompt. q ``[B, T, H_q, D]``, k/v ``[B, T, H_kv, D]`` -> ``[B, T, H_q, D]``.

    flash-attn when importable (CUDA, fp16/bf16), else PyTorch SDPA (which picks its own fused kernel).
    """
    if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_attn_func(q, k, v, causal=True, softmax_scale=scale)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _last_row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                        scale: float, streaming: list[tuple[int, int] | None] | None = None) -> torch.Tensor:
    """Each prompt's last query over its own keys (the causal row of ``prefill_attention`` for that
    token; right padding excluded), or, where ``streaming[n]`` is ``(sink, window)``, over its sink and
    last ``window`` keys. q ``[B, T, H_q, D]``, k/v ``[B, T, H_kv, D]`` -> ``[B, 1, H_q, D]``."""
    outs = []
    for n, length in enumerate(lengths):
        keys = slice(0, length) if streaming is None or streaming[n] is None else \
            last_row_keys(length, *streaming[n], k.device)
        qn = q[n, length - 1:length].transpose(0, 1).unsqueeze(0)  # [1, H_q, 1, D]
        kn = k[n, keys].transpose(0, 1).unsqueeze(0)
        vn = v[n, keys].transpose(0, 1).unsqueeze(0)
        outs.append(F.scaled_dot_product_attention(qn, kn, vn, scale=scale, enable_gqa=q.shape[2] != k.shape[2]))
    return torch.cat(outs).transpose(1, 2)  # [B, 1, H_q, D]


class KVStore(Protocol):
    """Where one prompt's prefill writes its KV."""

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, lazy: bool) -> None:
        """Keep layer ``layer``'s prompt KV ``[T, H_kv, D]``: all of it, or (``lazy``) sink + window only."""

    def demote(self, layer: int) -> None:
        """Truncate an already stored full layer to sink + window, in place, freeing the rest."""


@dataclass
class PrefillJob:
    """One prompt of a layer-major prefill: tokens, its own lazy-layer queue, where its KV goes, and
    how its layers are scored (``scorer`` None: unscored, for policies that need no scores)."""

    ids: torch.Tensor  # [T]
    policy: LayerPolicy
    kv: KVStore
    sink: int
    window: int
    probe: int
    scorer: Scorer | None


class LayerMajorPrefill:
    """Prompts through the model one layer at a time, resumable between layers (``advance``).

    Several prompts go through each layer together, right-padded to the longest: attention is causal,
    so a prompt's tokens never see the padding after them, and only each prompt's own rows are
    scored, stored and read out. Per prompt, after layer l is computed and scored, its policy names
    layers to demote; those already stored are truncated *before* layer l is stored, so no queue ever
    holds more than its capacity: the one layer in flight is the activations.

    Streaming prefill (``LazyConfig.streaming_prefill``): after layer l is scored and before it attends,
    a prompt whose policy already knows l is lazy (``LayerPolicy.attends_streaming``) computes l's
    attention over sink + window keys only (the backend's ``prefill_sink_window``; the scores saw every
    key), and l is stored straight as sink + window. ``streamed[n]`` lists those layers per prompt.
    """

    def __init__(self, adapter: DecoderAdapter, jobs: Sequence[PrefillJob], hook: LayerHook | None = None,
                 backend=None):
        self.adapter, self.jobs, self.hook, self._backend = adapter, list(jobs), hook, backend
        self.lengths = [job.ids.shape[0] for job in jobs]
        b, t = len(jobs), max(self.lengths)
        dev = jobs[0].ids.device
        ids = torch.zeros((b, t), dtype=torch.long, device=dev)
        for n, job in enumerate(jobs):
            ids[n, :self.lengths[n]] = job.ids
        with torch.inference_mode():
            self.h = adapter.embed(ids)
            self.cos, self.sin = adapter.rope(self.h, torch.arange(t, device=dev).expand(b, t))
        self.scores: list[list[float]] = [[] for _ in jobs]
        self.streamed: list[list[int]] = [[] for _ in jobs]
        self.layer = 0
        self._finished = False  # the policies' end-of-prefill demotions ran
        self._last_only = False  # the last layer kept one row per prompt (``h`` is [B, 1, hidden])

    @property
    def num_layers(self) -> int:
        return self.adapter.shape.num_layers

    @property
    def done(self) -> bool:
        return self.layer >= self.num_layers

    @torch.inference_mode()
    def advance(self, layers: int | None = None) -> bool:
        """Run the next ``layers`` layers (None: all that are left); True once every layer ran."""
        a = self.adapter
        stop = self.num_layers if layers is None else min(self.num_layers, self.layer + layers)
        b, t = self.h.shape[:2]
        while self.layer < stop:
            i = self.layer
            q, k, v = a.qkv(i, self.h, self.cos, self.sin)
            for n, (job, length) in enumerate(zip(self.jobs, self.lengths)):
                if self.hook is not None:
                    self.hook(i, q[n, :length], k[n, :length])
                if job.scorer is not None:
                    p = min(job.probe, length)
                    self.scores[n].append(job.scorer(q[n, length - p:length].transpose(0, 1),
                                                     k[n, :length].transpose(0, 1), job.sink, job.window, a.scale))
            stream = [(job.sink, job.window) if job.policy.attends_streaming(i, self._score(n)) else None
                      for n, job in enumerate(self.jobs)]
            if i == self.num_layers - 1:
                # after the last layer only each prompt's last hidden state is read (its logits): its
                # K/V above are all that later decode needs, so attention, o_proj and the MLP run for
                # one row per prompt instead of all T
                last = torch.tensor([n - 1 for n in self.lengths], device=q.device)
                rows = torch.arange(b, device=q.device)
                o = _last_row_attention(q, k, v, self.lengths, a.scale, stream)
                self.h = a.finish_layer(i, self.h[rows, last].unsqueeze(1), o.reshape(b, 1, -1))
                self._last_only = True
            else:
                o = mixed_attention(q, k, v, stream, a.scale, prefill_attention, self._sink_window)
                self.h = a.finish_layer(i, self.h, o.reshape(b, t, -1))
            del q, o
            for n, (job, length) in enumerate(zip(self.jobs, self.lengths)):
                now = job.policy.observe(i, self._score(n))
                if stream[n] is not None:
                    if i not in now:
                        raise RuntimeError(f"{job.policy.name} policy: layer {i} attended as lazy in prefill but "
                                           f"was not demoted (attends_streaming and observe disagree)")
                    self.streamed[n].append(i)
                for j in now:
                    if j != i:
                        job.kv.demote(j)
                job.kv.store(i, k[n, :length], v[n, :length], i in now)
            del k, v
            self.layer += 1
        if self.done and not self._finished:
            for job in self.jobs:
                for j in job.policy.finish():
                    job.kv.demote(j)
            self._finished = True
        return self.done

    def _sink_window(self, q, k, v, sink: int, window: int, scale: float) -> torch.Tensor:
        if self._backend is None:  # the runners pass theirs; the backend for the device otherwise
            from ..kernels import get_backend

            self._backend = get_backend(q.device)
        return self._backend.prefill_sink_window(q, k, v, sink, window, scale)

    def _score(self, n: int) -> float:
        """Prompt n's score of the layer in flight (0.0 when unscored)."""
        return self.scores[n][-1] if self.jobs[n].scorer is not None else 0.0

    def last_hidden(self) -> torch.Tensor:
        """Each prompt's hidden state after its last token, ``[B, hidden]`` (after every layer ran)."""
        if self._last_only:
            return self.h[:, 0]
        last = torch.tensor([n - 1 for n in self.lengths], device=self.h.device)
        return self.h[torch.arange(len(self.jobs), device=self.h.device), last]


@dataclass
class PrefillRequest:
    """What the scheduler asks a runner to prefill for one sequence."""

    ids: torch.Tensor  # [T]
    policy: LayerPolicy
    sink: int
    window: int
    probe: int
    scorer: Scorer | None
    reserve: int  # decode tokens to make room for at once (more come through ``grow``)


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [V] fp32, the next-token distribution after the prompt
    scores: list[float]  # every layer's score (empty when not scored)
    lazy_layers: list[int]  # demoted layers, sorted
    kv_bytes: int  # this sequence's KV right after prefill
    handle: object  # the runner's per-sequence state


class PrefillTask:
    """A runner's prefill in progress: ``advance(layers)`` until ``done``, then ``results()``. Any
    failure (an out-of-memory error included) releases what the batch stored and re-raises, so the
    runner stays whole."""

    def __init__(self, runner: "Runner", loop: LayerMajorPrefill, handles: list, finish: Callable[[list], list]):
        self.runner, self.loop, self.handles, self._finish = runner, loop, handles, finish

    @property
    def done(self) -> bool:
        return self.loop.done

    def advance(self, layers: int | None = None) -> bool:
        try:
            return self.loop.advance(layers)
        except BaseException:
            self.abort()
            raise

    def results(self) -> list[PrefillResult]:
        try:
            with torch.inference_mode():
                logits = self.loop.adapter.logits(self.loop.last_hidden())
            return self._finish(logits)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for handle in self.handles:
            self.runner.release(handle)
        self.handles = []


class Runner(ABC):
    """Executes the model over KV it owns; every quantity of memory is in bytes."""

    name = "base"
    capacity: int | None  # KV bytes it may hold (None: unbounded)

    @property
    @abstractmethod
    def used(self) -> int:
        """KV bytes held now."""

    @property
    def free(self) -> int | None:
        return None if self.capacity is None else self.capacity - self.used

    @property
    @abstractmethod
    def peak(self) -> int:
        """Most KV bytes held at once since ``reset_peak``."""

    @abstractmethod
    def reset_peak(self) -> None: ...

    @abstractmethod
    def footprint(self, tokens: int, n_full: int, sink: int, window: int, demotes: bool = True) -> int:
        """Bytes a sequence of ``tokens`` tokens holds at its peak with ``n_full`` full layers and the
        rest at sink + window (``demotes``: some layer is stored full, then truncated)."""

    @abstractmethod
    def start_prefill(self, requests: Sequence[PrefillRequest]) -> PrefillTask: ...

    def prefill(self, requests: Sequence[PrefillRequest]) -> list[PrefillResult]:
        """A whole prefill at once."""
        task = self.start_prefill(requests)
        task.advance()
        return task.results()

    grow_chunk: int = 1  # tokens of room ``grow`` adds at once beyond what is needed (a block, paged)

    @abstractmethod
    def grow_need(self, handle, tokens: int) -> int:
        """Free bytes ``grow(handle, tokens)`` needs (0: it already has room)."""

    @abstractmethod
    def grow(self, handle, tokens: int) -> None:
        """Room for ``tokens`` tokens in every layer (a lazy layer: up to sink + window)."""

    @abstractmethod
    def decode(self, handles: list, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (``[B]`` ids at ``[B]`` positions); next-token logits ``[B, V]``."""

    @abstractmethod
    def release(self, handle) -> None: ...

    @abstractmethod
    def swap_out(self, handle):
        """Move a sequence's KV to host memory, freeing its share of the budget; returns the host copy."""

    @abstractmethod
    def swap_in_need(self, swapped) -> int:
        """Bytes ``swap_in`` takes."""

    @abstractmethod
    def swap_in(self, swapped):
        """Bring a swapped sequence back; returns its new handle."""
