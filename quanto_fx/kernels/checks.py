"""Argument checks shared by every implementation of the fused ops (fake, torch and Triton): the int8 GEMMs'
operands, and the float x and bias of the weight-only GEMMs.

The fake implementation runs them too, so a malformed call fails while torch.compile traces, not at run time.
"""

from __future__ import annotations

import torch

from ..tensor.integer_matmul import check_int8_operands
from ..tensor.quantization import GEMM_FLOAT_DTYPES

# Float dtypes of a rescale's bias and output (the GEMMs' float dtypes); the math is float32 either way.
RESCALE_OUT_DTYPES = GEMM_FLOAT_DTYPES


def _check_scale(scale: torch.Tensor, name: str, vector_shape: tuple[int, int], device: torch.device) -> None:
    if not scale.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {scale.dtype}")
    if scale.ndim != 0 and tuple(scale.shape) != vector_shape:
        raise ValueError(f"{name} must be 0-d or shaped {vector_shape}, got {tuple(scale.shape)}")
    if scale.device != device:
        raise ValueError(f"{name} is on {scale.device} but the operands are on {device}")


def _check_int8_mm_args(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    bias_dtypes: tuple[torch.dtype, ...],
) -> None:
    """The operands shared by ``int8_mm_rescale`` and ``int8_mm_requantize``.

    ``a`` int8 (M, K), ``b`` int8 (K, N), ``a_scale`` float 0-d or (M, 1), ``b_scale`` float 0-d or (1, N),
    ``bias`` None or (N,) of one of ``bias_dtypes``; all on one device.
    """
    check_int8_operands(a, b)
    m, n = a.shape[0], b.shape[1]
    _check_scale(a_scale, "a_scale", (m, 1), a.device)
    _check_scale(b_scale, "b_scale", (1, n), a.device)
    if bias is None:
        return
    if bias.dtype not in bias_dtypes:
        raise TypeError(f"bias must have dtype in {[str(d) for d in bias_dtypes]}, got {bias.dtype}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be shaped ({n},), got {tuple(bias.shape)}")
    if bias.device != a.device:
        raise ValueError(f"bias is on {bias.device} but the operands are on {a.device}")


def check_rescale_args(a, b, a_scale, b_scale, bias, out_dtype: torch.dtype) -> None:
    """Check the arguments of ``int8_mm_rescale``: a float (N,) bias and a float ``out_dtype``."""
    _check_int8_mm_args(a, b, a_scale, b_scale, bias, bias_dtypes=RESCALE_OUT_DTYPES)
    if out_dtype not in RESCALE_OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in RESCALE_OUT_DTYPES]}, got {out_dtype}")


def check_requantize_args(a, b, a_scale, b_scale, bias, out_scale: torch.Tensor) -> None:
    """Check the arguments of ``int8_mm_requantize``: an int32 (N,) bias and a 0-d float ``out_scale``."""
    _check_int8_mm_args(a, b, a_scale, b_scale, bias, bias_dtypes=(torch.int32,))
    if not out_scale.is_floating_point() or out_scale.ndim != 0:
        shape = tuple(out_scale.shape)
        raise TypeError(f"out_scale must be a 0-d float tensor, got {out_scale.dtype} {shape}")
    if out_scale.device != a.device:
        raise ValueError(f"out_scale is on {out_scale.device} but the operands are on {a.device}")


def check_weight_only_x(
    x: torch.Tensor, in_features: int | None = None, device: torch.device | None = None
) -> None:
    """The x of a weight-only GEMM: a 2-d float32, float16 or bfloat16 (M, K) tensor; with ``in_features``
    and ``device``, K and the device of the weight."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in GEMM_FLOAT_DTYPES or x.ndim != 2:
        raise TypeError(
            f"x must be a 2-d float32, float16 or bfloat16 tensor, got {x.dtype} {tuple(x.shape)}"
        )
    if in_features is not None and x.shape[1] != in_features:
        raise ValueError(f"x has {x.shape[1]} features but the weight takes {in_features}")
    if device is not None and x.device != device:
        raise ValueError(f"x is on {x.device} but the weight is on {device}")


def check_weight_only_bias(bias: torch.Tensor | None, out_features: int, device: torch.device) -> None:
    """The bias of a weight-only GEMM: None, or ``out_features`` floats (any float dtype) on ``device``."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError(f"bias must be a float tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
    if tuple(bias.shape) != (out_features,) or bias.device != device:
        raise ValueError(
            f"bias must be a ({out_features},) tensor on {device}, got {tuple(bias.shape)} on {bias.device}"
        )
