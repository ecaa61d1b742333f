"""Shared test helpers: float references and error measures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when quanto_fx.kernels is imported: the
# Triton tests run their interpreted cases in a child pytest started with it set.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_passes_in_the_interpreter(test_file: str, *classes: str) -> None:
    """Run the test ``classes`` of ``test_file`` in a child pytest under TRITON_INTERPRET=1: all must pass,
    none may skip (a skip there would hide an interpreter that stopped running them)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *(f"{test_file}::{c}" for c in classes),
        ],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


def compile_for_sm90(kernel, pointer_types: dict, constexprs: dict, divisible=(), num_warps=4, num_stages=3):
    """``kernel`` (a ``@triton.jit`` function) compiled for an H100 (sm_90) without one, specialized as a
    launch specializes it: ``constexprs`` (block sizes, flags, strides equal to 1) become constants; every
    pointer (its element type from ``pointer_types``, e.g. "bf16", "u8"; "i8" if absent) and the ints named
    in ``divisible`` carry the hint that they are multiples of 16. Returns the compiled kernel
    (``.asm["ptx"]``, ``.metadata``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = "*" + pointer_types.get(name, "i8") if name.endswith("_ptr") else "i32"
        if name.endswith("_ptr") or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def config_id(config) -> str:
    """A readable pytest id for a triton.Config of the GEMM kernels."""
    kw = config.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}-w{config.num_warps}-s{config.num_stages}"


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """``||out - expected|| / ||expected||``, in float64."""
    return float((out.double() - expected.double()).norm() / expected.double().norm())


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


# aten's CPU weight-only kernels compute float32 inputs in bfloat16 (quanto_fx/kernels/weight_only.py): their
# results match a float32 reference to ~2**-9 of the output's magnitude; 1e-2 leaves room for accumulation.
WEIGHT_ONLY_TOLERANCE = 1e-2
# The VNNI CPU paths round x to 16-bit integers per row (quanto_fx/kernels/cpu_vnni_mm.py): ~3e-5 of the
# output, and inputs that differ in their last bits (compiled vs eager norms) may round one code apart.
VNNI_TOLERANCE = 2e-4


def assert_close_to_max(out: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """max |out - expected| <= tolerance * max |expected| (errors relative to the output's scale)."""
    error = float((out.double() - expected.double()).abs().max())
    scale = float(expected.double().abs().max())
    assert error <= tolerance * scale, f"max error {error:.3g} > {tolerance} x max |expected| {scale:.3g}"
