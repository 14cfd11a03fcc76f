"""The Triton sink + window prefill kernel (``kernels/prefill.py``) against its PyTorch twin.

Tolerance (flash-attention style): ref64 = ``prefill_sink_window_ref`` on float64 copies of the inputs,
ref_lp = the same twin in the input dtype; the kernel passes when

    max|out - ref64| <= 2 * max|ref_lp - ref64| + eps * max|ref64|,   eps = finfo(dtype).eps (1e-5 for fp32)

(fp32: the kernel's dots are IEEE, so its error is fp32 summation roundoff over up to sink + window
keys, as the twin's, whose own error can be smaller by luck: hence the 1e-5 floor, as
tests/test_paged_cuda.py). Inputs
are fresh random normals per case, odd lengths and head dims, GQA 1:1 to 8:1, windows of 1 and past the
prompt, sinks past the prompt. Runs on a CUDA GPU; on CPU only under ``TRITON_INTERPRET=1`` with Triton
installed (fp32 / fp16: the interpreter's ``tl.dot`` is wrong for bf16), else skipped with the reason.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

from ltengine.kernels import prefill

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(prefill.triton is None, reason="needs triton"),
              pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                 reason="needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU)")]

# (batch, T, H_q, H_kv, D, sink, window)
SHAPES = [(1, 1, 4, 2, 64, 4, 16), (2, 77, 4, 2, 16, 3, 13), (1, 130, 6, 2, 24, 4, 50), (1, 301, 2, 1, 64, 1, 1),
          (1, 45, 4, 4, 32, 100, 10), (3, 19, 3, 1, 80, 2, 40), (1, 1000, 8, 1, 128, 4, 127)]
BIG = [(1, 3001, 32, 8, 128, 4, 1020), (2, 2500, 8, 2, 64, 16, 255)]


def _inputs(shape, dtype):
    b, t, h_q, h_kv, d, sink, window = shape
    g = torch.Generator(device=DEVICE).manual_seed(zlib.crc32(repr((shape, dtype)).encode()))
    return [torch.randn(b, t, h, d, generator=g, device=DEVICE).to(dtype) for h in (h_q, h_kv, h_kv)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + ([] if DEVICE == "cpu" else BIG))
def test_triton_matches_twin(shape, dtype):
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes tl.dot wrongly for bf16; bf16 runs on the GPU")
    *_, d, sink, window = shape
    q, k, v = _inputs(shape, dtype)
    scale = d ** -0.5
    ref64 = prefill.prefill_sink_window_ref(q.double(), k.double(), v.double(), sink, window, scale)
    ref_lp = prefill.prefill_sink_window_ref(q, k, v, sink, window, scale)
    out = prefill.prefill_sink_window_triton(q, k, v, sink, window, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    err = float((out.double() - ref64).abs().max())
    ref_err = float((ref_lp.double() - ref64).abs().max())
    eps = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    tol = 2 * ref_err + eps * float(ref64.abs().max())
    assert err <= tol, f"{shape} {dtype}: kernel error {err:.3g} > {tol:.3g} (twin's own error {ref_err:.3g})"


def test_triton_reads_strided_inputs():
    """q/k/v as the model makes them: views of one fused projection, heads and tokens strided."""
    b, t, h_q, h_kv, d = 2, 200, 8, 2, 64
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    g = torch.Generator(device=DEVICE).manual_seed(7)
    fused = torch.randn(b, t, (h_q + 2 * h_kv) * d, generator=g, device=DEVICE).to(dtype)
    q, k, v = fused.split([h_q * d, h_kv * d, h_kv * d], dim=-1)
    q, k, v = q.view(b, t, h_q, d), k.view(b, t, h_kv, d), v.view(b, t, h_kv, d)
    out = prefill.prefill_sink_window_triton(q, k, v, 4, 33, d ** -0.5)
    ref = prefill.prefill_sink_window_ref(q.contiguous(), k.contiguous(), v.contiguous(), 4, 33, d ** -0.5)
    assert float((out.float() - ref.float()).abs().max()) <= 4 * torch.finfo(dtype).eps * float(v.abs().max())


@pytest.mark.skipif(DEVICE == "cpu", reason="engine on the GPU")
def test_engine_streaming_prefill_on_gpu_matches_cpu():
    """The paged runner on CUDA (the Triton kernel for streamed layers) gives the CPU reference runner's
    greedy tokens on a tiny fp32 model."""
    from conftest import SpacedIds, random_prompts, tiny_model
    from ltengine import Engine, LazyConfig

    lazy = LazyConfig(policy=(0, 2, 5, 7), sink=3, window=13, probe=16, streaming_prefill=True)
    ids = random_prompts(3, (300,))[0]
    cpu = Engine(tiny_model("llama", layers=8), SpacedIds(), lazy=lazy).generate(ids, max_new_tokens=16)
    engine = Engine(tiny_model("llama", layers=8).cuda(), SpacedIds(), lazy=lazy)
    assert engine.backend.impl_for("prefill_sink_window", torch.float32, 16) == "triton"
    out = engine.generate(ids, max_new_tokens=16)
    assert out.lazy_layers == [0, 2, 5, 7]
    assert out.token_ids == cpu.token_ids
