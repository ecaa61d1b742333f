"""Triton kernels: weight-only int4 / int2 linear layers, dequantizing the packed weight inside the GEMM.

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
- ``K % group_size == 0``; ``group_size`` a power of two >= 16 (quanto_fx.tensor.groupwise requires the
  same). The tensor-core kernels' K blocks hold at least 16 bytes per weight row (tl.dot's smallest K):
  BLOCK_K >= 16 * per_byte.

Three kernels, each correct for any M: ``lowbit_gemv_fma_kernel`` (its own module) for the smallest M with
16-bit x, on the CUDA cores; ``lowbit_gemv_kernel`` for the rest of decode (M up to 16, where reading the
weight, 4 or 8 times smaller than in bfloat16, should bound the time; on Hopper the unpacking's integer
instructions come close: bench/RESULTS.md); and ``lowbit_mm_kernel``, the GEMM, past it. Launch them through
``lowbit_mm_triton``; they are plain ``@triton.jit`` functions so that tests can interpret them on the CPU
(``TRITON_INTERPRET=1``) and compile them for an H100 without one. Offsets are int32: fine while x,
the output and ``packed`` hold fewer than 2**31 elements each.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..tensor.groupwise import check_packed_weight
from .checks import check_weight_only_bias, check_weight_only_x
from .triton_gemv_fma_x import (
    contiguous_aligned_rows,
    fma_config,
    fma_reads_x,
    forced_fma_config,
    unreadable_operands,
)
from .triton_int8_mm import _tile_ids
from .triton_launch import (
    _autotune,
    _check_runs_on,
    _config,
    _device_guard,
    _empty_product,
    _forced_config,
    _is_power_of_two,
    _m_bucket,
    _tier,
)
from .triton_lowbit_codes import _dequantize, _split_codes
from .triton_lowbit_gemv_fma import fit_block_b, fma_rows, lowbit_gemv_fma_kernel

LOWBIT_BITS = (2, 4)


@triton.jit
def lowbit_mm_kernel(
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """out = x @ dequantize(packed, scale_zeros).T (+ bias), float32 sums and bias stored as out's dtype: the
    GEMM (M > 16).

    Rows past M, columns past N and K past the end load 0 and are not stored: any M and N, and any K that
    is a multiple of GROUP_SIZE. M_BUCKET is unused here: it is the autotuner's key. EVEN_K: K is a multiple
    of BLOCK_K (``_with_even_k`` sets it; the K masks are not computed then).

    Every global load feeds the tl.dot, so triton pipelines all of them (cp.async, num_stages deep); a load
    whose value is used only after the dot, like a scale applied to the sums, or a strided one, waits a full
    memory latency in every K iteration. At M = 1, K = N = 4096 on an H200, versions that did so ran 3.2x
    to 3.7x the bf16 GEMM's time; this design 1.8x (bench/RESULTS.md):
    - the weight tile is loaded as bytes, each byte once, in the (K, N) orientation of tl.dot's second
      operand, contiguous along K; code j of every byte (bits j * BITS and up) is dequantized in x's dtype
      (``_dequantize``: scale and zero rounded to it, as torch's int4 kernels and the reference do) and meets
      the x columns k0 + b * PER_BYTE + j in its own tl.dot: no weight tile is reshaped or transposed;
    - x's tile is loaded contiguous and split into those column sets in registers;
    - a K block inside one group (GROUP_SIZE >= BLOCK_K) loads one scale and zero per column, smaller
      groups one per (k, column).
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    BYTES_K: tl.constexpr = BLOCK_K // PER_BYTE
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    tl.static_assert(BYTES_K >= 16, "tl.dot needs 16 bytes of K per code: BLOCK_K >= 16 * PER_BYTE")

    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rb = tl.arange(0, BYTES_K)
    m_mask = rm < M
    n_mask = rn < N
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    packed_ptrs = packed_ptr + rb[:, None] * stride_pk + rn[None, :] * stride_pn
    sz_ptrs = scale_zeros_ptr + rn[None, :] * stride_sn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x_mask = m_mask[:, None]
            b_mask = n_mask[None, :]
        else:
            x_mask = m_mask[:, None] & (rk < K - k0)[None, :]
            b_mask = (rb < (K - k0) // PER_BYTE)[:, None] & n_mask[None, :]
        x = tl.load(x_ptrs + k0 * stride_xk, mask=x_mask, other=0.0)
        byte = tl.load(packed_ptrs + (k0 // PER_BYTE) * stride_pk, mask=b_mask, other=0)
        if GROUP_SIZE >= BLOCK_K:  # (1, BLOCK_N): one group for the whole block
            group_ptrs = sz_ptrs + (k0 // GROUP_SIZE) * stride_sg
            sz_mask = n_mask[None, :]
        else:  # (BYTES_K, BLOCK_N): byte b's group, the same for its codes (GROUP_SIZE % PER_BYTE == 0)
            group_ptrs = sz_ptrs + ((k0 + rb * PER_BYTE) // GROUP_SIZE)[:, None] * stride_sg
            sz_mask = b_mask
        scale = tl.load(group_ptrs, mask=sz_mask, other=0.0).to(DTYPE)
        zero = tl.load(group_ptrs + stride_sc, mask=sz_mask, other=0.0).to(DTYPE)
        xs = _split_codes(x, PER_BYTE)
        for j in tl.static_range(PER_BYTE):
            # input_precision="ieee": a float32 x stays float32 (FMA), not TF32 (10 mantissa bits), as torch
            # computes float32 matmuls by default. It has no effect on 16-bit operands.
            acc = tl.dot(xs[j], _dequantize(byte, j, scale, zero, BITS), acc, input_precision="ieee")

    if HAS_BIAS:  # in float32, rounded once with the rest (no second kernel adding it afterwards)
        acc += tl.load(bias_ptr + rn * stride_b, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def lowbit_gemv_kernel(
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SLICES: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """lowbit_mm_kernel's product for decode (M <= 16): each step takes SLICES consecutive K blocks at once,
    one per warp, as a batched tl.dot over (SLICES, BLOCK_M, BLOCK_K) x (SLICES, BLOCK_K, BLOCK_N); the
    slices' sums are added across warps once, after the K loop. EVEN_K: K is a multiple of SLICES * BLOCK_K.

    Decode moves little data per output tile: one program per tile over all of K leaves an H200's HBM idle
    (bench/RESULTS.md), and splitting K over programs that add their sums atomically took two more kernels a
    call (a float32 output zeroed before, cast to x's dtype after) and lost determinism. Slices keep one
    program per tile and give each warp its own K range: more bytes in flight per program, and no warp splits
    the same x columns as another (in the GEMM kernel every warp splits all of x's tile). Slices fully past K
    load zeros (x's and the weight's: a zero x times any finite weight adds nothing).
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    BYTES_K: tl.constexpr = BLOCK_K // PER_BYTE
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    tl.static_assert(BYTES_K >= 16, "tl.dot needs 16 bytes of K per code: BLOCK_K >= 16 * PER_BYTE")

    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    # (SLICES, rows, columns) tiles; slice s starts BLOCK_K after slice s - 1.
    slice_k = tl.arange(0, SLICES)[:, None, None] * BLOCK_K
    rk = slice_k + tl.arange(0, BLOCK_K)[None, None, :]  # (S, 1, BLOCK_K)
    rb = slice_k // PER_BYTE + tl.arange(0, BYTES_K)[None, :, None]  # (S, BYTES_K, 1)
    x_ptrs = x_ptr + rm[None, :, None] * stride_xm + rk * stride_xk
    packed_ptrs = packed_ptr + rb * stride_pk + rn[None, None, :] * stride_pn
    sz_ptrs = scale_zeros_ptr + rn[None, None, :] * stride_sn

    acc = tl.zeros((SLICES, BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, SLICES * BLOCK_K):
        if EVEN_K:
            x_mask = m_mask[None, :, None]
            b_mask = n_mask[None, None, :]
        else:
            x_mask = m_mask[None, :, None] & (rk < K - k0)
            b_mask = (rb < (K - k0) // PER_BYTE) & n_mask[None, None, :]
        x = tl.load(x_ptrs + k0 * stride_xk, mask=x_mask, other=0.0)
        byte = tl.load(packed_ptrs + (k0 // PER_BYTE) * stride_pk, mask=b_mask, other=0)
        if GROUP_SIZE >= BLOCK_K:  # (S, 1, BLOCK_N): one group per slice
            group_ptrs = sz_ptrs + ((k0 + slice_k) // GROUP_SIZE) * stride_sg
            if EVEN_K:
                sz_mask = b_mask
            else:  # no group past K
                sz_mask = n_mask[None, None, :] & (slice_k < K - k0)
        else:  # (S, BYTES_K, BLOCK_N): byte b's group
            group_ptrs = sz_ptrs + ((k0 // PER_BYTE + rb) * PER_BYTE // GROUP_SIZE) * stride_sg
            sz_mask = b_mask
        scale = tl.load(group_ptrs, mask=sz_mask, other=0.0).to(DTYPE)
        zero = tl.load(group_ptrs + stride_sc, mask=sz_mask, other=0.0).to(DTYPE)
        xs = _split_codes(x, PER_BYTE)
        for j in tl.static_range(PER_BYTE):
            acc = tl.dot(xs[j], _dequantize(byte, j, scale, zero, BITS), acc, input_precision="ieee")

    out = tl.sum(acc, axis=0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn * stride_b, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# -- the launcher --------------------------------------------------------------------------------------


# The GEMM's block configs in tiers by M; the autotuner picks within the tier. _prune_configs fits BLOCK_K to
# the group size (see _fit_block_k). Timings: bench/RESULTS.md (H200, torch 2.11; the GPU sweep no longer
# tries these). M <= 16 takes a decode kernel (FMA_CONFIGS or GEMV_CONFIGS) unless a config is forced.
CONFIG_TIERS = {
    # 16 < M <= 64: one row tile, so each weight element is unpacked once per 64 rows.
    64: [_config(32, 64, 128, 4, 4), _config(64, 64, 64, 4, 4), _config(64, 128, 64, 4, 3)],
    # M > 64 (prefill): compute bound; unpacking amortized over 64 or 128 rows, wgmma tiles.
    None: [_config(128, 128, 64, 8, 3), _config(64, 128, 64, 4, 4), _config(128, 64, 64, 4, 4)],
}
CONFIGS = [config for tier in CONFIG_TIERS.values() for config in tier]

DECODE_MAX_M = 16  # the decode kernel's rows: one 16-row tile (mma.sync's height)


def _gemv_config(block_n: int, slices: int, num_warps: int, num_stages: int) -> triton.Config:
    kwargs = {"BLOCK_M": DECODE_MAX_M, "BLOCK_N": block_n, "BLOCK_K": 128, "SLICES": slices}
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# The decode kernel's configs, one slice per warp (so that each warp runs its own K range). The H200 sweeps
# (bench/RESULTS.md, int4, bf16 x, M = 1 to 16) put 16-wide tiles first at every shape: with few warps per
# SM the unpacking's dependent integer instructions, not the memory, set the time, and narrow tiles give the
# most programs. 4 slices led at N = 4096 and 1024 (9.3-10.3 us at 4096 x 4096, against 12.0-13.0 for 8),
# 2 or 4 at N = 14336 (26.9-27.8 us; 8 slices: 39).
GEMV_CONFIGS = [
    _gemv_config(16, 4, 4, 2),
    _gemv_config(16, 4, 4, 3),
    _gemv_config(16, 2, 2, 3),
    _gemv_config(16, 2, 2, 2),
]


def min_block_k(bits: int) -> int:
    """The smallest BLOCK_K of the low-bit kernel: 16 bytes of each weight row (tl.dot's smallest K)."""
    return 16 * (8 // bits)


def _fit_block_k(config: triton.Config, bits: int, group_size: int) -> triton.Config:
    """``config`` with BLOCK_K cut to ``group_size`` (a K block in one group: one scale and zero per column),
    but not below ``min_block_k(bits)`` (then one per byte and column)."""
    block_k = max(min(config.kwargs["BLOCK_K"], group_size), min_block_k(bits))
    if block_k == config.kwargs["BLOCK_K"]:
        return config
    kwargs = {**config.kwargs, "BLOCK_K": block_k}
    return triton.Config(kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _fitted(configs, kwargs, fit=_fit_block_k) -> list[triton.Config]:
    """``configs`` fitted (by ``fit``) to the launch's bits and group size, without duplicates."""
    fitted = {}
    for config in configs:
        config = fit(config, kwargs["BITS"], kwargs["GROUP_SIZE"])
        fitted.setdefault((tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages), config)
    return list(fitted.values())


def _prune_configs(configs, named_args, **kwargs):
    """The configs of M's tier, fitted to the bits and group size."""
    return _fitted(_tier(CONFIG_TIERS, named_args["M"]), kwargs)


# float32 x tiles: 8 slices take 220-300 KB of shared memory (compiled for sm_90), over an H100's 227 KiB.
FLOAT32_MAX_SLICES = 4


def _prune_gemv_configs(configs, named_args, **kwargs):
    """The decode configs, fitted to the bits and group size (for float32 x, up to FLOAT32_MAX_SLICES)."""
    if named_args["x_ptr"].dtype == torch.float32:
        configs = [c for c in configs if c.kwargs["SLICES"] <= FLOAT32_MAX_SLICES]
    return _fitted(configs, kwargs)


# The CUDA-core decode kernel: M <= 2 with 16-bit x (see _fma_reads). H200 sweep (bench/RESULTS.md, int4,
# bf16 x): at M = 1 it beat the tensor-core decode kernel's best config by 15-25% (4096 x 4096: 8.0 us against
# 9.6; N = 14336: 23.5 against 27.0; N = 1024: 5.3 against 7.1). A program then took one row and dequantized
# the weight again for each: 14.4 us at M = 2 (against 9.3). Now a program takes two rows (ROWS), at about
# the instructions per code that one row took when timed: M = 2 is predicted near 8 us, untimed (the sweep's
# "int4 CUDA cores" at M = 2 and 4 times it; FMA_MAX_M = 1 restores the tensor-core kernel there). Its
# configs: 16-wide tiles won at every shape; a program's warps split each step's SLICES slices of BLOCK_B
# bytes (4 led at N = 4096, 2 at 14336, 8 and 16 at 1024, where there are fewer programs).
FMA_MAX_M = 2
FMA_CONFIGS = [
    fma_config(16, 64, 4, 8, 1),
    fma_config(16, 64, 2, 4, 1),
    fma_config(16, 64, 8, 8, 1),
    fma_config(16, 64, 16, 16, 1),
]


def _prune_fma_configs(configs, named_args, **kwargs):
    """The CUDA-core decode configs, BLOCK_B fitted to the bits, group size and rows a program."""
    return _fitted(configs, kwargs, functools.partial(fit_block_b, rows=fma_rows(named_args["M"])))


def _fma_unit_bytes(bits: int) -> int:
    """The bytes of the CUDA-core decode kernel's read of four codes: two of int4, one of int2."""
    return 4 * bits // 8


def _fma_reads(x: torch.Tensor, packed: torch.Tensor, bits: int) -> bool:
    """Whether the CUDA-core decode kernel can read x (``fma_reads_x``) and the weight: packed rows contiguous
    and aligned to its reads of four codes (int4: 2 bytes)."""
    return fma_reads_x(x) and contiguous_aligned_rows(packed, _fma_unit_bytes(bits))


# EVEN_K from the launch's K and K step (the config's, autotuned or forced): the K masks are compiled out.
_with_even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(lowbit_mm_kernel)
_gemv_with_even_k = triton.heuristics(
    {"EVEN_K": lambda args: args["K"] % (args["SLICES"] * args["BLOCK_K"]) == 0}
)(lowbit_gemv_kernel)
_fma_with_even_k = triton.heuristics(
    {
        "EVEN_K": lambda args: args["K"] % (args["SLICES"] * args["BLOCK_B"] * (8 // args["BITS"])) == 0,
        "ROWS": lambda args: fma_rows(args["M"]),
    }
)(lowbit_gemv_fma_kernel)


_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "HAS_BIAS"]  # the autotuners' key: shape and flags
_autotuned = _autotune(CONFIGS, _KEY, _prune_configs)(_with_even_k)
_gemv_autotuned = _autotune(GEMV_CONFIGS, _KEY, _prune_gemv_configs)(_gemv_with_even_k)
_fma_autotuned = _autotune(FMA_CONFIGS, _KEY, _prune_fma_configs)(_fma_with_even_k)


def check_lowbit_mm_args(
    x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, bits: int, group_size: int
) -> None:
    """Check ``lowbit_mm_triton``'s operands against the format in the module docstring."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in LOWBIT_BITS:
        raise ValueError(f"bits must be one of {LOWBIT_BITS}, got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    check_weight_only_x(x)
    for name, t in (("packed", packed), ("scale_zeros", scale_zeros)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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


def _forced_lowbit_config(config: dict, bits: int, x_dtype: torch.dtype) -> tuple[dict, dict]:
    """(block sizes, launch options) of a forced config: the decode kernel's with SLICES (GROUP_M refused,
    num_warps SLICES by default: one warp per slice), else the GEMM's."""
    if "SLICES" not in config:
        return _forced_config(config, min_block_k(bits))
    slices = config["SLICES"]
    if not isinstance(slices, int) or isinstance(slices, bool) or not _is_power_of_two(slices):
        raise ValueError(f"config SLICES must be a power of two >= 1 (tl.arange's length), got {slices!r}")
    meta, options = _forced_config({k: v for k, v in config.items() if k != "SLICES"}, min_block_k(bits))
    if "GROUP_M" in config:
        raise ValueError("config GROUP_M orders the GEMM's tiles; the decode kernel (SLICES) takes none")
    if x_dtype == torch.float32 and slices > FLOAT32_MAX_SLICES:
        raise ValueError(
            f"config SLICES = {slices} with float32 x needs more shared memory than an H100 has: at most "
            f"{FLOAT32_MAX_SLICES}"
        )
    del meta["GROUP_M"]
    return {**meta, "SLICES": slices}, {**options, "num_warps": config.get("num_warps", slices)}


def _forced_fma_config(
    config: dict, bits: int, group_size: int, x: torch.Tensor, packed: torch.Tensor
) -> tuple[dict, dict]:
    """(block sizes, launch options) of a forced config of the CUDA-core decode kernel (one with BLOCK_B)."""
    meta, options = forced_fma_config(config, 8 // bits, x.shape[0], fma_rows(x.shape[0]))
    group_bytes = group_size // (8 // bits)
    if meta["BLOCK_B"] > group_bytes:
        raise ValueError(
            f"config BLOCK_B = {meta['BLOCK_B']} bytes spans more than a group ({group_size} codes of {bits} "
            f"bits): at most {group_bytes}"
        )
    if not _fma_reads(x, packed, bits):
        raise ValueError(unreadable_operands(x, "packed", packed, _fma_unit_bytes(bits)))
    return meta, options


def lowbit_mm_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale_zeros: torch.Tensor,
    bits: int,
    group_size: int,
    config: dict | None = None,
    *,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ w.T + bias`` for the packed int4 / int2 weight ``w`` (format: module docstring), as x's dtype;
    ``bias`` None or N floats, added in float32 before the one rounding to x's dtype.

    M <= FMA_MAX_M with 16-bit x in contiguous, 16-byte aligned rows and packed rows contiguous (int4:
    2-byte aligned too) runs the CUDA-core decode kernel (``lowbit_gemv_fma_kernel``), other M <= 16 the
    decode kernel (``lowbit_gemv_kernel``), larger M the GEMM (``lowbit_mm_kernel``), each autotuned.
    ``config`` runs one fixed config instead (tests, the interpreter, benchmarks). A dict with BLOCK_B
    (bytes of a weight row per K slice, a power of two at most a group's bytes), BLOCK_N and optionally
    SLICES, num_warps, num_stages (default 1, 4, 1) runs the CUDA-core kernel (x and packed as above,
    M <= MAX_GRID_Y). Otherwise a dict with BLOCK_M and BLOCK_N (powers of two >= 16), BLOCK_K (a power of
    two >= 16 * per_byte) and optionally num_warps, num_stages (default 4, 3) runs, with SLICES (a power of
    two; num_warps SLICES by default; for float32 x at most 4), the decode kernel, otherwise the GEMM, with
    GROUP_M (default 8). Any N; K is a multiple of group_size. Operands
    may be strided; on CUDA (or CPU tensors under TRITON_INTERPRET=1).
    """
    check_lowbit_mm_args(x, packed, scale_zeros, bits, group_size)
    check_weight_only_bias(bias, packed.shape[0], x.device)
    if config is None:
        forced = None
    elif "BLOCK_B" in config:
        forced = _forced_fma_config(config, bits, group_size, x, packed)
    else:
        forced = _forced_lowbit_config(config, bits, x.dtype)
    return _launch_lowbit_mm(x, packed, scale_zeros, bits, group_size, forced, bias)


def lowbit_mm_triton_prechecked(x, packed, scale_zeros, bits, group_size, bias=None) -> torch.Tensor:
    """``lowbit_mm_triton`` autotuned, without its checks: for the op, whose own checks ran."""
    return _launch_lowbit_mm(x, packed, scale_zeros, bits, group_size, None, bias)


def _launch_lowbit_mm(x, packed, scale_zeros, bits, group_size, forced, bias) -> torch.Tensor:
    _check_runs_on(x)
    (m, k), n = x.shape, packed.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0 or k == 0:
        return _empty_product(out, bias)
    args = (
        x,
        packed,
        scale_zeros,
        scale_zeros if bias is None else bias,  # without a bias any pointer fills the slot: HAS_BIAS=False
        out,
        m,
        n,
        k,
        _m_bucket(m),
        *x.stride(),
        *packed.stride(),
        *scale_zeros.stride(),
        0 if bias is None else bias.stride(0),
        *out.stride(),
    )
    flags = {"BITS": bits, "GROUP_SIZE": group_size, "HAS_BIAS": bias is not None}
    gemv_grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))
    gemm_grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    fma_grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["ROWS"]))
    with _device_guard(x):
        if forced is None:
            if m <= FMA_MAX_M and _fma_reads(x, packed, bits):
                _fma_autotuned[fma_grid](*args, **flags)
            elif m <= DECODE_MAX_M:
                _gemv_autotuned[gemv_grid](*args, **flags)
            else:
                _autotuned[gemm_grid](*args, **flags)
        else:
            meta, options = forced
            if "BLOCK_B" in meta:
                _fma_with_even_k[fma_grid](*args, **flags, **meta, **options)  # ROWS: a heuristic
            elif "SLICES" in meta:
                _gemv_with_even_k[gemv_grid(meta)](*args, **flags, **meta, **options)
            else:
                _with_even_k[gemm_grid(meta)](*args, **flags, **meta, **options)
    return out
