"""End-to-end throughput on a Llama-3-8B-shaped random model: HF transformers vs ltengine full vs 50% lazy.

    python3 bench/throughput.py                       # the device run (H100 80GB), ~7 min
    python3 bench/throughput.py --quick --runner auto # CPU smoke: 2 layers, hidden 256, 256-token prompts

One command measures the baseline and both engine modes in the same process, on the same weights:

- copy bandwidth first (a large device-to-device copy, bytes read + written), the yardstick of every
  bandwidth floor below;
- points ``1x8k``, ``8x8k``, ``1x32k``: batch x prompt tokens, ``--new-tokens`` (256) greedy tokens each;
- ``budget``: as many 32k prompts as fit the ``--kv-budget`` (40 GiB) KV pool in each engine mode
  (worst case per sequence: prompt + new tokens on full layers, sink + window on lazy ones); HF gets the
  ltengine-full count and, if that does not fit its own memory, fewer (the count that ran is reported);
- ``longest``: the longest single prompt each engine mode can prefill in ``--long-budget`` (arithmetic
  from the pool, then verified by prefilling it; the lazy mode must keep exactly its 50% lazy layers);
- ``prefill``: ``--prefill-shapes`` (128 x 256 and 32 x 2048 tokens) prompts, 50% lazy, 1 new token each:
  prefill time one prompt at a time (``max_prefill_tokens=1``) vs batched (the engine's default);
- modes ``full-fp8`` / ``lazy-fp8``: the same engine modes with ``kv_dtype="fp8"`` (``--kv-dtype fp8`` makes
  ``full`` / ``lazy`` fp8 too); their floors, pool capacity and admission count fp8 bytes (scales included);
- ``scoring``: prefill of one 32k prompt with ``LazyConfig(fraction=0.5)``, ``lazy=None`` and
  ``lazy=None, score_layers=False``: the share of prefill the lazy-ratio scoring adds.

Per run: prefill s, decode tokens/s, peak GPU memory (``torch.cuda.max_memory_allocated``, reset before
the timed call, after a warm-up call on the same engine), peak KV, and the bandwidth floor: bytes one
decode step must read (weights except the input embedding + every sequence's KV at its mean decode
context) over the copy bandwidth; floor tok/s = batch / (bytes / bw). HF decode tok/s counts
``batch * (new - 1)`` tokens from the first-step logits to the end of ``generate`` (a logits processor
timestamps the first step); ltengine's comes from ``engine.last_stats``.

Every run catches its own OOM / error; the table and the JSON (``--json``, default ``$OUT/throughput.json``)
are written after every run, so a killed run still leaves what it measured.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from ltengine import Engine, LazyConfig  # noqa: E402
from ltengine.config import format_bytes, parse_bytes  # noqa: E402

GiB = 2**30
CONFIG_8B = os.path.join(HERE, "llama3_8b_config.json")
# --quick: the 8B config shrunk to something a laptop CPU runs in seconds
QUICK_OVERRIDES = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, vocab_size=1024, max_position_embeddings=8192,
                       bos_token_id=1, eos_token_id=2)
# run order: the targets' points first; 1x32k before budget, whose HF fallback count uses its peak
POINTS = ("1x8k", "1x32k", "budget", "longest", "scoring", "8x8k", "prefill")
TABLE_ORDER = ("1x8k", "8x8k", "1x32k", "budget", "longest", "scoring", "prefill")
MODES = ("hf", "full", "lazy", "full-fp8", "lazy-fp8")


# ---------------------------------------------------------------------------------------------- model
def load_config(path: str = CONFIG_8B, **overrides):
    from transformers import LlamaConfig

    d = json.load(open(path))
    d.update(overrides)
    d.pop("architectures", None)
    d.pop("model_type", None)
    return LlamaConfig(attn_implementation="sdpa", **d)


def build_model(config, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """Random weights, created on ``device`` in ``dtype`` (no fp32 copy first). Returns (model, seconds)."""
    from transformers import LlamaForCausalLM

    device = torch.device(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)  # transformers' own init: normal(0, initializer_range)
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    model.generation_config.pad_token_id = 0
    _sync(device)
    return model, time.perf_counter() - t0


def decode_weight_bytes(model) -> int:
    """Weight bytes one decode step reads: every parameter except the input embedding (one row per
    token), unless it is tied to the LM head (then the head reads it)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    tied = emb.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    return total if tied else total - emb.numel() * emb.element_size()


