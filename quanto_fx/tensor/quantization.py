"""Symmetric quantization arithmetic on plain tensors: value ranges, absmax scales, rounding.

Everything here is pure torch and works on any device. QTensor and the quantized modules build on it.
"""

from __future__ import annotations

import torch

from ..qtypes import get_qtype, qtype

# Storage dtypes a QTensor may hold: integers, and float8 (values scaled into the float8 range).
INT_DTYPES = (torch.int8, torch.int16, torch.int32)
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


# Significand bits of the float dtypes: every integer up to 2**bits is exact in them.
_SIGNIFICAND_BITS = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


def _holding_codes(dtype: torch.dtype, qmax: float) -> torch.dtype:
    """``dtype`` when it holds every integer code up to ``qmax`` exactly, else float64, which holds every
    int32 (int32 codes in float32, int16 codes in 16-bit floats): there the clamp bound itself would round up
    (2**31 - 1 to 2**31, 32767 to 32768 in bfloat16) and the cast wrap to -qmax - 1."""
    return dtype if qmax < 2 ** _SIGNIFICAND_BITS.get(dtype, 0) else torch.float64


def round_and_clamp(x: torch.Tensor, qmin: float, qmax: float, dtype: torch.dtype) -> torch.Tensor:
    """Round half to even, saturate to [qmin, qmax] and cast to ``dtype`` (float8: the cast rounds).

    In place on ``x``, a temporary of the caller's: freezing a layer then holds one float temporary of its
    weight, not two. Integer codes that x's dtype does not hold are rounded in float64 (exact: the round
    gives what it would in x's dtype).
    """
    if dtype in FLOAT8_DTYPES:
        return x.clamp_(qmin, qmax).to(dtype)
    return x.to(_holding_codes(x.dtype, qmax)).round_().clamp_(qmin, qmax).to(dtype)


def quantize_data(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    """Integer data of ``x`` at ``scale``: ``clamp(round(x / scale), qmin, qmax)``.

    Divided in x's dtype (for int8 and float8 codes, the arithmetic the C++ and Triton kernels reproduce
    bit for bit), except where it does not hold every code (int32 codes of float32 x, int16 / int32 codes of
    16-bit x): there in float64 (float16 would also overflow past 65504 to inf, bfloat16 keeps 8 bits).
    """
    wide = x.dtype if dtype in FLOAT8_DTYPES else _holding_codes(x.dtype, qmax)
    if wide != x.dtype:
        x, scale = x.to(wide), scale.to(wide)
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
