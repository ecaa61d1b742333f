"""save / load: one safetensors file holding the state_dict (QTensors as data + scale) and, in its
metadata, the quantization map. Loading parses tensors and JSON only: no pickle, no code execution."""

from __future__ import annotations

import copy
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .qtypes import get_qtype
from .quantize import quantization_map, requantize
from .tensor import QTensor

__all__ = ["save", "load"]

FORMAT = "quanto_fx"
FORMAT_VERSION = "1"
_DATA, _SCALE = "._data", "._scale"


def save(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s state_dict and quantization map to one safetensors file at ``path``."""
    qmap = quantization_map(model)
    if not qmap:
        raise ValueError("save: the model has no quantized module; call quantize(model) first")
    tensors, qtensors, seen = {}, {}, set()
    for key, value in model.state_dict().items():
        parts = (
            {key + _DATA: value._data, key + _SCALE: value._scale}
            if isinstance(value, QTensor)
            else {key: value}
        )
        if isinstance(value, QTensor):
            qtensors[key] = {"axis": value.axis}
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


def _state_dict(tensors: dict[str, torch.Tensor], qtensors: dict[str, dict]) -> dict[str, torch.Tensor]:
    state = {
        k: v
        for k, v in tensors.items()
        if not (k.endswith((_DATA, _SCALE)) and k.rsplit(".", 1)[0] in qtensors)
    }
    for key, info in qtensors.items():
        if key + _DATA not in tensors or key + _SCALE not in tensors:
            raise ValueError(f"corrupted quanto_fx checkpoint: QTensor {key!r} lacks its data or scale")
        try:
            state[key] = QTensor(tensors[key + _DATA], tensors[key + _SCALE], info.get("axis"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"corrupted quanto_fx checkpoint: QTensor {key!r}: {e}") from e
    return state


def load(path: str | os.PathLike, model: torch.nn.Module) -> torch.nn.Module:
    """Quantize ``model`` (a float skeleton, possibly on the meta device) as the checkpoint at ``path``
    says, load its tensors, and return it. Bit-exact: data and scales are restored as saved.

    Nothing is unpickled. On any error — unreadable or foreign file, unknown qtype, missing, extra or
    mis-shaped keys — a ValueError names the problem and ``model`` is left as it was.
    """
    tensors, metadata = _read(path)
    qmap = _parse(metadata, "quantization_map")
    qtensors = _parse(metadata, "qtensors")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported quanto_fx format version {metadata.get('format_version')!r}")
    if not isinstance(qmap, dict) or not isinstance(qtensors, dict):
        raise ValueError("corrupted quanto_fx checkpoint: quantization map is not a mapping")
    for entry in qmap.values():
        for field in ("weights", "activations"):
            if entry.get(field) is not None:
                get_qtype(entry[field])  # raises ValueError naming the unknown qtype
    state = _state_dict(tensors, qtensors)
    # Rebuild on a copy and commit only when everything loaded.
    work = copy.deepcopy(model)
    try:
        work = requantize(work, state, qmap)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"checkpoint {path} does not fit the model: {e}") from e
    if work is not model and type(work) is not type(model):
        return work  # the root module itself was quantized
    model.__dict__.update({k: work.__dict__[k] for k in ("_parameters", "_buffers", "_modules")})
    return model
