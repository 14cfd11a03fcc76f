"""Triton paged decode against its PyTorch reference (GPU; skipped with a reason elsewhere).

Tolerance, flash-attention style: the kernel's error against an fp32 reference on upcast inputs must
be at most 2x the error of the same reference run in the input precision, plus 1e-3, and the relative
Frobenius error at most 1e-2 (the bf16 bound).
"""
from __future__ import annotations

import pytest
import torch

from ltengine.kernels.paged import paged_decode_ref, paged_decode_triton, triton

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(triton is None, reason="needs triton"),
]


def _case(seed, b, h_kv, group, d, bs, lengths, dtype):
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks_each = [-(-n // bs) for n in lengths]
    mb = max(blocks_each) + 2
    nb = sum(blocks_each) + 8
    k = torch.randn(nb, bs, h_kv, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(nb, bs, h_kv, d, device="cuda", generator=g).to(dtype)
    perm = torch.randperm(nb - 1, device="cuda", generator=g) + 1
    poison = 0  # block 0 is NaN: every unused table entry points at it, so any stray read shows
    k[poison] = float("nan")
    v[poison] = float("nan")
    tables = torch.zeros(b, mb, dtype=torch.int32, device="cuda")
    at = 0
    for i, n in enumerate(blocks_each):
        tables[i, :n] = perm[at:at + n].int()
        at += n
    # slots past n inside a sequence's last block are poisoned too
    for i, n in enumerate(lengths):
        if n % bs:
            last = tables[i, n // bs].long()
            k[last, n % bs:] = float("nan")
            v[last, n % bs:] = float("nan")
    q = torch.randn(b, h_kv * group, d, device="cuda", generator=g).to(dtype)
    return q, k, v, tables, torch.tensor(lengths, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("bs", [16, 64])
@pytest.mark.parametrize("lengths", [[1], [1024], [4099], [1, 17, 1024, 333, 4096, 64] * 5 + [7, 9, 5000]])
def test_paged_decode_matches_reference(dtype, d, group, bs, lengths):
    b = len(lengths)
    q, k, v, tables, n = _case(hash((d, group, bs, b, len(lengths))) % 2**31, b, 2, group, d, bs, lengths, dtype)
    scale = d ** -0.5
    ref32 = paged_decode_ref(q.float(), _clean(k).float(), _clean(v).float(), tables, n, scale)
    ref_lp = paged_decode_ref(q, _clean(k), _clean(v), tables, n, scale).float()
    out = paged_decode_triton(q, k, v, tables, n, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "the kernel read a poisoned slot or wrote NaN"
    err = (out.float() - ref32).abs().max().item()
    bound = 2 * (ref_lp - ref32).abs().max().item() + 1e-3
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"
    rel = ((out.float() - ref32).norm() / ref32.norm()).item()
    assert rel <= 1e-2, f"relative error {rel:.3e}"


def _clean(x):
    return torch.nan_to_num(x, nan=0.0)  # the reference masks by length; NaN * 0 would still poison it


def test_paged_decode_in_a_cuda_graph():
    q, k, v, tables, n = _case(1, 4, 8, 4, 128, 64, [100, 2000, 1, 64], torch.bfloat16)
    out = torch.empty_like(q)
    paged_decode_triton(q, k, v, tables, n, 0.1)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(paged_decode_triton(q, k, v, tables, n, 0.1))
    # lengths change between replays (within each row's table: 34 entries of 64 slots); the
    # entries past a row's own blocks point at block 0, so un-poison the pool to make them valid
    n.copy_(torch.tensor([2100, 5, 1, 640], dtype=torch.int32))
    k.copy_(torch.nan_to_num(k, nan=0.5))
    v.copy_(torch.nan_to_num(v, nan=0.5))
    graph.replay()
    torch.cuda.synchronize()
    expect = paged_decode_ref(q.float(), k.float(), v.float(), tables, n, 0.1)
    assert ((out.float() - expect).norm() / expect.norm()).item() < 1e-2


@pytest.mark.parametrize("knobs", [{}, {"programs": 8}, {"programs": 4096, "min_chunk": 16},
                                   {"programs": 64, "min_chunk": 1000}])
def test_paged_decode_schedule_knobs(knobs):
    """The balanced schedule's knobs on rows of very different lengths (a lazy batch mixes full-length
    and sink + window rows), a padded row with no keys, bf16 and fp32. Many programs give the long rows
    64 chunks (the combine's multi-tile path)."""
    lengths = [1, 63, 64, 65, 1024, 1500, 4099, 9000, 0, 33]
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v, tables, n = _case(len(knobs) + 7, len(lengths), 2, 4, 128, 64, lengths, dtype)
        ref32 = paged_decode_ref(q.float(), _clean(k).float(), _clean(v).float(), tables, n, 0.1)
        ref_lp = paged_decode_ref(q, _clean(k), _clean(v), tables, n, 0.1).float()
        out = paged_decode_triton(q, k, v, tables, n, 0.1, **knobs)
        real = n > 0  # a row with no keys (a padded bucket row) has no defined output
        assert torch.isfinite(out[real]).all(), "the kernel read a poisoned slot or wrote NaN"
        err = (out.float() - ref32)[real].abs().max().item()
        assert err <= 2 * (ref_lp - ref32)[real].abs().max().item() + 1e-3, (dtype, err)
