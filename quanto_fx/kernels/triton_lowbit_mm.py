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
- ``K % group_size == 0``; ``group_size`` a power of two >= 16 (quanto_fx.tensor.groupwise requires the
  same). K blocks hold at least 16 bytes per weight row (tl.dot's smallest K): BLOCK_K >= 16 * per_byte.

Written for decode (M = 1..16: the GEMM is bound by reading the weight, which is 4 or 8 times smaller than in
bfloat16) and correct for any M. Launch it through ``lowbit_mm_triton``; the kernel is a plain ``@triton.jit``
function so that tests can interpret it on the CPU (``TRITON_INTERPRET=1``) and compile it for an H100 without
one. Offsets are int32: fine while x, the output and ``packed`` hold fewer than 2**31 elements each.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..tensor.groupwise import check_packed_weight
from ..tensor.quantization import GEMM_FLOAT_DTYPES
from .triton_int8_mm import _tile_ids
from .triton_launch import (
    _bench_on_gpu_alone,
    _config,
    _device_guard,
    _forced_config,
    _m_bucket,
    _output,
    _tier,
)

LOWBIT_BITS = (2, 4)


@triton.jit
def _split_codes(t, PER_BYTE: tl.constexpr):
    """A (R, BYTES_K * PER_BYTE) tile whose columns run b * PER_BYTE + j -> PER_BYTE tiles (R, BYTES_K), the
    columns of code j (j = 0 first)."""
    R: tl.constexpr = t.shape[0]
    BYTES_K: tl.constexpr = t.shape[1] // PER_BYTE
    if PER_BYTE == 2:
        even, odd = tl.split(tl.reshape(t, (R, BYTES_K, 2)))
        return even, odd, even, odd  # codes 2 and 3 unused for int4
    else:
        # k = b * 4 + 2 * j1 + j0: split j0 off first, then j1.
        j0_0, j0_1 = tl.split(tl.reshape(t, (R, BYTES_K, 2, 2)))
        c0, c2 = tl.split(j0_0)
        c1, c3 = tl.split(j0_1)
        return c0, c1, c2, c3


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
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """out = x @ dequantize(packed, scale_zeros).T, float32 sums stored as out's dtype.

    Rows past M, columns past N and K past the end load 0 and are not stored: any M and N, and any K that
    is a multiple of GROUP_SIZE. M_BUCKET is unused here: it is the autotuner's key. With SPLIT_K > 1, the
    program (tile, s) sums the K blocks s, s + SPLIT_K, ... and adds its sums atomically into ``out``, which
    must then be float32 zeros. EVEN_K: K is a multiple of BLOCK_K (``_with_even_k`` sets it).

    Every global load feeds the tl.dot, so triton pipelines all of them (cp.async, num_stages deep); a load
    whose value is used only after the dot, like a scale applied to the sums, or a strided one, waits a full
    memory latency in every K iteration. At M = 1, K = N = 4096 on an H200, versions that did so ran 3.2x
    to 3.7x the bf16 GEMM's time; this one 1.8x, and 1.1x with split-K, before it lost its conversion
    instructions (below; not re-timed since; bench/RESULTS.md):
    - the weight tile is loaded as bytes, each byte once, in the (K, N) orientation of tl.dot's second
      operand, contiguous along K; code j of every byte (bits j * BITS and up) is dequantized in x's
      dtype, ``(q - MID) * scale + zero`` with scale and zero rounded to it (as torch's int4 kernels and the
      reference do) and one rounding for the rest (an fma), and meets the x columns k0 + b * PER_BYTE + j
      in its own tl.dot: no weight tile is reshaped or transposed;
    - x's tile is loaded contiguous and split into those column sets in registers (it is BLOCK_M rows: the
      small operand in decode);
    - a K block inside one group (GROUP_SIZE >= BLOCK_K) loads one scale and zero per column, smaller
      groups one per (k, column).

    Why tl.dot even for M = 1 (a 16-row tile, 15 rows of zeros): decode is bound by reading the weight, and
    only loads feeding a tl.dot are pipelined; a multiply-and-reduce loop keeps one K block in flight per
    program, far too few bytes for HBM (checked in the PTX for triton 3.6.0, sm_90).
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    BYTES_K: tl.constexpr = BLOCK_K // PER_BYTE
    MID: tl.constexpr = 1 << (BITS - 1)  # the code of the zero point: w = (q - MID) * scale + zero
    ONE_GROUP: tl.constexpr = GROUP_SIZE >= BLOCK_K
    # Codes become x's dtype without int -> float conversions: Hopper runs 16 a clock per SM (an eighth of
    # float32 FMAs; CUDA guide, throughput table), and one per code plus a float -> bfloat16 one per two
    # codes bounded the decode kernel (SASS: 96 conversions in 487 instructions per 64 codes). A code OR-ed
    # into the mantissa of MAGIC (whose mantissa's unit is 1) reads as MAGIC + code. Subtracting MAGIC + MID
    # is exact, and w = (code - MID) * scale + zero one fma, two codes an instruction. magic_mid is a float
    # constant: built by a bitcast it was not folded (51 more instructions a loop, and shared memory).
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
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
    magic_mid = tl.full((), MAGIC + MID, DTYPE)
    tl.static_assert(BYTES_K >= 16, "tl.dot needs 16 bytes of K per code: BLOCK_K >= 16 * PER_BYTE")

    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
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
    for kb in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k0 = kb * BLOCK_K
        if EVEN_K:  # K a multiple of BLOCK_K: no mask along K to compute in every iteration
            x_mask = m_mask[:, None]
            b_mask = n_mask[None, :]
        else:
            x_mask = m_mask[:, None] & (rk < K - k0)[None, :]
            b_mask = (rb < (K - k0) // PER_BYTE)[:, None] & n_mask[None, :]
        x = tl.load(x_ptrs + k0 * stride_xk, mask=x_mask, other=0.0)
        byte = tl.load(packed_ptrs + (k0 // PER_BYTE) * stride_pk, mask=b_mask, other=0).to(CODE_TYPE)
        if ONE_GROUP:  # (1, BLOCK_N): one group for the whole block
            group_ptrs = sz_ptrs + (k0 // GROUP_SIZE) * stride_sg
            sz_mask = n_mask[None, :]
        else:  # (BYTES_K, BLOCK_N): byte b's group, the same for its codes (GROUP_SIZE % PER_BYTE == 0)
            group_ptrs = sz_ptrs + ((k0 + rb * PER_BYTE) // GROUP_SIZE)[:, None] * stride_sg
            sz_mask = b_mask
        scale = tl.load(group_ptrs, mask=sz_mask, other=0.0).to(DTYPE)
        zero = tl.load(group_ptrs + stride_sc, mask=sz_mask, other=0.0).to(DTYPE)
        xs = _split_codes(x, PER_BYTE)
        for j in tl.static_range(PER_BYTE):
            code = ((byte >> (j * BITS)) & ((1 << BITS) - 1)) | MAGIC_BITS
            w = (code.to(DTYPE, bitcast=True) - magic_mid) * scale + zero
            # input_precision="ieee": a float32 x stays float32 (FMA), not TF32 (10 mantissa bits), as torch
            # computes float32 matmuls by default. It has no effect on 16-bit operands.
            acc = tl.dot(xs[j], w, acc, input_precision="ieee")

    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")


# -- the launcher --------------------------------------------------------------------------------------


# Block configs in tiers by M; the autotuner picks within the tier. _prune_configs fits BLOCK_K to the group
# size (see _fit_block_k). Timings: bench/gpu_weight_only_sweep.py, H200, torch 2.11, bench/RESULTS.md.
CONFIG_TIERS = {
    # M <= 16 (decode): one 16-row tile (mma.sync; wgmma needs 64 rows), with split-K (below). Best at M = 1
    # and 16, K = N = 4096, with the conversion-bound dequantization of before: 64 x 128 tiles, 3 stages
    # (11.6 / 12.0 us; 32-wide tiles 13.3 / 13.4 us; 6 stages 13.6 / 13.3 us). Since, the loop is bound by
    # integer instructions (unpacking, and x split in registers by every warp): per code, 4.4 / 3.6 / 3.2
    # with 32- / 64- / 128-wide tiles (SASS), hence the 128-wide config, not yet timed on a GPU.
    16: [
        _config(16, 64, 128, 4, 3),
        _config(16, 32, 128, 4, 3),
        _config(16, 64, 128, 4, 6),
        _config(16, 32, 128, 4, 6),
        _config(16, 128, 128, 4, 3),
    ],
    # 16 < M <= 64: one row tile, so each weight element is unpacked once per 64 rows.
    64: [_config(32, 64, 128, 4, 4), _config(64, 64, 64, 4, 4), _config(64, 128, 64, 4, 3)],
    # M > 64 (prefill): compute bound; unpacking amortized over 64 or 128 rows, wgmma tiles.
    None: [_config(128, 128, 64, 8, 3), _config(64, 128, 64, 4, 4), _config(128, 64, 64, 4, 4)],
}
CONFIGS = [config for tier in CONFIG_TIERS.values() for config in tier]

# Programs per output tile in decode (M <= 16), while K holds at least SPLIT_K_MIN_K columns per split: each
# adds its float32 sums atomically into a zeroed float32 output. One program per tile leaves an H200's HBM
# idle: at M = 1, K = N = 4096 the best config ran 18.6 / 14.2 / 11.8 / 11.6 us with 1 / 2 / 4 / 8 splits
# (K = 4096, N = 14336: 34.1 / 32.7 / 29.9 / 30.5). Not under torch's deterministic mode (atomic float
# additions land in any order). The int8 weight-only kernel gained nothing from it and runs unsplit.
DECODE_SPLIT_K = 8
SPLIT_K_MIN_K = 512


def _split_k(m: int, k: int) -> int:
    """The low-bit kernel's split-K for M rows and K columns (see DECODE_SPLIT_K)."""
    if m > 16 or torch.are_deterministic_algorithms_enabled():
        return 1
    return max(1, min(DECODE_SPLIT_K, k // SPLIT_K_MIN_K))


def min_block_k(bits: int) -> int:
    """The smallest BLOCK_K of the low-bit kernel: 16 bytes of each weight row (tl.dot's smallest K)."""
    return 16 * (8 // bits)


def _fit_block_k(config: triton.Config, bits: int, group_size: int) -> triton.Config:
    """``config`` with BLOCK_K cut to ``group_size`` (a K block in one group: exact codes in the tensor
    cores), but not below ``min_block_k(bits)`` (then each weight is dequantized before the dot)."""
    block_k = max(min(config.kwargs["BLOCK_K"], group_size), min_block_k(bits))
    if block_k == config.kwargs["BLOCK_K"]:
        return config
    kwargs = {**config.kwargs, "BLOCK_K": block_k}
    return triton.Config(kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _prune_configs(configs, named_args, **kwargs):
    """The configs of M's tier, fitted to the bits and group size, without duplicates."""
    m, bits, group_size = named_args["M"], kwargs["BITS"], kwargs["GROUP_SIZE"]
    fitted = {}
    for config in _tier(CONFIG_TIERS, m):
        config = _fit_block_k(config, bits, group_size)
        fitted.setdefault((tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages), config)
    return list(fitted.values())


# EVEN_K from the launch's K and BLOCK_K (the config's, autotuned or forced).
_with_even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(lowbit_mm_kernel)

_autotuned = triton.autotune(
    configs=CONFIGS,
    key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "SPLIT_K"],  # the autotuner adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=_bench_on_gpu_alone,
    reset_to_zero=["out_ptr"],  # split-K adds into the output: each timed run starts from zeros
)(_with_even_k)


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
    BLOCK_M and BLOCK_N (powers of two >= 16), BLOCK_K (a power of two >= 16 * per_byte) and optionally
    GROUP_M, SPLIT_K, num_warps, num_stages (default 8, 1, 4, 3). Any M and N; K is a multiple of
    group_size. Operands may be strided; on CUDA (or CPU tensors under TRITON_INTERPRET=1).
    """
    check_lowbit_mm_args(x, packed, scale_zeros, bits, group_size)
    forced = None if config is None else _forced_config(config, min_block_k(bits))
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"the Triton kernel needs CUDA tensors (CPU ones only under TRITON_INTERPRET=1), got {x.device}"
        )
    (m, k), n = x.shape, packed.shape[0]
    split_k = _split_k(m, k) if forced is None else forced[0]["SPLIT_K"]
    out = _output(x, n, split_k)
    if m == 0 or n == 0 or k == 0:  # k == 0: the empty sum
        return out.zero_().to(x.dtype)
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
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k)
            _autotuned[grid](*args, BITS=bits, GROUP_SIZE=group_size, SPLIT_K=split_k)
        else:
            meta, options = forced
            grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k)
            _with_even_k[grid](*args, BITS=bits, GROUP_SIZE=group_size, **meta, **options)
    return out.to(x.dtype)
