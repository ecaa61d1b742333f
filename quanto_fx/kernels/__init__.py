"""Fused integer ops as ``torch.library`` ops in the ``quanto_fx`` namespace; importing this registers them.

- ``torch.ops.quanto_fx.int8_mm_rescale``: int8 GEMM -> float (per-row x per-column scales, bias, relu).
- ``torch.ops.quanto_fx.int8_mm_requantize``: int8 GEMM -> int8 (int32 bias, output scale, relu).
- ``torch.ops.quanto_fx.int8_weight_mm`` / ``float8_weight_mm`` / ``lowbit_weight_mm``: weight-only GEMMs,
  float activations times int8, float8 or packed int4 / int2 weights (``weight_only.py``).
- ``torch.ops.quanto_fx.float8_mm``: float8 x float8 GEMM, per-row x per-column scales (``float8_mm.py``).
- ``torch.ops.quanto_fx.int8_dynamic_mm`` / ``float8_dynamic_mm``: float x quantized per row to int8 /
  float8, times an int8 / float8 weight, rescaled: a linear layer with dynamic activations in one op
  (``dynamic_mm.py``).

Each op has one schema, a pure-torch reference (the int8 GEMMs' in ``reference.py``, the others beside their
op), a fake implementation, and a torch implementation for the CPU and any other device. On CUDA the int8
GEMMs and the weight-only GEMMs run Triton kernels (the epilogue fused into the GEMM); ``float8_mm`` and
``float8_dynamic_mm`` run ``torch._scaled_mm``, and ``int8_dynamic_mm`` quantizes x with torch ops, then runs
``int8_mm_rescale``. The ops are opaque to inductor, which calls them as extern kernels.
"""

from importlib.util import find_spec

from .dynamic_mm import float8_dynamic_mm, int8_dynamic_mm
from .float8_mm import float8_mm
from .int8_mm_requantize import int8_mm_requantize
from .int8_mm_rescale import int8_mm_rescale
from .library import LIB
from .reference import int8_mm_requantize_reference, int8_mm_rescale_reference
from .weight_only import (
    float8_weight_mm,
    float8_weight_mm_cuda,
    int8_weight_mm,
    int8_weight_mm_cuda,
    lowbit_weight_mm,
    lowbit_weight_mm_cuda,
)

# triton is optional (absent on macOS, Windows and most CPU-only installs): without it the CUDA path is the
# torch implementation (cuBLAS _int_mm, then the epilogue).
HAS_TRITON = find_spec("triton") is not None
if HAS_TRITON:
    from .triton_launch import int8_mm_requantize_triton, int8_mm_rescale_triton

    LIB.impl("int8_mm_rescale", int8_mm_rescale_triton, "CUDA")
    LIB.impl("int8_mm_requantize", int8_mm_requantize_triton, "CUDA")
    LIB.impl("lowbit_weight_mm", lowbit_weight_mm_cuda, "CUDA")
    LIB.impl("int8_weight_mm", int8_weight_mm_cuda, "CUDA")
    LIB.impl("float8_weight_mm", float8_weight_mm_cuda, "CUDA")

__all__ = [
    "float8_dynamic_mm",
    "float8_mm",
    "float8_weight_mm",
    "HAS_TRITON",
    "int8_dynamic_mm",
    "int8_mm_requantize",
    "int8_mm_requantize_reference",
    "int8_mm_rescale",
    "int8_mm_rescale_reference",
    "int8_weight_mm",
    "lowbit_weight_mm",
]
