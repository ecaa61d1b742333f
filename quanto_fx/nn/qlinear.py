"""QLinear: int8 weights (per output channel) and static or dynamic int8 activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..qtypes import qint8
from ..tensor import QTensor
from .qmodule import QModuleMixin, float_value, register_qmodule


@register_qmodule(torch.nn.Linear)
class QLinear(QModuleMixin, torch.nn.Linear):
    """A quantized ``nn.Linear``.

    - weight-only (``activations=None``): float input times the dequantized int8 weight.
    - static: input quantized at ``in_scale``, int8 x int8 -> int32 (``aten._int_mm``) plus an int32 bias
      (at scale ``in_scale * weight_scale``), requantized to an int8 QTensor at ``out_scale``.
    - dynamic: per-token int8 input scales computed at run time; int32 accumulation rescaled to float.
    """

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        device=None,
        dtype=None,
        weights=qint8,
        activations=qint8,
        activation_mode="static",
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.init_quantization(weights, activations, activation_mode, device=device)

    @classmethod
    def from_module(cls, module, weights=qint8, activations=qint8, activation_mode="static"):
        with torch.device("meta"):
            qmodule = cls(
                module.in_features,
                module.out_features,
                module.bias is not None,
                weights=weights,
                activations=activations,
                activation_mode=activation_mode,
            )
        return qmodule.take_parameters_of(module)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.activation_qtype is None:
            return F.linear(float_value(input), float_value(self.qweight), self.bias)
        if self.activation_mode == "dynamic":
            x = float_value(input)
            rows = QTensor.quantize(x.reshape(-1, x.shape[-1]), self.activation_qtype, axis=0)
            out = F.linear(rows, self.qweight, self.bias)  # per-row x per-column scales: float out
            return out.reshape(*x.shape[:-1], self.out_features)
        return self.quantize_output(F.linear(self.quantize_input(input), self.qweight, self.bias))
