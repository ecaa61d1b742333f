"""Triton kernel: int8 (and float8) weight-only decode for M = 1, on the CUDA cores (no tl.dot).

The weight is ``int8_weight_mm``'s: int8 or float8 (N, K) with N per-output-channel scales. For M = 1 the
tensor-core kernel (``int8_weight_mm_kernel``) pads x to tl.dot's 16 rows, and on an H200 it ran at 8.2 us
where bf16 took 6.4 at N = 1024, K = 4096 (1.28x: 32 programs; float8 weights 1.38x), and at 0.84x bf16 at
4096 x 4096 (bench/RESULTS.md). As the low-bit CUDA-core kernel did for int4 (7.1 -> 5.3 us at N = 1024), a
program here multiplies one row of x by BLOCK_N columns with float32 FMAs, with no shared memory in the K
loop, and the scale applies after it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_gemv_fma_x import _x_value, _x_word_ptrs


@triton.jit
def _int8_code(magic_words, p: tl.constexpr):
    """The code of the byte at bit p (0 or 8) of each word, exactly, as float32. ``magic_words``: the weight's
    words with each byte's sign bit flipped (the byte reads q + 128) and the exponent of 2**23 OR-ed in.
    Keeping the exponent's bits and the byte's in one AND reads as 2**23 + (q + 128) * 2**p; times 2**-p, less
    2**(23 - p) + 128, is q (one fma, exact: an integer below 2**9)."""
    field = magic_words & (0x4B000000 | (0xFF << p))
    return field.to(tl.float32, bitcast=True) * (1.0 / (1 << p)) - (8388608.0 / (1 << p) + 128.0)


@triton.jit
def int8_gemv_fma_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_s,
    stride_b,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    SLICES: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """``out = (x @ w.T) * scale (+ bias)`` for one row of x and BLOCK_N columns a program (the arguments of
    ``int8_weight_mm_kernel``; M_BUCKET is the autotuner's key). x is 16-bit with a unit stride_xk and rows
    aligned to 16 bytes; w's rows are contiguous (stride_wk, 1, is not read) and start 4-byte aligned; K is
    a multiple of 4 (the launcher checks). Each step reads SLICES consecutive K slices of BLOCK_B bytes of
    every weight row. EVEN_K: K is a multiple of SLICES * BLOCK_B, and the loads need no mask; otherwise
    words past K load zero x and weight. Columns past N read column N - 1's weight and are not stored.

    The weight is read as 32-bit words of four codes, x as 64-bit words of the four values that match them
    (``triton_gemv_fma_x``). Per word, one XOR flips the bytes' sign bits and the exponent of 2**23 is OR-ed
    into the word and into the word shifted right by 16; then each code takes one AND and one fma
    (``_int8_code``), with no int -> float conversion (Hopper runs 16 a clock per SM, an eighth of the FMA
    rate). float8 codes are converted by the hardware (compute capability 8.9+, as the tensor-core kernel
    needs): two codes an instruction to float16, exactly, then to float32. Sums, scale and bias are float32,
    rounded once to out's dtype.
    """
    tl.static_assert(BLOCK_B >= 4, "a slice holds at least one word of four codes")
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    W_DTYPE: tl.constexpr = w_ptr.dtype.element_ty  # int8, float8e4nv or float8e5
    BLOCK_U: tl.constexpr = BLOCK_B // 4

    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_read = tl.minimum(rn, N - 1)  # a partial tile's last columns read a real one's weight: no load masks
    ru = (tl.arange(0, SLICES) * BLOCK_U)[:, None] + tl.arange(0, BLOCK_U)[None, :]  # a step's words of a row
    x_word_ptrs = _x_word_ptrs(x_ptr, row, stride_xm, ru, rn)
    word_row = rn_read[:, None, None] * (stride_wn // 4)
    w_word_ptrs = w_ptr.to(tl.pointer_type(tl.int32)) + word_row + ru[None, :, :]

    acc = tl.zeros((BLOCK_N, SLICES, BLOCK_U), dtype=tl.float32)
    for k0 in range(0, K, SLICES * BLOCK_B):
        if EVEN_K:
            words = tl.load(w_word_ptrs + k0 // 4)
            x_words = tl.load(x_word_ptrs + k0 // 4)
        else:
            in_k = ru[None, :, :] < (K - k0) // 4
            words = tl.load(w_word_ptrs + k0 // 4, mask=in_k, other=0)
            x_words = tl.load(x_word_ptrs + k0 // 4, mask=in_k, other=0)
        if W_DTYPE == tl.int8:
            flipped = words ^ -2139062144  # 0x80808080: each byte reads q + 128
            low = flipped | 0x4B000000  # bytes 0 and 1 at bits 0 and 8; the exponent's bits overwrite byte 3
            high = (flipped >> 16) | 0x4B000000  # bytes 2 and 3 at bits 0 and 8
            acc += _x_value(x_words, 0, DTYPE) * _int8_code(low, 0)
            acc += _x_value(x_words, 1, DTYPE) * _int8_code(low, 8)
            acc += _x_value(x_words, 2, DTYPE) * _int8_code(high, 0)
            acc += _x_value(x_words, 3, DTYPE) * _int8_code(high, 8)
        else:  # float8: Hopper converts two codes an instruction (to float16, exact), then one to float32
            for j in tl.static_range(4):
                byte = ((words >> (8 * j)) & 0xFF).to(tl.uint8)
                acc += _x_value(x_words, j, DTYPE) * byte.to(W_DTYPE, bitcast=True).to(tl.float32)

    out = tl.sum(tl.sum(acc, axis=2), axis=1) * tl.load(scale_ptr + rn_read * stride_s).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn_read * stride_b).to(tl.float32)
    tl.store(out_ptr + row * stride_om + rn * stride_on, out.to(out_ptr.dtype.element_ty), mask=rn < N)
