"""QTensor: a torch.Tensor subclass holding integer data and a float scale (``value = data * scale``)."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

from ..qtypes import qtype
from .base import QuantizedTensor, dequantize_fallback, parameter_like
from .dispatch import HANDLERS, LAYOUT_OPS
from .quantization import (
    DATA_DTYPES,
    FLOAT8_DTYPES,
    absmax_scale,
    check_finite,
    check_scale,
    check_scale_values,
    dequantize_data,
    normalize_axis,
    value_range,
)

__all__ = ["QTensor"]


class QTensor(QuantizedTensor):
    """A quantized tensor: ``_data`` (int8, int16, int32 or float8) times a float ``_scale``.

    Quantization is strictly symmetric (no zero-point). The scale is per tensor (a 0-d tensor, ``axis`` None)
    or per channel along ``axis``, shaped to broadcast against the data (size 1 on every other dimension).
    The QTensor's own dtype is the scale's float dtype: it stands for a float tensor everywhere, and aten ops
    without an integer handler run on its dequantized value (see :mod:`quanto_fx.tensor.dispatch`). float8
    data takes the layout handlers only (views, copies, moves); arithmetic runs on its dequantized value.

    Args:
        data: integer tensor (int8, int16 or int32) or float8 tensor (float8_e4m3fn, float8_e5m2).
        scale: float scale, 0-d for per-tensor, else broadcastable along ``axis``.
        axis: None for a per-tensor scale, else the dimension the scale varies along (0 or -1 usually).
        requires_grad: whether the QTensor takes part in autograd as a leaf.

    Raises:
        TypeError / ValueError: data not integer, scale not float, shape or device mismatch, or a scale that
            is not finite and strictly positive.
    """

    _data: torch.Tensor
    _scale: torch.Tensor
    _axis: int | None
    STORED = ("_data", "_scale")

    @staticmethod
    def __new__(cls, data, scale, axis=None, requires_grad=False, *, _trusted=False):
        if not isinstance(data, torch.Tensor) or data.dtype not in DATA_DTYPES:
            got = data.dtype if isinstance(data, torch.Tensor) else type(data).__name__
            raise TypeError(f"QTensor data must be an int8, int16, int32 or float8 tensor, got {got}")
        axis = normalize_axis(axis, data.ndim)
        if not _trusted:
            check_scale(scale, data, axis)
            check_scale_values(scale)
        return torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=scale.dtype,
            device=data.device,
            requires_grad=requires_grad,
        )

    def __init__(self, data, scale, axis=None, requires_grad=False, *, _trusted=False):
        self._data = data
        self._scale = scale
        self._axis = normalize_axis(axis, data.ndim)

    # -- conversions (the seed's API) -------------------------------------------------------------------

    @classmethod
    def quantize(
        cls,
        tensor: torch.Tensor,
        int_dtype: torch.dtype | qtype | str = torch.int8,
        scale: torch.Tensor | None = None,
        *,
        axis: int | None = None,
    ) -> QTensor:
        """Quantize a float tensor: ``data = clamp(round(tensor / scale))`` (round half to even).

        Args:
            tensor: the float tensor.
            int_dtype: torch.int8 / int16 / int32 / a float8 dtype, or a quanto_fx qtype (qint8, qint4, qint2,
                qfloat8_e4m3fn, qfloat8_e5m2) or its name. float8 values are saturated, then rounded by the
                cast.
            scale: the scale to use; by default the absmax scale (per tensor or per ``axis``).
            axis: None for a per-tensor scale, else the dimension of per-channel scales.

        Gradients flow straight through (the straight-through estimator), so ``requires_grad`` carries over.

        Raises:
            ValueError: non-finite values, an unknown integer type, a bad axis or scale.
        """
        from .autograd import QuantizeSTE

        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"QTensor.quantize expects a floating point tensor, got {_describe(tensor)}")
        if isinstance(tensor, QTensor):
            raise TypeError("tensor is already a QTensor; use rescale() to change its scale or integer type")
        qmin, qmax, dtype = value_range(int_dtype)
        axis = normalize_axis(axis, tensor.ndim)
        if scale is None:
            scale = absmax_scale(tensor.detach(), qmax, axis)
        else:
            if not isinstance(scale, torch.Tensor):
                scale = torch.tensor(scale, dtype=tensor.dtype, device=tensor.device)
            check_scale(scale, tensor, axis)
            check_scale_values(scale)
            check_finite(tensor.detach(), "input")  # NaN would otherwise become an arbitrary integer
        return QuantizeSTE.apply(tensor, scale, qmin, qmax, dtype, axis)

    def dequantized(self) -> torch.Tensor:
        return dequantize_data(self._data, self._scale)

    def dequantize(self) -> torch.Tensor:
        """The float value ``data * scale`` (gradients flow straight through)."""
        from .autograd import DequantizeSTE

        return DequantizeSTE.apply(self)

    def numpy(self, *, force: bool = False):
        """The float value as a NumPy array, as ``item()`` gives it (torch refuses subclasses here)."""
        return self.dequantize().numpy(force=force)

    def tolist(self):
        """The float value as nested lists, as ``item()`` gives it (torch refuses subclasses here)."""
        return self.dequantize().tolist()

    def rescale(
        self, int_dtype: torch.dtype | qtype | str = torch.int8, scale: torch.Tensor | None = None
    ) -> QTensor:
        """Requantize to ``int_dtype`` at a new scale (typically int32 or int16 accumulators down to int8).

        Values are rounded half to even and saturated. By default the new scale is the absmax scale of the
        current value, per tensor or along the current axis. A 0-d ``scale`` gives a per-tensor result.
        """
        from .autograd import RescaleSTE

        qmin, qmax, dtype = value_range(int_dtype)
        if scale is None:
            axis = self._axis
            scale = absmax_scale(dequantize_data(self._data, self._scale).detach(), qmax, axis)
        else:
            if not isinstance(scale, torch.Tensor):
                scale = torch.tensor(scale, dtype=self.dtype, device=self.device)
            scale = scale.to(dtype=self.dtype)  # the result keeps this QTensor's float dtype
            axis = None if scale.ndim == 0 else self._axis
            if axis is None and scale.ndim != 0:
                raise ValueError(f"a per-tensor QTensor needs a 0-d scale, got shape {tuple(scale.shape)}")
            check_scale(scale, self._data, axis)
            check_scale_values(scale)
        return RescaleSTE.apply(self, scale, qmin, qmax, dtype, axis)

    @property
    def axis(self) -> int | None:
        """The dimension of per-channel scales, or None for a per-tensor scale."""
        return self._axis

    @property
    def qdtype(self) -> torch.dtype:
        """The storage dtype of the data: int8, int16, int32, or float8 (float8_e4m3fn, float8_e5m2)."""
        return self._data.dtype

    # -- tensor-subclass protocol ---------------------------------------------------------------------

    def __repr__(self, *, tensor_contents=None) -> str:
        axis = "" if self._axis is None else f", axis={self._axis}"
        return f"QTensor({self._data}, scale={self._scale}{axis}, dtype={self.dtype})"

    def __tensor_flatten__(self):
        return ["_data", "_scale"], (self._axis,)

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return QTensor(inner_tensors["_data"], inner_tensors["_scale"], meta[0], _trusted=True)

    def __reduce_ex__(self, protocol):
        # Rebuilt by a module-level function registered as a safe global, so torch.load(weights_only=True)
        # can restore QTensors without unpickling arbitrary objects.
        return _rebuild_qtensor, (self._data, self._scale, self._axis, self.requires_grad)

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        copy = QTensor(self._data.clone(), self._scale.clone(), self._axis, self.requires_grad, _trusted=True)
        memo[id(self)] = copy = parameter_like(self, copy)
        return copy

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = HANDLERS.get(func.overloadpacket)
        if handler is not None and func.overloadpacket not in LAYOUT_OPS and _has_float8_data(args):
            handler = None  # the integer handlers compute on integers: float8 values take the fallback
        if handler is not None:
            result = handler(func, args, kwargs)
            if result is not NotImplemented:
                return result
        return dequantize_fallback(func, args, kwargs)


def _has_float8_data(args) -> bool:
    return any(isinstance(a, QTensor) and a._data.dtype in FLOAT8_DTYPES for a in tree_leaves(args))


def _describe(x) -> str:
    return f"a tensor of dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def _rebuild_qtensor(data, scale, axis, requires_grad):
    return QTensor(data, scale, axis, requires_grad)


torch.serialization.add_safe_globals([_rebuild_qtensor])
