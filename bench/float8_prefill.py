"""float8 layers at prefill sizes on the CPU (M = 512 to 4096 rows): e4m3fn weight-only and e4m3fn weights
with dynamic e4m3fn activations against the float ``nn.Linear``, eager, modules called back to back.

    .venv/bin/python bench/float8_prefill.py [--repeats 7] [--shapes 4096,4096,128 ...] [--dtype float32]

Narrow layers (few outputs, N = 128) at large M are where the float16 GEMM of cpu_float8_mm.cpp gains least
on the float GEMM: its work per output is the float GEMM's, in float16, plus converting x's rows (and, with
dynamic activations, quantizing them), which a narrow layer shares among few outputs. All modules of a shape
are timed round-robin in one process (``linear.measure``); the table gives each one's time as a ratio to the
float module's, and the float module's time in ms.
"""

from __future__ import annotations

import prefill
import torch

from quanto_fx import freeze, qfloat8_e4m3fn, quantize

# (M, K, N): narrow outputs at K = 128, 384 and 4096, then wider layers
SHAPES = [
    (4096, 128, 128),
    (4096, 384, 128),
    (4096, 4096, 128),
    (2048, 1536, 384),
    (4096, 4096, 512),
    (512, 4096, 4096),
]


def modules(k: int, n: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n).to(dtype)
    dynamic = {"activations": qfloat8_e4m3fn, "activation_mode": "dynamic"}
    return {
        "fp32": linear,  # the float baseline, whatever its dtype (the key linear.measure calibrates on)
        "e4m3fn weights": freeze(quantize(linear, weights=qfloat8_e4m3fn, activations=None, inplace=False)),
        "e4m3fn dyn": freeze(quantize(linear, weights=qfloat8_e4m3fn, inplace=False, **dynamic)),
    }


def main() -> None:
    prefill.run(__doc__, SHAPES, modules, ("e4m3fn weights", "e4m3fn dyn"), "float32")


if __name__ == "__main__":
    main()
