"""Triton kernel: int4 / int2 weight-only decode for the smallest M, on the CUDA cores (no tl.dot).

The weight format is the one in ``triton_lowbit_mm`` (packed bytes, a scale and zero per group and column).
For M = 1 the tensor-core decode kernel (``lowbit_gemv_kernel``) pads x to tl.dot's 16 rows: 15 of them are
masked zeros, yet they take shared memory in every pipeline stage (16 KB a stage for 4 slices of 128 bf16
columns, four times the weight's bytes), and its best config ran at 9.6 us at 4096 x 4096 on an H200, where
bf16 took 10.0 (bench/RESULTS.md). Here a program multiplies one or two rows of x by BLOCK_N columns with
float32 FMAs, the weight dequantized in registers: no shared memory in the K loop. Each program dequantizes
its weight tile again, so the kernel serves M up to ``FMA_MAX_M`` (the launcher), 16-bit x only (x's values
are read four to a 64-bit word).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_gemv_fma_x import _x_value, _x_word_ptrs


@triton.jit
def _with_magic(units):
    """Each unit's bits in the low bits of an int32, under the exponent of 2**23 (see _centered_field). The
    bits between them may be anything: _centered_field masks them off."""
    return units.to(tl.int32) | 0x4B000000


@triton.jit
def _centered_field(magic_units, p: tl.constexpr, BITS: tl.constexpr):
    """The code at bit p of each unit (``_with_magic``'s output) minus the zero point's code, times 2**p,
    exactly, as float32. Keeping the exponent's bits and the code's in one AND reads as 2**23 + code * 2**p
    (p + BITS <= 23: in the mantissa); subtracting 2**23 + MID * 2**p is exact. Shifting each code down to
    bit 0 first, as ``_centered_codes`` does, took a shift and a second logic instruction per code (two
    constants do not fit one LOP3; sm_90 SASS)."""
    MID: tl.constexpr = 1 << (BITS - 1)
    field = magic_units & (0x4B000000 | (((1 << BITS) - 1) << p))
    return field.to(tl.float32, bitcast=True) - (8388608.0 + MID * (1 << p))


@triton.jit
def lowbit_gemv_fma_kernel(
    x_ptr,
    packed_ptr,
    scale_zeros_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_pn,
    stride_pk,
    stride_sg,
    stride_sn,
    stride_sc,
    stride_b,
    stride_om,
    stride_on,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    SLICES: tl.constexpr,
    EVEN_K: tl.constexpr,
    ROWS: tl.constexpr,
):
    """``out = x @ w.T (+ bias)`` for ROWS (1 or 2) rows of x and BLOCK_N columns a program (the arguments of
    ``lowbit_gemv_kernel``; M_BUCKET is the autotuner's key; x is 16-bit with a unit stride_xk and rows
    aligned to 16 bytes, the packed rows are contiguous and (int4) start 2-byte aligned: the launcher checks;
    stride_pk, 1, is not read). Each step reads SLICES consecutive K slices of BLOCK_B bytes of every weight
    row; a slice's BLOCK_B * PER_BYTE codes lie in one group (the launcher fits BLOCK_B to the group size).
    Slices past K load zero x, scale and zero: they add nothing. EVEN_K: K is a multiple of SLICES * BLOCK_K,
    and the loads need no mask (columns past N read column N - 1's weight, and are not stored).

    ROWS = 2 dequantizes each weight code once for two rows of x: sm_90 SASS, int4 and bf16 x, 8.3-8.6
    instructions a code for both rows against 6.2-6.4 for one (and about the 8.2 that the kernel took for one
    row when an H200 timed it at 8.0 us, bench/RESULTS.md). The last program of an odd M reads its one row
    twice and stores it once.

    The weight is read in units of four codes (int4: two bytes, int2: one), x in 64-bit words of the four
    values that match them. Code j of a unit stays at bit p = j * BITS: ``_centered_field`` reads it there,
    and the scale is taken times 2**-p, so the product is (q - MID) * scale exactly.

    The weight stays in float32: one rounding fewer than the tensor-core kernels, which round it to x's dtype
    before tl.dot. So a row's result at M <= 2 may differ from the same row's in a larger batch in the last
    bit of x's dtype (both are within the reference's tolerance).

    Every tile has the shape of the step's units, (BLOCK_N, SLICES, BLOCK_U): x's words are read with a zero
    stride along N, and scale and zero (rounded to x's dtype, as the other kernels and the reference round
    them) broadcast along the units. Tiles of other shapes made the compiler move x and the sums between
    layouts through shared memory, with barriers in the K loop (sm_90 SASS: 10 a step); this way each warp
    runs on its own, and the one reduction comes after the loop.
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    BLOCK_K: tl.constexpr = BLOCK_B * PER_BYTE
    tl.static_assert(GROUP_SIZE % BLOCK_K == 0, "a slice's codes must lie in one group")
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    UNIT: tl.constexpr = tl.int16 if BITS == 4 else tl.uint8  # four codes
    UNIT_BYTES: tl.constexpr = 2 if BITS == 4 else 1
    BLOCK_U: tl.constexpr = BLOCK_K // 4
    tl.static_assert(BLOCK_U >= 1, "a slice holds at least one unit of four codes")

    pid_n = tl.program_id(0)
    row = tl.program_id(1) * ROWS
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_read = tl.minimum(rn, N - 1)  # a partial tile's last columns read a real one's weight: no load masks
    slice_k = tl.arange(0, SLICES) * BLOCK_K  # each slice's first code, from the step's
    ru = slice_k[:, None] // 4 + tl.arange(0, BLOCK_U)[None, :]  # (SLICES, BLOCK_U) units of a row
    x_words_ptrs = _x_word_ptrs(x_ptr, row, stride_xm, ru, rn)
    x_words_ptrs_2 = _x_word_ptrs(x_ptr, tl.minimum(row + 1, M - 1), stride_xm, ru, rn)  # ROWS = 2
    unit_row = rn_read[:, None, None] * (stride_pn // UNIT_BYTES)
    unit_ptrs = packed_ptr.to(tl.pointer_type(UNIT)) + unit_row + ru[None, :, :]
    sz_ptrs = scale_zeros_ptr + rn_read[:, None] * stride_sn + (slice_k[None, :] // GROUP_SIZE) * stride_sg

    acc = tl.zeros((BLOCK_N, SLICES, BLOCK_U), dtype=tl.float32)
    acc_2 = tl.zeros((BLOCK_N, SLICES, BLOCK_U), dtype=tl.float32)  # ROWS = 2
    for k0 in range(0, K, SLICES * BLOCK_K):
        group_ptrs = sz_ptrs + (k0 // GROUP_SIZE) * stride_sg
        in_k = slice_k < K - k0  # all true when EVEN_K
        if EVEN_K:
            units = tl.load(unit_ptrs + k0 // 4)
            scale = tl.load(group_ptrs)
            zero = tl.load(group_ptrs + stride_sc)
        else:
            units = tl.load(unit_ptrs + k0 // 4, mask=in_k[None, :, None], other=0)
            scale = tl.load(group_ptrs, mask=in_k[None, :], other=0.0)
            zero = tl.load(group_ptrs + stride_sc, mask=in_k[None, :], other=0.0)
        x_words = _load_x_words(x_words_ptrs + k0 // 4, in_k, EVEN_K)
        if ROWS == 2:
            x_words_2 = _load_x_words(x_words_ptrs_2 + k0 // 4, in_k, EVEN_K)
        scale = scale.to(DTYPE).to(tl.float32)[:, :, None]
        zero = zero.to(DTYPE).to(tl.float32)[:, :, None]
        magic_units = _with_magic(units)
        for j in tl.static_range(4):
            weight = _centered_field(magic_units, j * BITS, BITS) * (scale * (1.0 / (1 << (j * BITS)))) + zero
            acc += _x_value(x_words, j, DTYPE) * weight
            if ROWS == 2:
                acc_2 += _x_value(x_words_2, j, DTYPE) * weight

    bias = tl.load(bias_ptr + rn_read * stride_b).to(tl.float32) if HAS_BIAS else 0.0
    out_ptrs = out_ptr + row * stride_om + rn * stride_on
    out_dtype: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out_ptrs, (tl.sum(tl.sum(acc, axis=2), axis=1) + bias).to(out_dtype), mask=rn < N)
    if ROWS == 2:
        out_2 = tl.sum(tl.sum(acc_2, axis=2), axis=1) + bias
        tl.store(out_ptrs + stride_om, out_2.to(out_dtype), mask=(rn < N) & (row + 1 < M))


@triton.jit
def _load_x_words(ptrs, in_k, EVEN_K: tl.constexpr):
    """A step's words of x: slices past K (``in_k`` false; only without EVEN_K) load zero."""
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=in_k[None, :, None], other=0)


def fma_rows(m: int) -> int:
    """The kernel's ROWS for M rows of x (a heuristic of the launcher): two rows a program share each code's
    dequantization."""
    return min(m, 2)


def fit_block_b(config: triton.Config, bits: int, group_size: int, rows: int = 1) -> triton.Config:
    """``config`` with BLOCK_B cut so that a slice's codes lie in one group. SLICES stays: raising it to keep
    a step's bytes made the compiler convert int2's scales through shared memory, with barriers in the loop
    (float16, 16 and 32 slices). Tiles for groups under 128 int4 or 256 int2 codes are smaller: untimed.
    With two rows of x a program, int2 slices are halved too: at 64 bytes its x words for both rows took
    128-249 registers a thread (sm_90), at 32 bytes 72-83 for the 4- and 8-warp configs, as int4's 64 do."""
    block_b = min(config.kwargs["BLOCK_B"], group_size // (8 // bits))
    if bits == 2 and rows == 2:
        block_b = max(block_b // 2, 1)
    if block_b == config.kwargs["BLOCK_B"]:
        return config
    kwargs = {**config.kwargs, "BLOCK_B": block_b}
    return triton.Config(kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
