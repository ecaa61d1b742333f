"""QModuleMixin: what every quantized module shares (qtypes, activation scales, calibration, freeze), and
the registry that maps float module classes to their quantized twins."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import torch

from ..calibrate import active_calibration, update_scale
from ..qtypes import get_qtype, qfloat8_e4m3fn, qfloat8_e5m2, qint2, qint4, qint8, qtype
from ..tensor import PACKED_QTYPES, PackedQTensor, QTensor
from ..tensor.quantization import check_finite, value_range

__all__ = ["QModuleMixin", "register_qmodule", "qmodule_class_for", "ACTIVATION_MODES", "DEFAULT_GROUP_SIZE"]

# static: per-tensor activation scales fixed by calibration (int8 in, int8 out; suits CNNs and batch work).
# dynamic: per-token (per-row) activation scales computed at run time, float out (suits transformers,
#          whose activations have per-token outliers; needs no calibration).
ACTIVATION_MODES = ("static", "dynamic")

_SUPPORTED_WEIGHTS = (qint8, qint4, qint2, qfloat8_e4m3fn, qfloat8_e5m2)
_SUPPORTED_ACTIVATIONS = (qint8, qfloat8_e4m3fn, qfloat8_e5m2)
DEFAULT_GROUP_SIZE = 128
# Whether int4 / int2 groups use the shifted (min-max, float zero) scheme rather than the symmetric one:
# chosen by the accuracy measured on a pretrained encoder (bench/RESULTS.md, "Low-bit weights").
SHIFTED_GROUPS = {qint4: True, qint2: True}

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
        names = ", ".join(q.name for q in _SUPPORTED_WEIGHTS)
        raise ValueError(f"weights={weights.name} is not supported; supported: {names} (or None)")
    if weights in PACKED_QTYPES and activations is not None:
        raise ValueError(
            f"weights={weights.name} is weight-only quantization: pass activations=None "
            "(int4 / int2 weights are dequantized inside a float GEMM)"
        )
    if activations is not None and activations not in _SUPPORTED_ACTIVATIONS:
        names = ", ".join(q.name for q in _SUPPORTED_ACTIVATIONS)
        raise ValueError(f"activations={activations.name} is not supported; supported: {names} or None")
    if activations is not None and activations.is_floating_point:
        if activation_mode != "dynamic":
            raise ValueError(
                f"activations={activations.name} needs activation_mode='dynamic' (per-token float8 scales)"
            )
        if weights is not None and not weights.is_floating_point:
            raise ValueError(f"activations={activations.name} needs float8 weights, not {weights.name}")
    if (
        activations is not None
        and weights is not None
        and weights.is_floating_point != activations.is_floating_point
    ):
        raise ValueError(
            f"weights={weights.name} with activations={activations.name}: float8 weights take float8 "
            "activations or none, int8 weights int8 activations or none"
        )
    if activation_mode not in ACTIVATION_MODES:
        raise ValueError(f"activation_mode must be one of {ACTIVATION_MODES}, got {activation_mode!r}")
    return weights, activations


class QModuleMixin:
    """Shared state of quantized modules.

    Attributes:
        weight_qtype: qtype of the weights (None: float weights).
        activation_qtype: qtype of the activations (None: weight-only quantization).
        activation_mode: "static" (calibrated per-tensor scales) or "dynamic" (per-token, at run time).
        group_size: input features per scale group of int4 / int2 weights.
        in_scale / out_scale: buffers with the static activation scales; 1.0 until calibrated.

    Before ``freeze()``, weights stay float and are quantized on every forward (straight-through gradients
    make quantization-aware training work); ``freeze()`` stores them as integer QTensors.
    """

    weight_qtype: qtype | None
    activation_qtype: qtype | None
    activation_mode: str
    group_size: int
    GEMM_WEIGHT = True  # whether the weight feeds GEMMs (packed weights then keep a GEMM kernel layout)

    def init_quantization(
        self, weights, activations, activation_mode: str, device=None, group_size: int = DEFAULT_GROUP_SIZE
    ) -> None:
        self.weight_qtype, self.activation_qtype = check_qtypes(weights, activations, activation_mode)
        if self.GEMM_WEIGHT and self.weight_qtype is None and self.activation_qtype is not None:
            raise ValueError(
                f"{type(self).__name__} with activations={self.activation_qtype.name} needs quantized "
                "weights (weights=qint8 or a float8 qtype), or activations=None"
            )
        self.activation_mode = activation_mode
        self.group_size = group_size
        self.register_buffer("in_scale", torch.ones((), device=device))
        self.register_buffer("out_scale", torch.ones((), device=device))
        self._calibration_checked = False  # see _check_calibrated_once

    @classmethod
    def from_module(
        cls,
        module: torch.nn.Module,
        weights=qint8,
        activations=qint8,
        activation_mode="static",
        group_size=DEFAULT_GROUP_SIZE,
    ):
        """The quantized twin of ``module``; it shares ``module``'s parameters (no copy)."""
        raise NotImplementedError

    def take_parameters_of(self, module: torch.nn.Module):
        """Share ``module``'s weight and bias, with fresh activation scales on its device; returns self."""
        if isinstance(module, QModuleMixin):
            raise ValueError(f"{type(module).__name__} is already quantized; quantize the float module once")
        self.weight = module.weight
        if "bias" in self._parameters:
            self.bias = module.bias
        device = _device_of(module)
        self.in_scale = torch.ones((), device=device)
        self.out_scale = torch.ones((), device=device)
        return self.train(module.training)

    @property
    def is_static(self) -> bool:
        return self.activation_qtype is not None and self.activation_mode == "static"

    def tensor_attribute(self, name: str):
        """The module's tensor ``name`` (e.g. "weight", "bias"): read from ``_parameters`` where it is a
        parameter (Module.__getattr__ costs ~0.7 us a read, a small layer's call ~20 us), else as an attribute
        (a pruned or parametrized weight lives outside ``_parameters``)."""
        parameters = self._parameters
        return parameters[name] if name in parameters else getattr(self, name)

    @property
    def frozen(self) -> bool:
        return isinstance(self.tensor_attribute("weight"), (QTensor, PackedQTensor))

    @property
    def qweight(self):
        """The quantized weight: stored if frozen, else quantized now (straight-through gradients)."""
        weight = self.tensor_attribute("weight")
        if self.weight_qtype is None or isinstance(weight, (QTensor, PackedQTensor)):
            return weight
        return self._quantize_weight(weight)

    def _quantize_weight(self, weight: torch.Tensor):
        """int8 / float8: per output channel; int4 / int2: packed, per group of ``group_size`` inputs."""
        try:
            if self.weight_qtype in PACKED_QTYPES:
                shift = SHIFTED_GROUPS[self.weight_qtype]
                # A weight being trained is dequantized at once: no GEMM kernel layout to build for it.
                training = weight.requires_grad and torch.is_grad_enabled()
                gemm_layout = self.GEMM_WEIGHT and not training
                return PackedQTensor.quantize(weight, self.weight_qtype, self.group_size, shift, gemm_layout)
            return QTensor.quantize(weight, self.weight_qtype, axis=0)
        except ValueError:
            # QTensor.quantize calls any tensor "input": a NaN in the weight would pass for one in x
            check_finite(weight.detach(), f"the weight of this {type(self).__name__}")
            raise

    def freeze(self) -> None:
        """Replace the float weight by its integer QTensor (about a quarter of the bytes for int8)."""
        if self.weight_qtype is None or self.frozen:
            return
        if self.weight.is_meta:
            weight = _meta_qtensor(self.weight, self.weight_qtype, self.group_size, self.GEMM_WEIGHT)
        else:
            weight = self._quantize_weight(self.weight.detach())
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    # -- activations ------------------------------------------------------------------------------------

    def _check_calibrated_once(self, state) -> None:
        """At a static layer's first eager call outside calibration, warn if its scales are still the
        uncalibrated 1.0: int8 activations then round every value below 0.5 to 0 (mostly zeros out). Not
        at freeze(): a frozen model may be about to load calibrated scales."""
        # is_compiling() first: dynamo then never reads (and guards on) the flag
        if torch.compiler.is_compiling() or state is not None or self._calibration_checked:
            return
        self._calibration_checked = True
        if self.out_scale.is_meta or not (bool(self.in_scale == 1) and bool(self.out_scale == 1)):
            return  # (norms leave in_scale at 1: their out_scale decides)
        warnings.warn(
            f"{type(self).__name__}: static activation scales are still 1.0 (never calibrated), so int8 "
            "activations round every value below 0.5 to 0. Run the model on representative inputs inside "
            "`with calibration():` first, load calibrated scales, or quantize with activation_mode='dynamic'",
            stacklevel=3,  # the layer's forward
        )

    def quantize_input(self, x: torch.Tensor) -> QTensor:
        """Static int8 input at ``in_scale`` (an int8 per-tensor QTensor input is taken as it is)."""
        qmax = value_range(self.activation_qtype)[1]
        state = active_calibration()
        self._check_calibrated_once(state)
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
        # A copy of the buffer (0-d, cheap): a later calibration step or load_state_dict updates the buffer in
        # place, which must not change a QTensor built now (or one autograd saved for backward).
        return QTensor.quantize(x, self.activation_qtype, self.in_scale.to(x.dtype, copy=True))

    def quantize_output(self, y: torch.Tensor) -> QTensor:
        """Static int8 output at ``out_scale`` (int32 accumulators are rescaled, floats quantized)."""
        qmax = value_range(self.activation_qtype)[1]
        state = active_calibration()
        self._check_calibrated_once(state)
        if state is not None:
            values = y.dequantize() if isinstance(y, QTensor) else y
            update_scale(self.out_scale, values, qmax, state)
            state.modules_seen.add(id(self))
        scale = self.out_scale.to(y.dtype, copy=True)  # the output must not alias the buffer (quantize_input)
        if isinstance(y, QTensor):
            return y.rescale(self.activation_qtype, scale)
        return QTensor.quantize(y, self.activation_qtype, scale)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        weights = self.weight_qtype.name if self.weight_qtype else None
        acts = self.activation_qtype.name if self.activation_qtype else None
        mode = f", activation_mode={self.activation_mode}" if acts else ""
        return f"{base}, weights={weights}, activations={acts}{mode}"


