"""Weight-only GEMM ops: float activations times int8, float8 or packed int4 / int2 weights, dequantized in
the GEMM.

- ``quanto_fx::int8_weight_mm(x, w, scale, bias)``: int8 (N, K) weight with per-output-channel scales. CPU
  with AVX512-VNNI (``cpu_vnni_mm.py``): our kernels where they apply (a GEMV at small M, then a GEMM); for
  weights of 4 MB or more past M = 128 (and past M = 16 for K not a multiple of 32), x as two byte planes
  through ``torch._int_mm``. Otherwise on the CPU: ``aten._weight_int8pack_mm`` (M <= 16, K a multiple of 16),
  or the float GEMM on the dequantized weight. CUDA: the Triton kernel when triton is installed (from
  ``CUDA_DEQUANTIZED_GEMM_MIN_M`` rows, the weight dequantized by a Triton kernel, then torch's GEMM), else
  the float GEMM on the dequantized weight.
- ``quanto_fx::lowbit_weight_mm(x, packed, scale_zeros, kernel, bits, group_size, bias)``: the group-wise
  int4 / int2 weights of :class:`quanto_fx.tensor.PackedQTensor`. CPU with AVX512-VNNI: the VNNI GEMV /
  GEMM on the portable packing, at every M, where it applies. Otherwise on the CPU:
  ``aten._weight_int4pack_mm_for_cpu`` on the weight's kernel layout (M <= 16; int2 codes are int4 codes
  there), or the float GEMM on blocks dequantized by torch ops. CUDA: the Triton kernel when triton is
  installed (from ``CUDA_DEQUANTIZED_GEMM_MIN_M`` rows, as for int8); otherwise the dequantize-then-GEMM
  reference.
- ``quanto_fx::float8_weight_mm(x, w, scale, bias)``: float8_e4m3fn / e5m2 (N, K) weight with per-output-
  channel scales. CPU: the float8 GEMV / GEMM of ``cpu_float8_mm.py`` where they are available. CUDA (8.9+,
  triton installed): the Triton kernels of ``int8_weight_mm``. Elsewhere: the float GEMM on the dequantized
  weight.

On the CPU, once the kernel library of ``cpu_vnni_mm.py`` is loaded, the calls its kernels take as they are
run in C++ kernels registered for the ops' CPU dispatch key; the implementations here compute every other
call (and check every call's arguments, raise the errors) as their CompositeExplicitAutograd kernels.

All compute ``x @ W.T (+ bias)`` and return ``x``'s dtype. Memory-bound decoding (M = 1 to 16) is where they
pay: they read 1 byte (int8, float8) or half a byte (int4) per weight instead of 4 (fp32) or 2 (bf16).

CPU precision: the VNNI paths round x to 16-bit integers per row (~3e-5 relative on the output), whatever x's
dtype (16-bit x is computed from float32 and the result rounded to x's dtype); the float8 kernels compute in
float32, but on CPUs with AVX512-FP16 the GEMV and the GEMM compute in float16 (~5e-4
relative, see ``cpu_float8_mm.path``). aten's CPU int8 / int4 weight-only kernels are vectorized for 16-bit
activations only (with float32 ones they ran 3 to 46x slower than the fp32 GEMM, bench/RESULTS.md), so float32
inputs and scales are rounded to bfloat16 for them (relative error ~2**-9, against ~4e-3 from int8 and ~6e-2
from int4 weights) and the result is returned in float32. Past M = 16 they lose to the fp32 GEMM, which then
runs on the weight dequantized block by block.
"""

from __future__ import annotations

import torch

from ..tensor.groupwise import check_packed_weight, dequantize_groupwise
from ..tensor.packing import unpack
from ..tensor.quantization import FLOAT8_DTYPES
from . import cpu_float8_mm, cpu_vnni_mm
from .checks import check_weight_only_bias, check_weight_only_x
from .library import LIB, TAGS

# Largest M for which aten's CPU weight-only kernels beat the fp32 GEMM (4096 x 4096, 2-core Xeon: 0.4x at
# M = 1 to 4, 0.85x at 16, 1.2x at 32).
CPU_KERNEL_MAX_M = 16
# aten._weight_int8pack_mm crashes the process (segfault, torch 2.13 CPU) unless K is a multiple of 16.
CPU_INT8_K_MULTIPLE = 16
# What aten's CPU int4 kernel takes (checked by the kernel itself; outside these the reference runs).
CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)
CPU_INT4_N_MULTIPLE = 16
INT4_MID = 8


