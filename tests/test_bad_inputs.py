"""The bad-input matrix: every way the public API can be misused gets a clear exception naming the problem
(or a documented, tested behaviour), and no failure leaves a model half-modified.

Checkpoint corruption cases live in test_serialization.py; this file covers the rest of the API.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import quanto_fx
from quanto_fx import PackedQTensor, QTensor, calibration, freeze, qint4, qint8, quantize
from quanto_fx.nn import QConv2d, QLinear, QModuleMixin
from quanto_fx.tensor import int8_mm
from quanto_fx.tensor.integer_matmul import MAX_K

from .utils import dequantized, sqnr


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def nan_weight_model(model=None):
    """``model`` (default: ``mlp()``) with a NaN in its LAST layer's weight: a freeze that went layer by layer
    would have frozen the earlier layers before failing."""
    model = mlp() if model is None else model
    with torch.no_grad():
        model[-1].weight[0, 0] = float("nan")
    return model


def calibrated(model, x):
    with torch.no_grad(), calibration():
        model(x)
    return model


def x_with(value):
    x = torch.randn(4, 8)
    x[1, 1] = value
    return x


# (name, action, expected exception, message pattern)
ERRORS = [
    ("unknown weight qtype", lambda: quantize(mlp(), weights="qint9"), ValueError, "unknown qtype 'qint9'"),
    ("mistyped qtype", lambda: quantize(mlp(), weights="int8"), ValueError, "unknown qtype 'int8'.*qint8"),
    ("torch dtype as qtype", lambda: quantize(mlp(), activations=torch.int8), ValueError, "unknown qtype"),
    ("int4 weights with int8 activations", lambda: quantize(mlp(), weights=qint4), ValueError, "weight-only"),
    ("group size not dividing features", lambda: quantize(mlp(), weights=qint4, activations=None, group_size=64),
     ValueError, "cannot quantize .0.: group_size 64 does not divide the 8 input features"),
    ("group size not a power of two", lambda: quantize(mlp(), weights=qint4, activations=None, group_size=12),
     ValueError, r"^group_size must be a power of two >= 16, got 12$"),  # the call's setting: no layer named
    ("everything excluded", lambda: quantize(mlp(), exclude="*"),
     ValueError, "found no module to quantize: `exclude` excludes every supported one"),
    ("unsupported activations", lambda: quantize(mlp(), activations=qint4), ValueError, "activations=qint4"),
    ("bad activation mode", lambda: quantize(mlp(), activation_mode="per-token"), ValueError, "activation_mode"),
    ("include matches nothing", lambda: quantize(mlp(), include="encoder.*"), ValueError, "match no module"),
    ("exclude matches nothing", lambda: quantize(mlp(), exclude="9"), ValueError, "match no module"),
    ("quantized twice", lambda: quantize(quantize(mlp())), ValueError, "already quantized"),
    ("qmodule from a qmodule", lambda: QLinear.from_module(QLinear.from_module(torch.nn.Linear(2, 2))),
     ValueError, "already quantized"),
    ("freeze before quantize", lambda: freeze(mlp()), ValueError, "call quantize"),
    ("save a float model", lambda: quanto_fx.save(mlp(), "x.safetensors"), ValueError, "no quantized module"),
    ("calibration without samples", lambda: _calibrate_nothing(), RuntimeError, "saw no sample"),
    ("NaN activation in calibration", lambda: calibrated(quantize(mlp()), x_with(float("nan"))),
     ValueError, "non-finite"),
    ("+Inf activation in calibration", lambda: calibrated(quantize(mlp()), x_with(float("inf"))),
     ValueError, "non-finite"),
    ("NaN activation at inference", lambda: calibrated(quantize(mlp()), torch.randn(4, 8))(x_with(float("nan"))),
     ValueError, "non-finite"),
    ("-Inf activation, dynamic", lambda: quantize(mlp(), activation_mode="dynamic")(x_with(float("-inf"))),
     ValueError, "non-finite"),
    ("NaN weight at freeze", lambda: freeze(quantize(nan_weight_model(), activations=None)),
     ValueError, r"^cannot freeze '2': its weight contains non-finite values \(NaN or Inf\)"),
    ("NaN weight at forward", lambda: quantize(nan_weight_model(), activations=None)(torch.randn(2, 8)),
     ValueError, r"^the weight of this QLinear contains non-finite values"),
    ("NaN int4 weight at forward",
     lambda: quantize(nan_weight_model(torch.nn.Sequential(torch.nn.Linear(16, 4))), qint4, None, group_size=16)(
         torch.randn(2, 16)
     ),
     ValueError, r"^the weight of this QLinear contains non-finite values"),
    ("NaN in QTensor.quantize", lambda: QTensor.quantize(x_with(float("nan"))), ValueError, "non-finite"),
    ("NaN with explicit scale", lambda: QTensor.quantize(x_with(float("nan")), scale=torch.tensor(0.1)),
     ValueError, "non-finite"),
    ("zero scale", lambda: QTensor.quantize(torch.randn(3), scale=torch.tensor(0.0)), ValueError, "positive"),
    ("NaN scale", lambda: QTensor(torch.zeros(3, dtype=torch.int8), torch.tensor(float("nan"))),
     ValueError, "non-finite"),
    ("integer input to quantize", lambda: QTensor.quantize(torch.arange(4)), TypeError, "floating point"),
    ("int64 storage", lambda: QTensor.quantize(torch.randn(3), torch.int64), ValueError, "torch.int64"),
    ("unknown qtype name", lambda: QTensor.quantize(torch.randn(3), "qint7"), ValueError, "unknown qtype 'qint7'"),
    ("static float8 activations", lambda: quantize(mlp(), quanto_fx.qfloat8_e4m3fn, quanto_fx.qfloat8_e4m3fn),
     ValueError, "needs activation_mode='dynamic'"),
    ("float8 activations, int8 weights",
     lambda: quantize(mlp(), activations=quanto_fx.qfloat8_e4m3fn, activation_mode="dynamic"),
     ValueError, "needs float8 weights, not qint8"),
    ("axis out of range", lambda: QTensor.quantize(torch.randn(3, 4), axis=5), ValueError, "axis"),
    ("axis on a 0-d tensor", lambda: QTensor.quantize(torch.tensor(2.0), axis=0), ValueError, "axis"),
    ("scale shape mismatch", lambda: QTensor(torch.zeros(3, 2, dtype=torch.int8), torch.ones(3), axis=0),
     ValueError, r"must have shape \(3, 1\)"),
    ("scale on another device", lambda: QTensor(torch.zeros(3, dtype=torch.int8), torch.ones((), device="meta")),
     ValueError, "scale is on meta"),
    ("input on another device", lambda: quantize(mlp())(torch.randn(2, 8, device="meta")),
     ValueError, "is on (cpu|meta) but"),
    ("matmul shape mismatch", lambda: QTensor.quantize(torch.randn(3, 4)) @ QTensor.quantize(torch.randn(5, 2)),
     ValueError, "incompatible shapes"),
    ("K beyond the int32-exact bound", lambda: int8_mm(torch.zeros(1, MAX_K + 1, dtype=torch.int8),
                                                       torch.zeros(MAX_K + 1, 1, dtype=torch.int8)),
     ValueError, "exceeds 131071"),
    ("int32 add overflow", lambda: QTensor(torch.full((2,), 2**31 - 1, dtype=torch.int32), torch.tensor(1.0))
     + QTensor(torch.ones(2, dtype=torch.int32), torch.tensor(1.0)), OverflowError, "overflows"),
    ("in-place op on a QTensor", lambda: QTensor.quantize(torch.randn(3)).add_(1.0), NotImplementedError,
     "in place"),
    ("weight-only dtype mix", lambda: quantize(mlp(), activations=None)(torch.randn(2, 8, dtype=torch.float64)),
     RuntimeError, "^mat1 and mat2 must have the same dtype, but got Double and Float$"),
    ("unknown backend option", lambda: quanto_fx.backend.BackendOptions.from_dict({"fuse": True}),
     ValueError, "unknown quanto backend option"),
    ("backend option of the wrong type", lambda: quanto_fx.backend.BackendOptions.from_dict({"fusion": "yes"}),
     TypeError, "True, False or .auto."),
    ("bad calibration momentum", lambda: calibration(momentum=1.0).__enter__(), ValueError, "momentum"),
    ("calibrate over zero batches", lambda: quanto_fx.calibrate(quantize(mlp()), [torch.randn(2, 8)], max_batches=0),
     ValueError, "max_batches"),
    ("layer report of a float model", lambda: quanto_fx.layer_report(mlp(), mlp(), torch.randn(2, 8)),
     ValueError, "no quantized module"),
]  # fmt: skip


def _calibrate_nothing():
    with calibration():
        pass


@pytest.mark.parametrize("name, action, error, pattern", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_input_raises_a_clear_error(name, action, error, pattern, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=pattern):
        action()


def test_failed_quantize_leaves_the_model_as_it_was():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    for kwargs, message in (
        ({"weights": "qint9"}, "unknown qtype 'qint9'"),
        ({"include": "nothing"}, r"include pattern\(s\) \['nothing'\] match no module name"),
        ({"activations": qint4}, "activations=qint4 is not supported"),
    ):
        with pytest.raises(ValueError, match=message):
            quantize(model, **kwargs)
    assert not any(isinstance(m, QModuleMixin) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_quantize_failing_on_a_later_layer_leaves_the_earlier_ones_float():
    # The argument checks pass and layer 0 is quantizable; only layer 1's 32 features refuse group_size 64.
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    weights = [layer.weight for layer in model]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="^cannot quantize '1': group_size 64 does not divide the 32 input"):
        quantize(model, weights=qint4, activations=None, group_size=64)
    assert [type(layer) for layer in model] == [torch.nn.Linear, torch.nn.Linear]
    assert all(layer.weight is w for layer, w in zip(model, weights))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("weights", [qint8, qint4])
def test_failed_freeze_leaves_every_weight_float(weights):
    model = nan_weight_model(
        torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    )
    before = copy.deepcopy(model.state_dict())
    model = quantize(model, weights=weights, activations=None, group_size=16)
    message = r"^cannot freeze '2': its weight contains non-finite values \(NaN or Inf\); cannot quantize it$"
    with pytest.raises(ValueError, match=message):
        freeze(model)
    assert not any(m.frozen for m in model.modules() if isinstance(m, QModuleMixin))
    assert not any(isinstance(t, (QTensor, PackedQTensor)) for t in model.state_dict().values())
    assert all(p.requires_grad for p in model.parameters())
    state = model.state_dict()
    for key, value in before.items():  # the float values, NaN included, untouched
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, equal_nan=True)
    with torch.no_grad():  # once the NaN is gone, the same model freezes, every layer
        model[2].weight[0, 0] = 0.0
    freeze(model)
    assert isinstance(model[0].weight, QTensor if weights == qint8 else PackedQTensor)
    assert isinstance(model[2].weight, QTensor if weights == qint8 else PackedQTensor)


# -- documented behaviours ---------------------------------------------------------------------------------


def test_all_zero_weights_and_inputs_give_exact_zeros():
    model = torch.nn.Linear(8, 4)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    q = freeze(quantize(model, activation_mode="dynamic"))
    assert torch.equal(q(torch.zeros(3, 8)), torch.zeros(3, 4))
    assert torch.equal(q(torch.randn(3, 8)), torch.zeros(3, 4))


def test_all_zero_calibration_batches_leave_the_scale_uncalibrated():
    q = quantize(mlp())
    with torch.no_grad(), calibration():
        q(torch.zeros(4, 8))
    assert q[0].in_scale.item() == 1.0  # no range information: still the sentinel
    with torch.no_grad(), calibration():
        q(torch.zeros(4, 8))
        q(torch.ones(4, 8))
    assert q[0].in_scale.item() == pytest.approx(1 / 127)


def test_empty_and_zero_dim_tensors():
    empty = QTensor.quantize(torch.empty(0, 4))
    assert empty.shape == (0, 4) and dequantized(empty).numel() == 0
    scalar = QTensor.quantize(torch.tensor(-2.5))
    assert scalar.shape == () and dequantized(scalar).item() == pytest.approx(-2.5)
    q = freeze(quantize(mlp(), activation_mode="dynamic"))
    assert q(torch.empty(0, 8)).shape == (0, 4)


def test_non_contiguous_and_channels_last_inputs_match_contiguous():
    q = calibrated(quantize(mlp()), torch.randn(16, 8))
    x = torch.randn(8, 16).t()  # non-contiguous (16, 8)
    assert not x.is_contiguous()
    assert torch.equal(q(x)._data, q(x.contiguous())._data)
    conv = QConv2d.from_module(torch.nn.Conv2d(3, 4, 3, padding=1))
    img = torch.randn(2, 3, 8, 8)
    calibrated(conv, img)
    channels_last = img.to(memory_format=torch.channels_last)
    assert torch.equal(conv(channels_last)._data, conv(img)._data)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_models_in_every_float_dtype(dtype):
    model = mlp().to(dtype)
    x = torch.randn(16, 8, dtype=dtype)
    ref = model(x)
    for mode in ("static", "dynamic"):
        q = quantize(model, activation_mode=mode, inplace=False)
        if mode == "static":
            calibrated(q, x)
        out = dequantized(q(x))
        assert out.dtype == dtype
        assert sqnr(ref, out) > (20 if dtype in (torch.float16, torch.bfloat16) else 25)


def test_odd_shapes_int_mm_cannot_take_natively_are_exact():
    for m, k, n in [(1, 1, 1), (3, 7, 5), (17, 9, 33)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8)
        assert torch.equal(int8_mm(a, b).long(), a.long() @ b.long())


def test_saturation_is_symmetric_and_rounding_is_half_to_even():
    q = QTensor.quantize(
        torch.tensor([-1000.0, -127.5, -0.5, 0.5, 1.5, 126.5, 1000.0]), scale=torch.tensor(1.0)
    )
    assert q._data.tolist() == [-127, -127, 0, 0, 2, 126, 127]


def test_a_bias_beyond_int32_at_the_accumulator_scale_gives_a_float_result():
    quanto_fx.reset_fallback_counts()
    x = QTensor.quantize(torch.randn(2, 4), scale=torch.tensor(1e-3))
    w = QTensor.quantize(torch.randn(3, 4), scale=torch.tensor(1e-3))
    bias = torch.full((3,), 1e4)  # bias / 1e-6 is far beyond int32: it would saturate or wrap
    out = F.linear(x, w, bias)
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, F.linear(dequantized(x), dequantized(w), bias))
    assert quanto_fx.fallback_counts() == {"int32_bias": 1}


def test_qint8_weights_stay_within_the_symmetric_range():
    q = freeze(quantize(mlp(), weights=qint8, activations=None))
    assert q[0].weight._data.min() >= -127
