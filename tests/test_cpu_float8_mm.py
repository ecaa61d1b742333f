"""Float8 weight-only GEMMs: the CPU kernels of quanto_fx/kernels/cpu_float8_mm.* against torch's own float8
conversion and the float reference, the ``float8_weight_mm`` op's dispatch and QLinear (the backend's
rewrite into the op: test_backend.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quanto_fx import freeze, qfloat8_e4m3fn, qfloat8_e5m2, quantize
from quanto_fx.kernels import cpu_float8_mm, cpu_vnni_mm
from quanto_fx.kernels.cpu_float8_mm import FLOAT16_ERROR
from quanto_fx.kernels.weight_only import float8_weight_mm, per_channel_weight_mm_reference

from .utils import relative_error

FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2]
needs_kernels = pytest.mark.skipif(not cpu_float8_mm.supports(1), reason="needs the CPU kernel library")


def _float8_weight(n: int, k: int, dtype: torch.dtype):
    return (torch.randn(n, k) * 0.5).to(dtype), torch.rand(n) + 0.5


def _tolerance(dtype: torch.dtype, m: int) -> float:
    """float32 arithmetic, or float16 arithmetic where this CPU runs it."""
    return FLOAT16_ERROR if cpu_float8_mm.path(dtype, m).startswith("float16") else 1e-6


@needs_kernels
@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("m", [1, 17])  # the GEMV, the GEMM
@pytest.mark.parametrize("flush_denormal", [False, True])  # subnormal codes convert exactly either way
def test_every_code_converts_exactly_as_torch_converts_it(dtype, m, flush_denormal):
    """A (256, 1) weight of every code times x = 1: out[:, n] is code n as float32, NaN and inf included."""
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).reshape(256, 1)
    torch.set_flush_denormal(flush_denormal)
    try:
        out = cpu_float8_mm.float8_weight_mm(torch.ones(m, 1), codes, torch.ones(256))
    finally:
        torch.set_flush_denormal(False)  # torch's default
    expected = codes.float().t().expand(m, 256)
    same = (out == expected) | (out.isnan() & expected.isnan())
    assert bool(same.all()), expected[~same]


@needs_kernels
@pytest.mark.parametrize("dtype", FORMATS)
# GEMV tiles of 8 (float16 GEMV only), 4, then the last 1-3 rows in one (3 in the float16 GEMV, 2 + 1 in the
# float32 one; 7 = 4 + 3, 13 = 8 + 4 + 1); GEMM tiles of 8, 4, 1 (70); the BLAS GEMM where it runs (1030)
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 13, 70, 1030])
@pytest.mark.parametrize("n, k", [(20, 256), (7, 100), (40, 3)])  # tails: rows past tiles, K % 32 and K % 4
def test_the_kernels_match_the_float_reference(dtype, m, n, k):
    torch.manual_seed(m * n + k)
    w, scale = _float8_weight(n, k, dtype)
    x = torch.randn(m, k)
    out = cpu_float8_mm.float8_weight_mm(x, w, scale)
    expected = per_channel_weight_mm_reference(x.double(), w, scale.double())
    assert relative_error(out, expected) < _tolerance(dtype, m)


needs_avx512_fp16 = pytest.mark.skipif(
    not (cpu_float8_mm.supports(1) and cpu_float8_mm.path(torch.float8_e4m3fn, 1) == "float16 GEMV"),
    reason="needs a CPU with AVX512-FP16",
)


@needs_avx512_fp16
@pytest.mark.parametrize(
    "dtype, m",
    # the GEMV (tiles of 1, 2, 4 and 8 rows); the e4m3fn GEMM (tiles of 8 rows, then single rows)
    [(dtype, m) for dtype in FORMATS for m in (1, 2, 4, 7, 12, 16)]
    + [(torch.float8_e4m3fn, m) for m in (17, 40)],
)
# GEMV: a chunk and a tail, one block of float16 sums, 2 blocks and a tail, 16 blocks; GEMM: 1 panel block,
# 1, 2 (the last with K % 4 = 3 inputs one by one), 16
@pytest.mark.parametrize("k", [40, 512, 603, 8192])
def test_the_float16_paths_stay_within_their_stated_error(dtype, m, k):
    assert cpu_float8_mm.path(dtype, m) == ("float16 GEMV" if m <= 16 else "float16 GEMM")
    torch.manual_seed(k + m)
    w, scale = _float8_weight(36, k, dtype)
    x = torch.randn(m, k) * 1e3  # scaled per row: the magnitude does not matter
    out = cpu_float8_mm.float8_weight_mm(x, w, scale)
    error = relative_error(out, per_channel_weight_mm_reference(x.double(), w, scale.double()))
    assert 1e-6 < error < FLOAT16_ERROR  # float16 arithmetic (not float32), within its bound


@needs_avx512_fp16
@pytest.mark.parametrize("dtype, largest", [(torch.float8_e4m3fn, 448.0), (torch.float8_e5m2, 57344.0)])
@pytest.mark.parametrize("m", [1, 17])  # the GEMV, the GEMM
def test_the_float16_sums_of_the_largest_codes_do_not_overflow(dtype, largest, m):
    """Every product at the format's largest magnitude (e4m3: 448 = 1.75 in float16 form, x scaled to 2048;
    e5m2: 57344, x scaled to 1 / 16): each float16 lane sums 16 of them per block, 57344 at most (float16
    holds 65504)."""
    k = 4096
    w = torch.full((4, k), largest).to(dtype)
    w[1] = -largest
    x = torch.ones(m, k)
    out = cpu_float8_mm.float8_weight_mm(x, w, torch.ones(4))
    expected = torch.tensor([[largest * k, -largest * k, largest * k, largest * k]]).expand(m, 4)
    assert torch.equal(out, expected)


@needs_avx512_fp16
@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("m", [3, 17])  # the float16 GEMV, the float16 GEMM
def test_the_float16_paths_keep_their_error_on_weights_of_any_magnitude(dtype, m):
    """Weights not scaled to the format's range (as the op may be given), one magnitude per weight row, from
    mostly subnormal codes up: products of small codes must not fall among float16's subnormals (e5m2 rows
    of small codes only are computed in float32)."""
    torch.manual_seed(0)
    magnitudes = torch.tensor([1e-4, 1e-3, 3e-3, 1e-2, 0.1, 1.0, 10.0, 100.0])
    w = (torch.randn(8, 1024) * magnitudes[:, None]).to(dtype)
    w = w[w.float().abs().amax(1) > 0]  # e4m3's smallest code is 2**-9: rows of 1e-4 are all zeros
    x = torch.randn(m, 1024)
    out = cpu_float8_mm.float8_weight_mm(x, w, torch.ones(w.shape[0]))
    expected = per_channel_weight_mm_reference(x.double(), w, torch.ones(w.shape[0], dtype=torch.double))
    for n in range(w.shape[0]):
        assert relative_error(out[:, n], expected[:, n]) < FLOAT16_ERROR, magnitudes[n]


@needs_avx512_fp16
@pytest.mark.parametrize("m", [3, 9, 40])  # the float16 GEMV (tiles of 3; of 8 and 1), the float16 GEMM
def test_e5m2_tiles_holding_a_row_of_small_codes_take_the_float32_kernels(m):
    """Rows 5 and 69 of an unscaled weight have codes all below 2**-6: the GEMV groups (4 rows; row 69
    alone, past them) or GEMM blocks (32 rows: the first and the last, partial one) that hold them are
    computed in float32 from float32 x, the others in float16; with a bias."""
    torch.manual_seed(0)
    magnitudes = torch.full((70, 1), 0.5)
    magnitudes[[5, 69]] = 1e-3
    w = (torch.randn(70, 1024) * magnitudes).to(torch.float8_e5m2)
    x, bias = torch.randn(m, 1024), torch.randn(70)
    assert cpu_float8_mm.path(torch.float8_e5m2, m).startswith("float16")
    out = cpu_float8_mm.float8_weight_mm(x, w, torch.ones(70), bias)
    expected = per_channel_weight_mm_reference(
        x.double(), w, torch.ones(70, dtype=torch.double), bias.double()
    )
    for n in (5, 69):
        assert relative_error(out[:, n] - bias[n], expected[:, n] - bias[n]) < 1e-5  # float32: exact here
    assert relative_error(out, expected) < FLOAT16_ERROR


@needs_avx512_fp16
@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("m", [1, 17])  # the GEMV, the GEMM
def test_x_near_float32s_largest_values_is_not_flushed_to_zero(dtype, m):
    """max |x| = 1e38: e4m3's float16 scaling factor (2048 / 1e38) is a normal float32, which flush-to-zero
    keeps; with e5m2 weights x is first divided by a power of two (see the next test)."""
    torch.manual_seed(0)
    w, scale = _float8_weight(16, 64, dtype)
    x = torch.randn(m, 64)
    x = x / x.abs().amax(1, keepdim=True) * 1e38
    torch.set_flush_denormal(True)
    try:
        out = cpu_float8_mm.float8_weight_mm(x, w, scale * 1e-3)
    finally:
        torch.set_flush_denormal(False)
    expected = per_channel_weight_mm_reference(x.double(), w, scale.double() * 1e-3)
    assert relative_error(out, expected) < FLOAT16_ERROR


@needs_kernels
@pytest.mark.parametrize("m", [1, 17, 1024])  # the GEMV, the GEMM, the BLAS GEMM where it runs
def test_e5m2_sums_of_huge_x_times_large_codes_do_not_overflow(m):
    """x ~ 1e37 times e5m2 codes of 10240 sum to ~1e41 before a channel scale of 1e-10 brings the outputs to
    ~1e32: x is divided by a power of two first, the scales multiplied by it (the BLAS GEMM's float32 weights
    hold the scales already)."""
    torch.manual_seed(m)
    w = (torch.randint(0, 2, (16, 64)) * 2 - 1).float().mul(10240.0).to(torch.float8_e5m2)  # exact codes
    x = torch.randn(m, 64)
    x = x / x.abs().amax(1, keepdim=True) * 1e37
    scale = torch.full((16,), 1e-10)
    out = cpu_float8_mm.float8_weight_mm(x, w, scale)
    expected = per_channel_weight_mm_reference(x.double(), w, scale.double())
    assert out.isfinite().all() and relative_error(out, expected) < _tolerance(torch.float8_e5m2, m)


@needs_kernels
@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("m", [2, 17, 5500])  # 5500: the float16 GEMM's second chunk (5461 rows at K = 96)
def test_x_the_float16_paths_cannot_scale_takes_float32(dtype, m):
    """A subnormal row next to ordinary ones: the whole call in float32 (the ordinary rows exact to float32
    rounding; the subnormal one's outputs are subnormal, with ~1% precision), even where the float16 GEMM met
    it after writing a first chunk's outputs."""
    torch.manual_seed(0)
    w, scale = _float8_weight(24, 96, dtype)
    x = torch.randn(m, 96)
    x[-1] *= 1e-39
    out = cpu_float8_mm.float8_weight_mm(x, w, scale)
    expected = per_channel_weight_mm_reference(x.double(), w, scale.double())
    assert relative_error(out[-1], expected[-1]) < 3e-2 and relative_error(out[:-1], expected[:-1]) < 1e-6


@needs_kernels
@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 17, 1024])
def test_non_finite_x_is_propagated(dtype, m):
    torch.manual_seed(m)
    w, scale = _float8_weight(20, 64, dtype)
    x = torch.randn(m, 64)
    x[0, 5] = float("inf")
    out = cpu_float8_mm.float8_weight_mm(x, w, scale)
    assert not out[0].isfinite().any() and out[1:].isfinite().all()


