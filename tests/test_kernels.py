"""Kernel tests of the contiguous-cache ops: the decode references (the CPU reference runner's kernels)
and every truncate_kv_ implementation against the reference; the backend's choice per device.

The references are checked against a naive per-head loop and the StreamingLLM definition. Truncation
must be exact (torch.equal), overlapping moves included. CPU part: the references and the CPU
extension's truncate (skipped if not built); GPU part: the CUDA truncate and backend dispatch (skipped
without a GPU or the extension). The paged kernels: tests/test_paged_cuda.py, tests/test_paged_kernels.py.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from ltengine.kernels import available_backends, get_backend
from ltengine.kernels import cuda as kcuda
from ltengine.kernels.paged import paged_decode_ref
from ltengine.kernels.reference import decode_full_ref, decode_sink_window_ref, ring_slot, truncate_kv_ref_

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
needs_cuda_ext = pytest.mark.skipif(
    not (HAS_GPU and kcuda.has_cuda_ext()), reason="needs a CUDA GPU and ltengine._C built with CUDA"
)
needs_cpu_ext = pytest.mark.skipif(not kcuda.has_cpu_ext(), reason="ltengine._C is not built (setup.py build_ext)")

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _gen(*key, device: str = "cpu") -> torch.Generator:
    """A generator seeded by the test case, so every case draws different data."""
    return torch.Generator(device=device).manual_seed(zlib.crc32(repr(key).encode()))


# ---------------------------------------------------------------------------------------------
# The references (CPU): checked against a naive per-head loop and against the StreamingLLM definition.


def _naive(q, k, v, positions_per_b, scale):
    b, h_q, d = q.shape
    g = h_q // k.shape[2]
    out = torch.zeros(b, h_q, d, dtype=torch.float64)
    for i in range(b):
        idx = positions_per_b[i]
        if not idx:
            continue
        for h in range(h_q):
            kk = k[i, idx, h // g].double()
            p = torch.softmax(kk @ q[i, h].double() * scale, 0)
            out[i, h] = p @ v[i, idx, h // g].double()
    return out


@pytest.mark.parametrize("group", [1, 4])
def test_decode_full_ref_matches_naive(group):
    gen = _gen("full_ref", group)
    b, h_kv, d, cap = 5, 2, 16, 23
    q = torch.randn(b, h_kv * group, d, generator=gen)
    k = torch.randn(b, cap, h_kv, d, generator=gen)
    v = torch.randn(b, cap, h_kv, d, generator=gen)
    lengths = torch.tensor([0, 1, 7, 22, 23])
    out = decode_full_ref(q.double(), k.double(), v.double(), lengths, 0.3)
    naive = _naive(q, k, v, [list(range(n)) for n in lengths.tolist()], 0.3)
    torch.testing.assert_close(out, naive, rtol=1e-12, atol=1e-12)
    assert decode_full_ref(q, k, v, lengths, 0.3).dtype == torch.float32


@pytest.mark.parametrize("sink,window", [(0, 1), (4, 1), (0, 5), (3, 5)])
def test_truncate_then_sink_window_is_streaming_attention(sink, window):
    """truncate_kv_ref_ + decode_sink_window_ref == attention over the sink + the last window tokens,
    also after appending more tokens at ring_slot(p) (the engine's decode writes)."""
    gen = _gen("stream", sink, window)
    b, h_kv, group, d, cap = 6, 2, 2, 8, 40
    q = torch.randn(b, h_kv * group, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, cap, h_kv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, cap, h_kv, d, generator=gen, dtype=torch.float64)
    total = sink + window
    lengths = torch.tensor([1, total, total + 1, total + window - 1, total + window, 30])
    kc, vc = k.clone(), v.clone()
    new = truncate_kv_ref_(kc, vc, lengths, sink, window)
    assert new.tolist() == lengths.clamp(max=total).tolist()
    for extra in range(0, 2 * window + 1):  # append `extra` more tokens after truncation
        ks, vs = kc[:, :total].clone(), vc[:, :total].clone()
        n = lengths + extra
        for i in range(b):
            for p in range(lengths[i].item(), n[i].item()):
                ks[i, ring_slot(p, sink, window)] = k[i, p]
                vs[i, ring_slot(p, sink, window)] = v[i, p]
        out = decode_sink_window_ref(q, ks, vs, n, sink, window, 0.5)
        keep = [[p for p in range(L) if p < sink or p >= L - window] for L in n.tolist()]
        torch.testing.assert_close(out, _naive(q, k, v, keep, 0.5), rtol=1e-12, atol=1e-12)


def test_ring_slot():
    assert [ring_slot(p, 2, 3) for p in range(9)] == [0, 1, 2, 3, 4, 2, 3, 4, 2]
    pos = torch.arange(9)
    assert ring_slot(pos, 2, 3).tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 2]


