"""Evaluation loops: retrieval accuracy (passkey, NIAH) and perplexity, one shared prefill per prompt."""
from __future__ import annotations

import time
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from .grid import EvalConfig
from .harness import greedy, shared_prefill, teacher_forced_nll
from .stats import block_bootstrap_ppl, wilson
from .tasks import Sample


def run_retrieval(engine, samples: list[Sample], configs: list[EvalConfig], max_new_tokens: int = 8,
                  desc: str = "eval") -> list[dict]:
    """One record per (sample, config): output text, lazy layers, and whether the key is in the output.

    Configs that demote the same layers with the same sink/window share one decode (same caches, same
    tokens). Decoding stops early once the key is in the text: "key in output" cannot change after that.
    """
    adapter, backend, tok = engine.adapter, engine.backend, engine.tokenizer
    max_probe = max(c.probe for c in configs)
    records = []
    for i, s in enumerate(tqdm(samples, desc=desc, unit="prompt")):
        t0 = time.perf_counter()
        sp = shared_prefill(adapter, s.ids, max_probe)
        t_prefill = time.perf_counter() - t0
        done = {}
        for cfg in configs:
            layers = cfg.lazy_layers(sp, i)
            key = (tuple(layers), cfg.sink, cfg.window) if layers else ()
            if key not in done:
                t1 = time.perf_counter()
                cache = sp.build_cache(layers, cfg.sink, cfg.window, len(s.ids) + max_new_tokens, backend)
                tokens = greedy(adapter, backend, [cache], sp.logits, len(s.ids), max_new_tokens, engine.eos_ids,
                                done=lambda t, a=s.answer: a in tok.decode(t, skip_special_tokens=True))[0]
                done[key] = (tokens, time.perf_counter() - t1)
            tokens, t_decode = done[key]
            text = tok.decode(tokens, skip_special_tokens=True)
            records.append(dict(config=cfg.name, sample=i, length=s.length, prompt_tokens=len(s.ids),
                                depth=round(s.depth, 4), answer=s.answer, output=text, lazy_layers=layers,
                                correct=s.answer in text, prefill_s=round(t_prefill, 3), decode_s=round(t_decode, 3)))
        sp.release()
    return records


def accuracy_rows(records: list[dict], configs: list[EvalConfig], by: str = "length") -> list[dict]:
    """Per config: accuracy with a 95% Wilson interval, overall and per value of ``by``."""
    rows = []
    for cfg in configs:
        recs = [r for r in records if r["config"] == cfg.name]
        groups = defaultdict(list)
        for r in recs:
            groups[r[by]].append(r["correct"])
        row = dict(config=cfg.name, policy=cfg.policy, fraction=cfg.fraction, window=cfg.window, sink=cfg.sink,
                   probe=cfg.probe, score=cfg.score,
                   lazy_layers_mean=sum(len(r["lazy_layers"]) for r in recs) / max(1, len(recs)))
        for g, vals in [("all", [r["correct"] for r in recs])] + sorted(groups.items()):
            lo, hi = wilson(sum(vals), len(vals))
            row[str(g)] = dict(n=len(vals), correct=sum(vals), acc=sum(vals) / max(1, len(vals)), lo=lo, hi=hi)
        rows.append(row)
    return rows


def kv_token_slots(num_layers: int, lazy_layers, context: int, sink: int, window: int) -> int:
    """Layer-token slots of KV right after a ``context``-token prefill: full layers hold every token,
    lazy ones ``min(context, sink + window)`` (times bytes per slot = the engine's
    ``kv_bytes_after_prefill``)."""
    n_lazy = len(lazy_layers)
    return (num_layers - n_lazy) * context + n_lazy * min(context, sink + window)


def equal_bytes_window(num_layers: int, n_lazy: int, context: int, sink: int, window: int) -> int:
    """The window at which streaming (every layer sink + window) holds the same KV after a
    ``context``-token prefill as ``n_lazy`` sink + ``window`` layers beside full ones (rounded down)."""
    return kv_token_slots(num_layers, range(n_lazy), context, sink, window) // num_layers - sink


def run_ppl(engine, segments: list[list[int]], context: int, configs: list[EvalConfig],
            desc: str = "ppl") -> tuple[list[dict], dict[str, list[torch.Tensor]]]:
    """Perplexity of the ``scored`` tokens after a ``context``-token prefix, per config.

    The prefix is prefilled once (every layer attends fully, as in the engine); each config's policy
    then demotes its layers and the rest is scored by teacher-forced ``decode_step`` calls through the
    truncated caches, so a lazy layer's later queries see only its sink + window.
    """
    adapter, backend = engine.adapter, engine.backend
    per_slot = adapter.kv_bytes_per_token_layer
    nll: dict[str, list[torch.Tensor]] = defaultdict(list)
    lazy_counts: dict[str, list[int]] = defaultdict(list)
    kv_tokens: dict[str, list[int]] = defaultdict(list)
    for i, seg in enumerate(tqdm(segments, desc=desc, unit="segment")):
        sp = shared_prefill(adapter, seg[:context], max(c.probe for c in configs))
        done = {}
        for cfg in tqdm(configs, desc=f"segment {i}", unit="config", leave=False):
            layers = cfg.lazy_layers(sp, i)
            key = (tuple(layers), cfg.sink, cfg.window) if layers else ()
            if key not in done:
                cache = sp.build_cache(layers, cfg.sink, cfg.window, len(seg), backend)
                done[key] = teacher_forced_nll(adapter, backend, cache, sp.logits, seg[context:], context)
            nll[cfg.name].append(done[key])
            lazy_counts[cfg.name].append(len(layers))
            kv_tokens[cfg.name].append(kv_token_slots(sp.num_layers, layers, context, cfg.sink, cfg.window))
        sp.release()
    rows = []
    full = nll.get("full")
    for cfg in configs:
        ppl, lo, hi = block_bootstrap_ppl(nll[cfg.name])
        row = dict(config=cfg.name, policy=cfg.policy, fraction=cfg.fraction, window=cfg.window, sink=cfg.sink,
                   probe=cfg.probe, score=cfg.score, segments=len(segments), tokens=sum(len(x) for x in nll[cfg.name]),
                   ppl=ppl, lo=lo, hi=hi, lazy_layers_mean=sum(lazy_counts[cfg.name]) / len(segments),
                   kv_bytes=per_slot * sum(kv_tokens[cfg.name]) / len(segments))
        if full is not None:
            diff = [a - b for a, b in zip(nll[cfg.name], full)]  # paired: same tokens
            d, dlo, dhi = block_bootstrap_ppl(diff)
            row.update(ppl_ratio=d, ratio_lo=dlo, ratio_hi=dhi)
        rows.append(row)
    return rows, nll
