"""``quanto_fx::int8_mm_rescale``: int8 GEMM with the int32 -> float rescale (+ bias, relu) fused after it.

Importing this module defines the op. Its default implementation (CPU and any device without a better one)
is the torch path below; CUDA gets the Triton kernel when triton is installed (see ``__init__``).
"""

from __future__ import annotations

import torch

from ..tensor.integer_matmul import int8_gemm
from .checks import check_rescale_args
from .library import LIB, TAGS

OPNAME = "int8_mm_rescale"
SCHEMA = (
    "(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor? bias, ScalarType out_dtype, "
    "bool relu=False) -> Tensor"
)


def int8_mm_rescale_torch(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    relu: bool = False,
) -> torch.Tensor:
    """``((a @ b) * a_scale * b_scale [+ bias]) [relu]`` as ``out_dtype``, the int8 product exact in int32.

    ``a`` int8 (M, K); ``b`` int8 (K, N), any strides (typically a transposed (N, K) weight); ``a_scale``
    float 0-d or (M, 1) (per-token activation scales); ``b_scale`` float 0-d or (1, N) (per-output-channel
    weight scales); ``bias`` None or float (N,); ``out_dtype`` float32, float16 or bfloat16. The epilogue runs
    in float32 (see ``reference.int8_mm_rescale_reference``).
    """
    check_rescale_args(a, b, a_scale, b_scale, bias, out_dtype)
    # The reference's steps, in place on one float32 buffer: one pass each and no temporaries, where the
    # unfused chain allocates one (M, N) tensor per op. Same rounding as the reference, step for step.
    # Not built: a prepacked oneDNN int8 linear (qlinear_prepack + qlinear_pointwise, u8 activations) would
    # fuse the epilogue and skip aten._int_mm's per-call weight re-layout.
    acc = int8_gemm(a, b)  # operands checked above
    # int32 * float32 -> float32 in one pass: the conversion rides along with the first scale.
    out = torch.mul(acc, a_scale.to(torch.float32))
    out.mul_(b_scale.to(torch.float32))
    if bias is not None:
        out.add_(bias)
    if relu:
        out.relu_()
    return out.to(out_dtype)


def _fake(a, b, a_scale, b_scale, bias, out_dtype, relu=False):
    check_rescale_args(a, b, a_scale, b_scale, bias, out_dtype)
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


LIB.define(OPNAME + SCHEMA, tags=TAGS)
LIB.impl(OPNAME, int8_mm_rescale_torch, "CompositeExplicitAutograd")
torch.library.register_fake(f"quanto_fx::{OPNAME}", _fake, lib=LIB)
int8_mm_rescale = torch.ops.quanto_fx.int8_mm_rescale.default
