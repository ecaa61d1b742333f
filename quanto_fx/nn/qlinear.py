"""QLinear: int8 / float8 weights (per output channel) or packed int4 / int2 weights (per group), and static
or dynamic int8 activations or none (weight-only)."""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

from ..calibrate import active_calibration
from ..qtypes import qint8
from ..tensor import PackedQTensor, QTensor
from ..tensor.ops_matmul import gemm_bound, quantize_int32_bias
from ..tensor.quantization import GEMM_FLOAT_DTYPES
from .qmodule import DEFAULT_GROUP_SIZE, QModuleMixin, float_value, register_qmodule

# The quanto_fx.kernels ops the eager forward calls.
_FUSED_OPS = ("float8_dynamic_mm", "int8_dynamic_mm", "int8_mm_requantize")
_FUSED_OPS += ("int8_weight_mm", "float8_weight_mm", "lowbit_weight_mm")


@functools.cache
def _fused_op_overloads() -> types.SimpleNamespace:
    """The fused GEMM ops' ``.default`` overloads, loaded on first use (the kernels package may import
    triton). Overloads, not ``torch.ops`` packets, whose overload resolution costs ~2 us a call."""
    import quanto_fx.kernels as kernels

    return types.SimpleNamespace(**{name: getattr(kernels, name) for name in _FUSED_OPS})


@functools.cache
def _fused_eager_callers() -> types.SimpleNamespace:
    """The same ops as ``quanto_fx.kernels.library.eager_caller``s: past ``torch.ops``' Python-side scan for
    ``__torch_function__`` overrides (~0.3 us per int argument)."""
    from quanto_fx.kernels.library import eager_caller

    overloads = _fused_op_overloads()
    return types.SimpleNamespace(**{name: eager_caller(getattr(overloads, name)) for name in _FUSED_OPS})


def _fused_ops(rows: torch.Tensor) -> types.SimpleNamespace:
    """The fused ops to call with ``rows`` (x or its int8 codes) and the module's own plain tensors: the eager
    callers when ``rows`` is a plain tensor and no TorchFunctionMode is active (``torch.set_default_device``
    pushes one), else the overloads, whose call the mode or ``rows``' ``__torch_function__`` sees."""
    if type(rows) is torch.Tensor and not torch._C._is_torch_function_mode_enabled():
        return _fused_eager_callers()
    return _fused_op_overloads()


