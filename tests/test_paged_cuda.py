"""The compiled paged kernels (csrc/) against their PyTorch twins in ``ltengine.kernels.paged``.

Decode tolerance (flash-attention style): ref64 = ``paged_decode_ref`` on float64 inputs, ref_lp = the
same reference in the input dtype; the kernel passes when

    max|out - ref64| <= 2 * max|ref_lp - ref64| + eps,   eps = finfo(dtype).eps * max|ref64| (1e-5 * ... fp32)

and its relative Frobenius error is at most 1e-2 (bf16), 2e-3 (fp16), 1e-5 (fp32). Inputs are fresh
random normals per case; block 0 of the pool and every slot past a row's length are NaN, and unused
table entries point at block 0, so a kernel that reads outside a row's valid slots fails. Truncation must
be exact (torch.equal), overlapping moves included. CPU part: the CPU truncate of the extension (built on
CI by scripts/install.sh); GPU part skipped without a GPU or without the CUDA build of the extension.
"""
from __future__ import annotations

import subprocess
import sys
import zlib

import pytest
import torch
from conftest import gpu_test

from ltengine.kernels import cuda as kcuda
from ltengine.kernels import get_backend
from ltengine.kernels.paged import paged_decode_ref, paged_truncate_ref_

needs_cpu_ext = pytest.mark.skipif(not kcuda.has_cpu_ext(), reason="ltengine._C is not built (setup.py build_ext)")

FROB_BOUND = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _gen(*key, device="cpu"):
    return torch.Generator(device=device).manual_seed(zlib.crc32(repr(key).encode()))


