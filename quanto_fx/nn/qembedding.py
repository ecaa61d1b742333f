"""QEmbedding: an embedding table, int8 / float8 weights per row or packed int4 / int2 weights per group."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..qtypes import get_qtype, qint8
from ..tensor import PACKED_QTYPES
from ..tensor.groupwise import check_group_size
from .qmodule import DEFAULT_GROUP_SIZE, QModuleMixin, float_value, register_qmodule


@register_qmodule(torch.nn.Embedding)
class QEmbedding(QModuleMixin, torch.nn.Embedding):
    """A quantized ``nn.Embedding``: weight-only, whatever the activation setting.

    int8 / float8 weights get one scale per row (per vocabulary entry); int4 / int2 weights one scale and
    zero per ``group_size`` embedding features. A lookup dequantizes only the rows it reads and returns them
    in float: embedding outputs feed additions and norms, not GEMMs, so nothing is gained by quantizing them.
    """

    GEMM_WEIGHT = False  # looked up by row, never multiplied: no GEMM kernel layout for packed weights

    def __init__(
        self,
        num_embeddings,
        embedding_dim,
        padding_idx=None,
        max_norm=None,
        norm_type=2.0,
        scale_grad_by_freq=False,
        sparse=False,
        device=None,
        dtype=None,
        weights=qint8,
        activations=None,
        activation_mode="static",
        group_size=DEFAULT_GROUP_SIZE,
    ):
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx,
            max_norm,
            norm_type,
            scale_grad_by_freq,
            sparse,
            device=device,
            dtype=dtype,
        )
        # Outputs stay float: an activation setting is accepted (quantize passes one to every module), unused.
        self.init_quantization(weights, None, activation_mode, device=device, group_size=group_size)

    @classmethod
    def from_module(
        cls, module, weights=qint8, activations=None, activation_mode="static", group_size=DEFAULT_GROUP_SIZE
    ):
        if module.max_norm is not None:
            raise ValueError(
                "an Embedding with max_norm renormalizes its weight in place; it cannot be quantized"
            )
        if weights is not None and get_qtype(weights) in PACKED_QTYPES:
            check_group_size(group_size, module.embedding_dim)
        with torch.device("meta"):
            qmodule = cls(
                module.num_embeddings,
                module.embedding_dim,
                module.padding_idx,
                None,
                module.norm_type,
                module.scale_grad_by_freq,
                module.sparse,
                weights=weights,
                activation_mode=activation_mode,
                group_size=group_size,
            )
        return qmodule.take_parameters_of(module)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.qweight
        if weight is not None and weight.requires_grad:
            weight = float_value(weight)  # training the float table: straight-through gradients
        return F.embedding(
            input, weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
