"""Out-of-place ops return new tensors: writing into a result never changes the QTensors it came from.

Views (view, transpose, slicing, ...) share their input's data as torch views do; they are not tested here.
"""

import pytest
import torch

from quanto_fx import PackedQTensor, QTensor, qint4

from .utils import dequantized


def q(x, **kw):
    return QTensor.quantize(x, **kw)


def int32_acc(values, scale):
    return QTensor(torch.tensor(values, dtype=torch.int32), torch.tensor(scale))


def overwrite(result: QTensor) -> None:
    """Write other codes and another scale into ``result`` in place, as load_state_dict does."""
    other = QTensor(torch.ones_like(result._data), result._scale * 3 + 1, result.axis)
    result.copy_(other)


# name -> op(a, b, acc) returning the result; a and b are int8 QTensors of one scale, acc an int32 one
OPS = {
    "mul_by_a_constant": lambda a, b, acc: a * 2.0,
    "add": lambda a, b, acc: a + b,
    "add_self": lambda a, b, acc: a + a,
    "add_float_bias": lambda a, b, acc: acc + torch.ones(4),
    "relu": lambda a, b, acc: torch.relu(a),
    "cat": lambda a, b, acc: torch.cat([a, b]),
    "stack": lambda a, b, acc: torch.stack([a, b]),
    "index": lambda a, b, acc: a[torch.tensor([0, 2])],
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_writing_into_a_result_leaves_the_inputs_unchanged(name):
    a = q(torch.randn(6, 4))
    b = QTensor.quantize(torch.randn(6, 4), scale=a._scale)
    acc = QTensor(torch.randint(-1000, 1000, (6, 4), dtype=torch.int32), torch.tensor(0.01))
    inputs = [a, b, acc]
    before = [dequantized(t).clone() for t in inputs]
    result = OPS[name](a, b, acc)
    assert isinstance(result, QTensor)
    overwrite(result)
    for t, expected in zip(inputs, before, strict=True):
        assert torch.equal(dequantized(t), expected)


def test_writing_into_a_cast_packed_weight_leaves_the_weight_unchanged():
    w = PackedQTensor.quantize(torch.randn(8, 128), qint4, group_size=32)
    before = w.dequantize()
    half = w.to(torch.float16)  # a cast is a copy (aten._to_copy), as for float tensors
    half.copy_(PackedQTensor.quantize(torch.randn(8, 128), qint4, group_size=32).to(torch.float16))
    assert torch.equal(w.dequantize(), before)


def test_adding_into_a_scaled_accumulator_leaves_the_accumulator_unchanged():
    acc = int32_acc([1, 2, 3], 0.5)
    y = acc * 2.0
    y.add_(torch.ones(3))
    assert torch.equal(dequantized(acc), torch.tensor([0.5, 1.0, 1.5]))
    assert torch.equal(dequantized(y), torch.tensor([2.0, 3.0, 4.0]))
