"""Quantized modules against their float twins (SQNR bounds), in every activation mode."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import prune
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from quanto_fx import QTensor, calibration, qint4, qint8, quantize
from quanto_fx.kernels.dynamic_mm import INT8_CPU_KERNEL_ERROR
from quanto_fx.nn import QConv2d, QLayerNorm, QLinear, QRMSNorm, qmodule_class_for

from .utils import (
    VNNI_TOLERANCE,
    WEIGHT_ONLY_TOLERANCE,
    assert_close_to_max,
    dequantized,
    relative_error,
    sqnr,
)

MODES = [("static", qint8), ("dynamic", qint8), ("weight-only", None)]


def qmodule(cls, module, mode, activations):
    return cls.from_module(
        module, activations=activations, activation_mode="static" if mode == "weight-only" else mode
    )


def calibrate(module, *inputs):
    with torch.no_grad(), calibration():
        for x in inputs:
            module(x)


@pytest.mark.parametrize("mode, activations", MODES)
def test_qlinear_matches_float(device, mode, activations):
    linear = torch.nn.Linear(64, 32).to(device)
    x = torch.randn(4, 10, 64, device=device)
    q = qmodule(QLinear, linear, mode, activations)
    assert q.weight is linear.weight and q.bias is linear.bias  # shared: QAT trains the float parameters
    if mode == "static":
        calibrate(q, x)
    out = q(x)
    if mode == "static":
        assert isinstance(out, QTensor) and out.qdtype == torch.int8 and out.axis is None
        assert torch.equal(out._scale, q.out_scale)
    else:
        assert type(out) is torch.Tensor
    assert out.shape == (4, 10, 32)
    assert sqnr(linear(x), dequantized(out)) > {"static": 30, "dynamic": 35, "weight-only": 38}[mode]


def test_qlinear_scales_are_one_until_calibrated():
    q = QLinear.from_module(torch.nn.Linear(8, 4))
    assert q.in_scale.item() == 1.0 and q.out_scale.item() == 1.0
    x = torch.randn(16, 8)
    calibrate(q, x)
    torch.testing.assert_close(q.in_scale, x.abs().max() / 127)


def test_qlinear_takes_an_int8_qtensor_input_as_is():
    q = QLinear.from_module(torch.nn.Linear(8, 4))
    x = torch.randn(16, 8)
    calibrate(q, x)
    qx = QTensor.quantize(x, scale=q.in_scale * 2)  # another scale than the layer's: kept, not requantized
    assert q.quantize_input(qx) is qx
    assert torch.equal(q(qx).dequantize(), q.quantize_output(F.linear(qx, q.qweight, q.bias)).dequantize())


def test_qlinear_uses_int32_bias_at_product_scale():
    linear = torch.nn.Linear(8, 4)
    q = QLinear.from_module(linear)
    x = torch.randn(5, 8)
    calibrate(q, x)
    acc = torch.nn.functional.linear(QTensor.quantize(x, scale=q.in_scale), q.qweight, linear.bias)
    assert acc.qdtype == torch.int32
    product_scale = (q.in_scale * q.qweight._scale).reshape(-1)
    expected = (
        QTensor.quantize(x, scale=q.in_scale)._data.long() @ q.qweight._data.long().t()
    ) + torch.round(linear.bias / product_scale).long()
    assert torch.equal(acc._data.long(), expected)


@pytest.mark.parametrize("mode, activations", MODES)
def test_qconv2d_matches_float(device, mode, activations):
    conv = torch.nn.Conv2d(3, 16, 3, padding=1, stride=2).to(device)
    x = torch.randn(2, 3, 12, 12, device=device)
    q = qmodule(QConv2d, conv, mode, activations)
    if mode == "static":
        calibrate(q, x)
    out = q(x)
    assert out.shape == (2, 16, 6, 6)
    assert sqnr(conv(x), dequantized(out)) > 30


@pytest.mark.parametrize("mode, activations", MODES)
def test_norms_match_float(device, mode, activations):
    x = torch.randn(3, 7, 32, device=device) * 3 + 1
    for norm in (torch.nn.LayerNorm(32), torch.nn.RMSNorm(32, eps=1e-6)):
        norm = norm.to(device)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        q = qmodule_class_for(norm).from_module(
            norm, activations=activations, activation_mode="static" if mode == "weight-only" else mode
        )
        if mode == "static":
            calibrate(q, x)
            assert isinstance(q(x), QTensor)
        assert sqnr(norm(x), dequantized(q(x))) > 35


def test_llama_rmsnorm_is_recognized_and_matches():
    config = LlamaConfig(hidden_size=32, rms_norm_eps=1e-5)
    norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    assert not isinstance(norm, torch.nn.RMSNorm)
    assert qmodule_class_for(norm) is QRMSNorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    q = QRMSNorm.from_module(norm, activations=None)
    assert q.eps == 1e-5
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(q(x), norm(x), rtol=1e-5, atol=1e-6)


def test_qlayernorm_registry_and_unsupported_qtypes():
    assert qmodule_class_for(torch.nn.LayerNorm(4)) is QLayerNorm
    assert qmodule_class_for(torch.nn.ReLU()) is None
    with pytest.raises(ValueError, match="weights=qint4 is weight-only"):
        QLinear.from_module(torch.nn.Linear(4, 4), weights=qint4)
    with pytest.raises(ValueError, match="activation_mode must be one of"):
        QLinear.from_module(torch.nn.Linear(4, 4), activation_mode="per_token")


def test_freeze_quantizes_weights_and_keeps_outputs():
    linear = torch.nn.Linear(32, 16)
    q = QLinear.from_module(linear, activations=None)
    x = torch.randn(4, 32)
    before = q(x)
    q.freeze()
    assert isinstance(q.weight, QTensor) and q.weight.qdtype == torch.int8 and not q.weight.requires_grad
    # Frozen inference runs the int8 weight-only kernel: same weight values, computed in bf16 on the CPU.
    assert_close_to_max(q(x), before, WEIGHT_ONLY_TOLERANCE)


@pytest.mark.parametrize("in_features", [48, 128])  # 128: the CPU kernel of int8_dynamic_mm
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_inference_runs_the_fused_kernels_with_the_training_path_results(mode, in_features, monkeypatch):
    import quanto_fx.nn.qlinear as qlinear_module

    linear = torch.nn.Linear(in_features, 24)
    x = torch.randn(3, 5, in_features)
    q = QLinear.from_module(linear, activation_mode=mode)
    if mode == "static":
        calibrate(q, x)
    q.freeze()
    training_path = q(x.requires_grad_())  # a gradient is needed: QTensor ops
    calls = []
    real = qlinear_module._fused_ops

    def spy(rows):
        calls.append(1)
        return real(rows)

    monkeypatch.setattr(qlinear_module, "_fused_ops", spy)
    with torch.no_grad():
        fused = q(x)
    assert calls, "inference did not use the fused kernels"
    if mode == "static":
        assert torch.equal(fused._data, training_path._data)
        assert torch.equal(fused._scale, training_path._scale)
    else:
        assert_close_to_max(fused, training_path.detach(), INT8_CPU_KERNEL_ERROR)


@pytest.mark.parametrize("wqtype", [qint8, qint4])
def test_weight_only_inference_under_a_torch_function_mode_calls_the_op_the_mode_sees(wqtype):
    """Eager inference calls the weight-only ops past ``__torch_function__``; with a TorchFunctionMode active
    (``torch.set_default_device`` pushes one) it calls the op overload, which the mode sees: the same op and
    outputs, not the float fallback that dequantizes the whole weight."""
    from torch.overrides import TorchFunctionMode

    class Recording(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.funcs = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.funcs.append(func)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    q = QLinear.from_module(torch.nn.Linear(128, 32), weights=wqtype, activations=None)
    q.freeze()
    op = torch.ops.quanto_fx.lowbit_weight_mm if wqtype is qint4 else torch.ops.quanto_fx.int8_weight_mm
    x = torch.randn(3, 128)
    with torch.no_grad():
        fused = q(x)
        with Recording() as recording:
            seen = q(x)
        with torch.device("cpu"):  # a TorchFunctionMode too
            on_device = q(x)
    assert op.default in recording.funcs and torch.nn.functional.linear not in recording.funcs
    assert torch.equal(seen, fused) and torch.equal(on_device, fused)


def test_a_pruned_qlinear_quantizes_its_pruned_weight():
    """Pruning moves the weight out of ``_parameters`` (``weight_orig`` there, ``weight`` an attribute)."""
    torch.manual_seed(0)
    q = QLinear.from_module(torch.nn.Linear(64, 32), weights=qint8, activations=None)
    prune.l1_unstructured(q, "weight", amount=0.5)
    assert "weight" not in q._parameters and float((q.weight == 0).float().mean()) == 0.5
    x = torch.randn(3, 64)
    with torch.no_grad():
        weight = QTensor.quantize(q.weight, qint8, axis=0).dequantize()
        expected = torch.nn.functional.linear(x, weight, q.bias)
        assert relative_error(q(x), expected) < VNNI_TOLERANCE  # the kernels' 16-bit rounding of x


class GemmaStyleRMSNorm(torch.nn.Module):
    """transformers' GemmaRMSNorm (Gemma 1-3, Qwen3-Next alike): ``(1 + weight) * x_hat``, weight zeros."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        x_hat = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x_hat * (1.0 + self.weight.float())).type_as(x)


