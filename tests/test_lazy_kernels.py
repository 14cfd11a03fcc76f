"""The Triton lazy-ratio kernel (kernels/lazy_score.py) against its reference, ``lazy.lazy_ratio``.

GPU only (skipped with a reason elsewhere). Inputs are fresh random tensors each run, with odd sizes;
the reference (``lazy.kept_mass``, the per-row mass behind ``lazy_ratio``) runs in fp32 on the very
same (bf16/fp16-rounded) values, so the only difference is the
summation order of fp32 accumulators: per-row kept mass within 2e-5 absolute (the masses are in [0, 1]).
"""
import pytest
import torch

from ltengine.kernels import get_backend, lazy_score
from ltengine.lazy import kept_mass, lazy_ratio

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not lazy_score.available(), reason="needs a CUDA GPU and triton (lazy-ratio kernel)"),
]
TOL = 2e-5


CASES = [  # (h_q, h_kv, d, t, p, sink, window)
    (4, 4, 64, 1, 1, 0, 1),
    (8, 2, 128, 5, 5, 4, 1),
    (8, 1, 64, 100, 17, 4, 17),
    (32, 8, 128, 1000, 64, 4, 1020),
    (12, 4, 64, 4097, 64, 0, 17),
    (28, 4, 128, 3001, 33, 4, 256),
    (32, 8, 128, 32768, 64, 4, 1020),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "hq{}-hkv{}-d{}-t{}-p{}-s{}-w{}".format(*c))
def test_lazy_mass_matches_reference(case, dtype):
    h_q, h_kv, d, t, p, sink, window = case
    q = torch.randn(h_q, t, d, device="cuda").to(dtype)[:, t - p:]  # a strided view, as the runner passes
    k = torch.randn(t, h_kv, d, device="cuda").to(dtype).transpose(0, 1)
    scale = d ** -0.5 * 3  # sharper than random attention, so the window matters
    got = lazy_score.lazy_mass_triton(q, k, sink, window, scale)
    ref = kept_mass(q, k, sink, window, scale)
    assert got.shape == ref.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    r = lazy_score.lazy_ratio_triton(q, k, sink, window, scale)
    assert r == pytest.approx(lazy_ratio(q, k, sink, window, scale), abs=TOL)


def test_backend_picks_the_kernel_and_reference_can_be_forced():
    be = get_backend("cuda")
    assert be.impl_for("score_ratio", torch.bfloat16, 128) == "triton"
    assert get_backend("cuda", prefer="reference").impl_for("score_ratio", torch.bfloat16, 128) == "reference"
    q = torch.randn(8, 16, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 300, 64, device="cuda", dtype=torch.bfloat16)
    assert be.scorer("ratio")(q, k, 4, 32, 0.2) == pytest.approx(lazy_ratio(q, k, 4, 32, 0.2), abs=TOL)
