"""``quanto_fx::float8_mm``: float8 x float8 GEMM with per-row x per-column scales, float output.

On the CPU, where the kernel library of ``cpu_vnni_mm.py`` is loaded: the float8 weight-only kernel of
``cpu_float8_mm.py`` on ``a``'s dequantized rows. torch's CPU ``_scaled_mm`` and the reference convert float8
to float32 element by element: 2.0 and 1.6 ms for a 384 x 1536 weight at M = 1, against 28 us for the kernel
and 24 us for the fp32 GEMM (2-core Xeon). On CPUs with AVX512-FP16 the kernel sums in float16 (relative
error ~5e-4, at most ``cpu_float8_mm.FLOAT16_ERROR``, against e4m3's own ~3e-2).

Elsewhere ``torch._scaled_mm`` where the device has it (CUDA GPUs with float8 tensor cores, compute
capability 8.9+; CPU builds that implement it), else the reference, which dequantizes both operands to
float32 first. Whether ``_scaled_mm`` works is probed once per device and output dtype with a tiny e4m3
product; e5m2 x e5m2 on CUDA, which cuBLAS refuses, takes the reference.
"""

from __future__ import annotations

import functools

import torch

from ..tensor.quantization import FLOAT8_DTYPES
from . import cpu_float8_mm
from .checks import _check_scale
from .library import LIB, TAGS

# cuBLAS float8 GEMMs want K and N in multiples of 16.
SCALED_MM_MULTIPLE = 16


def float8_mm_reference(a, b, a_scale, b_scale, bias, out_dtype):
    """``(a * a_scale) @ (b * b_scale) + bias`` in float32, then cast."""
    out = (a.to(torch.float32) * a_scale.to(torch.float32)) @ (
        b.to(torch.float32) * b_scale.to(torch.float32)
    )
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def _check_args(a, b, a_scale, b_scale, bias, out_dtype):
    if a.dtype not in FLOAT8_DTYPES or b.dtype not in FLOAT8_DTYPES or a.ndim != 2 or b.ndim != 2:
        raise TypeError(f"a and b must be 2-d float8 tensors, got {a.dtype} {tuple(a.shape)}, {b.dtype}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"cannot multiply {tuple(a.shape)} by {tuple(b.shape)}")
    for name, t in (("b", b), ("bias", bias)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but a is on {a.device}")
    # exact shapes: an (M,) or (N, 1) scale of the right size would broadcast along the wrong axis
    _check_scale(a_scale, "a_scale", (a.shape[0], 1), a.device)
    _check_scale(b_scale, "b_scale", (1, b.shape[1]), a.device)
    if bias is not None and tuple(bias.shape) != (b.shape[1],):
        raise ValueError(f"bias must have shape ({b.shape[1]},), got {tuple(bias.shape)}")
    if not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be a float dtype, got {out_dtype}")


def scaled_mm_works(device: torch.device | str, out_dtype: torch.dtype) -> bool:
    """Whether ``torch._scaled_mm`` with row-wise scales runs on ``device`` (a CUDA device without an index:
    the current one) for ``out_dtype``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _scaled_mm_works(device, out_dtype)


@functools.cache  # per device, not per device type: a machine may hold GPUs of different capabilities
def _scaled_mm_works(device: torch.device, out_dtype: torch.dtype) -> bool:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False
    try:
        a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        scale_a = torch.ones(16, 1, device=device)
        scale_b = torch.ones(1, 16, device=device)
        out = torch._scaled_mm(a, a.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
        return bool((out == 16).all())
    except (RuntimeError, NotImplementedError):
        return False


def float8_mm_cpu_kernel(a, b, a_scale, b_scale, bias, out_dtype):
    """The CPU float8 weight-only kernel on ``a * a_scale`` (rounded as the reference rounds it) and the
    weight ``b.t()`` (a view of the (N, K) weight when ``b`` is its transpose)."""
    n = b.shape[1]
    rows = a.to(torch.float32) * a_scale.to(torch.float32)
    w_scale = b_scale.to(torch.float32).expand(1, n).reshape(n)
    out = cpu_float8_mm.weight_mm_prechecked(rows, b.t(), w_scale, bias)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def float8_mm_torch(a, b, a_scale, b_scale, bias, out_dtype):
    _check_args(a, b, a_scale, b_scale, bias, out_dtype)
    on_cpu = all(t is None or t.is_cpu for t in (a, b, a_scale, b_scale, bias))  # the kernel reads pointers
    if on_cpu and a.shape[0] > 0 and cpu_float8_mm.supports(a.shape[1]):
        return float8_mm_cpu_kernel(a, b, a_scale, b_scale, bias, out_dtype)
    aligned = a.shape[1] % SCALED_MM_MULTIPLE == 0 and b.shape[1] % SCALED_MM_MULTIPLE == 0
    # cuBLAS refuses e5m2 x e5m2 (one operand must be e4m3); the CPU build takes it.
    both_e5m2 = a.dtype == b.dtype == torch.float8_e5m2 and a.device.type == "cuda"
    if not aligned or both_e5m2 or not scaled_mm_works(a.device, out_dtype):
        return float8_mm_reference(a, b, a_scale, b_scale, bias, out_dtype)
    m, n = a.shape[0], b.shape[1]
    scale_a = a_scale.to(torch.float32).expand(m, 1).contiguous()
    scale_b = b_scale.to(torch.float32).expand(1, n).contiguous()
    bias = None if bias is None else bias.to(out_dtype)
    return torch._scaled_mm(
        a.contiguous(), b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype
    )


def _fake(a, b, a_scale, b_scale, bias, out_dtype):
    _check_args(a, b, a_scale, b_scale, bias, out_dtype)
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


LIB.define(
    "float8_mm(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor? bias, ScalarType out_dtype) "
    "-> Tensor",
    tags=TAGS,
)
LIB.impl("float8_mm", float8_mm_torch, "CompositeExplicitAutograd")
torch.library.register_fake("quanto_fx::float8_mm", _fake, lib=LIB)
float8_mm = torch.ops.quanto_fx.float8_mm.default
