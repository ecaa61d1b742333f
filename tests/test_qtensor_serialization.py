"""torch.save / torch.load(weights_only=True) round trips, and safe loading."""

import io
import pickle

import pytest
import torch

from quanto_fx import QTensor


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
