"""The decode step's linear kernel (csrc/skinny_linear.cu) against its twin (``F.linear``; with the
folded elementwise modes, ``linear.linear_ref``).

Tolerance derived from the arithmetic: the kernel rounds an fp32 sum of K products once to the output
dtype, so against the float64 product ref64

    |out - ref64| <= eps(dtype) * |ref64| + 2 K eps(fp32) * (|x| @ |w|.T + |bias|)

(eps(dtype) is twice the half-ulp of the final rounding; the second term bounds any fp32 summation
order). ``F.linear`` in the same dtype must meet the same bound without a bias, which checks the bound
itself (with one, cuBLAS's epilogue may round the product to the dtype before adding it). Inputs
are fresh random normals per case, with odd M, N and K; rows past N and batch rows past M must not be
touched (the output is checked in full, its neighbours in a larger buffer are not written).

The folded modes (RMSNorm or silu(gate) * up of the input, the residual add of the output) compute the
same activation a as the twin, but for the fp32 math before its rounding (the norm's sum of squares in
another order and rsqrtf; the gate's __expf): a may differ from the twin's by one rounding of a's dtype,
which adds eps(dtype) (|a| @ |w|.T) to the bound; the residual add rounds once more (eps(dtype) |out|).
CPU part: the backend's linear is the PyTorch twin there. GPU part skipped without a GPU or the CUDA build.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import gpu_test

from ltengine.kernels import cuda as kcuda
from ltengine.kernels import get_backend
from ltengine.kernels.fused import add_rmsnorm_ref, silu_mul_ref
from ltengine.kernels.linear import linear_cuda, linear_ref


def bound(x, w, bias, dtype):
    x64, w64 = x.double(), w.double()
    ref = x64 @ w64.T + (0 if bias is None else bias.double())
    mag = x64.abs() @ w64.abs().T + (0 if bias is None else bias.double().abs())
    tol = torch.finfo(dtype).eps * ref.abs() + 2 * x.shape[1] * torch.finfo(torch.float32).eps * mag
    return ref, tol


def check(out, x, w, bias):
    ref, tol = bound(x, w, bias, x.dtype)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).abs() <= tol).all(), (out.double() - ref).abs().max()


def test_backend_linear_cpu_is_f_linear():
    be = get_backend("cpu")
    assert be.impl_for("linear", torch.float32, 64) == "reference"
    x, w, b = torch.randn(3, 64), torch.randn(5, 64), torch.randn(5)
    assert torch.equal(be.linear(x, w, b), F.linear(x, w, b))


@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 8])
@pytest.mark.parametrize("n,k", [(1, 8), (17, 72), (40, 136), (257, 1000), (4096 + 24, 4096 + 8), (96, 14336)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_linear_matches_reference(dtype, m, n, k, with_bias):
    g = torch.Generator(device="cuda").manual_seed(zlib.crc32(f"{dtype}{m}{n}{k}{with_bias}".encode()))
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g) / k ** 0.5
    bias = torch.randn(n, device="cuda", dtype=dtype, generator=g) if with_bias else None
    check(kcuda.skinny_linear(x, w, bias), x, w, bias)
    if bias is None:  # the bound holds for the twin too (with a bias, cuBLAS may round the product first)
        check(F.linear(x, w, bias), x, w, bias)


@gpu_test
def test_skinny_linear_writes_only_its_output():
    x = torch.randn(5, 72, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(33, 72, device="cuda", dtype=torch.bfloat16)
    out = kcuda.skinny_linear(x, w, None)
    assert out.shape == (5, 33) and out.is_contiguous()
    check(out, x, w, None)
    # the same weights as rows [0, 33) of a larger matrix whose other rows are NaN: they are never read
    big = torch.full((48, 72), float("nan"), device="cuda", dtype=torch.bfloat16)
    big[:33] = w
    check(kcuda.skinny_linear(x, big[:33], None), x, w, None)


@gpu_test
@pytest.mark.parametrize("stages", [3, 4, 6])
def test_skinny_linear_every_ring_depth(stages):
    g = torch.Generator(device="cuda").manual_seed(stages)
    for m, n, k in ((1, 40, 4096 + 8), (8, 4100, 200)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) / k ** 0.5
        check(kcuda.skinny_linear(x, w, stages=stages), x, w, None)
    with pytest.raises(RuntimeError, match="stages"):
        kcuda.skinny_linear(x, w, stages=5)


@gpu_test
def test_skinny_linear_in_a_cuda_graph():
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(100, 256, device="cuda", dtype=torch.bfloat16)
    kcuda.skinny_linear(x, w, None)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kcuda.skinny_linear(x, w, None)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        check(out, x, w, None)


@gpu_test
def test_linear_cuda_falls_back_outside_the_kernel():
    w = torch.randn(40, 64, device="cuda", dtype=torch.bfloat16)
    x9 = torch.randn(9, 64, device="cuda", dtype=torch.bfloat16)  # more rows than the kernel takes
    check(linear_cuda(x9, w), x9, w, None)
    xt = torch.randn(64, 3, device="cuda", dtype=torch.bfloat16).T  # not contiguous
    check(linear_cuda(xt, w), xt, w, None)
    be = get_backend("cuda")
    assert be.impl_for("linear", torch.bfloat16, 64) == "cuda"
    assert be.impl_for("linear", torch.float32, 64) == "reference"
    assert be.impl_for("linear", torch.bfloat16, 60) == "reference"  # K % 8 != 0


@gpu_test
@pytest.mark.parametrize("bad", ["rows", "dtype", "mixed", "k", "shape", "bias", "cpu"])
def test_skinny_linear_bad_input_raises(bad):
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    b = None
    if bad == "rows":
        x = torch.randn(9, 64, device="cuda", dtype=torch.bfloat16)
    elif bad == "dtype":
        x, w = x.float(), w.float()
    elif bad == "mixed":
        w = w.half()
    elif bad == "k":
        x, w = x[:, :60].contiguous(), w[:, :60].contiguous()
    elif bad == "shape":
        w = torch.randn(8, 72, device="cuda", dtype=torch.bfloat16)
    elif bad == "bias":
        b = torch.randn(7, device="cuda", dtype=torch.bfloat16)
    elif bad == "cpu":
        x = x.cpu()
    with pytest.raises(RuntimeError, match="skinny_linear"):
        kcuda.skinny_linear(x, w, b)
    x0 = torch.randn(3, 64, device="cuda", dtype=torch.bfloat16)  # and the op still works afterwards
    w0 = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    check(kcuda.skinny_linear(x0, w0, None), x0, w0, None)


# ------------------------------------------------------------------------ folded elementwise modes
MODES = {  # name: (x_ss, glu, resid, next_norm)
    "scale": (True, False, False, False), "glu": (False, True, False, False),
    "scale_glu": (True, True, False, False), "resid": (False, False, True, False),
    "resid_norm": (False, False, True, True), "scale_resid": (True, False, True, True),
}


def mode_case(mode, m, n, k, dtype, device, g):
    """x, w, bias and the mode's keyword arguments (x_ss as a producer writes it: sums of 16 columns)."""
    use_ss, glu, use_resid, use_norm = MODES[mode]
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    w = torch.randn(2 * n if glu else n, k, device=device, dtype=dtype, generator=g) / k ** 0.5
    bias = torch.randn(w.shape[0], device=device, dtype=dtype, generator=g) if n % 2 else None
    kw = {"glu": glu}
    if use_ss:
        h = torch.randn(m, k, device=device, dtype=dtype, generator=g) * 3  # the norm's input: x is h * norm_w
        ss = torch.nn.functional.pad(h.float().pow(2), (0, -k % 16)).view(m, -1, 16).sum(-1)
        kw.update(x_ss=ss.contiguous(), eps=1e-5)
    if use_resid:
        kw["resid"] = torch.randn(m, w.shape[0], device=device, dtype=dtype, generator=g)
    if use_norm:
        kw["next_norm"] = (torch.rand(w.shape[0], device=device, generator=g) + 0.5).to(dtype)
    return x, w, bias, kw


