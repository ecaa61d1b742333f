"""Weight-only linear benchmark on the CPU (memory-bound decoding, M = 1 to 16): fp32 and bf16 against
quanto_fx int8 / int4 / int2 / float8 weights, eager and compiled with backend="quanto", and the peers that
are installed (optimum-quanto, torchao; bench/requirements.txt).

    .venv/bin/python bench/weight_only.py [--repeats 30] [--shapes 1,4096,4096 16,4096,4096 ...]

All variants of a shape are timed round-robin in one process (median ms per call, see linear.py); ratios are
to fp32 F.linear; "rel.err" is ||y - y_fp32|| / ||y_fp32||. Float32 activations unless the name says bf16.
"""

from __future__ import annotations

import copy
import importlib.util

import torch
from linear import parse_args, report

from quanto_fx import freeze, qfloat8_e4m3fn, qfloat8_e5m2, qint2, qint4, qint8, quantize
from quanto_fx.kernels.weight_only import CPU_KERNEL_MAX_M
from quanto_fx.tensor.packing import unpack

SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096), (1, 384, 1536)]
# Every compiled variant is the same lambda (one code object): its dynamo cache holds an entry per format and
# shape, more than the default limit of 8, past which dynamo would run the later variants eagerly.
torch._dynamo.config.recompile_limit = 64
QUANTO_WEIGHTS = {
    "int8": qint8,
    "int4": qint4,
    "int2": qint2,
    "float8 e4m3fn": qfloat8_e4m3fn,
    "float8 e5m2": qfloat8_e5m2,
}


def variants(m: int, k: int, n: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(m, k)
    linear = torch.nn.Linear(k, n)
    lb = torch.nn.Linear(k, n).bfloat16()
    lb.load_state_dict(linear.state_dict())
    xb = x.bfloat16()
    # fp32 compiled by inductor: the baseline of the compiled variants (dynamo's guards and the compiled
    # wrapper cost every compiled call ~25-80 us here, which a small layer's eager fp32 call does not pay).
    # On its own copy of the weight: sharing fp32's, it kept that weight in the 260 MB L3 for fp32's next
    # call (fp32 at 4096 x 4096, M = 1: 1.6-2.0 ms instead of 2.5, where the other variants' weights evict
    # it, as the other layers' weights do in a model).
    compiled_fp32 = torch.compile(copy.deepcopy(linear))
    out = {"fp32": lambda: linear(x), "fp32 inductor": lambda: compiled_fp32(x)}
    out["bf16"] = lambda: lb(xb).float()
    for name, wqtype in QUANTO_WEIGHTS.items():
        q = freeze(quantize(linear, weights=wqtype, activations=None, inplace=False))
        out[f"quanto_fx {name} eager"] = lambda q=q: q(x)
        if name in ("int8", "int4", "float8 e4m3fn"):
            out[f"quanto_fx {name} quanto"] = torch.compile(lambda q=q: q(x), backend="quanto")
    qb = freeze(quantize(lb, weights=qint4, activations=None, inplace=False))
    out["quanto_fx int4 bf16 eager"] = lambda: qb(xb).float()
    if m <= CPU_KERNEL_MAX_M:
        out.update(_aten_kernels(linear, x))
    out.update(_optional_peers(linear, x))
    return out


def _aten_kernels(linear, x) -> dict:
    """aten's CPU weight-only kernels on the same weights (what quanto_fx ran before its VNNI kernels, and
    still runs where they do not apply): x in bfloat16, as they need to be fast."""
    xb = x.bfloat16()
    w8 = freeze(quantize(linear, weights=qint8, activations=None, inplace=False)).weight
    w4 = freeze(quantize(linear, weights=qint4, activations=None, inplace=False)).weight
    codes = unpack(w4._packed, 4).to(torch.int32)
    layout = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scale8, scale_zeros = w8._scale.reshape(-1).bfloat16(), w4._scale_zeros.bfloat16()
    return {
        "aten int8 (bf16 x)": lambda: torch.ops.aten._weight_int8pack_mm(xb, w8._data, scale8).float(),
        "aten int4 (bf16 x)": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            xb, layout, w4.group_size, scale_zeros
        ).float(),
    }


def _optional_peers(linear, x) -> dict:
    def copy():
        model = torch.nn.Sequential(torch.nn.Linear(linear.in_features, linear.out_features))
        model.load_state_dict(torch.nn.Sequential(linear).state_dict())
        return model

    peers = {}
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):
        from optimum.quanto import freeze as oq_freeze
        from optimum.quanto import qint4 as oq_int4
        from optimum.quanto import qint8 as oq_int8
        from optimum.quanto import quantize as oq_quantize

        for name, wqtype in (("W8", oq_int8), ("W4", oq_int4)):
            model = copy()
            oq_quantize(model, weights=wqtype, activations=None)
            oq_freeze(model)
            peers[f"optimum-quanto {name}"] = lambda model=model: model(x)
    if importlib.util.find_spec("torchao"):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = copy()
        quantize_(model, Int8WeightOnlyConfig())
        compiled = torch.compile(model)
        peers["torchao int8-wo compiled"] = lambda: compiled(x)
    return peers


def main() -> None:
    shapes, repeats = parse_args(__doc__, 30, SHAPES)
    report(variants, shapes, repeats)


if __name__ == "__main__":
    main()
