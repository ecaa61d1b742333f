"""CPU float8 weight-only GEMMs: the C++ kernels of ``cpu_float8_mm.cpp``.

torch converts float8 to float32 element by element on the CPU (~55 ms for a 4096 x 4096 weight on a 2-core
Xeon), which made float8 weights 2 to 30x slower than the fp32 GEMM. The kernels convert 32 codes in a few
vector instructions through float16 (exact for every code, NaN included):
- ``float8_weight_mm``: a GEMV for small M (each weight chunk converted once per 4 rows of x), else a GEMM
  (each block of 32 weight rows converted once into a float32 panel that every row of x runs over with
  broadcast FMAs, as a float GEMM's micro-kernel does). 4096 x 4096 against the fp32 GEMM (2-core Xeon):
  0.4x at M = 1, 0.6x at 8 to 16, 0.8x at 64, ~0.9-1.0x from 128 (bench/RESULTS.md).

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


def _check_weight(w: torch.Tensor, scale: torch.Tensor) -> None:
    """What the C++ side reads, checked (it trusts every index)."""
    if w.dtype not in FORMATS or w.ndim != 2 or not w.is_contiguous() or w.device.type != "cpu":
        raise ValueError(f"w must be a contiguous 2-d float8 CPU tensor, got {w.dtype} {tuple(w.shape)}")
    if scale.dtype != torch.float32 or not scale.is_contiguous() or tuple(scale.shape) != w.shape[:1]:
        raise ValueError(
            f"scale must be a contiguous float32 ({w.shape[0]},) tensor, got {tuple(scale.shape)}"
        )


# The GEMV up to this M, the GEMM past it (4096 x 4096 e4m3, x fp32 time: GEMV 0.48 / 0.82 / 0.64-0.70 at
# M = 4 / 6 / 8, GEMM 0.74 / 1.00 / 0.56-0.60).
GEMV_MAX_M = 7


def float8_weight_mm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (w * scale).T`` as float32 (M, N): the GEMV or the GEMM by M (see the module docstring).

    Args:
        x: (M, K) contiguous float32; w: contiguous float8 (N, K); scale: contiguous float32 (N,).
    """
    _check_weight(w, scale)
    if not supports(w.shape[1]):
        raise ValueError(f"no float8 kernel for {w.shape[1]} input features on this machine")
    cpu_vnni_mm._check_on_cpu(x, w, scale)
    if x.dtype != torch.float32 or x.ndim != 2 or not x.is_contiguous() or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"x must be a contiguous float32 (M, {w.shape[1]}) tensor, got {x.dtype} {tuple(x.shape)}"
        )
    library = cpu_vnni_mm._loaded_library()
    kernel = library.quanto_float8_gemv if x.shape[0] <= GEMV_MAX_M else library.quanto_float8_gemm
    out = torch.empty((x.shape[0], w.shape[0]))
    cpu_vnni_mm._run(
        kernel,
        FORMATS[w.dtype],
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        w.data_ptr(),
        w.shape[0],
        scale.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out
