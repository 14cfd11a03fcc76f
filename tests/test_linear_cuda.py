"""The decode step's linear kernel (csrc/skinny_linear.cu) against its twin, ``F.linear``.

Tolerance derived from the arithmetic: the kernel rounds an fp32 sum of K products once to the output
dtype, so against the float64 product ref64

    |out - ref64| <= eps(dtype) * |ref64| + 2 K eps(fp32) * (|x| @ |w|.T + |bias|)

(eps(dtype) is twice the half-ulp of the final rounding; the second term bounds any fp32 summation
order). ``F.linear`` in the same dtype must meet the same bound without a bias, which checks the bound
itself (with one, cuBLAS's epilogue may round the product to the dtype before adding it). Inputs
are fresh random normals per case, with odd M, N and K; rows past N and batch rows past M must not be
touched (the output is checked in full, its neighbours in a larger buffer are not written).
CPU part: the backend's linear is ``F.linear`` there. GPU part skipped without a GPU or the CUDA build.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import gpu_test

from ltengine.kernels import cuda as kcuda
from ltengine.kernels import get_backend
from ltengine.kernels.linear import linear_cuda


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
