"""PackedQTensor: an int4 / int2 weight, packed two or four codes per byte, with group-wise scales.

It stands for a float (out_features, in_features) weight or its transpose. ``F.linear(x, w)`` and
``x @ w.t()`` reach the weight-only GEMM op ``quanto_fx::lowbit_weight_mm`` (``quanto_fx.kernels``); every
other op runs on the dequantized value (counted, see ``fallback_counts``).
"""

from __future__ import annotations

import torch

from ..qtypes import get_qtype, qint2, qint4, qtype
from .base import QuantizedTensor, dequantize_fallback, parameter_like
from .groupwise import check_packed_weight, dequantize_groupwise, quantize_groupwise
from .packing import pack, unpack
from .quantization import FLOAT8_DTYPES, GEMM_FLOAT_DTYPES, check_finite, check_scale_values

__all__ = ["PackedQTensor", "PACKED_QTYPES", "check_packed_values"]

PACKED_QTYPES = (qint4, qint2)
aten = torch.ops.aten


def _check_qtype(wqtype: qtype | str) -> qtype:
    wqtype = get_qtype(wqtype)
    if wqtype not in PACKED_QTYPES:
        raise ValueError(f"PackedQTensor holds qint4 or qint2 weights, got {wqtype.name}")
    return wqtype


