"""Straight-through estimators: gradients pass through quantize, dequantize and rescale unchanged.

This is what lets quantization-aware training update float weights through quantized forwards.
"""

from __future__ import annotations

import torch

from .qtensor import QTensor
from .quantization import accumulator_float_dtype, quantize_data, round_and_clamp


class QuantizeSTE(torch.autograd.Function):
    """float -> QTensor with the given scale; the gradient goes straight through."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, dtype, axis):
        return QTensor(quantize_data(x, scale, qmin, qmax, dtype), scale, axis, _trusted=True)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None


class DequantizeSTE(torch.autograd.Function):
    """Quantized tensor -> its float value; the gradient goes straight through."""

    @staticmethod
    def forward(ctx, qt):
        return qt.dequantized()

    @staticmethod
    def backward(ctx, grad):
        return grad


class RescaleSTE(torch.autograd.Function):
    """QTensor -> QTensor at a new scale, re-rounded and saturated; the gradient goes straight through."""

    @staticmethod
    def forward(ctx, qt, scale, qmin, qmax, dtype, axis):
        # in float32 (float64 for float64 scales): an int32 accumulator does not fit float16 (dequantize_data)
        wide = accumulator_float_dtype(qt._scale.dtype)
        values = qt._data.to(wide) * (qt._scale.to(wide) / scale.to(wide))
        return QTensor(round_and_clamp(values, qmin, qmax, dtype), scale, axis, _trusted=True)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None


class QuantizePackedSTE(torch.autograd.Function):
    """float weight -> PackedQTensor (group-wise int4 / int2); the gradient goes straight through."""

    @staticmethod
    def forward(ctx, weight, wqtype, group_size, shift, gemm_layout):
        from .packed_qtensor import PackedQTensor

        return PackedQTensor.from_float(weight, wqtype, group_size, shift, gemm_layout)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None
