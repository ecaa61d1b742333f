"""layer_report: per-module output SQNR of a quantized copy against its float model."""

import copy
import math

import pytest
import torch

from quanto_fx import calibration, layer_report, qint8, quantize
from quanto_fx.nn import QModuleMixin


def test_layer_report_rows_worst_first_and_names_the_degraded_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4)
    )
    x = torch.randn(64, 16)
    qmodel = quantize(model, inplace=False)
    with torch.no_grad(), calibration():
        qmodel(x)
    with torch.no_grad():  # make one layer bad: its output range shrinks 100-fold and saturates
        qmodel[3].out_scale /= 100
    report = layer_report(model, qmodel, x)
    names = [r["name"] for r in report.rows]
    assert sorted(names) == sorted(n for n, m in qmodel.named_modules() if isinstance(m, QModuleMixin))
    values = [r["sqnr_db"] for r in report.rows]
    assert values == sorted(values) and all(math.isfinite(v) for v in values)
    assert report.worst(1)[0]["name"] == "3" and values[0] < 10 < values[-1]
    # the table: a header, then one row per layer, worst first, whose first column is the layer's name
    header, *lines = str(report).splitlines()
    assert header.split()[0] == "layer"
    assert lines[0].split() == ["3", "QLinear", f"{values[0]:.1f}"]
    assert [line.split()[0] for line in lines] == names


def test_layer_report_refuses_a_quantized_float_model():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(2, 8)
    float_copy = copy.deepcopy(model)
    qmodel = quantize(model, weights=qint8, activations=None)  # in place, the default: qmodel is model
    with pytest.raises(ValueError, match=r"float_model is qmodel itself \(\['0', '2'\]\).*inplace=False"):
        layer_report(model, qmodel, x)
    # another quantized model is no reference either
    with pytest.raises(ValueError, match=r"float_model has quantized modules \(\['0', '2'\]\)"):
        layer_report(copy.deepcopy(qmodel), qmodel, x)
    # the float model kept aside: the int8 weights' error is finite
    assert all(math.isfinite(r["sqnr_db"]) for r in layer_report(float_copy, qmodel, x).rows)
