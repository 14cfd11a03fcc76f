"""Lazy-ratio scoring against the model's eager attention probabilities, and the policies' choices."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import FAMILIES, tiny_model
from ltengine import Engine, LazyConfig
from ltengine.lazy import LightTransferPolicy, TopKPolicy, lazy_ratio, make_policy
from reference_attention import eager_lazy_ratios


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return ""


@pytest.mark.parametrize("family", FAMILIES)
def test_ratios_match_eager_attention_tiny(family):
    model = tiny_model(family)
    lazy = LazyConfig(fraction=0.5, sink=3, window=11, probe=9)
    ids = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(5)).tolist()
    out = Engine(model, _Tok(), lazy=lazy).generate(ids, max_new_tokens=1)
    ref = eager_lazy_ratios(model, ids, lazy.sink, lazy.window, lazy.probe)
    assert out.layer_scores == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_ratios_match_eager_attention_default_model(default_model, book_text):
    model, tokenizer = default_model
    ids = tokenizer(book_text[30000:33000])["input_ids"][:400]
    lazy = LazyConfig(fraction=0.25, sink=4, window=64, probe=32)
    out = Engine(model, tokenizer, lazy=lazy).generate(ids, max_new_tokens=1)
    ref = eager_lazy_ratios(model, ids, lazy.sink, lazy.window, lazy.probe)
    assert out.layer_scores == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert max(ref) - min(ref) > 0.1  # real layers differ: the comparison is not of constants


def test_ratio_of_uniform_attention_is_the_kept_share():
    # all-zero queries attend uniformly: the ratio is the share of keys a query keeps
    t, sink, window = 50, 3, 7
    q = torch.zeros(2, 1, 8)  # the last query only
    k = torch.randn(1, t, 8)
    assert lazy_ratio(q, k, sink, window, 1.0) == pytest.approx((sink + window) / t)


def _simulate(ratios: list[float], capacity: int) -> list[int]:
    """The algorithm of LIGHTTRANSFER.md written out with a plain list (no sorted container)."""
    queue, demoted = [], []
    for layer, r in enumerate(ratios):
        queue.append((r, layer))
        while len(queue) > capacity:
            best = max(queue)
            queue.remove(best)
            demoted.append(best[1])
    return demoted


@pytest.mark.parametrize("seed", range(20))
def test_queue_matches_direct_simulation(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    ratios = [rng.choice([rng.random(), 0.5, 0.25]) for _ in range(n)]  # ties included
    capacity = rng.randint(0, n)
    policy = LightTransferPolicy(n, capacity)
    got = [j for layer, r in enumerate(ratios) for j in policy.observe(layer, r)]
    assert got == _simulate(ratios, capacity)
    assert len(got) == n - capacity


def test_queue_on_crafted_ratios_is_greedy_online():
    # layer 0 is popped as soon as the capacity is exceeded, although layer 3 is lazier later on
    ratios = [0.9, 0.1, 0.2, 0.99, 0.3]
    policy = LightTransferPolicy(5, 3)
    steps = [policy.observe(i, r) for i, r in enumerate(ratios)]
    assert steps == [[], [], [], [3], [0]]
    top = TopKPolicy(5, 3)
    for i, r in enumerate(ratios):
        assert top.observe(i, r) == []
    assert sorted(top.finish()) == [0, 3]


def test_engine_demotes_what_the_simulation_demotes(default_model, book_text):
    model, tokenizer = default_model
    ids = tokenizer(book_text[50000:56000])["input_ids"][:600]
    out = Engine(model, tokenizer, lazy=LazyConfig(fraction=0.5, window=64)).generate(ids, max_new_tokens=1)
    assert out.lazy_layers == sorted(_simulate(out.layer_scores, 15))


def test_policies():
    ratios = [0.1 * i for i in range(10)]

    def run(cfg):
        p = make_policy(cfg, 10, 10 - cfg.num_lazy(10))
        return sorted([j for i, r in enumerate(ratios) for j in p.observe(i, r)] + p.finish())

    assert run(LazyConfig(fraction=0.3, policy="topk")) == [7, 8, 9]
    assert run(LazyConfig(fraction=0.3, policy="lighttransfer")) == [7, 8, 9]  # increasing: online = offline
    assert run(LazyConfig(policy="streaming")) == list(range(10))
    assert run(LazyConfig(policy=[2, 5])) == [2, 5]
    r1, r2 = run(LazyConfig(fraction=0.4, policy="random", seed=1)), run(LazyConfig(fraction=0.4, policy="random", seed=1))
    assert r1 == r2 and len(r1) == 4
    with pytest.raises(ValueError, match="layers 0..9"):
        make_policy(LazyConfig(policy=[3, 12]), 10, 8)