class IdsTokenizer:
    """The benchmark passes token ids and never reads text."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        raise ValueError("benchmark prompts are token ids")

    def decode(self, ids, skip_special_tokens=True):
        return ""


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


# ---------------------------------------------------------------------------------------------- helpers
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy, read + write counted, median of timed reps."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for rep in range(23):
        _sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) * 1e-3
        else:
            dst.copy_(src)
            dt = time.perf_counter() - t0
        if rep >= 3:
            times.append(dt)
    del src, dst
    free_memory()
    return 2 * nbytes / statistics.median(times)


def engine_kwargs_supported() -> set[str]:
    names = set(inspect.signature(Engine.__init__).parameters)
    try:  # EngineConfig fields are keyword arguments of Engine too
        import dataclasses

        from ltengine.config import EngineConfig
        names |= {f.name for f in dataclasses.fields(EngineConfig)}
    except ImportError:
        pass
    return names


def make_engine(model, notes: list[str], **kwargs) -> Engine:
    """An Engine with the contract's keyword arguments; ones this engine version lacks are dropped
    (and noted), so the script runs against the engine before and after the paged runner lands."""
    ok = engine_kwargs_supported()
    dropped = sorted(k for k in kwargs if k not in ok)
    for k in dropped:
        note = f"engine has no {k}= argument (ignored)"
        if note not in notes:
            notes.append(note)
    return Engine(model, IdsTokenizer(), **{k: v for k, v in kwargs.items() if k in ok})


# ---------------------------------------------------------------------------------------------- the bench
class Bench:
    def __init__(self, args):
        self.args = args
        self.t_start = time.perf_counter()
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.quick = args.quick
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            args.dtype or ("bf16" if self.cuda else "fp32")]
        self.short = args.short or (256 if self.quick else 8192)
        self.long = args.long or (512 if self.quick else 32768)
        self.new = args.new_tokens or (8 if self.quick else 256)
        self.hf_budget_new = args.hf_budget_new_tokens or (8 if self.quick else 64)
        self.long_new = args.long_new_tokens or (4 if self.quick else 16)
        args.scoring_reps = args.scoring_reps or (3 if self.quick else 2)
        self.kv_budget = parse_bytes(args.kv_budget or ("5MiB" if self.quick else "40GiB"))
        self.long_budget = parse_bytes(args.long_budget or ("1MiB" if self.quick else "8GiB"))
        sink, window = args.sink, args.window or (60 if self.quick else 1020)
        self.lazy = LazyConfig(fraction=args.fraction, sink=sink, window=window)
        paged = args.runner == "paged" or (args.runner == "auto" and self.cuda)
        default_bs = inspect.signature(Engine.__init__).parameters.get("block_size")
        default_bs = default_bs.default if default_bs is not None else 1
        # the paged pool's granularity; the reference runner counts bytes
        self.block = args.block_size or (default_bs if paged else 1)
        self.records: list[dict] = []
        self.notes: list[str] = []
        self.info: dict = {}
        self.json_path = args.json or (os.path.join(os.environ["OUT"], "throughput.json") if os.environ.get("OUT") else None)

    # -------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        a = self.args
        info = self.info
        info.update(device=torch.cuda.get_device_name(self.device) if self.cuda else "cpu",
                    torch=torch.__version__, dtype=str(self.dtype).replace("torch.", ""), runner=a.runner,
                    quick=self.quick, commit=_git_commit(), argv=sys.argv[1:])
        import transformers

        info["transformers"] = transformers.__version__
        nbytes = (256 * 2**20 if self.quick or not self.cuda else 2 * GiB)
        self.bw = copy_bandwidth(self.device, nbytes)
        info["copy_bw_GBps"] = self.bw / 1e9
        print(f"copy bandwidth: {self.bw / 1e9:.0f} GB/s (read + write, {nbytes / 2**20:.0f} MiB copy)", flush=True)
        overrides = dict(QUICK_OVERRIDES if self.quick else {})
        if a.max_context:
            overrides["max_position_embeddings"] = a.max_context
        config = load_config(a.config, **overrides)
        self.model, init_s = build_model(config, self.device, self.dtype, seed=a.seed)
        self.config = config
        self.L = config.num_hidden_layers
        self.n_lazy = self.lazy.num_lazy(self.L)
        self.per_tl = 2 * config.num_key_value_heads * config.head_dim * torch.empty((), dtype=self.dtype).element_size()
        # fp8: one byte per element + a float32 scale per token and KV head (ltengine/kernels/fp8.py)
        self.per_tl_fp8 = 2 * config.num_key_value_heads * (config.head_dim + 4)
        self.weight_bytes = decode_weight_bytes(self.model)
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.context = config.max_position_embeddings
        info.update(model_init_s=init_s, layers=self.L, weight_bytes=self.param_bytes,
                    decode_weight_bytes=self.weight_bytes, kv_bytes_per_token_layer=self.per_tl,
                    kv_bytes_per_token_layer_fp8=self.per_tl_fp8, kv_dtype=a.kv_dtype,
                    kv_budget=self.kv_budget, long_budget=self.long_budget, new_tokens=self.new,
                    hf_budget_new_tokens=self.hf_budget_new, sink=self.lazy.sink, window=self.lazy.window,
                    fraction=self.lazy.fraction, lazy_layers_expected=self.n_lazy, block_size=self.block,
                    engine_kwargs=sorted(engine_kwargs_supported() - {"self", "model"}))
        params = sum(p.numel() for p in self.model.parameters())
        print(f"model: {self.L} layers, {params / 1e9:.2f} B params, {self.dtype}, built on {self.device} "
              f"in {init_s:.1f} s; decode reads {self.weight_bytes / 1e9:.2f} GB of weights per step", flush=True)
        if self.cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            info["gpu_total_bytes"] = total
            print(f"GPU memory: {free / GiB:.1f} GiB free of {total / GiB:.1f} GiB after the model", flush=True)
        if "hf" in self.modes():
            try:  # warm-up (cuBLAS handles, SDPA kernels); a failure here shows again in the HF rows
                self._hf_generate([random_prompts(1, min(512, self.short), self.config.vocab_size, 999)[0]], 4)
            except Exception as e:  # noqa: BLE001
                self.notes.append(f"HF warm-up failed: {_short(e)}")
                free_memory()

    def modes(self) -> list[str]:
        modes = [m.strip() for m in self.args.modes.split(",") if m.strip()]
        return [m for m in modes if not (m == "hf" and self.args.skip_hf)]

    # -------------------------------------------------------------------------------- bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def out_of_time(self) -> bool:
        return self.elapsed() > self.args.deadline_s

    def record(self, rec: dict) -> dict:
        self.records.append(rec)
        line = format_row(rec)
        print(line + (f"   [{rec['error'][:300]}]" if rec.get("error") else ""), flush=True)
        self.write_json()
        return rec

    def write_json(self, targets=None) -> None:
        if not self.json_path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.json_path)), exist_ok=True)
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"info": self.info, "notes": self.notes, "records": self.records,
                       "targets": targets, "elapsed_s": self.elapsed()}, f, indent=1, default=str)
        os.replace(tmp, self.json_path)

    def skipped(self, point, mode, why, **extra) -> dict:
        return self.record(dict(point=point, mode=mode, status="skipped", error=why, **extra))

    # -------------------------------------------------------------------------------- floors
    @staticmethod
    def base_mode(mode: str) -> str:
        """``full`` / ``lazy`` (/ ``hf``) of a mode name, without its ``-fp8``."""
        return mode.split("-")[0]

    def kv_dtype(self, mode: str) -> str | None:
        """The engine's ``kv_dtype`` for a mode (None: the model's)."""
        if mode.endswith("-fp8"):
            return "fp8"
        return None if mode == "hf" or self.args.kv_dtype == "auto" else self.args.kv_dtype

    def per_token_layer(self, mode: str) -> int:
        return self.per_tl_fp8 if self.kv_dtype(mode) == "fp8" else self.per_tl

    def kv_read_bytes(self, prompt: int, new: int, n_lazy: int, mode: str = "full") -> float:
        """KV bytes one decode step reads for one sequence at its mean decode context."""
        ctx = prompt + new / 2
        lazy_ctx = min(ctx, self.lazy.sink + self.lazy.window)
        return self.per_token_layer(mode) * ((self.L - n_lazy) * ctx + n_lazy * lazy_ctx)

    def floor(self, batch: int, prompt: int, new: int, lazy_counts: list[int], weights: int | None = None,
              mode: str = "full"):
        """(bytes per decode step, floor tok/s) for ``batch`` sequences."""
        counts = lazy_counts if len(lazy_counts) == batch else [0] * batch
        step = (weights or self.weight_bytes) + sum(self.kv_read_bytes(prompt, new, c, mode) for c in counts)
        return step, batch / (step / self.bw)

    def add_floor(self, rec: dict, batch: int, prompt: int, new: int, lazy_counts: list[int]) -> None:
        """The floor (weights without the input embedding) and, for comparison with bench/paged_probe.py,
        the floor counting every parameter."""
        mode = rec.get("mode", "full")
        rec["floor_bytes_per_step"], rec["floor_tok_s"] = self.floor(batch, prompt, new, lazy_counts, mode=mode)
        rec["floor_pct"] = _pct(rec["decode_tok_s"], rec["floor_tok_s"])
        _, all_w = self.floor(batch, prompt, new, lazy_counts, weights=self.param_bytes, mode=mode)
        rec["floor_pct_all_weights"] = _pct(rec["decode_tok_s"], all_w)

    def full_need(self, prompt: int, new: int) -> int:
        """KV bytes of full attention (what HF's DynamicCache holds)."""
        return self.per_tl * self.L * (prompt + new)

    def units(self, prompt: int, new: int, n_lazy: int) -> int:
        """A sequence's worst case in pool blocks (the engine's admission rule): prompt + new tokens
        on full layers, sink + window on lazy ones, each layer rounded up to whole blocks."""
        total, bs = prompt + new, self.block
        return (self.L - n_lazy) * -(-total // bs) + n_lazy * -(-min(total, self.lazy.sink + self.lazy.window) // bs)

    def capacity(self, budget: int, mode: str = "full") -> int:
        """Pool blocks a budget buys (the paged engine adds its scratch block on top)."""
        return budget // (self.block * self.per_token_layer(mode))

    # -------------------------------------------------------------------------------- HF
    def _hf_generate(self, prompts: list[list[int]], new: int) -> dict:
        from transformers import LogitsProcessor, LogitsProcessorList

        device = self.device

        class FirstStep(LogitsProcessor):
            """Timestamps the first call: the prefill forward has produced its logits."""

            t_first = None

            def __call__(self, input_ids, scores):
                if self.t_first is None:
                    _sync(device)
                    self.t_first = time.perf_counter()
                return scores

        ids = torch.tensor(prompts, dtype=torch.long, device=device)
        mark = FirstStep()
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, num_beams=1, pad_token_id=0,
                                      logits_processor=LogitsProcessorList([mark]), use_cache=True)
        _sync(device)
        t_end = time.perf_counter()
        made = out.shape[1] - ids.shape[1]
        b = ids.shape[0]
        del out, ids
        decode_s = t_end - mark.t_first
        return dict(prefill_s=mark.t_first - t0, decode_s=decode_s, new_tokens=made, decode_tokens=b * (made - 1),
                    decode_tok_s=b * (made - 1) / decode_s if decode_s > 0 else None, wall_s=t_end - t0)

    def run_hf(self, point: str, prompts: list[list[int]], new: int, note: str = "") -> dict:
        b, t = len(prompts), len(prompts[0])
        rec = dict(point=point, mode="hf", batch=b, prompt_tokens=t, new_tokens=new, note=note)
        try:
            self._reset_peak()
            rec.update(self._hf_generate(prompts, new))
            rec["status"] = "ok"
            rec["peak_gpu_bytes"] = self._peak()
        except Exception as e:  # noqa: BLE001 - every failure is a row in the table
            rec.update(status="oom" if is_oom(e) else "error", error=_short(e))
            if not is_oom(e):
                traceback.print_exc()
        free_memory()
        if rec["status"] == "ok":
            rec["peak_kv_bytes"] = self.full_need(t, new) * b  # DynamicCache holds every layer in full
            self.add_floor(rec, b, t, new, [0] * b)
        return self.record(rec)

    # -------------------------------------------------------------------------------- ltengine
    def engine(self, mode: str, budget: int | None, **extra) -> Engine:
        lazy = self.lazy if self.base_mode(mode) == "lazy" else None
        kw = dict(lazy=lazy, kv_budget=budget, runner=self.args.runner, progress=False)
        if self.kv_dtype(mode):
            kw["kv_dtype"] = self.kv_dtype(mode)
        if self.args.block_size:
            kw["block_size"] = self.args.block_size
        if self.args.backend:
            kw["backend"] = self.args.backend
        kw.update(extra)
        eng = make_engine(self.model, self.notes, **kw)
        if self.args.linear == "torch":  # the decode step's projections through F.linear (cuBLAS)
            eng.backend.drop("linear", "cuda")
        eng.backend.fold_linear = self.args.linear == "auto"  # else the norms, residual adds, SiLU: own kernels
        eng.backend.overlap_decode = self.args.decode_overlap == "on"
        return eng

    def warm(self, engine: Engine, batch: int) -> None:
        """Prefill + a few decode steps at the timed batch size (CUDA graphs, Triton JIT, allocator)."""
        warm_len = min(512, self.short)
        engine.generate(random_prompts(batch, warm_len, self.config.vocab_size, 7), max_new_tokens=8, ignore_eos=True)

    def run_engine(self, point: str, mode: str, prompts: list[list[int]], new: int, budget: int | None,
                   note: str = "", engine: Engine | None = None, **extra) -> dict:
        b, t = len(prompts), len(prompts[0])
        rec = dict(point=point, mode=mode, batch=b, prompt_tokens=t, new_tokens=new, kv_budget=budget, note=note)
        own = engine is None
        try:
            if own:
                t0 = time.perf_counter()
                engine = self.engine(mode, budget, **extra)
                self.warm(engine, b)
                rec["engine_setup_s"] = time.perf_counter() - t0
            self._reset_peak()
            t0 = time.perf_counter()
            outs = engine.generate(prompts, max_new_tokens=new, ignore_eos=True)
            _sync(self.device)
            rec["wall_s"] = time.perf_counter() - t0
            rec["peak_gpu_bytes"] = self._peak()
            rec.update(summarize(engine, outs))
            rec["status"] = "ok" if not rec["errors"] else "partial" if rec["errors"] < b else "error"
        except Exception as e:  # noqa: BLE001
            rec.update(status="oom" if is_oom(e) else "error", error=_short(e))
            if not is_oom(e) and not isinstance(e, ValueError):
                traceback.print_exc()
        if own:
            del engine
            free_memory()
        if rec.get("decode_tok_s"):
            self.add_floor(rec, rec["batch_ok"], t, new, rec["lazy_counts_ok"])
        if budget is not None and rec.get("peak_kv_bytes") is not None:
            rec["peak_kv_within_budget"] = rec["peak_kv_bytes"] <= budget
            if not rec["peak_kv_within_budget"]:
                over = rec["peak_kv_bytes"] - budget
                rec["note"] = (rec["note"] + "; " if rec["note"] else "") + \
                    f"peak KV {over / (self.per_token_layer(mode) * t):.2f} layer(s) of this prompt over the budget"
        if self.base_mode(mode) == "lazy" and rec.get("lazy_counts_ok") and set(rec["lazy_counts_ok"]) != {self.n_lazy}:
            rec["note"] = (rec["note"] + "; " if rec["note"] else "") + \
                f"lazy layers per seq {sorted(set(rec['lazy_counts_ok']))}, expected {self.n_lazy}"
        return self.record(rec)

    def _reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    # -------------------------------------------------------------------------------- points
    def point_fixed(self, name: str, batch: int, length: int) -> None:
        prompts = random_prompts(batch, length, self.config.vocab_size, seed=sum(map(ord, name)))
        for mode in self.modes():
            if self.out_of_time():
                self.skipped(name, mode, f"deadline ({self.args.deadline_s:.0f} s) passed", batch=batch, prompt_tokens=length)
                continue
            if mode == "hf":
                self.run_hf(name, prompts, self.new)
            else:
                self.run_engine(name, mode, prompts, self.new, self.kv_budget)

    def budget_counts(self, budget: int) -> dict[str, int]:
        t, new = self.long, self.new
        return {m: self.capacity(budget, m) // self.units(t, new, 0 if self.base_mode(m) == "full" else self.n_lazy)
                for m in MODES if m != "hf"}

    def point_budget(self) -> None:
        name, t = "budget", self.long
        counts = self.budget_counts(self.kv_budget)
        self.info["budget_counts"] = counts
        print(f"budget {format_bytes(self.kv_budget)}: {counts['full']} x {t} fit in full mode, "
              f"{counts['lazy']} x {t} with {self.n_lazy}/{self.L} lazy layers; fp8 KV: {counts['full-fp8']} full, "
              f"{counts['lazy-fp8']} lazy (worst case per sequence, "
              f"prompt + {self.new} new tokens)", flush=True)
        for mode in self.modes():
            if self.out_of_time():
                self.skipped(name, mode, "deadline passed", prompt_tokens=t)
                continue
            if mode == "hf":
                self.budget_hf(counts["full"])
            else:
                n = counts[mode]
                if n < 1:
                    self.skipped(name, mode, f"not one {t}-token prompt fits {format_bytes(self.kv_budget)}")
                    continue
                prompts = random_prompts(n, t, self.config.vocab_size, seed=11)
                rec = self.run_engine(name, mode, prompts, self.new, self.kv_budget)
                if rec.get("max_running") is not None and rec["max_running"] < n:
                    rec["note"] = (rec.get("note") or "") + f" only {rec['max_running']} of {n} decoded at once"
                    self.write_json()

    def budget_hf(self, n: int) -> None:
        """HF with the ltengine-full count of 32k prompts; on OOM, fewer (what fits its own memory)."""
        t, new = self.long, self.hf_budget_new
        tried, rec_oom = [], None
        while n >= 1 and not self.out_of_time():
            tried.append(n)
            note = f"tried counts {tried}" + (f"; {new} new tokens, not {self.new}: HF decode here is slow"
                                              if new != self.new else "")
            rec = self.run_hf("budget", random_prompts(n, t, self.config.vocab_size, seed=11), new, note=note)
            if rec["status"] != "oom":
                return
            self.records.remove(rec)  # keep only the count that ran (the tries are in the note)
            rec_oom = rec
            n = min(n - 1, self.hf_fit_estimate(t, new) or n - 1)
        if rec_oom is not None:
            rec_oom["note"] = f"no count fit; tried {tried}" if n < 1 else f"deadline; tried {tried}"
            self.record(rec_oom)

    def hf_fit_estimate(self, t: int, new: int) -> int | None:
        """HF sequences of ``t`` tokens that fit the GPU, from the 1x32k HF run's peak if it ran."""
        if not self.cuda:
            return None
        one = next((r for r in self.records if r["mode"] == "hf" and r.get("status") == "ok"
                    and r.get("batch") == 1 and r.get("prompt_tokens") == t), None)
        total = self.info.get("gpu_total_bytes")
        if not total:
            return None
        if one is not None and one.get("peak_gpu_bytes"):
            per_seq = one["peak_gpu_bytes"] - self.param_bytes
        else:  # its DynamicCache + the prefill's MLP and residual activations
            c, size = self.config, torch.empty((), dtype=self.dtype).element_size()
            per_seq = self.full_need(t, new) + t * (3 * c.intermediate_size + 4 * c.hidden_size) * size
        return max(1, int((0.95 * total - self.param_bytes) // per_seq))

    def longest_arith(self, budget: int, mode: str, extra_full: int = 0) -> int:
        """Longest prompt whose worst case fits ``budget`` by the admission rule (binary search; no
        context cap). ``extra_full``: full layers more than the mode keeps (a layer in flight)."""
        n_lazy = (0 if self.base_mode(mode) == "full" else self.n_lazy) - extra_full
        cap, lo, hi = self.capacity(budget, mode), 0, 1
        while self.units(hi, self.long_new, n_lazy) <= cap:
            hi *= 2
        while hi - lo > 1:  # units(lo) fits, units(hi) does not
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.units(mid, self.long_new, n_lazy) <= cap else (lo, mid)
        return lo

    def point_longest(self) -> None:
        name, budget = "longest", self.long_budget
        align = max(self.block, 16)  # whole pool blocks (prompt lengths only; the search counts new tokens)
        arith40 = {m: self.longest_arith(self.kv_budget, m) for m in MODES if m != "hf"}
        self.info["longest_arith_kv_budget"] = arith40
        print(f"longest prompt by arithmetic at {format_bytes(self.kv_budget)}: full {arith40['full']}, lazy "
              f"{arith40['lazy']} (model context {self.context}); measured at --long-budget "
              f"{format_bytes(budget)}", flush=True)
        for mode in MODES[1:]:
            if mode not in self.modes():
                continue
            if self.out_of_time():
                self.skipped(name, mode, "deadline passed")
                continue
            arith = self.longest_arith(budget, mode)
            cap = self.context - self.long_new
            base = min(arith, cap)
            cands = []
            # the arithmetic, then one more full layer in flight during prefill, then a few steps down
            extra_layer = base if self.base_mode(mode) == "full" else self.longest_arith(budget, mode, extra_full=1)
            for t in (base, min(base, extra_layer), base * 0.97, base * 0.94, base * 0.9, base * 0.8):
                t = int(t) // align * align
                if t >= 1 and t not in cands:
                    cands.append(t)
            engine = None
            try:
                engine = self.engine(mode, budget)
                self.warm(engine, 1)
            except Exception as e:  # noqa: BLE001
                self.record(dict(point=name, mode=mode, status="oom" if is_oom(e) else "error", error=_short(e),
                                 kv_budget=budget))
                del engine
                free_memory()
                continue
            tried, last, fits = [], None, False
            for t in cands:
                if self.out_of_time():
                    break
                prompt = random_prompts(1, t, self.config.vocab_size, seed=13)
                note = f"arith {arith}{' (capped by context)' if arith > cap else ''}; tried {tried + [t]}"
                last = self.run_engine(name, mode, prompt, self.long_new, budget, note=note, engine=engine)
                tried.append(t)
                fits = last["status"] == "ok" and (self.base_mode(mode) == "full" or
                                                   last.get("lazy_counts_ok") == [self.n_lazy])
                last.update(fits=fits, arith_tokens=arith)
                if fits:
                    break
                self.records.remove(last)  # a try that did not fit: printed above, not a result
                free_memory()  # an OOM here is the activations, not the pool: smaller prompts may fit
            if not fits:
                why = "deadline passed" if self.out_of_time() else "nothing fit"
                last = last or dict(point=name, mode=mode, status="skipped", kv_budget=budget)
                last["note"] = f"{why}; tried {tried}"
                if last["status"] in ("ok", "partial"):  # it ran, but with more lazy layers than asked
                    last["status"] = "no fit"
                self.records.append(last)
            self.write_json()
            del engine
            free_memory()

    def point_scoring(self) -> None:
        name, t = "scoring", self.long
        prompt = random_prompts(1, t, self.config.vocab_size, seed=17)
        variants = [("lazy", dict(), "LazyConfig(fraction)"), ("full", dict(), "lazy=None (scoring on)"),
                    ("full", dict(score_layers=False), "lazy=None, score_layers=False")]
        if "score_layers" not in engine_kwargs_supported():
            self.notes.append("engine has no score_layers=: the scoring-off prefill cannot be measured")
        for mode, extra, label in variants:
            if self.out_of_time():
                self.skipped(name, mode, "deadline passed", note=label)
                continue
            if extra and not set(extra) <= engine_kwargs_supported():
                self.skipped(name, mode, "engine has no score_layers=", note=label)
                continue
            rec = dict(point=name, mode=mode, batch=1, prompt_tokens=t, new_tokens=1, note=label, kv_budget=self.kv_budget)
            engine = None
            try:
                engine = self.engine(mode, self.kv_budget, **extra)
                engine.generate(prompt, max_new_tokens=1, ignore_eos=True)  # warm-up at the timed shape
                times = []
                for _ in range(self.args.scoring_reps):
                    self._reset_peak()
                    out = engine.generate(prompt, max_new_tokens=1, ignore_eos=True)
                    out = out[0] if isinstance(out, list) else out
                    if out.finish_reason == "error":
                        raise RuntimeError(f"prefill failed: {getattr(out, 'error', None)}")
                    times.append(out.stats.prefill_s)
                rec.update(status="ok", prefill_s=min(times), prefill_all_s=times, peak_gpu_bytes=self._peak(),
                           lazy_counts_ok=[len(out.lazy_layers)])
            except Exception as e:  # noqa: BLE001
                rec.update(status="oom" if is_oom(e) else "error", error=_short(e))
            del engine
            free_memory()
            self.record(rec)

    def point_prefill(self) -> None:
        """Many short prompts: prefill one at a time vs batched (same engine mode, same prompts)."""
        name = "prefill"
        if "max_prefill_tokens" not in engine_kwargs_supported():
            self.skipped(name, "lazy", "engine has no max_prefill_tokens= (no batched prefill)")
            return
        for n, t in self.prefill_shapes():
            prompts = random_prompts(n, t, self.config.vocab_size, seed=23)
            for label, cap in (("one at a time", 1), ("batched", None)):
                if self.out_of_time():
                    self.skipped(name, "lazy", "deadline passed", note=label, batch=n, prompt_tokens=t)
                    continue
                rec = dict(point=name, mode="lazy", batch=n, prompt_tokens=t, new_tokens=1, note=label,
                           kv_budget=self.kv_budget)
                engine = None
                try:
                    engine = self.engine("lazy", self.kv_budget, **({"max_prefill_tokens": cap} if cap else {}))
                    engine.generate(prompts, max_new_tokens=1, ignore_eos=True)  # warm-up at the timed shapes
                    self._reset_peak()
                    outs = engine.generate(prompts, max_new_tokens=1, ignore_eos=True)
                    _sync(self.device)
                    rec.update(summarize(engine, outs))
                    rec.update(status="ok" if not rec["errors"] else "error", peak_gpu_bytes=self._peak(),
                               prefill_tok_s=n * t / rec["prefill_s"] if rec.get("prefill_s") else None,
                               prefill_batches=sorted({o.stats.prefill_batch for o in outs}))
                except Exception as e:  # noqa: BLE001
                    rec.update(status="oom" if is_oom(e) else "error", error=_short(e))
                del engine
                free_memory()
                self.record(rec)

    def prefill_shapes(self) -> list[tuple[int, int]]:
        spec = self.args.prefill_shapes or ("16x32,4x128" if self.quick else "128x256,32x2048")
        return [tuple(int(x) for x in shape.split("x")) for shape in spec.split(",")]

    # -------------------------------------------------------------------------------- targets
    def targets(self) -> list[dict]:
        def get(point, mode, key="decode_tok_s", note=None):
            for r in self.records:
                if r["point"] == point and r["mode"] == mode and r.get("status") in ("ok", "partial") and \
                        (note is None or r.get("note") == note):
                    return r.get(key)
            return None

        out = []

        def target(name, value, limit, holds):
            out.append(dict(target=name, value=value, limit=limit, holds=None if value is None else holds))

        pct = get("1x8k", "full", "floor_pct")
        target("full 1x8k decode >= 70% of the bandwidth floor", pct, 70, pct is not None and pct >= 70)
        lazy_b, full_b, hf_b = get("budget", "lazy"), get("budget", "full"), get("budget", "hf")
        r = lazy_b / full_b if lazy_b and full_b else None
        target("budget: 50% lazy tok/s >= 2.0x ltengine full", r, 2.0, r is not None and r >= 2.0)
        r = lazy_b / hf_b if lazy_b and hf_b else None
        target("budget: 50% lazy tok/s >= 10x HF", r, 10.0, r is not None and r >= 10.0)
        lf, ll = get("longest", "full", "prompt_tokens"), get("longest", "lazy", "prompt_tokens")
        r = ll / lf if lf and ll else None
        target("longest prompt: 50% lazy >= 1.9x full", r, 1.9, r is not None and r >= 1.9)
        self.fp8_targets(get, target)
        on = get("scoring", "full", "prefill_s", note="lazy=None (scoring on)")
        off = get("scoring", "full", "prefill_s", note="lazy=None, score_layers=False")
        pct = 100 * (on - off) / off if on and off else None
        target("scoring adds <= 3% to prefill (lazy=None: on vs off)", pct, 3.0, pct is not None and pct <= 3.0)
        peaks = [r for r in self.records if "peak_kv_within_budget" in r]
        bad = [f"{r['point']}/{r['mode']}" for r in peaks if not r["peak_kv_within_budget"]]
        target("peak KV never above the budget", f"{len(peaks) - len(bad)}/{len(peaks)} runs within" +
               (f" (over: {', '.join(bad)})" if bad else ""), "budget", bool(peaks) and not bad)
        if not peaks:
            out[-1]["holds"] = None
        return out

    def fp8_targets(self, get, target) -> None:
        """Issue 14's fp8 targets (only where the -fp8 modes ran): budget point sequences admitted
        (``max_running``) and decode tok/s against full bf16 and 50% lazy bf16; floors; longest prompt."""
        def ratio(a, b):
            return a / b if a and b else None

        def check(name, value, limit):
            target(name, value, limit, value is not None and value >= limit)

        if get("budget", "lazy-fp8") or get("budget", "full-fp8"):
            seqs = {m: get("budget", m, "max_running") for m in ("full", "lazy", "full-fp8", "lazy-fp8")}
            tok = {m: get("budget", m) for m in seqs}
            check("budget: 50% lazy + fp8 admits >= 3.8x the sequences of full bf16", ratio(seqs["lazy-fp8"], seqs["full"]), 3.8)
            check("budget: 50% lazy + fp8 tok/s >= 3.5x full bf16", ratio(tok["lazy-fp8"], tok["full"]), 3.5)
            check("budget: 50% lazy + fp8 tok/s >= 1.8x 50% lazy bf16", ratio(tok["lazy-fp8"], tok["lazy"]), 1.8)
            check("budget: full + fp8 tok/s >= 1.8x full bf16", ratio(tok["full-fp8"], tok["full"]), 1.8)
            for m in seqs:
                check(f"budget: {m} decode >= 85% of its own bandwidth floor", get("budget", m, "floor_pct"), 85)
        lf, l8 = get("longest", "full", "prompt_tokens"), get("longest", "lazy-fp8", "prompt_tokens")
        if l8:
            check("longest prompt: 50% lazy + fp8 >= 3.8x full bf16", ratio(l8, lf), 3.8)

    def report(self) -> None:
        print()
        print(format_table(self.records, self.info))
        lazy_s = _first(self.records, "scoring", "lazy", "prefill_s")
        on = _first(self.records, "scoring", "full", "prefill_s", "lazy=None (scoring on)")
        off = _first(self.records, "scoring", "full", "prefill_s", "lazy=None, score_layers=False")
        if off:
            print(f"\nscoring overhead on 1x{self.long} prefill (min of {self.args.scoring_reps}): "
                  f"no scoring {off:.3f} s; lazy=None with scoring {_fmt(on, '.3f')} s "
                  f"({_fmt(100 * (on - off) / off if on else None, '+.1f')}%); LazyConfig(fraction={self.lazy.fraction}) "
                  f"{_fmt(lazy_s, '.3f')} s ({_fmt(100 * (lazy_s - off) / off if lazy_s else None, '+.1f')}%, "
                  f"scoring + truncation)")
        if any(r["point"] == "prefill" for r in self.records):
            print()
        for n, t in self.prefill_shapes():
            one, many = (next((r["prefill_s"] for r in self.records if r["point"] == "prefill" and r.get("status") == "ok"
                               and r["batch"] == n and r["prompt_tokens"] == t and r["note"] == note), None)
                         for note in ("one at a time", "batched"))
            if one and many:
                print(f"prefill of {n} x {t} tokens: one at a time {one:.3f} s, batched {many:.3f} s "
                      f"({one / many:.2f}x, {n * t / many:.0f} tok/s)")
        targets = self.targets()
        print("\ntargets:")
        for t in targets:
            mark = {True: "HOLDS", False: "MISSED", None: "not measured"}[t["holds"]]
            v = t["value"]
            v = f"{v:.2f}" if isinstance(v, float) else v
            print(f"  [{mark:>12}] {t['target']}: {v}")
        if self.notes:
            print("\nnotes:\n  " + "\n  ".join(self.notes))
        print(f"\ntotal {self.elapsed():.0f} s" + (f"; JSON: {self.json_path}" if self.json_path else ""))
        self.write_json(targets)


def summarize(engine: Engine, outs) -> dict:
    """The timed call's numbers: from ``engine.last_stats`` when the engine has it, else from the outputs."""
    outs = outs if isinstance(outs, list) else [outs]
    ok = [o for o in outs if o.finish_reason != "error"]
    errs = [getattr(o, "error", None) or "error" for o in outs if o.finish_reason == "error"]
    d = dict(errors=len(errs), batch_ok=len(ok), lazy_counts_ok=[len(o.lazy_layers) for o in ok],
             new_tokens_made=sorted({o.stats.new_tokens for o in ok}))
    if errs:
        d["error"] = f"{len(errs)} sequence(s) failed: {errs[0]}"
    ls = getattr(engine, "last_stats", None)
    if ls:
        d.update(prefill_s=ls.get("prefill_s"), decode_s=ls.get("decode_s"), decode_tokens=ls.get("decode_tokens"),
                 decode_tok_s=ls.get("decode_tokens_per_s"), peak_kv_bytes=ls.get("peak_kv_bytes"),
                 max_running=ls.get("max_running"), pool_bytes=ls.get("pool_bytes"),
                 kv_used_after=ls.get("kv_used_after"), stats_source="last_stats")
    elif ok:
        decode_s = max(o.stats.decode_s for o in ok)
        tokens = sum(o.stats.new_tokens for o in ok)
        d.update(prefill_s=sum(o.stats.prefill_s for o in ok), decode_s=decode_s, decode_tokens=tokens,
                 decode_tok_s=tokens / decode_s if decode_s else None,
                 peak_kv_bytes=max(o.stats.peak_kv_bytes for o in ok), stats_source="outputs")
    return d


# ---------------------------------------------------------------------------------------------- table
COLUMNS = ("point", "mode", "batch x prompt", "new", "prefill s", "decode tok/s", "floor tok/s", "% floor",
           "peak GPU GiB", "peak KV GiB", "lazy", "status")
WIDTHS = (8, 8, 15, 4, 9, 12, 11, 7, 12, 11, 6, 8)


def format_row(r: dict) -> str:
    lazy = sorted(set(r.get("lazy_counts_ok") or []))
    cells = (r["point"], r["mode"], f"{r.get('batch', '?')} x {r.get('prompt_tokens', '?')}", r.get("new_tokens", ""),
             _fmt(r.get("prefill_s"), ".2f"), _fmt(r.get("decode_tok_s"), ".1f"), _fmt(r.get("floor_tok_s"), ".1f"),
             _fmt(r.get("floor_pct"), ".0f"), _fmt(_gib(r.get("peak_gpu_bytes")), ".2f"),
             _fmt(_gib(r.get("peak_kv_bytes")), ".3f"), ",".join(map(str, lazy)) or "-", r.get("status", "?"))
    line = " ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, WIDTHS)))
    return line + (f"  {r['note']}" if r.get("note") else "")


def format_table(records: list[dict], info: dict) -> str:
    header = " ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(COLUMNS, WIDTHS)))
    order = {p: i for i, p in enumerate(TABLE_ORDER)}
    rows = sorted(records, key=lambda r: (order.get(r["point"], 99), MODES.index(r["mode"]) if r["mode"] in MODES else 9))
    lines = [f"{info.get('device', '?')}, {info.get('dtype', '?')}, copy {info.get('copy_bw_GBps', 0):.0f} GB/s, "
             f"runner {info.get('runner')}, KV budget {format_bytes(info.get('kv_budget') or 0)}", header, "-" * len(header)]
    lines += [format_row(r) + (f"   [{r['error'][:120]}]" if r.get("error") else "") for r in rows]
    return "\n".join(lines)


def _first(records, point, mode, key, note=None):
    return next((r.get(key) for r in records if r["point"] == point and r["mode"] == mode and r.get("status") == "ok"
                 and (note is None or r.get("note") == note)), None)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _gib(x):
    return None if x is None else x / GiB


def _pct(a, b):
    return 100 * a / b if a and b else None


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", default=",".join(POINTS), help=f"comma list of {', '.join(POINTS)} (or 'all')")
    p.add_argument("--modes", default="hf,full,lazy", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--kv-dtype", default="auto", choices=("auto", "fp8"),
                   help="KV dtype of the full and lazy modes (the -fp8 modes are always fp8)")
    p.add_argument("--max-context", type=int,
                   help="override the config's max_position_embeddings (fp8 lazy's longest prompt at 8 GiB passes 131072)")
    p.add_argument("--runner", default="auto", help="engine runner: auto | paged | reference")
    p.add_argument("--linear", choices=("auto", "unfused", "torch"), default="auto",
                   help="decode-step projections: the backend's choice (auto: the CUDA kernel at <= 8 rows when "
                        "built, with the norms, residual adds and SiLU folded in), the CUDA kernel with those as "
                        "separate kernels (unfused), or F.linear (torch), for a side-by-side run")
    p.add_argument("--decode-overlap", choices=("on", "off"), default="on",
                   help="the CUDA paged decode's prologue overlaps the previous kernel (programmatic dependent "
                        "launch; on: the runner's default), or not, for a side-by-side run")
    p.add_argument("--backend", choices=("cuda", "triton", "reference"),
                   help="kernel implementation put first where it exists (default: the backend's choice per op)")
    p.add_argument("--quick", action="store_true", help="CPU smoke: 2 layers, hidden 256, 256/512-token prompts, 8 new tokens")
    p.add_argument("--skip-hf", action="store_true", help="no HF transformers baseline")
    p.add_argument("--json", help="write results here (default $OUT/throughput.json when $OUT is set)")
    p.add_argument("--config", default=CONFIG_8B, help="LlamaConfig JSON (default: the Llama-3-8B shape)")
    p.add_argument("--device", help="default cuda when available")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--kv-budget", help="KV pool of the engine runs (default 40GiB; quick 5MiB)")
    p.add_argument("--long-budget", help="KV budget of the longest-prompt point (default 8GiB; quick 1MiB): at 40 GiB "
                   "both modes pass the 131072-token context of the config")
    p.add_argument("--short", type=int, help="the '8k' prompt length (default 8192; quick 256)")
    p.add_argument("--long", type=int, help="the '32k' prompt length (default 32768; quick 512)")
    p.add_argument("--new-tokens", type=int, help="greedy tokens per sequence (default 256; quick 8)")
    p.add_argument("--hf-budget-new-tokens", type=int, help="HF new tokens at the budget point (default 64; quick 8)")
    p.add_argument("--long-new-tokens", type=int, help="new tokens when verifying the longest prompt (default 16)")
    p.add_argument("--block-size", type=int, help="engine pool block size (default: the engine's)")
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, help="default 1020 (quick 60)")
    p.add_argument("--scoring-reps", type=int, help="timed prefills per scoring variant, min kept (default 2; quick 3)")
    p.add_argument("--prefill-shapes", help="prompts x tokens of the prefill point (default 128x256,32x2048; "
                   "quick 16x32,4x128)")
    p.add_argument("--deadline-s", type=float, default=500, help="skip runs that would start after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: quick 1, for steady timings; else torch's)")
    args = p.parse_args(argv)
    names = POINTS if args.points.strip() == "all" else [x.strip() for x in args.points.split(",") if x.strip()]
    bad = [n for n in names if n not in POINTS]
    if bad:
        p.error(f"unknown point(s) {bad}; choose from {', '.join(POINTS)}")
    bad = [m for m in args.modes.split(",") if m.strip() and m.strip() not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    args.point_list = names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    bench = Bench(args)
    try:
        bench.setup()
        for name in args.point_list:
            print(f"\n== {name}  ({bench.elapsed():.0f} s elapsed)", flush=True)
            try:
                if name == "1x8k":
                    bench.point_fixed(name, 1, bench.short)
                elif name == "8x8k":
                    bench.point_fixed(name, 8, bench.short)
                elif name == "1x32k":
                    bench.point_fixed(name, 1, bench.long)
                elif name == "budget":
                    bench.point_budget()
                elif name == "longest":
                    bench.point_longest()
                elif name == "scoring":
                    bench.point_scoring()
                elif name == "prefill":
                    bench.point_prefill()
            except Exception as e:  # noqa: BLE001 - one broken point must not lose the others
                traceback.print_exc()
                bench.record(dict(point=name, mode="-", status="error", error=_short(e)))
                free_memory()
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e}); partial results follow", flush=True)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        bench.notes.append(f"setup failed: {_short(e)}")
    finally:
        bench.report()
    return 0 if bench.records and all(r.get("status") in ("ok", "skipped") for r in bench.records) else 1


if __name__ == "__main__":
    sys.exit(main())
