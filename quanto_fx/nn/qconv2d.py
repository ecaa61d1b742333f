"""QConv2d: int8 or float8 weights (per output channel) and static or dynamic int8 activations."""

from __future__ import annotations

import torch

from ..qtypes import get_qtype, qint8
from ..tensor import PACKED_QTYPES, QTensor
from .qmodule import DEFAULT_GROUP_SIZE, QModuleMixin, float_value, register_qmodule


@register_qmodule(torch.nn.Conv2d)
class QConv2d(QModuleMixin, torch.nn.Conv2d):
    """A quantized ``nn.Conv2d``.

    With static activations, the convolution runs as an exact int8 x int8 -> int32 GEMM over image patches
    (see ``quanto_fx/tensor/ops_conv.py``; groups == 1, zero padding) and the result is requantized to int8
    at ``out_scale``. Dynamic mode uses one scale per image. Other configurations compute in float on
    dequantized values (correct, slower).
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        padding_mode="zeros",
        device=None,
        dtype=None,
        weights=qint8,
        activations=qint8,
        activation_mode="static",
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self.init_quantization(weights, activations, activation_mode, device=device)

    @classmethod
    def from_module(
        cls, module, weights=qint8, activations=qint8, activation_mode="static", group_size=DEFAULT_GROUP_SIZE
    ):
        if weights is not None and get_qtype(weights) in PACKED_QTYPES:
            raise ValueError(
                f"Conv2d layers take qint8 or float8 weights, not {get_qtype(weights).name} (group-wise "
                "packed weights are for Linear and Embedding layers); exclude the convolutions or quantize "
                "them separately"
            )
        with torch.device("meta"):
            qmodule = cls(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                module.bias is not None,
                module.padding_mode,
                weights=weights,
                activations=activations,
                activation_mode=activation_mode,
            )
        return qmodule.take_parameters_of(module)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.activation_qtype is None:
            return self._conv_forward(float_value(input), float_value(self.qweight), self.bias)
        if self.activation_mode == "dynamic":
            x = float_value(input)
            # One scale per image (the conv analogue of per-token scales).
            per_image = QTensor.quantize(x, self.activation_qtype, axis=0) if x.ndim == 4 else x
            out = self._conv_forward(per_image, self.qweight, self.bias)
            return float_value(out)
        return self.quantize_output(self._conv_forward(self.quantize_input(input), self.qweight, self.bias))
