"""Triton kernel: weight-only int8 (and float8) linear layers, for ``quanto_fx::int8_weight_mm`` on CUDA.

``int8_weight_mm_kernel``, launched by ``int8_weight_mm_triton``, computes ``x @ (w * scale[:, None]).T`` for
an int8 ``w`` (N, K) and N per-output-channel float scales. The design of the low-bit GEMM
(``triton_lowbit_mm.py``: tl.dot on the weight converted to x's dtype inside the K loop, tiers of configs by
M), without packing or groups: any K, the K tail masked; the scale applies once per column after the K loop.
Its int32 offsets need fewer than 2**31 elements in x, w and the output. At M = 1 with 16-bit x and a weight
that it reads the launcher takes the CUDA-core kernel instead (``triton_int8_gemv_fma.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tensor.quantization import FLOAT8_DTYPES
from .checks import check_weight_only_bias, check_weight_only_x
from .triton_gemv_fma_x import (
    contiguous_aligned_rows,
    fma_config,
    fma_reads_x,
    forced_fma_config,
    unreadable_operands,
)
from .triton_int8_gemv_fma import int8_gemv_fma_kernel
from .triton_int8_mm import _tile_ids
from .triton_launch import (
    _autotune,
    _check_runs_on,
    _config,
    _device_guard,
    _empty_product,
    _forced_config,
    _m_bucket,
    _tier,
)


@triton.jit
def int8_weight_mm_kernel(
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """out = (x @ w.T) * scale[None, :] (+ bias) for an int8 or float8 w (N, K), float32 sums and bias, stored
    as out's dtype.

    Any M, N and K: rows past M, columns past N and the K tail load 0 and are not stored. M_BUCKET is the
    autotuner's key. tl.dot even for M = 1: only the loads feeding a tl.dot are pipelined (cp.async), and
    decode is bound by reading the weight (1 byte per element here). The weight tile is loaded in the (K, N)
    orientation of tl.dot's second operand (no transpose in registers). One program per output tile over all
    of K: splitting K over programs that add their sums atomically gained nothing in decode on an H200.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = rk < K - k0
        x = tl.load(x_ptrs + k0 * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # other=0.0: a float8 weight takes no integer fill
        w = tl.load(w_ptrs + k0 * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        # int8 values are exact in every float dtype (|w| <= 128 < 2**8 = bfloat16's 8-bit significand), and
        # so are float8 ones (e4m3 / e5m2: 3 / 2 mantissa bits, exponents within float16's and bfloat16's), so
        # the tensor cores see the weight unrounded; the scale applies once, in float32, after the loop.
        if w.dtype == tl.int8 and x_ptr.dtype.element_ty == tl.float16:
            # No int -> float16 conversion instruction (I2F.F16.S16, one per weight, at an eighth of the FMA
            # rate on Hopper): w + 128 = (w's byte ^ 0x80) in the low mantissa bits of 1024.0 reads as
            # 1024 + w + 128, and subtracting 1152 leaves w, exactly.
            w = (w.to(tl.uint8, bitcast=True).to(tl.int16) ^ 0x6480).to(tl.float16, bitcast=True) - 1152.0
        else:
            # Via float32 for the interpreter's int -> bfloat16 cast; compiled, LLVM folds an int8 weight's
            # two casts into bit operations and one bfloat16 subtraction (SASS: LOP3 + HADD2, no conversion).
            w = w.to(tl.float32).to(x_ptr.dtype.element_ty)
        # "ieee": float32 x stays float32 (FMA), not TF32; no effect on 16-bit operands.
        acc += tl.dot(x, w, input_precision="ieee")

    scale = tl.load(scale_ptr + rn * stride_s, mask=n_mask, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    if HAS_BIAS:  # in float32, rounded once with the rest (no second kernel adding it afterwards)
        acc += tl.load(bias_ptr + rn * stride_b, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# Tiers by M like the low-bit GEMM's (timings: bench/gpu_weight_only_sweep.py, H200). An int8 weight is 2x an
# int4 one per element, so the same BLOCK_K moves twice the bytes per stage. Shared memory per stage:
# BLOCK_N * BLOCK_K bytes of weight and a BLOCK_M x BLOCK_K x tile (4 bytes an element for float32 x); all
# fit an H100's 227 KiB (tests check).
INT8_CONFIG_TIERS = {
    # M <= 16 (decode): one 16-row tile (mma.sync), narrow N tiles to spread the weight over the SMs. Best
    # at M = 1, K = N = 4096: 32 x 256 tiles, 3 stages (8.5 us; 32 x 128: 8.9 us); N = 14336: 64 x 256. At
    # N = 1024 the 32-wide tiles make 32 programs (8.2 us, 1.28x bf16): the 16-wide tile, untimed, doubles
    # them, with 4 stages for more bytes in flight each; the autotuner times it beside the others.
    16: [
        _config(16, 32, 256, 4, 3),
        _config(16, 64, 256, 4, 3),
        _config(16, 32, 128, 4, 5),
        _config(16, 64, 128, 4, 4),
        _config(16, 16, 256, 4, 4),
    ],
    # 16 < M <= 64: one row tile, each weight element converted once per 64 rows.
    64: [_config(32, 64, 128, 4, 4), _config(64, 64, 64, 4, 4), _config(64, 128, 64, 4, 3)],
    # M > 64 (prefill): compute bound, wgmma tiles.
    None: [_config(128, 128, 64, 8, 3), _config(64, 128, 64, 4, 4), _config(128, 64, 64, 4, 4)],
}
INT8_CONFIGS = [config for tier in INT8_CONFIG_TIERS.values() for config in tier]


def _prune_int8_configs(configs, named_args, **kwargs):
    """The configs of M's tier."""
    return _tier(INT8_CONFIG_TIERS, named_args["M"])


_KEY = ["M_BUCKET", "N", "K", "HAS_BIAS"]  # the autotuners' key: shape and flags
_int8_autotuned = _autotune(INT8_CONFIGS, _KEY, _prune_int8_configs)(int8_weight_mm_kernel)


# The CUDA-core decode kernel (int8_gemv_fma_kernel): M = 1, x and w as _int8_fma_reads says.
# Untimed: configs like the low-bit kernel's best (16 columns; 16 or 32 bytes of weight a thread a step), and
# 8 columns for narrow layers (N = 1024: 128 programs).
INT8_FMA_MAX_M = 1
INT8_FMA_CONFIGS = [
    fma_config(16, 64, 4, 8, 1),
    fma_config(16, 64, 2, 4, 1),
    fma_config(16, 64, 8, 8, 1),
    fma_config(16, 64, 16, 16, 1),
    fma_config(8, 64, 8, 8, 1),
]


def _int8_fma_reads(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the CUDA-core decode kernel can read x (``fma_reads_x``) and w: int8 or float8 rows contiguous
    and 4-byte aligned, K a multiple of 4 (it reads four codes a word)."""
    return fma_reads_x(x) and contiguous_aligned_rows(w, 4) and x.shape[1] % 4 == 0


_int8_fma_with_even_k = triton.heuristics(
    {"EVEN_K": lambda args: args["K"] % (args["SLICES"] * args["BLOCK_B"]) == 0}
)(int8_gemv_fma_kernel)
_int8_fma_autotuned = _autotune(INT8_FMA_CONFIGS, _KEY)(_int8_fma_with_even_k)


def _forced_int8_fma_config(config: dict, x: torch.Tensor, w: torch.Tensor) -> tuple[dict, dict]:
    """(block sizes, launch options) of a forced config of the CUDA-core decode kernel (one with BLOCK_B)."""
    meta, options = forced_fma_config(config, 1, x.shape[0], 1)
    if not _int8_fma_reads(x, w):
        raise ValueError(unreadable_operands(x, "w", w, 4, f", with K a multiple of 4 (K = {x.shape[1]})"))
    return meta, options


def check_int8_weight_mm_args(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> None:
    """Check ``int8_weight_mm_triton``'s operands: x (M, K) float, w (N, K) int8 or float8, N float scales."""
    check_weight_only_x(x)
    for name, t in (("w", w), ("scale", scale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if w.dtype not in (torch.int8, *FLOAT8_DTYPES):
        raise TypeError(f"w must have dtype torch.int8 or a float8 dtype, got {w.dtype}")
    if w.ndim != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(
            f"w must be 2-D (N, K) with K = {x.shape[1]} (x's columns), got shape {tuple(w.shape)}"
        )
    if not scale.is_floating_point():
        raise TypeError(f"scale must be a float tensor, got {scale.dtype}")
    n = w.shape[0]
    if scale.numel() != n or scale.ndim not in (1, 2) or (scale.ndim == 2 and scale.shape[1] != 1):
        raise ValueError(
            f"scale must hold N = {n} scales, shaped ({n},) or ({n}, 1), got {tuple(scale.shape)}"
        )
    for name, t in (("w", w), ("scale", scale)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def int8_weight_mm_triton(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    config: dict | None = None,
    *,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ (w.float() * scale[:, None]).T + bias`` for an int8 or float8 weight ``w`` (N, K), float32 sums,
    as x's dtype (float8 weights: on GPUs with float8 conversions, compute capability 8.9+).

    x (M, K) float16 / bfloat16 / float32; ``scale`` N float per-output-channel scales, (N,) or (N, 1), any
    float dtype (applied in float32); ``bias`` None or N floats, added in float32 before the one rounding to
    x's dtype. Any M, N and K; operands may be strided. Fast path: K and the row strides multiples of 16
    (16-byte rows of w for cp.async); other K run correctly with unpipelined byte loads (compiled for sm_90:
    no cp.async). M <= INT8_FMA_MAX_M with x and w that ``_int8_fma_reads`` accepts runs the
    CUDA-core decode kernel (``int8_gemv_fma_kernel``), everything else the tensor-core kernel, each
    autotuned. ``config`` runs one fixed config instead: a dict with BLOCK_B (bytes of a weight row per K
    slice, a power of two >= 4), BLOCK_N and optionally SLICES, num_warps, num_stages (default 1, 4, 1) runs
    the CUDA-core kernel (x and w as above); otherwise BLOCK_M, BLOCK_N and BLOCK_K (powers of two >= 16),
    optionally GROUP_M, num_warps, num_stages (default 8, 4, 3) run the tensor-core kernel. On CUDA (or CPU
    tensors under TRITON_INTERPRET=1).
    """
    check_int8_weight_mm_args(x, w, scale)
    check_weight_only_bias(bias, w.shape[0], x.device)
    if config is None:
        forced = None
    elif "BLOCK_B" in config:
        forced = _forced_int8_fma_config(config, x, w)
    else:
        forced = _forced_config(config, 16)
    return _launch_int8_weight_mm(x, w, scale, forced, bias)


def int8_weight_mm_triton_prechecked(x, w, scale, bias=None) -> torch.Tensor:
    """``int8_weight_mm_triton`` autotuned, without its checks: for the ops, whose own checks ran (``scale``
    of shape (N,))."""
    return _launch_int8_weight_mm(x, w, scale, None, bias)


def _launch_int8_weight_mm(x, w, scale, forced, bias) -> torch.Tensor:
    _check_runs_on(x)
    (m, k), n = x.shape, w.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0 or k == 0:
        return _empty_product(out, bias)
    args = (
        x,
        w,
        scale,
        scale if bias is None else bias,  # without a bias any pointer fills the slot: HAS_BIAS=False
        out,
        m,
        n,
        k,
        _m_bucket(m),
        *x.stride(),
        *w.stride(),
        scale.stride(0),
        0 if bias is None else bias.stride(0),
        *out.stride(),
    )
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    fma_grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m)
    with _device_guard(x):
        if forced is None:
            if m <= INT8_FMA_MAX_M and _int8_fma_reads(x, w):
                _int8_fma_autotuned[fma_grid](*args, HAS_BIAS=bias is not None)
            else:
                _int8_autotuned[grid](*args, HAS_BIAS=bias is not None)
        else:
            meta, options = forced
            if "BLOCK_B" in meta:
                _int8_fma_with_even_k[fma_grid(meta)](*args, HAS_BIAS=bias is not None, **meta, **options)
            else:
                int8_weight_mm_kernel[grid(meta)](*args, HAS_BIAS=bias is not None, **meta, **options)
    return out
