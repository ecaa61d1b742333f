"""Integer element-wise ops: add, mul, relu, and the in-place forms linear/load_state_dict use.

Results are new tensors: none shares its data or scale with an input, so writing into one (add_, copy_) leaves
the inputs as they were. softmax has no handler: probabilities as small as 1/N for N logits need more than
an int8 grid over [0, 1] (1024 near-equal logits all rounded to 0), so it runs on the dequantized value.
"""

from __future__ import annotations

import numbers

import torch

from .base import QuantizedTensor
from .dispatch import register_handler
from .ops_matmul import add_int32_bias, quantize_int32_bias
from .qtensor import QTensor
from .quantization import check_finite

aten = torch.ops.aten

# Adding two values of one integer type needs one more bit: widen so the sum cannot overflow. int32 has no
# wider QTensor type: int32 sums and products are computed in int64 and refused if they leave int32.
_WIDER = {torch.int8: torch.int16, torch.int16: torch.int32, torch.int32: torch.int32}
_INT32 = torch.iinfo(torch.int32)


def _checked_int32(op: str, wide: torch.Tensor) -> torch.Tensor:
    """``wide`` (int64) as int32, or OverflowError when a value does not fit."""
    if torch.compiler.is_compiling() or not wide.numel():
        return wide.to(torch.int32)
    if not _INT32.min <= wide.min() <= wide.max() <= _INT32.max:
        raise OverflowError(f"{op}: the int32 result of two QTensors overflows; rescale them first")
    return wide.to(torch.int32)


def _is_float_bias(b) -> bool:
    return isinstance(b, torch.Tensor) and not isinstance(b, QuantizedTensor) and b.is_floating_point()


def _keeps_shape(a: QTensor, b: torch.Tensor) -> bool:
    """True when ``b`` broadcasts to ``a``'s shape. A larger sum would need ``a``'s axis and scale laid out
    anew (the axis would name another dimension): the fallback computes it in float."""
    try:
        return torch.broadcast_shapes(a.shape, b.shape) == a.shape
    except RuntimeError:
        return False  # shapes that do not broadcast: the fallback raises torch's own error


def _acc_bound(data: torch.Tensor):
    """max |data| of an int32 accumulator (0 when empty), in int64: how far a bias may move it within int32.

    From amax and amin, since int32's abs() of -2**31 is -2**31 itself.
    """
    if not data.numel():
        return 0
    return torch.maximum(data.amax().to(torch.int64), -data.amin().to(torch.int64))


def same_scales(tensors) -> bool:
    """True when QTensors share their quantization: same axis and equal scale values.

    Comparing values needs data, which torch.compile cannot branch on: while tracing, only scales that are
    the same tensor count as equal (others take the float path, which gives the same values).
    """
    first = tensors[0]
    for other in tensors[1:]:
        if other._axis != first._axis or other._scale.shape != first._scale.shape:
            return False
        if other._scale is first._scale:
            continue
        if torch.compiler.is_compiling():
            return False
        if not torch.equal(other._scale, first._scale.to(other._scale.device)):
            return False
    return True


@register_handler(aten.add)
def add(func, args, kwargs):
    a, b = args[:2]
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    if alpha != 1 or not isinstance(a, QTensor):
        return NotImplemented
    if isinstance(b, QTensor):
        if a.shape != b.shape or not same_scales([a, b]):
            # broadcasting, or different scales (residual connections): the float sum, counted as a fallback
            return NotImplemented
        wide = max(_WIDER[a._data.dtype], _WIDER[b._data.dtype], key=lambda d: torch.iinfo(d).bits)
        if wide == torch.int32 and torch.int32 in (a._data.dtype, b._data.dtype):
            data = _checked_int32("add", a._data.long() + b._data.long())
        else:
            data = a._data.to(wide) + b._data.to(wide)
        return QTensor(data, a._scale.clone(), a._axis, _trusted=True)
    if _is_float_bias(b) and a._data.dtype == torch.int32 and _keeps_shape(a, b):
        # An int32 accumulator plus a float bias: the bias joins the accumulator at its scale (a copy of it).
        a_copy = QTensor(a._data, a._scale.clone(), a._axis, _trusted=True)
        return add_int32_bias(a_copy, b, _acc_bound(a._data))
    return NotImplemented


@register_handler(aten.add_)
def add_(func, args, kwargs):
    a, b = args[:2]
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    if alpha != 1 or not isinstance(a, QTensor) or a._data.dtype != torch.int32:
        return NotImplemented
    if not _is_float_bias(b) or not _keeps_shape(a, b):
        return NotImplemented  # the fallback refuses it: in place, only a float bias joins an int32 QTensor
    qbias = quantize_int32_bias(b, a._scale, _acc_bound(a._data))
    if qbias is None:
        # The out-of-place add computes such a sum in float; a's int32 data cannot hold it.
        check_finite(b, "add_: the bias")
        raise OverflowError(
            "add_: the bias does not fit int32 at the accumulator's scale; use the out-of-place add, "
            "which computes this sum in float"
        )
    a._data.add_(qbias)
    return a


@register_handler(aten.mul)
def mul(func, args, kwargs):
    a, b = args
    if isinstance(b, QTensor) and not isinstance(a, QTensor):
        a, b = b, a
    if not isinstance(a, QTensor):
        return NotImplemented
    if isinstance(b, numbers.Real) and not isinstance(b, bool) and b > 0:
        # A positive constant only changes the scale; the integers stay as they are.
        return QTensor(a._data.clone(), a._scale * b, a._axis, _trusted=True)
    if not isinstance(b, QTensor):
        return NotImplemented
    if a.shape != b.shape or (a._axis is not None and b._axis is not None and a._axis != b._axis):
        return NotImplemented
    axis = a._axis if a._axis is not None else b._axis
    if torch.int32 in (a._data.dtype, b._data.dtype):
        data = _checked_int32("mul", a._data.long() * b._data.long())
    else:  # int8 / int16 products fit int32
        data = a._data.to(torch.int32) * b._data.to(torch.int32)
    return QTensor(data, a._scale * b._scale, axis, _trusted=True)


@register_handler(aten.relu)
def relu(func, args, kwargs):
    (a,) = args
    return QTensor(a._data.clamp_min(0), a._scale.clone(), a._axis, _trusted=True)


@register_handler(aten.copy_, layout=True)
def copy_(func, args, kwargs):
    dst, src = args[:2]
    if not isinstance(dst, QTensor):
        return NotImplemented  # a float destination receives the dequantized value (fallback)
    if not isinstance(src, QTensor) or src._data.dtype != dst._data.dtype or src._axis != dst._axis:
        raise NotImplementedError(
            "copy_ into a QTensor needs a QTensor source of the same integer dtype and axis, got "
            f"{type(src).__name__}"
            + (f" with {src._data.dtype}, axis {src._axis}" if isinstance(src, QTensor) else "")
        )
    if src.shape != dst.shape:
        raise ValueError(
            f"copy_: shape mismatch, destination {tuple(dst.shape)} vs source {tuple(src.shape)}"
        )
    dst._data.copy_(src._data)
    dst._scale.copy_(src._scale)
    return dst
