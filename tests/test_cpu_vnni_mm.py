"""The AVX512-VNNI CPU weight-only kernels (quanto_fx/kernels/cpu_vnni_mm.*): accuracy against the float
reference, dispatch from the weight-only ops, fallbacks, and the build cache."""

from __future__ import annotations

import logging

import pytest
import torch

from quanto_fx.kernels import cpu_vnni_mm
from quanto_fx.kernels.weight_only import (
    int8_weight_mm,
    lowbit_kernel_layout,
    lowbit_weight_mm,
    lowbit_weight_mm_reference,
    per_channel_weight_mm_reference,
)
from quanto_fx.tensor.packing import pack

from .utils import VNNI_TOLERANCE, relative_error

pytestmark = pytest.mark.skipif(not cpu_vnni_mm.available(), reason="needs AVX512-VNNI and a C++ compiler")


def _int8_weight(n: int, k: int):
    return torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n) * 0.01 + 1e-3


def _lowbit_weight(n: int, k: int, bits: int, group_size: int):
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    return pack(codes, bits), torch.randn(k // group_size, n, 2) * 0.01


# The GEMV up to 6 rows (2 for K <= 512); the GEMM past them: tiles of 4 rows, the last 1 to 3 in one tile
@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 17, 40, 130])
# 20: weight rows left over after the GEMV's 8- and 4-row tiles, and past the GEMM's 16-column block
@pytest.mark.parametrize("n", [20, 64])
# 64-byte GEMV chunks; 224 is not a multiple of 64 (32-byte chunks), nor its 56 words of 16 (the GEMM reads
# rows 16 words at a time); 576 > 512: the GEMV up to 6 rows
@pytest.mark.parametrize("k", [192, 224, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_weights_match_the_float_reference(m, n, k, dtype):
    torch.manual_seed(m * n + k)
    w, scale = _int8_weight(n, k)
    x = torch.randn(m, k).to(dtype)
    out = cpu_vnni_mm.vnni_weight_mm(x, w, scale, 8)
    expected = per_channel_weight_mm_reference(x.float(), w, scale)
    tolerance = VNNI_TOLERANCE if dtype == torch.float32 else 1e-4  # x's bf16 values are exact in float32
    assert out.dtype == torch.float32 and relative_error(out, expected) < tolerance


# GEMV (M <= 2 at K > 512, groups of 32 / 64 bytes) and GEMM (else); group bytes: int4 g8 4, g32 16, g64 32,
# g128 64.
GROUPS = [(4, 8), (4, 32), (4, 64), (4, 128), (2, 16), (2, 128), (2, 256)]


@pytest.mark.parametrize("bits, group_size", GROUPS)
# GEMM: tiles of 4 rows, the last 1 to 3 in one; code words whole up to 16 rows, split by phase at 40
@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 16, 40])
# GEMM: 32-column blocks, then 16-column ones, the last partial (60: 12 columns, whose 24 (scale, zero) floats
# span two vectors)
@pytest.mark.parametrize("n", [20, 48, 60, 100])
def test_lowbit_weights_match_the_float_reference(bits, group_size, m, n):
    torch.manual_seed(bits * m * n + group_size)
    packed, scale_zeros = _lowbit_weight(n, 1024, bits, group_size)
    x = torch.randn(m, 1024)
    out = cpu_vnni_mm.vnni_weight_mm(x, packed, scale_zeros, bits, group_size)
    expected = lowbit_weight_mm_reference(x, packed, scale_zeros, bits)
    assert out.shape == (m, n) and relative_error(out, expected) < VNNI_TOLERANCE


