"""The user's object: ``Engine(model).generate(prompt)``, plus stream, chat and long-document answer."""
from __future__ import annotations

import os
import time
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch

from .config import FULL, LazyConfig, SamplingParams, format_bytes, parse_bytes
from .kernels import get_backend
from .lazy import make_policy
from .models import DecoderAdapter, load_model
from .paged import PagedRunner
from .pool import KVPool
from .runner import ReferenceRunner
from .sampling import sample

# The embedded default model is tiny and less lazy than 7-8B models (see LIGHTTRANSFER.md). On it the
# paper's lazy ratio demotes the layers whose few retrieval heads read a needle (passkey at 3k tokens,
# 50% lazy: 4% vs 68% full); "peak" scoring over the last 16 queries keeps them (bench/RESULTS.md, issue #5).
DEFAULT_MODEL_LAZY = LazyConfig(fraction=0.25, sink=4, window=256, probe=16, score="peak")


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_bytes_after_prefill: int = 0  # this sequence's KV right after prefill
    full_kv_bytes: int = 0  # what full attention would hold for the same prompt
    peak_kv_bytes: int = 0  # most KV held at once during the call (all its sequences)
    peak_cuda_allocated_bytes: int | None = None  # torch.cuda.max_memory_allocated over the call
    prefill_batch: int = 1  # prompts prefilled together with this one (prefill_s is that batch's time)
    prefill_batch_tokens: int = 0  # their prompt tokens, this one's included

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second of this prompt's prefill batch."""
        return (self.prefill_batch_tokens or self.prompt_tokens) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def kv_saved(self) -> float:
        """Share of the full-attention KV that lazy layers saved after prefill, in [0, 1]."""
        return 1 - self.kv_bytes_after_prefill / self.full_kv_bytes if self.full_kv_bytes else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(prefill_tokens_per_s=self.prefill_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s,
                 kv_saved=self.kv_saved)
        return d


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]  # generated tokens (the EOS token included when it ended the sequence)
    finish_reason: str  # "eos", "stop" (a stop string), "length", or "error" (see ``error``)
    lazy_layers: list[int]  # demoted layers, sorted
    lazy_ratios: list[float]  # lazy ratio of every layer
    stats: GenerationStats
    num_layers: int = 0
    error: str | None = None  # why this prompt of a batch could not run (finish_reason "error")

    def summary(self) -> str:
        s = self.stats
        return (f"lazy layers {len(self.lazy_layers)}/{self.num_layers} {self.lazy_layers} | "
                f"KV after prefill {format_bytes(s.kv_bytes_after_prefill)} vs {format_bytes(s.full_kv_bytes)} full "
                f"({100 * s.kv_saved:.0f}% saved) | prompt {s.prompt_tokens} tok, prefill {s.prefill_s:.2f} s"
                f"{f' (batch of {s.prefill_batch})' if s.prefill_batch > 1 else ''}, "
                f"decode {s.new_tokens} tok at {s.decode_tokens_per_s:.1f} tok/s")


@dataclass
class _Seq:
    """One request's decode state."""

    prompt: list[int]
    plan_full: int
    params: SamplingParams | None = None  # the call's parameters with this request's max_new_tokens
    cache: SequenceKV | None = None
    ratios: list[float] = field(default_factory=list)
    lazy_layers: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    stats: GenerationStats | None = None
    decode_start: float = 0.0
    handle: object = None  # the runner's per-sequence KV state
    first_logits: torch.Tensor | None = None


