"""Pure-torch references of the fused int8 ops: the specification every implementation is tested against.

They spell the math out step by step and favour clarity over speed. Scales (and a float bias) are applied in
float32 whatever their own float dtype.
"""

from __future__ import annotations

import torch

# kernels/ sits below tensor/: import the module itself, not the tensor package, so that tensor/ may one day
# import kernels/ without a cycle.
from ..tensor.integer_matmul import int8_mm

# Symmetric int8 range: [-127, 127], as everywhere in quanto_fx.
INT8_QMAX = 127


def requantize_multiplier(
    a_scale: torch.Tensor, b_scale: torch.Tensor, out_scale: torch.Tensor
) -> torch.Tensor:
    """``a_scale * b_scale / out_scale`` in float32, in this order (every implementation rounds alike)."""
    multiplier = a_scale.to(torch.float32) * b_scale.to(torch.float32)
    return multiplier.div_(out_scale.to(torch.float32))  # in place: an (M, N) product is large


def int8_mm_rescale_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    relu: bool = False,
) -> torch.Tensor:
    """``((a @ b) * a_scale * b_scale [+ bias]) [relu]`` in float32, cast to ``out_dtype``.

    ``a @ b`` is the exact int32 product of int8 ``a`` (M, K) and ``b`` (K, N); ``a_scale`` is 0-d or (M, 1),
    ``b_scale`` 0-d or (1, N), ``bias`` None or float (N,).
    """
    out = int8_mm(a, b).to(torch.float32) * a_scale.to(torch.float32) * b_scale.to(torch.float32)
    if bias is not None:
        out = out + bias.to(torch.float32)
    if relu:
        out = torch.relu(out)
    return out.to(out_dtype)


def int8_mm_requantize_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_scale: torch.Tensor,
    relu: bool = False,
) -> torch.Tensor:
    """``clamp(round_half_even((a @ b [+ bias]) * (a_scale * b_scale / out_scale)), -127 or 0, 127)`` as int8.

    ``bias`` is None or int32 (N,) at scale ``a_scale * b_scale``; ``out_scale`` is 0-d; ``relu`` raises the
    lower bound to 0. The float part is float32 (see ``requantize_multiplier``).
    """
    acc = int8_mm(a, b)
    if bias is not None:
        acc = acc + bias
    out = acc.to(torch.float32) * requantize_multiplier(a_scale, b_scale, out_scale)
    return torch.round(out).clamp(0 if relu else -INT8_QMAX, INT8_QMAX).to(torch.int8)