class PackedQTensor(QuantizedTensor):
    """A group-wise quantized low-bit weight (see :mod:`quanto_fx.tensor.groupwise` for the formula).

    Args:
        packed: uint8 (N, K * bits / 8), the portable packing of :mod:`quanto_fx.tensor.packing`.
        scale_zeros: float (K / group_size, N, 2): per group, the scale and the float zero. Its dtype is
            the tensor's dtype.
        wqtype: qint4 or qint2.
        group_size: input features per group.
        transposed: True when this stands for the (K, N) transpose (what ``w.t()`` returns).
        kernel: the packed weight in the layout of this device's int4 GEMM kernel, if any; derived from
            ``packed`` when None (never serialized: layouts differ between machines).
        gemm_layout: whether to keep that kernel layout at all (False for tables only looked up by row,
            such as embeddings: the layout would double their memory for no use).

    Raises:
        TypeError / ValueError: wrong dtypes, shapes that do not match each other, devices that differ.
    """

    _packed: torch.Tensor
    _scale_zeros: torch.Tensor
    _kernel: torch.Tensor | None
    STORED = ("_packed", "_scale_zeros")

    @staticmethod
    def __new__(
        cls,
        packed,
        scale_zeros,
        wqtype,
        group_size,
        transposed=False,
        kernel=None,
        requires_grad=False,
        gemm_layout=True,
    ):
        wqtype = _check_qtype(wqtype)
        out_features, in_features = check_packed_weight(packed, scale_zeros, wqtype.bits, group_size)
        shape, strides = (out_features, in_features), (in_features, 1)
        if transposed:
            shape, strides = (in_features, out_features), (1, in_features)
        return torch.Tensor._make_wrapper_subclass(
            cls,
            shape,
            strides=strides,
            dtype=scale_zeros.dtype,
            device=packed.device,
            requires_grad=requires_grad,
        )

    def __init__(
        self,
        packed,
        scale_zeros,
        wqtype,
        group_size,
        transposed=False,
        kernel=None,
        requires_grad=False,
        gemm_layout=True,
    ):
        self._packed = packed
        self._scale_zeros = scale_zeros
        self.qtype = _check_qtype(wqtype)
        self.group_size = group_size
        self.transposed = transposed
        self.gemm_layout = gemm_layout
        if kernel is None and gemm_layout:
            from ..kernels.weight_only import lowbit_kernel_layout

            kernel = lowbit_kernel_layout(packed, self.qtype.bits, group_size)
        self._kernel = kernel

    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,
        wqtype: qtype | str = qint4,
        group_size: int = 128,
        shift: bool = True,
        gemm_layout: bool = True,
    ):
        """Quantize a float (out_features, in_features) weight group-wise and pack it.

        Gradients flow straight through (quantization-aware training of the float weight).

        Raises:
            ValueError: not 2-d, a group size that is not a power of two dividing in_features, non-finite
                values, a qtype other than qint4 / qint2.
        """
        from .autograd import QuantizePackedSTE

        wqtype = _check_qtype(wqtype)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"PackedQTensor.quantize expects a floating point tensor, got {weight!r:.60}")
        return QuantizePackedSTE.apply(weight, wqtype, group_size, shift, gemm_layout)

    @classmethod
    def from_float(cls, weight, wqtype, group_size, shift, gemm_layout=True) -> PackedQTensor:
        """:meth:`quantize` without autograd."""
        codes, scale_zeros = quantize_groupwise(weight.detach(), wqtype.bits, group_size, shift)
        return cls(pack(codes, wqtype.bits), scale_zeros, wqtype, group_size, gemm_layout=gemm_layout)

    def codes(self) -> torch.Tensor:
        """The unsigned uint8 codes, (out_features, in_features)."""
        return unpack(self._packed, self.qtype.bits)

    def dequantized(self) -> torch.Tensor:
        values = dequantize_groupwise(self.codes(), self._scale_zeros, self.qtype.bits)
        return values.t() if self.transposed else values

    def dequantize(self) -> torch.Tensor:
        """The float weight (gradients flow straight through)."""
        from .autograd import DequantizeSTE

        return DequantizeSTE.apply(self)

    @property
    def scale(self) -> torch.Tensor:
        """Per-group scales, (out_features, in_features / group_size)."""
        return self._scale_zeros[..., 0].t()

    @property
    def zero(self) -> torch.Tensor:
        """Per-group float zeros (all zero for symmetric quantization), shaped like ``scale``."""
        return self._scale_zeros[..., 1].t()

    def _like(self, packed=None, scale_zeros=None, transposed=None, kernel=None) -> PackedQTensor:
        """A PackedQTensor with some parts replaced (the kernel layout is kept when ``packed`` is)."""
        if packed is None:
            packed, kernel = self._packed, self._kernel
        return PackedQTensor(
            packed,
            self._scale_zeros if scale_zeros is None else scale_zeros,
            self.qtype,
            self.group_size,
            self.transposed if transposed is None else transposed,
            kernel,
            gemm_layout=self.gemm_layout,
        )

    # -- tensor-subclass protocol ---------------------------------------------------------------------

    def __repr__(self, *, tensor_contents=None) -> str:
        return (
            f"PackedQTensor({self.qtype.name}, shape={tuple(self.shape)}, group_size={self.group_size}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    def __tensor_flatten__(self):
        names = ["_packed", "_scale_zeros"] + (["_kernel"] if self._kernel is not None else [])
        return names, (self.qtype.name, self.group_size, self.transposed, self.gemm_layout)

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        name, group_size, transposed, gemm_layout = meta
        return PackedQTensor(
            inner_tensors["_packed"],
            inner_tensors["_scale_zeros"],
            name,
            group_size,
            transposed,
            inner_tensors.get("_kernel"),
            gemm_layout=gemm_layout,
        )

    def __reduce_ex__(self, protocol):
        # A registered module-level rebuild function: torch.load(weights_only=True) restores it without
        # unpickling arbitrary objects. The kernel layout is rebuilt on load, for the loading machine.
        return _rebuild_packed_qtensor, (
            self._packed,
            self._scale_zeros,
            self.qtype.name,
            self.group_size,
            self.transposed,
            self.requires_grad,
            self.gemm_layout,
        )

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            copy = self._like(self._packed.clone(), self._scale_zeros.clone())
            memo[id(self)] = parameter_like(self, copy.requires_grad_(self.requires_grad))
        return memo[id(self)]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func.overloadpacket)
        if handler is not None:
            result = handler(func, *args, **kwargs)
            if result is not NotImplemented:
                return result
        return dequantize_fallback(func, args, kwargs)


def check_packed_values(w: PackedQTensor) -> None:
    """Raise ValueError unless every scale is finite and positive and every zero finite (loaders call it)."""
    check_scale_values(w.scale)
    check_finite(w.zero, "zero")


# -- aten handlers: (func, *args, **kwargs) -> result or NotImplemented -----------------------------------


def _detach(func, w):
    return w._like()


def _transpose(func, w, *dims):
    if func.overloadpacket is aten.permute:
        swaps = [d % 2 for d in dims[0]] == [1, 0]
    elif func.overloadpacket is aten.transpose:
        swaps = dims[0] % 2 != dims[1] % 2
    else:  # aten.t
        swaps = True
    return w._like(transposed=w.transposed != swaps)