def check_mode(got, x, w, bias, kw):
    """got against the float64 math, within the bound of each rounding the kernel makes (module docstring)."""
    dtype, k = x.dtype, x.shape[1]
    eps, e32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    x64, w64 = x.double(), w.double()
    b64 = 0 if bias is None else bias.double()
    r = 1.0
    p = 0
    if kw.get("x_ss") is not None:
        r = torch.rsqrt(kw["x_ss"].double().sum(-1, keepdim=True) / k + kw["eps"])
        p = kw["x_ss"].shape[1]
    y = r * (x64 @ w64.T) + b64  # the pre-rounding sum
    tol = eps * y.abs() + (2 * k + p + 4) * e32 * (r * (x64.abs() @ w64.abs().T) + abs(b64))
    if kw.get("glu"):
        half = w.shape[0] // 2
        g64, u64, tg, tu = y[:, :half], y[:, half:], tol[:, :half], tol[:, half:]
        s64 = g64 * torch.sigmoid(g64)
        ts = 1.1 * tg + eps * (s64.abs() + 1.1 * tg)  # silu is 1.1-Lipschitz; then its rounding
        want = s64 * u64
        tol = ts * (u64.abs() + tu) + s64.abs() * tu + eps * (s64.abs() + ts) * (u64.abs() + tu)
    elif kw.get("resid") is not None:
        got, ss, hn = got
        want = y + kw["resid"].double()
        tol = tol + eps * (want.abs() + tol)  # the add's rounding
        assert ss.dtype == torch.float32 and ss.shape[0] == x.shape[0]  # (the kernel: [M, ceil(N / 16)])
        own = got.double().pow(2).sum(-1)
        assert ((ss.double().sum(-1) - own).abs() <= 2 * w.shape[0] * e32 * own).all()
        if kw.get("next_norm") is not None:  # one rounding of an exact product: torch's bf16 multiply
            assert torch.equal(hn, kw["next_norm"] * got)
        else:
            assert hn is None
    else:
        want = y
    assert got.shape == want.shape and got.dtype == dtype and torch.isfinite(got).all()
    err = (got.double() - want).abs()
    assert (err <= tol).all(), f"max error {err.max():.3e}, worst margin {(err - tol).max():.3e}"


