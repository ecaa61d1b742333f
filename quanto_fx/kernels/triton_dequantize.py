"""Triton kernels: a quantized weight dequantized into a float buffer, for prefill-sized GEMMs on CUDA.

At prefill sizes the fused weight-only kernels (``triton_lowbit_mm.py``, ``triton_int8_weight_mm.py``)
convert every weight tile once per row tile of x, on the CUDA cores beside the tensor cores: on an H200 at
4096 x 4096 and M = 1024 they ran 1.79x (int4) and 1.41x (int8) bf16's time (bench/RESULTS.md). Converting
the weight once into x's dtype and calling torch's GEMM (cuBLAS) costs one pass over the weight (int4: read
0.5 byte, write 2 bytes an element) on top of the bf16 GEMM. ``weight_only.py`` takes that path past
``CUDA_DEQUANTIZED_GEMM_MIN_M`` rows, one block of weight rows at a time.

- ``lowbit_dequantize_kernel``: the packed int4 / int2 weights of ``triton_lowbit_mm.py`` (its docstring has
  the format), dequantized by the same ``_dequantize`` as the fused kernels (scale and zero rounded to the
  output's dtype, one fma), so both paths see the same weights.
- ``per_channel_dequantize_kernel``: int8 or float8 (N, K) weights times per-output-channel scales, in
  float32, rounded once to the output's dtype.

Plain ``@triton.jit`` functions: tests interpret them on the CPU (``TRITON_INTERPRET=1``) and compile them for
an H100 without one. Offsets are int64 (any N * K); the grid's second axis, K blocks, holds at most 65535
(checked).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tensor.groupwise import check_packed_weight
from ..tensor.quantization import FLOAT8_DTYPES, GEMM_FLOAT_DTYPES
from .triton_gemv_fma_x import MAX_GRID_Y
from .triton_launch import _check_runs_on, _device_guard
from .triton_lowbit_codes import _dequantize

# Programs of BLOCK_N x BLOCK_K outputs (32 x 128: 8 KB of bfloat16, written as 16-byte stores). The low-bit
# kernel's K block stays inside one group (one scale and zero per row): BLOCK_K is the group size if smaller.
BLOCK_N = 32
BLOCK_K = 128
NUM_WARPS = 4


@triton.jit
def lowbit_dequantize_kernel(
    packed_ptr,
    scale_zeros_ptr,
    out_ptr,
    N,
    stride_pn,
    stride_pk,
    stride_sg,
    stride_sn,
    stride_sc,
    stride_on,
    stride_ok,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[n, k] = (q[n, k] - 2**(BITS - 1)) * scale + zero in out's dtype, for rows pid 0's BLOCK_N and
    columns pid 1's BLOCK_K (inside one group: GROUP_SIZE % BLOCK_K == 0). Rows past N are not stored."""
    PER_BYTE: tl.constexpr = 8 // BITS
    BYTES_K: tl.constexpr = BLOCK_K // PER_BYTE
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    tl.static_assert(GROUP_SIZE % BLOCK_K == 0, "a K block inside one group")

    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    pid_k = tl.program_id(1)
    rb = (pid_k * BYTES_K + tl.arange(0, BYTES_K)).to(tl.int64)
    rk = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    n_mask = (rn < N)[:, None]
    byte = tl.load(packed_ptr + rn[:, None] * stride_pn + rb[None, :] * stride_pk, mask=n_mask, other=0)
    group_ptrs = scale_zeros_ptr + (pid_k * BLOCK_K // GROUP_SIZE) * stride_sg + rn[:, None] * stride_sn
    scale = tl.load(group_ptrs, mask=n_mask, other=0.0).to(DTYPE)
    zero = tl.load(group_ptrs + stride_sc, mask=n_mask, other=0.0).to(DTYPE)
    # Each byte's codes side by side, code j of byte b at column b * PER_BYTE + j (joins add a last axis).
    if PER_BYTE == 2:
        w = tl.join(_dequantize(byte, 0, scale, zero, BITS), _dequantize(byte, 1, scale, zero, BITS))
    else:
        w = tl.join(
            tl.join(_dequantize(byte, 0, scale, zero, BITS), _dequantize(byte, 2, scale, zero, BITS)),
            tl.join(_dequantize(byte, 1, scale, zero, BITS), _dequantize(byte, 3, scale, zero, BITS)),
        )
    w = tl.reshape(w, (BLOCK_N, BLOCK_K))
    tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :] * stride_ok, w, mask=n_mask)


