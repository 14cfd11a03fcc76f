"""Markdown and JSON result tables."""
from __future__ import annotations

import json
from pathlib import Path


def _cell(c: dict) -> str:
    return f"{100 * c['acc']:.0f}% [{100 * c['lo']:.0f}, {100 * c['hi']:.0f}] ({c['correct']}/{c['n']})"


def accuracy_markdown(rows: list[dict], groups: list, group_name: str = "tokens") -> str:
    """Rows = configs; columns = each group (e.g. prompt length) and all, as acc [95% Wilson] (k/N)."""
    head = ["config", "lazy layers"] + [f"{g} {group_name}" for g in groups] + ["all"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], f"{r['lazy_layers_mean']:.1f}"]
        cells += [_cell(r[str(g)]) if str(g) in r else "-" for g in groups] + [_cell(r["all"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ppl_markdown(rows: list[dict]) -> str:
    head = ["config", "lazy layers", "KV after prefill", "perplexity [95% CI]", "ratio to full [95% CI]", "tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = f"{r['ppl_ratio']:.4f} [{r['ratio_lo']:.4f}, {r['ratio_hi']:.4f}]" if "ppl_ratio" in r else "-"
        lines.append(f"| {r['config']} | {r['lazy_layers_mean']:.1f} | {r['kv_bytes'] / 2**20:.2f} MiB | {r['ppl']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] "
                     f"| {ratio} | {r['tokens']} |")
    return "\n".join(lines)


def write(out_dir: str | Path, stem: str, markdown: str, data: dict) -> tuple[Path, Path]:
    """``out_dir/stem.md`` and ``out_dir/stem.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    md.write_text(markdown + "\n")
    js.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return md, js
