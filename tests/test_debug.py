"""layer_report: per-module output SQNR of a quantized copy against its float model."""

import math

import torch

from quanto_fx import calibration, layer_report, quantize
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
