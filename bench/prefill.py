"""The table of float8_prefill.py and weight_only_prefill.py: quantized layers at prefill sizes against the
float ``nn.Linear`` of a dtype, eager, every module of a shape timed round-robin in one process
(``linear.measure``); each column is a module's time as a ratio to the float module's, whose own time is
given in ms."""

from __future__ import annotations

import argparse

import torch
from linear import measure


def run(doc: str, shapes: list, modules, columns: tuple, default_dtype: str) -> None:
    """Parse ``--repeats``, ``--shapes`` and ``--dtype``, and print the table for ``modules(k, n, dtype)``,
    a dict holding the float baseline under ``"fp32"`` (whatever its dtype) and a module per column."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shapes", nargs="*", default=None, help="M,K,N triples")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=default_dtype)
    args = parser.parse_args()
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    dtype = getattr(torch, args.dtype)
    widths = [max(8, len(name) + 2) for name in columns]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs")
    header = "".join(f"{name:>{width}}" for name, width in zip(columns, widths))
    print(f"{'M, K, N':<18}{args.dtype + ' (ms)':>16}{header}")
    with torch.no_grad():
        for m, k, n in shapes:
            layer = modules(k, n, dtype)
            x = torch.randn(m, k, dtype=dtype)
            medians, _ = measure(
                {name: (lambda module=module: module(x)) for name, module in layer.items()}, args.repeats
            )
            ratios = "".join(
                f"{medians[name] / medians['fp32']:>{width}.2f}" for name, width in zip(columns, widths)
            )
            print(f"{f'{m}, {k}, {n}':<18}{medians['fp32']:>16.2f}{ratios}")
