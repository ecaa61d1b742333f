"""Triton kernel: weight-only int4 / int2 linear layers, dequantizing the packed weight inside the GEMM.

``out = x @ w.T`` for a float ``x`` (M, K) and a low-bit weight ``w`` of logical shape (N, K)
(N = out_features, K = in_features), accumulated in float32 and stored as ``x.dtype``. The weight is never
materialized in float: each program reads its packed bytes, unpacks them with shifts and masks and applies
the group's scale and zero.

The packed weight format (portable: plain uint8 bytes and one float tensor, no device-specific layout):

- ``bits`` in {2, 4}; ``per_byte = 8 // bits`` codes per byte.
- ``packed``: uint8 (N, K // per_byte). Element (n, k) is the unsigned code q in [0, 2**bits - 1], stored in
  byte ``packed[n, k // per_byte]`` at bit offset ``(k % per_byte) * bits``, least significant bits first.
- ``scale_zeros``: float (K // group_size, N, 2), the layout of torch's ``aten._weight_int4pack_mm``; with
  g = k // group_size, ``w[n, k] = (q[n, k] - 2**(bits - 1)) * scale_zeros[g, n, 0] + scale_zeros[g, n, 1]``.
- ``K % group_size == 0``; ``group_size`` a power of two >= 16: a K block lies in one group and tl.dot
  needs K blocks of 16 or more (quanto_fx.tensor.groupwise requires the same).

Written for decode (M = 1..16: the GEMM is bound by reading the weight, which is 4 or 8 times smaller than in
bfloat16) and correct for any M. Launch it through ``lowbit_mm_triton``; the kernel is a plain ``@triton.jit``
function so that tests can interpret it on the CPU (``TRITON_INTERPRET=1``) and compile it for an H100 without
one. Offsets are int32: fine while x, the output and ``packed`` hold fewer than 2**31 elements each.

The file also holds the int8 weight-only GEMM, for ``quanto_fx::int8_weight_mm`` on CUDA:
``int8_weight_mm_kernel``, launched by ``int8_weight_mm_triton``, computes ``x @ (w * scale[:, None]).T`` for
an int8 ``w`` (N, K) and N per-output-channel float scales. Same design (tl.dot on the weight converted to x's
dtype inside the K loop, tiers of configs by M), without packing or groups: any K, the K tail masked; the
scale applies once per column after the K loop. Its int32 offsets need fewer than 2**31 elements in w too.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..tensor.groupwise import check_packed_weight
from ..tensor.quantization import GEMM_FLOAT_DTYPES
from .triton_int8_mm import _tile_ids
from .triton_launch import _bench_on_gpu_alone, _device_guard, _m_bucket

LOWBIT_BITS = (2, 4)


@triton.jit
def lowbit_mm_kernel(
    x_ptr,
    packed_ptr,
    scale_zeros_ptr,
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
    stride_om,
    stride_on,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = x @ dequantize(packed, scale_zeros).T, float32 sums stored as out's dtype.

    Each K block lies in one quantization group (GROUP_SIZE % BLOCK_K == 0): one scale and one zero per
    column, and K % BLOCK_K == 0, so nothing is masked along K. Rows past M and columns past N load 0 and
    are not stored: any M and N work. M_BUCKET is unused here: it is the autotuner's key.

    Why tl.dot even for M = 1 (a 16-row tile, 15 rows of zeros): decode is bound by reading the weight, and
    triton pipelines (cp.async, num_stages deep) only the loads that feed a tl.dot. A multiply-and-reduce
    loop gets plain loads, one K block in flight per program, far too few bytes in flight for HBM (checked
    in the PTX for triton 3.6.0, sm_90). The 16x redundant tensor core math should cost little next to the
    weight's bytes and unpacking, but no GPU has timed it yet (see CONFIG_TIERS).
    """
    tl.static_assert(GROUP_SIZE % BLOCK_K == 0, "a K block must lie in one quantization group")
    PER_BYTE: tl.constexpr = 8 // BITS
    MID: tl.constexpr = 1 << (BITS - 1)  # the code of the zero point: w = (q - MID) * scale + zero

    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    # The weight tile is loaded as bytes, each byte once, contiguous along K: vector cp.async copies (the
    # loads that feed tl.dot are the ones triton pipelines).
    rb = tl.arange(0, BLOCK_K // PER_BYTE)
    packed_ptrs = packed_ptr + rn[:, None] * stride_pn + rb[None, :] * stride_pk
    shifts = tl.arange(0, PER_BYTE) * BITS
    x_ptrs = x_ptr + rm[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :] * stride_xk
    sz_ptrs = scale_zeros_ptr + rn * stride_sn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        byte = tl.load(packed_ptrs, mask=n_mask[:, None], other=0).to(tl.int32)  # zero-extends the uint8
        # Split each byte into its PER_BYTE codes along a new last axis, least significant bits first:
        # [n, b, j] is k = k0 + b * PER_BYTE + j, so the row-major reshape puts the ks in order.
        q = (byte[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        q = tl.reshape(q, (BLOCK_N, BLOCK_K))
        group_ptrs = sz_ptrs + (k0 // GROUP_SIZE) * stride_sg
        scale = tl.load(group_ptrs, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(group_ptrs + stride_sc, mask=n_mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        # The tensor cores multiply x by the centred codes q - MID: small integers, exact in every float
        # dtype, so no weight is rounded to x's dtype. Scale and zero then apply in float32 to the block's
        # sums, as sum_k x * ((q - MID) * s + z) = s * sum_k x * (q - MID) + z * sum_k x.
        # The cast goes through float32 because the 3.6.0 interpreter casts int32 to bfloat16 wrongly (it
        # reinterprets the int as bfloat16 bits); compiled, the two casts fold into one cvt.rn.bf16.s32.
        codes = (q - MID).to(tl.float32).to(x_ptr.dtype.element_ty)
        # input_precision="ieee": a float32 x stays float32 (FMA), not TF32 (10 mantissa bits), as torch
        # computes float32 matmuls by default. It has no effect on 16-bit operands.
        partial = tl.dot(x, tl.trans(codes), input_precision="ieee")
        x_sum = tl.sum(x.to(tl.float32), axis=1)
        acc += partial * scale[None, :] + x_sum[:, None] * zero[None, :]
        packed_ptrs += (BLOCK_K // PER_BYTE) * stride_pk
        x_ptrs += BLOCK_K * stride_xk

    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# -- the launcher --------------------------------------------------------------------------------------


def _config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> triton.Config:
    kwargs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# Block configs in tiers by M; the autotuner picks within the tier. NOT timed on a GPU yet (none was at
# hand): the sizes follow the int8 kernel's measured tiers (triton_launch.CONFIG_TIERS) and the
# bytes-in-flight arithmetic below. _prune_configs cuts BLOCK_K to group_size where it exceeds it.
# Decode reads the weight once, and HBM needs megabytes in flight: the pipeline holds about
# (num_stages - 1) * N * BLOCK_K / per_byte weight bytes whatever BLOCK_N (N = 4096, int4, BLOCK_K = 128
# and 6 stages: 1.3 MB), so small tiers get deep pipelines; their stages are small (a 16-row x tile and
# packed bytes). A group_size below BLOCK_K shrinks that: group_size 32 decodes slower than 128.
CONFIG_TIERS = {
    # M <= 16 (decode): one 16-row tile (mma.sync; wgmma needs 64 rows), bound by reading the weight.
    # Narrow N tiles spread the weight over the SMs (N = 4096, BLOCK_N = 32: 128 programs, 132 SMs on H100).
    16: [
        _config(16, 32, 128, 4, 6),
        _config(16, 64, 128, 4, 5),
        _config(16, 16, 256, 4, 5),
        _config(16, 32, 64, 4, 8),
    ],
    # 16 < M <= 64: one row tile, so each weight element is unpacked once per 64 rows.
    64: [_config(32, 64, 128, 4, 4), _config(64, 64, 64, 4, 4), _config(64, 128, 64, 4, 3)],
    # M > 64 (prefill): compute bound; unpacking amortized over 64 or 128 rows, wgmma tiles.
    None: [_config(128, 128, 64, 8, 3), _config(64, 128, 64, 4, 4), _config(128, 64, 64, 4, 4)],
}
CONFIGS = [config for tier in CONFIG_TIERS.values() for config in tier]


def _tier(tiers: dict, m: int) -> list[triton.Config]:
    """The configs of the first tier of ``tiers`` (max M -> configs, None last) that takes M = ``m``."""
    return next(tier for max_m, tier in tiers.items() if max_m is None or m <= max_m)


def _fit_to_group(config: triton.Config, group_size: int) -> triton.Config:
    """``config`` with BLOCK_K cut to ``group_size`` (a K block must lie in one group)."""
    if config.kwargs["BLOCK_K"] <= group_size:
        return config
    kwargs = {**config.kwargs, "BLOCK_K": group_size}
    return triton.Config(kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _prune_configs(configs, named_args, **kwargs):
    """The configs of M's tier, fitted to the group size, without duplicates."""
    m, group_size = named_args["M"], kwargs["GROUP_SIZE"]
    tier = _tier(CONFIG_TIERS, m)
    fitted = {}
    for config in tier:
        config = _fit_to_group(config, group_size)
        fitted.setdefault((tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages), config)
    return list(fitted.values())


_autotuned = triton.autotune(
    configs=CONFIGS,
    key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE"],  # the autotuner adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=_bench_on_gpu_alone,
)(lowbit_mm_kernel)


def _is_power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def check_lowbit_mm_args(
    x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, bits: int, group_size: int
) -> None:
    """Check ``lowbit_mm_triton``'s operands against the format in the module docstring."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in LOWBIT_BITS:
        raise ValueError(f"bits must be one of {LOWBIT_BITS}, got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    for name, t in (("x", x), ("packed", packed), ("scale_zeros", scale_zeros)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in GEMM_FLOAT_DTYPES:
        raise TypeError(f"x must have dtype in {[str(d) for d in GEMM_FLOAT_DTYPES]}, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    k, per_byte = x.shape[1], 8 // bits
    if packed.dtype == torch.uint8 and (packed.ndim != 2 or packed.shape[1] * per_byte != k):
        raise ValueError(
            f"packed must be shaped (N, K // {per_byte}) = (N, {k // per_byte}) for K = {k} and "
            f"bits = {bits}, got {tuple(packed.shape)}"
        )
    check_packed_weight(packed, scale_zeros, bits, group_size)  # dtypes, group size, scale_zeros' shape
    for name, t in (("packed", packed), ("scale_zeros", scale_zeros)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _forced_config(config: dict, group_size: int | None) -> tuple[dict, dict]:
    """(block sizes, launch options) of a forced ``config`` dict, checked against the kernel's constraints
    (``group_size`` None: no quantization group bounds BLOCK_K, as for the int8 kernel)."""
    unknown = set(config) - {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}
    if unknown:
        raise ValueError(f"config has unknown keys {sorted(unknown)}")
    missing = {"BLOCK_M", "BLOCK_N", "BLOCK_K"} - set(config)
    if missing:
        raise ValueError(f"config lacks {sorted(missing)}")
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    for name, block in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
        if not isinstance(block, int) or block < 16 or not _is_power_of_two(block):
            raise ValueError(f"config {name} must be a power of two >= 16 (tl.dot's tile), got {block!r}")
    max_block_k = float("inf") if group_size is None else group_size
    if not isinstance(block_k, int) or block_k < 16 or not _is_power_of_two(block_k) or block_k > max_block_k:
        bound = "16 or more" if group_size is None else f"in [16, group_size = {group_size}]"
        raise ValueError(f"config BLOCK_K must be a power of two {bound}, got {block_k!r}")
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": config.get("GROUP_M", 8)}
    options = {"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 3)}
    return meta, options


def lowbit_mm_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale_zeros: torch.Tensor,
    bits: int,
    group_size: int,
    config: dict | None = None,
) -> torch.Tensor:
    """``x @ w.T`` for the packed int4 / int2 weight ``w`` (format: module docstring), as x's dtype.

    ``config`` runs one fixed config instead of autotuning (tests, the interpreter, benchmarks): a dict with
    BLOCK_M and BLOCK_N (powers of two >= 16), BLOCK_K (a power of two, 16 to group_size) and optionally
    GROUP_M, num_warps, num_stages (default 8, 4, 3). Any M and N; K is a multiple of group_size.
    Operands may be strided; on CUDA (or CPU tensors under TRITON_INTERPRET=1).
    """
    check_lowbit_mm_args(x, packed, scale_zeros, bits, group_size)
    forced = None if config is None else _forced_config(config, group_size)
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"the Triton kernel needs CUDA tensors (CPU ones only under TRITON_INTERPRET=1), got {x.device}"
        )
    (m, k), n = x.shape, packed.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:  # no K block to run: the empty sum
        return out.zero_()
    args = (
        x,
        packed,
        scale_zeros,
        out,
        m,
        n,
        k,
        _m_bucket(m),
        *x.stride(),
        *packed.stride(),
        *scale_zeros.stride(),
        *out.stride(),
    )
    with _device_guard(x):
        if forced is None:
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
            _autotuned[grid](*args, BITS=bits, GROUP_SIZE=group_size)
        else:
            meta, options = forced
            grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
            lowbit_mm_kernel[grid](*args, BITS=bits, GROUP_SIZE=group_size, **meta, **options)
    return out


# -- int8 weights: int8_weight_mm ------------------------------------------------------------------------


@triton.jit
def int8_weight_mm_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
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
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = (x @ w.T) * scale[None, :] for an int8 w (N, K), float32 sums stored as out's dtype.

    Any M, N and K: rows past M, columns past N and the K tail load 0 and are not stored. M_BUCKET is the
    autotuner's key. tl.dot even for M = 1, for lowbit_mm_kernel's reason: only the loads feeding a tl.dot
    are pipelined, and decode is bound by reading the weight (1 byte per element here).
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = rk < K - k0
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0)
        # int8 values are exact in every float dtype (|w| <= 128 < 2**8 = bfloat16's 8-bit significand), so
        # the tensor cores see the weight unrounded; the scale applies once, in float32, after the loop.
        # Via float32 for the interpreter's int -> bfloat16 cast (see lowbit_mm_kernel); compiled: one cvt.
        w = w.to(tl.float32).to(x_ptr.dtype.element_ty)
        # "ieee": float32 x stays float32 (FMA), not TF32; no effect on 16-bit operands.
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    scale = tl.load(scale_ptr + rn * stride_s, mask=n_mask, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# Tiers by M like CONFIG_TIERS, NOT timed on a GPU either. An int8 weight is 2x an int4 one per element, so
# the same BLOCK_K moves twice the bytes per stage: (num_stages - 1) * N * BLOCK_K weight bytes in flight
# (N = 4096, BLOCK_K = 128, 5 stages: 2 MB). Shared memory per stage: BLOCK_N * BLOCK_K bytes of weight and
# a BLOCK_M x BLOCK_K x tile (4 bytes an element for float32 x); all fit an H100's 227 KiB (tests check).
INT8_CONFIG_TIERS = {
    # M <= 16 (decode): one 16-row tile (mma.sync), narrow N tiles to spread the weight over the SMs.
    16: [
        _config(16, 32, 128, 4, 5),
        _config(16, 64, 128, 4, 4),
        _config(16, 16, 256, 4, 4),
        _config(16, 64, 64, 4, 6),
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


_int8_autotuned = triton.autotune(
    configs=INT8_CONFIGS,
    key=["M_BUCKET", "N", "K"],  # the autotuner adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _prune_int8_configs},
    do_bench=_bench_on_gpu_alone,
)(int8_weight_mm_kernel)


def check_int8_weight_mm_args(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> None:
    """Check ``int8_weight_mm_triton``'s operands: x (M, K) float, w (N, K) int8, N float scales."""
    for name, t in (("x", x), ("w", w), ("scale", scale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in GEMM_FLOAT_DTYPES:
        raise TypeError(f"x must have dtype in {[str(d) for d in GEMM_FLOAT_DTYPES]}, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if w.dtype != torch.int8:
        raise TypeError(f"w must have dtype torch.int8, got {w.dtype}")
    if w.ndim != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(
            f"w must be 2-D (N, K) with K = {x.shape[1]} (x's columns), got shape {tuple(w.shape)}"
        )
    if not scale.is_floating_point():
        raise TypeError(f"scale must be a float tensor, got {scale.dtype}")
    n = w.shape[0]
    if scale.numel() != n or scale.ndim > 2 or (scale.ndim == 2 and scale.shape[1] != 1):
        raise ValueError(
            f"scale must hold N = {n} scales, shaped ({n},) or ({n}, 1), got {tuple(scale.shape)}"
        )
    for name, t in (("w", w), ("scale", scale)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def int8_weight_mm_triton(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, config: dict | None = None
) -> torch.Tensor:
    """``x @ (w.float() * scale[:, None]).T`` for an int8 weight ``w`` (N, K), float32 sums, as x's dtype.

    x (M, K) float16 / bfloat16 / float32; ``scale`` N float per-output-channel scales, (N,) or (N, 1), any
    float dtype (applied in float32). Any M, N and K; operands may be strided. No bias: add it to the result.
    Fast path: K and the row strides multiples of 16 (16-byte rows of w for cp.async); other K run correctly
    with unpipelined byte loads (compiled for sm_90: no cp.async).
    ``config`` runs one fixed config instead of autotuning: BLOCK_M, BLOCK_N and BLOCK_K (powers of two
    >= 16), optionally GROUP_M, num_warps, num_stages (default 8, 4, 3). On CUDA (or CPU tensors under
    TRITON_INTERPRET=1).
    """
    check_int8_weight_mm_args(x, w, scale)
    forced = None if config is None else _forced_config(config, None)
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"the Triton kernel needs CUDA tensors (CPU ones only under TRITON_INTERPRET=1), got {x.device}"
        )
    (m, k), n = x.shape, w.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:  # the empty sum
        return out.zero_()
    args = (x, w, scale, out, m, n, k, _m_bucket(m), *x.stride(), *w.stride(), scale.stride(0), *out.stride())
    with _device_guard(x):
        if forced is None:
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
            _int8_autotuned[grid](*args)
        else:
            meta, options = forced
            grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
            int8_weight_mm_kernel[grid](*args, **meta, **options)
    return out
