"""The eager runtime: QTensor (int8 and float8) and PackedQTensor (int4, int2 weights), their aten-op handlers
and the dequantize fallback."""

from . import ops_arithmetic, ops_conv, ops_matmul, ops_shape  # noqa: F401  (registers the handlers)
from .dispatch import HANDLERS, fallback_counts, reset_fallback_counts
from .integer_matmul import int8_mm
from .packed_qtensor import PACKED_QTYPES, PackedQTensor
from .qtensor import QTensor

__all__ = [
    "QTensor",
    "PackedQTensor",
    "PACKED_QTYPES",
    "HANDLERS",
    "fallback_counts",
    "reset_fallback_counts",
    "int8_mm",
]