@triton.jit
def per_channel_dequantize_kernel(
    w_ptr,
    scale_ptr,
    out_ptr,
    N,
    K,
    stride_wn,
    stride_wk,
    stride_s,
    stride_on,
    stride_ok,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[n, k] = w[n, k] * scale[n] in float32, rounded once to out's dtype (int8 and float8 values are
    exact in float32). Rows past N and columns past K are not stored."""
    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    n_mask = rn < N
    mask = n_mask[:, None] & (rk < K)[None, :]
    w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + rn * stride_s, mask=n_mask, other=0.0).to(tl.float32)
    out = (w.to(tl.float32) * scale[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :] * stride_ok, out, mask=mask)


def _check_k_blocks(k: int, block_k: int) -> None:
    """The grid's second axis holds the K blocks: CUDA allows at most MAX_GRID_Y."""
    if triton.cdiv(k, block_k) > MAX_GRID_Y:
        raise ValueError(
            f"K = {k} input features make {triton.cdiv(k, block_k)} blocks of {block_k}: the dequantize "
            f"kernel takes at most {MAX_GRID_Y} (K <= {MAX_GRID_Y * block_k})"
        )


def _check_out(out: torch.Tensor, n: int, k: int, device: torch.device) -> None:
    if not isinstance(out, torch.Tensor) or out.dtype not in GEMM_FLOAT_DTYPES:
        got = getattr(out, "dtype", type(out).__name__)
        raise TypeError(f"out must be a float32, float16 or bfloat16 tensor, got {got}")
    if tuple(out.shape) != (n, k):
        raise ValueError(f"out must be shaped like the weight, ({n}, {k}), got {tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"out is on {out.device} but the weight is on {device}")


def dequantize_lowbit_triton(
    packed: torch.Tensor, scale_zeros: torch.Tensor, bits: int, group_size: int, out: torch.Tensor
) -> torch.Tensor:
    """Write the packed int4 / int2 weight (format: ``triton_lowbit_mm``'s docstring; N rows of K codes)
    into ``out`` (N, K) of a float dtype, as the fused kernels dequantize it, and return ``out``. Operands
    may be strided; on CUDA (or CPU tensors under TRITON_INTERPRET=1)."""
    n, k = check_packed_weight(packed, scale_zeros, bits, group_size)  # shapes, dtypes, devices
    _check_out(out, n, k, packed.device)
    block_k = min(BLOCK_K, group_size)
    _check_k_blocks(k, block_k)
    _check_runs_on(packed)
    if n == 0 or k == 0:
        return out
    grid = (triton.cdiv(n, BLOCK_N), k // block_k)
    with _device_guard(packed):
        lowbit_dequantize_kernel[grid](
            packed,
            scale_zeros,
            out,
            n,
            *packed.stride(),
            *scale_zeros.stride(),
            *out.stride(),
            BITS=bits,
            GROUP_SIZE=group_size,
            BLOCK_N=BLOCK_N,
            BLOCK_K=block_k,
            num_warps=NUM_WARPS,
        )
    return out


def dequantize_per_channel_triton(w: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``w * scale[:, None]`` (w an int8 or float8 (N, K) weight, ``scale`` N floats, any float dtype)
    into ``out`` (N, K) of a float dtype, computed in float32 and rounded once, and return ``out``. Operands
    may be strided; on CUDA (or CPU tensors under TRITON_INTERPRET=1; float8 weights on GPUs that convert
    float8, compute capability 8.9+)."""
    if not isinstance(w, torch.Tensor) or w.dtype not in (torch.int8, *FLOAT8_DTYPES) or w.ndim != 2:
        got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"w must be a 2-D int8 or float8 (N, K) tensor, got {got}")
    n, k = w.shape
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError(f"scale must be a float tensor, got {getattr(scale, 'dtype', type(scale).__name__)}")
    if scale.numel() != n:
        raise ValueError(f"scale must hold N = {n} scales, got {tuple(scale.shape)}")
    if scale.device != w.device:
        raise ValueError(f"scale is on {scale.device} but w is on {w.device}")
    _check_out(out, n, k, w.device)
    _check_k_blocks(k, BLOCK_K)
    _check_runs_on(w)
    if n == 0 or k == 0:
        return out
    scale = scale.reshape(-1)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))
    with _device_guard(w):
        per_channel_dequantize_kernel[grid](
            w,
            scale,
            out,
            n,
            k,
            *w.stride(),
            scale.stride(0),
            *out.stride(),
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
            num_warps=NUM_WARPS,
        )
    return out
