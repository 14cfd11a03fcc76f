"""The user's object: ``Engine(model).generate(prompt)``, stream, chat, long-document answer, document
sessions (``document`` / ``documents``), and the online core under them: ``add_request`` / ``step`` /
``abort``.

``step`` is one iteration: admit what fits (scheduler.py), run the prefill in flight (all of it, or
``interleave_layers`` layers), then one decode step of every running request (runners/), sampled
and taken in here. On CUDA the next decode step is launched before the host takes in the last one's
tokens (``overlap``), so the GPU never waits for Python between steps.
"""
from __future__ import annotations

import itertools
import os
import secrets
import time
from collections import deque
from dataclasses import replace
from typing import Iterator

import torch

from .config import FULL, EngineConfig, LazyConfig, SamplingParams, parse_bytes
from .kernels import get_backend
from .lazy import make_policy, needs_scores
from .models import DecoderAdapter, load_model
from .prompts import Prompts, eos_ids, find_tokenizer
from .runners import PrefillRequest, build_runner
from .scheduler import Scheduler
from .sequence import GenerationOutput, RequestOutput, Sequence, SequenceStatus, TextStream

# The embedded default model is tiny and less lazy than 7-8B models (see LIGHTTRANSFER.md). On it the
# paper's lazy ratio demotes the layers whose few retrieval heads read a needle (passkey at 3k tokens,
# 50% lazy: 4% vs 68% full); "peak" scoring over the last 16 queries keeps them for one needle (issue #5),
# and "cover" over the last 64 (the question) also for questions naming several keys: RULER at 50% lazy
# keeps 99% of full on held-out seeds at 1k against peak's 90% (bench/RESULTS.md, issue 13).
DEFAULT_MODEL_LAZY = LazyConfig(fraction=0.25, sink=4, window=256, probe=64, score="cover")


