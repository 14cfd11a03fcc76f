"""``ltengine profile`` and ``ltengine eval passkey|niah|ppl``: build prompts, run, write tables and PNGs.

Each command takes an ``Engine`` (for its adapter, backend, tokenizer and EOS ids; its own LazyConfig
is not used: the configs come from the arguments) and an output folder, and returns the written paths.
"""
from __future__ import annotations

import json
import random
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import plots, report
from .grid import EvalConfig, make_grid
from .harness import shared_prefill
from .run import accuracy_rows, equal_bytes_window, run_ppl, run_retrieval
from .scoring import layer_scores
from .tasks import niah_sample, passkey_sample, ppl_segments


def _meta(engine, args: dict, t0: float) -> dict:
    return dict(model=getattr(engine.model, "name_or_path", None) or type(engine.model).__name__,
                layers=engine.num_layers, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                runtime_s=round(time.perf_counter() - t0, 1), torch=torch.__version__,
                threads=torch.get_num_threads(), args=args)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def profile(engine, out_dir: str | Path, prompts: list[list[int]], sources: list[str], fraction: float,
            sink: int, window: int, probe: int, score: str = "ratio", args: dict | None = None) -> dict[str, Path]:
    """Per-layer lazy ratio (mean, std over prompts); the ``round(fraction * L)`` laziest layers by
    mean become ``lazy_layers`` of a JSON profile that ``LazyConfig.from_profile`` loads."""
    t0 = time.perf_counter()
    scores = []
    for ids in tqdm(prompts, desc="profile", unit="prompt"):
        sp = shared_prefill(engine.adapter, ids, probe)
        scores.append(layer_scores(sp, sink, window, probe, score))
        sp.release()
    s = torch.tensor(scores, dtype=torch.float64)
    mean = s.mean(0).tolist()
    std = (s.std(0) if len(scores) > 1 else torch.zeros(s.shape[1], dtype=torch.float64)).tolist()
    n_lazy = int(round(fraction * len(mean)))
    lazy = sorted(sorted(range(len(mean)), key=lambda i: (mean[i], i), reverse=True)[:n_lazy])
    data = dict(lazy_layers=lazy, sink=sink, window=window, probe=probe, fraction=fraction, score=score,
                ratios_mean=mean, ratios_std=std,
                prompts=[dict(source=src, tokens=len(ids)) for src, ids in zip(sources, prompts)],
                **_meta(engine, args or {}, t0))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "profile.json"
    js.write_text(json.dumps(data, indent=1) + "\n")
    label = "lazy ratio" if score == "ratio" else f"{score} score (higher = lazier)"
    png = plots.profile_chart(out / "profile.png", mean, std, lazy,
                              f"{label} over {len(prompts)} prompts (sink {sink}, window {window}, probe {probe}); "
                              f"{n_lazy} laziest demoted", label)
    return dict(json=js, png=png)


def _accuracy_outputs(out: Path, task: str, rows: list[dict], records: list[dict], groups: list, meta: dict) -> dict:
    md = report.accuracy_markdown(rows, groups)
    md_path, js_path = report.write(out, task, md, dict(rows=rows, records=records, **meta))
    png = plots.bars(out / f"{task}.png", [r["config"] for r in rows], [r["all"]["acc"] for r in rows],
                     [r["all"]["lo"] for r in rows], [r["all"]["hi"] for r in rows],
                     "accuracy (95% Wilson interval)", f"{task}: N = {rows[0]['all']['n']} per config", (0, 1))
    return dict(md=md_path, json=js_path, png=png)


def passkey(engine, out_dir, configs: list[EvalConfig], lengths: list[int], n: int, seed: int = 0,
            max_new_tokens: int = 8, args: dict | None = None) -> dict:
    t0 = time.perf_counter()
    rng = random.Random(seed)
    samples = [passkey_sample(engine.tokenizer, L, rng) for L in lengths for _ in range(n)]
    records = run_retrieval(engine, samples, configs, max_new_tokens, desc="passkey")
    rows = accuracy_rows(records, configs, by="length")
    return _accuracy_outputs(Path(out_dir), "passkey", rows, records, lengths, _meta(engine, args or {}, t0))


