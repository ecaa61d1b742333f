"""The weight-only ops' C++ CPU kernels (quanto_fx/kernels/cpu_native_ops.cpp): registered with torch's
dispatcher when the kernel library loads, they serve the calls the kernels take as they are, with the Python
implementation's results bit for bit, and hand every other call to that implementation."""

from __future__ import annotations

import resource

import pytest
import torch

from quanto_fx.kernels import cpu_vnni_mm, weight_only
from quanto_fx.tensor.packing import pack

from .utils import WEIGHT_ONLY_TOLERANCE, assert_close_to_max

OPS = ("quanto_fx::int8_weight_mm", "quanto_fx::lowbit_weight_mm", "quanto_fx::float8_weight_mm")
pytestmark = pytest.mark.skipif(not cpu_vnni_mm.available(), reason="needs the CPU kernel library")


@pytest.fixture
def python_calls(monkeypatch):
    """The ops' Python implementations that ran: each begins by checking its arguments."""
    calls = []
    for name in ("_check_per_channel_weight_args", "_check_lowbit_args"):
        original = getattr(weight_only, name)

        def counting(*args, original=original):
            calls.append(original.__name__)
            return original(*args)

        monkeypatch.setattr(weight_only, name, counting)
    return calls


def _int8(n, k):
    return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, 1) * 0.01 + 0.001


def _lowbit(n, k, bits, group_size):
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    return pack(codes, bits), torch.randn(k // group_size, n, 2) * 0.01


def test_the_library_registers_cpu_kernels_for_the_three_ops():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


@pytest.mark.parametrize("m", [1, 3, 16, 200])  # 200: past INT8_VNNI_MAX_M, a weight below _int_mm's size
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_calls_are_served_in_cpp_as_python_computes_them(python_calls, m, dtype, with_bias):
    torch.manual_seed(m)
    w, scale = _int8(40, 256)
    x, bias = torch.randn(m, 256).to(dtype), torch.randn(40) if with_bias else None
    out = weight_only.int8_weight_mm(x, w, scale, bias)
    assert not python_calls
    assert torch.equal(out, weight_only.int8_weight_mm_torch(x, w, scale, bias))


@pytest.mark.parametrize("bits, group_size", [(4, 128), (4, 32), (2, 64)])
@pytest.mark.parametrize("m", [1, 2, 5])  # the GEMV, the GEMM
def test_lowbit_calls_are_served_in_cpp_as_python_computes_them(python_calls, bits, group_size, m):
    torch.manual_seed(m * bits)
    packed, scale_zeros = _lowbit(36, 256, bits, group_size)
    x, bias = torch.randn(m, 256), torch.randn(36)
    out = weight_only.lowbit_weight_mm(x, packed, scale_zeros, None, bits, group_size, bias)
    assert not python_calls
    expected = weight_only.lowbit_weight_mm_torch(x, packed, scale_zeros, None, bits, group_size, bias)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("m", [1, 9])  # the GEMV, the GEMM
def test_float8_calls_are_served_in_cpp_as_python_computes_them(python_calls, dtype, m):
    torch.manual_seed(m)
    w, scale = (torch.randn(24, 96) * 0.5).to(dtype), torch.rand(24, 1) + 0.5
    x, bias = torch.randn(m, 96), torch.randn(24)
    out = weight_only.float8_weight_mm(x, w, scale, bias)
    assert not python_calls
    assert torch.equal(out, weight_only.float8_weight_mm_torch(x, w, scale, bias))


def _nan_row(x):
    x = x.clone()
    x[0, 1] = float("nan")
    return x


def _16_bit_layer(m, k, n, dtype):
    """x, per-channel scales and a bias in a 16-bit model's dtype; the bias holds a NaN, an infinity and a
    value past float16's range (65504): the output's conversion must keep them."""
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n)
    bias[:3] = torch.tensor([float("nan"), float("inf"), 1e5])
    return x, (torch.rand(n, 1) * 0.01 + 0.001).to(dtype), bias.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, k, n", [(1, 96, 24), (3, 256, 40), (40, 2048, 2048)])  # 2048: threads convert
def test_16_bit_tensors_are_converted_in_cpp_as_torch_converts_them(python_calls, dtype, m, k, n):
    """x, the scales and the bias of a 16-bit model are widened to float32 in C++ (x a row at a time inside
    the float8 GEMM, here at M = 40), and the float32 result rounded back to x's dtype, bit for bit as the
    Python implementation's Tensor.to calls do."""
    torch.manual_seed(m)
    x, scale, bias = _16_bit_layer(m, k, n, dtype)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    packed, scale_zeros = _lowbit(n, k, 4, 32)
    w_float8 = (torch.randn(n, k) * 0.5).to(torch.float8_e4m3fn)
    w_e5m2 = (torch.randn(n, k) * 0.5).to(torch.float8_e5m2)
    # codes below 2**-6: the float16 GEMM's blocks of them need all of x in float32 (widened first)
    w_e5m2_small = (torch.randn(n, k) * 1e-3).to(torch.float8_e5m2)
    calls = [
        (weight_only.int8_weight_mm, weight_only.int8_weight_mm_torch, (x, w8, scale, bias)),
        (weight_only.float8_weight_mm, weight_only.float8_weight_mm_torch, (x, w_float8, scale, bias)),
        (weight_only.float8_weight_mm, weight_only.float8_weight_mm_torch, (x, w_e5m2, scale, bias)),
        (weight_only.float8_weight_mm, weight_only.float8_weight_mm_torch, (x, w_e5m2_small, scale, bias)),
        (
            weight_only.lowbit_weight_mm,
            weight_only.lowbit_weight_mm_torch,
            (x, packed, scale_zeros.to(dtype), None, 4, 32, bias),
        ),
    ]
    outs = [op(*args) for op, _, args in calls]
    assert not python_calls
    for out, (_, python_implementation, args) in zip(outs, calls):
        assert out.dtype == dtype
        torch.testing.assert_close(out, python_implementation(*args), rtol=0, atol=0, equal_nan=True)