def _pool(key, lengths, bs, h_kv, d, dtype, device, spare=2):
    """Random pools with each row's blocks at random places; block 0 (and every slot past a row's length)
    is NaN and pads every table. Returns k, v, tables [N, MB] int32."""
    gen = _gen(*key, device=device)
    blocks = [-(-n // bs) for n in lengths]
    nb = sum(blocks) + 4
    k = torch.randn(nb, bs, h_kv, d, generator=gen, device=device).to(dtype)
    v = torch.randn(nb, bs, h_kv, d, generator=gen, device=device).to(dtype)
    k[0] = v[0] = float("nan")
    perm = torch.randperm(nb - 1, generator=gen, device=device) + 1
    tables = torch.zeros(len(lengths), max(blocks + [1]) + spare, dtype=torch.int32, device=device)
    at = 0
    for i, (n, nblk) in enumerate(zip(lengths, blocks)):
        tables[i, :nblk] = perm[at:at + nblk].int()
        at += nblk
        if n % bs:
            k[tables[i, nblk - 1].long(), n % bs:] = float("nan")
            v[tables[i, nblk - 1].long(), n % bs:] = float("nan")
    return k, v, tables


def _clean(x):
    return torch.nan_to_num(x, nan=0.0)  # the reference masks by length; NaN * 0 would still poison it


def _check_decode(out, q, k, v, tables, n, scale, what=""):
    dtype = q.dtype
    ref64 = paged_decode_ref(q.double(), _clean(k).double(), _clean(v).double(), tables, n, scale)
    ref_lp = paged_decode_ref(q, _clean(k), _clean(v), tables, n, scale).double()
    assert out.dtype == dtype and out.shape == q.shape, what
    assert torch.isfinite(out).all(), f"{what}: the kernel read a poisoned slot or wrote NaN/inf"
    empty = n == 0
    assert (out[empty] == 0).all(), f"{what}: a row with no keys must come out as zeros"
    err = (out.double() - ref64).abs().max().item()
    lp_err = (ref_lp - ref64).abs().max().item()
    eps = (1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps) * ref64.abs().max().item()
    assert err <= 2 * lp_err + eps, f"{what}: max err {err:.3e} > 2 * lowp err {lp_err:.3e} + {eps:.1e}"
    frob = ((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
    assert frob <= FROB_BOUND[dtype], f"{what}: relative Frobenius error {frob:.3e}"


def _trunc_lengths(sink, window, gen, rows):
    """Lengths around every edge: empty, only sink tokens, a partial / full ring, L in the overlap range
    (L < sink + 2 * window), and long rows."""
    cap = sink + window
    edges = [0, max(0, sink - 1), sink, cap - 1, cap, cap + 1, cap + window // 2, sink + 2 * window - 1,
             sink + 2 * window, 3 * cap + 5]
    rand = torch.randint(0, 4 * cap + 9, (max(0, rows - len(edges)),), generator=gen).tolist()
    return [max(0, x) for x in edges + rand][:rows] if rows >= len(edges) else edges[:rows]


def _check_truncate(fn, device, sink, window, bs, dtype, d, rows=14):
    gen = _gen("trunc", sink, window, bs, dtype, d)
    lengths = _trunc_lengths(sink, window, gen, rows)
    k, v, tables = _pool(("trunc", sink, window, bs, d), lengths, bs, 2, d, dtype, device)
    k, v = _clean(k), _clean(v)
    k2, v2 = k.clone(), v.clone()
    lens = torch.tensor(lengths, device=device)
    fn(k, v, tables, lens, sink, window)
    paged_truncate_ref_(k2, v2, tables, lens, sink, window)
    assert torch.equal(k, k2) and torch.equal(v, v2), (sink, window, bs, dtype, d, lengths)


TRUNC_CASES = [(0, 1, 16), (4, 1, 16), (4, 17, 16), (4, 17, 7), (4, 60, 64), (0, 64, 64), (4, 1020, 64)]


# ---------------------------------------------------------------------------------------------------
# CPU: the extension's truncate (CI builds the CPU extension)

@needs_cpu_ext
@pytest.mark.parametrize("sink,window,bs", TRUNC_CASES)
@pytest.mark.parametrize("dtype,d", [(torch.float32, 8), (torch.bfloat16, 16), (torch.float16, 6)])
def test_paged_truncate_cpu_matches_reference(sink, window, bs, dtype, d):
    _check_truncate(kcuda.paged_truncate_, "cpu", sink, window, bs, dtype, d)


@needs_cpu_ext
def test_paged_truncate_cpu_is_the_cpu_backend():
    assert get_backend("cpu").impl_for("paged_truncate_", torch.float32, 64) == "cpp"


@needs_cpu_ext
def test_cpu_ext_failed_checks_raise():
    k = torch.zeros(4, 8, 1, 4)
    tables = torch.tensor([[1, 2], [3, 0]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside \\[0, 2 blocks x 8\\]"):
        kcuda.paged_truncate_(k, k.clone(), tables, torch.tensor([1, 17]), 1, 2)
    with pytest.raises(RuntimeError, match="window >= 1"):
        kcuda.paged_truncate_(k, k.clone(), tables, torch.tensor([1, 2]), 1, 0)
    with pytest.raises(RuntimeError, match="tables\\[1, 1\\]=9"):
        kcuda.paged_truncate_(k, k.clone(), torch.tensor([[1, 2], [3, 9]], dtype=torch.int32),
                              torch.tensor([1, 16]), 1, 2)
    with pytest.raises(RuntimeError, match="T_cap=8"):
        kcuda.truncate_kv_(torch.zeros(2, 8, 1, 4), torch.zeros(2, 8, 1, 4), torch.tensor([1, 9]), 1, 2)


# ---------------------------------------------------------------------------------------------------
# GPU: decode

MIXED = [0, 1, 17, 1024, 333, 4099, 64, 0, 5, 2049, 3]


@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 80, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("bs", [16, 64])
@pytest.mark.parametrize("lengths", [[1], [4099], MIXED], ids=["1", "4099", "mixed"])
def test_paged_decode_cuda_matches_reference(dtype, d, group, bs, lengths):
    k, v, tables = _pool(("dec", dtype, d, group, bs, len(lengths)), lengths, bs, 2, d, dtype, "cuda")
    q = torch.randn(len(lengths), 2 * group, d, generator=_gen("q", d, group, bs, device="cuda"),
                    device="cuda").to(dtype)
    n = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    out = kcuda.paged_decode(q, k, v, tables, n, d ** -0.5)
    _check_decode(out, q, k, v, tables, n, d ** -0.5, f"{dtype} d{d} g{group} bs{bs}")


@gpu_test
@pytest.mark.parametrize("case", [
    dict(group=20, d=128, bs=16, dtype=torch.bfloat16),    # G > 16: two head tiles
    dict(group=6, d=96, bs=7, dtype=torch.float16),        # odd block size (no power of 2)
    dict(group=3, d=40, bs=5, dtype=torch.float32),        # odd group and block size, fp32
    dict(group=4, d=128, bs=64, dtype=torch.bfloat16, programs=4096, min_chunk=16),  # 64 chunks a row
    dict(group=4, d=128, bs=64, dtype=torch.bfloat16, programs=8, min_chunk=1000),   # one chunk a row
    dict(group=4, d=128, bs=16, dtype=torch.bfloat16, stages=2),  # the other ring depths
    dict(group=8, d=120, bs=64, dtype=torch.float16, stages=4),
    dict(group=2, d=128, bs=64, dtype=torch.bfloat16, stages=3),
])
def test_paged_decode_cuda_odd_shapes_and_knobs(case):
    case = dict(case)
    group, d, bs, dtype = case.pop("group"), case.pop("d"), case.pop("bs"), case.pop("dtype")
    lengths = MIXED + [9000, 1, 63, 65]
    k, v, tables = _pool(("odd", group, d, bs), lengths, bs, 2, d, dtype, "cuda")
    q = torch.randn(len(lengths), 2 * group, d, device="cuda").to(dtype)
    n = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    out = kcuda.paged_decode(q, k, v, tables, n, 0.1, **case)
    _check_decode(out, q, k, v, tables, n, 0.1, str(case))


@gpu_test
@pytest.mark.parametrize("rows", [33, 70, 130])
@pytest.mark.parametrize("dtype,bs", [(torch.bfloat16, 16), (torch.float16, 7), (torch.float32, 64)])
def test_paged_decode_cuda_many_rows(rows, dtype, bs):
    """More rows than a warp has lanes (the plan reads rows lane-strided and scans them 32 at a time; the
    row plan of CTA (0, 0) spans every group), empty and one-key rows among them, one long row."""
    gen = _gen("many", rows, bs)
    lengths = torch.randint(0, 700, (rows,), generator=gen).tolist()
    lengths[::9] = [0] * len(lengths[::9])
    lengths[1::11] = [1] * len(lengths[1::11])
    lengths[rows // 2] = 5000
    k, v, tables = _pool(("many", rows, bs, dtype), lengths, bs, 2, 128, dtype, "cuda")
    q = torch.randn(rows, 8, 128, generator=_gen("q-many", rows, device="cuda"), device="cuda").to(dtype)
    n = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    _check_decode(kcuda.paged_decode(q, k, v, tables, n, 128 ** -0.5), q, k, v, tables, n, 128 ** -0.5,
                  f"{rows} rows {dtype} bs{bs}")


@gpu_test
@pytest.mark.parametrize("d,dtype", [(128, torch.bfloat16), (256, torch.bfloat16), (72, torch.float32)])
def test_paged_decode_cuda_warp_combine(d, dtype):
    """The merge with a warp per (row, head), which the launch picks where rows average <= 8 chunks: forced
    by a small grid cap (programs=128: 64 chunks per kv head, 10 rows), one row of ~63 chunks (more than a
    warp's lanes and several load batches), empty and one-key rows; D 256 takes two passes of 32 float4s."""
    lengths = [20000, 0, 1, 700, 33, 0, 5000, 2, 129, 64]
    k, v, tables = _pool(("warp-combine", d, dtype), lengths, 16, 2, d, dtype, "cuda")
    q = torch.randn(len(lengths), 8, d, generator=_gen("q-warp", d, device="cuda"), device="cuda").to(dtype)
    n = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    out = kcuda.paged_decode(q, k, v, tables, n, d ** -0.5, programs=128, min_chunk=16)
    _check_decode(out, q, k, v, tables, n, d ** -0.5, f"warp combine d{d} {dtype}")


@gpu_test
@pytest.mark.parametrize("rows", [1, 40])
def test_paged_decode_cuda_all_rows_empty(rows):
    """A batch with no keys at all (the schedule has no chunk to plan): every output row is zeros."""
    k, v, tables = _pool(("empty", rows), [0] * rows, 16, 2, 128, torch.bfloat16, "cuda")
    q = torch.randn(rows, 8, 128, device="cuda").to(torch.bfloat16)
    out = kcuda.paged_decode(q, k, v, tables, torch.zeros(rows, dtype=torch.int32, device="cuda"), 0.1)
    assert out.shape == q.shape and (out == 0).all()


@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paged_decode_cuda_graph_replay_with_new_lengths(dtype):
    """One capture, lengths changed on the device between replays (empty rows included)."""
    caps = [2100, 700, 64, 1, 3000]
    k, v, tables = _pool(("graph", dtype), caps, 64, 8, 128, dtype, "cuda")
    k, v = _clean(k), _clean(v)  # rows shrink and grow: every slot of a row's blocks must be valid
    q = torch.randn(len(caps), 32, 128, device="cuda").to(dtype)
    n = torch.tensor(caps, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    kcuda.paged_decode(q, k, v, tables, n, 0.1)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(kcuda.paged_decode(q, k, v, tables, n, 0.1))
    for lens in ([2100, 5, 1, 0, 640], [0, 0, 0, 0, 1], [1, 700, 64, 1, 3000], [2099, 0, 17, 1, 2999]):
        n.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        _check_decode(out, q, k, v, tables, n, 0.1, f"replay {lens}")


@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paged_decode_cuda_overlap_chain_in_graph(dtype):
    """``overlap=True`` (programmatic dependent launch, the prologue before the previous kernel ends) in the
    paged runner's pattern, captured once and replayed on new data: per layer a kernel writes q and one new
    K/V row right before the attention, and layers' attentions also run back to back (each one's partials
    and row plan may reuse the memory the previous combine reads). Lengths and tables change only between
    replays, as the contract says. Every output against the reference, each replay."""
    layers, caps = 4, [2100, 700, 64, 1, 3000, 129]
    pools = [_pool(("overlap", dtype, i), caps, 64, 8, 128, dtype, "cuda") for i in range(layers)]
    pools = [(_clean(k), _clean(v), t) for k, v, t in pools]
    b = len(caps)
    qs = torch.randn(layers, b, 32, 128, device="cuda").to(dtype)
    src = torch.empty_like(qs)
    rows = torch.zeros(layers, b, 2, 8, 128, device="cuda", dtype=dtype)  # each row's new K and V
    slot = torch.zeros(layers, b, dtype=torch.long, device="cuda")       # where they go (flat pool row)
    n = torch.tensor(caps, dtype=torch.int32, device="cuda")
    outs = torch.empty_like(qs)

    def step():
        for i, (k, v, tables) in enumerate(pools):
            qs[i].copy_(src[i])  # the kernel right before the attention writes q ...
            k.view(-1, 8, 128).index_copy_(0, slot[i], rows[i, :, 0])  # ... and the pool
            v.view(-1, 8, 128).index_copy_(0, slot[i], rows[i, :, 1])
            outs[i].copy_(kcuda.paged_decode(qs[i], k, v, tables, n, 0.1, overlap=True))
        back = [kcuda.paged_decode(qs[i], *pools[i], n, 0.1, overlap=True) for i in range(layers)]
        return torch.stack(back)

    torch.cuda.synchronize()
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chained = step()
    for lens in ([2100, 5, 1, 0, 640, 129], [1, 700, 64, 1, 3000, 2], [2099, 0, 17, 1, 2999, 128]):
        n.copy_(torch.tensor(lens, dtype=torch.int32))
        src.copy_(torch.randn_like(src))
        rows.copy_(torch.randn_like(rows))
        for i, (k, v, tables) in enumerate(pools):  # a new row at each one's last valid slot
            last = (n - 1).clamp(min=0).long()
            slot[i] = tables[torch.arange(b, device="cuda"), last // 64].long() * 64 + last % 64
        graph.replay()
        torch.cuda.synchronize()
        for i, (k, v, tables) in enumerate(pools):
            _check_decode(outs[i], qs[i], k, v, tables, n, 0.1, f"replay {lens} layer {i}")
            _check_decode(chained[i], qs[i], k, v, tables, n, 0.1, f"replay {lens} layer {i}, back to back")
            assert torch.equal(outs[i], chained[i]), "the same inputs gave another output"


@gpu_test
def test_paged_decode_cuda_fp8_graph_replay_with_new_lengths():
    """fp8 pools with scales: one capture, lengths changed on the device between replays; each replay
    against the fp32 twin over the same fp8 pools (tolerance: the twin's own error in bf16 q, x2, + 1e-3)."""
    from ltengine.kernels.fp8 import quantize

    caps = [2100, 700, 64, 1, 3000]
    k, v, tables = _pool(("graph8",), caps, 64, 8, 128, torch.float32, "cuda")
    (k8, ks), (v8, vs) = quantize(_clean(k)), quantize(_clean(v))
    q = torch.randn(len(caps), 32, 128, device="cuda").to(torch.bfloat16)
    n = torch.tensor(caps, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    kcuda.paged_decode(q, k8, v8, tables, n, 0.1, ks, vs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(kcuda.paged_decode(q, k8, v8, tables, n, 0.1, ks, vs))
    for lens in ([2100, 5, 1, 0, 640], [0, 0, 0, 0, 1], [2099, 0, 17, 1, 2999]):
        n.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_decode_ref(q.float(), k8, v8, tables, n, 0.1, ks, vs).double()
        ref_lp = paged_decode_ref(q, k8, v8, tables, n, 0.1, ks, vs).double()
        err, own = (out.double() - ref).abs().max().item(), (ref_lp - ref).abs().max().item()
        assert torch.isfinite(out).all() and (out[n == 0] == 0).all(), lens
        assert err <= 2 * own + 1e-3, f"replay {lens}: max err {err:.3e} > 2 x {own:.3e} + 1e-3"


@gpu_test
def test_truncate_then_decode_is_streaming_attention():
    """Demote rows with the CUDA truncate, then decode their sink + window prefix: the same as the
    reference truncate + reference decode (rows of only sink tokens, partial and wrapped rings)."""
    sink, window, bs = 4, 60, 16
    lengths = [0, 2, 4, 30, 64, 65, 100, 123, 124, 500]
    k, v, tables = _pool(("stream",), lengths, bs, 2, 64, torch.bfloat16, "cuda")
    k, v = _clean(k), _clean(v)
    k2, v2 = k.clone(), v.clone()
    lens = torch.tensor(lengths, device="cuda")
    kcuda.paged_truncate_(k, v, tables, lens, sink, window)
    paged_truncate_ref_(k2, v2, tables, lens, sink, window)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    n = lens.clamp(max=sink + window).int()
    q = torch.randn(len(lengths), 8, 64, device="cuda").to(torch.bfloat16)
    _check_decode(kcuda.paged_decode(q, k, v, tables, n, 0.125), q, k, v, tables, n, 0.125, "streaming")


# ---------------------------------------------------------------------------------------------------
# GPU: truncate, backend, failed checks

@gpu_test
@pytest.mark.parametrize("sink,window,bs", TRUNC_CASES)
@pytest.mark.parametrize("dtype,d", [(torch.float32, 128), (torch.bfloat16, 64), (torch.float16, 6)])
def test_paged_truncate_cuda_matches_reference(sink, window, bs, dtype, d):
    _check_truncate(kcuda.paged_truncate_, "cuda", sink, window, bs, dtype, d)


@gpu_test
def test_cuda_backend_runs_the_extension_where_it_measured_faster():
    """paged_truncate_ runs the CUDA kernel; paged_decode runs it for every pool it reads but 16-bit ones with
    D > 128, where Triton (when installed) measured faster (bench/RESULTS.md, issue 11)."""
    from ltengine.kernels.paged import triton

    be = get_backend("cuda")
    assert be.impl_for("paged_truncate_", torch.bfloat16, 128) == "cuda"
    assert be.impl_for("paged_decode", torch.float8_e4m3fn, 128) == "cuda"
    assert be.impl_for("paged_decode", torch.float32, 64) == "cuda"
    assert be.impl_for("paged_decode", torch.bfloat16, 128) == "cuda"
    assert be.impl_for("paged_decode", torch.float16, 64) == "cuda"
    assert be.impl_for("paged_decode", torch.bfloat16, 256) == ("triton" if triton is not None else "cuda")
    assert be.impl_for("paged_decode", torch.float8_e4m3fn, 72) == ("triton" if triton is not None else "reference")


@gpu_test
def test_cuda_failed_checks_raise():
    """A TORCH_CHECK that fails inside the extension is a Python RuntimeError, not a crash."""
    code = (
        "import torch, ltengine.kernels.cuda as kc\n"
        "q = torch.zeros(2, 8, 36, device='cuda', dtype=torch.bfloat16)\n"
        "k = torch.zeros(4, 16, 2, 36, device='cuda', dtype=torch.bfloat16)\n"
        "t = torch.zeros(2, 3, dtype=torch.int32, device='cuda'); n = torch.ones(2, dtype=torch.int32, device='cuda')\n"
        "try:\n"
        "    kc.paged_decode(q, k, k, t, n, 1.0)\n"
        "except RuntimeError as e:\n"
        "    print('raised:', e)\n"
    )
    # in a child process first: a crash there fails this test instead of killing the session
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "raised: paged_decode (CUDA): head dim must be a multiple of 8" in res.stdout, (
        res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    q = torch.zeros(2, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.zeros(4, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    t = torch.zeros(2, 3, dtype=torch.int32, device="cuda")
    n = torch.ones(2, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="H_q=8 is not a multiple of H_kv=3"):
        kcuda.paged_decode(q, torch.zeros(4, 16, 3, 64, device="cuda", dtype=torch.bfloat16),
                           torch.zeros(4, 16, 3, 64, device="cuda", dtype=torch.bfloat16), t, n, 1.0)
    with pytest.raises(RuntimeError, match="tables must be int32"):
        torch.ops.ltengine.paged_decode(q, k, k, t.long(), n, 1.0, None, None, 0, 0, 0)
    with pytest.raises(RuntimeError, match="must share q's dtype"):
        kcuda.paged_decode(q, k.half(), k.half(), t, n, 1.0)
    k8 = k.to(torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="an fp8 pool needs k_scale and v_scale"):
        kcuda.paged_decode(q, k8, k8, t, n, 1.0)
    with pytest.raises(RuntimeError, match="k_scale and v_scale must be float32"):
        kcuda.paged_decode(q, k8, k8, t, n, 1.0, torch.ones(4, 16, 3, device="cuda"), torch.ones(4, 16, 3, device="cuda"))

    with pytest.raises(RuntimeError, match="window >= 1"):
        kcuda.paged_truncate_(k, k.clone(), t, n, 4, 0)
