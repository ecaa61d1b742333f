"""save / load: one safetensors file holding the state_dict and, in its metadata, the quantization map.

A QTensor is stored as its data and scale, a PackedQTensor as its portable packed codes and scales_and_zeros
(never its machine-specific kernel layout, which is rebuilt on load). Loading parses tensors and JSON only:
no pickle, no code execution."""

from __future__ import annotations

import copy
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .qtypes import get_qtype
from .quantize import quantization_map, requantize
from .tensor import PackedQTensor, QTensor
from .tensor.packed_qtensor import PACKED_QTYPES, check_packed_values
from .tensor.quantization import check_scale_values

__all__ = ["save", "load"]

FORMAT = "quanto_fx"
FORMAT_VERSION = "2"  # 2 added PackedQTensor entries; version 1 files (QTensors only) still load
READABLE_VERSIONS = ("1", "2")
# The stored parts of each quantized tensor class, as key suffixes of the tensor's state_dict key.
_PARTS = {cls.__name__: cls.STORED for cls in (QTensor, PackedQTensor)}
# The static activation scale buffers every quantized module has (QModuleMixin.init_quantization).
_ACTIVATION_SCALES = ("in_scale", "out_scale")


def _describe(value: torch.Tensor) -> tuple[str, dict] | None:
    """(class name, JSON info) of a quantized tensor, None for a plain tensor."""
    if isinstance(value, QTensor):
        return "QTensor", {"axis": value.axis}
    if isinstance(value, PackedQTensor):
        info = {
            "qtype": value.qtype.name,
            "group_size": value.group_size,
            "transposed": value.transposed,
            "gemm_layout": value.gemm_layout,
        }
        return "PackedQTensor", info
    return None


def _rebuild(kind: str, parts: dict[str, torch.Tensor], info: dict) -> torch.Tensor:
    """The quantized tensor from its stored parts; TypeError / ValueError when they do not fit together."""
    if kind == "QTensor":
        return QTensor(parts["_data"], parts["_scale"], info.get("axis"))
    group_size, transposed = info.get("group_size"), info.get("transposed", False)
    gemm_layout = info.get("gemm_layout", True)
    if (
        not isinstance(group_size, int)
        or not isinstance(transposed, bool)
        or not isinstance(gemm_layout, bool)
    ):
        raise ValueError(
            f"bad group_size {group_size!r}, transposed {transposed!r} or gemm_layout {gemm_layout!r}"
        )
    qtype = get_qtype(info.get("qtype"))
    w = PackedQTensor(
        parts["_packed"], parts["_scale_zeros"], qtype, group_size, transposed, gemm_layout=gemm_layout
    )
    check_packed_values(w)
    return w


