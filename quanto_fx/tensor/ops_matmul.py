"""Integer matrix products: int8 x int8 QTensors -> int32 QTensor whose scale is the product of scales.

``torch.matmul`` and ``F.linear`` decompose (above the dispatcher) into the ops handled here plus the
shape ops of ops_shape.py, so they run in integers too.
"""

from __future__ import annotations

import torch

from .base import dequantize_value
from .dispatch import count_fallback, register_handler
from .integer_matmul import MAX_K, int8_mm
from .qtensor import QTensor
from .quantization import dequantize_data

aten = torch.ops.aten

_INT32_MAX = 2**31 - 1


def _int8_operands(*xs) -> bool:
    return all(isinstance(x, QTensor) and x._data.dtype == torch.int8 for x in xs)


def _rescaled_product(acc: torch.Tensor, a: QTensor, b: QTensor):
    """Attach the product scale to an int32 accumulator of ``a @ b``.

    Left rows may carry per-row scales (axis -2), right columns per-column scales (axis -1). When both do,
    their product is an outer product no single-axis QTensor can hold, so the result is float.
    """
    a_axis = None if a._axis is None else a._axis - a.ndim
    b_axis = None if b._axis is None else b._axis - b.ndim
    if a_axis not in (None, -2) or b_axis not in (None, -1):
        return NotImplemented
    a_scale = a._scale if a_axis is None else a._scale.reshape(acc.shape[-2], 1)
    b_scale = b._scale if b_axis is None else b._scale.reshape(1, acc.shape[-1])
    scale = a_scale * b_scale
    if a_axis is not None and b_axis is not None:
        return dequantize_data(acc, scale)
    axis = None if scale.ndim == 0 else acc.ndim + (a_axis if a_axis is not None else b_axis)
    if axis is not None:
        scale = scale.reshape([1] * (acc.ndim - 2) + list(scale.shape))
    return QTensor(acc, scale, axis, _trusted=True)


def quantize_int32_bias(bias: torch.Tensor, scale: torch.Tensor, acc_bound) -> torch.Tensor | None:
    """``bias`` as int32 at ``scale`` (an accumulator's scale), or None when it does not fit or is NaN / Inf.

    ``acc_bound`` bounds |accumulator| (``gemm_bound(K)``, or a 0-d tensor); the int32 sum cannot overflow
    while |bias| <= 2**31 - 1 - acc_bound. While torch.compile traces, where no data-dependent check can run,
    the bias saturates at that bound instead of returning None. Quantized in float64, where 2**31 is exact.
    """
    limit = _INT32_MAX - acc_bound
    qbias = torch.round(bias.to(torch.float64) / scale.to(torch.float64))
    # "not <=" rather than ">": NaN compares False both ways, and would cast to an arbitrary int32
    if not torch.compiler.is_compiling() and bool((~(qbias.abs() <= limit)).any()):
        return None
    return torch.clamp(qbias, -limit, limit).to(torch.int32)


def add_int32_bias(out, bias, acc_bound):
    """``out + bias`` where ``out`` is an int32 QTensor: the bias joins the accumulator at its scale.

    A bias that does not fit int32 at that scale (tiny accumulator scales, NaN, Inf) makes the result float
    instead, counted as an "int32_bias" fallback (see ``quantize_int32_bias``). The result shares ``out``'s
    scale: callers pass an ``out`` of their own, never an input.
    """
    if not isinstance(out, QTensor):
        return out + (bias.dequantize() if isinstance(bias, QTensor) else bias)
    if isinstance(bias, QTensor):
        bias = dequantize_value(bias)
    qbias = quantize_int32_bias(bias, out._scale, acc_bound)
    if qbias is None:
        count_fallback("int32_bias")
        return dequantize_value(out) + bias.to(out.dtype)
    return QTensor(out._data + qbias, out._scale, out._axis, _trusted=True)


def gemm_bound(k: int) -> int:
    """The largest |int32 accumulator| of a GEMM over ``k`` int8 products."""
    return k * 128 * 128


@register_handler(aten.mm)
def mm(func, args, kwargs):
    a, b = args
    if not _int8_operands(a, b):
        return NotImplemented
    return _rescaled_product(int8_mm(a._data, b._data), a, b)


@register_handler(aten.addmm)
def addmm(func, args, kwargs):
    bias, a, b = args[:3]
    if not _int8_operands(a, b) or kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3:
        return NotImplemented
    out = _rescaled_product(int8_mm(a._data, b._data), a, b)
    if out is NotImplemented:
        return out
    return add_int32_bias(out, bias, gemm_bound(a.shape[1]))


@register_handler(aten.bmm)
def bmm(func, args, kwargs):
    a, b = args
    if not _int8_operands(a, b):
        return NotImplemented
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0]:
        raise ValueError(f"bmm: incompatible shapes {tuple(a.shape)} @ {tuple(b.shape)}")
    acc = torch.stack([int8_mm(x, y) for x, y in zip(a._data, b._data, strict=True)])
    return _rescaled_product(acc, a, b)


@register_handler(aten.dot)
def dot(func, args, kwargs):
    a, b = args
    if not _int8_operands(a, b) or a._axis is not None or b._axis is not None:
        return NotImplemented
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"dot: expects two 1-d tensors of equal size, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] > MAX_K:
        raise ValueError(f"dot: length {a.shape[0]} exceeds {MAX_K}, beyond which int32 sums could overflow")
    acc = (a._data.to(torch.int32) * b._data.to(torch.int32)).sum(dtype=torch.int32)
    return QTensor(acc, a._scale * b._scale, None, _trusted=True)
