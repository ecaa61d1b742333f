"""Quantized normalization layers: float math, int8 outputs at ``out_scale`` under static activations.

Normalizations keep float weights (they are tiny and sensitive); what quantization buys is an int8 output
that the next quantized matmul consumes directly.
"""

from __future__ import annotations

import copy
import itertools
import warnings

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
    """Llama-style RMSNorm classes of model libraries: a 1-d ``weight``, a ``variance_epsilon``/``eps``, and a
    forward that computes what QRMSNorm computes (``_computes_like_qrmsnorm``)."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, torch.nn.Parameter)
        and weight.ndim == 1
        and isinstance(eps, float)
        and _computes_like_qrmsnorm(module)
    )


def _computes_like_qrmsnorm(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward computes ``weight * x / sqrt(mean(x^2) + eps)``, as QRMSNorm does.

    The name and attributes do not tell: Gemma-family RMSNorms (Gemma 1-3, Qwen3-Next, ...) compute
    ``(1 + weight) * x_hat`` with weight initialized to zeros. So a float32 CPU copy of the module with random
    parameters (a weight of zeros or ones would hide the difference) and its QRMSNorm twin run on one probe
    input and must agree. A module that fails the probe stays float, with a warning that says why.
    """
    generator = torch.Generator().manual_seed(0)  # deterministic, and the global RNG is left alone
    try:
        probe = _random_float32_copy(module, generator)
        x = torch.randn(3, probe.weight.shape[0], generator=generator, dtype=torch.float32, device="cpu")
        with torch.no_grad():
            # The class's forward, past hooks (an offloading hook would load the real weight back in).
            expected = type(module).forward(probe, x)
            got = QRMSNorm.from_module(probe, activations=None)(x)
        same = isinstance(expected, torch.Tensor) and torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
        reason = "its output is not weight * x / sqrt(mean(x^2) + eps) (Gemma's is (1 + weight) * x_hat)"
    except Exception as e:  # a forward the probe cannot call (other arguments, shapes): not recognized
        same, reason = False, f"probing its forward failed ({type(e).__name__}: {e})"
    if not same:
        warnings.warn(
            f"{type(module).__name__} is named like an RMSNorm but stays float: {reason}. A class that "
            "QRMSNorm does compute can be registered with quanto_fx.nn.register_qmodule(cls)(QRMSNorm).",
            stacklevel=2,
        )
    return same


def _random_float32_copy(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """A float32 CPU copy of ``module`` (of a meta skeleton too) whose parameters hold random values."""
    probe = copy.deepcopy(module)
    on_meta = any(t.is_meta for t in itertools.chain(probe.parameters(), probe.buffers()))
    probe = probe.to_empty(device="cpu") if on_meta else probe.cpu()
    probe.float()
    with torch.no_grad():
        if on_meta:
            for buffer in probe.buffers():
                buffer.zero_()  # to_empty left them uninitialized
        for parameter in probe.parameters():
            values = torch.rand(parameter.shape, generator=generator, dtype=torch.float32, device="cpu")
            parameter.copy_(values * 2 - 0.5)
    return probe


@register_qmodule(_is_rms_norm_like)
@register_qmodule(torch.nn.RMSNorm)
class QRMSNorm(QNormMixin, torch.nn.RMSNorm):
    """A quantized RMSNorm, for ``torch.nn.RMSNorm`` and Llama-style RMSNorm modules of model libraries.

    Computes ``weight * x / sqrt(mean(x^2) + eps)`` in float32 and rounds once, to the input dtype, as
    ``torch.nn.RMSNorm`` does. HF's LlamaRMSNorm rounds ``x_hat`` to the input dtype before multiplying by the
    weight, and returns the promoted dtype (float32 for a float32 weight on bfloat16 inputs): QRMSNorm keeps
    the input dtype, the one the layers after it (quantized or not) compute in. Library classes named like
    an RMSNorm are replaced only when they compute the same (see ``_computes_like_qrmsnorm``).
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