def save(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s state_dict and quantization map to one safetensors file at ``path``.

    Raises:
        ValueError: the model has no quantized module; IsADirectoryError: ``path`` is a directory.
    """
    if os.path.isdir(path):
        raise IsADirectoryError(f"save: {path} is a directory; pass the path of the file to write")
    qmap = quantization_map(model)
    if not qmap:
        raise ValueError("save: the model has no quantized module; call quantize(model) first")
    tensors, qtensors, seen = {}, {}, set()
    for key, value in model.state_dict().items():
        parts = {key: value}
        if (described := _describe(value)) is not None:
            kind, info = described
            qtensors[key] = {"type": kind} | info
            parts = {f"{key}.{part}": getattr(value, part) for part in _PARTS[kind]}
        for name, tensor in parts.items():
            tensor = tensor.detach().contiguous()
            # safetensors refuses shared storage (tied weights): store a copy, values stay identical.
            if tensor.untyped_storage().data_ptr() in seen:
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
            tensors[name] = tensor
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "quantization_map": json.dumps(qmap),
        "qtensors": json.dumps(qtensors),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    # Checked apart: the handler below turns every other OSError into "not a readable safetensors file".
    if not os.path.exists(path):
        raise FileNotFoundError(f"no quanto_fx checkpoint at {path}: the file does not exist")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(
                    f"{path} is not a quanto_fx checkpoint (its metadata has no format={FORMAT!r})"
                )
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def _parse(metadata: dict[str, str], key: str):
    try:
        return json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupted quanto_fx checkpoint: metadata {key!r} is missing or not JSON") from e


def _checked(what: str, check, *args):
    """``check(*args)``, its TypeError / ValueError raised as a corrupted checkpoint naming ``what``."""
    try:
        return check(*args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"corrupted quanto_fx checkpoint: {what}: {e}") from e


def _is_activation_scale(key: str, qmap: dict[str, dict]) -> bool:
    module, _, name = key.rpartition(".")
    return name in _ACTIVATION_SCALES and module in qmap


def _state_dict(
    tensors: dict[str, torch.Tensor], qtensors: dict[str, dict], qmap: dict[str, dict]
) -> dict[str, torch.Tensor]:
    """The state_dict the checkpoint holds, its quantized tensors rebuilt and every scale checked."""
    state = dict(tensors)
    for key, info in qtensors.items():
        kind = info.get("type", "QTensor") if isinstance(info, dict) else None
        if kind not in _PARTS:
            raise ValueError(f"corrupted quanto_fx checkpoint: {key!r} has unknown tensor type {kind!r}")
        names = {part: f"{key}.{part}" for part in _PARTS[kind]}
        if any(name not in tensors for name in names.values()):
            raise ValueError(f"corrupted quanto_fx checkpoint: {kind} {key!r} lacks one of {_PARTS[kind]}")
        parts = {part: state.pop(name) for part, name in names.items()}
        state[key] = _checked(f"{kind} {key!r}", _rebuild, kind, parts, info)
    # Calibration only writes finite positive scales; any other would fail at the first eager forward, or
    # give garbage under torch.compile, where the value checks are skipped.
    for key, value in state.items():
        if _is_activation_scale(key, qmap):
            _checked(f"activation scale {key!r}", check_scale_values, value)
    return state


def _check_frozen_weights(model: torch.nn.Module, qmap: dict[str, dict]) -> None:
    """Each frozen module's loaded weight is what its map entry says it is: load_state_dict checks shapes, not
    the qtype (a float8 weight under a qint8 entry would run the float8 kernels), the axis or the groups."""
    for name, entry in qmap.items():
        if not entry.get("frozen") or entry.get("weights") is None:
            continue
        weight, qtype = model.get_submodule(name).weight, get_qtype(entry["weights"])
        packed = qtype in PACKED_QTYPES
        grouping = f"in groups of {entry.get('group_size')}" if packed else "per output channel"
        if isinstance(weight, PackedQTensor):
            ok = weight.qtype == qtype and weight.group_size == entry.get("group_size", weight.group_size)
            found = f"a {weight.qtype.name} PackedQTensor in groups of {weight.group_size}"
        elif isinstance(weight, QTensor):
            ok = weight.qdtype == qtype.dtype and weight.axis == 0 and not packed
            found = f"a {weight.qdtype} QTensor along axis {weight.axis}"
        else:
            ok, found = False, f"a {type(weight).__name__}"
        if not ok:
            raise ValueError(
                f"corrupted quanto_fx checkpoint: {name!r} is frozen with {qtype.name} weights ({grouping}), "
                f"but holds {found}"
            )


def load(path: str | os.PathLike, model: torch.nn.Module) -> torch.nn.Module:
    """Quantize ``model`` (a float skeleton, possibly on the meta device) as the checkpoint at ``path``
    says, load its tensors, and return it. Bit-exact: data and scales are restored as saved.

    Nothing is unpickled. On any error — unreadable or foreign file, unknown qtype, missing, extra or
    mis-shaped keys, non-finite or non-positive scales, an already quantized skeleton, non-persistent
    buffers left on the meta device (no checkpoint holds them) — a ValueError names the problem and
    ``model`` is left as it was; a ``path`` that does not exist raises FileNotFoundError.
    """
    tensors, metadata = _read(path)
    qmap = _parse(metadata, "quantization_map")
    qtensors = _parse(metadata, "qtensors")
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: unsupported quanto_fx format version {metadata.get('format_version')!r}")
    if not isinstance(qmap, dict) or not isinstance(qtensors, dict):
        raise ValueError("corrupted quanto_fx checkpoint: quantization map is not a mapping")
    for name, entry in qmap.items():
        if not isinstance(entry, dict):
            raise ValueError(
                f"corrupted quanto_fx checkpoint: quantization map entry {name!r} is not a mapping"
            )
        for field in ("weights", "activations"):
            if entry.get(field) is not None:
                get_qtype(entry[field])  # raises ValueError naming the unknown qtype
    state = _state_dict(tensors, qtensors, qmap)
    # Rebuild on a copy and commit only when everything loaded.
    work = copy.deepcopy(model)
    try:
        work = requantize(work, state, qmap)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"checkpoint {path} does not fit the model: {e}") from e
    _check_frozen_weights(work, qmap)
    if work is not model and type(work) is not type(model):
        return work  # the root module itself was quantized
    model.__dict__.update({k: work.__dict__[k] for k in ("_parameters", "_buffers", "_modules")})
    return model