@needs_kernels
@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 10, 17, 1024])  # the GEMV (float16 up to 16 where it runs), the GEMMs
def test_the_bias_is_added_as_the_outputs_are_stored(dtype, m):
    torch.manual_seed(m)
    w, scale = _float8_weight(40, 96, dtype)  # 40 columns: the GEMM's wide block and a masked tail
    x, bias = torch.randn(m, 96), torch.randn(40) * 10
    out = cpu_float8_mm.float8_weight_mm(x, w, scale, bias)
    expected = per_channel_weight_mm_reference(x.double(), w, scale.double(), bias.double())
    assert relative_error(out, expected) < _tolerance(dtype, m)


@needs_kernels
@pytest.mark.parametrize("dtype", FORMATS)
def test_the_gemm_passes_over_x_in_chunks(dtype):
    """x of more than a chunk (float32 GEMM: 8 MB, 512 rows at K = 4096; float16 GEMM: 1 MB of float16 x, 128
    rows) takes several passes over the weight."""
    assert cpu_float8_mm.path(dtype, 1000) in ("float32 GEMM", "float16 GEMM")
    torch.manual_seed(0)
    w, scale = _float8_weight(24, 4096, dtype)
    x = torch.randn(1000, 4096)
    out = cpu_float8_mm.float8_weight_mm(x, w, scale)
    expected = per_channel_weight_mm_reference(x.double(), w, scale.double())
    tolerance = max(_tolerance(dtype, 1000), 4e-6)  # float32 sums of 4096 products: ~1e-6
    for rows in (slice(0, 128), slice(128, 512), slice(512, 1000)):
        assert relative_error(out[rows], expected[rows]) < tolerance


