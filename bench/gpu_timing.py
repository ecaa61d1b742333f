"""What the GPU scripts share: CUDA-graph timing, the error measure of their checks, and torch's int4 kernel
(tinygemm) as a peer."""

import torch
from triton.testing import do_bench_cudagraph

from quanto_fx.tensor import PackedQTensor
from quanto_fx.tensor.packing import unpack


def gpu_us(fn, rep: int = 50) -> float:
    """GPU time of ``fn`` in microseconds: CUDA-graph replays, no host overhead (``fn`` runs once first)."""
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=rep) * 1e3


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error of ``out`` as a fraction of ``ref``'s largest magnitude."""
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


def tinygemm(p: PackedQTensor):
    """``x -> x @ w.T`` by ``aten._weight_int4pack_mm`` for an int4 PackedQTensor ``p``: its codes in
    tinygemm's layout (uint8 (N, K / 2), even k in the high nibble), the same scales and zeros
    (``w = (q - 8) * scale + zero``, (K / G, N, 2)), in bfloat16."""
    codes = unpack(p._packed, 4).to(torch.int32)
    high_low = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    layout = torch.ops.aten._convert_weight_to_int4pack(high_low, 8)
    scale_zeros = p._scale_zeros.to(torch.bfloat16)
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, layout, p.group_size, scale_zeros)
