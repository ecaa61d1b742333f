"""Bit packing of low-bit codes along the last dimension: two int4 or four int2 codes per byte.

The layout is portable (the same bytes on every device and machine), so checkpoints hold it as is: code
``k`` of a row lives in byte ``k // per_byte`` at bit offset ``(k % per_byte) * bits``, least significant
bits first. Kernels that want another layout derive it from this one.
"""

from __future__ import annotations

import torch

PACKED_BITS = (2, 4)


def codes_per_byte(bits: int) -> int:
    if bits not in PACKED_BITS:
        raise ValueError(f"packing supports {PACKED_BITS} bits per code, got {bits}")
    return 8 // bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``codes`` (integer tensor, values in [0, 2**bits)) into uint8 along the last dim.

    Raises:
        ValueError: the last dimension is not a multiple of the codes per byte, or a code is out of range.
    """
    per_byte = codes_per_byte(bits)
    if codes.shape[-1] % per_byte:
        raise ValueError(f"cannot pack {codes.shape[-1]} codes of {bits} bits: not a multiple of {per_byte}")
    if not codes.is_meta and codes.numel() and not bool(((codes >= 0) & (codes < 2**bits)).all()):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to be packed in {bits} bits")
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    packed = grouped[..., 0].clone()
    for i in range(1, per_byte):
        packed |= grouped[..., i] << (i * bits)
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The uint8 codes of ``packed`` (inverse of :func:`pack`): last dimension times the codes per byte."""
    per_byte = codes_per_byte(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be torch.uint8, got {packed.dtype}")
    mask = 2**bits - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)
