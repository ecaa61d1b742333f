"""The eager QTensor runtime: QTensor, its aten-op handlers and the dequantize fallback."""

from . import ops_arithmetic, ops_conv, ops_matmul, ops_shape  # noqa: F401  (registers the handlers)
from .dispatch import HANDLERS, fallback_counts, reset_fallback_counts
from .integer_matmul import int8_mm
from .qtensor import QTensor

__all__ = ["QTensor", "HANDLERS", "fallback_counts", "reset_fallback_counts", "int8_mm"]
