"""quanto_fx::int8_dynamic_mm / float8_dynamic_mm: x quantized per row to int8 / float8, times an int8 /
float8 weight, rescaled, in one op; on the CPU the C++ kernels (quanto_dynamic_int8_mm of cpu_vnni_mm.cpp,
quanto_float8_dynamic_mm of cpu_float8_mm.cpp) where they apply, the torch steps elsewhere."""

import pytest
import torch

from quanto_fx import QTensor
from quanto_fx.kernels import (
    cpu_float8_mm,
    cpu_vnni_mm,
    float8_dynamic_mm,
    int8_dynamic_mm,
    int8_mm_rescale_reference,
)
from quanto_fx.kernels.dynamic_mm import INT8_CPU_KERNEL_ERROR
from quanto_fx.kernels.float8_mm import float8_mm, float8_mm_reference

from .utils import assert_close_to_max

needs_kernels = pytest.mark.skipif(not cpu_vnni_mm.supports(8, 64), reason="needs the CPU kernel library")


def make_layer(m, k, n, *, positive=False, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x = x.abs() if positive else x  # a large mean: the kernel's float epilogue cancels the most
    w = QTensor.quantize(torch.randn(n, k, generator=g), axis=0)
    bias = torch.randn(n, generator=g)
    tensors = (x.to(dtype), w._data, w._scale, bias)
    return [t.to(device) for t in tensors]


def quantize_then_rescale(x, w, w_scale, bias):
    """The op's definition: QTensor.quantize's per-row int8 codes, then the int8 GEMM and rescale."""
    rows = QTensor.quantize(x, axis=0)
    return int8_mm_rescale_reference(rows._data, w.t(), rows._scale, w_scale.reshape(1, -1), bias, x.dtype)


# (M, K, N): the GEMV (M <= 2 at K <= 512, <= 6 above), the GEMM, M past INT8_VNNI_MAX_M (the torch steps),
# K not a multiple of the kernel's 32-byte chunks (the torch steps).
SHAPES = [(1, 128, 64), (2, 384, 96), (5, 1024, 40), (40, 256, 24), (130, 64, 16), (3, 48, 24)]


@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_quantizing_then_the_int8_gemm(shape, positive, device):
    args = make_layer(*shape, positive=positive, device=device)
    out = int8_dynamic_mm(*args)
    assert out.dtype == torch.float32 and out.shape == (shape[0], shape[2])
    # A code off by one would be off by ~1e-3 of the output's max: the tolerance checks the codes too.
    assert_close_to_max(out, quantize_then_rescale(*args), INT8_CPU_KERNEL_ERROR)


@needs_kernels
def test_the_kernel_error_bound_holds_at_the_largest_k_it_takes():
    k = cpu_vnni_mm.DYNAMIC_INT8_MAX_IN_FEATURES
    args = make_layer(2, k, 16, positive=True)
    assert_close_to_max(int8_dynamic_mm(*args), quantize_then_rescale(*args), INT8_CPU_KERNEL_ERROR)


HALF_DTYPES = [torch.float16, torch.bfloat16]


def rows_of_many_scales(m, k, dtype, seed=0):
    """16-bit x whose rows span magnitudes (bfloat16 down to subnormal values); random 16-bit quotients x /
    scale land on ties of the rounding to integers (and to float8) often."""
    g = torch.Generator().manual_seed(seed)
    exponents = torch.linspace(-20, 12, m) if dtype == torch.float16 else torch.linspace(-120, 120, m)
    x = torch.randn(m, k, generator=g) * torch.exp2(exponents)[:, None]
    x[0] = 0  # an all-zero row: the smallest normal scale
    return x.to(dtype)


@pytest.mark.parametrize("m", [3, 130])  # 130: past INT8_VNNI_MAX_M, the VNNI kernel at this weight size
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_16_bit_x_is_quantized_in_its_own_dtype(dtype, m, device):
    args = make_layer(m, 128, 32, dtype=dtype, device=device)
    out = int8_dynamic_mm(*args)
    assert out.dtype == dtype and out.shape == (m, 32)
    # the float32 results may round to neighbouring 16-bit values
    assert_close_to_max(out, quantize_then_rescale(*args), INT8_CPU_KERNEL_ERROR + torch.finfo(dtype).eps)


@needs_kernels
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cpu_kernel_quantizes_16_bit_x_as_quantize_does(dtype):
    """The C++ kernel computes a 16-bit x's scales and quotients rounded to its dtype as torch does: its
    float32 output (before the cast to x's dtype) is the reference's up to the float epilogue, far below one
    code's share; the op returns that output in x's dtype."""
    x = rows_of_many_scales(64, 256, dtype)
    _, w, w_scale, bias = make_layer(1, 256, 48)
    out = cpu_vnni_mm.dynamic_int8_mm_prechecked(x, w, w_scale, bias)
    rows = QTensor.quantize(x, axis=0)
    expected = int8_mm_rescale_reference(
        rows._data, w.t(), rows._scale, w_scale.reshape(1, -1), bias, torch.float32
    )
    for row in range(1, x.shape[0]):  # each row against its own magnitude
        assert_close_to_max(out[row], expected[row], INT8_CPU_KERNEL_ERROR)
    assert torch.equal(int8_dynamic_mm(x, w, w_scale, bias), out.to(dtype))


# The aten ops of a C++ kernel call: the output's allocation and, for 16-bit x, the conversions of x and of
# the output (the Python implementation would add the quantization's reductions and arithmetic).
NATIVE_CALL_OPS = {"aten::empty", "aten::to", "aten::_to_copy", "aten::empty_strided", "aten::copy_"}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_the_cpu_call_does_not_enter_python(dtype):
    """The op's C++ CPU kernel serves the common case: no aten op runs but the output's allocation (and for
    16-bit x the conversions)."""
    args = make_layer(1, 128, 64, dtype=dtype)
    with torch.profiler.profile() as profile:
        int8_dynamic_mm(*args)
    names = {event.name for event in profile.events()}
    allowed = {"aten::empty"} if dtype == torch.float32 else NATIVE_CALL_OPS
    assert names <= allowed | {"quanto_fx::int8_dynamic_mm"}, names


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_x_raises_as_quantize_does(bad):
    x, w, w_scale, bias = make_layer(2, 128, 16)
    x[1, 5] = bad
    with pytest.raises(ValueError, match="non-finite"):
        int8_dynamic_mm(x, w, w_scale, bias)


def test_zero_rows_and_zero_x():
    x, w, w_scale, bias = make_layer(3, 128, 16)
    assert int8_dynamic_mm(x[:0], w, w_scale, bias).shape == (0, 16)
    torch.testing.assert_close(int8_dynamic_mm(torch.zeros_like(x), w, w_scale, bias), bias.expand(3, 16))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: (a[0], a[1].float(), *a[2:]), TypeError, "int8"),
        (lambda a: (a[0][:, :64], *a[1:]), ValueError, "features"),
        (lambda a: (a[0], a[1], a[2][:5], a[3]), ValueError, "scale must hold 16"),
        (lambda a: (*a[:3], a[3][:3]), ValueError, "bias"),
        (lambda a: (a[0].to(torch.int32), *a[1:]), TypeError, "x must be"),
    ],
)
def test_bad_arguments_raise(change, error, message):
    with pytest.raises(error, match=message):
        int8_dynamic_mm(*change(make_layer(2, 128, 16)))


def test_opcheck(device):
    torch.library.opcheck(int8_dynamic_mm, make_layer(3, 128, 16, device=device))


# -- float8 ---------------------------------------------------------------------------------------------

FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def make_float8_layer(m, k, n, x_dtype, w_dtype, *, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * scale
    w = QTensor.quantize(torch.randn(n, k, generator=g), w_dtype, axis=0)
    return x, w._data, w._scale, torch.randn(n, generator=g), x_dtype


def quantize_then_float8_mm(x, w, w_scale, bias, x_dtype):
    rows = QTensor.quantize(x, x_dtype, axis=0)
    return float8_mm_reference(rows._data, w.t(), rows._scale, w_scale.reshape(1, -1), bias, x.dtype)


def float8_kernel_error(w_dtype, rows):
    if cpu_float8_mm.supports(1) and cpu_float8_mm.path(w_dtype, rows).startswith("float16"):
        return cpu_float8_mm.FLOAT16_ERROR
    return 1e-5


@pytest.mark.parametrize("x_dtype", FLOAT8)
@pytest.mark.parametrize("w_dtype", FLOAT8)
@pytest.mark.parametrize("shape", [(1, 128, 64), (5, 100, 40), (40, 256, 24)])
def test_float8_matches_quantizing_then_the_float8_gemm(shape, x_dtype, w_dtype):
    args = make_float8_layer(*shape, x_dtype, w_dtype)
    out = float8_dynamic_mm(*args)
    assert out.dtype == torch.float32 and out.shape == (shape[0], shape[2])
    assert_close_to_max(out, quantize_then_float8_mm(*args), float8_kernel_error(w_dtype, shape[0]))


@needs_kernels
@pytest.mark.parametrize("x_dtype", FLOAT8)
@pytest.mark.parametrize("scale", [1.0, 1e-30, 3e30])  # subnormal codes, tiny and huge rows
def test_float8_cpu_kernel_quantizes_x_as_quantize_does(x_dtype, scale):
    """The C++ kernel's float8 rounding (half to even, subnormals, saturation) against torch's cast: with
    the weight an identity, the outputs are x's dequantized codes."""
    k = 96
    x = torch.randn(4, k) * scale
    x[0, :8] = torch.tensor([0.5, 0.25, 1e-3, -1e-3, 3e-3, 7e-4, 1.0, -1.0]) * scale  # ties and subnormals
    identity = QTensor.quantize(torch.eye(k), torch.float8_e4m3fn, axis=0)
    out = float8_dynamic_mm(x, identity._data, identity._scale, None, x_dtype)
    expected = QTensor.quantize(x, x_dtype, axis=0).dequantize()
    assert_close_to_max(out, expected, float8_kernel_error(torch.float8_e4m3fn, 4))
    assert torch.equal(out == 0, expected == 0)  # codes rounded to zero stay zero


@needs_kernels
@pytest.mark.parametrize("x_dtype", FLOAT8)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("k", [256, 100])  # 100: the kernel's scalar tail
def test_float8_cpu_kernel_of_16_bit_x_is_the_torch_steps_bit_for_bit(dtype, k, x_dtype):
    """For 16-bit x the C++ kernel rounds the scales and quotients to x's dtype as torch does: its result
    is float8_mm's on QTensor.quantize's codes exactly (the same weight kernel, the same values)."""
    x = rows_of_many_scales(48, k, dtype)
    _, w, w_scale, bias, _ = make_float8_layer(1, k, 40, x_dtype, torch.float8_e4m3fn)
    bias = bias.to(dtype)
    rows = QTensor.quantize(x, x_dtype, axis=0)
    expected = float8_mm(rows._data, w.t(), rows._scale, w_scale.reshape(1, -1), bias, dtype)
    out = float8_dynamic_mm(x, w, w_scale, bias, x_dtype)
    assert out.dtype == dtype
    assert torch.equal(out, expected)


@needs_kernels
@pytest.mark.parametrize("w_dtype", FLOAT8)
def test_float8_cpu_kernel_quantizing_x_inside_the_gemm_is_the_torch_steps_bit_for_bit(w_dtype):
    """Past the float16 GEMV's rows, e4m3fn weights take x's rows quantized chunk by chunk inside the float16
    GEMM (e5m2 ones all of x first): both are float8_mm's results on QTensor.quantize's codes, also where a
    row of a later chunk is too small for float16 (1e-35: the whole call is redone in float32)."""
    # K = 100: each row ends in a partial vector
    x, w, w_scale, bias, x_dtype = make_float8_layer(5500, 100, 24, torch.float8_e4m3fn, w_dtype)
    for tiny_row in (False, True):
        x[-1] *= 1e-35 if tiny_row else 1.0
        rows = QTensor.quantize(x, x_dtype, axis=0)
        expected = float8_mm(rows._data, w.t(), rows._scale, w_scale.reshape(1, -1), bias, torch.float32)
        assert torch.equal(float8_dynamic_mm(x, w, w_scale, bias, x_dtype), expected)
    x[-1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        float8_dynamic_mm(x, w, w_scale, bias, x_dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_float8_cpu_call_does_not_enter_python(dtype):
    x, *rest = make_float8_layer(1, 128, 64, torch.float8_e4m3fn, torch.float8_e4m3fn)
    x = x.to(dtype)
    with torch.profiler.profile() as profile:
        float8_dynamic_mm(x, *rest)
    names = {event.name for event in profile.events()}
    allowed = {"aten::empty"} if dtype == torch.float32 else NATIVE_CALL_OPS
    assert names <= allowed | {"quanto_fx::float8_dynamic_mm"}, names


def test_float8_non_finite_x_raises():
    x, *rest = make_float8_layer(2, 128, 16, torch.float8_e4m3fn, torch.float8_e4m3fn)
    x[0, 3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        float8_dynamic_mm(x, *rest)


def test_float8_bad_x_dtype_raises():
    x, w, w_scale, bias, _ = make_float8_layer(2, 128, 16, torch.float8_e4m3fn, torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="x_dtype must be a float8"):
        float8_dynamic_mm(x, w, w_scale, bias, torch.int8)


def test_float8_opcheck():
    # Not "test_schema": its mutation check multiplies the inputs, which torch does not implement for float8.
    args = make_float8_layer(3, 128, 16, torch.float8_e5m2, torch.float8_e4m3fn)
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(float8_dynamic_mm, args, test_utils=utils)