def niah(engine, out_dir, configs: list[EvalConfig], lengths: list[int], depths: list[float], n: int,
         seed: int = 0, max_new_tokens: int = 12, args: dict | None = None) -> dict:
    """``n`` needles per (length, depth) cell; one heatmap PNG per config."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    samples = []
    for L in lengths:
        for d in depths:
            for _ in range(n):
                s = niah_sample(engine.tokenizer, L, d, rng)
                s.depth = d  # the grid cell (the real depth snaps to a sentence end nearby)
                samples.append(s)
    records = run_retrieval(engine, samples, configs, max_new_tokens, desc="niah")
    rows = accuracy_rows(records, configs, by="length")
    out = Path(out_dir)
    paths = _accuracy_outputs(out, "niah", rows, records, lengths, _meta(engine, args or {}, t0))
    for cfg in configs:
        grid = [[_mean([r["correct"] for r in records if r["config"] == cfg.name and r["length"] == L
                        and r["depth"] == d]) for L in lengths] for d in depths]
        paths[f"heatmap {cfg.name}"] = plots.heatmap(out / f"niah_{_slug(cfg.name)}.png", grid, lengths, depths,
                                                     f"NIAH {cfg.name} (N = {n} per cell)")
    return paths


def ppl(engine, out_dir, configs: list[EvalConfig], context: int, scored: int, n: int, seed: int = 0,
        args: dict | None = None) -> dict:
    t0 = time.perf_counter()
    segments = ppl_segments(engine.tokenizer, context, scored, n, seed)
    rows, _ = run_ppl(engine, segments, context, configs)
    md = report.ppl_markdown(rows)
    md_path, js_path = report.write(out_dir, "ppl", md, dict(rows=rows, context=context, scored=scored,
                                                             **_meta(engine, args or {}, t0)))
    png = plots.bars(Path(out_dir) / "ppl.png", [r["config"] for r in rows], [r["ppl"] for r in rows],
                     [r["lo"] for r in rows], [r["hi"] for r in rows], "perplexity (95% block bootstrap)",
                     f"{n} x {scored} tokens after {context}-token contexts")
    return dict(md=md_path, json=js_path, png=png)


def _mean(xs: list) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def grid_from_args(args, num_layers: int | None = None) -> list[EvalConfig]:
    """The configs the arguments ask for. ``ppl --equal-bytes`` replaces "streaming" at each window by
    streaming at the window that holds as much KV after the ``--context`` prefill as each fraction's
    lazy layers beside full ones (``run.equal_bytes_window``)."""
    configs = make_grid(args.policy, args.fraction, args.window, args.sink, args.probe, args.score)
    if not getattr(args, "equal_bytes", False) or "streaming" not in args.policy:
        return configs
    configs = [c for c in configs if c.policy != "streaming"]
    for w in args.window:
        for f in args.fraction:
            n_lazy = int(round(f * num_layers))
            ew = equal_bytes_window(num_layers, n_lazy, args.context, args.sink, w)
            cfg = EvalConfig("streaming", 1.0, ew, args.sink, args.probe, args.score)
            if cfg not in configs:
                configs.append(cfg)
    return configs


def ruler(engine, out_dir, tasks: list[str], lengths: list[int], n: int, configs: list, seed: int = 0,
          chunk: int = 4, args: dict | None = None, stem: str = "ruler", workers: int = 1,
          session_tokens: int | None = None) -> dict:
    """RULER tasks x lengths x configs (``ruler_configs.RulerConfig``): harness configs from one shared
    prefill per prompt, session configs through ``Engine.documents``, ``session_tokens`` prompt tokens
    of documents per batch (``ruler.run_sessions``; skipped with the reason if absent)."""
    from . import ruler as rl
    from .ruler_report import write as write_ruler

    t0 = time.perf_counter()
    samples = rl.make_samples(engine.tokenizer, tasks, lengths, n, seed, workers)
    t_gen = time.perf_counter() - t0
    too_long = [s for s in samples if len(s.ids) + s.max_new_tokens > engine.max_model_len]
    if too_long:
        raise ValueError(f"length {too_long[0].length} exceeds the model's context of {engine.max_model_len} tokens")
    harness = [c for c in configs if c.kind not in ("session", "engine")]
    sessions = [c for c in configs if c.kind == "session"]
    own_prefill = [c for c in configs if c.kind == "engine"]
    records, skipped = [], {}
    if harness:
        records += rl.run_harness(engine, samples, harness, chunk)
    if own_prefill:
        records += rl.run_engine(engine, samples, own_prefill, chunk)
    why = rl.sessions_missing(engine) if sessions else None
    if why:
        skipped = {c.key: why for c in sessions}
    elif sessions:
        records += rl.run_sessions(engine, samples, sessions, session_tokens)
    meta = _meta(engine, args or {}, t0)
    meta.update(seed=seed, generate_s=round(t_gen, 2), samples=[dict(task=s.task, length=s.length, index=s.index, prompt_tokens=len(s.ids),
                                         answers=s.answers) for s in samples])
    return write_ruler(out_dir, records, [c.key for c in configs], tasks, lengths, n, skipped, meta, stem)
