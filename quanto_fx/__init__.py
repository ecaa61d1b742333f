"""quanto_fx: quantize PyTorch models to integers that run fast in eager mode and under torch.compile."""

from .qtypes import get_qtype, qfloat8_e4m3fn, qfloat8_e5m2, qint2, qint4, qint8, qtype, qtypes
from .tensor import QTensor, fallback_counts, reset_fallback_counts

__version__ = "0.1.0"

__all__ = [
    "QTensor",
    "fallback_counts",
    "get_qtype",
    "qfloat8_e4m3fn",
    "qfloat8_e5m2",
    "qint2",
    "qint4",
    "qint8",
    "qtype",
    "qtypes",
    "reset_fallback_counts",
]
