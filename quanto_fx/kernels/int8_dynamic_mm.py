"""``quanto_fx::int8_dynamic_mm``: a linear layer with dynamic int8 activations, in one op.

``x`` (M, K) float is quantized per row to int8, as ``QTensor.quantize(x, qint8, axis=0)`` does (absmax
scale, round half to even), multiplied by an int8 (N, K) weight with per-output-channel scales in int32,
and rescaled to x's dtype with the bias added: QLinear's dynamic W8A8 forward in eager inference.

The torch implementation (every device) is those steps: the quantization in torch ops, then
``int8_mm_rescale`` (the Triton kernel on CUDA). On the CPU, float32 x with up to ``INT8_VNNI_MAX_M`` rows,
on a weight the VNNI kernels take (``cpu_vnni_mm.supports``) of up to ``DYNAMIC_INT8_MAX_IN_FEATURES``
inputs, runs the int8 weight-only kernel on x's int8 codes instead (``quanto_dynamic_int8_mm``), a C++
kernel registered for the op's CPU key: one call where the torch ops took ~90 us at M = 1 on a 384 x 1536
layer (2-core Xeon, bench/RESULTS.md). Its codes and integer sums are those of the torch path; its float
epilogue rounds differently (``CPU_KERNEL_ERROR``). float16 and bfloat16 x, whose scales torch computes in
their own dtype, take the torch path.
"""

from __future__ import annotations

import torch

from ..qtypes import qint8
from ..tensor.quantization import absmax_scale, quantize_data, value_range
from . import cpu_vnni_mm
from .checks import RESCALE_OUT_DTYPES
from .int8_mm_rescale import int8_mm_rescale
from .library import LIB, TAGS

# The CPU kernel's error against the torch path, relative to the output's largest magnitude. The int32 sums
# are the same, but the kernel's weight codes are offset by 128 (vpdpbusd takes one unsigned operand), and
# the offset's share, 128 * scale_w * (x's code sum), is removed in float32 after scaling: the error grows
# with K and with x's mean. Measured at most 1.3e-5 at K = 4096, 3.3e-5 at 16384 and 7.8e-5 at 65536
# (all-positive or constant x); ~1e-7 for zero-mean x. Against int8 activations' own ~1e-2.
CPU_KERNEL_ERROR = 1e-4


def _check_args(x, w, w_scale, bias):
    if x.ndim != 2 or x.dtype not in RESCALE_OUT_DTYPES:
        got = f"{x.dtype} {tuple(x.shape)}"
        raise TypeError(f"x must be a 2-d float32, float16 or bfloat16 tensor, got {got}")
    if w.ndim != 2 or w.dtype != torch.int8:
        raise TypeError(f"w must be a 2-d int8 (out, in) tensor, got {w.dtype} {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but the weight takes {w.shape[1]}")
    n = w.shape[0]
    if not w_scale.is_floating_point() or w_scale.numel() != n or w_scale.ndim > 2:
        got = f"{w_scale.dtype} {tuple(w_scale.shape)}"
        raise ValueError(f"w_scale must hold {n} float per-channel scales, got {got}")
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be a float ({n},) tensor, got {bias.dtype} {tuple(bias.shape)}")
    devices = {t.device for t in (x, w, w_scale, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x, w, w_scale and bias must be on one device, got {sorted(map(str, devices))}")


def int8_dynamic_mm_torch(x, w, w_scale, bias=None):
    _check_args(x, w, w_scale, bias)
    m, k = x.shape
    if (
        x.is_cpu
        and x.dtype == torch.float32
        and 0 < m <= cpu_vnni_mm.INT8_VNNI_MAX_M
        and k <= cpu_vnni_mm.DYNAMIC_INT8_MAX_IN_FEATURES
        and cpu_vnni_mm.supports(8, k)
    ):
        out = cpu_vnni_mm.dynamic_int8_mm_prechecked(x, w, w_scale, bias)
        if out is not None:
            return out
    # Not finite x raises here, as QTensor.quantize does.
    qmin, qmax, dtype = value_range(qint8)
    x_scale = absmax_scale(x, qmax, axis=0)
    codes = quantize_data(x, x_scale, qmin, qmax, dtype)
    return int8_mm_rescale(codes, w.t(), x_scale, w_scale.reshape(1, -1), bias, x.dtype)


def _fake(x, w, w_scale, bias=None):
    _check_args(x, w, w_scale, bias)
    return x.new_empty((x.shape[0], w.shape[0]))


LIB.define("int8_dynamic_mm(Tensor x, Tensor w, Tensor w_scale, Tensor? bias=None) -> Tensor", tags=TAGS)
LIB.impl("int8_dynamic_mm", int8_dynamic_mm_torch, "CompositeExplicitAutograd")
torch.library.register_fake("quanto_fx::int8_dynamic_mm", _fake, lib=LIB)
int8_dynamic_mm = torch.ops.quanto_fx.int8_dynamic_mm.default
