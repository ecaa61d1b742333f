"""Triton kernels: an int8 GEMM (int32 accumulation on tensor cores) with its epilogue fused in the kernel.

Two kernels share one main loop: ``int8_mm_rescale_kernel`` (float output) and ``int8_mm_requantize_kernel``
(int8 output). Their arithmetic follows ``reference.py`` step for step. Launch them through
``triton_launch.py``; they are plain ``@triton.jit`` functions so that tests can interpret them on the CPU
(``TRITON_INTERPRET=1``) and compile them for an H100 without one.

Offsets are int32: fine while every operand and the output hold fewer than 2**31 elements.
"""

import triton
import triton.language as tl

# Round half to even without libdevice (the interpreter has no extern functions): adding then subtracting
# 1.5 * 2**23 leaves no fraction bits, so the float32 adder rounds to the nearest integer, ties to even.
# Exact for |x| <= 2**22, which the clamp before it guarantees. Triton compiles without fast-math, so both
# steps stay (the GPU test checks bit-exactness).
_RINT_MAGIC: tl.constexpr = tl.constexpr(12582912.0)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, in groups of GROUP_M row tiles so that programs running together
    share B tiles in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_m
    pid_n = (pid % pids_per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _int8_gemm_tile(
    a_ptr,
    b_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    pid_m,
    pid_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The int32 (BLOCK_M, BLOCK_N) tile of ``a @ b`` at (pid_m, pid_n), with its row and column indices."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        # Masked lanes load 0, which adds nothing to the sums: any M, N and K work.
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0)
        # Trap (triton 3.6.0): `tl.dot(a, b, acc)` with an int32 acc fails with a bare AssertionError, because
        # 3.6.0 checks acc's dtype against out_dtype, whose default is float32 even for int8 operands (newer
        # triton infers it). Naming out_dtype=tl.int32 compiles to wgmma ... s32.s8.s8 on sm_90.
        acc = tl.dot(a, b, acc=acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc, rm, rn


@triton.jit
def int8_mm_rescale_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_om,
    stride_on,
    stride_a_scale,
    stride_b_scale,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = ((a @ b) * a_scale * b_scale [+ bias]) [relu], stored as out's dtype.

    A scale stride of 0 broadcasts a per-tensor scale. M_BUCKET is unused here: it is the autotuner's key.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, rm, rn = _int8_gemm_tile(
        a_ptr,
        b_ptr,
        M,
        N,
        K,
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        pid_m,
        pid_n,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    m_mask = rm < M
    n_mask = rn < N
    a_scale = tl.load(a_scale_ptr + rm * stride_a_scale, mask=m_mask, other=0.0).to(tl.float32)
    b_scale = tl.load(b_scale_ptr + rn * stride_b_scale, mask=n_mask, other=0.0).to(tl.float32)
    out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if RELU:
        out = tl.maximum(out, 0.0)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def int8_mm_requantize_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    out_scale_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_om,
    stride_on,
    stride_a_scale,
    stride_b_scale,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = clamp(rint((a @ b [+ bias]) * (a_scale * b_scale / out_scale)), -127 or 0, 127) as int8.

    Bit-exact with the reference: int32 bias add, then float32 steps rounded as torch rounds them.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, rm, rn = _int8_gemm_tile(
        a_ptr,
        b_ptr,
        M,
        N,
        K,
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        pid_m,
        pid_n,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    m_mask = rm < M
    n_mask = rn < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn * stride_bias, mask=n_mask, other=0)[None, :]
    a_scale = tl.load(a_scale_ptr + rm * stride_a_scale, mask=m_mask, other=1.0).to(tl.float32)
    b_scale = tl.load(b_scale_ptr + rn * stride_b_scale, mask=n_mask, other=1.0).to(tl.float32)
    out_scale = tl.load(out_scale_ptr).to(tl.float32)
    # div_rn: IEEE division like torch's; a plain `/` compiles to the faster approximate div.full.f32.
    multiplier = tl.math.div_rn(a_scale[:, None] * b_scale[None, :], out_scale)
    out = acc.to(tl.float32) * multiplier
    # Clamp, then round: equal to round-then-clamp for integer bounds, and keeps |out| small for the rounding.
    out = tl.minimum(tl.maximum(out, 0.0 if RELU else -127.0), 127.0)
    out = (out + _RINT_MAGIC) - _RINT_MAGIC
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, out.to(tl.int8), mask=m_mask[:, None] & n_mask[None, :])
