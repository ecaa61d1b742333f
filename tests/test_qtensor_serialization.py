"""torch.save / torch.load(weights_only=True) round trips, and safe loading."""

import copy
import io
import pickle

import pytest
import torch

from quanto_fx import QTensor, freeze, qint4, qint8, quantize


def roundtrip(obj, **load_kwargs):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, **load_kwargs)


@pytest.mark.parametrize("axis", [None, 0, -1])
@pytest.mark.parametrize("int_dtype", [torch.int8, torch.int32])
def test_qtensor_roundtrip_is_exact_under_weights_only(axis, int_dtype):
    qx = QTensor.quantize(torch.randn(5, 7, dtype=torch.bfloat16), int_dtype, axis=axis)
    loaded = roundtrip(qx, weights_only=True)
    assert isinstance(loaded, QTensor)
    assert torch.equal(loaded._data, qx._data) and torch.equal(loaded._scale, qx._scale)
    assert loaded.axis == qx.axis and loaded.dtype == torch.bfloat16


def test_linear_state_dict_roundtrip_with_assign():
    lin = torch.nn.Linear(8, 4)
    lin.weight = torch.nn.Parameter(QTensor.quantize(lin.weight.detach(), axis=0), requires_grad=False)
    x = torch.randn(3, 8)
    expected = lin(x)
    state = roundtrip(lin.state_dict())
    fresh = torch.nn.Linear(8, 4)
    fresh.weight = torch.nn.Parameter(QTensor.quantize(torch.randn(4, 8), axis=0), requires_grad=False)
    fresh.load_state_dict(state, assign=True)
    assert isinstance(fresh.weight, QTensor)
    assert torch.equal(fresh.weight._data, lin.weight._data) and torch.equal(
        fresh.weight._scale, lin.weight._scale
    )
    assert torch.equal(fresh(x), expected)


def test_loading_a_qtensor_with_a_corrupted_scale_is_refused():
    qx = QTensor.quantize(torch.randn(4))
    state = roundtrip(qx)
    bad = QTensor(state._data, state._scale, _trusted=True)
    bad._scale = torch.tensor(float("nan"))
    with pytest.raises(ValueError, match="scale"):
        roundtrip(bad, weights_only=True)


class _Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


def test_foreign_pickles_stay_refused(capsys):
    buf = io.BytesIO()
    torch.save({"w": QTensor.quantize(torch.randn(2)), "evil": _Payload()}, buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf, weights_only=True)
    assert "payload ran" not in capsys.readouterr().out


@pytest.mark.parametrize("weights", [qint8, qint4])
def test_deepcopy_of_a_frozen_model_keeps_its_quantized_parameters(weights):
    model = freeze(quantize(torch.nn.Sequential(torch.nn.Linear(256, 8)), weights=weights, activations=None))
    clone = copy.deepcopy(model)
    weight = clone[0].weight
    assert isinstance(weight, torch.nn.Parameter) and isinstance(weight, type(model[0].weight))
    assert not weight.requires_grad
    assert "weight" in dict(clone[0].named_parameters())
    x = torch.randn(3, 256)
    assert torch.equal(clone(x), model(x))
    clone.load_state_dict(roundtrip(model.state_dict()), assign=True)
    assert torch.equal(clone(x), model(x))


def test_deepcopy_of_a_qtensor_stays_a_plain_qtensor():
    qx = QTensor.quantize(torch.randn(4, 3), axis=0)
    copied = copy.deepcopy(qx)
    assert type(copied) is QTensor and not isinstance(copied, torch.nn.Parameter)
    assert torch.equal(copied._data, qx._data) and copied._data.data_ptr() != qx._data.data_ptr()
