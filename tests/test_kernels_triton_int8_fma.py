"""The int8 weights' CUDA-core decode kernel (``int8_gemv_fma_kernel``): against the reference in the Triton
interpreter, the launcher's checks and choice of kernel, compiled for an H100 without one, and on a GPU. The
reference, operands and tolerances are the other int8 kernel's (test_kernels_triton_lowbit)."""

import re

import pytest
import torch

from .test_kernels_triton_lowbit import TOLERANCE, assert_matches_int8_reference, make_int8_operands
from .test_kernels_triton_lowbit_fma import TYPES, Recorder, fma_config_id, k_loop
from .utils import INTERPRETING, assert_passes_in_the_interpreter, compile_for_sm90, requires_cuda

triton = pytest.importorskip("triton")
from quanto_fx.kernels import triton_int8_weight_mm  # noqa: E402
from quanto_fx.kernels.triton_gemv_fma_x import MAX_GRID_Y  # noqa: E402
from quanto_fx.kernels.triton_int8_gemv_fma import int8_gemv_fma_kernel  # noqa: E402
from quanto_fx.kernels.triton_int8_weight_mm import (  # noqa: E402
    INT8_FMA_CONFIGS,
    INT8_FMA_MAX_M,
    _int8_fma_reads,
    int8_weight_mm_triton,
)


@pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child pytest")
@pytest.mark.usefixtures("_interpreter_numpy_fix", "_interpreter_bfloat16_fix")
class TestInt8FmaInterpreted:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=TYPES.get)
    @pytest.mark.parametrize("slices", [1, 2, 4])
    @pytest.mark.parametrize("k", [64, 72])
    def test_matches_reference(self, k, slices, dtype):
        # K = 64: a whole number of steps (EVEN_K); K = 72: the last step's words past K load zero. M = 1 and
        # 3 (a program per row), N = 40 a partial tile.
        config = {"BLOCK_N": 16, "BLOCK_B": 16, "SLICES": slices}
        for m in (1, 3):
            x, w, scale = make_int8_operands(m, 40, k, dtype, seed=m + k)
            out = int8_weight_mm_triton(x, w, scale, config)
            assert_matches_int8_reference(out, x, w, scale)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=TYPES.get)
    def test_reads_every_code(self, dtype):
        # x = identity: out.T is w * scale (float32, rounded once to x's dtype), bit for bit, for all 256
        # codes, -128 and 127 included, in every byte position of a word.
        k = 64
        w = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).reshape(4, k)
        w = torch.cat([w, w.roll(1, dims=1), w.roll(2, dims=1), w.roll(3, dims=1)])
        scale = torch.rand(w.shape[0]) + 0.5
        config = {"BLOCK_N": 16, "BLOCK_B": 32, "SLICES": 2}
        out = int8_weight_mm_triton(torch.eye(k, dtype=dtype), w, scale, config)
        assert torch.equal(out.T, (w.float() * scale[:, None]).to(dtype))

    @pytest.mark.parametrize("fdtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=TYPES.get)
    def test_float8_weights(self, dtype, fdtype):
        # x = identity, unit scales: out.T is each finite code's value, exact in x's dtype, bit for bit (every
        # float8 value is a float16 one; bfloat16 holds e5m2's, and e4m3fn's to 2**-9 = the smallest
        # subnormal, so a code that does not fit would show). Then random weights against the reference.
        k = 64
        codes = torch.arange(256, dtype=torch.uint8).view(fdtype)
        finite = codes[torch.isfinite(codes.float())]
        w = torch.cat([finite, finite.new_zeros(-finite.numel() % k)]).reshape(-1, k)  # every one, 0-padded
        config = {"BLOCK_N": 16, "BLOCK_B": 32, "SLICES": 2}
        out = int8_weight_mm_triton(torch.eye(k, dtype=dtype), w, torch.ones(w.shape[0]), config)
        assert torch.equal(out.T, w.float().to(dtype))
        x = torch.randn(1, 96).to(dtype)
        w, scale = (torch.randn(40, 96) * 0.5).to(fdtype), torch.rand(40) + 0.5
        assert_matches_int8_reference(int8_weight_mm_triton(x, w, scale, config), x, w, scale)

    def test_bias_strided_operands_and_a_column_scale(self):
        # x rows further apart than K (16-byte aligned), w's rows too (starting 4 bytes in), scale (N, 1), a
        # strided bfloat16 bias added in float32.
        m, n, k = 3, 40, 128
        x, w, scale = make_int8_operands(m, n, k, torch.float16, scale_2d=True)
        x_wide = torch.zeros(m, k + 8, dtype=torch.float16)
        x_wide[:, :k] = x
        w_wide = torch.zeros(n, k + 8, dtype=torch.int8)
        w_wide[:, 4 : 4 + k] = w
        bias = torch.randn(2 * n).to(torch.bfloat16)[::2]
        config = {"BLOCK_N": 8, "BLOCK_B": 32, "SLICES": 2}
        out = int8_weight_mm_triton(x_wide[:, :k], w_wide[:, 4 : 4 + k], scale, config, bias=bias)
        assert_matches_int8_reference(out, x, w, scale, bias)


@pytest.mark.skipif(INTERPRETING, reason="this is the interpreted run")
def test_int8_fma_kernel_in_the_interpreter():
    assert_passes_in_the_interpreter(__file__, "TestInt8FmaInterpreted")


# -- the launcher (no kernel runs) -----------------------------------------------------------------------


def test_autotuned_launches_pick_the_fma_kernel_for_m_1_int8_weights(monkeypatch):
    calls = []
    for name in ("_int8_fma_autotuned", "_int8_autotuned"):
        monkeypatch.setattr(triton_int8_weight_mm, name, Recorder(name, calls))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors get through the launcher's device check

    def kernel_for(x, w=None):
        w = make_int8_operands(1, 40, x.shape[1])[1] if w is None else w
        int8_weight_mm_triton(x, w, torch.rand(40))
        return calls[-1][0]

    for dtype in (torch.bfloat16, torch.float16):
        assert kernel_for(torch.randn(INT8_FMA_MAX_M, 64).to(dtype)) == "_int8_fma_autotuned"
    assert calls[-1][1]({"BLOCK_N": 16}) == (3, INT8_FMA_MAX_M)  # N tiles, then one program per row
    assert kernel_for(torch.randn(INT8_FMA_MAX_M + 1, 64).to(torch.bfloat16)) == "_int8_autotuned"
    assert kernel_for(torch.randn(1, 64)) == "_int8_autotuned"  # float32 x
    assert kernel_for(torch.randn(1, 66).to(torch.bfloat16)) == "_int8_autotuned"  # K not a multiple of 4
    x = torch.randn(1, 64).to(torch.bfloat16)
    assert kernel_for(x, torch.randn(40, 64).to(torch.float8_e4m3fn)) == "_int8_fma_autotuned"  # float8 too


def test_fma_kernel_reads_int8_rows_contiguous_and_4_byte_aligned():
    x = torch.randn(1, 64).to(torch.bfloat16)
    wide = torch.zeros(40, 72, dtype=torch.int8)
    assert _int8_fma_reads(x, wide[:, 4:68])  # rows 72 bytes apart, starting 4 bytes in
    assert not _int8_fma_reads(x, wide[:, 2:66])  # 2 bytes past 4-byte alignment
    assert not _int8_fma_reads(x, torch.zeros(40, 66, dtype=torch.int8)[:, :64])  # rows 66 bytes apart
    assert not _int8_fma_reads(x, torch.zeros(64, 40, dtype=torch.int8).T)  # K not contiguous
    assert not _int8_fma_reads(torch.randn(1, 64), wide[:, :64])  # float32 x
    assert not _int8_fma_reads(torch.randn(1, 72).to(torch.bfloat16)[:, 1:65], wide[:, :64])  # x misaligned


@pytest.mark.parametrize(
    "config, words",
    [
        ({"BLOCK_N": 16, "BLOCK_B": 16, "BLOCK_K": 16}, ["unknown", "BLOCK_K"]),
        ({"BLOCK_N": 12, "BLOCK_B": 16}, ["BLOCK_N", "power of two"]),
        ({"BLOCK_B": 16}, ["lacks", "BLOCK_N"]),
        ({"BLOCK_N": 16, "BLOCK_B": 2}, ["BLOCK_B = 2", "fewer than", "4 codes"]),
    ],
)
def test_bad_fma_configs_raise(config, words):
    x, w, scale = make_int8_operands(1, 40, 64, torch.bfloat16)
    with pytest.raises(ValueError) as info:
        int8_weight_mm_triton(x, w, scale, config)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_forced_fma_config_refuses_operands_it_cannot_read():
    x, w, scale = make_int8_operands(1, 40, 64, torch.bfloat16)
    config = {"BLOCK_N": 16, "BLOCK_B": 16}
    odd_w = torch.zeros(40, 66, dtype=torch.int8)[:, 2:]
    odd_w.copy_(w)
    cases = [
        (x.float(), w, "got torch.float32 x"),
        (x, odd_w, "starting 2 bytes past 4-byte alignment"),
        (torch.randn(1, 66).to(torch.bfloat16), torch.zeros(40, 66, dtype=torch.int8), "K = 66"),
        # a program per row: MAX_GRID_Y rows fill the grid's y axis
        (torch.randn(MAX_GRID_Y + 1, 64).to(torch.bfloat16), w, f"at most {MAX_GRID_Y} rows, got M = "),
    ]
    for x_case, w_case, words in cases:
        with pytest.raises(ValueError, match=re.escape(words)):
            int8_weight_mm_triton(x_case, w_case, scale, config)


# -- compiled for an H100, without one -------------------------------------------------------------------


def compile_int8_fma_for_h100(config, dtype, even_k=True, weights="i8"):
    constexprs = {
        **config.kwargs,
        "HAS_BIAS": True,
        "EVEN_K": even_k,
        **dict.fromkeys(("stride_xk", "stride_wk", "stride_s", "stride_b", "stride_on"), 1),
    }
    pointer_types = {"x_ptr": TYPES[dtype], "w_ptr": weights, "scale_ptr": "fp32", "bias_ptr": "fp32"}
    pointer_types["out_ptr"] = TYPES[dtype]
    divisible = ("N", "K", "stride_xm", "stride_wn", "stride_om")
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return compile_for_sm90(int8_gemv_fma_kernel, pointer_types, constexprs, divisible, **options)


@pytest.mark.skipif(INTERPRETING, reason="compiles, does not interpret")
@pytest.mark.parametrize("config", INT8_FMA_CONFIGS, ids=fma_config_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=TYPES.get)
@pytest.mark.parametrize("even_k", [True, False], ids=["even-k", "k-tail"])
def test_compiles_to_a_barrier_free_k_loop_without_conversions(even_k, dtype, config):
    ptx = compile_int8_fma_for_h100(config, dtype, even_k).asm["ptx"]
    assert "mma" not in ptx and "cp.async" not in ptx  # FMAs, loads straight to registers
    loop = k_loop(ptx)
    assert "bar.sync" not in loop  # x and the sums stay in the words' layout
    assert not re.search(r"cvt\.rn\.f32\.[su](8|16|32)\b", loop), "an int -> float conversion"
    kw = config.kwargs
    codes = kw["BLOCK_N"] * kw["SLICES"] * kw["BLOCK_B"] // (32 * config.num_warps)
    if even_k:  # a thread's weight bytes of a step load 16 bytes at a time, and x's (2 bytes a code) too
        vector_loads = re.findall(r"ld\.global(?:\.\w+)*\.v(?:4\.b32|2\.b64)", loop)
        assert len(vector_loads) == codes * 3 // 16
    # One AND a code keeps its byte, and the exponent of 2**23, where it lies in the word.
    ands = re.findall(r"and\.b32\s+%r\d+, %r\d+, (-?\d+);", loop)
    assert sum((int(mask) & 0xFFFFFFFF) >> 23 == 0x96 for mask in ands) == codes


@pytest.mark.skipif(INTERPRETING, reason="compiles, does not interpret")
@pytest.mark.parametrize("weights", ["fp8e4nv", "fp8e5"])
@pytest.mark.parametrize("even_k", [True, False], ids=["even-k", "k-tail"])
def test_float8_compiles_to_paired_hardware_conversions(even_k, weights):
    config = INT8_FMA_CONFIGS[0]
    loop = k_loop(compile_int8_fma_for_h100(config, torch.bfloat16, even_k, weights).asm["ptx"])
    assert "bar.sync" not in loop
    # Two codes a conversion to float16 (Hopper's cvt from a pair of float8), one to float32 each.
    kw = config.kwargs
    codes = kw["BLOCK_N"] * kw["SLICES"] * kw["BLOCK_B"] // (32 * config.num_warps)
    pair = {"fp8e4nv": "e4m3x2", "fp8e5": "e5m2x2"}[weights]
    assert len(re.findall(rf"cvt\.rn\.f16x2\.{pair}", loop)) == codes // 2


# -- on a GPU --------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("config", INT8_FMA_CONFIGS, ids=fma_config_id)
def test_every_int8_fma_config_on_gpu(config):
    # K = 4104 (x's rows a multiple of 8 apart, as the kernel reads them): the last step runs past K for
    # every config; N = 200 a partial tile.
    meta = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    for dtype in (torch.bfloat16, torch.float16):
        for m in (1, 3):
            x, w, scale = make_int8_operands(m, 200, 4104, dtype, "cuda", seed=m)
            out = int8_weight_mm_triton(x, w, scale, meta)
            assert_matches_int8_reference(out, x, w, scale)


@requires_cuda
@pytest.mark.parametrize("fdtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_float8_weights_on_gpu(fdtype):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 conversions need compute capability 8.9+")
    x = torch.randn(1, 4104, device="cuda").to(torch.bfloat16)
    w, scale = (torch.randn(200, 4104, device="cuda") * 0.5).to(fdtype), torch.rand(200, device="cuda") + 0.5
    for config in INT8_FMA_CONFIGS:
        meta = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
        assert_matches_int8_reference(int8_weight_mm_triton(x, w, scale, meta), x, w, scale)


@requires_cuda
def test_autotuned_m1_on_gpu_agrees_with_the_tensor_core_kernel():
    x, w, scale = make_int8_operands(1, 1024, 4096, torch.bfloat16, "cuda")
    bias = torch.randn(1024, device="cuda")
    fma = int8_weight_mm_triton(x, w, scale, bias=bias)
    tile = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256}
    tensor_cores = int8_weight_mm_triton(x, w, scale, tile, bias=bias)
    assert_matches_int8_reference(fma, x, w, scale, bias)
    err = (fma.float() - tensor_cores.float()).abs().max() / tensor_cores.float().abs().max()
    assert err <= TOLERANCE[torch.bfloat16]
