"""Property-based fuzzing of QTensor ops and quantized modules against float references.

CI runs a bounded number of examples; `pytest --runslow tests/test_fuzz.py` runs the long campaign.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quanto_fx import QTensor, calibration, freeze, quantize

from .utils import dequantized, sqnr

SHORT = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=2000, deadline=None, derandomize=False, suppress_health_check=list(HealthCheck))


@st.composite
def tensors(draw, min_dims=1, max_dims=3, max_side=12, allow_outliers=True):
    shape = draw(st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    magnitude = draw(st.sampled_from([1e-4, 1e-1, 1.0, 50.0, 1e4]))
    outliers = allow_outliers and draw(st.booleans())
    x = torch.randn(shape, generator=g) * magnitude
    if outliers:
        x.view(-1)[0] *= 100
    return x


def check_linear(x, w_rows, axis, bias):
    w = torch.randn(w_rows, x.shape[-1])
    qx, qw = QTensor.quantize(x), QTensor.quantize(w, axis=axis)
    b = torch.randn(w_rows) if bias else None
    out = F.linear(qx, qw, b)
    # exactly the float twin on the dequantized operands, up to float32 rounding and the int32 bias rounding
    ref = F.linear(dequantized(qx), dequantized(qw), b)
    step = (qx._scale * qw._scale).max()
    tol = step + 1e-5 * (dequantized(qx).abs() @ dequantized(qw).abs().t()).max() + 1e-6 * ref.abs().max()
    assert (dequantized(out) - ref).abs().max() <= tol


def check_module(x, mode):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[-1], 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    ref = model(x)
    q = quantize(model, activation_mode=mode, inplace=False)
    if mode == "static":
        with torch.no_grad(), calibration():
            q(x)
    q = freeze(q)
    out = dequantized(q(x))
    # int8 activations on inputs without outliers (outliers are the observers' business: test_calibration)
    assert sqnr(ref, out) > 20


def check_shape_ops(x):
    q = QTensor.quantize(x)
    ops = (
        lambda t: t.transpose(0, -1),
        lambda t: t.reshape(-1),
        lambda t: t[..., :1],
        lambda t: t.unsqueeze(0),
    )
    for op in ops:
        assert torch.equal(dequantized(op(q)), op(dequantized(q)))


@SHORT
@given(
    x=tensors(min_dims=2, max_dims=2),
    rows=st.integers(1, 9),
    axis=st.sampled_from([None, 0]),
    bias=st.booleans(),
)
def test_fuzz_linear(x, rows, axis, bias):
    check_linear(x, rows, axis, bias)


@SHORT
@given(x=tensors(min_dims=2, max_dims=3, allow_outliers=False), mode=st.sampled_from(["static", "dynamic"]))
def test_fuzz_quantized_modules(x, mode):
    check_module(x, mode)


@SHORT
@given(x=tensors())
def test_fuzz_shape_ops(x):
    check_shape_ops(x)


@pytest.mark.slow
@LONG
@given(
    x=tensors(min_dims=2, max_dims=2),
    rows=st.integers(1, 9),
    axis=st.sampled_from([None, 0]),
    bias=st.booleans(),
)
def test_long_fuzz_linear(x, rows, axis, bias):
    check_linear(x, rows, axis, bias)


@pytest.mark.slow
@LONG
@given(x=tensors(min_dims=2, max_dims=3, allow_outliers=False), mode=st.sampled_from(["static", "dynamic"]))
def test_long_fuzz_quantized_modules(x, mode):
    check_module(x, mode)


@pytest.mark.slow
@LONG
@given(x=tensors())
def test_long_fuzz_shape_ops(x):
    check_shape_ops(x)