@pytest.mark.parametrize("mode", list(MODES))
def test_linear_ref_modes_meet_the_bound(mode):
    """The twin in fp32 on the CPU against the float64 math (the bound above, fp32 as the dtype)."""
    g = torch.Generator().manual_seed(zlib.crc32(mode.encode()))
    x, w, bias, kw = mode_case(mode, 3, 24, 40, torch.float32, "cpu", g)
    check_mode(get_backend("cpu").linear(x, w, bias, **kw), x, w, bias, kw)


def test_linear_ref_scale_is_the_models_rmsnorm():
    """x_ss mode on x = h * norm_w is RMSNorm(h) @ w.T (fp32: the rounding orders agree to ~1e-6)."""
    g = torch.Generator().manual_seed(5)
    h, norm_w, w = torch.randn(3, 48, generator=g), torch.rand(48, generator=g) + 0.5, torch.randn(16, 48, generator=g)
    got = linear_ref(h * norm_w, w, x_ss=h.pow(2).sum(-1, keepdim=True), eps=1e-6)
    torch.testing.assert_close(got, F.linear(add_rmsnorm_ref(h, None, norm_w, 1e-6)[0], w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["k", "ss_rows", "glu_odd", "glu_resid", "resid", "norm_alone", "norm_shape"])
def test_linear_ref_modes_reject_bad_shapes(bad):
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    kw = {}
    if bad == "k":
        x = torch.randn(2, 15)
    elif bad == "ss_rows":
        kw = {"x_ss": torch.ones(3, 1)}
    elif bad == "glu_odd":
        w, kw = torch.randn(7, 16), {"glu": True}
    elif bad == "glu_resid":
        kw = {"glu": True, "resid": torch.ones(2, 8)}
    elif bad == "resid":
        kw = {"resid": torch.ones(2, 7)}
    elif bad == "norm_alone":
        kw = {"next_norm": torch.ones(8)}
    else:
        kw = {"resid": torch.ones(2, 8), "next_norm": torch.ones(7)}
    with pytest.raises(ValueError, match="linear"):
        linear_ref(x, w, None, **kw)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(1, 8), (17, 72), (257, 1000), (4096 + 24, 4096 + 8), (96, 14336)])