@needs_kernels
@pytest.mark.parametrize("dtype", FORMATS)
def test_the_blas_gemm_converts_the_weight_in_blocks_of_rows(dtype):
    """The BLAS GEMM (CPUs without AVX512-FP16, from M = 1024) converts 16 MB of float32 weight rows at a
    time, 512 at K = 8192: 520 rows take a second, partial block, whose columns of out (and of the bias) start
    at 512. A NaN code in it makes its column NaN, and no other."""
    if cpu_float8_mm.path(dtype, 1024) != "float32 BLAS GEMM":
        pytest.skip("this CPU computes M = 1024 in float16")
    torch.manual_seed(0)
    w, scale = _float8_weight(520, 8192, dtype)
    w.view(torch.uint8)[515, 4000] = 0x7F  # a NaN in both formats
    x, bias = torch.randn(1024, 8192), torch.randn(520)
    out = cpu_float8_mm.float8_weight_mm(x, w, scale, bias)
    expected = per_channel_weight_mm_reference(x.double(), w, scale.double(), bias.double())
    nan_columns = torch.zeros(520, dtype=torch.bool)
    nan_columns[515] = True
    assert torch.equal(out.isnan(), nan_columns.expand(1024, 520))
    for block in (slice(0, 512), slice(512, 515), slice(516, 520)):  # float32 sums of 8192 products
        assert relative_error(out[:, block], expected[:, block]) < 4e-6