@pytest.mark.parametrize("trained", [False, True])
def test_a_gemma_style_rmsnorm_stays_float(trained):
    """Named like an RMSNorm, with a 1-d weight and a float eps, but ``(1 + weight) * x_hat``: swapped for
    QRMSNorm it returned ``weight * x_hat``, all zeros with Gemma's initial weight."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), GemmaStyleRMSNorm(32))
    if trained:
        with torch.no_grad():
            model[1].weight.uniform_(-0.5, 0.5)
    x = torch.randn(4, 32)
    expected = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize(model, activations=None)
    assert sqnr(expected, model(x)) > 35
    assert type(model[1]) is GemmaStyleRMSNorm and isinstance(model[0], QLinear)
    assert any("GemmaStyleRMSNorm is named like an RMSNorm but stays float" in str(w.message) for w in caught)


def test_a_llama_style_rmsnorm_is_recognized_on_the_meta_device_too():
    """The probe telling Llama from Gemma runs on a copy: it takes meta skeletons (requantize) and leaves the
    global RNG alone."""
    rng = torch.get_rng_state()
    with torch.device("meta"):
        skeleton = LlamaRMSNorm(32)
    assert qmodule_class_for(skeleton) is QRMSNorm
    with pytest.warns(UserWarning, match="stays float"):
        assert qmodule_class_for(GemmaStyleRMSNorm(32)) is None
    assert torch.equal(torch.get_rng_state(), rng)
    norm = LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(-1, 2)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(QRMSNorm.from_module(norm, activations=None)(x), norm(x))


def static_modules():
    conv = QConv2d.from_module(torch.nn.Conv2d(3, 4, 3))
    return [
        (QLinear.from_module(torch.nn.Linear(8, 4)), torch.randn(16, 8)),
        (conv, torch.randn(2, 3, 6, 6)),
        (QLayerNorm.from_module(torch.nn.LayerNorm(8)), torch.randn(16, 8) + 2),
        (QRMSNorm.from_module(torch.nn.RMSNorm(8)), torch.randn(16, 8) + 2),
    ]


@pytest.mark.parametrize("index", range(4), ids=["linear", "conv", "layernorm", "rmsnorm"])
def test_static_outputs_keep_their_scale_while_calibration_goes_on(index):
    """A static output (or input) QTensor held the module's scale buffer itself: the next calibration step
    updated it in place and changed the value of every tensor already returned."""
    q, x1 = static_modules()[index]
    x2 = x1 * 10
    with torch.no_grad(), calibration():
        y1 = q(x1)
        qx1 = q.quantize_input(x1) if index < 2 else None
        first = y1.dequantize().clone()
        q(x2)
    assert torch.equal(y1.dequantize(), first)
    if qx1 is not None:  # the input quantized at the scale x1 alone calibrated
        torch.testing.assert_close(qx1._scale, x1.abs().max() / 127)


def test_a_fused_static_output_keeps_its_scale_when_the_buffers_are_reloaded():
    """Eager inference's fused static GEMM wrapped ``out_scale`` into its output too: load_state_dict (an
    in-place copy into the buffers) then changed outputs already computed."""
    q = QLinear.from_module(torch.nn.Linear(8, 4))
    x = torch.randn(16, 8)
    calibrate(q, x)
    q.freeze()
    with torch.no_grad():
        y = q(x)
    first = y.dequantize().clone()
    state = q.state_dict()
    state["out_scale"] = state["out_scale"] * 10
    q.load_state_dict(state)
    assert torch.equal(y.dequantize(), first)


@pytest.mark.parametrize(
    "in_features, weights, activations, mode",
    [
        (
            8,
            qint8,
            None,
            "static",
        ),  # 8 input features: too narrow for the VNNI kernels (the blocked float GEMM)
        (64, qint8, None, "static"),
        (64, qint4, None, "static"),  # (int4 in groups of 32: 64 features)
        (8, qint8, qint8, "dynamic"),
        (64, qint8, qint8, "dynamic"),
        (8, qint8, qint8, "static"),
        (64, qint8, qint8, "static"),
    ],
)
def test_a_frozen_layer_called_in_grad_mode_trains_its_bias(in_features, weights, activations, mode):
    # After freeze the weight is fixed but the bias stays a trainable Parameter: called without no_grad, the
    # fused ops (which have no gradient) must neither crash nor drop the bias's gradient.
    torch.manual_seed(0)
    layer = quantize(
        torch.nn.Linear(in_features, 8),
        weights=weights,
        activations=activations,
        activation_mode=mode,
        group_size=32,
        inplace=False,
    )
    x = torch.randn(3, in_features)
    if activations is not None and mode == "static":
        with torch.no_grad(), calibration():
            layer(x)
    layer.freeze()
    with torch.no_grad():
        expected = layer(x)
    out = layer(x)
    out, expected = (t.dequantize() if isinstance(t, QTensor) else t for t in (out, expected))
    assert_close_to_max(out.detach(), expected, 1e-2)  # the same layer, its bias added outside the op
    out.sum().backward()
    assert layer.bias.grad is not None and torch.equal(layer.bias.grad, torch.full((8,), 3.0))
