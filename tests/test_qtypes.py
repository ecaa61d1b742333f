import dataclasses

import pytest
import torch

import quanto_fx
from quanto_fx import get_qtype, qfloat8_e4m3fn, qfloat8_e5m2, qint2, qint4, qint8


@pytest.mark.parametrize(
    "qt, bits, dtype, qmax, is_float",
    [
        (qint8, 8, torch.int8, 127, False),
        (qint4, 4, torch.int8, 7, False),
        (qint2, 2, torch.int8, 1, False),
        (qfloat8_e4m3fn, 8, torch.float8_e4m3fn, 448.0, True),
        (qfloat8_e5m2, 8, torch.float8_e5m2, 57344.0, True),
    ],
)
def test_qtype_fields(qt, bits, dtype, qmax, is_float):
    assert (qt.bits, qt.dtype, qt.qmax, qt.is_floating_point) == (bits, dtype, qmax, is_float)
    assert qt.qmin == -qt.qmax  # symmetric ranges
    assert get_qtype(qt.name) is qt
    assert getattr(quanto_fx, qt.name) is qt


def test_qtypes_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        qint8.bits = 4


def test_unknown_qtype_lists_valid_names():
    with pytest.raises(ValueError, match="unknown qtype 'qint3'.*qint2.*qint4.*qint8"):
        get_qtype("qint3")


@pytest.mark.parametrize("qt", [qint8, qint4, qint2, qfloat8_e4m3fn, qfloat8_e5m2])
def test_value_range_is_the_qtypes_own_range(qt):
    """value_range computes a qtype's range from its dtype and bits (constants under torch.compile, where its
    float attributes may be traced as graph inputs): the same values as the qtype's qmin and qmax."""
    from quanto_fx.tensor.quantization import value_range

    qmin, qmax, dtype = value_range(qt)
    assert (qmin, qmax, dtype) == (qt.qmin, qt.qmax, qt.dtype)
