"""PNG charts (matplotlib, Agg backend): layer profile, NIAH heatmap, bars per config."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def profile_chart(path: str | Path, mean: Sequence[float], std: Sequence[float], lazy_layers: Sequence[int],
                  title: str, ylabel: str = "lazy ratio") -> Path:
    """Bar per layer (mean lazy ratio, std error bar); demoted layers in orange."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(mean)), 3.2), dpi=90)
    lazy = set(lazy_layers)
    colors = ["tab:orange" if i in lazy else "tab:blue" for i in range(len(mean))]
    ax.bar(range(len(mean)), mean, yerr=std, color=colors, capsize=2, error_kw=dict(lw=0.8))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_xticks(range(0, len(mean), 2 if len(mean) > 16 else 1))
    ax.set_title(title, fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:orange", label=f"demoted ({len(lazy)})"), Patch(color="tab:blue", label="full")],
              fontsize=8, loc="lower right")
    return _save(fig, path)


def heatmap(path: str | Path, acc: Sequence[Sequence[float]], lengths: Sequence[int], depths: Sequence[float],
            title: str) -> Path:
    """Accuracy heatmap, rows = needle depth, columns = prompt length; each cell annotated."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(lengths), 0.9 + 0.45 * len(depths)), dpi=90)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("needle depth")
    return _annotated(fig, ax, acc, "{:.0%}", 1, title, path)


def bars(path: str | Path, names: Sequence[str], values: Sequence[float], lo: Sequence[float],
         hi: Sequence[float], xlabel: str, title: str, xlim: tuple[float, float] | None = None) -> Path:
    """Horizontal bars, one per config, with 95% interval whiskers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.8 + 0.28 * len(names)), dpi=90)
    y = list(range(len(names)))
    err = [[max(0.0, v - l) for v, l in zip(values, lo)], [max(0.0, h - v) for v, h in zip(values, hi)]]
    ax.barh(y, values, xerr=err, color="tab:blue", capsize=2, error_kw=dict(lw=0.8))
    ax.set_yticks(y, list(names), fontsize=7)
    ax.invert_yaxis()
    if xlim is not None:
        ax.set_xlim(*xlim)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    _plt().close(fig)
    return path


def grid_heatmap(path: str | Path, values: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str],
                 title: str, xlabel: str = "config", ylabel: str = "task") -> Path:
    """Scores in [0, 1] as a heatmap with labelled rows and columns (e.g. RULER task x config)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.2 + 0.75 * len(cols), 1.0 + 0.38 * len(rows)), dpi=90)
    ax.set_xticks(range(len(cols)), list(cols), rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), list(rows), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _annotated(fig, ax, values, "{:.0f}", 100, title, path)


def _annotated(fig, ax, values, fmt: str, scale: float, title: str, path: str | Path) -> Path:
    """Scores in [0, 1] drawn red-to-green, each cell labelled ``fmt.format(scale * v)`` ("-" for NaN)."""
    im = ax.imshow([list(r) for r in values], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if v != v else fmt.format(scale * v), ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
