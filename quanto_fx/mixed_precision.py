"""Sensitivity-guided mixed precision: per Linear or Embedding layer, the smallest weight format that keeps
the model's output within an accuracy budget.

``choose_precision`` measures each layer's sensitivity (the model's score with that layer alone quantized to
each candidate format), starts every layer at its smallest format and, while the whole model misses the
budget, moves the most damaging layer one format up. Every score is measured on the whole model and the
samples given, never estimated. Weights only: activations stay float (int4 weights are weight-only anyway).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .calibrate import _progress, _run_batch
from .debug import _float, sqnr_db
from .nn.qmodule import DEFAULT_GROUP_SIZE, qmodule_class_for
from .qtypes import get_qtype, qint4, qint8, qtype
from .quantize import _patterns, _selected, freeze, quantize
from .tensor import PACKED_QTYPES
from .tensor.base import QuantizedTensor

__all__ = ["PrecisionPlan", "choose_precision"]

DEFAULT_CANDIDATES = (qint4, qint8, None)
LAYER_TYPES = (torch.nn.Linear, torch.nn.Embedding)
Score = Callable[[torch.Tensor, torch.Tensor], float]


def _name(choice: qtype | None) -> str:
    return "float" if choice is None else choice.name


@dataclass
class PrecisionPlan:
    """The chosen weight format of every candidate layer, and what it was chosen from.

    Attributes:
        choices: layer name -> weight qtype, or None for a layer kept float.
        score: the whole model's score with these choices (higher is better), on the samples.
        budget: the score the plan had to reach.
        sensitivity: layer name -> {format name: the model's score with that layer alone in that format}.
        weight_bytes: bytes the chosen layers' weights take in a checkpoint; ``float_bytes`` as float.
        group_size: input features per scale group of int4 / int2 weights.
        steps: the moves made from the all-smallest start, with the score after each.
    """

    choices: dict[str, qtype | None]
    score: float
    budget: float
    sensitivity: dict[str, dict[str, float]]
    weight_bytes: int
    float_bytes: int
    group_size: int = DEFAULT_GROUP_SIZE
    steps: list[str] = field(default_factory=list)

    def apply(self, model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
        """``model`` with every chosen layer quantized to its format, frozen (a copy unless ``inplace``)."""
        return _apply(model, self.choices, self.group_size, inplace)

    def counts(self) -> dict[str, int]:
        """How many layers got each format."""
        out: dict[str, int] = {}
        for choice in self.choices.values():
            out[_name(choice)] = out.get(_name(choice), 0) + 1
        return out

    def __str__(self) -> str:
        formats = sorted({f for row in self.sensitivity.values() for f in row})
        header = f"{'layer':<44}{'chosen':>8}" + "".join(f"{'alone ' + f:>14}" for f in formats)
        lines = [header]
        for name, choice in self.choices.items():
            alone = "".join(f"{self.sensitivity[name].get(f, float('nan')):>14.4f}" for f in formats)
            lines.append(f"{name:<44}{_name(choice):>8}{alone}")
        counts = ", ".join(f"{n} {f}" for f, n in self.counts().items())
        lines.append(
            f"score {self.score:.4f} (budget {self.budget}); {counts}; weights "
            f"{self.weight_bytes / self.float_bytes:.3f}x their float bytes"
        )
        return "\n".join(lines)


def _apply(model, choices: dict[str, qtype | None], group_size: int, inplace: bool) -> torch.nn.Module:
    if not inplace:
        model = copy.deepcopy(model)
    for fmt in {c for c in choices.values() if c is not None}:
        names = [name for name, c in choices.items() if c == fmt]
        model = quantize(model, weights=fmt, activations=None, include=names, group_size=group_size)
    if any(c is not None for c in choices.values()):
        freeze(model)
    return model


def _stored_bytes(weight: torch.Tensor) -> int:
    if isinstance(weight, QuantizedTensor):
        return weight.nbytes_stored()
    return weight.numel() * weight.element_size()


def _allowed(
    layer: torch.nn.Module, candidates: Sequence[qtype | None], group_size: int
) -> list[qtype | None]:
    """The candidates this layer can take (group-wise formats need group_size to divide the grouped dim)."""
    grouped = layer.in_features if isinstance(layer, torch.nn.Linear) else layer.embedding_dim
    return [c for c in candidates if c not in PACKED_QTYPES or grouped % group_size == 0]


def _quantizable(layer: torch.nn.Module) -> bool:
    # quantize() swaps it (not a subclass such as MultiheadAttention's out_proj), and not an Embedding with
    # max_norm, which renormalizes its table in place: QEmbedding refuses it.
    if qmodule_class_for(layer) is None:
        return False
    return not (isinstance(layer, torch.nn.Embedding) and layer.max_norm is not None)


@torch.no_grad()
def _outputs(model, samples: list) -> torch.Tensor:
    outs = []
    for sample in samples:
        out = _float(_run_batch(model, sample))
        if out is None:
            raise TypeError(
                "choose_precision: the model must return a float tensor, or a tuple or mapping (such as a "
                "transformers ModelOutput) whose first item is one"
            )
        outs.append(out.reshape(-1).float())
    return torch.cat(outs)


def choose_precision(
    model: torch.nn.Module,
    samples: Iterable,
    budget: float,
    *,
    score: Score = sqnr_db,
    candidates: Sequence[qtype | str | None] = DEFAULT_CANDIDATES,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    progress: bool = True,
) -> PrecisionPlan:
    """Choose, per ``nn.Linear`` / ``nn.Embedding`` layer, the smallest weight format meeting ``budget``.

    Args:
        model: the float model (left untouched).
        samples: inputs to run the model on, as ``calibrate`` takes batches: tensors, tuples or lists of
            positional arguments, or dicts of keyword arguments.
        budget: the lowest acceptable ``score`` of the quantized model's outputs against the float ones.
        score: ``score(float_outputs, quantized_outputs) -> float``, higher is better, on the flattened
            outputs of all samples; by default their SQNR in dB.
        candidates: formats to choose from, smallest first; None keeps a layer float. Default int4, int8,
            float.
        include / exclude: fnmatch patterns on layer names, as in ``quantize``.
        group_size: input features per scale group of int4 / int2 weights.
        progress: show a progress bar (tqdm, when installed) over the sensitivity measurements.

    Returns:
        a :class:`PrecisionPlan`; ``plan.apply(model)`` gives the quantized, frozen model.

    Raises:
        ValueError: no samples, no Linear or Embedding layer selected, candidates not ordered smallest
            first, or a budget that even float weights everywhere miss.
    """
    candidates = [None if c is None else get_qtype(c) for c in candidates]
    sizes = [c.bits if c is not None else 32 for c in candidates]
    if sizes != sorted(sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(
            f"candidates must be distinct and ordered smallest first, got {[_name(c) for c in candidates]}"
        )
    samples = list(samples)
    if not samples:
        raise ValueError("choose_precision needs at least one sample")
    include, exclude = _patterns(include), _patterns(exclude)
    layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, LAYER_TYPES) and _quantizable(m) and _selected([name], include, exclude)
    }
    if not layers:
        raise ValueError("choose_precision: no nn.Linear or nn.Embedding layer of the model is selected")
    allowed = {name: _allowed(layer, candidates, group_size) for name, layer in layers.items()}
    if stuck := sorted(name for name, formats in allowed.items() if not formats):
        raise ValueError(
            f"choose_precision: no candidate fits layers {stuck} (group_size {group_size} does not divide "
            "their features): add None (float) or qint8 to the candidates, or exclude them"
        )
    reference = _outputs(model, samples)

    def evaluate(choices: dict[str, qtype | None]) -> float:
        return float(score(reference, _outputs(_apply(model, choices, group_size, inplace=False), samples)))

    float_choices = {name: None for name in layers}
    sensitivity: dict[str, dict[str, float]] = {name: {} for name in layers}
    measurements = [(name, c) for name in layers for c in allowed[name] if c is not None]
    for name, choice in _progress(measurements, progress, "layer sensitivity"):
        sensitivity[name][choice.name] = evaluate(float_choices | {name: choice})

    level = {name: 0 for name in layers}  # index into allowed[name]
    choices = {name: allowed[name][0] for name in layers}
    current, steps = evaluate(choices), []
    while current < budget:
        movable = [name for name in layers if level[name] + 1 < len(allowed[name])]
        if not movable:
            raise ValueError(
                f"no choice of formats reaches the budget {budget}: every layer at its largest candidate "
                f"format scores {current}"
            )
        # The layer whose own format hurts the model most (lowest score alone) moves one format up.
        worst = min(movable, key=lambda n: sensitivity[n].get(_name(choices[n]), float("inf")))
        level[worst] += 1
        choices[worst] = allowed[worst][level[worst]]
        current = evaluate(choices)
        steps.append(f"{worst} -> {_name(choices[worst])}: score {current:.4f}")

    quantized = _apply(model, choices, group_size, inplace=False)
    modules = dict(quantized.named_modules())
    return PrecisionPlan(
        choices=choices,
        score=current,
        budget=budget,
        sensitivity=sensitivity,
        weight_bytes=sum(_stored_bytes(modules[name].weight) for name in layers),
        float_bytes=sum(_stored_bytes(layer.weight) for layer in layers.values()),
        group_size=group_size,
        steps=steps,
    )
