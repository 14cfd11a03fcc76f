"""Full and sink+window layer caches: truncation in place, ring writes, bytes released."""
from __future__ import annotations

import torch

from ltengine.memory.cache import FullKV, KVMeter, SinkWindowKV, demote
from ltengine.kernels.reference import ring_slot, truncate_kv_ref_


def _full(t: int, meter: KVMeter, h: int = 2, d: int = 4) -> FullKV:
    # token p holds the value p everywhere, so every slot says which position it keeps
    k = torch.arange(t, dtype=torch.float32).view(t, 1, 1).expand(t, h, d).clone()
    return FullKV(k, -k, meter)


def test_demote_keeps_sink_and_window_and_frees_the_rest():
    meter = KVMeter()
    full = _full(100, meter)
    assert meter.current == full.nbytes == 2 * 100 * 2 * 4 * 4
    lazy = demote(full, sink=4, window=10, truncate_kv_=truncate_kv_ref_)
    assert isinstance(lazy, SinkWindowKV) and lazy.length == 100
    assert lazy.k.shape == (14, 2, 4) and meter.current == lazy.nbytes == 2 * 14 * 2 * 4 * 4
    assert meter.peak == 2 * 100 * 2 * 4 * 4 + lazy.nbytes  # the small copy existed beside the old buffer
    kept = sorted(lazy.k[:, 0, 0].long().tolist())
    assert kept == [0, 1, 2, 3] + list(range(90, 100))
    for p in range(90, 100):
        assert lazy.k[ring_slot(p, 4, 10), 0, 0] == p and lazy.v[ring_slot(p, 4, 10), 0, 0] == -p
    assert full.k is None  # the old buffer is gone


def test_ring_overwrites_the_oldest_and_short_caches_grow():
    meter = KVMeter()
    lazy = demote(_full(6, meter), sink=2, window=5, truncate_kv_=truncate_kv_ref_)
    assert lazy.capacity == 6  # fewer tokens than sink + window: nothing moved, nothing wasted
    lazy.reserve(100)
    assert lazy.capacity == 7 and meter.current == lazy.nbytes
    for p in range(6, 20):
        lazy.append(torch.full((2, 4), float(p)), torch.full((2, 4), -float(p)))
    assert sorted(lazy.k[:, 0, 0].long().tolist()) == [0, 1] + list(range(15, 20))


def test_full_cache_reserve_and_append():
    meter = KVMeter()
    full = _full(5, meter)
    full.reserve(8)
    assert full.capacity == 8 and full.length == 5 and meter.current == full.nbytes
    for p in range(5, 8):
        full.append(torch.full((2, 4), float(p)), torch.zeros(2, 4))
    assert full.k[:, 0, 0].tolist() == list(range(8))