def test_a_16_bit_x_that_float16_cannot_scale_takes_the_float32_gemm(python_calls):
    """A bfloat16 row too small for the float16 GEMM (max |x| < 1e-30) sends the call to the float32 GEMM on
    all of x widened: the Python implementation's result bit for bit all the same."""
    torch.manual_seed(0)
    x, scale, bias = _16_bit_layer(40, 256, 24, torch.bfloat16)
    x[30] *= 1e-35
    w = (torch.randn(24, 256) * 0.5).to(torch.float8_e4m3fn)
    out = weight_only.float8_weight_mm(x, w, scale, bias)
    assert not python_calls
    expected = weight_only.float8_weight_mm_torch(x, w, scale, bias)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


def test_workspaces_are_reused_across_calls_without_page_faults():
    """The kernels' workspaces (here: x's float16 rows, 1 MB, the threads' row buffers and the float32 output)
    come back from the blocks the thread's earlier calls freed, not as new memory: that had taken ~1900 page
    faults and 3x the call's time (cpu_simd.h: aligned_workspace)."""
    x, scale, bias = _16_bit_layer(4096, 128, 128, torch.bfloat16)
    w = (torch.randn(128, 128) * 0.5).to(torch.float8_e4m3fn)
    weight_only.float8_weight_mm(x, w, scale, bias)  # the first call allocates them
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        weight_only.float8_weight_mm(x, w, scale, bias)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5 < 300


@pytest.mark.parametrize(
    "case",
    [
        "x not finite",  # the kernel's status 1: the float path propagates it
        "in-features not a multiple of 32",
        "more rows than the int8 VNNI kernels take at this weight size",
        "float64 scales",
        "switched off",
    ],
)
def test_other_int8_calls_go_to_the_python_implementation(python_calls, monkeypatch, case):
    torch.manual_seed(0)
    many_rows = case == "more rows than the int8 VNNI kernels take at this weight size"
    k = 100 if case == "in-features not a multiple of 32" else 2048 if many_rows else 256
    w, scale = _int8(cpu_vnni_mm.INT_MM_MIN_WEIGHT_BYTES // k if many_rows else 16, k)  # torch._int_mm's
    x = torch.randn(cpu_vnni_mm.INT8_VNNI_MAX_M + 1 if many_rows else 2, k)
    if case == "x not finite":
        x = _nan_row(x)
    if case == "float64 scales":
        scale = scale.double()
    if case == "switched off":
        monkeypatch.setenv(cpu_vnni_mm.ENABLE_VARIABLE, "0")
    out = weight_only.int8_weight_mm(x, w, scale)
    assert python_calls
    expected = weight_only.int8_weight_mm_torch(x, w, scale)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.nan_to_num(), expected.nan_to_num())
    # and that implementation is right: x's NaN row stays NaN, the others match the float reference (aten's
    # bf16 kernels at worst, WEIGHT_ONLY_TOLERANCE)
    reference = weight_only.per_channel_weight_mm_reference(x.double(), w, scale.double())
    finite = slice(1, None) if case == "x not finite" else slice(None)
    assert case != "x not finite" or out[0].isnan().all()
    assert_close_to_max(out[finite].double(), reference[finite], WEIGHT_ONLY_TOLERANCE)


def test_errors_are_raised_by_the_python_implementation():
    w, scale = _int8(16, 128)
    with pytest.raises(ValueError, match="x has 96 features but the weight takes 128"):
        weight_only.int8_weight_mm(torch.randn(1, 96), w, scale)
    packed, scale_zeros = _lowbit(16, 128, 4, 32)
    with pytest.raises(ValueError, match="group"):
        weight_only.lowbit_weight_mm(torch.randn(1, 128), packed, scale_zeros, None, 4, 48)
    with pytest.raises(TypeError, match="float8"):
        weight_only.float8_weight_mm(torch.randn(1, 128), w, scale)


def test_other_lowbit_and_float8_calls_go_to_the_python_implementation(python_calls, monkeypatch):
    torch.manual_seed(0)
    packed, scale_zeros = _lowbit(16, 256, 4, 128)
    x = _nan_row(torch.randn(2, 256))
    out = weight_only.lowbit_weight_mm(x, packed, scale_zeros, None, 4, 128)
    assert python_calls == ["_check_lowbit_args"] and out[0].isnan().all() and not out[1].isnan().any()
    monkeypatch.setenv(cpu_vnni_mm.ENABLE_VARIABLE, "0")
    w, scale = (torch.randn(16, 64) * 0.5).to(torch.float8_e4m3fn), torch.rand(16)
    x = torch.randn(1, 64)
    out = weight_only.float8_weight_mm(x, w, scale)
    assert python_calls[-1] == "_check_per_channel_weight_args"
    assert torch.equal(out, weight_only.per_channel_weight_mm_reference(x, w, scale))


@pytest.mark.parametrize("bits, group_size", [(4, 48), (2, 48), (4, 8)])
def test_group_sizes_the_python_implementation_refuses_are_not_served(bits, group_size):
    """Groups the kernels could compute (whole 32-bit words dividing K) but that are not powers of two >= 16:
    refused, as under torch.compile and before the library loads."""
    packed, scale_zeros = _lowbit(16, 96, bits, group_size)
    with pytest.raises(ValueError, match="group_size must be a power of two >= 16"):
        weight_only.lowbit_weight_mm(torch.randn(1, 96), packed, scale_zeros, None, bits, group_size)
