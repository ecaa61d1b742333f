"""``quanto_fx::int8_mm_requantize``: int8 GEMM with the int32 -> int8 requantization fused after it.

Importing this module defines the op. Its default implementation (CPU and any device without a better one)
is the torch path below; CUDA gets the Triton kernel when triton is installed (see ``__init__``).
"""

from __future__ import annotations

import torch

from ..tensor.integer_matmul import int8_gemm
from .checks import check_requantize_args
from .library import LIB, TAGS
from .reference import INT8_QMAX, requantize_multiplier

OPNAME = "int8_mm_requantize"
SCHEMA = (
    "(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor? bias, Tensor out_scale, "
    "bool relu=False) -> Tensor"
)


def int8_mm_requantize_torch(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_scale: torch.Tensor,
    relu: bool = False,
) -> torch.Tensor:
    """``clamp(round_half_even((a @ b [+ bias]) * (a_scale * b_scale / out_scale)), lo, 127)`` as int8.

    ``a``, ``b``, ``a_scale``, ``b_scale`` as for ``int8_mm_rescale``; ``bias`` None or int32 (N,) already
    quantized at scale ``a_scale * b_scale``; ``out_scale`` 0-d float; ``lo`` is -127, or 0 with ``relu``.
    Bit-exact with ``reference.int8_mm_requantize_reference``.
    """
    check_requantize_args(a, b, a_scale, b_scale, bias, out_scale)
    acc = int8_gemm(a, b)  # operands checked above
    if bias is not None:
        acc.add_(bias)  # acc is a fresh buffer (or a fresh slice of one on CUDA): safe to update in place
    # The reference's steps, in place on one float32 buffer. Clamping before rounding gives the same result
    # (the bounds are integers and rounding is monotonic).
    # Not built: a prepacked oneDNN int8 linear with int8 output and fused post-ops would do this in one call.
    # int32 * float32 -> float32: the conversion rides along with the multiplication, one pass
    out = torch.mul(acc, requantize_multiplier(a_scale, b_scale, out_scale))
    out.clamp_(0 if relu else -INT8_QMAX, INT8_QMAX).round_()
    return out.to(torch.int8)


def _fake(a, b, a_scale, b_scale, bias, out_scale, relu=False):
    check_requantize_args(a, b, a_scale, b_scale, bias, out_scale)
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int8)


LIB.define(OPNAME + SCHEMA, tags=TAGS)
LIB.impl(OPNAME, int8_mm_requantize_torch, "CompositeExplicitAutograd")
torch.library.register_fake(f"quanto_fx::{OPNAME}", _fake, lib=LIB)
int8_mm_requantize = torch.ops.quanto_fx.int8_mm_requantize.default