def _weight_mm(x, w, bias):
    """``x @ w`` for a plain float 2-d ``x`` and a transposed (in, out) weight, else NotImplemented."""
    if isinstance(x, QuantizedTensor) or not w.transposed or x.ndim != 2 or x.dtype != w.dtype:
        return NotImplemented
    if x.dtype not in GEMM_FLOAT_DTYPES:
        return NotImplemented  # e.g. float64: the fallback's float GEMM
    if isinstance(bias, QuantizedTensor):
        return NotImplemented
    from ..kernels.weight_only import lowbit_weight_mm

    return lowbit_weight_mm(x, w._packed, w._scale_zeros, w._kernel, w.qtype.bits, w.group_size, bias)


def _mm(func, x, w):
    return _weight_mm(x, w, None) if isinstance(w, PackedQTensor) else NotImplemented


def _addmm(func, bias, x, w, *, beta=1, alpha=1):
    if beta != 1 or alpha != 1 or not isinstance(w, PackedQTensor) or bias.shape != (w.shape[1],):
        return NotImplemented
    return _weight_mm(x, w, bias)


def _to_copy(
    func, w, *, dtype=None, device=None, layout=None, pin_memory=None, non_blocking=False, memory_format=None
):
    if dtype is not None and (not dtype.is_floating_point or dtype in FLOAT8_DTYPES):
        return NotImplemented  # a cast of the value to integers or float8: the fallback dequantizes first
    if layout not in (None, torch.strided) or memory_format not in (None, torch.preserve_format):
        return NotImplemented
    device = w.device if device is None else torch.device(device)
    # copy=True: a cast is a new tensor, whose codes copy_ may overwrite without touching w's
    packed = w._packed.to(device, non_blocking=non_blocking, copy=True)
    scale_zeros = w._scale_zeros.to(
        device=device, dtype=dtype or w.dtype, non_blocking=non_blocking, copy=True
    )
    return w._like(packed, scale_zeros)


def _clone(func, w, *, memory_format=None):
    return w._like(w._packed.clone(), w._scale_zeros.clone())


def _copy_(func, dst, src, non_blocking=False):
    if not isinstance(dst, PackedQTensor):
        return NotImplemented  # into a float tensor: the fallback copies the dequantized value
    same = (
        isinstance(src, PackedQTensor)
        and src.qtype == dst.qtype
        and src.group_size == dst.group_size
        and src.shape == dst.shape
        and src.transposed == dst.transposed
    )
    if not same:
        raise NotImplementedError(
            "copy_ into a PackedQTensor takes a PackedQTensor of the same qtype, group size, shape and "
            "orientation"
        )
    dst._packed.copy_(src._packed)
    dst._scale_zeros.copy_(src._scale_zeros)
    if dst.gemm_layout:
        from ..kernels.weight_only import lowbit_kernel_layout

        dst._kernel = lowbit_kernel_layout(dst._packed, dst.qtype.bits, dst.group_size)
    return dst


def _embedding(func, w, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    """Row lookup: unpack and dequantize only the rows asked for (float out)."""
    if not isinstance(w, PackedQTensor) or w.transposed or isinstance(indices, QuantizedTensor):
        return NotImplemented
    rows = indices.reshape(-1)
    # index_select checks bounds (a negative index is an error, as for a float table)
    codes = unpack(w._packed.index_select(0, rows), w.qtype.bits)
    values = dequantize_groupwise(codes, w._scale_zeros.index_select(1, rows), w.qtype.bits)
    return values.reshape(*indices.shape, w.shape[1])


_HANDLERS = {
    aten.detach: _detach,
    aten.t: _transpose,
    aten.transpose: _transpose,
    aten.permute: _transpose,
    aten.mm: _mm,
    aten.addmm: _addmm,
    aten._to_copy: _to_copy,
    aten.clone: _clone,
    aten.copy_: _copy_,
    aten.embedding: _embedding,
}


def _rebuild_packed_qtensor(
    packed, scale_zeros, qtype_name, group_size, transposed, requires_grad, gemm_layout
):
    w = PackedQTensor(
        packed,
        scale_zeros,
        qtype_name,
        group_size,
        transposed,
        requires_grad=requires_grad,
        gemm_layout=gemm_layout,
    )
    check_packed_values(w)
    return w


torch.serialization.add_safe_globals([_rebuild_packed_qtensor])