def test_skinny_linear_modes_match_reference(dtype, mode, m, n, k):
    g = torch.Generator(device="cuda").manual_seed(zlib.crc32(f"{dtype}{mode}{m}{n}{k}".encode()))
    x, w, bias, kw = mode_case(mode, m, n, k, dtype, "cuda", g)
    for stages in (0, 3, 6):
        check_mode(kcuda.skinny_linear(x, w, bias, stages=stages, **kw), x, w, bias, kw)
    check_mode(linear_ref(x, w, bias, **kw), x, w, bias, kw)  # the twin meets the same bound


@gpu_test
def test_skinny_linear_chain_in_a_cuda_graph():
    """A decode step's chain, each kernel reading what the one before it wrote (o -> gate/up -> down -> the
    next qkv), launched back to back (on sm_90 with programmatic dependent launch: each starts while the
    previous one finishes and waits for it before reading): captured once, replayed on new inputs, each
    output against the float64 math on the kernel's own inputs (a kernel that read its input early misses)."""
    dtype, m, hid, inter = torch.bfloat16, 3, 1024 + 8, 2816
    g = torch.Generator(device="cuda").manual_seed(11)
    ws = [torch.randn(n, k, device="cuda", dtype=dtype, generator=g) / k ** 0.5
          for n, k in ((hid, hid), (2 * inter, hid), (hid, inter), (3 * hid, hid))]
    n1, n2 = ((torch.rand(hid, device="cuda", generator=g) + 0.5).to(dtype) for _ in range(2))
    o = torch.randn(m, hid, device="cuda", dtype=dtype)
    resid = torch.randn(m, hid, device="cuda", dtype=dtype)

    def chain():
        h = kcuda.skinny_linear(o, ws[0], resid=resid, next_norm=n1)
        mid = kcuda.skinny_linear(h[2], ws[1], x_ss=h[1], eps=1e-6, glu=True)
        h2 = kcuda.skinny_linear(mid, ws[2], resid=h[0], next_norm=n2)
        return h, mid, h2, kcuda.skinny_linear(h2[2], ws[3], x_ss=h2[1], eps=1e-6)

    chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain()
    for _ in range(3):
        o.copy_(torch.randn_like(o))
        resid.copy_(torch.randn_like(resid))
        graph.replay()
        torch.cuda.synchronize()
        h, mid, h2, qkv = outs
        check_mode(h, o, ws[0], None, {"resid": resid, "next_norm": n1})
        check_mode(mid, h[2], ws[1], None, {"x_ss": h[1], "eps": 1e-6, "glu": True})
        check_mode(h2, mid, ws[2], None, {"resid": h[0], "next_norm": n2})
        check_mode(qkv, h2[2], ws[3], None, {"x_ss": h2[1], "eps": 1e-6})


@gpu_test
@pytest.mark.parametrize("bad", ["glu_resid", "glu_odd", "ss_dtype", "ss_rows", "resid", "norm_alone", "norm_shape"])
def test_skinny_linear_bad_mode_input_raises(bad):
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    ones = dict(device="cuda", dtype=torch.bfloat16)
    args = dict(x_ss=None, glu=False, resid=None, next_norm=None)
    if bad == "glu_resid":
        args.update(glu=True, resid=torch.ones(2, 8, **ones))
    elif bad == "glu_odd":
        w, args["glu"] = torch.randn(7, 64, **ones), True
    elif bad == "ss_dtype":
        args["x_ss"] = torch.ones(2, 4, device="cuda", dtype=torch.float16)
    elif bad == "ss_rows":
        args["x_ss"] = torch.ones(3, 4, device="cuda")
    elif bad == "resid":
        args["resid"] = torch.ones(2, 7, **ones)
    elif bad == "norm_alone":
        args["next_norm"] = torch.ones(8, **ones)
    else:
        args.update(resid=torch.ones(2, 8, **ones), next_norm=torch.ones(9, **ones))
    with pytest.raises(RuntimeError, match="skinny_linear"):
        torch.ops.ltengine.skinny_linear(x, w, None, 0, args["x_ss"], 1e-6, args["glu"], args["resid"],
                                         args["next_norm"])
    check(kcuda.skinny_linear(x, w, None), x, w, None)  # the op still works afterwards
