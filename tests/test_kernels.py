"""Kernel tests: every decode / truncation implementation against the PyTorch reference.

Decode tolerance (flash-attention style). ref64 = reference.decode_*_ref on float64 inputs; ref_lp = the
same attention computed in the input dtype (scores, softmax and P.V each rounded to it). A kernel output
``out`` passes when

    max|out - ref64| <= 2 * max|ref_lp - ref64| + eps,   eps = finfo(dtype).eps * max|ref64|
                                                          (1e-5 * max|ref64| for float32)
    and  ||out - ref64||_F / ||ref64||_F <= 1e-2 (bf16), 2e-3 (fp16), 1e-5 (fp32),

and contains no NaN. Inputs are fresh random normals per case (seeded by the case, different per case,
never zeros); cache slots past each sequence's valid keys are filled with NaN, so a kernel that reads
them fails; preallocated outputs are NaN-poisoned before each call. Truncation must be exact
(torch.equal), overlapping moves included.

CPU part: the references themselves, the CPU extension's truncate (skipped if not built). GPU part:
CUDA extension and Triton kernels (skipped without a GPU, the extension, or triton).
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from ltengine.kernels import available_backends, get_backend
from ltengine.kernels import cuda as kcuda
from ltengine.kernels import triton_decode as ktriton
from ltengine.kernels.reference import decode_full_ref, decode_sink_window_ref, ring_slot, truncate_kv_ref_

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
needs_cuda_ext = pytest.mark.skipif(
    not (HAS_GPU and kcuda.has_cuda_ext()), reason="needs a CUDA GPU and ltengine._C built with CUDA"
)
needs_triton = pytest.mark.skipif(not ktriton.available(), reason="needs triton and a CUDA GPU")
needs_cpu_ext = pytest.mark.skipif(not kcuda.has_cpu_ext(), reason="ltengine._C is not built (setup.py build_ext)")

FROB_BOUND = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _gen(*key, device: str = "cpu") -> torch.Generator:
    """A generator seeded by the test case, so every case draws different data."""
    return torch.Generator(device=device).manual_seed(zlib.crc32(repr(key).encode()))


def _lengths(gen: torch.Generator, batch: int, cap: int, allow_zero: bool, wrap_to: int | None = None) -> torch.Tensor:
    """Mixed lengths: edge values first (0, 1, cap, past cap when wrap_to), then random ones."""
    hi = wrap_to if wrap_to is not None else cap
    edges = ([0] if allow_zero else []) + [1, cap, max(1, cap - 1)]
    if wrap_to is not None:
        edges += [cap + 1, wrap_to]
    if batch == 1:  # one sequence: a wrapped ring if possible, else a random length
        lo = cap + 1 if wrap_to is not None and wrap_to > cap else 1
        return torch.randint(lo, hi + 1, (1,), generator=gen)
    rand = torch.randint(0 if allow_zero else 1, hi + 1, (batch,), generator=gen)
    rand[: len(edges)] = torch.tensor(edges)[:batch]
    return rand[torch.randperm(batch, generator=gen)]


def _make_decode_case(key, batch, h_kv, group, dim, cap, valid, dtype, device, peak=1.0):
    """q [B, H_q, D], k/v [B, cap, H_kv, D] random (drawn on ``device``), slots >= valid[b] set to NaN."""
    gen = _gen(*key, device=device)
    q = torch.randn(batch, h_kv * group, dim, generator=gen, device=device) * peak
    k = torch.randn(batch, cap, h_kv, dim, generator=gen, device=device)
    v = torch.randn(batch, cap, h_kv, dim, generator=gen, device=device)
    slot = torch.arange(cap, device=device)
    dead = slot[None, :] >= valid.to(device)[:, None]
    k[dead] = float("nan")
    v[dead] = float("nan")
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _lowp_attention(q, k, v, valid_mask, scale):
    """The reference computation with every stage rounded to the input dtype (its own error is the yardstick)."""
    b, h_q, d = q.shape
    h_kv = k.shape[2]
    qg = q.reshape(b, h_kv, h_q // h_kv, d)
    scores = torch.einsum("bhgd,bthd->bhgt", qg, k) * scale
    scores = scores.masked_fill(~valid_mask[:, None, None, :], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    vz = v.masked_fill(~valid_mask[:, :, None, None], 0.0)
    return torch.einsum("bhgt,bthd->bhgd", probs, vz).reshape(b, h_q, d)


def _check_close(out, ref64, ref_lp, dtype, what=""):
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, expected {dtype}"
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    out64 = out.double()
    err = (out64 - ref64).abs().max().item()
    lp_err = (ref_lp.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    eps = (1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps) * scale
    assert err <= 2 * lp_err + eps, f"{what}: max err {err:.3e} > 2 * lowp err {lp_err:.3e} + {eps:.1e}"
    frob = ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
    assert frob <= FROB_BOUND[dtype], f"{what}: relative Frobenius error {frob:.3e} > {FROB_BOUND[dtype]}"


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
    k = torch.zeros(2, 8, 1, 4)
    with pytest.raises(ValueError, match="window"):
        kcuda.truncate_kv_(k, k.clone(), torch.tensor([1, 2]), 1, 0)
    with pytest.raises(ValueError, match="lengths must be"):
        kcuda.truncate_kv_(k, k.clone(), torch.tensor([1.0, 2.0]), 1, 2)
    with pytest.raises(ValueError, match="T_cap=8\\]; got min 1, max 9"):
        kcuda.truncate_kv_(k, k.clone(), torch.tensor([1, 9]), 1, 2)


# ---------------------------------------------------------------------------------------------
# Decode kernels (GPU) against the reference.

SW_CONFIGS = [(0, 1), (4, 1), (0, 17), (4, 17), (4, 1020), (0, 4096)]
FULL_CAPS = [1, 17, 1024, 4103]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _decode_cases(kind):
    cases = []
    configs = SW_CONFIGS if kind == "sink_window" else FULL_CAPS
    for dim, group, dtype, cfg, batch in itertools.product([64, 128], [1, 4, 8], DTYPES, configs, [1, 33]):
        cases.append((kind, dim, group, dtype, cfg, batch))
    cases.append((kind, 128, 20, torch.bfloat16, configs[-2], 33))  # G > 16: several head tiles
    return cases


def _decode_id(c):
    kind, dim, group, dtype, cfg, batch = c
    cfg_s = f"s{cfg[0]}w{cfg[1]}" if isinstance(cfg, tuple) else f"T{cfg}"
    return f"{kind}-d{dim}-g{group}-{DTYPE_NAMES[dtype]}-{cfg_s}-b{batch}"


def _run_decode_case(impl_name, case, num_splits=None, strided=False):
    kind, dim, group, dtype, cfg, batch = case
    h_kv = 2
    gen = _gen("lens", case)
    if kind == "sink_window":
        sink, window = cfg
        cap = sink + window
        lengths = _lengths(gen, batch, cap, allow_zero=False, wrap_to=3 * cap + 5)
        valid = lengths.clamp(max=cap)
    else:
        cap = cfg
        lengths = _lengths(gen, batch, cap, allow_zero=True)
        valid = lengths
    peak = 4.0 if (dim + group + batch) % 3 == 0 else 1.0  # some cases with peaky softmax
    q, k, v = _make_decode_case(("dec", case, strided), batch, h_kv, group, dim, cap, valid, dtype, "cuda", peak)
    if strided:  # k, v as head-slices of a wider cache buffer (strides != contiguous)
        wide = torch.full((batch, cap, h_kv + 1, dim), float("nan"), dtype=dtype, device="cuda")
        wide_v = wide.clone()
        wide[:, :, 1:] = k
        wide_v[:, :, 1:] = v
        k, v = wide[:, :, 1:], wide_v[:, :, 1:]
    scale = dim**-0.5
    lengths = lengths.to(torch.int32 if batch % 2 else torch.int64).cuda()
    mask = torch.arange(cap, device="cuda")[None, :] < valid.cuda()[:, None]
    if kind == "sink_window":
        ref64 = decode_sink_window_ref(q.double(), k.double(), v.double(), lengths, sink, window, scale)
    else:
        ref64 = decode_full_ref(q.double(), k.double(), v.double(), lengths, scale)
    ref_lp = _lowp_attention(q, k, v, mask, scale)
    mod = kcuda if impl_name == "cuda" else ktriton
    out = torch.full_like(q, float("nan"))
    kw = {"out": out} if num_splits is None else {"out": out, "num_splits": num_splits}
    if kind == "sink_window":
        res = mod.decode_sink_window(q, k, v, lengths, sink, window, scale, **kw)
    else:
        res = mod.decode_full(q, k, v, lengths, scale, **kw)
    assert res is out
    _check_close(out, ref64, ref_lp, dtype, _decode_id(case))


ALL_DECODE_CASES = _decode_cases("sink_window") + _decode_cases("full")


@needs_cuda_ext
@pytest.mark.parametrize("case", ALL_DECODE_CASES, ids=_decode_id)
def test_decode_cuda(case):
    _, dim, _, dtype, _, _ = case
    if not kcuda.decode_supports(dtype, dim):
        with pytest.raises(ValueError, match="dtype must be one of"):
            _run_decode_case("cuda", case)
        return
    _run_decode_case("cuda", case)


@needs_triton
@pytest.mark.parametrize("case", ALL_DECODE_CASES, ids=_decode_id)
def test_decode_triton(case):
    _run_decode_case("triton", case)


SPLIT_CASES = [("sink_window", 128, 4, torch.bfloat16, (4, 1020), 33), ("full", 64, 8, torch.float16, 4103, 33)]


@needs_cuda_ext
@pytest.mark.parametrize("num_splits", [1, 3, 64, 300])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=_decode_id)
def test_decode_cuda_num_splits_and_strides(case, num_splits):
    """Both epilogues (one chunk: direct store; several: the combine kernel), strided cache views."""
    _run_decode_case("cuda", case, num_splits=num_splits, strided=num_splits == 3)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=_decode_id)
def test_decode_triton_num_splits_and_strides(case, num_splits):
    _run_decode_case("triton", case, num_splits=num_splits, strided=num_splits == 3)


@needs_cuda_ext
def test_decode_cuda_graph_replay():
    """The CUDA decode reads lengths on the device: a captured graph replays with new lengths and q."""
    sink, window, batch, h_kv, group, dim = 4, 60, 5, 2, 4, 128
    cap = sink + window
    gen = _gen("graph")
    k = torch.randn(batch, cap, h_kv, dim, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(batch, cap, h_kv, dim, generator=gen).to("cuda", torch.bfloat16)
    q = torch.randn(batch, h_kv * group, dim, generator=gen).to("cuda", torch.bfloat16)
    lengths = torch.tensor([1, 10, 64, 65, 300], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    kcuda.decode_sink_window(q, k, v, lengths, sink, window, 0.1, out=out)  # warm-up
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        kcuda.decode_sink_window(q, k, v, lengths, sink, window, 0.1, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    for new in ([3, 4, 5, 6, 7], [64, 1, 100, 2, 63]):
        lengths.copy_(torch.tensor(new, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen).to(torch.bfloat16))
        out.fill_(float("nan"))
        graph.replay()
        ref = decode_sink_window_ref(q.double(), k.double(), v.double(), lengths, sink, window, 0.1)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


@needs_cuda_ext
def test_cuda_wrappers_reject_bad_input():
    q = torch.zeros(2, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.zeros(2, 16, 2, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head dim 96"):
        kcuda.decode_full(q[..., :96].contiguous(), k[..., :96].contiguous(), k[..., :96].contiguous(),
                          torch.tensor([1, 2]), 1.0)
    with pytest.raises(ValueError, match="multiple of H_kv=3"):
        kcuda.decode_full(q, torch.zeros(2, 16, 3, 128, device="cuda", dtype=torch.bfloat16),
                          torch.zeros(2, 16, 3, 128, device="cuda", dtype=torch.bfloat16), torch.tensor([1, 2]), 1.0)
    with pytest.raises(ValueError, match="sink \\+ window = 20"):
        kcuda.decode_sink_window(q, k, k, torch.tensor([1, 2]), 4, 16, 1.0)
    with pytest.raises(ValueError, match="lengths must be int32 or int64"):
        kcuda.decode_full(q, k, k, torch.tensor([1.0, 2.0]), 1.0)


# ---------------------------------------------------------------------------------------------
# Backend selection.


def test_backend_cpu():
    be = get_backend("cpu")
    names = available_backends("cpu")
    assert names["decode_full"] == ["reference"] and names["decode_sink_window"] == ["reference"]
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


@needs_gpu
def test_backend_cuda_dispatch_by_dtype():
    be = get_backend("cuda")
    names = available_backends("cuda")
    if kcuda.has_cuda_ext():
        assert names["decode_sink_window"][0] in ("cuda", "triton")
        assert be.impl_for("decode_sink_window", torch.bfloat16, 128) == names["decode_sink_window"][0]
        assert be.impl_for("truncate_kv_", torch.float32, 128) == "cuda"
    fp32 = be.impl_for("decode_full", torch.float32, 128)
    assert fp32 == ("triton" if ktriton.available() else "reference")
    assert be.impl_for("decode_full", torch.bfloat16, 96) in ("triton", "reference")
    assert get_backend("cuda", prefer="reference").impl_for("decode_full", torch.bfloat16, 128) == "reference"