def _device_of(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s tensors live: a norm without affine parameters has no weight, maybe no tensor at
    all (then the default device)."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.get_default_device() if tensor is None else tensor.device


def float_value(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a float tensor (quantized tensors are dequantized with straight-through gradients)."""
    return x.dequantize() if isinstance(x, (QTensor, PackedQTensor)) else x


def _meta_qtensor(
    weight: torch.Tensor, wqtype: qtype, group_size: int, gemm_layout: bool
) -> QTensor | PackedQTensor:
    """A placeholder on the meta device, for skeletons whose real values are loaded afterwards."""
    if wqtype in PACKED_QTYPES:
        out_features, in_features = weight.shape
        packed = torch.empty((out_features, in_features * wqtype.bits // 8), dtype=torch.uint8, device="meta")
        groups = torch.empty((in_features // group_size, out_features, 2), dtype=weight.dtype, device="meta")
        return PackedQTensor(packed, groups, wqtype, group_size, gemm_layout=gemm_layout)
    scale_shape = [weight.shape[0]] + [1] * (weight.ndim - 1)
    data = torch.empty(weight.shape, dtype=wqtype.dtype, device="meta")
    return QTensor(data, torch.empty(scale_shape, dtype=weight.dtype, device="meta"), axis=0, _trusted=True)