@functools.cache
def _one(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A shared 0-d 1.0, never written: the a_scale of a requantize whose whole scale is its b_scale (one
    allocation fewer per static call)."""
    return torch.ones((), device=device, dtype=dtype)


@register_qmodule(torch.nn.Linear)
class QLinear(QModuleMixin, torch.nn.Linear):
    """A quantized ``nn.Linear``.

    - weight-only (``activations=None``): float input times the weight dequantized inside the GEMM: int8 via
      ``quanto_fx::int8_weight_mm``, float8 via ``quanto_fx::float8_weight_mm``, packed int4 / int2 via
      ``quanto_fx::lowbit_weight_mm`` (``group_size`` input features per scale).
    - static: input quantized at ``in_scale``, int8 x int8 -> int32 (``aten._int_mm``) plus an int32 bias
      (at scale ``in_scale * weight_scale``), requantized to an int8 QTensor at ``out_scale``.
    - dynamic: per-token int8 input scales computed at run time; int32 accumulation rescaled to float.
      float8 activations (with float8 weights) are dynamic too, per-token float8 scales:
      ``quanto_fx::float8_dynamic_mm`` in eager inference (``torch._scaled_mm`` where the GPU has it).

    In eager inference (no gradient needed, not calibrating) the activation paths call the fused kernels of
    ``quanto_fx.kernels`` (GEMM and epilogue in one op, the same results). Training, calibration and
    torch.compile tracing go through QTensor ops: their straight-through gradients are what QAT needs, and
    under ``backend="quanto"`` the passes rewrite the traced chains into the same fused kernels.
    """

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        device=None,
        dtype=None,
        weights=qint8,
        activations=qint8,
        activation_mode="static",
        group_size=DEFAULT_GROUP_SIZE,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.init_quantization(weights, activations, activation_mode, device=device, group_size=group_size)

    @classmethod
    def from_module(
        cls, module, weights=qint8, activations=qint8, activation_mode="static", group_size=DEFAULT_GROUP_SIZE
    ):
        with torch.device("meta"):
            qmodule = cls(
                module.in_features,
                module.out_features,
                module.bias is not None,
                weights=weights,
                activations=activations,
                activation_mode=activation_mode,
                group_size=group_size,
            )
        return qmodule.take_parameters_of(module)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.activation_qtype is None:
            return self._weight_only(input)
        if self.activation_mode == "dynamic":
            return self._dynamic(input)
        qx = self.quantize_input(input)
        inference = self._inference(qx, self.tensor_attribute("weight"))
        if inference and _trained(self.bias) is None and active_calibration() is None:
            out = self._fused_static(qx)
            if out is not None:
                return out
        return self.quantize_output(F.linear(qx, self.qweight, self.bias))

    def _dynamic(self, input: torch.Tensor) -> torch.Tensor:
        # As in _weight_only, every step counts on a small layer: the weight and bias read past
        # Module.__getattr__, plain-tensor x not passed through float_value, 2-d x not reshaped.
        x = input if type(input) is torch.Tensor else float_value(input)
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        w = self.tensor_attribute("weight")
        if type(w) is not QTensor:
            w = self.qweight  # not frozen: quantized now
        if self._inference(x, w):
            # x's quantization and the GEMM in one op: on the CPU one C++ call, where the torch ops of the
            # QTensor path below cost ~90 us a layer at M = 1
            ops, bias = _fused_ops(flat), self.tensor_attribute("bias")
            late_bias = _trained(bias)
            bias = None if late_bias is not None else bias
            if w._data.dtype == torch.int8:  # (int8 weights take int8 activations, float8 ones float8)
                out = ops.int8_dynamic_mm(flat, w._data, w._scale, bias)
            else:
                out = ops.float8_dynamic_mm(flat, w._data, w._scale, bias, self.activation_qtype.dtype)
            if late_bias is not None:
                out = out + late_bias
        else:
            rows = QTensor.quantize(flat, self.activation_qtype, axis=0)
            out = F.linear(rows, w, self.bias)  # per-row x per-column scales: float out
        return out if flat is x else out.reshape(*x.shape[:-1], self.out_features)

    def _weight_only(self, x: torch.Tensor) -> torch.Tensor:
        # Every step here counts: a small layer (384 -> 1536) at M = 1 takes ~30 us in fp32, a 128 -> 64 one
        # ~7 us. So the weight and bias are read past Module.__getattr__ (tensor_attribute), a plain tensor
        # input skips float_value, the weight's dtype is read from its scales (w.dtype, a subclass attribute,
        # costs ~0.25 us) and 2-d x is not reshaped.
        w, bias = self.tensor_attribute("weight"), self.tensor_attribute("bias")
        kind = type(w)
        if kind is not QTensor and kind is not PackedQTensor:
            w = self.qweight  # not frozen: quantized now
            kind = type(w)
        if type(x) is not torch.Tensor:
            x = float_value(x)
        packed = kind is PackedQTensor
        if (
            (packed or kind is QTensor)
            and self._inference(x, w)
            and x.dtype == (w._scale_zeros if packed else w._scale).dtype  # the scales' dtype is w's
        ):
            # Eager inference calls the weight-only op directly: at M = 1 the two subclass dispatches of
            # F.linear(x, PackedQTensor) (t, then mm) cost ~0.1 ms, a third of a 4096 x 4096 int4 GEMV.
            rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
            ops, late_bias = _fused_ops(rows), _trained(bias)
            bias = None if late_bias is not None else bias
            if packed:
                out = ops.lowbit_weight_mm(
                    rows, w._packed, w._scale_zeros, w._kernel, w.qtype.bits, w.group_size, bias
                )
            else:
                gemm = ops.int8_weight_mm if w._data.dtype == torch.int8 else ops.float8_weight_mm
                out = gemm(rows, w._data, w._scale, bias)
            if late_bias is not None:
                out = out + late_bias
            return out if rows is x else out.reshape(*x.shape[:-1], self.out_features)
        if w.requires_grad:  # training the float weight: the straight-through float path
            return F.linear(x, float_value(w), bias)
        # Traced (the passes fuse the chains into the same ops), or inputs the ops do not take. A
        # PackedQTensor dispatches its GEMM to lowbit_weight_mm.
        return F.linear(x, w if packed else float_value(w), bias)

    def _inference(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        # The bias may still be trained (a frozen weight, a trainable bias: the default after freeze): the
        # ops take no gradient, so _trained(bias) is added after them, where autograd sees it.
        """Whether to call the fused kernels: eager, no gradient needed, a dtype they take."""
        if torch.compiler.is_compiling():
            return False  # trace the QTensor chain: the backend's passes fuse it (and report it)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return False
        return x.dtype in GEMM_FLOAT_DTYPES  # the float dtypes the fused kernels take and return

    def _fused_static(self, qx: QTensor) -> QTensor | None:
        """int8 GEMM + int32 bias + requantization at ``out_scale`` in one op; None if the bias overflows."""
        w = self.qweight
        # The int32 accumulator's scale (1, N) as the QTensor path holds it, in x's dtype (a 16-bit product
        # rounds): both paths, and the compiled graph, then requantize with the same multiplier.
        acc_scale = qx._scale * w._scale.t()
        qbias = None
        if self.bias is not None:
            qbias = quantize_int32_bias(self.bias, acc_scale, gemm_bound(self.in_features))
            if qbias is None:
                return None  # the QTensor path computes this layer in float (counted as a fallback)
            qbias = qbias.reshape(-1)
        out_scale = self.out_scale.to(qx.dtype, copy=True)  # the output must not alias the buffer
        rows = qx._data.reshape(-1, self.in_features)
        ops = _fused_ops(rows)
        one = _one(acc_scale.device, acc_scale.dtype)
        data = ops.int8_mm_requantize(rows, w._data.t(), one, acc_scale, qbias, out_scale)
        return QTensor(data.reshape(*qx.shape[:-1], self.out_features), out_scale, None, _trusted=True)


def _trained(bias: torch.Tensor | None) -> torch.Tensor | None:
    """``bias`` when autograd needs it (it requires grad, in grad mode), else None. The fused ops have no
    gradient: such a bias is added to their output in torch (rounded to x's dtype after the GEMM, where the
    ops round once), or, for the static int8 layer, the QTensor path runs."""
    return bias if bias is not None and bias.requires_grad and torch.is_grad_enabled() else None
