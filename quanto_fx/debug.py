"""Numeric debugging: which quantized layer hurts accuracy, by how much."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .quantize import _qmodules
from .tensor import QTensor

__all__ = ["LayerReport", "layer_report"]


def _float(x) -> torch.Tensor | None:
    """The float tensor a module output stands for: itself, or the first item of a tuple or a mapping
    (transformers' ModelOutput: its first field set, e.g. logits or last_hidden_state)."""
    if isinstance(x, QTensor):
        return x.dequantize().detach()
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach()
    if isinstance(x, (tuple, list)) and x:
        return _float(x[0])
    if isinstance(x, Mapping) and x:
        return _float(next(iter(x.values())))
    return None


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    reference, approx = reference.double(), approx.double()
    noise = (reference - approx).pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(reference.pow(2).mean().clamp_min(1e-30) / noise))


@dataclass
class LayerReport:
    """Per-layer SQNR of a quantized model against its float twin, worst first.

    ``rows``: one dict per quantized module with ``name``, ``module`` (class) and ``sqnr_db`` of its output
    (computed on the same inputs, each model running its own upstream layers, so errors accumulate as they do
    in the model). ``print(report)`` gives a table.
    """

    rows: list[dict]

    def worst(self, n: int = 5) -> list[dict]:
        return self.rows[:n]

    def __str__(self) -> str:
        lines = [f"{'layer':<48}{'module':<14}{'SQNR dB':>9}"]
        lines += [f"{r['name']:<48}{r['module']:<14}{r['sqnr_db']:>9.1f}" for r in self.rows]
        return "\n".join(lines)


def _record_outputs(model: torch.nn.Module, names: set[str], store: dict) -> list:
    def recorder(name):
        return lambda module, inputs, output: store.__setitem__(name, _float(output))

    return [m.register_forward_hook(recorder(name)) for name, m in model.named_modules() if name in names]


@torch.no_grad()
def layer_report(float_model: torch.nn.Module, qmodel: torch.nn.Module, *inputs, **kwargs) -> LayerReport:
    """Run both models on the same inputs and report the SQNR of every quantized module's output.

    ``qmodel`` must be a quantized copy of ``float_model`` (``quantize(float_model, inplace=False)``):
    modules are matched by name.

    Raises:
        ValueError: ``qmodel`` has no quantized module, or one that ``float_model`` lacks; ``float_model``
            has quantized modules (it is ``qmodel`` itself after the default in-place ``quantize``).
    """
    names = {name for name, _ in _qmodules(qmodel)}
    if not names:
        raise ValueError("layer_report: qmodel has no quantized module")
    # Its outputs are the reference: quantized ones would hide the error (inf dB when it is qmodel itself).
    if quantized := [name for name, _ in _qmodules(float_model)]:
        what = "is qmodel itself" if float_model is qmodel else "has quantized modules"
        raise ValueError(
            f"layer_report: float_model {what} ({[n or '<root>' for n in quantized[:5]]}); pass the float "
            "model: quantize() works in place by default, so quantize a copy (quantize(model, "
            "inplace=False)) or keep one (copy.deepcopy(model)) before quantizing"
        )
    missing = names - {name for name, _ in float_model.named_modules()}
    if missing:
        raise ValueError(f"layer_report: float_model lacks the quantized modules {sorted(missing)[:5]}")
    reference, quantized = {}, {}
    handles = _record_outputs(float_model, names, reference) + _record_outputs(qmodel, names, quantized)
    try:
        float_model(*inputs, **kwargs)
        qmodel(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(qmodel.named_modules())
    rows = [
        {"name": n, "module": type(modules[n]).__name__, "sqnr_db": sqnr_db(reference[n], quantized[n])}
        for n in names
        if reference.get(n) is not None and quantized.get(n) is not None
    ]
    return LayerReport(sorted(rows, key=lambda r: r["sqnr_db"]))
