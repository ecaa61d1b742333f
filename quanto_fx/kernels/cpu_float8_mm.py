"""CPU float8 weight-only GEMMs: the C++ kernels of ``cpu_float8_mm.cpp``.

torch converts float8 to float32 element by element on the CPU (~55 ms for a 4096 x 4096 weight on a 2-core
Xeon), which made float8 weights 2 to 30x slower than the fp32 GEMM. The kernels convert 32 codes in a few
vector instructions through float16 (exact for every code, NaN included):
- ``float8_weight_mm``: a GEMV for small M (each weight chunk converted once per 4 rows of x), else a GEMM
  (each block of 32 weight rows converted once into a panel that every row of x runs over with broadcast
  FMAs, as a float GEMM's micro-kernel does), the bias added as the outputs are stored. On CPUs with
  AVX512-FP16 both multiply the codes' float16 form directly (see :func:`path`): the GEMV for e4m3fn and
  e5m2 up to M = 16, 8 rows of x per conversion; the GEMM past it, on panels of 512 inputs that stay in
  L1. Against the fp32 GEMM (2-core Xeon, kernels alone): 4096 x 4096 0.15-0.27x up to M = 12,
  ~0.4-0.6x at 16 to 32, 0.75-0.9x from 128; small layers 0.6-0.9x, but 1536 -> 384 at M = 2048 1.1x
  (bench/RESULTS.md). On the other CPUs the float32 GEMM's panels ran 0.95-1.57x the fp32 GEMM's time from
  M = 1024 on (a 2-vCPU Cascade Lake): there, blocks of weight rows are converted to float32 (times their
  scales) and multiplied by torch's BLAS GEMM (``at::cpu::addmm_out``), 0.90-1.17x.

They are built into the library of ``cpu_vnni_mm.py`` and used where it is available (AVX512-VNNI CPU, a
C++ compiler, ``QUANTO_FX_CPU_KERNELS`` not ``0``); :func:`supports` says so.
"""

from __future__ import annotations

import torch

from . import cpu_vnni_mm

FORMATS = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}


# The GEMM keeps a float32 panel of 32 weight rows per thread: 128 bytes per input feature (64 MB here).
MAX_IN_FEATURES = 1 << 19


def supports(in_features: int) -> bool:
    """Whether the float8 kernels serve a weight of ``in_features`` on this machine (they share the VNNI
    kernels' library)."""
    return 0 < in_features <= MAX_IN_FEATURES and cpu_vnni_mm.available()


PATHS = ("float32 GEMM", "float32 GEMV", "float16 GEMV", "float16 GEMM", "float32 BLAS GEMM")


def path(dtype: torch.dtype, rows: int) -> str:
    """The kernel that computes ``rows`` rows of x with ``dtype`` weights on this machine, one of ``PATHS``
    (the C++ side chooses it by M). The float16 paths run on CPUs with AVX512-FP16: the GEMV up to M = 16, the
    GEMM past it. x is rounded per row to float16 and each output's products are summed in float16
    over 16 products per lane, then in float32, for a relative error of ~5e-4 (at most ``FLOAT16_ERROR``)
    against the formats' own ~3e-2 (e4m3) and ~6e-2 (e5m2). e5m2 GEMV groups of 4 weight rows and GEMM
    blocks holding a weight row with no code of at least 2**-6 among its first 512 inputs (weights not
    scaled to the format's range) are computed in float32, and x they cannot scale (not finite, or max |x|
    < 1e-30) takes the float32 GEMV or GEMM (the BLAS GEMM from M = 1024). The float32 paths compute in
    float32; the BLAS GEMM (from M = 1024 on CPUs without AVX512-FP16) multiplies x by the float32 values of
    ``w * scale`` on torch's threads, under torch's float32 matmul settings as ``F.linear`` is (a lowered
    ``torch.set_float32_matmul_precision`` may let oneDNN compute it in bfloat16)."""
    if dtype not in FORMATS or not supports(1):
        raise ValueError(f"no float8 kernel for {dtype} on this machine")
    return PATHS[cpu_vnni_mm._loaded_library().quanto_float8_path(FORMATS[dtype], rows)]