def test_reference_rejects_bad_shapes():
    q = torch.randn(2, 6, 8)
    k = torch.randn(2, 10, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        decode_full_ref(q, k, k, torch.tensor([1, 2]), 1.0)
    with pytest.raises(ValueError, match="sink \\+ window"):
        decode_sink_window_ref(torch.randn(2, 8, 8), k, k, torch.tensor([1, 2]), 4, 5, 1.0)
    with pytest.raises(ValueError, match="exceeds"):
        truncate_kv_ref_(k.clone(), k.clone(), torch.tensor([11, 2]), 1, 2)


# ---------------------------------------------------------------------------------------------
# Truncation: exact, overlap included; CPU extension and CUDA.

TRUNC_CONFIGS = [(0, 1), (4, 1), (0, 17), (4, 17), (4, 1020)]


def _trunc_lengths(sink, window, t_cap, batch, gen):
    total = sink + window
    edges = [0, 1, total - 1, total, total + 1, total + window // 2 + 1, total + window - 1, total + window,
             total + window + 1, t_cap]
    edges = [e for e in edges if 0 <= e <= t_cap]
    rand = torch.randint(0, t_cap + 1, (batch,), generator=gen)
    rand[: len(edges)] = torch.tensor(edges)
    return rand


def _check_truncate(impl, device, sink, window, dtype, head_dim, strided):
    gen = _gen("trunc", device, sink, window, dtype, head_dim, strided)
    total = sink + window
    t_cap = total + window + 3  # lengths up to past sink + 2 * window: overlapping and disjoint moves
    batch, h_kv = 11, 3
    lengths = _trunc_lengths(sink, window, t_cap, batch, gen)
    heads = h_kv + 2 if strided else h_kv  # strided: a head-slice view of a wider buffer
    base_k = torch.rand(batch, t_cap, heads, head_dim, generator=gen) * 200 - 100
    base_v = torch.rand(batch, t_cap, heads, head_dim, generator=gen) * 200 - 100
    base_k, base_v = base_k.to(dtype).to(device), base_v.to(dtype).to(device)
    k, v = base_k[:, :, 1 : 1 + h_kv], base_v[:, :, 1 : 1 + h_kv]
    k_orig, v_orig = k.clone(), v.clone()
    k_ref, v_ref = k.clone(), v.clone()
    base_before = (base_k.clone(), base_v.clone())
    new = impl(k, v, lengths.to(device), sink, window)
    new_ref = truncate_kv_ref_(k_ref, v_ref, lengths, sink, window)
    assert torch.equal(new.cpu(), new_ref), (new, new_ref)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    # independent statement of the semantics
    for i, L in enumerate(lengths.tolist()):
        if L <= total:
            assert torch.equal(k[i], k_orig[i]) and torch.equal(v[i], v_orig[i])
            continue
        assert torch.equal(k[i, :sink], k_orig[i, :sink])
        assert torch.equal(k[i, total:], k_orig[i, total:])  # nothing past the ring is written
        pos = torch.arange(L - window, L)
        slots = ring_slot(pos, sink, window)
        assert torch.equal(k[i, slots.to(device)], k_orig[i, pos.to(device)])
        assert torch.equal(v[i, slots.to(device)], v_orig[i, pos.to(device)])
    if strided:  # the heads outside the view are untouched
        assert torch.equal(base_k[:, :, 0], base_before[0][:, :, 0])
        assert torch.equal(base_v[:, :, 1 + h_kv :], base_before[1][:, :, 1 + h_kv :])


TRUNC_CASES = [
    (sink, window, dtype, head_dim, strided)
    for (sink, window), dtype, (head_dim, strided) in itertools.product(
        TRUNC_CONFIGS,
        [torch.bfloat16, torch.float16, torch.float32],
        [(128, False), (64, True), (3, False)],  # D=3 fp16: 6-byte rows, narrow vectors
    )
] + [(4, 17, torch.float64, 8, False), (4, 17, torch.uint8, 5, True)]


def _case_id(c):
    sink, window, dtype, head_dim, strided = c
    return f"s{sink}-w{window}-{str(dtype).split('.')[-1]}-d{head_dim}{'-strided' if strided else ''}"


@needs_cpu_ext
@pytest.mark.parametrize("case", TRUNC_CASES, ids=_case_id)
def test_truncate_cpu_ext(case):
    _check_truncate(kcuda.truncate_kv_, "cpu", *case)


@needs_cuda_ext
@pytest.mark.parametrize("case", TRUNC_CASES, ids=_case_id)
def test_truncate_cuda(case):
    _check_truncate(kcuda.truncate_kv_, "cuda", *case)


@needs_cpu_ext
def test_truncate_ext_rejects_bad_input():
    """The extension's own checks (TORCH_CHECK) surface as RuntimeError with the bad value."""
    k = torch.zeros(2, 8, 1, 4)
    with pytest.raises(RuntimeError, match="window >= 1"):
        kcuda.truncate_kv_(k, k.clone(), torch.tensor([1, 2]), 1, 0)
    with pytest.raises(RuntimeError, match="lengths must be int32 or int64"):
        kcuda.truncate_kv_(k, k.clone(), torch.tensor([1.0, 2.0]), 1, 2)
    with pytest.raises(RuntimeError, match="lengths\\[1\\]=9 outside \\[0, T_cap=8\\]"):
        kcuda.truncate_kv_(k, k.clone(), torch.tensor([1, 9]), 1, 2)


# ---------------------------------------------------------------------------------------------
# Backend selection.


def test_backend_cpu():
    be = get_backend("cpu")
    names = available_backends("cpu")
    assert names["decode_full"] == ["sdpa", "reference"] and names["decode_sink_window"] == ["sdpa", "reference"]
    assert names["truncate_kv_"][-1] == "reference"
    from ltengine.kernels import OPS
    assert set(be.describe()) == set(OPS)
    assert names["score_ratio"] == ["reference"] and names["score_peak"] == ["reference"]
    ref = get_backend("cpu", prefer="reference")
    assert all(v == "reference" for v in ref.describe().values())
    with pytest.raises(ValueError, match="prefer must be one of"):
        get_backend("cpu", prefer="fast")


def test_backend_cpu_ops_agree_with_reference():
    gen = _gen("backend-cpu")
    q = torch.randn(3, 4, 16, generator=gen)
    k = torch.randn(3, 9, 2, 16, generator=gen)
    v = torch.randn(3, 9, 2, 16, generator=gen)
    lengths = torch.tensor([0, 5, 9])
    be = get_backend("cpu")
    torch.testing.assert_close(be.decode_full(q, k, v, lengths, 0.25), decode_full_ref(q, k, v, lengths, 0.25))
    torch.testing.assert_close(
        be.decode_sink_window(q, k, v, torch.tensor([2, 9, 30]), 2, 7, 0.25),
        decode_sink_window_ref(q, k, v, torch.tensor([2, 9, 30]), 2, 7, 0.25),
    )
    k2, v2 = k.clone(), v.clone()
    assert be.truncate_kv_(k, v, torch.tensor([9, 8, 3]), 1, 3).tolist() == [4, 4, 3]
    truncate_kv_ref_(k2, v2, torch.tensor([9, 8, 3]), 1, 3)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    # paged decode: overlap (a launch hint for the CUDA kernel) is accepted and changes nothing elsewhere
    pool_k, pool_v = torch.randn(6, 4, 2, 16, generator=gen), torch.randn(6, 4, 2, 16, generator=gen)
    tables = torch.tensor([[1, 2, 0], [3, 4, 5], [0, 0, 0]], dtype=torch.int32)
    n = torch.tensor([7, 12, 0], dtype=torch.int32)
    want = paged_decode_ref(q, pool_k, pool_v, tables, n, 0.25)
    for overlap in (False, True):
        torch.testing.assert_close(be.paged_decode(q, pool_k, pool_v, tables, n, 0.25, overlap=overlap), want)


@needs_gpu
def test_backend_cuda_dispatch_by_dtype():
    be = get_backend("cuda")
    names = available_backends("cuda")
    assert names["decode_full"] == ["sdpa", "reference"] and names["decode_sink_window"] == ["sdpa", "reference"]
    if kcuda.has_cuda_ext():
        assert be.impl_for("truncate_kv_", torch.float32, 128) == "cuda"
    assert get_backend("cuda", prefer="reference").impl_for("paged_decode", torch.bfloat16, 128) == "reference"
