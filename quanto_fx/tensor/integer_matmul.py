"""Exact int8 x int8 -> int32 matrix products on any device, through ``aten._int_mm`` where it applies."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# cuBLAS int8 GEMM (behind aten._int_mm on CUDA) requires M > 16 and K, N multiples of 8. An H200 run also
# refused (17, 104) @ (104, 40) with CUBLAS_STATUS_NOT_SUPPORTED: M is padded to a multiple of 8 as well and
# b is passed column-major, the layout cuBLASLt's int8 kernels take.
_CUDA_MIN_M = 24
_CUDA_MULTIPLE = 8


# An int8 x int8 product is at most 128 * 128 in magnitude, so int32 sums of K of them cannot overflow while
# K * 128 * 128 <= 2**31 - 1, i.e. K <= 131,071.
MAX_K = (2**31 - 1) // (128 * 128)


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def check_int8_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    """Raise unless ``a`` (M, K) and ``b`` (K, N) are int8 matrices on one device with K <= MAX_K."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_mm expects int8 operands, got {a.dtype} and {b.dtype}")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"int8_mm: incompatible shapes {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"int8_mm: operands on different devices ({a.device} and {b.device})")
    if a.shape[1] > MAX_K:
        raise ValueError(
            f"int8_mm: K={a.shape[1]} exceeds {MAX_K}, beyond which int32 accumulation could overflow"
        )


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for int8 matrices ``a`` (M, K) and ``b`` (K, N), accumulated exactly in int32.

    Exact for K <= MAX_K (131,071), where no int32 sum can overflow; a larger K is refused. On CUDA the
    operands are zero-padded to the shapes cuBLAS accepts (zeros add nothing to the sums) and the result is
    sliced back, so any shape works.
    """
    check_int8_operands(a, b)
    return int8_gemm(a, b)


def int8_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``int8_mm`` without the argument checks, for callers that ran ``check_int8_operands`` already."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or k == 0 or n == 0:
        return torch.zeros(m, n, dtype=torch.int32, device=a.device)
    if a.device.type == "cuda":
        pm = max(_round_up(m, _CUDA_MULTIPLE), _CUDA_MIN_M)
        pk, pn = _round_up(k, _CUDA_MULTIPLE), _round_up(n, _CUDA_MULTIPLE)
        if (pm, pk, pn) != (m, k, n):
            a = F.pad(a, (0, pk - k, 0, pm - m))
            b = F.pad(b, (0, pn - n, 0, pk - k))
        out = torch._int_mm(a.contiguous(), b.t().contiguous().t())
        return out[:m, :n] if (pm, pn) != (m, n) else out
    if a.device.type == "cpu":
        if k == 1:
            # torch 2.13's CPU _int_mm returns wrong sums for K == 1 and N > 1 (found by tests/test_fuzz.py):
            # a zero column pads K to 2 and adds nothing.
            a, b = F.pad(a, (0, 1)), F.pad(b, (0, 0, 0, 1))
        return torch._int_mm(a, b)
    # Other devices: exact int32 through a widened matmul where the backend has one.
    return torch.mm(a.to(torch.int32), b.to(torch.int32))
