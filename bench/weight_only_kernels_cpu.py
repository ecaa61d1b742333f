"""The CPU weight-only kernels alone: the C entry points of quanto_fx/kernels/cpu_vnni_mm.cpp and
cpu_float8_mm.cpp called through ctypes, as a ratio to fp32 ``F.linear`` on the same layer, all timed
round-robin in one process; optionally against the same kernels built from another git revision, loaded side
by side.

    .venv/bin/python bench/weight_only_kernels_cpu.py [--layers 384,1536 1536,384] [--rows 1 2 3 4 8]
        [--formats int8 int4 int2 e4m3fn e5m2] [--threads 2] [--against REV] [--repeats 15] [--cold]

What the module and op timings (small_layers.py, weight_only.py) add on top is left out: Python, the
dispatcher and the op's checks. The ctypes call itself costs ~0.9 us, about what ``F.linear``'s own call
costs. ``--against REV`` builds REV's kernel sources with this checkout's compiler flags; REV must have the
same two C entry points (each gained an ``x_storage`` argument in the tenth session, float8's in 24f6804:
the revision's sources say which signature to call). Needs AVX512-VNNI and a C++ compiler, as the kernels
do.

Each function is called back to back, so a weight that fits the last-level cache is read from there. With
``--cold`` each one turns instead through copies of its weight (fp32's included) that add up to
``COLD_BYTES``: every call reads its weight from memory, as in decoding a model whose layers outgrow the
caches.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import itertools
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from quanto_fx import freeze, qfloat8_e4m3fn, qfloat8_e5m2, qint2, qint4, qint8, quantize
from quanto_fx.kernels import cpu_vnni_mm

ROOT = Path(__file__).resolve().parent.parent
FORMATS = {"int8": qint8, "int4": qint4, "int2": qint2, "e4m3fn": qfloat8_e4m3fn, "e5m2": qfloat8_e5m2}
ROUND_SECONDS = 2e-3  # each function's share of a round: enough calls to outlast the timer's resolution
COLD_BYTES = 128 << 20  # --cold: each function's copies of its weight, past any CPU's last-level cache


def build_revision(revision: str, scratch: Path) -> Path:
    """The kernel library compiled from ``revision``'s sources (``git show``), with this checkout's flags."""
    names = [path.name for path in [*cpu_vnni_mm.SOURCES, *cpu_vnni_mm.HEADERS]]
    for name in names:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{revision}:quanto_fx/kernels/{name}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (scratch / name).write_text(source)
    target = scratch / "kernels.so"
    sources = [str(scratch / path.name) for path in cpu_vnni_mm.SOURCES]
    flags = [*cpu_vnni_mm.FLAGS, *cpu_vnni_mm._torch_flags(), "-ltorch_cpu"]
    build = subprocess.run(
        [cpu_vnni_mm._compiler(), *sources, *flags, "-o", str(target)], capture_output=True, text=True
    )
    if build.returncode:
        raise SystemExit(f"building {revision}'s kernels failed:\n{build.stderr[-3000:]}")
    return target


def takes_x_storage(sources: Path) -> dict:
    """For the kernel sources in ``sources``: whether each entry point takes an ``x_storage`` argument."""
    vnni, float8 = ((sources / name).read_text() for name in ("cpu_vnni_mm.cpp", "cpu_float8_mm.cpp"))
    return {
        "quanto_weight_mm": "int quanto_weight_mm(int bits, int x_storage" in vnni,
        "quanto_float8_weight_mm": "int quanto_float8_weight_mm(int format, int x_storage" in float8,
    }


def load(path: Path, x_storage: dict) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for name, tail in (("quanto_weight_mm", [size]), ("quanto_float8_weight_mm", [])):
        leading = [ctypes.c_int] * (2 if x_storage[name] else 1)
        getattr(library, name).argtypes = [*leading, pointer, size, size, pointer, size, pointer, *tail]
        getattr(library, name).argtypes += [pointer, pointer, ctypes.c_int]
    return library


def kernel_call(library: ctypes.CDLL, x_storage: dict, name: str, weight, x, bias, out, threads: int):
    """A no-argument call of ``library``'s kernel for ``weight`` (a frozen quanto_fx weight) on ``x``
    (float32), into ``out``; ``x_storage``: which entry points take x's storage (:func:`takes_x_storage`).
    It passes raw pointers: the caller keeps every tensor alive while it is called."""
    rows, in_features = x.shape
    out_features = bias.shape[0]
    tail = (bias.data_ptr(), out.data_ptr(), threads)

    def head(entry_point):
        storage = [cpu_vnni_mm.FLOAT32_STORAGE] if x_storage[entry_point] else []
        return (*storage, x.data_ptr(), rows, in_features)

    if name in ("int4", "int2"):
        groups = weight._scale_zeros.shape[0]
        data = (weight._packed.data_ptr(), out_features, weight._scale_zeros.data_ptr(), groups)
        args = (weight.qtype.bits, *head("quanto_weight_mm"), *data, *tail)
        return lambda: library.quanto_weight_mm(*args)
    if name == "int8":
        data = (weight._data.data_ptr(), out_features, weight._scale.data_ptr(), 1)
        args = (8, *head("quanto_weight_mm"), *data, *tail)
        return lambda: library.quanto_weight_mm(*args)
    data = (weight._data.data_ptr(), out_features, weight._scale.data_ptr())
    args = (0 if name == "e4m3fn" else 1, *head("quanto_float8_weight_mm"), *data, *tail)
    return lambda: library.quanto_float8_weight_mm(*args)


def copies(tensor_bytes: int, cold: bool) -> int:
    """How many copies of a weight of ``tensor_bytes`` a function turns through (1: called warm)."""
    return max(1, -(-COLD_BYTES // tensor_bytes)) if cold else 1


def in_turn(functions: list):
    """One no-argument function calling ``functions`` one after the other, a call each time."""
    turn = itertools.cycle(functions)
    return lambda: next(turn)()


def median_us(functions: dict, repeats: int) -> dict:
    """Median us per call of each function over ``repeats`` round-robin rounds, each function's timed calls
    of a round after one untimed call: its first call after the other functions' found its weight evicted
    (the first function after fp32's 64 MB, int8 at 4096 x 4096 and M = 1: 0.22x against 0.16x for the same
    code timed after it)."""
    calls = {}
    for name, function in functions.items():
        function()
        start = time.perf_counter()
        function()
        calls[name] = max(5, int(ROUND_SECONDS / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            function()
            start = time.perf_counter()
            for _ in range(calls[name]):
                function()
            samples[name].append((time.perf_counter() - start) / calls[name] * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="*", default=["384,1536", "1536,384"], help="in,out pairs")
    parser.add_argument("--rows", nargs="*", type=int, default=[1, 2, 3, 4, 8], help="values of M")
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--against", default=None, help="a git revision whose kernels to time alongside")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cold", action="store_true", help="every call reads its weight from memory")
    args = parser.parse_args()
    if not cpu_vnni_mm.available():
        raise SystemExit("the CPU kernels are not available here (AVX512-VNNI and a C++ compiler needed)")
    torch.set_num_threads(args.threads)
    # (library, its entry points' x_storage arguments)
    libraries = {"now": (cpu_vnni_mm._loaded_library(), takes_x_storage(cpu_vnni_mm.SOURCES[0].parent))}
    with tempfile.TemporaryDirectory() as scratch:
        if args.against is not None:
            built = build_revision(args.against, Path(scratch))
            x_storage = takes_x_storage(Path(scratch))
            libraries = {args.against: (load(built, x_storage), x_storage), **libraries}
        weights_from = "weights from memory" if args.cold else "called back to back"
        print(
            f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} rounds; "
            f"kernel time / fp32 F.linear time; {weights_from}"
        )
        for layer in args.layers:
            in_features, out_features = map(int, layer.split(","))
            torch.manual_seed(0)
            linear = torch.nn.Linear(in_features, out_features)
            group_size = 128 if in_features % 128 == 0 else 64
            weights = {}
            for name in args.formats:
                options = {"group_size": group_size} if name in ("int4", "int2") else {}
                frozen = freeze(
                    quantize(linear, weights=FORMATS[name], activations=None, inplace=False, **options)
                )
                count = copies(frozen.weight.nbytes_in_memory(), args.cold)
                for tag in libraries:  # cold: copies of their own (another's recent calls left theirs cached)
                    weights[name, tag] = [copy.deepcopy(frozen.weight) for _ in range(count)]
            bias = linear.bias.detach()
            count = copies(4 * linear.weight.numel(), args.cold)
            fp32_weights = [linear.weight.detach().clone() for _ in range(count)]
            print(f"\n{in_features} -> {out_features}" + "".join(f"{f'M = {m}':>9}" for m in args.rows))
            table = {"fp32 (us)": []}
            for rows in args.rows:
                x, out = torch.randn(rows, in_features), torch.empty(rows, out_features)
                functions = {"fp32": in_turn([functools.partial(F.linear, x, w, bias) for w in fp32_weights])}
                for name in args.formats:
                    for tag, (library, x_storage) in libraries.items():
                        calls = [
                            kernel_call(library, x_storage, name, weight, x, bias, out, args.threads)
                            for weight in weights[name, tag]
                        ]
                        functions[(name, tag)] = in_turn(calls)
                times = median_us(functions, args.repeats)
                table["fp32 (us)"].append(times["fp32"])
                for key, value in times.items():
                    if key != "fp32":
                        label = key[0] if len(libraries) == 1 else f"{key[0]} {key[1]}"
                        table.setdefault(label, []).append(value / times["fp32"])
            for label, values in table.items():
                cells = "".join(f"{v:>9.1f}" if label == "fp32 (us)" else f"{v:>9.2f}" for v in values)
                print(f"  {label:<16}{cells}")


if __name__ == "__main__":
    main()
