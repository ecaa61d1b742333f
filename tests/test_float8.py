"""float8 weights and activations: QTensor with float8 data, QLinear, the float8 GEMM op, checkpoints."""

import io

import pytest
import torch

import quanto_fx
from quanto_fx import QTensor, freeze, qfloat8_e4m3fn, qfloat8_e5m2, quantize
from quanto_fx.kernels import cpu_float8_mm
from quanto_fx.kernels.float8_mm import float8_mm, float8_mm_reference, scaled_mm_works
from quanto_fx.tensor import fallback_counts, reset_fallback_counts

from .utils import assert_close_to_max, sqnr

# Relative precision of the formats: e4m3 keeps 3 mantissa bits, e5m2 2 (half-ulp errors 1/16 and 1/8).
FORMATS = [(qfloat8_e4m3fn, 1 / 16), (qfloat8_e5m2, 1 / 8)]


@pytest.mark.parametrize("fqtype, half_ulp", FORMATS)
def test_float8_quantization_error_is_within_half_an_ulp(fqtype, half_ulp):
    w = torch.randn(16, 64)
    q = QTensor.quantize(w, fqtype, axis=0)
    assert q._data.dtype == fqtype.dtype and q.axis == 0
    assert q._scale.shape == (16, 1) and torch.allclose(
        q._data.float().abs().amax(1), torch.tensor(fqtype.qmax)
    )
    relative = (q.dequantize() - w).abs() / w.abs().clamp_min(1e-2 * float(w.abs().max()))
    assert float(relative.max()) <= half_ulp * (1 + 1e-3)


def test_float8_data_moves_with_layout_ops_and_computes_through_the_fallback():
    q = QTensor.quantize(torch.randn(4, 6), qfloat8_e4m3fn, axis=0)
    reset_fallback_counts()
    moved = q.t().contiguous().t()
    assert isinstance(moved, QTensor) and moved._data.dtype == torch.float8_e4m3fn
    assert fallback_counts() == {}
    torch.testing.assert_close(q + q, q.dequantize() * 2)  # the int8 add handler must not see float8 data
    assert fallback_counts() == {"add": 1}


def float8_mm_error(dtype: torch.dtype, rows: int) -> float:
    """Relative error the float8_mm op may have against its float32 reference on this machine: the CPU
    kernel's float16 sums where it takes them, else float32 rounding."""
    if cpu_float8_mm.supports(1) and cpu_float8_mm.path(dtype, rows).startswith("float16"):
        return cpu_float8_mm.FLOAT16_ERROR
    return 1e-5


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float8_mm_matches_its_reference(dtype, rows):
    a = QTensor.quantize(torch.randn(rows, 64), qfloat8_e4m3fn, axis=0)
    b = QTensor.quantize(torch.randn(32, 64), qfloat8_e4m3fn, axis=0)
    bias = torch.randn(32)
    args = (a._data, b._data.t(), a._scale, b._scale.t(), bias, dtype)
    out = float8_mm(*args)
    expected = float8_mm_reference(*args)
    assert out.dtype == dtype
    # bf16: where the bias is added rounds differently
    tolerance = 1e-2 if dtype == torch.bfloat16 else float8_mm_error(torch.float8_e4m3fn, rows)
    assert_close_to_max(out, expected, tolerance)


@pytest.mark.skipif(not cpu_float8_mm.supports(1), reason="needs the CPU kernel library")
@pytest.mark.parametrize("per_tensor", [False, True])
def test_float8_mm_on_the_cpu_takes_the_float8_weight_kernel_not_scaled_mm(per_tensor, monkeypatch):
    """torch's CPU _scaled_mm converts float8 element by element (~2 ms for 384 x 1536 at M = 1, 80x the
    kernel's time): the op must not call it on the CPU, per-tensor weight scales included."""

    def refuse(*args, **kwargs):
        raise AssertionError("float8_mm called torch._scaled_mm on the CPU")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    a = QTensor.quantize(torch.randn(3, 96), qfloat8_e4m3fn, axis=0)
    b = QTensor.quantize(torch.randn(48, 96), qfloat8_e4m3fn, axis=None if per_tensor else 0)
    b_scale = b._scale if per_tensor else b._scale.t()
    args = (a._data, b._data.t(), a._scale, b_scale, torch.randn(48), torch.float32)
    assert_close_to_max(float8_mm(*args), float8_mm_reference(*args), float8_mm_error(torch.float8_e4m3fn, 3))


