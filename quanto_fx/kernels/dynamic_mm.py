"""Linear layers with dynamic activations, each in one op: QLinear's dynamic forward in eager inference.

- ``quanto_fx::int8_dynamic_mm(x, w, w_scale, bias)``: ``x`` (M, K) float quantized per row to int8 as
  ``QTensor.quantize(x, qint8, axis=0)`` does (absmax scale, round half to even), times an int8 (N, K)
  weight with per-output-channel scales in int32, rescaled to x's dtype, plus the bias.
- ``quanto_fx::float8_dynamic_mm(x, w, w_scale, bias, x_dtype)``: the same with x quantized per row to the
  float8 ``x_dtype`` and a float8 weight.

The torch implementations (every device) are those steps: the quantization in torch ops, then
``int8_mm_rescale`` (the Triton kernel on CUDA) or ``float8_mm``. On the CPU the C++ kernels registered for
the ops' CPU key do it all in one call where the torch steps took ~90 us at M = 1 on a 384 x 1536 layer
(2-core Xeon, bench/RESULTS.md), x quantized with the same IEEE operations; for float16 and bfloat16 x each
of them rounded to x's dtype, as torch computes them (scales and quotients in x's dtype):
- int8: the VNNI int8 weight-only kernel (``cpu_vnni_mm.cpp``) on x's int8 codes, on weights the kernels
  take of up to ``DYNAMIC_INT8_MAX_IN_FEATURES`` inputs, at any M but for weights of 4 MB or more past
  ``INT8_VNNI_MAX_M`` rows (``cpu_vnni_mm.int8_uses_int_mm``: oneDNN's ``_int_mm`` wins there). The codes
  and the integer sums are the torch path's; the float epilogue rounds differently
  (``INT8_CPU_KERNEL_ERROR``). The C++ op kernel takes the same calls; those of ``_int_mm`` run this
  file's implementation.
- float8: the float8 weight-only kernel (``cpu_float8_mm.cpp``) on x's dequantized float8 values, the
  kernel ``float8_mm`` runs on the CPU too (same values, same sums). With e4m3fn weights past the float16
  GEMV's rows, x's rows are quantized inside the float16 GEMM as it converts them, chunk by chunk, rather
  than all written out first (M = 4096, K = 4096, N = 128: 3.2x the fp32 GEMM's time, then 1.3x).
"""

from __future__ import annotations

import torch

from ..qtypes import qint8
from ..tensor.quantization import FLOAT8_DTYPES, absmax_scale, quantize_data, value_range
from . import cpu_float8_mm, cpu_vnni_mm
from .float8_mm import float8_mm
from .int8_mm_rescale import int8_mm_rescale
from .library import LIB, TAGS
from .weight_only import _check_per_channel_weight_args

# The int8 CPU kernel's error against the torch path, relative to the output's largest magnitude. The int32
# sums are the same, but the kernel's weight codes are offset by 128 (vpdpbusd takes one unsigned operand),
# and the offset's share, 128 * scale_w * (x's code sum), is removed in float32 after scaling: the error
# grows with K and with x's mean. Measured at most 1.3e-5 at K = 4096, 3.3e-5 at 16384 and 7.8e-5 at 65536
# (all-positive or constant x); ~1e-7 for zero-mean x. Against int8 activations' own ~1e-2.
INT8_CPU_KERNEL_ERROR = 1e-4


def _quantized_rows(x, qtype_or_dtype):
    """x's per-row codes and scales, as QTensor.quantize computes them (non-finite x raises there)."""
    qmin, qmax, dtype = value_range(qtype_or_dtype)
    x_scale = absmax_scale(x, qmax, axis=0)
    return quantize_data(x, x_scale, qmin, qmax, dtype), x_scale


def _cpu_kernels_take(x) -> bool:
    return x.is_cpu and x.dtype in cpu_vnni_mm.PRECISIONS and x.shape[0] > 0


def int8_dynamic_mm_torch(x, w, w_scale, bias=None):
    _check_per_channel_weight_args(x, w, w_scale, bias, (torch.int8,), "int8")
    (m, k), n = x.shape, w.shape[0]
    # as int8_weight_mm: past INT8_VNNI_MAX_M rows, weights of 4 MB or more go to torch._int_mm
    kernel_takes = k <= cpu_vnni_mm.DYNAMIC_INT8_MAX_IN_FEATURES and not cpu_vnni_mm.int8_uses_int_mm(m, k, n)
    if _cpu_kernels_take(x) and kernel_takes and cpu_vnni_mm.supports(8, k):
        out = cpu_vnni_mm.dynamic_int8_mm_prechecked(x, w, w_scale, bias)
        if out is not None:
            return out.to(x.dtype)
    codes, x_scale = _quantized_rows(x, qint8)
    return int8_mm_rescale(codes, w.t(), x_scale, w_scale.reshape(1, -1), bias, x.dtype)


def _check_x_dtype(x_dtype):
    if x_dtype not in FLOAT8_DTYPES:
        raise TypeError(f"x_dtype must be a float8 dtype, got {x_dtype}")


def float8_dynamic_mm_torch(x, w, w_scale, bias, x_dtype):
    _check_per_channel_weight_args(x, w, w_scale, bias, FLOAT8_DTYPES, "float8")
    _check_x_dtype(x_dtype)
    if _cpu_kernels_take(x) and cpu_float8_mm.supports(x.shape[1]):
        out = cpu_float8_mm.dynamic_mm_prechecked(x, x_dtype, w, w_scale, bias)
        if out is not None:
            return out.to(x.dtype)
    codes, x_scale = _quantized_rows(x, x_dtype)
    return float8_mm(codes, w.t(), x_scale, w_scale.reshape(1, -1), bias, x.dtype)


def _int8_fake(x, w, w_scale, bias=None):
    _check_per_channel_weight_args(x, w, w_scale, bias, (torch.int8,), "int8")
    return x.new_empty((x.shape[0], w.shape[0]))


def _float8_fake(x, w, w_scale, bias, x_dtype):
    _check_per_channel_weight_args(x, w, w_scale, bias, FLOAT8_DTYPES, "float8")
    _check_x_dtype(x_dtype)
    return x.new_empty((x.shape[0], w.shape[0]))


LIB.define("int8_dynamic_mm(Tensor x, Tensor w, Tensor w_scale, Tensor? bias=None) -> Tensor", tags=TAGS)
LIB.impl("int8_dynamic_mm", int8_dynamic_mm_torch, "CompositeExplicitAutograd")
torch.library.register_fake("quanto_fx::int8_dynamic_mm", _int8_fake, lib=LIB)
int8_dynamic_mm = torch.ops.quanto_fx.int8_dynamic_mm.default
LIB.define(
    "float8_dynamic_mm(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, ScalarType x_dtype) -> Tensor",
    tags=TAGS,
)
LIB.impl("float8_dynamic_mm", float8_dynamic_mm_torch, "CompositeExplicitAutograd")
torch.library.register_fake("quanto_fx::float8_dynamic_mm", _float8_fake, lib=LIB)
float8_dynamic_mm = torch.ops.quanto_fx.float8_dynamic_mm.default
