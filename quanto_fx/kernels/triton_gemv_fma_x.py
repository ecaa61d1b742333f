"""What the CUDA-core decode kernels (``triton_lowbit_gemv_fma``, ``triton_int8_gemv_fma``) share: x read as
64-bit words of four 16-bit values, rows of x along the grid's second axis, and their forced configs.

Each kernel's weight is read in units of four codes (int4: two bytes, int2: one, int8 and float8: four),
and x in the word of the four values that match them, with a zero stride along the output columns: every
tile of a step has the units' shape, so the compiler keeps each warp's work in registers (no shared memory
in the K loop).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_launch import _is_power_of_two

MAX_GRID_Y = 65535  # CUDA's largest grid along y: the most rows a launch takes (int8: a program per row)
FMA_CONFIG_KEYS = {"BLOCK_N", "BLOCK_B", "SLICES", "num_warps", "num_stages"}


@triton.jit
def _x_value(words, j: tl.constexpr, DTYPE: tl.constexpr):
    """The j-th 16-bit value of each 64-bit word of x (little-endian: j = 0 in the low bits), as float32."""
    half_word = (words >> (32 * (j // 2))).to(tl.int32)
    if DTYPE == tl.bfloat16:  # a bfloat16 is a float32's high half
        bits = half_word << 16 if j % 2 == 0 else half_word & -65536  # -65536: 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return (half_word >> (16 * (j % 2))).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _x_word_ptrs(x_ptr, row, stride_xm, ru, rn):
    """Pointers to x's 64-bit words ``ru`` (the weight's units, 2-D) of ``row``, for every column ``rn``
    (stride 0 along N): the tile and its layout are the weight's. Rows are 16-byte aligned
    (``fma_reads_x``)."""
    x_row = tl.multiple_of(row * (stride_xm // 4), 2)
    return x_ptr.to(tl.pointer_type(tl.int64)) + x_row + ru[None, :, :] + 0 * rn[:, None, None]


def fma_reads_x(x: torch.Tensor) -> bool:
    """Whether the CUDA-core decode kernels can read x: 16-bit values, each row contiguous and 16-byte aligned
    (they read x's values four to a word, 16 bytes at a time)."""
    aligned_rows = x.shape[0] == 1 or x.stride(0) % 8 == 0
    return (
        x.dtype in (torch.bfloat16, torch.float16)
        and x.stride(1) == 1
        and x.data_ptr() % 16 == 0
        and aligned_rows
    )


def contiguous_aligned_rows(t: torch.Tensor, unit_bytes: int) -> bool:
    """Whether the rows of a 2-D byte-element weight ``t`` are contiguous and start ``unit_bytes``-aligned."""
    aligned_rows = t.shape[0] == 1 or t.stride(0) % unit_bytes == 0
    return t.stride(1) == 1 and t.data_ptr() % unit_bytes == 0 and aligned_rows


def fma_config(block_n: int, block_b: int, slices: int, num_warps: int, num_stages: int) -> triton.Config:
    """A config of a CUDA-core decode kernel: BLOCK_N columns a program, SLICES K slices of BLOCK_B bytes of
    each weight row a step."""
    kwargs = {"BLOCK_N": block_n, "BLOCK_B": block_b, "SLICES": slices}
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


def unreadable_operands(
    x: torch.Tensor, name: str, weight: torch.Tensor, unit_bytes: int, more: str = ""
) -> str:
    """The launchers' error for a forced CUDA-core config whose operands the kernel cannot read: what it reads
    (x as ``fma_reads_x`` does; ``name``'s rows contiguous and ``unit_bytes``-aligned; then ``more``) and what
    it got."""
    aligned, offset = "", ""
    if unit_bytes > 1:
        aligned = f" and {unit_bytes}-byte aligned"
        offset = f", starting {weight.data_ptr() % unit_bytes} bytes past {unit_bytes}-byte alignment"
    return (
        "a config with BLOCK_B runs the CUDA-core decode kernel, which reads bfloat16 / float16 x whose rows "
        "are contiguous, start 16-byte aligned and, for M > 1, lie a multiple of 8 elements apart, and "
        f"{name} rows that are contiguous{aligned}{more}; got {x.dtype} x with strides {tuple(x.stride())}, "
        f"starting {x.data_ptr() % 16} bytes past 16-byte alignment, and {weight.dtype} {name} with strides "
        f"{tuple(weight.stride())}{offset}"
    )


def forced_fma_config(config: dict, codes_per_byte: int, m: int, rows: int) -> tuple[dict, dict]:
    """(block sizes, launch options) of a forced config with BLOCK_B (a CUDA-core decode kernel), checked:
    known keys, powers of two, at least one unit of four codes a slice, and M's programs (``rows`` rows a
    program) within MAX_GRID_Y."""
    unknown = set(config) - FMA_CONFIG_KEYS
    if unknown:
        raise ValueError(
            f"config has unknown keys {sorted(unknown)}: a config with BLOCK_B (the CUDA-core decode kernel) "
            "takes BLOCK_N, BLOCK_B, SLICES, num_warps and num_stages"
        )
    if "BLOCK_N" not in config:
        raise ValueError("config lacks ['BLOCK_N']")
    meta = {"BLOCK_N": config["BLOCK_N"], "BLOCK_B": config["BLOCK_B"], "SLICES": config.get("SLICES", 1)}
    for name, value in meta.items():
        if not isinstance(value, int) or isinstance(value, bool) or not _is_power_of_two(value):
            raise ValueError(f"config {name} must be a power of two >= 1 (tl.arange's length), got {value!r}")
    if meta["BLOCK_B"] * codes_per_byte < 4:
        raise ValueError(f"config BLOCK_B = {meta['BLOCK_B']} holds fewer than the kernel's 4 codes a read")
    if -(-m // rows) > MAX_GRID_Y:
        raise ValueError(
            f"the CUDA-core decode kernel runs {rows} row(s) a program here, along a grid axis of at most "
            f"{MAX_GRID_Y} programs: at most {rows * MAX_GRID_Y} rows, got M = {m}"
        )
    return meta, {"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 1)}
