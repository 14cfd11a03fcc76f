"""RULER tables: task x length x config cells with 95% intervals, averages per length, a heatmap.

A cell is the mean of RULER's ``string_match_all`` over its samples (the fraction of the answers found
per sample); its interval is Wilson where every score is 0 or 1, else a seeded percentile bootstrap.
An average over tasks is the mean of the task means, with a bootstrap resampling within each task.
"""
from __future__ import annotations

import math
from pathlib import Path

from . import plots, report
from .stats import mean_interval, stratified_bootstrap


def summarize(records: list[dict], configs: list[str], tasks: list[str], lengths: list[int],
              metric: str = "all") -> dict:
    """``cells[config][task][length]`` and ``average[config][length]`` (and ``"all"`` lengths): dicts of
    n, score, lo, hi; plus each config's average relative to full's per length."""
    by: dict = {}
    for r in records:
        by.setdefault((r["config"], r["task"], r["length"]), []).append(float(r[metric]))
    cells, average = {}, {}
    for c in configs:
        cells[c] = {}
        for t in tasks:
            cells[c][t] = {}
            for L in lengths:
                vals = by.get((c, t, L), [])
                if vals:
                    lo, hi = mean_interval(vals)
                    cells[c][t][str(L)] = dict(n=len(vals), score=sum(vals) / len(vals), lo=lo, hi=hi)
        average[c] = {}
        for key, lens in [(str(L), [L]) for L in lengths] + [("all", lengths)]:
            groups = [by[(c, t, L)] for t in tasks for L in lens if by.get((c, t, L))]
            if len(groups) == len(tasks) * len(lens):  # only complete rows are averaged
                lo, hi = stratified_bootstrap(groups)
                average[c][key] = dict(n=sum(map(len, groups)), score=sum(sum(g) / len(g) for g in groups) / len(groups),
                                       lo=lo, hi=hi)
    rel = {}
    if "full" in average:
        for c in configs:
            rel[c] = {k: v["score"] / average["full"][k]["score"] if average["full"].get(k, {}).get("score") else None
                      for k, v in average[c].items()}
    return dict(metric=metric, cells=cells, average=average, relative_to_full=rel)


def _pct(c: dict | None) -> str:
    if not c:
        return "-"
    return f"{100 * c['score']:.0f} [{100 * c['lo']:.0f}, {100 * c['hi']:.0f}]"


def markdown(summary: dict, configs: list[str], tasks: list[str], lengths: list[int], n: int,
             skipped: dict[str, str]) -> str:
    """An averages table (configs x lengths, with % of full), then one task x config table per length."""
    avg, rel = summary["average"], summary["relative_to_full"]
    cols = [str(L) for L in lengths] + ["all"]
    lines = [f"RULER string_match_{summary['metric']} (%), mean [95% interval]; N = {n} per task and length; "
             f"{len(tasks)} tasks", "",
             "| config | " + " | ".join(f"{c} tokens" if c != "all" else "all" for c in cols) + " | % of full per length |",
             "|" + "---|" * (len(cols) + 2)]
    for c in configs:
        if c in skipped:
            lines.append(f"| {c} | " + " | ".join("skipped" for _ in cols) + f" | {skipped[c]} |")
            continue
        r = rel.get(c, {})
        share = ", ".join(f"{100 * r[k]:.0f}%" if r.get(k) is not None else "-" for k in cols[:-1])
        lines.append(f"| {c} | " + " | ".join(_pct(avg[c].get(k)) for k in cols) + f" | {share} |")
    run = [c for c in configs if c not in skipped]
    for L in lengths if run else []:
        lines += ["", f"### {L} tokens", "", "| task | " + " | ".join(run) + " |", "|" + "---|" * (len(run) + 1)]
        for t in tasks:
            lines.append(f"| {t} | " + " | ".join(_pct(summary["cells"][c][t].get(str(L))) for c in run) + " |")
        lines.append("| **average** | " + " | ".join(_pct(avg[c].get(str(L))) for c in run) + " |")
    return "\n".join(lines)


def write(out_dir: str | Path, records: list[dict], configs: list[str], tasks: list[str], lengths: list[int],
          n: int, skipped: dict[str, str], meta: dict, stem: str = "ruler") -> dict[str, Path]:
    """``stem.md``, ``stem.json`` (summary under both metrics + every record) and ``stem.png`` (task x
    config heatmap, each cell averaged over the lengths)."""
    summ = summarize(records, configs, tasks, lengths, "all")
    part = summarize(records, configs, tasks, lengths, "part")
    md = markdown(summ, configs, tasks, lengths, n, skipped)
    md_path, js_path = report.write(out_dir, stem, md, dict(summary=summ, summary_part=part, skipped=skipped,
                                                           tasks=tasks, lengths=lengths, configs=configs, n=n,
                                                           records=records, **meta))
    run = [c for c in configs if c not in skipped]
    if not run:  # every config skipped: tables only
        return dict(md=md_path, json=js_path)
    grid = []
    for t in tasks:
        row = []
        for c in run:
            vals = [summ["cells"][c][t][str(L)]["score"] for L in lengths if str(L) in summ["cells"][c][t]]
            row.append(sum(vals) / len(vals) if vals else math.nan)
        grid.append(row)
    grid.append([summ["average"][c].get("all", {}).get("score", math.nan) for c in run])
    png = plots.grid_heatmap(Path(out_dir) / f"{stem}.png", grid, list(tasks) + ["average"], run,
                             f"RULER string_match_all (%), mean over {', '.join(map(str, lengths))} tokens; "
                             f"N = {n} per task and length")
    return dict(md=md_path, json=js_path, png=png)


def merge(json_paths: list[str | Path], out_dir: str | Path, stem: str = "ruler") -> dict[str, Path]:
    """One table from several ``ruler.json`` runs of the same tasks and N: one per length (run as
    separate processes so a time limit loses only the unfinished lengths), or other configs of the same
    samples (e.g. the session columns beside the main table's). Configs in order of first appearance;
    a (config, length) cell that two runs both hold is an error, as are different tasks or N."""
    import json

    runs = [json.loads(Path(p).read_text()) for p in json_paths]
    if not runs:
        raise ValueError("merge needs at least one ruler.json")
    first = runs[0]
    for p, r in zip(json_paths, runs):
        if r["n"] != first["n"] or list(r["tasks"]) != list(first["tasks"]):
            raise ValueError(f"{p}: N = {r['n']} over tasks {r['tasks']}, but {json_paths[0]} has N = {first['n']} "
                             f"over {first['tasks']}; merge joins runs of the same tasks and N")
    seen: dict = {}
    for p, r in zip(json_paths, runs):
        for c in (c for c in r["configs"] if c not in r["skipped"]):
            for L in r["lengths"]:
                if (c, L) in seen:
                    raise ValueError(f"{p} and {seen[(c, L)]} both hold config {c!r} at length {L}")
                seen[(c, L)] = p
    configs = list(dict.fromkeys(c for r in runs for c in r["configs"]))
    lengths = sorted({L for r in runs for L in r["lengths"]})
    records = [rec for r in runs for rec in r["records"]]
    ran = {rec["config"] for rec in records}
    skipped = {k: v for r in runs for k, v in r["skipped"].items() if k not in ran}
    meta = dict(merged_from=[str(p) for p in json_paths], runtime_s=sum(r.get("runtime_s", 0) for r in runs),
                model=first.get("model"), date=first.get("date"), torch=first.get("torch"), seed=first.get("seed"))
    return write(out_dir, records, configs, first["tasks"], lengths, first["n"], skipped, meta, stem)
