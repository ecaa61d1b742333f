"""Shared test helpers: float references and error measures."""

import torch


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; int8 typically gives > 35 dB)."""
    reference, approx = reference.detach().double(), approx.detach().double()
    noise = (reference - approx).pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(reference.pow(2).mean() / noise))


def dequantized(x):
    """The float value of a QTensor without autograd (a plain tensor passes through)."""
    return x._data.to(x.dtype) * x._scale if hasattr(x, "_data") else x
