"""Symmetric quantization arithmetic on plain tensors: value ranges, absmax scales, rounding.

Everything here is pure torch and works on any device. QTensor and the quantized modules build on it.
"""

from __future__ import annotations

import torch

from ..qtypes import get_qtype, qtype

# Storage dtypes a QTensor may hold: integers, and float8 (values scaled into the float8 range).
INT_DTYPES = (torch.int8, torch.int16, torch.int32)
# Codes x's float dtype may not hold: quantized in float64 (see quantize_data).
WIDE_INT_DTYPES = (torch.int16, torch.int32)
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
DATA_DTYPES = INT_DTYPES + FLOAT8_DTYPES
# Float dtypes the weight-only and low-bit GEMM kernels take as activations (and return).
GEMM_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def value_range(qdtype: torch.dtype | qtype | str) -> tuple[float, float, torch.dtype]:
    """Return ``(qmin, qmax, storage dtype)`` of a symmetric range: integers or a float8 format.

    The range is symmetric (``qmin == -qmax``, e.g. [-127, 127] for int8, +-448 for float8_e4m3fn) so that
    negation never saturates and zero needs no zero-point, as the seed's strict symmetric scheme requires.
    """
    if isinstance(qdtype, str):
        qdtype = get_qtype(qdtype)  # a qtype's name, as quantize() takes it
    if isinstance(qdtype, qtype):
        # The qtype's own qmin / qmax, computed from its dtype and bits as qtypes.py builds them: under
        # torch.compile, dynamo traces a float attribute that differed between recompiles of shared code
        # (two models' activation qtypes) as a graph input, where these stay constants the guards check.
        if qdtype.is_floating_point:
            qmax = torch.finfo(qdtype.dtype).max
            return -qmax, qmax, qdtype.dtype
        qmax = 2 ** (qdtype.bits - 1) - 1
        return -qmax, qmax, qdtype.dtype
    if qdtype in FLOAT8_DTYPES:
        qmax = torch.finfo(qdtype).max
        return -qmax, qmax, qdtype
    if qdtype not in INT_DTYPES:
        raise ValueError(
            f"unsupported quantized dtype {qdtype}; expected one of {[str(d) for d in DATA_DTYPES]} "
            "or a quanto_fx qtype"
        )
    qmax = torch.iinfo(qdtype).max
    return -qmax, qmax, qdtype


def normalize_axis(axis: int | None, ndim: int) -> int | None:
    """Return ``axis`` as a non-negative dimension index (None stays None)."""
    if axis is None:
        return None
    if not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(f"axis must be None or a dimension of a {ndim}-d tensor, got {axis!r}")
    return axis % ndim


def check_finite(values: torch.Tensor, what: str) -> None:
    """Raise ValueError when ``values`` holds NaN or +-Inf.

    Skipped while torch.compile traces, where a data-dependent branch would break the graph.
    """
    if torch.compiler.is_compiling() or values.is_meta:
        return
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{what} contains non-finite values (NaN or Inf); cannot quantize it")


def absmax(x: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """max |x| per tensor (0-d) or per slice along ``axis`` (keepdim shape), without an |x| temporary.

    max(-min, max) instead of abs().amax(): no full-size temporary (freezing a large layer stays light).
    Per axis it is amax and amin over the other dimensions: torch.aminmax with a dim ran 9x slower on CPU.
    """
    if x.numel() == 0:
        shape = () if axis is None else [x.shape[d] if d == axis else 1 for d in range(x.ndim)]
        return x.new_zeros(shape)
    if axis is None or x.ndim == 0:
        low, high = torch.aminmax(x)
        return torch.maximum(-low, high)
    dims = [d for d in range(x.ndim) if d != axis]
    if not dims:  # a 1-d tensor per element
        return x.abs()
    return torch.maximum(-x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True))


