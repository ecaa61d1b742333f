"""Small layers called back to back on the CPU: each frozen quanto_fx format's module against the fp32
``nn.Linear`` module, eager, at M = 1 to 8 rows: the weight-only formats, and int8 / float8 e4m3fn weights
with dynamic activations of the same format ("int8 dyn", "e4m3fn dyn"). ``--dtype bfloat16`` (or float16)
times a 16-bit model instead: every module and x in that dtype, the baseline its ``nn.Linear``.

    .venv/bin/python bench/small_layers.py [--repeats 15] [--layers 128,64 384,1536 ...] [--rows 1 2 3 4 6 8]
                                           [--dtype float32]

The case where "never slower than float" is hardest: a small layer's fp32 weight stays in the caches (MKL's
GEMM is then compute-bound, not memory-bound) and a call's fixed costs (Python, the op's dispatch, waking the
thread pool) weigh as much as its arithmetic. All modules of a layer and M are timed round-robin in one
process (``linear.measure``: median ms per call over runs of back-to-back calls); the table gives each
format's time as a ratio to the float module's, and the float module's time in microseconds.
"""

from __future__ import annotations

import argparse

import torch
from linear import measure

from quanto_fx import freeze, qfloat8_e4m3fn, qfloat8_e5m2, qint2, qint4, qint8, quantize

LAYERS = [(128, 64), (256, 256), (384, 384), (384, 1536), (1536, 384)]
ROWS = [1, 2, 3, 4, 6, 8]
FORMATS = {"int8": qint8, "int4": qint4, "int2": qint2, "e4m3fn": qfloat8_e4m3fn, "e5m2": qfloat8_e5m2}
DYNAMIC_FORMATS = {"int8 dyn": qint8, "e4m3fn dyn": qfloat8_e4m3fn}


def modules(in_features: int, out_features: int, dtype: torch.dtype) -> dict:
    """The float layer (key "fp32", whatever its dtype), its frozen weight-only copies (int4 / int2 groups of
    64 inputs where 128 does not divide the features) and its copies with dynamic activations."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features).to(dtype)
    group_size = 128 if in_features % 128 == 0 else 64
    out = {"fp32": linear}
    for name, qtype in FORMATS.items():
        options = {"group_size": group_size} if name in ("int4", "int2") else {}
        out[name] = freeze(quantize(linear, weights=qtype, activations=None, inplace=False, **options))
    for name, qtype in DYNAMIC_FORMATS.items():
        dynamic = {"activations": qtype, "activation_mode": "dynamic"}
        out[name] = freeze(quantize(linear, weights=qtype, inplace=False, **dynamic))
    return out


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--layers", nargs="*", default=None, help="in_features,out_features pairs")
    parser.add_argument("--rows", nargs="*", type=int, default=ROWS, help="values of M")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    layers = [tuple(int(v) for v in s.split(",")) for s in args.layers] if args.layers else LAYERS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs")
    print(f"{args.dtype} models: ratio of each format's module time to the {args.dtype} module's (in us)")
    for in_features, out_features in layers:
        layer = modules(in_features, out_features, dtype)
        print(f"\n{in_features} -> {out_features}  " + "".join(f"{f'M = {m}':>9}" for m in args.rows))
        ratios = {name: [] for name in layer}
        for m in args.rows:
            x = torch.randn(m, in_features, dtype=dtype)
            calls = {name: (lambda module=module: module(x)) for name, module in layer.items()}
            medians, _ = measure(calls, args.repeats)
            fp32 = medians["fp32"]
            for name in layer:
                ratios[name].append(medians[name] / fp32 if name != "fp32" else 1e3 * fp32)
        for name, values in ratios.items():
            cells = "".join(f"{v:>9.1f}" if name == "fp32" else f"{v:>9.2f}" for v in values)
            label = f"{args.dtype} (us)" if name == "fp32" else name
            print(f"  {label:<14}{cells}")


if __name__ == "__main__":
    main()
