"""Shape and movement ops: they move integer data and keep (or move) the scale along with it.

A per-channel scale is stored with size 1 on every dimension but ``axis``, so ops that permute or insert
dimensions apply unchanged to the scale; ops that would mix channels fall back to float.
"""

from __future__ import annotations

import torch

from .dispatch import register_handler
from .ops_arithmetic import same_scales
from .qtensor import QTensor
from .quantization import FLOAT8_DTYPES, dequantize_data

aten = torch.ops.aten


def _dim(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else 0


def _qtensor(data: torch.Tensor, scale: torch.Tensor, axis: int | None) -> QTensor:
    return QTensor(data, scale, axis, _trusted=True)


def _keepdim_scale(scale: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = scale.numel()
    return scale.reshape(shape)


@register_handler(aten.detach, layout=True)
def detach(func, args, kwargs):
    (x,) = args
    return _qtensor(func(x._data), func(x._scale), x._axis)


@register_handler(aten.clone, layout=True)
def clone(func, args, kwargs):
    (x,) = args
    return _qtensor(func(x._data, **kwargs), x._scale.clone(), x._axis)


@register_handler(aten._to_copy, layout=True)
def to_copy(func, args, kwargs):
    (x,) = args
    dtype = kwargs.get("dtype")
    if dtype is not None and (not dtype.is_floating_point or dtype in FLOAT8_DTYPES):
        return NotImplemented  # casting to integers or float8 means casting the float value: fallback
    data_kwargs = {k: v for k, v in kwargs.items() if k not in ("dtype", "layout")}
    data = func(x._data, **data_kwargs)
    scale = func(x._scale, dtype=dtype or x._scale.dtype, device=data.device)
    return _qtensor(data, scale, x._axis)


# reshape decomposes into these above the dispatcher
@register_handler(aten.view, aten._unsafe_view, layout=True)
def view(func, args, kwargs):
    x, shape = args
    if isinstance(shape, torch.dtype):
        # view(dtype) reinterprets the bits of the float value this QTensor stands for, not its integer codes
        return NotImplemented
    data = func(x._data, shape)
    if x._axis is None:
        return _qtensor(data, x._scale, None)
    # A per-channel scale survives when its axis stays the first or the last dimension, unchanged.
    if x._axis == 0 and data.ndim and data.shape[0] == x.shape[0]:
        axis = 0
    elif x._axis == x.ndim - 1 and data.ndim and data.shape[-1] == x.shape[-1]:
        axis = data.ndim - 1
    else:
        return NotImplemented
    return _qtensor(data, _keepdim_scale(x._scale, data.ndim, axis), axis)


@register_handler(aten.t, layout=True)
def t(func, args, kwargs):
    (x,) = args
    if x._axis is None or x.ndim < 2:
        return _qtensor(func(x._data), x._scale, x._axis)
    return _qtensor(func(x._data), func(x._scale), 1 - x._axis)


@register_handler(aten.transpose, layout=True)
def transpose(func, args, kwargs):
    x, d0, d1 = args
    d0, d1 = _dim(d0, x.ndim), _dim(d1, x.ndim)
    if x._axis is None:
        return _qtensor(func(x._data, d0, d1), x._scale, None)
    axis = {d0: d1, d1: d0}.get(x._axis, x._axis)
    return _qtensor(func(x._data, d0, d1), func(x._scale, d0, d1), axis)


@register_handler(aten.permute, layout=True)
def permute(func, args, kwargs):
    x, dims = args
    dims = [_dim(d, x.ndim) for d in dims]
    if x._axis is None:
        return _qtensor(func(x._data, dims), x._scale, None)
    return _qtensor(func(x._data, dims), func(x._scale, dims), dims.index(x._axis))


@register_handler(aten.unsqueeze, layout=True)
def unsqueeze(func, args, kwargs):
    x, dim = args
    dim = _dim(dim, x.ndim + 1)
    if x._axis is None:
        return _qtensor(func(x._data, dim), x._scale, None)
    return _qtensor(func(x._data, dim), func(x._scale, dim), x._axis + (dim <= x._axis))


@register_handler(aten.squeeze, layout=True)
def squeeze(func, args, kwargs):
    x = args[0]
    data = func(x._data, *args[1:])
    if x._axis is None:
        return _qtensor(data, x._scale, None)
    if func is not aten.squeeze.dim:
        return NotImplemented
    dim = _dim(args[1], x.ndim)
    if x.shape[dim] != 1:
        return _qtensor(data, x._scale, x._axis)  # squeeze of a non-unit dim is a no-op
    if dim == x._axis:
        return _qtensor(data, x._scale.reshape(()), None)
    return _qtensor(data, func(x._scale, dim), x._axis - (dim < x._axis))


@register_handler(aten.expand, layout=True)
def expand(func, args, kwargs):
    x, size = args[:2]
    data = func(x._data, size, **kwargs)
    if x._axis is None:
        return _qtensor(data, x._scale, None)
    if data.ndim != x.ndim or data.shape[x._axis] != x.shape[x._axis]:
        return NotImplemented
    return _qtensor(data, x._scale, x._axis)


@register_handler(aten.slice, layout=True)
def slice_(func, args, kwargs):
    x = args[0]
    dim = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), x.ndim)
    data = func(x._data, *args[1:], **kwargs)
    scale = func(x._scale, *args[1:], **kwargs) if dim == x._axis else x._scale
    return _qtensor(data, scale, x._axis)