@needs_kernels
@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("m", [1, 70])  # the GEMV, the GEMM
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_the_op_matches_the_reference_and_returns_x_dtype(dtype, m, x_dtype):
    torch.manual_seed(m)
    w, scale = _float8_weight(40, 96, dtype)
    x, bias = torch.randn(m, 96).to(x_dtype), torch.randn(40)
    out = float8_weight_mm(x, w, scale.reshape(-1, 1), bias)
    expected = per_channel_weight_mm_reference(x.double(), w, scale.double(), bias.double())
    tolerance = _tolerance(dtype, m) if x_dtype == torch.float32 else 4e-3  # bf16 rounds the output: 2**-9
    assert out.dtype == x_dtype and relative_error(out, expected) < tolerance


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 3, 20])  # the GEMV (tiles of 1, 2 and 3 rows of x), the GEMM
def test_a_nan_code_in_the_weight_is_propagated_not_read_as_a_number(m):
    w, scale = _float8_weight(10, 96, torch.float8_e4m3fn)
    # e4m3fn's NaNs: in groups of 4 weight rows (in the first 64 inputs and past them), in a last single row
    w.view(torch.uint8)[3, 10] = 0x7F
    w.view(torch.uint8)[5, 70] = 0xFF
    w.view(torch.uint8)[9, 95] = 0xFF
    out = float8_weight_mm(torch.randn(m, 96), w, scale)
    nan_columns = torch.zeros(10, dtype=torch.bool)
    nan_columns[[3, 5, 9]] = True
    assert torch.equal(out.isnan(), nan_columns.expand(m, 10))


