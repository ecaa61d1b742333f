"""Quantized modules and the registry mapping float modules to them."""

from .qconv2d import QConv2d
from .qembedding import QEmbedding
from .qlinear import QLinear
from .qmodule import QModuleMixin, qmodule_class_for, register_qmodule
from .qnorm import QLayerNorm, QRMSNorm

__all__ = [
    "QConv2d",
    "QEmbedding",
    "QLayerNorm",
    "QLinear",
    "QModuleMixin",
    "QRMSNorm",
    "qmodule_class_for",
    "register_qmodule",
]