class Engine:
    """LightTransfer-Test inference over a Hugging Face causal LM (LLaMA, Mistral, Qwen2, Qwen3).

    Args:
        model: a loaded ``transformers`` causal LM, or a local path / hub id / .gguf file.
        tokenizer: its tokenizer; found from the model when omitted.
        lazy: which layers go lazy; ``None`` or ``LazyConfig(fraction=0)`` is plain full attention.
        kv_budget: KV bytes the engine may hold (int, or a string such as ``"12GiB"``). Each request
            keeps as many full layers as fit with it alone in the budget (at most ``1 - lazy.fraction``
            of them when a fraction is set); requests wait until what they need now fits.
        config: an ``EngineConfig``, or its fields as keyword arguments (runner, backend, block_size,
            max_prefill_tokens, overlap, score_layers, interleave_layers, progress, graphs, kv_dtype:
            ``kv_dtype="fp8"`` stores K/V as float8_e4m3fn with per-token scales).
        tensor_parallel: ranks to shard the model over (``ltengine/parallel``): under ``torchrun
            --nproc-per-node N`` each rank joins (ranks > 0 serve rank 0 inside this call, then exit);
            otherwise ranks 1..N-1 are spawned here. Rank 0 drives; ``kv_budget`` is the total.
    """

    def __init__(self, model, tokenizer=None, lazy: LazyConfig | None = LazyConfig(),
                 kv_budget: int | str | None = None, config: EngineConfig | None = None, tensor_parallel=1,
                 **config_kwargs):
        if model is None or isinstance(model, (str, os.PathLike)):
            model, loaded_tok = load_model(model)
            tokenizer = tokenizer or loaded_tok
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a transformers causal LM, a path or a hub id, got {type(model).__name__}")
        if config is not None and config_kwargs:
            raise ValueError("pass either config=EngineConfig(...) or its fields as keyword arguments, not both")
        self.config = config if config is not None else EngineConfig(**config_kwargs)
        if not isinstance(self.config, EngineConfig):
            raise ValueError(f"config must be an EngineConfig, got {type(self.config).__name__}")
        self.tp = None  # parallel.TPGroup of a tensor-parallel engine
        if tensor_parallel != 1:
            from . import parallel

            model, tokenizer, settings, self.tp = parallel.start(
                tensor_parallel, model, tokenizer, {"lazy": lazy, "kv_budget": kv_budget, "config": self.config})
            lazy, kv_budget, self.config = settings["lazy"], settings["kv_budget"], settings["config"]
        self.adapter = DecoderAdapter(model, shards=self.tp.world if self.tp is not None else 1,
                                      kv_dtype=self.config.kv_dtype)
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else find_tokenizer(model)
        if lazy is not None and not isinstance(lazy, LazyConfig):
            raise ValueError(f"lazy must be a LazyConfig or None, got {type(lazy).__name__}")
        self.lazy = lazy if lazy is not None else FULL
        cuda = self.adapter.device.type == "cuda"
        self.backend = get_backend(self.adapter.device, prefer=self.config.backend)
        self.runner_kind = self.config.runner if self.config.runner != "auto" else ("paged" if cuda else "reference")
        self.max_prefill_tokens = self.config.max_prefill_tokens or (16384 if cuda else 2048)
        self.overlap = self.config.overlap if self.config.overlap is not None else cuda
        self.eos_ids = eos_ids(model, self.tokenizer)
        self.prompts = Prompts(self.tokenizer, self.adapter)
        self._kv_budget = parse_bytes(kv_budget)
        self._scheduler: Scheduler | None = None
        self._sessions_runner = None  # sessions' paged runner when the engine decodes with the reference one
        self._requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._prefill_queue: deque[list[Sequence]] = deque()
        self._prefill = None  # (task, group, seconds so far) of the prefill in flight
        self._pending = None  # the decode step launched but not yet taken in (overlap)
        self.totals = {"prefill_s": 0.0, "decode_s": 0.0, "prompt_tokens": 0, "generation_tokens": 0}
        self.last_stats: dict = {}
        if self.tp is not None:
            parallel.attach(self)
            if self.tp.torchrun and not self.tp.driver:  # ranks > 0 of a torchrun launch serve rank 0, then exit
                parallel.serve(self)
                raise SystemExit(0)

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike | None = None, lazy: LazyConfig | None | str = "default",
                        kv_budget: int | str | None = None, dtype=None, device=None, **kwargs) -> "Engine":
        """Load a model by path or hub id; ``None`` = the embedded SmolLM2-135M-Instruct (no download).
        ``kwargs`` are ``EngineConfig`` fields."""
        model, tokenizer = load_model(name, dtype=dtype, device=device)
        if isinstance(lazy, str) and lazy == "default":
            lazy = DEFAULT_MODEL_LAZY if name is None else LazyConfig()
        return cls(model, tokenizer, lazy=lazy, kv_budget=kv_budget, **kwargs)

    # ------------------------------------------------------------------ configuration
    @property
    def kv_budget(self) -> int | None:
        """KV bytes the engine may hold (None: unbounded on CPU, most of the free memory on CUDA)."""
        return self._kv_budget

    @kv_budget.setter
    def kv_budget(self, value: int | str | None) -> None:
        if self.has_unfinished():
            raise ValueError("kv_budget cannot change while requests are in flight")
        self._kv_budget = parse_bytes(value)
        if self.tp is not None:  # None: the default every rank agreed on at start (None on CPU)
            self._kv_budget = self._kv_budget if self._kv_budget is not None else self.tp.default_budget
            self.mirror.record("budget", self._kv_budget)
        self._sessions_runner = None
        self._scheduler = None  # the runner and its pool are sized by the budget: rebuilt on next use

    @property
    def num_layers(self) -> int:
        return self.adapter.shape.num_layers

    @property
    def max_model_len(self) -> int:
        return self.adapter.shape.max_context

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            runner = self._make_runner()
            if self.tp is not None:  # each rank holds 1/N of every sequence's KV: the scheduler sees totals
                from .parallel import ShardedRunner

                runner = ShardedRunner(runner, self.tp.world)
            self._scheduler = Scheduler(runner, self.num_layers, self.max_prefill_tokens)
        return self._scheduler

    @property
    def runner(self):
        return self.scheduler.runner

    def _session_runner(self):
        """The paged runner document sessions use: the engine's own, or (on an engine that decodes
        with the reference runner) one of the sessions' own, with its own pool under the same budget."""
        if self.runner_kind == "paged":
            return self.runner
        if self._sessions_runner is None:
            self._sessions_runner = self._make_runner("paged")
        return self._sessions_runner

    def _make_runner(self, kind: str | None = None):
        budget = self._kv_budget
        if self.tp is not None and budget is not None:
            budget //= self.tp.world  # this rank's share
        return build_runner(kind or self.runner_kind, self.adapter, self.backend, self.config, budget)

    @property
    def backends(self) -> dict[str, str]:
        """Which implementation runs each kernel op, and which runner and paged kernels decode."""
        from .kernels import fused

        a = self.adapter
        out = dict(self.backend.describe())
        out["runner"] = self.runner_kind
        if self.runner_kind == "paged":
            out["paged_decode"] = self.backend.impl_for("paged_decode", a.kv_dtype, a.shape.head_dim)
            fast = fused.available(a.device, a.dtype, a.kv_dtype) and self.config.backend != "reference"
            out["fused_decode_step"] = "triton + CUDA graphs" if fast else "HF modules"
        return out

    # ------------------------------------------------------------------ the online core
    def add_request(self, prompt, params: SamplingParams | None = None, lazy: LazyConfig | None | str = "engine",
                    request_id: str | None = None) -> str:
        """Queue one request (text or token ids); returns its id. Raises ValueError at once for a bad
        prompt, one over the model's context, or one that can never fit the KV budget."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        lazy = self._lazy_for(lazy)
        if lazy.enabled and needs_scores(lazy) and not self.config.score_layers:
            raise ValueError(f"policy {lazy.policy!r} needs layer scores; construct the Engine with score_layers=True")
        ids, single = self.prompts.normalize(prompt)
        if not single:
            raise ValueError("add_request takes one prompt (text or token ids); add a batch one request at a time")
        ids = ids[0]
        self.prompts.check_length(len(ids), params.max_new_tokens)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if not isinstance(rid, str) or not rid or rid in self._requests:
            raise ValueError(f"request_id must be a new non-empty string, got {rid!r}")
        n_full = self.scheduler.plan(len(ids), params.max_new_tokens, lazy)
        generator = None
        if not params.greedy:  # its own RNG: the global one is never touched
            generator = torch.Generator(device=self.adapter.device)
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            generator.manual_seed(seed)
        if self.tp is not None:  # the other ranks replay it, with this seed
            self.mirror.record("add", ids, params if generator is None else replace(params, seed=seed), lazy, rid)
        seq = Sequence(rid, ids, params, lazy, n_full, generator)
        self._requests[rid] = seq
        self.scheduler.waiting.append(seq)
        return rid

    def has_unfinished(self) -> bool:
        return self._scheduler is not None and (self._scheduler.has_unfinished() or self._pending is not None)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and give its KV back; False if it is unknown or already finished."""
        seq = self._requests.pop(request_id, None)
        if seq is None or seq.finished:
            return False
        if self.tp is not None:
            self.mirror.record("abort", request_id)
        seq.finish_reason, seq.text = "abort", self.prompts.decode(seq.tokens)
        for group in self._prefill_queue:
            if seq in group:
                group.remove(seq)
        if self._prefill is not None and seq in self._prefill[1]:
            task, group, _ = self._prefill
            if all(s.finish_reason == "abort" for s in group):  # nothing left to prefill for
                task.abort()
                for s in group:
                    self.scheduler.remove(s)
                self._prefill = None
            return True  # released when its batch's prefill ends
        self.scheduler.remove(seq)
        return True

    def close(self) -> None:
        """Abort what is in flight, free the KV pool, and hand the model back as it came (the paged
        runner's fused decode step shares the q/k/v and gate/up weights' storage; this unshares it)."""
        for rid in list(self._requests):
            self.abort(rid)
        self._pending = None
        self._scheduler = self._sessions_runner = None
        self.adapter.unfuse()
        if self.tp is not None and self.tp.driver and not self.mirror.stopped:
            from .parallel import stop_workers

            stop_workers(self)  # a tensor-parallel engine ends here: its ranks stop

    def metrics(self) -> dict:
        """Counters and gauges of the engine now (what a server exports)."""
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting) + len(s.prefilling), "swapped": len(s.swapped),
                "kv_bytes_used": s.runner.used, "kv_budget_bytes": s.runner.capacity,
                "preemptions_total": s.preemptions, "prompt_tokens_total": self.totals["prompt_tokens"],
                "generation_tokens_total": self.totals["generation_tokens"]}

    def step(self) -> list[RequestOutput]:
        """One iteration: admit, prefill (or part of it), one decode step. Returns what each request
        that advanced gained (finished ones carry their ``GenerationOutput``)."""
        from .stepper import step

        if self.tp is not None:
            self.mirror.sync()  # the other ranks replay this step's inputs, then run it too
        return step(self)

    # ------------------------------------------------------------------ public calls
    def generate(self, prompt, max_new_tokens: int | list[int] = 64, *, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: str | list[str] | None = None,
                 ignore_eos: bool = False, lazy: LazyConfig | None | str = "engine"):
        """Generate for one prompt (text or token ids) or a batch (a list of either kind).

        ``max_new_tokens``: one limit for every prompt, or (for a batch) a list with one per prompt.
        Returns a ``GenerationOutput`` for one prompt, a list of them for a batch; a prompt of a batch
        that can never fit the budget gets ``finish_reason="error"`` while the others run.
        """
        from .stepper import run_to_completion

        prompts, single = self.prompts.normalize(prompt)
        per = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else None
        if per is not None and (single or len(per) != len(prompts)):
            raise ValueError(f"max_new_tokens as a list needs a batch with one entry per prompt: got "
                             f"{len(per)} for {'a single prompt' if single else f'{len(prompts)} prompts'}")
        base = SamplingParams(max(per, default=64) if per is not None else max_new_tokens, temperature, top_p,
                              top_k, seed, stop if stop is not None else (), ignore_eos)
        params = [base if per is None else replace(base, max_new_tokens=n) for n in (per or [None] * len(prompts))]
        outs = run_to_completion(self, prompts, params, self._lazy_for(lazy), single)
        return outs[0] if single else outs

    def stream(self, prompt, max_new_tokens: int = 64, **kwargs) -> Iterator[str]:
        """Yield the text of one prompt's answer piece by piece as it is decoded; the pieces join to
        the final text (``self.last_output`` holds the whole ``GenerationOutput`` afterwards)."""
        lazy = kwargs.pop("lazy", "engine")
        params = SamplingParams(max_new_tokens, **{k: v for k, v in kwargs.items() if v is not None})
        prompts, single = self.prompts.normalize(prompt)
        if not single:
            raise ValueError("stream() takes one prompt (text or token ids), not a batch")
        if self.has_unfinished():
            raise ValueError("stream() runs its own request; drive the requests already added with step() first")
        rid = self.add_request(prompts[0], params, lazy)
        text = TextStream(self.tokenizer, params.stop)
        try:
            while True:
                for out in self.step():
                    if out.request_id != rid:
                        continue
                    if out.finished:
                        self.last_output = out.output
                        piece = text.finish(out.output.text)
                        if piece:
                            yield piece
                        return
                    piece = text.push(out.new_token_ids)
                    if piece:
                        yield piece
        finally:
            self.abort(rid)  # a consumer that stopped early frees the request (no-op once finished)

    def chat(self, messages: list[dict], max_new_tokens: int = 64, **kwargs) -> GenerationOutput:
        """One chat turn with the tokenizer's chat template."""
        return self.generate(self.encode_chat(messages), max_new_tokens, **kwargs)

    def answer(self, document: str, question: str | list[str], max_new_tokens: int = 128, **kwargs):
        """Long-document QA: the document first, the question last, in one chat turn. A list of
        questions goes through one document session (the document prefilled once, the questions
        decoded as one batch; a list of outputs, in order); ``lazy`` and sampling keywords as in
        ``generate``."""
        if isinstance(question, (list, tuple)):
            if not question:
                raise ValueError("answer() needs at least one question")
            lazy = kwargs.pop("lazy", "engine")
            with self.document(document, lazy=lazy) as doc:
                return doc.ask_many(list(question), max_new_tokens, **kwargs)
        return self.generate(self.prompts.qa(document, question), max_new_tokens, **kwargs)

    def document(self, document, *, lazy: LazyConfig | None | str = "engine", template: bool = True,
                 mode: str | None = None):
        """Prefill a long document once and return a ``DocumentSession`` that answers questions on it
        (``ask``, ``ask_many``, ``close``; a context manager). ``document``: text (wrapped in the QA chat
        template, as ``answer`` does, with ``template=True``) or, with ``template=False``, raw text or
        token ids to which each question is appended. ``lazy``: the engine's config by default; None is
        full attention. ``mode``: "question" (the default: the document stays full, each question is
        scored on its own probe queries and gets its own lazy layers) or "context" (the document is
        scored and demoted once on its own tail; the least memory). See ``ltengine/session.py``."""
        from .session import DocumentSession

        if self.tp is not None:
            raise ValueError("document sessions do not run on a tensor-parallel engine yet "
                             "(tensor_parallel=1 has them); use generate/answer per question there")
        return DocumentSession(self, document, self._lazy_for(lazy), mode, template)

    def documents(self, documents, *, lazy: LazyConfig | None | str = "engine", template: bool = True,
                  mode: str | None = None):
        """``document`` for several documents at once: a ``DocumentBatch`` of their sessions, prefilled
        in layer-major batches, whose questions (``ask`` one per document, or ``add(i, q)`` / ``step``)
        decode as one batch across the documents. See ``ltengine/session_batch.py``."""
        from .session_batch import DocumentBatch

        if self.tp is not None:
            raise ValueError("document sessions do not run on a tensor-parallel engine yet (tensor_parallel=1 has them)")
        return DocumentBatch.open(self, documents, self._lazy_for(lazy), mode, template)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.prompts.chat(messages)

    def detokenize(self, ids: list[int]) -> str:
        return self.prompts.decode(ids)

    def _lazy_for(self, lazy) -> LazyConfig:
        if isinstance(lazy, str) and lazy == "engine":
            return self.lazy
        if lazy is None:
            return FULL
        if not isinstance(lazy, LazyConfig):
            raise ValueError(f"lazy must be a LazyConfig or None, got {type(lazy).__name__}")
        return lazy

    def _prefill_request(self, seq: Sequence) -> PrefillRequest:
        lazy = seq.lazy
        score = self.config.score_layers and lazy.enabled
        return PrefillRequest(torch.tensor(seq.prompt, dtype=torch.long, device=self.adapter.device),
                              make_policy(lazy, self.num_layers, seq.n_full), lazy.sink, lazy.window, lazy.probe,
                              self.backend.scorer(lazy.score) if score else None,
                              self.runner.decode_reserve(seq.params.max_new_tokens))

    def _timed(self) -> float:
        if self.adapter.device.type == "cuda":
            torch.cuda.synchronize(self.adapter.device)
        return time.perf_counter()


__all__ = ["DEFAULT_MODEL_LAZY", "Engine", "GenerationOutput", "RequestOutput", "SequenceStatus"]
