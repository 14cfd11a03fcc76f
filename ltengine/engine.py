"""The user's object: ``Engine(model).generate(prompt)``, plus stream, chat and long-document answer."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .cache import KVMeter, SequenceKV
from .config import FULL, LazyConfig, SamplingParams, format_bytes, parse_bytes
from .kernels import get_backend
from .lazy import make_policy
from .models import DecoderAdapter, load_model
from .runner import decode_step, prefill
from .sampling import sample

# The embedded default model is tiny and less lazy than 7-8B models (see LIGHTTRANSFER.md).
DEFAULT_MODEL_LAZY = LazyConfig(fraction=0.25, sink=4, window=256, probe=64)


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

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

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
    finish_reason: str  # "eos", "stop" (a stop string) or "length"
    lazy_layers: list[int]  # demoted layers, sorted
    lazy_ratios: list[float]  # lazy ratio of every layer
    stats: GenerationStats
    num_layers: int = 0

    def summary(self) -> str:
        s = self.stats
        return (f"lazy layers {len(self.lazy_layers)}/{self.num_layers} {self.lazy_layers} | "
                f"KV after prefill {format_bytes(s.kv_bytes_after_prefill)} vs {format_bytes(s.full_kv_bytes)} full "
                f"({100 * s.kv_saved:.0f}% saved) | prompt {s.prompt_tokens} tok, prefill {s.prefill_s:.2f} s, "
                f"decode {s.new_tokens} tok at {s.decode_tokens_per_s:.1f} tok/s")


@dataclass
class _Seq:
    """One request's decode state."""

    prompt: list[int]
    plan_full: int
    cache: SequenceKV | None = None
    ratios: list[float] = field(default_factory=list)
    lazy_layers: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    decode_start: float = 0.0


