"""The model-level verbs: quantize, freeze, quantization_map, requantize."""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from fnmatch import fnmatch

import torch

from .nn.qmodule import DEFAULT_GROUP_SIZE, QModuleMixin, check_qtypes, qmodule_class_for
from .qtypes import qint8, qtype
from .tensor import PACKED_QTYPES
from .tensor.groupwise import check_group_size, check_group_size_value
from .tensor.quantization import check_finite

__all__ = ["quantize", "freeze", "quantization_map", "requantize"]


def _patterns(patterns: str | list[str] | None) -> list[str] | None:
    return [patterns] if isinstance(patterns, str) else patterns


def _selected(names: list[str], include: list[str] | None, exclude: list[str] | None) -> bool:
    """Whether a module registered under ``names`` is quantized: one name included, none excluded (one
    module is one quantized module, whichever attribute it is reached by)."""
    if include is not None and not any(fnmatch(n, p) for n in names for p in include):
        return False
    return not (exclude is not None and any(fnmatch(n, p) for n in names for p in exclude))


def _modules_with_names(model: torch.nn.Module) -> list[tuple[list[str], torch.nn.Module]]:
    """Each module of ``model`` once, with every name it is registered under (``model.a = model.b = linear``
    gives ``(["a", "b"], linear)``; ``named_modules()`` would name it ``"a"`` only)."""
    modules: dict[int, tuple[list[str], torch.nn.Module]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        modules.setdefault(id(module), ([], module))[0].append(name)
    return list(modules.values())


def _replace(model: torch.nn.Module, replacements: dict[int, torch.nn.Module]) -> torch.nn.Module:
    """Put ``replacements[id(module)]`` at every name of each replaced module; returns the model, or the
    replacement of the model itself."""
    targets = [
        (name, replacements[id(m)])
        for name, m in model.named_modules(remove_duplicate=False)
        if id(m) in replacements
    ]
    for name, qmodule in targets:
        if name:
            model.set_submodule(name, qmodule)
    return replacements.get(id(model), model)


def _unmatched(patterns: list[str] | None, names: list[str]) -> list[str]:
    return [p for p in patterns or [] if not any(fnmatch(n, p) for n in names)]


def _check_something_quantized(modules, replacements: dict, include: list[str] | None) -> None:
    """Refuse a call that would quantize nothing, or an ``include`` pattern whose modules all stay float:
    a silent no-op is almost always a mistake (a pattern naming a Linear subclass, a model of Conv1D)."""
    for pattern in include or []:
        matched = [(names, m) for names, m in modules if any(fnmatch(n, pattern) for n in names)]
        if not any(id(m) in replacements for _, m in matched):
            classes = sorted({type(m).__name__ for _, m in matched})
            raise ValueError(
                f"include pattern {pattern!r} matches no module that quantize() replaces (it matches "
                f"{', '.join(classes)}: excluded, or of classes quanto_fx does not quantize)"
            )
    if not replacements:
        if any(qmodule_class_for(m) is not None for _, m in modules):  # (include was checked above)
            raise ValueError("quantize() found no module to quantize: `exclude` excludes every supported one")
        classes = sorted({type(m).__name__ for _, m in modules})
        raise ValueError(
            f"quantize() found no module to quantize (the model holds {', '.join(classes)}); supported: "
            "Linear, Conv2d, Embedding, LayerNorm, RMSNorm, and classes added with nn.register_qmodule"
        )


def _warn_weights_left_float(modules, replacements: dict, include, exclude) -> None:
    """Warn about selected modules with a weight matrix that stay float, for want of a quantized class."""
    left = [
        (names[0], type(m).__name__)
        for names, m in modules
        if id(m) not in replacements
        and not isinstance(m, QModuleMixin)
        and _selected(names, include, exclude)
        and isinstance(weight := m._parameters.get("weight"), torch.nn.Parameter)  # not computed ones
        and weight.ndim >= 2
    ]
    if left:
        counts = ", ".join(f"{cls} x{n}" for cls, n in Counter(cls for _, cls in left).items())
        warnings.warn(
            f"quantize(): {len(left)} module(s) with weights stay float, of classes quanto_fx does not "
            f"quantize: {counts} (first: {left[0][0]!r}). Subclasses of supported classes are not swapped, "
            "since their forward may differ: register a quantized class with quanto_fx.nn.register_qmodule, "
            "or exclude these modules to silence this warning",
            stacklevel=3,
        )


def quantize(
    model: torch.nn.Module,
    weights: qtype | str | None = qint8,
    activations: qtype | str | None = qint8,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    inplace: bool = True,
    activation_mode: str = "static",
    group_size: int = DEFAULT_GROUP_SIZE,
) -> torch.nn.Module:
    """Replace the supported modules of ``model`` by quantized ones and return the model.

    Supported: ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` (weight-only), ``nn.LayerNorm``, ``nn.RMSNorm``
    and Llama-style RMSNorm classes (those computing ``weight * x_hat``: Gemma's ``(1 + weight) * x_hat``
    norms stay float, with a warning), plus anything added with ``quanto_fx.nn.register_qmodule``. Weights
    stay float until ``freeze(model)``, so the quantized model can still be calibrated and trained.

    Args:
        model: the float model.
        weights: weight qtype or None to keep float weights: qint8 (per output channel), qfloat8_e4m3fn /
            qfloat8_e5m2 (per output channel), qint4 / qint2 (Linear and Embedding layers, weight-only,
            packed, one scale and zero per ``group_size`` input features).
        activations: activation qtype or None for weight-only quantization: qint8 (with qint8 weights), or
            a float8 qtype (with float8 weights, ``activation_mode="dynamic"``).
        include / exclude: fnmatch patterns on module names (``"encoder.*"``); a pattern that matches no
            module name raises, as it is almost always a typo. A model quantized in part can be quantized
            again with other settings for the float layers that ``include`` names (mixed precision). A module
            registered under several names (``model.a = model.b = linear``) is quantized once, all its names
            then referring to the one quantized module, when ``include`` matches one of its names and
            ``exclude`` none (excluding a name keeps the module float under every name).
        inplace: False quantizes a deep copy and leaves ``model`` untouched.
        activation_mode: "static" (per-tensor scales from ``calibration()``) or "dynamic" (per-token
            scales computed at run time; no calibration needed).
        group_size: input features per group of qint4 / qint2 weights (a power of two dividing every
            quantized Linear's in_features; exclude the layers it does not divide).

    Raises:
        ValueError: unsupported qtypes or mode, both qtypes None, patterns matching nothing, an ``include``
            pattern whose modules all stay float, a model with no module to quantize, an already quantized
            model, a group size that does not divide a layer's features (the message names the layer).

    Warns:
        UserWarning: selected modules with a weight matrix stay float, their classes having no quantized
            class (``transformers``' ``Conv1D``, subclasses of ``nn.Linear``); the warning names them.
    """
    weights, activations = check_qtypes(weights, activations, activation_mode)
    if weights is None and activations is None:
        raise ValueError("weights=None and activations=None quantize nothing: set at least one of them")
    if weights in PACKED_QTYPES:
        check_group_size_value(group_size)  # a setting of the call, not of the first layer it would reach
    include, exclude = _patterns(include), _patterns(exclude)
    modules = _modules_with_names(model)
    names = [name for module_names, _ in modules for name in module_names]
    for kind, patterns in (("include", include), ("exclude", exclude)):
        if missing := _unmatched(patterns, names):
            raise ValueError(f"{kind} pattern(s) {missing} match no module name of the model")
    # A second call may quantize more layers of a partly quantized model (mixed precision), but only layers
    # it names with `include`, and none already quantized: anything else is a mistaken double quantize.
    already = [
        module_names[0] or "<root>"
        for module_names, m in modules
        if isinstance(m, QModuleMixin) and (include is None or _selected(module_names, include, exclude))
    ]
    if already:
        hint = "quantize it once" if include is None else "include only float layers"
        raise ValueError(f"model is already quantized (quantized modules: {already[:5]}); {hint}")
    if not inplace:
        model = copy.deepcopy(model)
        modules = _modules_with_names(model)
    settings = dict(
        weights=weights, activations=activations, activation_mode=activation_mode, group_size=group_size
    )
    # Build every replacement first, then swap: a failure leaves the model unmodified.
    replacements = {}
    for module_names, module in modules:
        if not _selected(module_names, include, exclude) or (qcls := qmodule_class_for(module)) is None:
            continue
        try:
            if weights in PACKED_QTYPES and isinstance(module, torch.nn.Linear):
                check_group_size(group_size, module.in_features)
            replacements[id(module)] = qcls.from_module(module, **settings)
        except ValueError as e:
            raise ValueError(f"cannot quantize {module_names[0] or '<root>'!r}: {e}") from e
    _check_something_quantized(modules, replacements, include)
    _warn_weights_left_float(modules, replacements, include, exclude)
    return _replace(model, replacements)


def _qmodules(model: torch.nn.Module) -> list[tuple[str, QModuleMixin]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QModuleMixin)]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Store the weights of every quantized module as integer QTensors (int8: ~0.25x the fp32 bytes).

    All or nothing, one layer at a time: every float weight is first checked for what quantization refuses
    (NaN or infinity), then each layer is converted in turn, so a failure leaves every weight float and the
    peak memory stays the float model plus one layer's temporaries.

    Raises:
        ValueError: the model holds no quantized module (call ``quantize(model)`` first), or a layer's weight
            holds a non-finite value (the message names the layer; no weight is then changed).
    """
    qmodules = _qmodules(model)
    if not qmodules:
        raise ValueError("freeze: the model has no quantized module; call quantize(model) first")
    for name, module in qmodules:
        if module.weight_qtype is not None and not module.frozen:
            check_finite(module.weight.detach(), f"cannot freeze {name or '<root>'!r}: its weight")
    for _, module in qmodules:
        module.freeze()
    return model


def quantization_map(model: torch.nn.Module) -> dict[str, dict]:
    """Describe every quantized module: its class, qtypes, activation mode, group size (int4 / int2 weights)
    and whether it is frozen.

    The map is JSON-serializable; with a state_dict it is all ``requantize`` needs to rebuild the model.
    """
    return {
        name: {
            "class": type(m).__name__,
            "weights": m.weight_qtype.name if m.weight_qtype else None,
            "activations": m.activation_qtype.name if m.activation_qtype else None,
            "activation_mode": m.activation_mode,
            "frozen": m.frozen,
        }
        | ({"group_size": m.group_size} if m.weight_qtype in PACKED_QTYPES else {})
        for name, m in _qmodules(model)
    }


def _check_float_skeleton(model: torch.nn.Module) -> None:
    """``requantize`` (and ``load``) quantize the skeleton as the map says: it must not be quantized yet."""
    if quantized := [name or "<root>" for name, _ in _qmodules(model)]:
        raise ValueError(
            f"the skeleton is already quantized (quantized modules: {quantized[:5]}); requantize and load "
            "expect the float model's skeleton, as built before quantize()"
        )


def _meta_non_persistent_buffers(model: torch.nn.Module) -> list[str]:
    """Non-persistent buffers (position ids, rotary frequencies) on the meta device: no state_dict holds
    them, so loading cannot materialize them, and they would fail or mislead at run time."""
    return [
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules(remove_duplicate=False)
        for name, buffer in module._buffers.items()  # in registration order (the set's order varies)
        if name in module._non_persistent_buffers_set and buffer is not None and buffer.is_meta
    ]


def requantize(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], qmap: dict[str, dict], strict: bool = True
) -> torch.nn.Module:
    """Rebuild a quantized model from its float skeleton, a quantized state_dict and its quantization map.

    The skeleton may live on the meta device (``with torch.device("meta"): model = Model()``): tensors of
    the state_dict are assigned, not copied. Its non-persistent buffers are in no state_dict: with
    ``strict`` they must not be on meta; ``strict=False`` (loading shards one at a time) leaves them to you.

    Raises:
        ValueError: an already quantized skeleton, non-persistent buffers on the meta device (``strict``),
            a map entry that names no module, or a module whose quantized class differs from the map;
            RuntimeError (from ``load_state_dict``): missing, unexpected or mis-shaped keys.
    """
    _check_float_skeleton(model)
    if strict and (meta := _meta_non_persistent_buffers(model)):
        raise ValueError(
            f"the skeleton's non-persistent buffers {meta[:5]} are on the meta device, and no state_dict "
            'holds them: build the skeleton on a real device (e.g. under `with torch.device("cpu"):`) or '
            "materialize these buffers first"
        )
    replacements = {}
    for name, entry in qmap.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"quantization map names module {name!r}, which the model does not have") from e
        qcls = qmodule_class_for(module)
        if qcls is None or qcls.__name__ != entry.get("class"):
            raise ValueError(
                f"module {name!r} is a {type(module).__name__}, "
                f"which does not quantize to {entry.get('class')}"
            )
        qmodule = qcls.from_module(
            module,
            weights=entry["weights"],
            activations=entry["activations"],
            activation_mode=entry["activation_mode"],
            group_size=entry.get("group_size", DEFAULT_GROUP_SIZE),
        )
        if entry.get("frozen"):
            qmodule.freeze()
        replacements[id(module)] = qmodule
    model = _replace(model, replacements)
    model.load_state_dict(state_dict, strict=strict, assign=True)
    return model
