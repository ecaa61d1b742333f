"""Quantized types: what a quantized value is stored as and which range it may take."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["qtype", "qint8", "qint4", "qint2", "qfloat8_e4m3fn", "qfloat8_e5m2", "qtypes", "get_qtype"]


@dataclass(frozen=True)
class qtype:  # noqa: N801 - lower case like torch dtypes, as in the seed
    """A quantized type.

    Attributes:
        name: the public name (``"qint8"``).
        bits: bits per value.
        dtype: the torch dtype the values are stored in (before any packing).
        qmin: smallest representable value.
        qmax: largest representable value.
        is_floating_point: True for float8 types.
    """

    name: str
    bits: int
    dtype: torch.dtype
    qmin: float
    qmax: float
    is_floating_point: bool

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"quanto_fx.{self.name}"


def _int_qtype(name: str, bits: int) -> qtype:
    # Symmetric range: qmin = -qmax so that negating a value never saturates.
    qmax = 2 ** (bits - 1) - 1
    return qtype(name, bits, torch.int8, float(-qmax), float(qmax), False)


def _float_qtype(name: str, dtype: torch.dtype) -> qtype:
    info = torch.finfo(dtype)
    return qtype(name, 8, dtype, float(info.min), float(info.max), True)


qint8 = _int_qtype("qint8", 8)
qint4 = _int_qtype("qint4", 4)
qint2 = _int_qtype("qint2", 2)
qfloat8_e4m3fn = _float_qtype("qfloat8_e4m3fn", torch.float8_e4m3fn)
qfloat8_e5m2 = _float_qtype("qfloat8_e5m2", torch.float8_e5m2)

qtypes: dict[str, qtype] = {q.name: q for q in (qint8, qint4, qint2, qfloat8_e4m3fn, qfloat8_e5m2)}


def get_qtype(name: str | qtype) -> qtype:
    """Return the qtype called ``name`` (a qtype is returned as is).

    Raises:
        ValueError: ``name`` is not a known qtype; the message lists the valid names.
    """
    if isinstance(name, qtype):
        return name
    if isinstance(name, str) and name in qtypes:
        return qtypes[name]
    raise ValueError(f"unknown qtype {name!r}; valid names: {', '.join(sorted(qtypes))}")