def absmax_scale(x: torch.Tensor, qmax: int, axis: int | None = None) -> torch.Tensor:
    """Scale that maps the absolute maximum of ``x`` (per tensor, or per slice along ``axis``) to ``qmax``.

    The result is a 0-d tensor for per-tensor scales, else shaped like ``x`` with size 1 on every dimension
    but ``axis`` (it broadcasts against ``x``). It is never zero: an all-zero slice gets the smallest
    normal float of ``x.dtype``, which quantizes it exactly to zeros.

    For int16 / int32, x's dtype may round ``qmax`` up (to 2**15 in float16 and bfloat16, 2**31 in float32):
    the absmax then lands one code past ``qmax`` and saturates to it. A float16 int32 scale is finfo.tiny
    (every float16 absmax / 2**31 is below it), so its codes stay below 2**30.
    """
    peak = absmax(x, axis)
    check_finite(peak, "input")
    return (peak / qmax).clamp_min(torch.finfo(x.dtype).tiny)


def round_and_clamp(x: torch.Tensor, qmin: float, qmax: float, dtype: torch.dtype) -> torch.Tensor:
    """Round half to even, saturate to [qmin, qmax] and cast to ``dtype`` (float8: the cast rounds).

    int16 / int32 codes are saturated in float64, which holds every int32: x's dtype may round ``qmax`` up
    (32767 to 32768 in bfloat16, 2**31 - 1 to 2**31 in float32), from where the cast wraps to -qmax - 1.
    """
    if dtype in FLOAT8_DTYPES:
        return x.clamp(qmin, qmax).to(dtype)
    if dtype in WIDE_INT_DTYPES:
        x = x.to(torch.float64)  # exact: the round gives what it would in x's dtype
    return torch.round(x).clamp_(qmin, qmax).to(dtype)


def quantize_data(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    """Integer data of ``x`` at ``scale``: ``clamp(round(x / scale), qmin, qmax)``.

    int8 and float8 codes divide in x's dtype: the arithmetic the C++ and Triton kernels reproduce bit for
    bit. int16 / int32 codes divide in float64, which holds them all: x's dtype may not (float16 overflows
    past 65504 to inf, bfloat16 keeps 8 bits).
    """
    if dtype in WIDE_INT_DTYPES:
        x, scale = x.to(torch.float64), scale.to(torch.float64)
    return round_and_clamp(x / scale, qmin, qmax, dtype)


def check_scale(scale: torch.Tensor, data: torch.Tensor, axis: int | None) -> None:
    """Check that ``scale`` is a float tensor of the shape a per-tensor or per-``axis`` scale must have."""
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError(
            f"scale must be a floating point tensor, got {type(scale).__name__}"
            f"{'' if not isinstance(scale, torch.Tensor) else ' of dtype ' + str(scale.dtype)}"
        )
    if scale.device != data.device:
        raise ValueError(f"scale is on {scale.device} but data is on {data.device}")
    if axis is None:
        if scale.ndim != 0:
            raise ValueError(f"a per-tensor scale must be 0-d, got shape {tuple(scale.shape)}")
        return
    expected = [1] * data.ndim
    expected[axis] = data.shape[axis]
    if list(scale.shape) != expected:
        raise ValueError(
            f"a scale along axis {axis} of data shaped {tuple(data.shape)} must have shape "
            f"{tuple(expected)}, got {tuple(scale.shape)}"
        )


def check_scale_values(scale: torch.Tensor) -> None:
    """Raise ValueError unless every scale is finite and strictly positive (skipped while compiling)."""
    if torch.compiler.is_compiling() or scale.is_meta:
        return
    check_finite(scale, "scale")
    if not bool((scale > 0).all()):
        raise ValueError(
            "scale must be strictly positive (symmetric quantization has no zero or negative scale)"
        )


def dequantize_data(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``data * scale`` in the scale's float dtype.

    int16 / int32 data (accumulators) is multiplied in at least float32 (``accumulator_float_dtype``):
    float16 cannot hold values past 65504 and bfloat16 keeps only 8 bits of them.
    """
    wide = accumulator_float_dtype(scale.dtype)
    if data.dtype == torch.int8 or scale.dtype == wide:
        return data.to(scale.dtype) * scale
    return (data.to(wide) * scale.to(wide)).to(scale.dtype)


def accumulator_float_dtype(scale_dtype: torch.dtype) -> torch.dtype:
    """The float dtype int16 / int32 data is scaled in: float32, or float64 for float64 scales (float32
    holds integers exactly only up to 2**24)."""
    return torch.promote_types(scale_dtype, torch.float32)