class Engine:
    """LightTransfer-Test inference over a Hugging Face causal LM (LLaMA, Mistral, Qwen2, Qwen3).

    Args:
        model: a loaded ``transformers`` causal LM, or a local path / hub id (loaded with
            ``from_pretrained``).
        tokenizer: its tokenizer; found from the model when omitted.
        lazy: which layers go lazy; ``None`` or ``LazyConfig(fraction=0)`` is plain full attention.
        kv_budget: KV bytes one call may hold (int, or a string such as ``"12GiB"``); the number of
            lazy layers then follows from the budget instead of ``lazy.fraction``.
        backend: ``"reference"`` forces the pure-PyTorch kernels; default picks the fastest available.
    """

    def __init__(self, model, tokenizer=None, lazy: LazyConfig | None = LazyConfig(),
                 kv_budget: int | str | None = None, backend: str | None = None, progress: bool | None = None):
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
        self.lazy = lazy if lazy is not None else FULL
        self.kv_budget = parse_bytes(kv_budget)
        self.backend = get_backend(self.adapter.device, prefer=backend)
        self.progress = progress
        self.eos_ids = _eos_ids(model, self.tokenizer)

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike | None = None, lazy: LazyConfig | None | str = "default",
                        kv_budget: int | str | None = None, dtype=None, device=None, backend: str | None = None,
                        progress: bool | None = None) -> "Engine":
        """Load a model by path or hub id; ``None`` = the embedded SmolLM2-135M-Instruct (no download)."""
        model, tokenizer = load_model(name, dtype=dtype, device=device)
        if isinstance(lazy, str) and lazy == "default":
            lazy = DEFAULT_MODEL_LAZY if name is None else LazyConfig()
        return cls(model, tokenizer, lazy=lazy, kv_budget=kv_budget, backend=backend, progress=progress)

    @property
    def backends(self) -> dict[str, str]:
        """Which implementation runs each kernel op."""
        return self.backend.describe()

    @property
    def num_layers(self) -> int:
        return self.adapter.shape.num_layers

    # ------------------------------------------------------------------ public calls
    def generate(self, prompt, max_new_tokens: int = 64, *, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] | None = None,
                 ignore_eos: bool = False, lazy: LazyConfig | None | str = "engine"):
        """Generate for one prompt (text or token ids) or a batch (a list of either kind).

        Returns a ``GenerationOutput`` for one prompt, a list of them for a batch.
        """
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, stop or (), ignore_eos)
        prompts, single = self._normalize(prompt)
        outs = list(self._run(prompts, params, self._lazy_for(lazy)))
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
        if not getattr(self.tokenizer, "chat_template", None):
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

    def _check_lengths(self, prompts: list[list[int]], params: SamplingParams) -> None:
        shape = self.adapter.shape
        for n, ids in enumerate(prompts):
            where = f"prompt {n}" if len(prompts) > 1 else "prompt"
            total = len(ids) + params.max_new_tokens
            if len(ids) > shape.max_context:
                raise ValueError(f"{where} has {len(ids)} tokens, longer than the model's context of {shape.max_context}")
            if total > shape.max_context:
                raise ValueError(f"{where} ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                                 f"exceeds the model's context of {shape.max_context}; lower max_new_tokens")
            if shape.sliding_window is not None and total > shape.sliding_window:
                raise ValueError(f"the model config uses a {shape.sliding_window}-token sliding window and {where} "
                                 f"needs {total} tokens; ltengine supports full-attention configs only")

    def _bytes_per_token_layer(self) -> int:
        s = self.adapter.shape
        return 2 * s.num_kv_heads * s.head_dim * torch.empty((), dtype=self.adapter.dtype).element_size()

    def _plan(self, prompts: list[list[int]], params: SamplingParams, lazy: LazyConfig) -> list[int]:
        """Full-KV layers each prompt may keep (its queue's capacity), checked before any work."""
        num_layers = self.num_layers
        fixed = num_layers - min(lazy.num_lazy(num_layers), num_layers) if lazy.enabled else num_layers
        if self.kv_budget is None:
            return [fixed] * len(prompts)
        per = self._bytes_per_token_layer()

        def footprint(ids, n_full):
            total = len(ids) + params.max_new_tokens
            stream = min(total, lazy.sink + lazy.window) if lazy.enabled else total
            return per * (n_full * total + (num_layers - n_full) * stream)

        if isinstance(lazy.policy, tuple) or lazy.policy == "streaming" or not lazy.enabled:
            need = sum(footprint(ids, fixed) for ids in prompts)
            if need > self.kv_budget:
                raise ValueError(f"kv_budget {format_bytes(self.kv_budget)} is too small: this policy needs "
                                 f"{format_bytes(need)} of KV for these prompts")
            return [fixed] * len(prompts)
        minimum = [footprint(ids, 0) for ids in prompts]
        if sum(minimum) > self.kv_budget:
            raise ValueError(f"kv_budget {format_bytes(self.kv_budget)} is too small: even with every layer lazy "
                             f"(sink {lazy.sink} + window {lazy.window}) these prompts need {format_bytes(sum(minimum))}")
        plans, used = [], 0
        for n, ids in enumerate(prompts):
            avail = self.kv_budget - used - sum(minimum[n + 1:])
            n_full = max(f for f in range(num_layers + 1) if footprint(ids, f) <= avail or f == 0)
            plans.append(n_full)
            used += footprint(ids, n_full)
        return plans

    def _run(self, prompts: list[list[int]], params: SamplingParams, lazy: LazyConfig, stream: bool = False):
        """Prefill every prompt layer-major, then decode them together. Yields GenerationOutputs
        in prompt order (with ``stream``, the growing text of the single prompt before its output)."""
        self._check_lengths(prompts, params)
        plans = self._plan(prompts, params, lazy)
        adapter, device = self.adapter, self.adapter.device
        meter = KVMeter()
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        seqs = [_Seq(ids, plan) for ids, plan in zip(prompts, plans)]
        per = self._bytes_per_token_layer()
        first_tokens = []
        try:
            for seq in seqs:
                t0 = time.perf_counter()
                policy = make_policy(lazy, self.num_layers, seq.plan_full) if lazy.enabled else _NeverPolicy()
                ids = torch.tensor(seq.prompt, dtype=torch.long, device=device)
                bar = self._progress_bar(len(seq.prompt))
                res = prefill(adapter, ids, policy, self.backend, meter, lazy.sink, lazy.window, lazy.probe,
                              progress=(lambda n, b=bar: b.update(1)) if bar else None)
                if bar:
                    bar.close()
                seq.cache, seq.ratios, seq.lazy_layers = res.cache, res.ratios, res.cache.lazy_layers
                seq.stats = GenerationStats(prompt_tokens=len(seq.prompt), kv_bytes_after_prefill=res.cache.nbytes,
                                            full_kv_bytes=per * self.num_layers * len(seq.prompt))
                for c in res.cache.layers:  # room for the decode tokens, counted in the plan
                    c.reserve(len(seq.prompt) + params.max_new_tokens)
                first_tokens.append(res.logits)
                if cuda:
                    torch.cuda.synchronize(device)
                seq.stats.prefill_s = time.perf_counter() - t0
            tokens = sample(torch.stack(first_tokens), params, generator)
            active = list(range(len(seqs)))
            t_decode = time.perf_counter()
            for seq in seqs:
                seq.decode_start = t_decode
            while True:
                toks = tokens.tolist()
                still = []
                for s, tok in zip(active, toks):
                    if self._accept(seqs[s], tok, params):
                        still.append(s)
                    else:
                        seqs[s].stats.decode_s = time.perf_counter() - seqs[s].decode_start
                        seqs[s].cache.release()
                if stream:
                    yield seqs[0].text
                if not still:
                    break
                keep = [active.index(s) for s in still]
                active = still
                caches = [seqs[s].cache for s in active]
                positions = torch.tensor([len(seqs[s].prompt) + len(seqs[s].tokens) - 1 for s in active], device=device)
                logits = decode_step(adapter, caches, tokens[keep], positions, self.backend)
                tokens = sample(logits, params, generator)
        finally:
            for seq in seqs:
                if seq.cache is not None:
                    seq.cache.release()
        peak_cuda = torch.cuda.max_memory_allocated(device) if cuda else None
        for seq in seqs:
            seq.stats.peak_kv_bytes = meter.peak
            seq.stats.peak_cuda_allocated_bytes = peak_cuda
            yield GenerationOutput(text=seq.text, token_ids=seq.tokens, finish_reason=seq.finish_reason,
                                   lazy_layers=seq.lazy_layers,
                                   lazy_ratios=seq.ratios, stats=seq.stats, num_layers=self.num_layers)

    def _accept(self, seq: _Seq, token: int, params: SamplingParams) -> bool:
        """Append a sampled token; returns False once the sequence is finished."""
        seq.tokens.append(token)
        seq.stats.new_tokens = len(seq.tokens)
        if token in self.eos_ids and not params.ignore_eos:
            seq.finish_reason = "eos"
            seq.text = self.tokenizer.decode(seq.tokens[:-1], skip_special_tokens=True)
            return False
        seq.text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        for stop in params.stop:
            at = seq.text.find(stop)
            if at >= 0:
                seq.text, seq.finish_reason = seq.text[:at], "stop"
                return False
        if len(seq.tokens) >= params.max_new_tokens:
            seq.finish_reason = "length"
            return False
        return True

    def _progress_bar(self, prompt_tokens: int):
        show = self.progress if self.progress is not None else prompt_tokens >= 4096
        if not show:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.num_layers, desc=f"prefill {prompt_tokens} tokens", unit="layer", leave=False)


class _NeverPolicy:
    def observe(self, layer, ratio):
        return []

    def finish(self):
        return []


def _find_tokenizer(model):
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not source:
        raise ValueError("could not find the tokenizer of this model; pass it: Engine(model, tokenizer)")
    kwargs = {}
    quant = getattr(model.config, "quantization_config", None)
    gguf = quant.get("gguf_file") if isinstance(quant, dict) else getattr(quant, "gguf_file", None)
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(f"could not load the tokenizer from {source!r} ({e}); pass it: Engine(model, tokenizer)") from e


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
