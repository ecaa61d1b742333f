"""Integer 2-d convolution: int8 x int8 -> int32 as one GEMM over image patches (im2col)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import register_handler
from .integer_matmul import int8_mm
from .ops_matmul import add_int32_bias, gemm_bound
from .qtensor import QTensor
from .quantization import dequantize_data

aten = torch.ops.aten


@register_handler(aten.convolution)
def convolution(func, args, kwargs):
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args
    plain = not transposed and groups == 1 and x.ndim == 4 if isinstance(x, torch.Tensor) else False
    if not plain or not all(isinstance(t, QTensor) and t.qdtype == torch.int8 for t in (x, w)):
        return NotImplemented
    if x._axis not in (None, 0) or w._axis not in (None, 0):
        return NotImplemented
    batch, channels, height, width = x.shape
    out_channels, _, kh, kw = w.shape
    # unfold has no integer kernel; int8 values are exact in float32, so the patches convert back exactly.
    cols = F.unfold(x._data.to(torch.float32), (kh, kw), dilation=dilation, padding=padding, stride=stride)
    patches = cols.transpose(1, 2).reshape(-1, channels * kh * kw).to(torch.int8)
    acc = int8_mm(patches, w._data.reshape(out_channels, -1).t())
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    acc = acc.reshape(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)
    x_scale = x._scale.reshape(-1, 1, 1, 1)  # (1 or batch, 1, 1, 1)
    w_scale = w._scale.reshape(1, -1, 1, 1)  # (1, 1 or out_channels, 1, 1)
    scale = x_scale * w_scale
    if x._axis is not None and w._axis is not None:
        out = dequantize_data(acc, scale)  # per-image x per-channel scales: float out
        return out if bias is None else out + bias.reshape(-1, 1, 1)
    if x._axis is None and w._axis is None:
        out = QTensor(acc, scale.reshape(()), None, _trusted=True)
    else:
        out = QTensor(acc, scale, 0 if x._axis == 0 else 1, _trusted=True)
    return out if bias is None else add_int32_bias(out, bias.reshape(-1, 1, 1), gemm_bound(patches.shape[1]))