def test_float8_mm_refuses_integer_operands():
    a = torch.ones(2, 16, dtype=torch.int8)
    with pytest.raises(TypeError, match="2-d float8"):
        float8_mm(a, a.t(), torch.ones(()), torch.ones(()), None, torch.float32)


@pytest.mark.parametrize("which", ["a_scale (M,)", "b_scale (N, 1)"])
def test_float8_mm_refuses_scales_that_would_broadcast_along_the_wrong_axis(which):
    # square operands: an (M,) a_scale or (N, 1) b_scale has the right size but scales columns / rows
    a = QTensor.quantize(torch.randn(4, 4), qfloat8_e4m3fn, axis=0)
    a_scale, b_scale = a._scale, a._scale.t()
    if which.startswith("a_scale"):
        a_scale = a_scale.reshape(4)
    else:
        b_scale = b_scale.reshape(4, 1)
    with pytest.raises(ValueError, match=which.split()[0]):
        float8_mm(a._data, a._data.t(), a_scale, b_scale, None, torch.float32)


def test_scaled_mm_probe_answers_for_cpu():
    # torch 2.13's CPU build implements _scaled_mm; the probe must say so (else the reference runs silently).
    assert scaled_mm_works("cpu", torch.float32) is True


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))


@pytest.mark.parametrize("fqtype, min_sqnr", [(qfloat8_e4m3fn, 25.0), (qfloat8_e5m2, 20.0)])
@pytest.mark.parametrize("activations", [False, True])
def test_float8_models_track_float(fqtype, min_sqnr, activations):
    model, x = mlp(), torch.randn(6, 64)
    reference = model(x)
    settings = {"activations": fqtype, "activation_mode": "dynamic"} if activations else {"activations": None}
    q = freeze(quantize(model, weights=fqtype, inplace=False, **settings))
    assert q[0].weight._data.dtype == fqtype.dtype
    with torch.no_grad():
        out = q(x)
    # float8 activations add x's own float8 rounding (e4m3: 3 mantissa bits, ~25 dB alone): 4 dB of slack
    assert sqnr(reference, out) > min_sqnr - (4 if activations else 0)


def test_float8_checkpoints_round_trip_exactly(tmp_path):
    q = freeze(quantize(mlp(), weights=qfloat8_e4m3fn, activations=None, inplace=False))
    path = tmp_path / "f8.safetensors"
    quanto_fx.save(q, path)
    loaded = quanto_fx.load(path, mlp())
    assert torch.equal(loaded[0].weight._data.view(torch.uint8), q[0].weight._data.view(torch.uint8))
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["0.weight"]._data.dtype == torch.float8_e4m3fn
    x = torch.randn(2, 64)
    assert torch.equal(loaded(x), q(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"weights": qfloat8_e4m3fn, "activations": quanto_fx.qint8},
            "float8 weights take float8 activations",
        ),
        ({"weights": None, "activations": quanto_fx.qint8}, "QLinear with activations=qint8 needs quantized"),
        ({"weights": None, "activations": qfloat8_e4m3fn, "activation_mode": "dynamic"}, "needs quantized"),
    ],
)
def test_weight_and_activation_formats_that_do_not_pair_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize(mlp(), **kwargs)


def test_e5m2_by_e5m2_products_match_the_reference():
    a = QTensor.quantize(torch.randn(4, 32), qfloat8_e5m2, axis=0)
    b = QTensor.quantize(torch.randn(16, 32), qfloat8_e5m2, axis=0)
    args = (a._data, b._data.t(), a._scale, b._scale.t(), None, torch.float32)
    assert_close_to_max(float8_mm(*args), float8_mm_reference(*args), float8_mm_error(torch.float8_e5m2, 4))
