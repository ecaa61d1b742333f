"""Triton kernel: int4 / int2 weight-only decode for the smallest M, on the CUDA cores (no tl.dot).

The weight format is the one in ``triton_lowbit_mm`` (packed bytes, a scale and zero per group and column).
For M = 1 the tensor-core decode kernel (``lowbit_gemv_kernel``) pads x to tl.dot's 16 rows: 15 of them are
masked zeros, yet they take shared memory in every pipeline stage (16 KB a stage for 4 slices of 128 bf16
columns, four times the weight's bytes), and its best config ran at 9.6 us at 4096 x 4096 on an H200, where
bf16 took 10.0 (bench/RESULTS.md). Here a program multiplies one row of x by BLOCK_N columns with float32
FMAs, the weight dequantized in registers: no shared memory in the K loop. Each row is a program of its own
and dequantizes the weight again, so the kernel serves M up to ``FMA_MAX_M`` (the launcher), 16-bit x only
(x's values are read two or four to a word).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_lowbit_codes import _dequantize


@triton.jit
def _x_value(words, j: tl.constexpr, DTYPE: tl.constexpr):
    """The j-th 16-bit value of each word of x (little-endian: j = 0 in the low bits), as float32."""
    half = (words >> (16 * j)).to(tl.int32)
    if DTYPE == tl.bfloat16:  # a bfloat16 is a float32's high half
        return (half << 16).to(tl.float32, bitcast=True)
    return half.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


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
):
    """``out = x @ w.T (+ bias)`` for one row of x and BLOCK_N columns a program (the arguments of
    ``lowbit_gemv_kernel``; M_BUCKET is the autotuner's key; x is 16-bit with a unit stride_xk and rows
    aligned to 16 bytes: the launcher checks). Each step reads SLICES consecutive K slices of BLOCK_B bytes of
    every weight row; a slice's BLOCK_B * PER_BYTE codes lie in one group (the launcher fits BLOCK_B to the
    group size). Slices past K load zero x, scale and zero: they add nothing.

    The weight stays in float32: one rounding fewer than the tensor-core kernels, which round it to x's dtype
    before tl.dot. So a row's result at M = 1 may differ from the same row's in a larger batch in the last
    bit of x's dtype (both are within the reference's tolerance).

    Every tile has the shape of the step's bytes, (BLOCK_N, SLICES, BLOCK_B): x's words are read with a zero
    stride along N, and scale and zero (rounded to x's dtype, as the other kernels and the reference round
    them) broadcast along the bytes. Tiles of other shapes made the compiler move x and the sums between
    layouts through shared memory, with barriers in the K loop (sm_90 SASS: 10 a step); this way each warp
    runs on its own, and the one reduction comes after the loop.
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    BLOCK_K: tl.constexpr = BLOCK_B * PER_BYTE
    tl.static_assert(GROUP_SIZE % BLOCK_K == 0, "a slice's codes must lie in one group")
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    # x's PER_BYTE 16-bit values of a byte's codes, read as one word.
    X_WORD: tl.constexpr = tl.int32 if PER_BYTE == 2 else tl.int64

    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    slice_k = tl.arange(0, SLICES) * BLOCK_K  # each slice's first code, from the step's
    rb = slice_k[:, None] // PER_BYTE + tl.arange(0, BLOCK_B)[None, :]  # (SLICES, BLOCK_B) bytes of a row
    x_row = tl.multiple_of(row * (stride_xm // PER_BYTE), 16 // (2 * PER_BYTE))  # 16-byte aligned rows
    # x's words for every column (stride 0 along N): the tile and its layout are the bytes'.
    x_word_ptrs = x_ptr.to(tl.pointer_type(X_WORD)) + x_row + rb[None, :, :] + 0 * rn[:, None, None]
    packed_ptrs = packed_ptr + rn[:, None, None] * stride_pn + rb[None, :, :] * stride_pk
    sz_ptrs = scale_zeros_ptr + rn[:, None] * stride_sn + (slice_k[None, :] // GROUP_SIZE) * stride_sg

    acc = tl.zeros((BLOCK_N, SLICES, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, K, SLICES * BLOCK_K):
        in_k = slice_k < K - k0  # all true when K is a multiple of SLICES * BLOCK_K
        byte = tl.load(
            packed_ptrs + (k0 // PER_BYTE) * stride_pk, mask=n_mask[:, None, None] & in_k[:, None], other=0
        )
        x_words = tl.load(x_word_ptrs + k0 // PER_BYTE, mask=in_k[None, :, None], other=0)
        group_ptrs = sz_ptrs + (k0 // GROUP_SIZE) * stride_sg
        sz_mask = n_mask[:, None] & in_k[None, :]
        scale = tl.load(group_ptrs, mask=sz_mask, other=0.0).to(DTYPE).to(tl.float32)[:, :, None]
        zero = tl.load(group_ptrs + stride_sc, mask=sz_mask, other=0.0).to(DTYPE).to(tl.float32)[:, :, None]
        for j in tl.static_range(PER_BYTE):
            acc += _x_value(x_words, j, DTYPE) * _dequantize(byte, j, scale, zero, BITS)

    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn * stride_b, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + rn * stride_on, out.to(out_ptr.dtype.element_ty), mask=n_mask)


def fma_config(block_n: int, block_b: int, slices: int, num_warps: int, num_stages: int) -> triton.Config:
    """A config of ``lowbit_gemv_fma_kernel``."""
    kwargs = {"BLOCK_N": block_n, "BLOCK_B": block_b, "SLICES": slices}
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


def fit_block_b(config: triton.Config, bits: int, group_size: int) -> triton.Config:
    """``config`` with BLOCK_B cut so that a slice's codes lie in one group. SLICES stays: raising it to keep
    a step's bytes made the compiler convert int2's scales through shared memory, with barriers in the loop
    (float16, 16 and 32 slices). Tiles for groups under 128 int4 or 256 int2 codes are smaller: untimed."""
    block_b = min(config.kwargs["BLOCK_B"], group_size // (8 // bits))
    if block_b == config.kwargs["BLOCK_B"]:
        return config
    kwargs = {**config.kwargs, "BLOCK_B": block_b}
    return triton.Config(kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
