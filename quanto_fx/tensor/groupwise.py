"""Group-wise low-bit weight quantization (int4, int2): one scale and one float zero per group of
``group_size`` consecutive input features of each output row.

Values are unsigned codes ``q`` in [0, 2**bits) with ``w = (q - mid) * scale + zero``, ``mid = 2**(bits-1)``:
the formula of torch's int4 GEMM kernels (aten._weight_int4pack_mm*), so their scales_and_zeros layout
``(K // group_size, N, 2)`` is stored as is.

- symmetric (``shift=False``): codes ``mid + round(w / scale)`` within ``mid +- (mid - 1)`` and zero = 0, as
  the seed's strict symmetric scheme (int4: 15 levels, int2: 3 levels -1, 0, 1).
- shifted (``shift=True``): the group's [min, max] spread over all ``2**bits`` codes; zero carries the shift.
"""

from __future__ import annotations

import torch

from .packing import codes_per_byte
from .quantization import check_finite

# The smallest group: the smallest K block of the tensor-core GEMM kernels (a block lies in one group).
MIN_GROUP_SIZE = 16


def check_group_size_value(group_size: int) -> None:
    """Raise ValueError unless ``group_size`` is a power of two >= ``MIN_GROUP_SIZE``."""
    if not isinstance(group_size, int) or group_size < MIN_GROUP_SIZE or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size!r}")


def check_group_size(group_size: int, in_features: int) -> None:
    """Raise ValueError unless ``group_size`` is a power of two >= ``MIN_GROUP_SIZE`` dividing
    ``in_features``."""
    check_group_size_value(group_size)
    if in_features % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the {in_features} input features; choose a group size "
            f"that divides it, or exclude the layer"
        )


def check_packed_weight(
    packed: torch.Tensor, scale_zeros: torch.Tensor, bits: int, group_size: int
) -> tuple[int, int]:
    """Check the parts of a packed group-wise weight against each other; returns (out, in) features.

    Raises:
        TypeError: ``packed`` not uint8, ``scale_zeros`` not float.
        ValueError: bits not 2 or 4, shapes that do not fit, a bad group size, parts on different devices.
    """
    per_byte = codes_per_byte(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a torch.uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
    if not isinstance(scale_zeros, torch.Tensor) or not scale_zeros.is_floating_point():
        raise TypeError(
            f"scale_zeros must be a floating point tensor, got {getattr(scale_zeros, 'dtype', None)}"
        )
    if packed.ndim != 2:
        raise ValueError(
            f"packed must be 2-d (out_features, in_features / {per_byte}), got {tuple(packed.shape)}"
        )
    if packed.device != scale_zeros.device:
        raise ValueError(f"packed is on {packed.device} but scale_zeros on {scale_zeros.device}")
    out_features, in_features = packed.shape[0], packed.shape[1] * per_byte
    check_group_size(group_size, in_features)
    expected = (in_features // group_size, out_features, 2)
    if tuple(scale_zeros.shape) != expected:
        raise ValueError(
            f"scale_zeros of a ({out_features}, {in_features}) weight in groups of {group_size} must have "
            f"shape {expected}, got {tuple(scale_zeros.shape)}"
        )
    return out_features, in_features


def quantize_groupwise(
    weight: torch.Tensor, bits: int, group_size: int, shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, shaped like ``weight``) and scales_and_zeros ``(K // group_size, N, 2)`` of a 2-d weight.

    Raises:
        ValueError: not 2-d, a bad group size, or non-finite values.
    """
    if weight.ndim != 2:
        raise ValueError(f"group-wise quantization takes a 2-d (out, in) weight, got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    check_group_size(group_size, in_features)
    check_finite(weight, "weight")
    groups = weight.reshape(out_features, in_features // group_size, group_size)
    mid = 2 ** (bits - 1)
    tiny = torch.finfo(weight.dtype).tiny
    if shift:
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / (2**bits - 1)).clamp_min(tiny)
        codes = torch.round((groups - low) / scale).clamp_(0, 2**bits - 1)
        zero = low + mid * scale
    else:
        qmax = mid - 1
        peak = torch.maximum(-groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True))
        scale = (peak / qmax).clamp_min(tiny)
        codes = torch.round(groups / scale).clamp_(-qmax, qmax) + mid
        zero = torch.zeros_like(scale)
    scale_zeros = torch.cat([scale, zero], dim=-1).permute(1, 0, 2).contiguous()
    return codes.to(torch.uint8).reshape(out_features, in_features), scale_zeros


def dequantize_groupwise(
    codes: torch.Tensor, scale_zeros: torch.Tensor, bits: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``(q - mid) * scale + zero`` in the scales' dtype, shaped like ``codes`` (N, K).

    ``out``: a contiguous (N, K) tensor of the scales' dtype to write into (the same values, computed in
    place: no temporary of the weight's size).
    """
    out_features, in_features = codes.shape
    n_groups = scale_zeros.shape[0]
    per_group = scale_zeros.permute(1, 0, 2)  # (N, groups, 2)
    if out is None:
        out = torch.empty((out_features, in_features), dtype=scale_zeros.dtype, device=codes.device)
    grouped = out.view(out_features, n_groups, -1)
    grouped.copy_(codes.reshape(out_features, n_groups, -1))
    return grouped.sub_(2 ** (bits - 1)).mul_(per_group[..., :1]).add_(per_group[..., 1:]).view_as(out)