class Engine:
    """LightTransfer-Test inference over a Hugging Face causal LM (LLaMA, Mistral, Qwen2, Qwen3).

    Args:
        model: a loaded ``transformers`` causal LM, or a local path / hub id (loaded with
            ``from_pretrained``).
        tokenizer: its tokenizer; found from the model when omitted.
        lazy: which layers go lazy; ``None`` or ``LazyConfig(fraction=0)`` is plain full attention.
        kv_budget: KV bytes one call may hold (int, or a string such as ``"12GiB"``). Each prompt keeps
            as many full layers as fit (at most ``1 - lazy.fraction`` of them when a fraction is set);
            prompts wait until their worst-case KV fits beside the running ones.
        backend: ``"reference"`` forces the pure-PyTorch kernels; default picks the fastest available.
        runner: ``"paged"`` (one block pool, one decode launch per layer, CUDA graphs; the default on
            CUDA) or ``"reference"`` (contiguous per-sequence caches; the default on CPU).
        block_size: tokens per pool block (paged runner).
        score_layers: False skips lazy-ratio scoring (only for policies that need no scores).
        max_prefill_tokens: prompts admitted together are prefilled as one batch, right-padded to the
            longest, while the batch holds at most this many tokens (padding included) and padding is
            at most a fifth of them; a longer prompt is prefilled alone. 1 = one prompt at a time.
            None: 16384 on CUDA, 2048 on CPU (where only short prompts gain: a CPU GEMM is already
            compute bound at a few thousand rows).
        progress: progress bars (None: for batches of 16+ prompts and long CPU prefills).
    """

    def __init__(self, model, tokenizer=None, lazy: LazyConfig | None = LazyConfig(),
                 kv_budget: int | str | None = None, backend: str | None = None, runner: str = "auto",
                 block_size: int = 64, score_layers: bool = True, progress: bool | None = None,
                 max_prefill_tokens: int | None = None):
        if model is None or isinstance(model, (str, os.PathLike)):
            model, loaded_tok = load_model(model)
            tokenizer = tokenizer or loaded_tok
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a transformers causal LM, a path or a hub id, got {type(model).__name__}")
        self.adapter = DecoderAdapter(model)
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else _find_tokenizer(model)
        if lazy is not None and not isinstance(lazy, LazyConfig):
            raise ValueError(f"lazy must be a LazyConfig or None, got {type(lazy).__name__}")
        if runner not in ("auto", "paged", "reference"):
            raise ValueError(f"runner must be 'auto', 'paged' or 'reference', got {runner!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if max_prefill_tokens is None:
            max_prefill_tokens = 16384 if self.adapter.device.type == "cuda" else 2048
        if isinstance(max_prefill_tokens, bool) or not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be a positive integer (1 = no batched prefill), "
                             f"got {max_prefill_tokens!r}")
        self.lazy = lazy if lazy is not None else FULL
        self._runners: dict = {}
        self._kv_pool: KVPool | None = None
        self.kv_budget = kv_budget
        self._prefer = backend
        self.backend = get_backend(self.adapter.device, prefer=backend)
        self.runner_kind = runner if runner != "auto" else ("paged" if self.adapter.device.type == "cuda" else "reference")
        self.block_size = block_size
        self.max_prefill_tokens = max_prefill_tokens
        # launch decode step n + 1 before taking in step n's tokens on the host (None: on CUDA); a
        # sequence that finishes at step n has computed one spare row in step n + 1
        self.overlap: bool | None = None
        self.score_layers = score_layers
        self.progress = progress
        self.eos_ids = _eos_ids(model, self.tokenizer)
        self.last_stats: dict = {}

    @property
    def kv_budget(self) -> int | None:
        """KV bytes a call may hold (None: unbounded on CPU, most of the free memory on CUDA)."""
        return self._kv_budget

    @kv_budget.setter
    def kv_budget(self, value: int | str | None) -> None:
        self._kv_budget = parse_bytes(value)
        self._runners.clear()  # pools and graphs are sized by the budget
        self._kv_pool = None

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike | None = None, lazy: LazyConfig | None | str = "default",
                        kv_budget: int | str | None = None, dtype=None, device=None, **kwargs) -> "Engine":
        """Load a model by path or hub id; ``None`` = the embedded SmolLM2-135M-Instruct (no download).
        ``kwargs`` go to ``Engine`` (backend, runner, block_size, score_layers, progress, max_prefill_tokens)."""
        model, tokenizer = load_model(name, dtype=dtype, device=device)
        if isinstance(lazy, str) and lazy == "default":
            lazy = DEFAULT_MODEL_LAZY if name is None else LazyConfig()
        return cls(model, tokenizer, lazy=lazy, kv_budget=kv_budget, **kwargs)

    @property
    def backends(self) -> dict[str, str]:
        """Which implementation runs each kernel op, and which runner and paged kernels decode."""
        from .kernels import fused
        from .kernels.paged import pick_paged_decode

        a = self.adapter
        out = dict(self.backend.describe())
        out["runner"] = self.runner_kind
        if self.runner_kind == "paged":
            out["paged_decode"] = pick_paged_decode(a.device, a.dtype, a.shape.head_dim, self._prefer)[0]
            fast = fused.available(a.device, a.dtype) and self._prefer != "reference"
            out["fused_decode_step"] = "triton + CUDA graphs" if fast else "HF modules"
        return out

    @property
    def num_layers(self) -> int:
        return self.adapter.shape.num_layers

    # ------------------------------------------------------------------ public calls
    def generate(self, prompt, max_new_tokens: int | Sequence[int] = 64, *, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] | None = None,
                 ignore_eos: bool = False, lazy: LazyConfig | None | str = "engine"):
        """Generate for one prompt (text or token ids) or a batch (a list of either kind).

        ``max_new_tokens``: one limit for every prompt, or (for a batch) a list with one per prompt;
        admission reserves each request's own worst case. Returns a ``GenerationOutput`` for one
        prompt, a list of them for a batch.
        """
        per_request = None
        if isinstance(max_new_tokens, (list, tuple)):
            per_request, max_new_tokens = list(max_new_tokens), max(max_new_tokens, default=64)
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, stop or (), ignore_eos)
        prompts, single = self._normalize(prompt)
        if per_request is not None:
            if single or len(per_request) != len(prompts):
                raise ValueError(f"max_new_tokens as a list needs a batch with one entry per prompt: got "
                                 f"{len(per_request)} for {'a single prompt' if single else f'{len(prompts)} prompts'}")
            for n in per_request:
                SamplingParams(n)  # the same check as a single value
        outs = list(self._run(prompts, params, self._lazy_for(lazy), per_request))
        return outs[0] if single else outs

    def stream(self, prompt, max_new_tokens: int = 64, **kwargs) -> Iterator[str]:
        """Yield the text of one prompt's answer piece by piece as it is decoded."""
        lazy = kwargs.pop("lazy", "engine")
        params = SamplingParams(max_new_tokens, **{k: v for k, v in kwargs.items() if v is not None})
        prompts, single = self._normalize(prompt)
        if not single:
            raise ValueError("stream() takes one prompt (text or token ids), not a batch")
        holdback = max((len(s) for s in params.stop), default=1) - 1
        sent = 0
        for event in self._run(prompts, params, self._lazy_for(lazy), stream=True):
            if isinstance(event, GenerationOutput):
                self.last_output = event
                if len(event.text) > sent:
                    yield event.text[sent:]
                return
            text = event
            safe = len(text) - holdback
            if text.endswith("\ufffd"):  # an unfinished multi-byte character
                safe = min(safe, len(text) - 1)
            if safe > sent:
                yield text[sent:safe]
                sent = safe

    def chat(self, messages: list[dict], max_new_tokens: int = 64, **kwargs) -> GenerationOutput:
        """One chat turn with the tokenizer's chat template."""
        return self.generate(self.encode_chat(messages), max_new_tokens, **kwargs)

    def answer(self, document: str, question: str, max_new_tokens: int = 128, **kwargs) -> GenerationOutput:
        """Long-document QA: the document first, the question last, in one chat turn."""
        if not isinstance(document, str) or not document.strip():
            raise ValueError("answer() needs a non-empty document string")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("answer() needs a non-empty question string")
        content = f"Read the document and answer the question.\n\n<document>\n{document.strip()}\n</document>\n\nQuestion: {question.strip()}"
        return self.chat([{"role": "user", "content": content}], max_new_tokens, **kwargs)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; use generate() with raw text")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ internals
    def _lazy_for(self, lazy) -> LazyConfig:
        if isinstance(lazy, str) and lazy == "engine":
            return self.lazy
        if lazy is None:
            return FULL
        if not isinstance(lazy, LazyConfig):
            raise ValueError(f"lazy must be a LazyConfig or None, got {type(lazy).__name__}")
        return lazy

    def _normalize(self, prompt) -> tuple[list[list[int]], bool]:
        """Text / ids / a batch of either -> list of token-id lists, and whether it was one prompt."""
        def is_ids(x):
            return isinstance(x, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, str):
            batch, single = [prompt], True
        elif is_ids(prompt) and len(prompt) > 0:
            batch, single = [list(prompt)], True
        elif isinstance(prompt, (list, tuple)) and len(prompt) > 0:
            batch, single = list(prompt), False
            kinds = {"text" if isinstance(p, str) else "ids" if is_ids(p) else "other" for p in batch}
            if "other" in kinds:
                raise ValueError("prompt must be a string, a list of int token ids, or a batch (list) of "
                                 f"those; got {prompt!r:.80}")
            if len(kinds) > 1:
                raise ValueError("a batch mixes text prompts and token-id prompts; pass one kind per call")
        else:
            raise ValueError(f"prompt must be a non-empty string, a list of token ids, or a list of those; got {prompt!r:.80}")
        out = []
        for n, p in enumerate(batch):
            if isinstance(p, str) and self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token ids, or Engine(model, tokenizer)")
            ids = self.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
            where = "" if single else f" (batch item {n})"
            if len(ids) == 0 or (isinstance(p, str) and not p.strip()):
                raise ValueError(f"empty prompt{where}: give at least one token of text")
            vocab = self.adapter.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"token ids {bad[:5]} out of range{where}; the vocabulary is 0..{vocab - 1}")
            out.append(ids)
        return out, single

    def _check_lengths(self, seqs: list[_Seq]) -> None:
        shape = self.adapter.shape
        for n, seq in enumerate(seqs):
            ids, params = seq.prompt, seq.params
            where = f"prompt {n}" if len(seqs) > 1 else "prompt"
            total = len(ids) + params.max_new_tokens
            if len(ids) > shape.max_context:
                raise ValueError(f"{where} has {len(ids)} tokens, longer than the model's context of {shape.max_context}")
            if total > shape.max_context:
                raise ValueError(f"{where} ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                                 f"exceeds the model's context of {shape.max_context}; lower max_new_tokens")
            if shape.sliding_window is not None and total > shape.sliding_window:
                raise ValueError(f"the model config uses a {shape.sliding_window}-token sliding window and {where} "
                                 f"needs {total} tokens; ltengine supports full-attention configs only")

    def _runner(self, lazy: LazyConfig, seqs: list[_Seq]):
        """The runner for this call: cached per (kind, sink, window) so pools and graphs persist."""
        kind = self.runner_kind
        key = (kind, lazy.sink, lazy.window)
        runner = self._runners.get(key)
        if kind == "reference":
            if runner is None:
                runner = ReferenceRunner(self.adapter, self.backend, lazy.sink, lazy.window, self.kv_budget)
                self._runners[key] = runner
            runner.meter.peak = runner.meter.current
            return runner
        if self.kv_budget is None and self.adapter.device.type != "cuda":
            # no budget on CPU: a pool that holds exactly this call's prompts at full attention
            shape = self.adapter.shape
            blocks = sum(shape.num_layers * -(-(len(s.prompt) + s.params.max_new_tokens) // self.block_size) for s in seqs)
            pool = KVPool(blocks + 1, self.block_size, shape.num_kv_heads, shape.head_dim, self.adapter.dtype,
                          self.adapter.device)
            return PagedRunner(self.adapter, self.backend, lazy.sink, lazy.window, pool, prefer=self._prefer)
        if runner is None:
            runner = PagedRunner(self.adapter, self.backend, lazy.sink, lazy.window, self._pool(), prefer=self._prefer)
            self._runners[key] = runner
        runner.pool.peak_used = runner.pool.used_blocks
        return runner

    def _pool(self) -> KVPool:
        """The engine's one KV pool: ``kv_budget`` bytes, or most of the free GPU memory."""
        if self._kv_pool is None:
            shape, dev = self.adapter.shape, self.adapter.device
            per_block = KVPool.block_bytes(self.block_size, shape.num_kv_heads, shape.head_dim, self.adapter.dtype)
            budget = self.kv_budget
            if budget is None:  # leave room for prefill activations of a long prompt and the graphs
                free, _ = torch.cuda.mem_get_info(dev)
                budget = int(free * 0.8) - (4 << 30)
            self._kv_pool = KVPool(max(2, budget // per_block + 1), self.block_size, shape.num_kv_heads,
                                   shape.head_dim, self.adapter.dtype, dev)
        return self._kv_pool

    def _plan(self, runner, ids: list[int], params: SamplingParams, lazy: LazyConfig) -> int:
        """Full-KV layers this prompt keeps (its queue's capacity); ValueError if it can never fit."""
        num_layers = self.num_layers
        capacity = runner.capacity
        n_full = num_layers - min(lazy.num_lazy(num_layers, budget=capacity is not None), num_layers) \
            if lazy.enabled else num_layers
        adaptive = lazy.enabled and not isinstance(lazy.policy, tuple) and lazy.policy != "streaming"
        t, n = len(ids), params.max_new_tokens
        if capacity is not None and adaptive:
            while n_full > 0 and runner.footprint(t, n, n_full) > capacity:
                n_full -= 1
        if capacity is not None and runner.footprint(t, n, n_full) > capacity:
            what = (f"even with every layer lazy (sink {lazy.sink} + window {lazy.window})" if adaptive or
                    (lazy.enabled and lazy.policy == "streaming") else "with this lazy-layer policy")
            need = self._as_bytes(runner, runner.footprint(t, n, n_full))
            raise ValueError(f"kv_budget {format_bytes(self.kv_budget or 0)} is too small: {what} a prompt of {t} "
                             f"tokens + {n} new tokens needs {format_bytes(need)} of KV")
        return n_full

    @staticmethod
    def _as_bytes(runner, units: int) -> int:
        return units * runner.pool.bytes_per_block if isinstance(runner, PagedRunner) else units

    def _run(self, prompts: list[list[int]], params: SamplingParams, lazy: LazyConfig,
             max_new: list[int] | None = None, stream: bool = False):
        """Admit prompts while their worst-case KV fits, prefill each layer-major, decode all running
        ones together, finish them independently. Yields GenerationOutputs in prompt order (with
        ``stream``, the growing text of the single prompt before its output)."""
        seqs = [_Seq(ids, 0, replace(params, max_new_tokens=max_new[n]) if max_new else params)
                for n, ids in enumerate(prompts)]
        self._check_lengths(seqs)
        if lazy.enabled and lazy.policy in ("lighttransfer", "topk") and not self.score_layers:
            raise ValueError(f"policy {lazy.policy!r} needs layer scores; construct the Engine with score_layers=True")
        runner = self._runner(lazy, seqs)
        for n, seq in enumerate(seqs):
            try:
                seq.plan_full = self._plan(runner, seq.prompt, seq.params, lazy)
            except ValueError as e:
                if len(seqs) == 1:
                    raise
                seq.finish_reason, seq.error = "error", f"prompt {n}: {e}"
                seq.stats = GenerationStats(prompt_tokens=len(seq.prompt))
        device = self.adapter.device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        per_bytes = self._bytes_per_token_layer()
        waiting = deque(s for s in seqs if s.finish_reason is None)
        show = self.progress if self.progress is not None else len(seqs) >= 16
        bar = None
        if show and len(seqs) > 1:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(seqs), initial=len(seqs) - len(waiting), desc="requests", unit="req")
        running: list[_Seq] = []
        pending: dict | None = None  # the decode step in flight (overlap): its sequences and tokens
        overlap = self.overlap if self.overlap is not None else cuda  # a CPU step runs to completion on launch
        t_start = time.perf_counter()
        prefill_s = decode_s = 0.0
        max_running = 0
        try:
            while waiting or running or pending is not None:
                admitted, reserved = [], 0
                while waiting:
                    nxt_seq = waiting[0]
                    need = runner.footprint(len(nxt_seq.prompt), nxt_seq.params.max_new_tokens, nxt_seq.plan_full)
                    if runner.free is not None and need > runner.free - reserved:
                        if not running and not admitted:  # _plan guarantees a fit in an empty pool
                            raise RuntimeError(f"scheduler: {need} KV units planned, {runner.free} free in an idle pool")
                        break  # wait until running sequences finish
                    admitted.append(waiting.popleft())
                    reserved += need
                for group in self._prefill_groups(admitted):
                    t0 = time.perf_counter()
                    self._prefill(runner, group, lazy, per_bytes)
                    if cuda:
                        torch.cuda.synchronize(device)
                    dt = time.perf_counter() - t0
                    for seq in group:
                        seq.stats.prefill_s, seq.stats.prefill_batch = dt, len(group)
                        seq.stats.prefill_batch_tokens = sum(len(s.prompt) for s in group)
                    prefill_s += dt
                if admitted:
                    first = sample(torch.stack([s.first_logits for s in admitted]), params, generator).tolist()
                    for seq, tok in zip(admitted, first):
                        seq.first_logits = None
                        seq.decode_start = time.perf_counter()
                        if self._accept(seq, tok, seq.params):
                            running.append(seq)
                        else:
                            self._finish(runner, seq, bar)
                    if stream and seqs[0].finish_reason is None:
                        yield self._decode(seqs[0].tokens)
                launched = None
                if running:
                    max_running = max(max_running, len(running))
                    t0 = time.perf_counter()
                    launched = self._launch(runner, running, pending, params, generator)
                    decode_s += time.perf_counter() - t0
                if pending is not None or (launched is not None and not overlap):
                    # with overlap, the step just launched runs on the GPU while the host takes in the
                    # tokens of the one before it; otherwise a step's tokens are taken in at once
                    done, launched = (pending, launched) if overlap else (launched, None)
                    t0 = time.perf_counter()
                    self._take(runner, done, bar)
                    decode_s += time.perf_counter() - t0
                    running = [s for s in running if s.finish_reason is None]
                pending = launched
                if stream and (seqs[0].finish_reason is not None or seqs[0].tokens):
                    yield seqs[0].text if seqs[0].finish_reason is not None else self._decode(seqs[0].tokens)
        finally:
            if bar is not None:
                bar.close()
            for seq in seqs:
                if seq.handle is not None:
                    runner.release(seq.handle)
                    seq.handle = None
        wall = time.perf_counter() - t_start
        peak_kv = runner.peak_kv_bytes if isinstance(runner, PagedRunner) else runner.meter.peak
        peak_cuda = torch.cuda.max_memory_allocated(device) if cuda else None
        decode_tokens = sum(max(0, len(s.tokens) - 1) for s in seqs)
        self.last_stats = {
            "runner": runner.name, "attention": getattr(runner, "attn_name", "per-sequence"),
            "wall_s": wall, "prefill_s": prefill_s, "decode_s": decode_s, "decode_tokens": decode_tokens,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s else 0.0,
            "peak_kv_bytes": peak_kv, "peak_cuda_allocated_bytes": peak_cuda, "max_running": max_running,
            "pool_bytes": runner.pool.nbytes if isinstance(runner, PagedRunner) else self.kv_budget,
            "pool_free_after": runner.free,
        }
        for seq in seqs:
            seq.stats.peak_kv_bytes = peak_kv
            seq.stats.peak_cuda_allocated_bytes = peak_cuda
            yield GenerationOutput(text=seq.text, token_ids=seq.tokens, finish_reason=seq.finish_reason,
                                   lazy_layers=seq.lazy_layers, lazy_ratios=seq.ratios, stats=seq.stats,
                                   num_layers=self.num_layers, error=seq.error)

    def _launch(self, runner, running: list[_Seq], pending: dict | None, params: SamplingParams,
                generator) -> dict:
        """Enqueue one decode step for ``running`` and the sampling of its tokens, without waiting.

        Sequences that were in the ``pending`` step (not yet taken in on the host) feed its sampled
        token straight from the device; the others feed their last host token."""
        device = self.adapter.device
        rows = {id(s): r for r, s in enumerate(pending["seqs"])} if pending is not None else {}
        carried = [rows.get(id(s), -1) for s in running]
        if pending is not None and carried == list(range(len(pending["seqs"]))):
            toks, positions = pending["tokens"], pending["positions"] + 1  # the same batch as the last step
        else:
            positions = torch.tensor([len(s.prompt) + len(s.tokens) - 1 + (c >= 0) for s, c in zip(running, carried)],
                                     device=device)
            toks = torch.tensor([s.tokens[-1] if c < 0 else 0 for s, c in zip(running, carried)], device=device)
            if any(c >= 0 for c in carried):
                idx = torch.tensor([max(c, 0) for c in carried], device=device)
                from_pending = torch.tensor([c >= 0 for c in carried], device=device)
                toks = torch.where(from_pending, pending["tokens"].index_select(0, idx), toks)
        logits = runner.decode([s.handle for s in running], toks, positions)
        nxt = sample(logits, params, generator)
        step = {"seqs": list(running), "tokens": nxt, "positions": positions,
                "host": nxt.to("cpu", non_blocking=True), "event": None}
        if device.type == "cuda":  # after the copy on the model's device's stream (not the current device's)
            step["event"] = torch.cuda.Event()
            step["event"].record(torch.cuda.current_stream(device))
        return step

    def _take(self, runner, step: dict, bar) -> None:
        """Take in a launched step's tokens on the host (waiting for that step only); a sequence that
        finished at an earlier step was a spare row of this one and is skipped."""
        if step["event"] is not None:
            step["event"].synchronize()
        for seq, tok in zip(step["seqs"], step["host"].tolist()):
            if seq.finish_reason is None and not self._accept(seq, tok, seq.params):
                self._finish(runner, seq, bar)

    def _prefill_groups(self, seqs: list[_Seq]) -> list[list[_Seq]]:
        """Split admitted prompts into prefill batches: longest first, each batch at most
        ``max_prefill_tokens`` padded tokens with at most a fifth of them padding."""
        groups: list[list[_Seq]] = []
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

    def _prefill(self, runner, group: list[_Seq], lazy: LazyConfig, per_bytes: int) -> None:
        dev = self.adapter.device
        prompts = [(torch.tensor(seq.prompt, dtype=torch.long, device=dev),
                    make_policy(lazy, self.num_layers, seq.plan_full) if lazy.enabled else _NeverPolicy(),
                    seq.params.max_new_tokens) for seq in group]
        bar = self._progress_bar(sum(len(seq.prompt) for seq in group), len(group))
        try:
            results = runner.prefill_batch(prompts, lazy.probe, score=self.score_layers,
                                           progress=(lambda n: bar.update(1)) if bar else None)
        finally:
            if bar:
                bar.close()
        for seq, res in zip(group, results):
            seq.handle, seq.ratios, seq.lazy_layers = res.handle, res.ratios, res.lazy_layers
            seq.first_logits = res.logits
            seq.stats = GenerationStats(prompt_tokens=len(seq.prompt), kv_bytes_after_prefill=res.kv_bytes,
                                        full_kv_bytes=per_bytes * self.num_layers * len(seq.prompt))

    def _finish(self, runner, seq: _Seq, bar=None) -> None:
        seq.stats.decode_s = time.perf_counter() - seq.decode_start
        runner.release(seq.handle)
        seq.handle = None
        if bar is not None:
            bar.update(1)

    def _bytes_per_token_layer(self) -> int:
        s = self.adapter.shape
        return 2 * s.num_kv_heads * s.head_dim * torch.empty((), dtype=self.adapter.dtype).element_size()

    def _accept(self, seq: _Seq, token: int, params: SamplingParams) -> bool:
        """Append a sampled token; returns False once the sequence is finished (its ``text`` set then:
        running sequences are not detokenized every step)."""
        seq.tokens.append(token)
        seq.stats.new_tokens = len(seq.tokens)
        if token in self.eos_ids and not params.ignore_eos:
            seq.finish_reason = "eos"
            seq.text = self._decode(seq.tokens[:-1])
            return False
        if params.stop:
            # a stop string that just completed lies in the last few tokens (a character is at most 4
            # byte tokens): decode only that tail each step, the whole text once one is found
            tail = self._decode(seq.tokens[-(4 * max(map(len, params.stop)) + 8):])
            if any(stop in tail for stop in params.stop):
                text = self._decode(seq.tokens)
                at = min((i for i in (text.find(stop) for stop in params.stop) if i >= 0), default=-1)
                if at >= 0:
                    seq.text, seq.finish_reason = text[:at], "stop"
                    return False
        if len(seq.tokens) >= params.max_new_tokens:
            seq.text, seq.finish_reason = self._decode(seq.tokens), "length"
            return False
        return True

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def _progress_bar(self, prompt_tokens: int, prompts: int = 1):
        show = self.progress if self.progress is not None else prompt_tokens >= 4096 and self.adapter.device.type == "cpu"
        if not show:
            return None
        from tqdm.auto import tqdm
        what = f"{prompts} prompts, " if prompts > 1 else ""
        return tqdm(total=self.num_layers, desc=f"prefill {what}{prompt_tokens} tokens", unit="layer", leave=False)


class _NeverPolicy:
    def observe(self, layer, ratio):
        return []

    def finish(self):
        return []


def _find_tokenizer(model):
    """The model's tokenizer from where it was loaded, or None (then only token ids go in and out)."""
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not source:
        return None
    kwargs = {}
    quant = getattr(model.config, "quantization_config", None)
    gguf = quant.get("gguf_file") if isinstance(quant, dict) else getattr(quant, "gguf_file", None)
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as e:  # noqa: BLE001 - a model without a findable tokenizer still runs on token ids
        warnings.warn(f"ltengine: no tokenizer found at {source!r} ({type(e).__name__}); "
                      "pass token ids, or Engine(model, tokenizer)")
        return None


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