@needs_kernels
def test_arguments_the_cpp_side_would_misread_are_refused():
    w, scale = _float8_weight(8, 64, torch.float8_e4m3fn)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="2-d float8"):
        cpu_float8_mm.float8_weight_mm(x, w.view(torch.int8), scale)
    with pytest.raises(ValueError, match="scale must be"):
        cpu_float8_mm.float8_weight_mm(x, w, scale[:4])
    with pytest.raises(ValueError, match="bias must be"):
        cpu_float8_mm.float8_weight_mm(x, w, scale, torch.ones(9))
    with pytest.raises(ValueError, match="x must be"):
        cpu_float8_mm.float8_weight_mm(torch.randn(1, 32), w, scale)
    with pytest.raises(ValueError, match="x must be"):
        cpu_float8_mm.float8_weight_mm(torch.ones(1, 64, dtype=torch.int32), w, scale)
    assert not cpu_float8_mm.supports(cpu_float8_mm.MAX_IN_FEATURES + 1)  # the panels' memory
    with pytest.raises(ValueError, match="CPU tensors"):
        cpu_float8_mm.float8_weight_mm(torch.randn(1, 64, device="meta"), w, scale)


@needs_kernels
def test_any_float_x_and_strided_weights_are_taken_as_their_contiguous_float32_values():
    w, scale = _float8_weight(64, 64, torch.float8_e5m2)
    x = torch.randn(3, 64).bfloat16()
    expected = cpu_float8_mm.float8_weight_mm(x.float(), w.t().contiguous(), scale)
    assert torch.equal(cpu_float8_mm.float8_weight_mm(x, w.t(), scale.double()), expected)


def test_no_input_features_give_zeros():
    assert not cpu_float8_mm.supports(0)
    w = torch.zeros(4, 0, dtype=torch.float8_e4m3fn)
    assert torch.equal(float8_weight_mm(torch.randn(3, 0), w, torch.ones(4)), torch.zeros(3, 4))


def test_the_op_refuses_a_weight_that_is_not_float8():
    with pytest.raises(TypeError, match="float8"):
        float8_weight_mm(torch.randn(2, 16), torch.zeros(4, 16, dtype=torch.int8), torch.ones(4))


def test_switched_off_the_op_computes_the_reference(monkeypatch):
    monkeypatch.setenv(cpu_vnni_mm.ENABLE_VARIABLE, "0")
    w, scale = _float8_weight(24, 64, torch.float8_e5m2)
    x = torch.randn(3, 64)
    assert torch.equal(float8_weight_mm(x, w, scale), per_channel_weight_mm_reference(x, w, scale))


@pytest.mark.parametrize("fqtype", [qfloat8_e4m3fn, qfloat8_e5m2])
def test_float8_weight_only_linears_call_the_op_in_eager_inference(fqtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32))
    q = freeze(quantize(model, weights=fqtype, activations=None, inplace=False))
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        w0, w2 = q[0].weight, q[2].weight
        hidden = F.relu(float8_weight_mm(x.reshape(10, 64), w0._data, w0._scale, q[0].bias))
        expected = float8_weight_mm(hidden, w2._data, w2._scale, q[2].bias).reshape(2, 5, 32)
        assert torch.equal(q(x), expected)
        reference = F.linear(F.relu(F.linear(x, w0.dequantize(), q[0].bias)), w2.dequantize(), q[2].bias)
    tolerance = _tolerance(fqtype.dtype, 10) if cpu_float8_mm.supports(64) else 1e-5  # 10 rows of x
    assert relative_error(expected, reference) < tolerance