def _with_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out.add_(bias.to(out.dtype))


def _in_dtype(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out.to(dtype)`` without its ~1 us when it is a no-op (the CPU kernels return float32)."""
    return out if out.dtype == dtype else out.to(dtype)


# -- int8 weights ------------------------------------------------------------------------------------------


def per_channel_weight_mm_reference(x, w, scale, bias=None):
    """``x @ (w * scale).T + bias`` for int8 or float8 weights: the dequantized weight in x's dtype, then one
    GEMM."""
    weight = w.to(x.dtype) * scale.reshape(-1, 1).to(x.dtype)
    return _with_bias(x @ weight.t(), bias)


def _check_per_channel_weight_args(x, w, scale, bias, dtypes, kind):
    """x (M, K) float times a ``kind`` (N, K) weight of ``dtypes`` with N per-channel scales and an optional
    (N,) float bias, all on one device (the weight-only ops, and the dynamic ones of ``dynamic_mm.py``)."""
    if w.dtype not in dtypes or w.ndim != 2:
        raise TypeError(f"w must be a 2-d {kind} (out, in) tensor, got {w.dtype} {tuple(w.shape)}")
    check_weight_only_x(x, w.shape[1], w.device)
    if not scale.is_floating_point() or scale.numel() != w.shape[0] or scale.device != w.device:
        raise ValueError(
            f"scale must hold {w.shape[0]} float per-channel scales on {w.device}, got {scale.dtype} "
            f"{tuple(scale.shape)} on {scale.device}"
        )
    check_weight_only_bias(bias, w.shape[0], w.device)


# CPU: dequantizing a whole weight allocates a fresh (N, K) float buffer per call; past glibc's mmap threshold
# (32 MB at most) every page of it faults on first touch: int8 -> fp32 of 4096 x 4096 took 18 ms at once,
# 3.5 ms in blocks. Larger blocks keep the GEMMs efficient: at M = 128, 1 / 8 / 16 MB blocks ran int8 at
# 1.65 / 1.39 / 1.34x and int4 at 2.9 / 2.6 / 4.7x the fp32 GEMM.
DEQUANTIZE_BLOCK_BYTES = 8 << 20


# CPU: up to this M a block computes block @ x.T into contiguous rows of the transposed output; past it (and
# on other devices) x @ block.T into a column slice of the output. MKL, 4096 x 4096 in blocks of 512 rows
# (2-core Xeon, ms): M = 32, columns 16.1 / transposed 6.1; M = 128, 19.4 / 19.4; M = 512, 61.5 / 66.0;
# M = 2048 (384 -> 1536, one block), 9.1 / 16.4.
TRANSPOSED_BLOCKS_MAX_M = 64


def _blocked_gemm(x: torch.Tensor, out_features: int, fill_rows, bias=None, block_bytes=None) -> torch.Tensor:
    """``x @ W.T + bias`` with W dequantized one block of rows (about ``block_bytes``, by default
    DEQUANTIZE_BLOCK_BYTES) at a time: ``fill_rows(start, stop, block)`` writes rows start:stop of W into
    ``block``, one buffer reused for every block, in one pass. Each block's GEMM adds its part of the bias
    (rounded to x's dtype), so each output is rounded once."""
    block_bytes = DEQUANTIZE_BLOCK_BYTES if block_bytes is None else block_bytes
    row_bytes = max(1, x.shape[1] * x.element_size())
    rows = max(1, min(out_features, max(16, block_bytes // row_bytes)))
    buffer = x.new_empty((rows, x.shape[1]))
    transposed = x.is_cpu and x.shape[0] <= TRANSPOSED_BLOCKS_MAX_M  # measured for MKL only
    out = x.new_empty((out_features, x.shape[0]) if transposed else (x.shape[0], out_features))
    bias = None if bias is None else bias.to(x.dtype)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        block = buffer[: stop - start]
        fill_rows(start, stop, block)
        if transposed and bias is None:
            torch.matmul(block, x.t(), out=out[start:stop])
        elif transposed:
            torch.addmm(bias[start:stop, None], block, x.t(), out=out[start:stop])
        elif bias is None:
            torch.matmul(x, block.t(), out=out[:, start:stop])
        else:
            torch.addmm(bias[start:stop], x, block.t(), out=out[:, start:stop])
    return out.t().contiguous() if transposed else out


# CUDA: from this M on, a weight-only GEMM dequantizes its weight into x's dtype, in blocks of about
# CUDA_DEQUANTIZE_BLOCK_BYTES, and runs torch's GEMM (cuBLAS) on each (``triton_dequantize.py``). The fused
# kernels convert each weight tile once per row tile of x: H200, 4096 x 4096 (bench/RESULTS.md), int4 took
# 20.8 us at M = 64 (bf16 8.1) and 91.6 at M = 1024 (bf16 51.3), int8 72.3. Untimed yet: the conversion's one
# pass (int4: ~40 MB moved, ~10 us) plus bf16's GEMM predicts ~18 us against 20.8 at M = 64, ~22 against ~25
# at M = 128 and ~62 against 91.6 at M = 1024. 128 keeps the fused kernels where the predicted gain is within
# the prediction's own error, until bench/gpu_weight_only_sweep.py times both. The two paths round
# differently: here the weight (w * scale for int8 / float8) and the bias are rounded to x's dtype before the
# GEMM, and float32 x follows torch's matmul settings (TF32 if allowed), as F.linear does.
CUDA_DEQUANTIZED_GEMM_MIN_M = 128
CUDA_DEQUANTIZE_BLOCK_BYTES = 64 << 20


def _cpu_kernel_dtype(x: torch.Tensor) -> torch.dtype:
    """The 16-bit dtype aten's CPU weight-only kernels compute ``x`` in (see the module docstring)."""
    return torch.bfloat16 if x.dtype == torch.float32 else x.dtype


def int8_weight_mm_torch(x, w, scale, bias=None):
    _check_per_channel_weight_args(x, w, scale, bias, (torch.int8,), "int8")
    if not x.is_cpu:
        return per_channel_weight_mm_reference(x, w, scale, bias)
    # The VNNI paths return None where x is not finite or has a row too small to scale: the float paths
    # below compute it (and propagate NaN and infinity).
    rows, (out_features, in_features) = x.shape[0], w.shape
    vnni = cpu_vnni_mm.supports(8, in_features)
    if vnni and not cpu_vnni_mm.int8_uses_int_mm(rows, in_features, out_features):
        out = cpu_vnni_mm.weight_mm_prechecked(x, w, scale, 8, None, bias)
        if out is not None:
            return _in_dtype(out, x.dtype)
    elif (
        rows > CPU_KERNEL_MAX_M
        and 0 < in_features <= cpu_vnni_mm.INT_MM_MAX_IN_FEATURES
        and cpu_vnni_mm.available()
    ):
        out = cpu_vnni_mm.int8_weight_int_mm(x, w.contiguous(), scale.reshape(-1))
        if out is not None:
            return _in_dtype(_with_bias(out, bias), x.dtype)
    # The float GEMM on dequantized blocks (aten's kernel also crashes for K = 0).
    if x.shape[0] > CPU_KERNEL_MAX_M or w.shape[1] % CPU_INT8_K_MULTIPLE or w.shape[1] == 0:
        scale = scale.reshape(-1, 1).to(x.dtype)

        def fill_rows(start, stop, block):
            torch.mul(w[start:stop], scale[start:stop], out=block)

        return _blocked_gemm(x, w.shape[0], fill_rows, bias)
    dtype = _cpu_kernel_dtype(x)
    out = torch.ops.aten._weight_int8pack_mm(
        x.to(dtype).contiguous(), w.contiguous(), scale.reshape(-1).to(dtype)
    )
    return _with_bias(out.to(x.dtype), bias)


def per_channel_dequantized_gemm(x, w, scale, bias=None):
    """CUDA: ``x @ (w * scale).T + bias`` (int8 or float8 w) as the ops compute it from
    CUDA_DEQUANTIZED_GEMM_MIN_M rows: blocks of w dequantized by ``triton_dequantize.py``, then torch's
    GEMM."""
    from .triton_dequantize import dequantize_per_channel_triton

    scale = scale.reshape(-1)

    def fill_rows(start, stop, block):
        dequantize_per_channel_triton(w[start:stop], scale[start:stop], block)

    return _blocked_gemm(x, w.shape[0], fill_rows, bias, CUDA_DEQUANTIZE_BLOCK_BYTES)


def _per_channel_weight_mm_triton(x, w, scale, bias):
    """CUDA, int8 or float8 weights: from CUDA_DEQUANTIZED_GEMM_MIN_M rows ``per_channel_dequantized_gemm``,
    else the fused Triton kernels of ``triton_int8_weight_mm.py`` (CUDA cores at M = 1, else tensor cores)."""
    from .triton_int8_weight_mm import int8_weight_mm_triton_prechecked

    if x.shape[0] >= CUDA_DEQUANTIZED_GEMM_MIN_M:
        return per_channel_dequantized_gemm(x, w, scale, bias)
    return int8_weight_mm_triton_prechecked(x, w, scale.reshape(-1), bias)


def int8_weight_mm_cuda(x, w, scale, bias=None):
    """CUDA (with triton installed): see ``_per_channel_weight_mm_triton``."""
    _check_per_channel_weight_args(x, w, scale, bias, (torch.int8,), "int8")
    return _per_channel_weight_mm_triton(x, w, scale, bias)


def _int8_weight_mm_fake(x, w, scale, bias=None):
    _check_per_channel_weight_args(x, w, scale, bias, (torch.int8,), "int8")
    return x.new_empty((x.shape[0], w.shape[0]))


# -- float8 weights --------------------------------------------------------------------------------------


def float8_weight_mm_torch(x, w, scale, bias=None):
    _check_per_channel_weight_args(x, w, scale, bias, FLOAT8_DTYPES, "float8")
    if not x.is_cpu or not cpu_float8_mm.supports(w.shape[1]):
        return per_channel_weight_mm_reference(x, w, scale, bias)
    return _in_dtype(cpu_float8_mm.weight_mm_prechecked(x, w, scale, bias), x.dtype)


def float8_weight_mm_cuda(x, w, scale, bias=None):
    """CUDA (with triton installed): the Triton kernels of ``int8_weight_mm`` read float8 weights too, on GPUs
    that convert float8 (compute capability 8.9+); elsewhere the float GEMM on the dequantized weight."""
    _check_per_channel_weight_args(x, w, scale, bias, FLOAT8_DTYPES, "float8")
    if torch.cuda.get_device_capability(x.device) < (8, 9):
        return per_channel_weight_mm_reference(x, w, scale, bias)
    return _per_channel_weight_mm_triton(x, w, scale, bias)


def _float8_weight_mm_fake(x, w, scale, bias=None):
    _check_per_channel_weight_args(x, w, scale, bias, FLOAT8_DTYPES, "float8")
    return x.new_empty((x.shape[0], w.shape[0]))


# -- packed int4 / int2 weights ------------------------------------------------------------------------


def lowbit_weight_mm_reference(x, packed, scale_zeros, bits, bias=None):
    """``x @ dequantize(packed).T + bias``: unpack, dequantize group-wise in x's dtype, then one GEMM."""
    weight = dequantize_groupwise(unpack(packed, bits), scale_zeros.to(x.dtype), bits)
    return _with_bias(x @ weight.t(), bias)


def _check_lowbit_args(x, packed, scale_zeros, bits, group_size, bias):
    out_features, in_features = check_packed_weight(packed, scale_zeros, bits, group_size)
    check_weight_only_x(x, in_features, packed.device)
    check_weight_only_bias(bias, out_features, packed.device)


def lowbit_kernel_layout(packed: torch.Tensor, bits: int, group_size: int) -> torch.Tensor | None:
    """The weight in the layout of this device's int4 GEMM kernel, or None when it has none (or the shape
    does not suit it) and the portable packing is used as is.

    CPU: none where the VNNI kernel serves the weight (it reads the portable packing: no second copy), else
    ``aten._convert_weight_to_int4pack_for_cpu`` of the int4 codes; an int2 code ``q`` becomes the int4 code
    ``q + 6``, so that ``q - 2 == (q + 6) - 8`` and the same scales and zeros apply.
    """
    fake = torch._subclasses.fake_tensor.is_fake(packed) or packed.is_meta
    if fake or torch.compiler.is_compiling() or packed.device.type != "cpu":
        return None
    if cpu_vnni_mm.supports(bits, packed.shape[1] * 8 // bits, group_size):
        return None
    if packed.shape[0] % CPU_INT4_N_MULTIPLE or group_size not in CPU_INT4_GROUP_SIZES:
        return None
    codes = unpack(packed, bits).to(torch.int32) + (INT4_MID - 2 ** (bits - 1))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)


def lowbit_weight_mm_torch(x, packed, scale_zeros, kernel, bits, group_size, bias=None):
    _check_lowbit_args(x, packed, scale_zeros, bits, group_size, bias)
    if not x.is_cpu:
        return lowbit_weight_mm_reference(x, packed, scale_zeros, bits, bias)
    if cpu_vnni_mm.supports(bits, x.shape[1], group_size):
        out = cpu_vnni_mm.weight_mm_prechecked(x, packed, scale_zeros, bits, group_size, bias)
        if out is not None:  # None: x not finite or too small to scale, left to the float path below
            return _in_dtype(out, x.dtype)
    if kernel is None or x.shape[0] > CPU_KERNEL_MAX_M:  # the float GEMM on dequantized blocks
        scale_zeros = scale_zeros.to(x.dtype)

        def fill_rows(start, stop, block):
            codes = unpack(packed[start:stop], bits)
            dequantize_groupwise(codes, scale_zeros[:, start:stop], bits, out=block)

        return _blocked_gemm(x, packed.shape[0], fill_rows, bias)
    dtype = _cpu_kernel_dtype(x)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(dtype).contiguous(), kernel, group_size, scale_zeros.to(dtype)
    )
    return _with_bias(out.to(x.dtype), bias)


def lowbit_dequantized_gemm(x, packed, scale_zeros, bits, group_size, bias=None):
    """CUDA: ``x @ w.T + bias`` for a packed int4 / int2 ``w`` as the ops compute it from
    CUDA_DEQUANTIZED_GEMM_MIN_M rows: blocks of w dequantized by ``triton_dequantize.py`` (as the fused
    kernels dequantize it), then torch's GEMM."""
    from .triton_dequantize import dequantize_lowbit_triton

    def fill_rows(start, stop, block):
        dequantize_lowbit_triton(packed[start:stop], scale_zeros[:, start:stop], bits, group_size, block)

    return _blocked_gemm(x, packed.shape[0], fill_rows, bias, CUDA_DEQUANTIZE_BLOCK_BYTES)


def lowbit_weight_mm_cuda(x, packed, scale_zeros, kernel, bits, group_size, bias=None):
    """CUDA (with triton installed): from CUDA_DEQUANTIZED_GEMM_MIN_M rows ``lowbit_dequantized_gemm``, else
    the Triton dequantize-in-the-GEMM kernels of ``triton_lowbit_mm.py``."""
    from .triton_lowbit_mm import lowbit_mm_triton_prechecked

    _check_lowbit_args(x, packed, scale_zeros, bits, group_size, bias)
    if x.shape[0] >= CUDA_DEQUANTIZED_GEMM_MIN_M:
        return lowbit_dequantized_gemm(x, packed, scale_zeros, bits, group_size, bias)
    return lowbit_mm_triton_prechecked(x, packed, scale_zeros, bits, group_size, bias)


def _lowbit_fake(x, packed, scale_zeros, kernel, bits, group_size, bias=None):
    _check_lowbit_args(x, packed, scale_zeros, bits, group_size, bias)
    return x.new_empty((x.shape[0], packed.shape[0]))


LIB.define("int8_weight_mm(Tensor x, Tensor w, Tensor scale, Tensor? bias=None) -> Tensor", tags=TAGS)
LIB.impl("int8_weight_mm", int8_weight_mm_torch, "CompositeExplicitAutograd")
torch.library.register_fake("quanto_fx::int8_weight_mm", _int8_weight_mm_fake, lib=LIB)
LIB.define("float8_weight_mm(Tensor x, Tensor w, Tensor scale, Tensor? bias=None) -> Tensor", tags=TAGS)
LIB.impl("float8_weight_mm", float8_weight_mm_torch, "CompositeExplicitAutograd")
torch.library.register_fake("quanto_fx::float8_weight_mm", _float8_weight_mm_fake, lib=LIB)
LIB.define(
    "lowbit_weight_mm(Tensor x, Tensor packed, Tensor scale_zeros, Tensor? kernel, int bits, int group_size, "
    "Tensor? bias=None) -> Tensor",
    tags=TAGS,
)
LIB.impl("lowbit_weight_mm", lowbit_weight_mm_torch, "CompositeExplicitAutograd")
torch.library.register_fake("quanto_fx::lowbit_weight_mm", _lowbit_fake, lib=LIB)

int8_weight_mm = torch.ops.quanto_fx.int8_weight_mm.default
float8_weight_mm = torch.ops.quanto_fx.float8_weight_mm.default
lowbit_weight_mm = torch.ops.quanto_fx.lowbit_weight_mm.default