@register_handler(aten.select, layout=True)
def select(func, args, kwargs):
    x, dim, index = args
    dim = _dim(dim, x.ndim)
    data = func(x._data, dim, index)
    if x._axis is None:
        return _qtensor(data, x._scale, None)
    if dim == x._axis:
        return _qtensor(data, x._scale.select(dim, index).reshape(()), None)
    return _qtensor(data, x._scale.select(dim, 0), x._axis - (dim < x._axis))


@register_handler(aten.unbind, layout=True)
def unbind(func, args, kwargs):
    x = args[0]
    dim = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), x.ndim)
    return [select(aten.select.int, (x, dim, i), {}) for i in range(x.shape[dim])]


@register_handler(aten.index, layout=True)
def index(func, args, kwargs):
    x, indices = args
    if x._axis is not None or any(isinstance(i, QTensor) for i in indices):
        return NotImplemented
    return _qtensor(func(x._data, indices), x._scale.clone(), None)  # a gather is a copy, not a view


@register_handler(aten.split, aten.split_with_sizes, layout=True)
def split(func, args, kwargs):
    x, sizes = args[:2]
    dim = _dim(args[2] if len(args) > 2 else kwargs.get("dim", 0), x.ndim)
    pieces = func(x._data, sizes, dim)
    if dim != x._axis:
        return [_qtensor(p, x._scale, x._axis) for p in pieces]
    scales = func(x._scale, sizes, dim)
    return [_qtensor(p, s, x._axis) for p, s in zip(pieces, scales, strict=True)]


def _joinable(tensors) -> bool:
    """True when every tensor is a QTensor of one integer dtype and axis; other lists join in float."""
    return (
        all(isinstance(t, QTensor) for t in tensors)
        and len({t._data.dtype for t in tensors}) == 1
        and len({t._axis for t in tensors}) == 1
    )


@register_handler(aten.cat, layout=True)
def cat(func, args, kwargs):
    tensors = list(args[0])
    if not _joinable(tensors):
        return NotImplemented
    first = tensors[0]
    dim = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), first.ndim)
    along_axis = first._axis is not None and dim == first._axis  # the scales are concatenated too
    if not along_axis and not same_scales(tensors):
        return NotImplemented  # different scales: the float concatenation, counted as a fallback
    data = func([t._data for t in tensors], dim)
    # a new tensor, not a view: it gets a scale of its own, which writing into it cannot share with an input
    scale = func([t._scale for t in tensors], dim) if along_axis else first._scale.clone()
    return _qtensor(data, scale, first._axis)


@register_handler(aten.stack, layout=True)
def stack(func, args, kwargs):
    tensors = list(args[0])
    if not _joinable(tensors) or not same_scales(tensors):
        return NotImplemented  # different scales: the float stack, counted as a fallback
    first = tensors[0]
    dim = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), first.ndim + 1)
    data = func([t._data for t in tensors], dim)
    if first._axis is None:  # a new tensor, not a view: a scale of its own, as for cat
        return _qtensor(data, first._scale.clone(), None)
    return _qtensor(data, first._scale.unsqueeze(dim).clone(), first._axis + (dim <= first._axis))


# A row lookup in a per-row quantized table (an embedding): gather the rows, dequantize only them. The rows'
# scales would vary along every index dimension, which no QTensor axis describes, so the result is float.
@register_handler(aten.embedding, layout=True)
def embedding(func, args, kwargs):
    weight, indices = args[:2]
    per_row = isinstance(weight, QTensor) and weight._axis == 0 and weight.ndim == 2
    if not per_row or isinstance(indices, QTensor):
        return NotImplemented
    rows = indices.reshape(-1)  # index_select checks bounds: a negative index is an error, as for floats
    data, scale = weight._data.index_select(0, rows), weight._scale.index_select(0, rows)
    return dequantize_data(data, scale).reshape(*indices.shape, weight.shape[1])
