"""CPU float8 weight-only GEMMs: the C++ kernels of ``cpu_float8_mm.cpp``.

torch converts float8 to float32 element by element on the CPU (~55 ms for a 4096 x 4096 weight on a 2-core
Xeon), which made float8 weights 2 to 30x slower than the fp32 GEMM. The kernels convert 32 codes in a few
vector instructions through float16 (exact for every code, NaN included):
- ``float8_weight_gemv`` (small M): each weight chunk converted once and multiplied with up to 4 rows of x;
- ``float8_rows``: rows of the weight times their scales as float32, the blocks of the fp32 GEMM at larger M.

They are built into the library of ``cpu_vnni_mm.py`` and used where it is available (AVX512-VNNI CPU, a
C++ compiler, ``QUANTO_FX_CPU_KERNELS`` not ``0``); :func:`available` says so.
"""

from __future__ import annotations

import torch

from . import cpu_vnni_mm

FORMATS = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}


def available() -> bool:
    """Whether the float8 kernels run on this machine (they share the VNNI kernels' library)."""
    return cpu_vnni_mm.available()


def _check_weight(w: torch.Tensor, scale: torch.Tensor) -> None:
    """What the C++ side reads, checked (it trusts every index)."""
    if w.dtype not in FORMATS or w.ndim != 2 or not w.is_contiguous() or w.device.type != "cpu":
        raise ValueError(f"w must be a contiguous 2-d float8 CPU tensor, got {w.dtype} {tuple(w.shape)}")
    if scale.dtype != torch.float32 or not scale.is_contiguous() or tuple(scale.shape) != w.shape[:1]:
        raise ValueError(
            f"scale must be a contiguous float32 ({w.shape[0]},) tensor, got {tuple(scale.shape)}"
        )


def float8_weight_gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (w * scale).T`` as float32 (M, N), for small M (the weight is converted once per 4 rows of x).

    Args:
        x: (M, K) contiguous float32; w: contiguous float8 (N, K); scale: contiguous float32 (N,).
    """
    _check_weight(w, scale)
    if x.dtype != torch.float32 or x.ndim != 2 or not x.is_contiguous() or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"x must be a contiguous float32 (M, {w.shape[1]}) tensor, got {x.dtype} {tuple(x.shape)}"
        )
    out = torch.empty((x.shape[0], w.shape[0]))
    cpu_vnni_mm._library().quanto_float8_gemv(
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


def float8_rows(w: torch.Tensor, scale: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> None:
    """Write rows ``start:stop`` of ``w * scale`` as float32 into ``out``, a contiguous float32 (stop - start,
    K) tensor."""
    _check_weight(w, scale)
    if not 0 <= start <= stop <= w.shape[0]:
        raise ValueError(f"rows {start}:{stop} are not within the weight's {w.shape[0]} rows")
    shape = (stop - start, w.shape[1])
    if out.dtype != torch.float32 or not out.is_contiguous() or tuple(out.shape) != shape:
        raise ValueError(
            f"out must be a contiguous float32 {shape} tensor, got {out.dtype} {tuple(out.shape)}"
        )
    cpu_vnni_mm._library().quanto_float8_rows(
        FORMATS[w.dtype],
        w.data_ptr(),
        w.shape[1],
        scale.data_ptr(),
        start,
        stop,
        out.data_ptr(),
        torch.get_num_threads(),
    )