# Groups of 32 bytes (int4 g64, int2 g128): the GEMV takes two per 64-byte chunk, each half scaled by its own
# group, where a row holds an even number of them (K = 1024 above); 32-byte chunks where it holds an odd one.
@pytest.mark.parametrize("bits, group_size", [(4, 64), (2, 128)])
@pytest.mark.parametrize("groups", [2, 3, 12, 13])
@pytest.mark.parametrize("m", [1, 2])  # the GEMV (at m = 2 from K > 512)
def test_groups_of_32_bytes_in_the_gemv_keep_their_own_scales(bits, group_size, groups, m):
    torch.manual_seed(bits * groups + m)
    k = groups * group_size
    packed, scale_zeros = _lowbit_weight(36, k, bits, group_size)
    scale_zeros[1::2] *= 8  # neighbouring groups far apart: a half scaled by the other group's scale shows
    x, bias = torch.randn(m, k), torch.randn(36)
    out = cpu_vnni_mm.vnni_weight_mm(x, packed, scale_zeros, bits, group_size, bias)
    expected = lowbit_weight_mm_reference(x, packed, scale_zeros, bits, bias)
    assert relative_error(out, expected) < VNNI_TOLERANCE


@pytest.mark.parametrize("bits, group_size", [(4, 32), (2, 16)])
@pytest.mark.parametrize("m", [3, 17])
def test_packed_rows_that_end_in_a_partial_block_of_16_words(bits, group_size, m):
    """The GEMM reads weight rows 16 words (64 bytes) at a time: K = 1088 ends in 8 (int4) or 4 (int2)."""
    torch.manual_seed(m + bits)
    packed, scale_zeros = _lowbit_weight(20, 1088, bits, group_size)
    assert (packed.shape[1] // 4) % 16 and not cpu_vnni_mm.uses_gemv(bits, m, 1088, group_size)
    x = torch.randn(m, 1088)
    out = cpu_vnni_mm.vnni_weight_mm(x, packed, scale_zeros, bits, group_size)
    expected = lowbit_weight_mm_reference(x, packed, scale_zeros, bits)
    assert relative_error(out, expected) < VNNI_TOLERANCE


def test_the_gemv_and_the_gemm_agree_on_the_same_rows():
    """int4: rows 0-1 alone take the GEMV, inside 8 rows the GEMM; int8: rows 0-5 alone the GEMV, inside 17
    the GEMM. The same exact integer sums, summed in another order in float32."""
    assert cpu_vnni_mm.uses_gemv(4, 2, 1024, 128) and not cpu_vnni_mm.uses_gemv(4, 8, 1024, 128)
    assert cpu_vnni_mm.uses_gemv(4, 1, 512, 128) and not cpu_vnni_mm.uses_gemv(4, 2, 512, 128)
    assert cpu_vnni_mm.uses_gemv(8, 6, 1024) and not cpu_vnni_mm.uses_gemv(8, 7, 1024)
    assert cpu_vnni_mm.uses_gemv(8, 2, 512) and not cpu_vnni_mm.uses_gemv(8, 3, 512)  # small K: GEMM sooner
    torch.manual_seed(0)
    packed, scale_zeros = _lowbit_weight(64, 1024, 4, 128)
    w, scale = _int8_weight(64, 1024)
    x = torch.randn(17, 1024)
    gemv = cpu_vnni_mm.vnni_weight_mm(x[:2], packed, scale_zeros, 4, 128)
    gemm = cpu_vnni_mm.vnni_weight_mm(x[:8], packed, scale_zeros, 4, 128)
    assert relative_error(gemv, gemm[:2]) < 1e-6
    gemv, gemm = cpu_vnni_mm.vnni_weight_mm(x[:6], w, scale, 8), cpu_vnni_mm.vnni_weight_mm(x, w, scale, 8)
    assert relative_error(gemv, gemm[:6]) < 1e-6


@pytest.mark.parametrize("bits, group_size", [(4, 128), (2, 64)])
@pytest.mark.parametrize("m", [3, 16])
def test_the_gemm_keeps_code_words_whole_or_split_with_the_same_sums(bits, group_size, m):
    """Up to 16 rows of x (GEMM_WORDS_MAX_M) the packed GEMM takes each word's phases in the tile, past them
    once per block of weight rows: the same integer sums, the same tiles of rows, the same outputs."""
    torch.manual_seed(bits * m)
    packed, scale_zeros = _lowbit_weight(100, 1024, bits, group_size)  # 32- and 16-column blocks
    x = torch.randn(40, 1024)
    whole = cpu_vnni_mm.vnni_weight_mm(x[:m], packed, scale_zeros, bits, group_size)
    split = cpu_vnni_mm.vnni_weight_mm(x, packed, scale_zeros, bits, group_size)
    assert not cpu_vnni_mm.uses_gemv(bits, m, 1024, group_size)
    assert torch.equal(whole, split[:m])
    expected = lowbit_weight_mm_reference(x[:m], packed, scale_zeros, bits)
    assert relative_error(whole, expected) < VNNI_TOLERANCE


def test_the_gemm_passes_over_x_in_chunks():
    """x planes of more than GEMM_X_CHUNK_BYTES (1 MB: 1024 rows at K = 512) take several passes over the
    weight."""
    torch.manual_seed(0)
    packed, scale_zeros = _lowbit_weight(40, 512, 2, 64)
    x = torch.randn(2100, 512)
    out = cpu_vnni_mm.vnni_weight_mm(x, packed, scale_zeros, 2, 64)
    expected = lowbit_weight_mm_reference(x, packed, scale_zeros, 2)
    for rows in (slice(0, 1024), slice(1024, 2048), slice(2048, 2100)):
        assert relative_error(out[rows], expected[rows]) < VNNI_TOLERANCE


def test_rows_of_very_different_magnitudes_keep_their_own_precision():
    """Each row of x has its own integer scale: a row of 1e-6 is as precise as a row of 1e6."""
    torch.manual_seed(0)
    w, scale = _int8_weight(32, 256)
    x = torch.randn(3, 256) * torch.tensor([[1e-6], [1.0], [1e6]])
    out = cpu_vnni_mm.vnni_weight_mm(x, w, scale, 8)
    expected = per_channel_weight_mm_reference(x, w, scale)
    for row in range(3):
        assert relative_error(out[row], expected[row]) < VNNI_TOLERANCE


@pytest.mark.parametrize("m", [1, 8, 17])  # the GEMVs, the int4 GEMM, the GEMMs
def test_extreme_codes_over_a_long_row_do_not_overflow_the_int32_sums(m):
    """x at its largest code times the extreme weights along K = 16384 (int8: -128 / 127; int4 codes 0 / 15 in
    one group of all of K): the integer sums reach ~3e7 per lane, far from int32's 2e9 but enough to show a
    wrong sign-flip or byte split."""
    k = 16384
    w = torch.full((16, k), 127, dtype=torch.int8)
    w[::2] = -128
    scale = torch.full((16,), 1e-3)
    x = torch.full((m, k), 3.0)
    x[:, ::3] = -3.0
    out = cpu_vnni_mm.vnni_weight_mm(x, w, scale, 8)
    assert relative_error(out, per_channel_weight_mm_reference(x, w, scale)) < 1e-5
    codes = torch.full((16, k), 15, dtype=torch.uint8)
    codes[::2] = 0
    scale_zeros = torch.tensor([1e-3, 2e-3]).expand(1, 16, 2).contiguous()
    out = cpu_vnni_mm.vnni_weight_mm(x, pack(codes, 4), scale_zeros, 4, k)
    assert relative_error(out, lowbit_weight_mm_reference(x, pack(codes, 4), scale_zeros, 4)) < 1e-5


@pytest.mark.parametrize("bits, group_size", [(4, 128), (4, 64), (2, 256), (2, 128)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_codes_in_the_gemv_chunk_flush(bits, group_size, sign):
    """The M = 1 GEMV's flush of groups of one 64-byte chunk (or two of 32) adds 256 * sum_h + sum_l in int32
    and reduces 8 rows at once: x at its largest code (high byte 127, or -128) times the largest codes in
    every group of the even rows, 0 in the odd ones, each row its own scale and zero."""
    n, k = 16, 1024
    codes = torch.full((n, k), 2**bits - 1, dtype=torch.uint8)
    codes[1::2] = 0
    scale_zeros = torch.stack([torch.rand(k // group_size, n) + 0.5, torch.randn(k // group_size, n)], -1)
    x = torch.full((1, k), 3.0 * sign)
    out = cpu_vnni_mm.vnni_weight_mm(x, pack(codes, bits), scale_zeros, bits, group_size)
    expected = lowbit_weight_mm_reference(x, pack(codes, bits), scale_zeros, bits)
    assert relative_error(out, expected) < 1e-5


def test_mismatched_arguments_are_refused_before_the_cpp_side_reads_them():
    w, scale = _int8_weight(16, 128)
    with pytest.raises(ValueError, match="must be torch.int8"):
        cpu_vnni_mm.vnni_weight_mm(torch.randn(1, 128), w, scale[:8], 8)
    with pytest.raises(ValueError, match="no VNNI kernel"):
        cpu_vnni_mm.vnni_weight_mm(torch.randn(1, 80), w[:, :80], scale, 8)
    packed, scale_zeros = _lowbit_weight(16, 256, 4, 128)
    with pytest.raises(ValueError, match="must be torch.uint8"):
        cpu_vnni_mm.vnni_weight_mm(torch.randn(1, 512), packed, scale_zeros, 4, 128)
    with pytest.raises(ValueError, match="bias must have shape"):
        cpu_vnni_mm.vnni_weight_mm(torch.randn(1, 256), packed, scale_zeros, 4, 128, torch.zeros(8))


def test_non_finite_x_is_left_to_the_float_path_which_propagates_it():
    w, scale = _int8_weight(16, 128)
    x = torch.randn(2, 128)
    x[1, 5] = float("nan")
    assert cpu_vnni_mm.vnni_weight_mm(x, w, scale, 8) is None
    out = int8_weight_mm(x, w, scale)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize(
    "bits, in_features, group_size, served",
    [
        (8, 256, None, True),
        (8, 96, None, True),  # 32-byte chunks
        (8, 80, None, False),  # 80 bytes: not a whole number of 32-byte chunks
        (8, 1 << 21, None, False),  # the int32 sums could overflow
        (4, 256, 128, True),
        (4, 256, 32, True),  # 16 bytes a group: the GEMM at every M
        (4, 256, 8, True),  # 4 bytes: one 32-bit word a group
        (4, 256, 4, False),
        (2, 512, 16, True),
        (2, 512, 8, False),
        (4, 300, 128, False),  # groups do not divide the features
    ],
)
def test_supports_names_the_shapes_the_kernel_serves(bits, in_features, group_size, served):
    assert cpu_vnni_mm.supports(bits, in_features, group_size) == served


def test_the_weight_only_ops_dispatch_to_the_vnni_paths():
    torch.manual_seed(0)
    w, scale = _int8_weight(64, 256)
    packed, scale_zeros = _lowbit_weight(64, 256, 4, 128)
    bias = torch.randn(64)
    x = torch.randn(1, 256)  # the GEMVs
    assert cpu_vnni_mm.uses_gemv(8, 1, 256) and cpu_vnni_mm.uses_gemv(4, 1, 256, 128)
    vnni = cpu_vnni_mm.vnni_weight_mm(x, w, scale, 8, bias=bias)
    assert torch.equal(int8_weight_mm(x, w, scale, bias), vnni)
    vnni = cpu_vnni_mm.vnni_weight_mm(x, packed, scale_zeros, 4, 128, bias)
    assert torch.equal(lowbit_weight_mm(x, packed, scale_zeros, None, 4, 128, bias), vnni)
    x = torch.randn(17, 256)  # past the GEMVs: the VNNI GEMM for both
    assert not cpu_vnni_mm.uses_gemv(8, 17, 256) and not cpu_vnni_mm.uses_gemv(4, 17, 256, 128)
    assert torch.equal(
        int8_weight_mm(x, w, scale, bias), cpu_vnni_mm.vnni_weight_mm(x, w, scale, 8, bias=bias)
    )
    vnni = cpu_vnni_mm.vnni_weight_mm(x, packed, scale_zeros, 4, 128, bias)
    assert torch.equal(lowbit_weight_mm(x, packed, scale_zeros, None, 4, 128, bias), vnni)


def test_large_int8_weights_take_torch_int_mm_past_int8_vnni_max_m():
    """A 4 MB int8 weight: the VNNI kernels up to INT8_VNNI_MAX_M rows, torch._int_mm past them; a small
    weight keeps the VNNI GEMM at any M."""
    k = n = 2048
    assert k * n == cpu_vnni_mm.INT_MM_MIN_WEIGHT_BYTES
    rows = cpu_vnni_mm.INT8_VNNI_MAX_M
    assert not cpu_vnni_mm.int8_uses_int_mm(rows, k, n) and cpu_vnni_mm.int8_uses_int_mm(rows + 1, k, n)
    assert not cpu_vnni_mm.int8_uses_int_mm(4096, 384, 1536)
    torch.manual_seed(0)
    w, scale = _int8_weight(n, k)
    x = torch.randn(rows + 1, k)
    out = int8_weight_mm(x, w, scale)
    assert torch.equal(out, cpu_vnni_mm.int8_weight_int_mm(x, w, scale))
    assert torch.equal(int8_weight_mm(x[:rows], w, scale), cpu_vnni_mm.vnni_weight_mm(x[:rows], w, scale, 8))
    assert relative_error(out, per_channel_weight_mm_reference(x, w, scale)) < VNNI_TOLERANCE
    # a 16-bit x: the bias joins the float32 sums, and the output is rounded to x's dtype once, as on
    # every other path (not rounded, then added to the bias and rounded again)
    bias = torch.randn(n, dtype=torch.bfloat16)
    xb = x.bfloat16()
    expected = (cpu_vnni_mm.int8_weight_int_mm(xb, w, scale) + bias.float()).bfloat16()
    assert torch.equal(int8_weight_mm(xb, w, scale, bias), expected)


def test_16_bit_x_is_computed_from_float32_and_returned_in_its_dtype():
    torch.manual_seed(0)
    packed, scale_zeros = _lowbit_weight(40, 256, 4, 64)
    for m in (1, 24):
        x = torch.randn(m, 256).bfloat16()
        out = lowbit_weight_mm(x, packed, scale_zeros, None, 4, 64)
        expected = lowbit_weight_mm_reference(x.float(), packed, scale_zeros, 4)
        assert out.dtype == torch.bfloat16 and relative_error(out, expected) < 4e-3  # bf16 output: 2**-9


@pytest.mark.parametrize("m, k", [(17, 256), (64, 100), (200, 8)])  # any K: _int_mm takes odd shapes
def test_int8_weights_at_larger_m_match_the_float_reference(m, k):
    torch.manual_seed(m + k)
    w, scale = _int8_weight(24, k)
    x = torch.randn(m, k) * 3
    out = cpu_vnni_mm.int8_weight_int_mm(x, w, scale)
    assert relative_error(out, per_channel_weight_mm_reference(x, w, scale)) < VNNI_TOLERANCE


def test_int8_weights_at_larger_m_refuse_a_weight_or_scales_that_do_not_fit_x():
    w, scale = _int8_weight(16, 128)
    for args in ((w[:, :64], scale), (w.to(torch.uint8), scale), (w, scale[:8])):
        with pytest.raises(ValueError, match="do not fit x"):
            cpu_vnni_mm.int8_weight_int_mm(torch.randn(20, 128), *args)


def test_non_finite_x_at_larger_m_is_propagated_too():
    w, scale = _int8_weight(16, 128)
    x = torch.randn(20, 128)
    x[3, 0] = float("inf")
    assert cpu_vnni_mm.int8_weight_int_mm(x, w, scale) is None
    out = int8_weight_mm(x, w, scale)
    assert not torch.isfinite(out[3]).all() and torch.isfinite(out[:3]).all()


def test_switching_it_off_falls_back_to_aten(monkeypatch):
    torch.manual_seed(0)
    w, scale = _int8_weight(64, 256)
    x = torch.randn(4, 256)
    monkeypatch.setenv(cpu_vnni_mm.ENABLE_VARIABLE, "0")
    assert not cpu_vnni_mm.available()
    aten = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w, scale.bfloat16()).float()
    assert torch.equal(int8_weight_mm(x, w, scale), aten)


def test_served_lowbit_weights_keep_no_second_copy_in_aten_layout(monkeypatch):
    packed, _ = _lowbit_weight(64, 256, 4, 128)
    assert lowbit_kernel_layout(packed, 4, 128) is None
    monkeypatch.setenv(cpu_vnni_mm.ENABLE_VARIABLE, "0")
    assert lowbit_kernel_layout(packed, 4, 128) is not None


def test_the_library_is_compiled_once_per_source_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTO_FX_CACHE_DIR", str(tmp_path))
    compiler = cpu_vnni_mm._compiler()
    built = cpu_vnni_mm._build(compiler)
    assert built.parent == tmp_path and built.exists()
    stamp = built.stat().st_mtime_ns
    assert cpu_vnni_mm._build(compiler) == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no scratch left behind


def test_a_failing_build_is_logged_and_leaves_the_aten_path(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QUANTO_FX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # exits 1 for every command line, like a broken toolchain
    cpu_vnni_mm._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_vnni_mm.__name__):
            assert not cpu_vnni_mm.available()
        assert "failed to build" in caplog.text
        w, scale = _int8_weight(16, 128)
        x = torch.randn(1, 128)
        assert (
            relative_error(int8_weight_mm(x, w, scale), per_channel_weight_mm_reference(x, w, scale)) < 8e-3
        )
    finally:
        monkeypatch.undo()
        cpu_vnni_mm._library.cache_clear()
    assert cpu_vnni_mm.available()


@pytest.mark.parametrize(
    "bits, group_size, m", [(8, None, 1), (8, None, 2), (8, None, 20), (4, 64, 1), (4, 64, 9), (2, 128, 9)]
)
def test_the_bias_is_added_as_the_outputs_are_stored(bits, group_size, m):
    """GEMV (M <= 2 here, K = 256) and GEMM: out + bias, within float32 rounding (the store may fuse it)."""
    torch.manual_seed(m)
    if bits == 8:
        weight, scales = _int8_weight(40, 256)
    else:
        weight, scales = _lowbit_weight(40, 256, bits, group_size)
    x, bias = torch.randn(m, 256), torch.randn(40)
    without = cpu_vnni_mm.vnni_weight_mm(x, weight, scales, bits, group_size)
    with_bias = cpu_vnni_mm.vnni_weight_mm(x, weight, scales, bits, group_size, bias)
    torch.testing.assert_close(with_bias, without + bias, rtol=1e-6, atol=1e-6)


# -- limits and edge inputs (each once a wrong answer or a crashed process) -----------------------------


def test_a_long_group_of_large_x_does_not_overflow_the_sum_of_x_codes():
    """The group's sum of x's codes (int8: one group of all K) exceeds int32 from ~65,800 elements."""
    k = 66048
    x, w, scale = torch.ones(1, k), torch.ones(2, k, dtype=torch.int8), torch.ones(2)
    assert relative_error(cpu_vnni_mm.vnni_weight_mm(x, w, scale, 8), torch.full((1, 2), float(k))) < 1e-5


@pytest.mark.parametrize("m", [1, 17])  # the GEMV, which also serves M > 16 at this K
def test_the_gemv_accumulators_hold_at_the_largest_in_features(m):
    """32-byte chunks (K % 64 = 32): 8 int32 lanes each summing K / 8 products of up to 128 * 255."""
    k = cpu_vnni_mm.MAX_IN_FEATURES - 32
    assert cpu_vnni_mm.supports(8, k) and not cpu_vnni_mm.supports(8, cpu_vnni_mm.MAX_IN_FEATURES + 32)
    assert cpu_vnni_mm.uses_gemv(8, m, k)
    x = torch.ones(m, k)
    x[0, k // 2 :] = -1.0
    w = torch.full((1, k), 127, dtype=torch.int8)
    w[0, k // 2 :] = -128
    out = cpu_vnni_mm.vnni_weight_mm(x, w, torch.ones(1), 8)
    assert relative_error(out, per_channel_weight_mm_reference(x.double(), w, torch.ones(1).double())) < 1e-5


def test_the_int8_gemm_accumulators_hold_at_its_largest_in_features():
    """K = 2**16: one int32 lane per output sums all K products of 127 * 255 (2.1e9, int32 holds 2.147e9);
    one more chunk of input features and the GEMV takes over."""
    k = 1 << 16
    assert not cpu_vnni_mm.uses_gemv(8, 17, k) and cpu_vnni_mm.uses_gemv(8, 17, k + 32)
    x, w = torch.ones(17, k), torch.full((16, k), 127, dtype=torch.int8)
    out = cpu_vnni_mm.vnni_weight_mm(x, w, torch.ones(16), 8)
    assert relative_error(out, torch.full((17, 16), 127.0 * k)) < 1e-5


def test_the_int32_gemm_takes_in_features_whose_sums_fit_and_the_op_computes_the_rest():
    k = cpu_vnni_mm.INT_MM_MAX_IN_FEATURES + 16
    x, w, scale = torch.ones(17, k), torch.full((1, k), 127, dtype=torch.int8), torch.ones(1)
    with pytest.raises(ValueError, match="input features"):
        cpu_vnni_mm.int8_weight_int_mm(x, w, scale)
    assert relative_error(int8_weight_mm(x, w, scale), torch.full((17, 1), 127.0 * k)) < 1e-5


@pytest.mark.parametrize("m", [1, 17])
def test_no_input_features_give_zeros(m):
    assert not cpu_vnni_mm.supports(8, 0)
    out = int8_weight_mm(torch.randn(m, 0), torch.zeros(4, 0, dtype=torch.int8), torch.ones(4))
    assert torch.equal(out, torch.zeros(m, 4))


@pytest.mark.parametrize("m", [1, 4])  # the GEMV, the GEMM
# 1e-35: the 16-bit scale would underflow; 1e-42: a subnormal row, whose float32 outputs hold ~1% precision
@pytest.mark.parametrize("magnitude, tolerance", [(1e-35, 1e-3), (1e-42, 3e-2)])
def test_rows_too_small_to_scale_take_the_float_path(m, magnitude, tolerance):
    torch.manual_seed(0)
    packed, scale_zeros = _lowbit_weight(16, 64, 4, 32)
    x = torch.full((m, 64), magnitude)
    assert cpu_vnni_mm.vnni_weight_mm(x, packed, scale_zeros, 4, 32) is None
    out = lowbit_weight_mm(x, packed, scale_zeros, None, 4, 32)
    expected = lowbit_weight_mm_reference(x.double(), packed, scale_zeros.double(), 4)
    assert torch.isfinite(out).all() and relative_error(out, expected) < tolerance


@pytest.mark.parametrize("bits, group_size", [(4, 9), (4, 12), (2, 19), (2, 8)])  # not whole 32-bit words
def test_groups_that_are_not_whole_words_are_not_served(bits, group_size):
    assert not cpu_vnni_mm.supports(bits, group_size * 4, group_size)


def test_tensors_off_the_cpu_are_refused_before_their_pointers_are_read():
    w, scale = _int8_weight(16, 128)
    with pytest.raises(ValueError, match="CPU tensors"):
        cpu_vnni_mm.vnni_weight_mm(torch.randn(1, 128), w, scale.to("meta"), 8)
    with pytest.raises(ValueError, match="CPU tensors"):
        cpu_vnni_mm.int8_weight_int_mm(torch.randn(20, 128), w.to("meta"), scale)


def test_the_ops_refuse_scales_and_biases_on_another_device_than_the_weight():
    """The ops check what the kernels they call without a second check would read as host pointers."""
    w, scale = _int8_weight(16, 128)
    packed, scale_zeros = _lowbit_weight(16, 128, 4, 32)
    x, bias = torch.randn(1, 128), torch.randn(16)
    with pytest.raises(ValueError, match="scale must hold 16 float per-channel scales on cpu"):
        int8_weight_mm(x, w, scale.to("meta"), bias)
    with pytest.raises(ValueError, match=r"bias must be a \(16,\) tensor on cpu"):
        int8_weight_mm(x, w, scale, bias.to("meta"))
    with pytest.raises(ValueError, match=r"bias must be a \(16,\) tensor on cpu"):
        lowbit_weight_mm(x, packed, scale_zeros, None, 4, 32, bias.to("meta"))
    with pytest.raises(ValueError, match="scale_zeros on meta"):
        lowbit_weight_mm(x, packed, scale_zeros.to("meta"), None, 4, 32, bias)


def test_the_ops_refuse_an_integer_bias():
    # The CUDA kernels add the bias in float32 and take float ones only; every device refuses the same.
    w, scale = _int8_weight(16, 128)
    packed, scale_zeros = _lowbit_weight(16, 128, 4, 32)
    x, bias = torch.randn(1, 128), torch.ones(16, dtype=torch.int32)
    with pytest.raises(TypeError, match="bias must be a float tensor, got torch.int32"):
        int8_weight_mm(x, w, scale, bias)
    with pytest.raises(TypeError, match="bias must be a float tensor, got torch.int32"):
        lowbit_weight_mm(x, packed, scale_zeros, None, 4, 32, bias)


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.float16])
def test_the_kernels_write_float32_whatever_torch_s_default_dtype(default_dtype):
    """The output and x-scale buffers are float32 however torch.set_default_dtype was called (a float64
    buffer read the kernels' float32 as garbage; a 16-bit one would overflow)."""
    from quanto_fx.kernels import cpu_float8_mm

    torch.manual_seed(0)
    w, scale = _int8_weight(16, 128)
    x, x_large_m = torch.randn(1, 128), torch.randn(20, 128)
    w8, scale8 = (torch.randn(16, 128) * 0.5).to(torch.float8_e5m2), torch.rand(16)
    expected = (
        per_channel_weight_mm_reference(x, w, scale),
        per_channel_weight_mm_reference(x_large_m, w, scale),
        per_channel_weight_mm_reference(x, w8, scale8),
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        outs = (
            cpu_vnni_mm.vnni_weight_mm(x, w, scale, 8),
            cpu_vnni_mm.int8_weight_int_mm(x_large_m, w, scale),
            cpu_float8_mm.float8_weight_mm(x, w8, scale8),
        )
    finally:
        torch.set_default_dtype(previous)
    # the float8 GEMV computes in float16 on CPUs with AVX512-FP16
    tolerances = (VNNI_TOLERANCE, VNNI_TOLERANCE, cpu_float8_mm.FLOAT16_ERROR)
    for out, reference, tolerance in zip(outs, expected, tolerances):
        assert out.dtype == torch.float32 and relative_error(out, reference) < tolerance


def test_a_workspace_that_cannot_be_allocated_raises_memory_error():
    def kernel():
        return 2  # the C++ entry points' status for std::bad_alloc

    with pytest.raises(MemoryError, match="workspace"):
        cpu_vnni_mm._run(kernel)
