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

import argparse

import torch
from linear import measure

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
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shapes", nargs="*", default=None, help="M,K,N triples")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs")
    print(f"{'M, K, N':<18}{args.dtype + ' (ms)':>16}{'e4m3fn weights':>16}{'e4m3fn dyn':>12}")
    with torch.no_grad():
        for m, k, n in shapes:
            layer = modules(k, n, dtype)
            x = torch.randn(m, k, dtype=dtype)
            medians, _ = measure(
                {name: (lambda module=module: module(x)) for name, module in layer.items()}, args.repeats
            )
            ratios = [medians[name] / medians["fp32"] for name in ("e4m3fn weights", "e4m3fn dyn")]
            print(f"{f'{m}, {k}, {n}':<18}{medians['fp32']:>16.2f}{ratios[0]:>16.2f}{ratios[1]:>12.2f}")


if __name__ == "__main__":
    main()