# Bound on the float16 paths' relative error (||out - exact|| / ||exact||; measured 4-7e-4 on random data).
FLOAT16_ERROR = 2e-3


def _check_args(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    """What the C++ side reads, checked (it trusts every index)."""
    cpu_vnni_mm._check_on_cpu(x, w, scale, bias)
    if w.dtype not in FORMATS or w.ndim != 2:
        raise ValueError(f"w must be a 2-d float8 tensor, got {w.dtype} {tuple(w.shape)}")
    if not supports(w.shape[1]):
        raise ValueError(f"no float8 kernel for {w.shape[1]} input features on this machine")
    if x.ndim != 2 or not x.is_floating_point() or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be a 2-d float (M, {w.shape[1]}) tensor, got {x.dtype} {tuple(x.shape)}")
    for name, vector in (("scale", scale), ("bias", bias)):
        if vector is not None and (not vector.is_floating_point() or vector.shape != w.shape[:1]):
            raise ValueError(f"{name} must be a float ({w.shape[0]},) tensor, got {tuple(vector.shape)}")


def float8_weight_mm(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (w * scale).T + bias`` as float32 (M, N): the GEMV or the GEMM by M (see the module docstring).

    Args:
        x: (M, K) float activations (any float dtype: computed in float32); w: float8 (N, K); scale: float
            (N,) per-channel scales; bias: optional float (N,). All on the CPU.
    """
    _check_args(x, w, scale, bias)
    return weight_mm_prechecked(x, w, scale, bias)


def weight_mm_prechecked(x, w, scale, bias=None):
    """:func:`float8_weight_mm` for callers that have checked its arguments themselves, as the
    ``float8_weight_mm`` op does: x 2-d float, w float8 (N, K) with :func:`supports` true for K, ``N`` float
    scales (any shape) and an (N,) float bias or None, all on the CPU."""
    library = cpu_vnni_mm._loaded_library()
    leading = (FORMATS[w.dtype], cpu_vnni_mm.FLOAT32_STORAGE)
    return _run_on_x(library.quanto_float8_weight_mm, leading, x, w, scale, bias)[1]


def dynamic_mm_prechecked(x, x_dtype, w, scale, bias=None):
    """The ``float8_dynamic_mm`` op's CPU kernel: x (M, K) quantized per row to the float8 ``x_dtype`` and
    dequantized (the IEEE operations of ``QTensor.quantize`` in x's dtype, then ``codes.float() * scale``),
    then :func:`float8_weight_mm`'s kernel, as float32 (M, N); None when x holds a NaN or an infinity. For
    the op, which has checked the arguments: float32, float16 or bfloat16 x, all on the CPU,
    :func:`supports` true for K."""
    library = cpu_vnni_mm._loaded_library()
    precision = cpu_vnni_mm.PRECISIONS[x.dtype]
    leading = (FORMATS[x_dtype], FORMATS[w.dtype], precision, cpu_vnni_mm.FLOAT32_STORAGE)
    bad_x, out = _run_on_x(library.quanto_float8_dynamic_mm, leading, x, w, scale, bias)
    return None if bad_x else out


def _run_on_x(kernel, leading, x, w, scale, bias):
    """``kernel(*leading, x, M, K, w, N, scale, bias, out, threads)`` on float32 contiguous copies where
    needed; returns its status and out (M, N) float32."""
    x, w = cpu_vnni_mm.contiguous_float32(x), w.contiguous()
    scale = cpu_vnni_mm.contiguous_float32(scale)
    bias = None if bias is None else cpu_vnni_mm.contiguous_float32(bias)
    out = torch.empty((x.shape[0], w.shape[0]), dtype=torch.float32)  # whatever torch's default dtype
    sizes = (x.data_ptr(), x.shape[0], x.shape[1], w.data_ptr(), w.shape[0], scale.data_ptr())
    bias_pointer = None if bias is None else bias.data_ptr()
    status = cpu_vnni_mm._run(kernel, *leading, *sizes, bias_pointer, out.data_ptr(), torch.get_num_threads())
    return status, out
