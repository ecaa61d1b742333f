"""QuantizedTensor: what every quantized tensor subclass shares, chiefly the dequantize fallback.

Subclasses (QTensor, PackedQTensor) stand for float tensors: an aten op without an integer handler runs on
their dequantized values, which is always correct, and is counted (:func:`dispatch.fallback_counts`).
"""

from __future__ import annotations

import hashlib

import torch
from torch.utils._pytree import tree_map

from .dispatch import count_fallback


class QuantizedTensor(torch.Tensor):
    """Base class of the quantized tensor subclasses; ``dequantized()`` gives the float value."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def dequantized(self) -> torch.Tensor:
        """The float value, without autograd (for use below the dispatcher)."""
        raise NotImplementedError

    # Names of the inner tensors a checkpoint stores (kernel layouts, rebuilt on load, are not among them).
    STORED: tuple[str, ...] = ()

    def nbytes_in_memory(self) -> int:
        """Bytes of memory the inner tensors take (data, scales and any kernel layout)."""
        names, _ = self.__tensor_flatten__()
        return sum(_nbytes(getattr(self, name)) for name in names)

    def nbytes_stored(self) -> int:
        """Bytes a checkpoint stores for this tensor."""
        return sum(_nbytes(getattr(self, name)) for name in self.STORED)

    def _stable_hash_for_caching(self) -> str:
        """AOTAutograd's cache key for this tensor (torch >= 2.12 asks subclasses for it, and warns once
        per class on every compile when it is missing): what a compiled graph depends on, the class, shape,
        metadata and the inner tensors' dtypes, shapes, strides and devices; never the values."""
        names, meta = self.__tensor_flatten__()
        inner = [(n, (t := getattr(self, n)).dtype, t.shape, t.stride(), str(t.device)) for n in names]
        key = repr((type(self).__qualname__, tuple(self.shape), self.requires_grad, meta, inner))
        return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def parameter_like(original: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
    """``copy`` wrapped as an nn.Parameter when ``original`` is one (for ``__deepcopy__``).

    nn.Parameter(subclass instance) returns the instance itself flagged ``_is_param``; a deep copy without the
    flag is a plain tensor, which module attribute assignment and ``load_state_dict(assign=True)`` refuse.
    """
    if isinstance(original, torch.nn.Parameter):
        return torch.nn.Parameter(copy, requires_grad=original.requires_grad)
    return copy


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def dequantize_value(x):
    """``x`` dequantized if it is a quantized tensor (without autograd, below the dispatcher), else ``x``."""
    return x.dequantized() if isinstance(x, QuantizedTensor) else x


def dequantize_fallback(func, args, kwargs):
    """Run ``func`` on the dequantized arguments: always correct, counted per op.

    Raises:
        NotImplementedError: ``func`` would write into a quantized tensor (its integer data cannot take it).
    """
    if func._schema.is_mutable:
        schema_args = func._schema.arguments
        named_args = dict(zip([a.name for a in schema_args], args, strict=False)) | kwargs
        mutated = [a.name for a in schema_args if a.alias_info is not None and a.alias_info.is_write]
        targets = [named_args.get(n) for n in mutated]
        target = next((t for t in targets if isinstance(t, QuantizedTensor)), None)
        if target is not None:
            raise NotImplementedError(
                f"{func} would modify a {type(target).__name__} in place; it supports no in-place "
                f"{func.overloadpacket.__name__} (use the out-of-place op or dequantize() first)"
            )
    count_fallback(func)
    return func(*tree_map(dequantize_value, args), **tree_map(dequantize_value, kwargs))
