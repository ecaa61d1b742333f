"""QModuleMixin: what every quantized module shares (qtypes, activation scales, calibration, freeze), and
the registry that maps float module classes to their quantized twins."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..calibrate import active_calibration, update_scale
from ..qtypes import get_qtype, qint8, qtype
from ..tensor import QTensor
from ..tensor.quantization import int_range

__all__ = ["QModuleMixin", "register_qmodule", "qmodule_class_for", "ACTIVATION_MODES"]

# static: per-tensor activation scales fixed by calibration (int8 in, int8 out; suits CNNs and batch work).
# dynamic: per-token (per-row) activation scales computed at run time, float out (suits transformers,
#          whose activations have per-token outliers; needs no calibration).
ACTIVATION_MODES = ("static", "dynamic")

_SUPPORTED_WEIGHTS = (qint8,)
_SUPPORTED_ACTIVATIONS = (qint8,)

_QMODULES: dict[type[torch.nn.Module], type[QModuleMixin]] = {}
_STRUCTURAL: list[tuple[Callable[[torch.nn.Module], bool], type[QModuleMixin]]] = []


def register_qmodule(float_cls: type[torch.nn.Module] | Callable[[torch.nn.Module], bool]):
    """Class decorator: the decorated quantized module replaces ``float_cls`` in ``quantize()``.

    ``float_cls`` may also be a predicate on module instances, for families of classes recognized by their
    structure (e.g. the RMSNorm classes of model libraries). Users register their own classes the same way:
    ``register_qmodule(MyRMSNorm)(QRMSNorm)``.
    """

    def decorator(qcls):
        if isinstance(float_cls, type):
            _QMODULES[float_cls] = qcls
        else:
            _STRUCTURAL.append((float_cls, qcls))
        return qcls

    return decorator


def qmodule_class_for(module: torch.nn.Module) -> type[QModuleMixin] | None:
    """The quantized class that replaces ``module``, or None when it is not quantizable."""
    if isinstance(module, QModuleMixin):
        return None
    qcls = _QMODULES.get(type(module))
    if qcls is not None:
        return qcls
    for predicate, qcls in _STRUCTURAL:
        if predicate(module):
            return qcls
    return None


def check_qtypes(weights: qtype | str | None, activations: qtype | str | None, activation_mode: str):
    """Validate the quantization settings; returns ``(weights, activations)`` as qtypes."""
    weights = None if weights is None else get_qtype(weights)
    activations = None if activations is None else get_qtype(activations)
    if weights is not None and weights not in _SUPPORTED_WEIGHTS:
        raise ValueError(f"weights={weights.name} is not supported yet; supported: qint8 (or None)")
    if activations is not None and activations not in _SUPPORTED_ACTIVATIONS:
        raise ValueError(f"activations={activations.name} is not supported; supported: qint8 or None")
    if activation_mode not in ACTIVATION_MODES:
        raise ValueError(f"activation_mode must be one of {ACTIVATION_MODES}, got {activation_mode!r}")
    return weights, activations


class QModuleMixin:
    """Shared state of quantized modules.

    Attributes:
        weight_qtype: qtype of the weights (None: float weights).
        activation_qtype: qtype of the activations (None: weight-only quantization).
        activation_mode: "static" (calibrated per-tensor scales) or "dynamic" (per-token, at run time).
        in_scale / out_scale: buffers with the static activation scales; 1.0 until calibrated.

    Before ``freeze()``, weights stay float and are quantized on every forward (straight-through gradients
    make quantization-aware training work); ``freeze()`` stores them as integer QTensors.
    """

    weight_qtype: qtype | None
    activation_qtype: qtype | None
    activation_mode: str

    def init_quantization(self, weights, activations, activation_mode: str, device=None) -> None:
        self.weight_qtype, self.activation_qtype = check_qtypes(weights, activations, activation_mode)
        self.activation_mode = activation_mode
        self.register_buffer("in_scale", torch.ones((), device=device))
        self.register_buffer("out_scale", torch.ones((), device=device))

    @classmethod
    def from_module(cls, module: torch.nn.Module, weights=qint8, activations=qint8, activation_mode="static"):
        """The quantized twin of ``module``; it shares ``module``'s parameters (no copy)."""
        raise NotImplementedError

    def take_parameters_of(self, module: torch.nn.Module):
        """Share ``module``'s weight and bias, with fresh activation scales on its device; returns self."""
        if isinstance(module, QModuleMixin):
            raise ValueError(f"{type(module).__name__} is already quantized; quantize the float module once")
        self.weight = module.weight
        if "bias" in self._parameters:
            self.bias = module.bias
        self.in_scale = torch.ones((), device=module.weight.device)
        self.out_scale = torch.ones((), device=module.weight.device)
        return self.train(module.training)

    @property
    def is_static(self) -> bool:
        return self.activation_qtype is not None and self.activation_mode == "static"

    @property
    def frozen(self) -> bool:
        return isinstance(getattr(self, "weight", None), QTensor)

    @property
    def qweight(self):
        """The quantized weight: stored if frozen, else quantized now (per output channel)."""
        weight = self.weight
        if isinstance(weight, QTensor) or self.weight_qtype is None:
            return weight
        return QTensor.quantize(weight, self.weight_qtype, axis=0)

    def freeze(self) -> None:
        """Replace the float weight by its integer QTensor (about a quarter of the bytes for int8)."""
        if self.weight_qtype is None or self.frozen:
            return
        if self.weight.is_meta:
            weight = _meta_qtensor(self.weight, self.weight_qtype)
        else:
            weight = QTensor.quantize(self.weight.detach(), self.weight_qtype, axis=0)
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    # -- activations ------------------------------------------------------------------------------------

    def quantize_input(self, x: torch.Tensor) -> QTensor:
        """Static int8 input at ``in_scale`` (an int8 per-tensor QTensor input is taken as it is)."""
        qmin, qmax, _ = int_range(self.activation_qtype)
        state = active_calibration()
        if isinstance(x, QTensor):
            if x.qdtype == torch.int8 and x.axis is None:
                if state is not None:
                    self.in_scale.copy_(x._scale)  # adopt the producer's scale: no requantization needed
                    state.modules_seen.add(id(self))
                return x
            x = x.dequantize()
        if state is not None:
            update_scale(self.in_scale, x, qmax, state)
            state.modules_seen.add(id(self))
        return QTensor.quantize(x, self.activation_qtype, self.in_scale.to(x.dtype))

    def quantize_output(self, y: torch.Tensor) -> QTensor:
        """Static int8 output at ``out_scale`` (int32 accumulators are rescaled, floats quantized)."""
        qmin, qmax, _ = int_range(self.activation_qtype)
        state = active_calibration()
        if state is not None:
            values = y.dequantize() if isinstance(y, QTensor) else y
            update_scale(self.out_scale, values, qmax, state)
            state.modules_seen.add(id(self))
        scale = self.out_scale.to(y.dtype)
        if isinstance(y, QTensor):
            return y.rescale(self.activation_qtype, scale)
        return QTensor.quantize(y, self.activation_qtype, scale)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        weights = self.weight_qtype.name if self.weight_qtype else None
        acts = self.activation_qtype.name if self.activation_qtype else None
        mode = f", activation_mode={self.activation_mode}" if acts else ""
        return f"{base}, weights={weights}, activations={acts}{mode}"


def float_value(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a float tensor (QTensors are dequantized with straight-through gradients)."""
    return x.dequantize() if isinstance(x, QTensor) else x


def _meta_qtensor(weight: torch.Tensor, wqtype: qtype) -> QTensor:
    """A placeholder QTensor on the meta device, for skeletons whose real values are loaded afterwards."""
    scale_shape = [weight.shape[0]] + [1] * (weight.ndim - 1)
    data = torch.empty(weight.shape, dtype=wqtype.dtype, device="meta")
    return QTensor(data, torch.empty(scale_shape, dtype=weight.dtype, device="meta"), axis=0, _trusted=True)
