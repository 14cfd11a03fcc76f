"""Intervals: Wilson score for accuracies, block bootstrap for perplexity."""
from __future__ import annotations

import math

import torch

Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion ``correct / n``; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def block_bootstrap_ppl(nll: list[torch.Tensor], block: int = 32, resamples: int = 2000,
                        seed: int = 0) -> tuple[float, float, float]:
    """Perplexity exp(mean NLL) over every token of every segment, with a 95% percentile interval
    from resampling contiguous blocks of ``block`` tokens (neighbouring tokens are correlated, so
    single-token resampling would understate the spread). Returns (ppl, lo, hi)."""
    blocks = torch.cat([torch.stack([s[i:i + block].mean() for i in range(0, len(s) - block + 1, block)])
                        for s in nll])
    point = math.exp(float(torch.cat(nll).mean()))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(blocks), (resamples, len(blocks)), generator=g)
    means = blocks[idx].mean(dim=1).exp()
    lo, hi = torch.quantile(means.double(), torch.tensor([0.025, 0.975], dtype=torch.double)).tolist()
    return point, lo, hi


def mean_interval(values: list[float], resamples: int = 2000, seed: int = 0, z: float = Z95) -> tuple[float, float]:
    """95% interval of the mean of per-sample scores in [0, 1]: Wilson when every score is 0 or 1 (a
    proportion), else a seeded percentile bootstrap (RULER's string_match_all gives fractions)."""
    if not values:
        return 0.0, 1.0
    if all(v in (0.0, 1.0) for v in values):
        return wilson(int(sum(values)), len(values), z)
    return stratified_bootstrap([values], resamples, seed)


def stratified_bootstrap(groups: list[list[float]], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of the groups' means, resampling within each group (so an
    average over tasks keeps every task's weight)."""
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(resamples, dtype=torch.float64)
    for vals in groups:
        v = torch.tensor(vals, dtype=torch.float64)
        idx = torch.randint(0, len(v), (resamples, len(v)), generator=g)
        total += v[idx].mean(dim=1)
    means = total / len(groups)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi
