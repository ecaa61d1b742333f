"""quanto_fx: quantize PyTorch models to integers that run fast in eager mode and under torch.compile."""

from .calibrate import calibrate, calibration
from .debug import LayerReport, layer_report
from .mixed_precision import PrecisionPlan, choose_precision
from .qtypes import get_qtype, qfloat8_e4m3fn, qfloat8_e5m2, qint2, qint4, qint8, qtype, qtypes
from .quantize import freeze, quantization_map, quantize, requantize
from .serialization import load, save
from .tensor import PackedQTensor, QTensor, fallback_counts, reset_fallback_counts

__version__ = "0.1.0"


def __getattr__(name: str):
    # The compiler side loads inductor: keep `import quanto_fx` light and load it on first use.
    if name == "explain":
        from .backend import explain

        return explain
    if name in ("backend", "passes", "kernels"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LayerReport",
    "PackedQTensor",
    "PrecisionPlan",
    "QTensor",
    "calibrate",
    "calibration",
    "choose_precision",
    "explain",
    "fallback_counts",
    "freeze",
    "get_qtype",
    "layer_report",
    "load",
    "qfloat8_e4m3fn",
    "qfloat8_e5m2",
    "qint2",
    "qint4",
    "qint8",
    "qtype",
    "qtypes",
    "quantization_map",
    "quantize",
    "requantize",
    "reset_fallback_counts",
    "save",
]
