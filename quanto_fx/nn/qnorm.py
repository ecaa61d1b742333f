"""Quantized normalization layers: float math, int8 outputs at ``out_scale`` under static activations.

Normalizations keep float weights (they are tiny and sensitive); what quantization buys is an int8 output
that the next quantized matmul consumes directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..qtypes import qint8
from .qmodule import QModuleMixin, float_value, register_qmodule


class QNormMixin(QModuleMixin):
    """Shared construction and output handling of the quantized norms (no quantized weights)."""

    GEMM_WEIGHT = False  # an elementwise scale: quantized outputs need no quantized weight

    def quantized_output(self, y: torch.Tensor) -> torch.Tensor:
        return self.quantize_output(y) if self.is_static else y

    def freeze(self) -> None:
        """Nothing to freeze: norm weights stay float."""

    @property
    def frozen(self) -> bool:
        return False


def _norm_settings(weights, activations, activation_mode):
    # Norm weights are never quantized; `weights` (and from_module's `group_size`) are accepted so that
    # quantize() can pass one setting to all.
    return None, activations, activation_mode


@register_qmodule(torch.nn.LayerNorm)
class QLayerNorm(QNormMixin, torch.nn.LayerNorm):
    """A quantized ``nn.LayerNorm`` (float computation, int8 output under static activations)."""

    def __init__(
        self,
        normalized_shape,
        eps=1e-5,
        elementwise_affine=True,
        bias=True,
        device=None,
        dtype=None,
        weights=None,
        activations=qint8,
        activation_mode="static",
    ):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.init_quantization(*_norm_settings(weights, activations, activation_mode), device=device)

    @classmethod
    def from_module(cls, module, weights=None, activations=qint8, activation_mode="static", group_size=None):
        with torch.device("meta"):
            qmodule = cls(
                module.normalized_shape,
                module.eps,
                module.elementwise_affine,
                module.bias is not None,
                activations=activations,
                activation_mode=activation_mode,
            )
        return qmodule.take_parameters_of(module)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(float_value(input), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.quantized_output(y)


def _is_rms_norm_like(module: torch.nn.Module) -> bool:
    """Llama-style RMSNorm classes of model libraries: a 1-d ``weight`` and a ``variance_epsilon``/``eps``."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, torch.nn.Parameter)
        and weight.ndim == 1
        and isinstance(eps, float)
    )


@register_qmodule(_is_rms_norm_like)
@register_qmodule(torch.nn.RMSNorm)
class QRMSNorm(QNormMixin, torch.nn.RMSNorm):
    """A quantized RMSNorm, for ``torch.nn.RMSNorm`` and Llama-style RMSNorm modules of model libraries.

    Computes ``weight * x / sqrt(mean(x^2) + eps)`` in float32 (as Llama does) and casts back to the
    input dtype.
    """

    def __init__(
        self,
        normalized_shape,
        eps=None,
        elementwise_affine=True,
        device=None,
        dtype=None,
        weights=None,
        activations=qint8,
        activation_mode="static",
    ):
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self.init_quantization(*_norm_settings(weights, activations, activation_mode), device=device)

    @classmethod
    def from_module(cls, module, weights=None, activations=qint8, activation_mode="static", group_size=None):
        if isinstance(module, torch.nn.RMSNorm):
            shape, eps, affine = module.normalized_shape, module.eps, module.elementwise_affine
        else:
            shape, eps, affine = tuple(module.weight.shape), getattr(module, "variance_epsilon", None), True
            eps = module.eps if eps is None else eps
        with torch.device("meta"):
            qmodule = cls(shape, eps, affine, activations=activations, activation_mode=activation_mode)
        return qmodule.take_parameters_of(module)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = float_value(input)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        weight = None if self.weight is None else self.weight.float()
        y = F.rms_norm(x.float(), self.normalized_shape, weight, eps).to(x.dtype)
        return self.quantized_output(y)
