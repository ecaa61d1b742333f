"""Weight-only int8 / int4 / int2 layers at prefill sizes on the CPU (M = 512 to 4096 rows) against the float
``nn.Linear`` of the same dtype, eager, modules called back to back.

    .venv/bin/python bench/weight_only_prefill.py [--repeats 7] [--shapes 4096,4096,128 ...] [--dtype float16]

The companion of float8_prefill.py for the integer formats. In 16-bit models torch's float16 GEMM runs at
about the float32 GEMM's speed on AVX512-FP16 CPUs (bfloat16's at about half), so the kernels' handling of a
16-bit x (each row widened as it is split into byte planes) decides the ratio on narrow layers. All modules of
a shape are timed round-robin in one process (``linear.measure``); the table gives each one's time as a ratio
to the float module's, and the float module's time in ms.
"""

from __future__ import annotations

import prefill
import torch

from quanto_fx import freeze, qint2, qint4, qint8, quantize

SHAPES = [(4096, 4096, 128), (4096, 384, 128), (2048, 1536, 384), (512, 4096, 4096)]
FORMATS = {"int8": qint8, "int4": qint4, "int2": qint2}


def modules(k: int, n: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n).to(dtype)
    layer = {"fp32": linear}  # the float baseline, whatever its dtype (the key linear.measure calibrates on)
    for name, qtype in FORMATS.items():
        layer[name] = freeze(quantize(linear, weights=qtype, activations=None, inplace=False))
    return layer


def main() -> None:
    prefill.run(__doc__, SHAPES, modules, tuple(FORMATS), "float16")


if __name__ == "__main__":
    main()
