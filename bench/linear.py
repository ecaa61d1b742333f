"""Linear-layer benchmark on the CPU: fp32, bf16, the bare int8 GEMM floor, quanto_fx eager and compiled,
and the peers that are installed (torch.ao quantize_dynamic always; optimum-quanto and torchao optionally,
see bench/requirements.txt).

    .venv/bin/python bench/linear.py [--repeats 20] [--shapes 1,4096,4096 16,4096,4096 ...]

All variants of a shape are timed round-robin in one process (median ms per call; small layers in runs of
back-to-back calls, see ``SAMPLE_SECONDS``); ratios are to fp32 F.linear; "rel.err" is
||y - y_fp32|| / ||y_fp32||. Float32 inputs and outputs throughout.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
import warnings

import torch

import quanto_fx
from quanto_fx import calibration, freeze, quantize

SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096), (512, 1024, 4096)]


def variants(m: int, k: int, n: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(m, k)
    linear = torch.nn.Linear(k, n)
    xb, lb = x.bfloat16(), torch.nn.Linear(k, n).bfloat16()
    lb.load_state_dict(linear.state_dict())
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8).t()
    dynamic = freeze(quantize(linear, activation_mode="dynamic", inplace=False))
    static = quantize(linear, inplace=False)
    with torch.no_grad(), calibration():
        static(x)
    static = freeze(static)
    out = {
        "fp32": lambda: linear(x),
        "bf16": lambda: lb(xb).float(),
        "_int_mm s8s8 (floor)": lambda: torch._int_mm(a, b),
        "quanto_fx W8A8 dyn eager": lambda: dynamic(x),
        "quanto_fx W8A8 dyn quanto": torch.compile(lambda: dynamic(x), backend="quanto"),
        "quanto_fx W8A8 static quanto": torch.compile(lambda: static(x).dequantize(), backend="quanto"),
        "torch.ao quantize_dynamic": _ao_dynamic(linear, x),
    }
    out.update(_optional_peers(linear, x))
    return out


def _ao_dynamic(linear, x):
    warnings.filterwarnings("ignore", module="torch.ao")  # its deprecation notices, once per shape
    peer = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, torch.qint8)
    return lambda: peer(x)


def _optional_peers(linear, x) -> dict:
    peers = {}
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):
        from optimum.quanto import freeze as oq_freeze
        from optimum.quanto import qint8
        from optimum.quanto import quantize as oq_quantize

        model = torch.nn.Sequential(torch.nn.Linear(linear.in_features, linear.out_features))
        model.load_state_dict(torch.nn.Sequential(linear).state_dict())
        oq_quantize(model, weights=qint8, activations=None)
        oq_freeze(model)
        peers["optimum-quanto W8"] = lambda: model(x)
    if importlib.util.find_spec("torchao"):
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        model = torch.nn.Sequential(torch.nn.Linear(linear.in_features, linear.out_features))
        model.load_state_dict(torch.nn.Sequential(linear).state_dict())
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        compiled = torch.compile(model)
        peers["torchao int8-dyn compiled"] = lambda: compiled(x)
    return peers


# A sample is a run of back-to-back calls lasting about this long in fp32 (one call from 1 ms up). A model
# calls its layers back to back; a single timed call of a 30 us layer mostly measures the thread pool waking
# up and the caches the other variants left behind (384 x 1536 at M = 1, 2-core Xeon: fp32 70-90 us a single
# call, 30-40 us back to back).
SAMPLE_SECONDS = 1e-3


@torch.no_grad()
def measure(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median ms per call of each function, timed round-robin (every variant's samples interleaved), and the
    outputs of their first calls."""
    outputs = {name: fn() for name, fn in fns.items()}  # warm-up (compiles)
    for fn in fns.values():
        fn()
    start = time.perf_counter()
    fns["fp32"]()
    calls = max(1, round(SAMPLE_SECONDS / (time.perf_counter() - start)))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append(1e3 * (time.perf_counter() - start) / calls)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def relative_error(out, ref) -> float:
    if isinstance(out, quanto_fx.QTensor):
        out = out.dequantize()
    if out.dtype == torch.int32:
        return float("nan")
    return float((out.float() - ref).norm() / ref.norm())


def report(variants_of, shapes, repeats: int) -> None:
    """Time ``variants_of(m, k, n)`` for each shape and print ms, the ratio to fp32 and the relative error."""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats} runs")
    for m, k, n in shapes:
        medians, outputs = measure(variants_of(m, k, n), repeats)
        ref = outputs["fp32"]
        print(f"\n(M, K, N) = ({m}, {k}, {n})")
        print(f"  {'variant':<32}{'ms':>9}{'vs fp32':>9}{'rel.err':>10}")
        for name, ms in medians.items():
            error = relative_error(outputs[name], ref)
            print(f"  {name:<32}{ms:>9.3f}{ms / medians['fp32']:>9.3f}{error:>10.4f}")


def parse_args(doc: str, repeats: int, default_shapes) -> tuple[list, int]:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--shapes", nargs="*", default=None, help="M,K,N triples")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else default_shapes
    return shapes, args.repeats


def main() -> None:
    shapes, repeats = parse_args(__doc__, 20, SHAPES)
    report(variants, shapes, repeats)


if __name__ == "__main__":
    main()
