"""Compiled formats on a small MLP (384 -> 1536 -> ReLU -> 384) on the CPU, in float32, bfloat16 or float16:
each quanto_fx format frozen and compiled with backend="quanto" against the float model compiled by inductor,
at M = 1, 16 and 256 rows.

    .venv/bin/python bench/compiled_mlp.py [--repeats 7] [--dtype bfloat16] [--rows 1 16 256]

All variants of a dtype and M are timed round-robin in one process (``linear.measure``); the table gives
each one's time as a ratio to the float model compiled by inductor, and that model's time in microseconds.
The eager float8 dynamic model is listed too: compiled, a small model pays dynamo's guards on every call.
"""

from __future__ import annotations

import argparse

import torch
from linear import measure

import quanto_fx.backend  # noqa: F401  (registers backend="quanto")
from quanto_fx import freeze, qfloat8_e4m3fn, qint4, qint8, quantize

# Every variant compiles the same forward (nn.Sequential's): more cache entries than dynamo's default limit,
# and each M keeps a graph of static shapes, as a model compiled for one batch size has (without this, the
# recompile for the second M would make M dynamic).
torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.automatic_dynamic_shapes = False


def variants(dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.ReLU(), torch.nn.Linear(1536, 384))
    model = model.to(dtype).eval()

    def frozen(**settings):
        return freeze(quantize(model, inplace=False, **settings))

    float8_dynamic = {"weights": qfloat8_e4m3fn, "activations": qfloat8_e4m3fn, "activation_mode": "dynamic"}
    compiled = {
        "int8 weights": frozen(weights=qint8, activations=None),
        "int4 weights": frozen(weights=qint4, activations=None),
        "e4m3fn weights": frozen(weights=qfloat8_e4m3fn, activations=None),
        "int8 dyn": frozen(weights=qint8, activations=qint8, activation_mode="dynamic"),
        "e4m3fn dyn": frozen(**float8_dynamic),
    }
    out = {"fp32": torch.compile(model)}  # the float baseline, whatever its dtype (linear.measure's key)
    out.update({name: torch.compile(q, backend="quanto") for name, q in compiled.items()})
    out["e4m3fn dyn, eager"] = frozen(**float8_dynamic)
    return out


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--rows", nargs="*", type=int, default=[1, 16, 256], help="values of M")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs")
    print(f"ratio to the {args.dtype} model compiled by inductor (its time in us)")
    models = variants(dtype)
    ratios = {name: [] for name in models}
    with torch.no_grad():
        for m in args.rows:
            x = torch.randn(m, 384, dtype=dtype)
            medians, _ = measure({name: (lambda f=f: f(x)) for name, f in models.items()}, args.repeats)
            for name in models:
                ratios[name].append(
                    1e3 * medians[name] if name == "fp32" else medians[name] / medians["fp32"]
                )
    print(f"{'':<22}" + "".join(f"{f'M = {m}':>10}" for m in args.rows))
    for name, values in ratios.items():
        label = f"{args.dtype} inductor (us)" if name == "fp32" else name
        print(f"{label:<22}" + "".join(f"{v:>10.1f}" if name == "fp32" else f"{v:>10.2f}" for v in values))


if __name__ == "__main__":
    main()
