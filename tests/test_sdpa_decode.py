"""The SDPA decode kernels (kernels/sdpa.py, the reference runner's fast path) against their PyTorch
twins on fresh random inputs: odd sizes, GQA, empty rows, rows of only sink tokens, wrapped rings.

Tolerance from the dtype's rounding: the twin run in fp64 is the truth; the kernel's error may be at
most 4x the twin's own error at the tested dtype, plus a few ulps of that dtype."""
from __future__ import annotations

import pytest
import torch

from ltengine.kernels import get_backend, sdpa
from ltengine.kernels.reference import decode_full_ref, decode_sink_window_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _err(x, y):
    return (x.double() - y.double()).abs().max().item()


def _inputs(b, t, h_q, h_kv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h_q, d, generator=g).to(dtype)
    k = torch.randn(b, t, h_kv, d, generator=g).to(dtype)
    v = torch.randn(b, t, h_kv, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,t,h_q,h_kv,d", [(1, 1, 1, 1, 8), (3, 37, 6, 2, 24), (2, 130, 8, 8, 64), (4, 5, 9, 3, 80)])
def test_decode_full(dtype, b, t, h_q, h_kv, d):
    q, k, v = _inputs(b, t, h_q, h_kv, d, dtype, seed=b * t + d)
    lengths = torch.randint(0, t + 1, (b,), generator=torch.Generator().manual_seed(t))
    lengths[0] = t
    scale = d ** -0.5
    truth = decode_full_ref(q.double(), k.double(), v.double(), lengths, scale)
    twin = decode_full_ref(q, k, v, lengths, scale)
    got = sdpa.decode_full(q, k, v, lengths, scale)
    ulp = torch.finfo(dtype).eps
    assert got.dtype == dtype and got.shape == q.shape
    assert _err(got, truth) <= 4 * _err(twin, truth) + 4 * ulp
    for i, n in enumerate(lengths.tolist()):
        if n == 0:
            assert torch.all(got[i] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sink,window", [(1, 1), (4, 13), (3, 64)])
def test_decode_sink_window(dtype, sink, window):
    b, h_q, h_kv, d = 5, 6, 3, 40
    q, k, v = _inputs(b, sink + window, h_q, h_kv, d, dtype, seed=sink * window)
    # empty, only sink tokens, a partly filled ring, an exactly full one, a wrapped one
    lengths = torch.tensor([0, max(1, sink - 1), sink + window // 2 + 1, sink + window, 3 * (sink + window) + 1])
    scale = d ** -0.5
    truth = decode_sink_window_ref(q.double(), k.double(), v.double(), lengths, sink, window, scale)
    twin = decode_sink_window_ref(q, k, v, lengths, sink, window, scale)
    got = sdpa.decode_sink_window(q, k, v, lengths, sink, window, scale)
    assert _err(got, truth) <= 4 * _err(twin, truth) + 4 * torch.finfo(dtype).eps
    assert torch.all(got[0] == 0)


def test_chosen_before_the_reference_on_cpu():
    be = get_backend("cpu")
    assert be.impl_for("decode_full", torch.float32, 64) == "sdpa"
    assert be.impl_for("decode_sink_window", torch.bfloat16, 64) == "sdpa"
    assert get_backend("cpu", prefer="reference").impl_for("decode_full", torch.float32, 64) == "reference"
    with pytest.raises(ValueError, match="sink \\+ window"):
        sdpa.decode_sink_window(*_inputs(1, 10, 2, 2, 8, torch.float32, 0), torch.tensor([3]), 2, 3, 1.0)
