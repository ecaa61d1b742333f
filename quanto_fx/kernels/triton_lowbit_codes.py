"""Triton helpers of the low-bit weight kernels: a packed byte tile's codes, and x's columns that match them.

The packed format is described in ``triton_lowbit_mm``: code j of byte b is element k = b * per_byte + j.
"""

import triton
import triton.language as tl


@triton.jit
def _split_codes(t, PER_BYTE: tl.constexpr):
    """A tile (2-D, or 3-D: the decode kernel's slices) whose last axis runs b * PER_BYTE + j -> PER_BYTE
    tiles of the same leading shape, the columns of code j (j = 0 first)."""
    BYTES_K: tl.constexpr = t.shape[-1] // PER_BYTE
    if PER_BYTE == 2:
        even, odd = tl.split(tl.reshape(t, t.shape[:-1] + [BYTES_K, 2]))
        return even, odd, even, odd  # codes 2 and 3 unused for int4
    else:
        # k = b * 4 + 2 * j1 + j0: split j0 off first, then j1.
        j0_0, j0_1 = tl.split(tl.reshape(t, t.shape[:-1] + [BYTES_K, 2, 2]))
        c0, c2 = tl.split(j0_0)
        c1, c3 = tl.split(j0_1)
        return c0, c1, c2, c3


@triton.jit
def _dequantize(byte, j: tl.constexpr, scale, zero, BITS: tl.constexpr):
    """Code j of every byte of ``byte`` (a uint8 tile), dequantized in scale's dtype (x's; the CUDA-core
    decode kernel has its own ``_centered_field``): ``(q - MID) * scale + zero``, scale and zero of the byte's
    group, broadcast to byte's shape.

    Without int -> float conversions: Hopper runs 16 a clock per SM (an eighth of float32 FMAs; CUDA guide,
    throughput table), and one per code plus a float -> bfloat16 one per two codes bounded the decode kernel
    (SASS: 96 conversions in 487 instructions per 64 codes). A code OR-ed into the mantissa of MAGIC (whose
    mantissa's unit is 1) reads as MAGIC + code; subtracting MAGIC + MID is exact, and the rest is one fma,
    two codes an instruction for 16-bit dtypes. MAGIC + MID is a float constant: built by a bitcast it was not
    folded (51 more instructions a loop, and shared memory). Scale and zero come rounded to x's dtype (as in
    torch's int4 kernels and the reference): in bfloat16 a group's weights are all off by up to
    (|zero| + |q - MID| * |scale|) * 2**-8, then an fma in x's dtype rounds once more (a float32 one rounds
    to float32 only).
    """
    return _centered_codes(byte, j, BITS, scale.dtype) * scale + zero


@triton.jit
def _centered_codes(byte, j: tl.constexpr, BITS: tl.constexpr, DTYPE: tl.constexpr):
    """Code j of every byte of ``byte`` minus the zero point's code, exactly, as DTYPE (see _dequantize)."""
    MID: tl.constexpr = 1 << (BITS - 1)  # the code of the zero point
    if DTYPE == tl.bfloat16:
        MAGIC: tl.constexpr = 128.0
        MAGIC_BITS: tl.constexpr = 0x4300
        CODE_TYPE: tl.constexpr = tl.int16
    elif DTYPE == tl.float16:
        MAGIC: tl.constexpr = 1024.0
        MAGIC_BITS: tl.constexpr = 0x6400
        CODE_TYPE: tl.constexpr = tl.int16
    else:
        MAGIC: tl.constexpr = 8388608.0
        MAGIC_BITS: tl.constexpr = 0x4B000000
        CODE_TYPE: tl.constexpr = tl.int32
    code = ((byte.to(CODE_TYPE) >> (j * BITS)) & ((1 << BITS) - 1)) | MAGIC_BITS
    return code.to(DTYPE, bitcast=True) - tl.full((), MAGIC + MID, DTYPE)
