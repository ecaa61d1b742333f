"""The weight dequantization kernels of ``quanto_fx/kernels/triton_dequantize.py``, and the CUDA weight-only
ops' path through them at prefill sizes: interpreted on the CPU, compiled for an H100 without one, and on a
GPU where there is one.
"""

import re

import pytest
import torch

from .utils import INTERPRETING, assert_passes_in_the_interpreter, compile_for_sm90, requires_cuda

triton = pytest.importorskip("triton")
from quanto_fx.kernels import triton_dequantize, triton_int8_weight_mm, triton_lowbit_mm, weight_only  # noqa: E402
from quanto_fx.kernels.triton_dequantize import (  # noqa: E402
    dequantize_lowbit_triton,
    dequantize_per_channel_triton,
    lowbit_dequantize_kernel,
    per_channel_dequantize_kernel,
)

from .test_kernels_triton_lowbit import (  # noqa: E402
    TYPES,
    assert_matches_int8_reference,
    assert_matches_reference,
    make_int8_operands,
    make_operands,
    unpack_codes,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FUSED_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 2}


def assert_is_the_dequantized_weight(out, packed, scale_zeros, bits, group_size):
    """out (N, K) against (q - mid) * scale + zero with scale and zero rounded to out's dtype, computed in
    float32: each element within two roundings to out's dtype (an fma rounds once, the interpreter's
    multiply and add twice) of its terms' size."""
    codes = (unpack_codes(packed, bits) - 2 ** (bits - 1)).float()
    scale, zero = (scale_zeros[..., i].to(out.dtype).float().T for i in (0, 1))
    scale, zero = scale.repeat_interleave(group_size, 1), zero.repeat_interleave(group_size, 1)
    ref = codes * scale + zero
    bound = 2 * UNIT_ROUNDOFF[out.dtype] * ((codes * scale).abs() + zero.abs())
    assert out.shape == ref.shape
    assert ((out.float() - ref).abs() <= bound).all()


# -- the launchers' checks, and which path an op takes (no kernel runs) ---------------------------------


def test_bad_arguments_raise_naming_the_problem():
    x, packed, scale_zeros = make_operands(1, 40, 64, 4, 32)
    with pytest.raises(ValueError, match=r"out must be shaped like the weight, \(40, 64\)"):
        dequantize_lowbit_triton(packed, scale_zeros, 4, 32, torch.empty(40, 32))
    with pytest.raises(TypeError, match="out must be a float32, float16 or bfloat16 tensor, got torch.int32"):
        dequantize_lowbit_triton(packed, scale_zeros, 4, 32, torch.empty(40, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="group_size"):
        dequantize_lowbit_triton(packed, scale_zeros, 4, 48, torch.empty(40, 64))
    # the grid's second axis holds the K blocks, at most 65535 (int4 in groups of 16: 16 codes a block)
    k = 16 * 65536
    long_packed, long_scale_zeros = torch.zeros(1, k // 2, dtype=torch.uint8), torch.ones(k // 16, 1, 2)
    long_out = torch.empty(1, k, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"K = {k} input features make 65536 blocks of 16: .* at most 65535"):
        dequantize_lowbit_triton(long_packed, long_scale_zeros, 4, 16, long_out)
    _, w, scale = make_int8_operands(1, 40, 64)
    with pytest.raises(
        TypeError, match=r"w must be a 2-D int8 or float8 \(N, K\) tensor, got torch.int8 \(40, 64, 1\)"
    ):
        dequantize_per_channel_triton(w[..., None], scale, torch.empty(40, 64))
    with pytest.raises(TypeError, match="scale must be a float tensor, got torch.int32"):
        dequantize_per_channel_triton(w, scale.to(torch.int32), torch.empty(40, 64))
    with pytest.raises(ValueError, match="scale must hold N = 40 scales"):
        dequantize_per_channel_triton(w, scale[:39], torch.empty(40, 64))
    k = 128 * 65535 + 1
    with pytest.raises(ValueError, match=f"K = {k} input features make 65536 blocks of 128"):
        dequantize_per_channel_triton(
            torch.zeros(1, k, dtype=torch.int8), scale[:1], torch.empty(1, k, dtype=torch.bfloat16)
        )
    with pytest.raises(ValueError, match=r"out must be shaped like the weight, \(40, 64\)"):
        dequantize_per_channel_triton(w, scale, torch.empty(64, 40))


@pytest.mark.skipif(INTERPRETING, reason="CPU tensors are allowed in the interpreter")
def test_cpu_tensors_outside_the_interpreter_raise():
    _, packed, scale_zeros = make_operands(1, 40, 64, 4, 32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        dequantize_lowbit_triton(packed, scale_zeros, 4, 32, torch.empty(40, 64))


def test_ops_dequantize_from_the_threshold_in_blocks(monkeypatch):
    # The CUDA implementations with the kernels replaced by recorders: the fused kernel below
    # CUDA_DEQUANTIZED_GEMM_MIN_M rows, from it blocks of rows dequantized (here 16 rows of 64 float32, 4 KB).
    calls = []

    def fused(*args, **kwargs):
        calls.append("fused")
        return torch.zeros(args[0].shape[0], 40)

    def dequantize(*args):
        calls.append(("dequantize", tuple(args[-1].shape)))
        return args[-1].zero_()

    monkeypatch.setattr(triton_lowbit_mm, "lowbit_mm_triton_prechecked", fused)
    monkeypatch.setattr(triton_int8_weight_mm, "int8_weight_mm_triton_prechecked", fused)
    monkeypatch.setattr(triton_dequantize, "dequantize_lowbit_triton", dequantize)
    monkeypatch.setattr(triton_dequantize, "dequantize_per_channel_triton", dequantize)
    monkeypatch.setattr(weight_only, "CUDA_DEQUANTIZE_BLOCK_BYTES", 16 * 64 * 4)
    rows = weight_only.CUDA_DEQUANTIZED_GEMM_MIN_M
    blocks = [("dequantize", (16, 64)), ("dequantize", (16, 64)), ("dequantize", (8, 64))]
    for m in (rows - 1, rows):
        calls.clear()
        x, packed, scale_zeros = make_operands(m, 40, 64, 4, 32)
        out = weight_only.lowbit_weight_mm_cuda(x, packed, scale_zeros, None, 4, 32)
        assert calls == (["fused"] if m < rows else blocks) and out.shape == (m, 40)
        calls.clear()
        x, w, scale = make_int8_operands(m, 40, 64)
        out = weight_only.int8_weight_mm_cuda(x, w, scale)
        assert calls == (["fused"] if m < rows else blocks) and out.shape == (m, 40)


# -- interpreted -------------------------------------------------------------------------------------------


@pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child pytest")
@pytest.mark.usefixtures("_interpreter_numpy_fix", "_interpreter_bfloat16_fix")
class TestInterpreted:
    @pytest.mark.parametrize("dtype", DTYPES, ids=TYPES.get)
    @pytest.mark.parametrize("group_size", [16, 64])
    @pytest.mark.parametrize("bits", [4, 2])
    def test_lowbit_weights_are_the_fused_kernels(self, bits, group_size, dtype):
        # The fused GEMM on x = identity returns its own dequantized weight (exact products, one rounding of
        # each to x's dtype): both paths must see the same weights, bit for bit. N = 40: a partial row block.
        k = 2 * group_size
        _, packed, scale_zeros = make_operands(1, 40, k, bits, group_size, seed=bits + k)
        out = dequantize_lowbit_triton(packed, scale_zeros, bits, group_size, torch.empty(40, k, dtype=dtype))
        fused = triton_lowbit_mm.lowbit_mm_triton(
            torch.eye(k, dtype=dtype), packed, scale_zeros, bits, group_size, FUSED_CONFIG
        )
        assert torch.equal(out, fused.T)
        assert_is_the_dequantized_weight(out, packed, scale_zeros, bits, group_size)

    @pytest.mark.parametrize("bits", [4, 2])
    def test_lowbit_blocks_inside_large_groups_and_strided_operands(self, bits):
        # Groups of 256 codes: two 128-wide K blocks per group. packed and scale_zeros are views, out rows
        # lie further apart than K.
        n, k, g = 40, 512, 256
        _, packed, scale_zeros = make_operands(1, n, k, bits, g, torch.bfloat16)
        packed_wide = torch.zeros(n, packed.shape[1] + 8, dtype=torch.uint8)
        packed_wide[:, 3 : 3 + packed.shape[1]] = packed
        packed_view = packed_wide[:, 3 : 3 + packed.shape[1]]
        sz_n_first = scale_zeros.transpose(0, 1).contiguous().transpose(0, 1)
        out_wide = torch.full((n, k + 16), float("nan"), dtype=torch.bfloat16)
        out = dequantize_lowbit_triton(packed_view, sz_n_first, bits, g, out_wide[:, :k])
        assert not (packed_view.is_contiguous() or sz_n_first.is_contiguous() or out.is_contiguous())
        assert_is_the_dequantized_weight(out, packed, scale_zeros, bits, g)
        assert out_wide[:, k:].isnan().all()  # nothing written past the view

    @pytest.mark.parametrize("dtype", DTYPES, ids=TYPES.get)
    def test_int8_weights(self, dtype):
        # K = 200: a full 128-wide block and a masked 72-wide one; N = 40 a partial row block; the extreme
        # codes. w * scale in float32, rounded once to out's dtype.
        _, w, scale = make_int8_operands(1, 40, 200)
        w[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)
        out = dequantize_per_channel_triton(w, scale, torch.empty(40, 200, dtype=dtype))
        assert torch.equal(out, (w.float() * scale[:, None]).to(dtype))

    @pytest.mark.parametrize("fdtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
    def test_float8_weights_and_strided_operands(self, fdtype):
        # Every finite code, scales in bfloat16 with stride 2, w rows further apart than K.
        codes = torch.arange(256, dtype=torch.uint8).view(fdtype)
        finite = codes[torch.isfinite(codes.float())]
        w = finite[: finite.numel() // 48 * 48].reshape(-1, 48)
        n = w.shape[0]
        w_wide = torch.zeros(n, 64, dtype=torch.uint8).view(fdtype)
        w_wide[:, 5:53] = w
        scale = torch.stack([torch.rand(n) + 0.5, torch.zeros(n)], 1).to(torch.bfloat16)[:, 0]
        out = dequantize_per_channel_triton(w_wide[:, 5:53], scale, torch.empty(n, 48))
        assert torch.equal(out, w.float() * scale.float()[:, None])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=TYPES.get)
    @pytest.mark.parametrize("bits", [4, 2])
    def test_lowbit_op_at_prefill_sizes(self, bits, dtype, monkeypatch):
        # The op's CUDA implementation on CPU tensors: 3 blocks of 16 rows (the last one 8) and a bias added
        # by each block's GEMM.
        monkeypatch.setattr(weight_only, "CUDA_DEQUANTIZE_BLOCK_BYTES", 16 * 64 * dtype.itemsize)
        x, packed, scale_zeros = make_operands(
            weight_only.CUDA_DEQUANTIZED_GEMM_MIN_M, 40, 64, bits, 32, dtype
        )
        bias = torch.randn(40)
        out = weight_only.lowbit_weight_mm_cuda(x, packed, scale_zeros, None, bits, 32, bias)
        assert_matches_reference(out, x, packed, scale_zeros, bits, 32, bias.to(dtype))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=TYPES.get)
    def test_per_channel_op_at_prefill_sizes(self, dtype, monkeypatch):
        monkeypatch.setattr(weight_only, "CUDA_DEQUANTIZE_BLOCK_BYTES", 16 * 72 * dtype.itemsize)
        x, w, scale = make_int8_operands(weight_only.CUDA_DEQUANTIZED_GEMM_MIN_M + 3, 40, 72, dtype)
        bias = torch.randn(40)
        assert_matches_int8_reference(weight_only.int8_weight_mm_cuda(x, w, scale, bias), x, w, scale, bias)
        w8 = (torch.randn(40, 72) * 0.5).to(torch.float8_e4m3fn)  # float8: the same path, past the capability
        out = weight_only._per_channel_weight_mm_triton(x, w8, scale, None)
        assert_matches_int8_reference(out, x, w8, scale)

    def test_empty_weights(self):
        _, packed, scale_zeros = make_operands(1, 40, 0, 4, 32)
        assert dequantize_lowbit_triton(packed, scale_zeros, 4, 32, torch.empty(40, 0)).shape == (40, 0)
        x, w, scale = make_int8_operands(weight_only.CUDA_DEQUANTIZED_GEMM_MIN_M, 0, 64)
        assert weight_only.int8_weight_mm_cuda(x, w, scale).shape == (x.shape[0], 0)
        # K = 0 through the op: the empty sum, the bias alone.
        x, packed, scale_zeros = make_operands(weight_only.CUDA_DEQUANTIZED_GEMM_MIN_M, 40, 0, 4, 32)
        bias = torch.randn(40)
        out = weight_only.lowbit_weight_mm_cuda(x, packed, scale_zeros, None, 4, 32, bias)
        assert torch.equal(out, bias.expand(x.shape[0], 40))


@pytest.mark.skipif(INTERPRETING, reason="this is the interpreted run")
def test_dequantize_kernels_in_the_interpreter():
    assert_passes_in_the_interpreter(__file__, "TestInterpreted")


# -- compiled for an H100, without one ---------------------------------------------------------------------


BLOCKS = {"BLOCK_N": triton_dequantize.BLOCK_N, "BLOCK_K": triton_dequantize.BLOCK_K}


@pytest.mark.skipif(INTERPRETING, reason="compiles, does not interpret")
@pytest.mark.parametrize("dtype", DTYPES, ids=TYPES.get)
@pytest.mark.parametrize("bits", [4, 2])
def test_lowbit_compiles_to_wide_stores_without_conversions(bits, dtype):
    constexprs = {"BITS": bits, "GROUP_SIZE": 128, **BLOCKS, "stride_pk": 1, "stride_sc": 1, "stride_ok": 1}
    pointers = {"packed_ptr": "u8", "scale_zeros_ptr": "fp32", "out_ptr": TYPES[dtype]}
    kernel = compile_for_sm90(lowbit_dequantize_kernel, pointers, constexprs, ("N", "stride_pn", "stride_on"))
    ptx = kernel.asm["ptx"]
    # The bandwidth: 16-byte stores of the output, the packed bytes loaded several to an instruction.
    assert "st.global.v4.b32" in ptx and not re.search(r"st\.global\.(b|u)(8|16)\b", ptx)
    assert not re.search(r"ld\.global\.(b|u)8\b", ptx)
    # The codes become floats by the fused kernels' bit trick, not int -> float conversions.
    assert not re.search(r"cvt\.rn\.(f16|bf16|f32)\.[su](8|16|32)\b", ptx), "an int -> float conversion"


@pytest.mark.skipif(INTERPRETING, reason="compiles, does not interpret")
@pytest.mark.parametrize("weight_type", ["i8", "fp8e4nv", "fp8e5"])
def test_per_channel_compiles_to_wide_stores(weight_type):
    constexprs = {**BLOCKS, "stride_wk": 1, "stride_s": 1, "stride_ok": 1}
    pointers = {"w_ptr": weight_type, "scale_ptr": "fp32", "out_ptr": "bf16"}
    divisible = ("N", "K", "stride_wn", "stride_on")
    ptx = compile_for_sm90(per_channel_dequantize_kernel, pointers, constexprs, divisible).asm["ptx"]
    assert "st.global.v4.b32" in ptx and "ld.global.v4.b32" in ptx
    if weight_type != "i8":  # Hopper's float8 conversions, two values an instruction
        assert re.search(r"cvt\.rn\.f16x2\.e(4m3|5m2)x2", ptx)


# -- on a GPU ----------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("m", [128, 300])
@pytest.mark.parametrize("bits", [4, 2])
def test_lowbit_op_at_prefill_sizes_on_gpu(m, bits):
    for dtype in DTYPES:
        x, packed, scale_zeros = make_operands(m, 4096, 4096, bits, 128, dtype, device="cuda")
        bias = torch.randn(4096, device="cuda")
        out = torch.ops.quanto_fx.lowbit_weight_mm(x, packed, scale_zeros, None, bits, 128, bias)
        assert_matches_reference(out, x, packed, scale_zeros, bits, 128, bias.to(dtype))
    x, packed, scale_zeros = make_operands(m, 1000, 4096, bits, 64, torch.bfloat16, device="cuda")
    out = torch.ops.quanto_fx.lowbit_weight_mm(x, packed, scale_zeros, None, bits, 64)
    assert_matches_reference(out, x, packed, scale_zeros, bits, 64)
    # The same weights as the fused kernel, bit for bit (x = identity).
    k = 256
    _, packed, scale_zeros = make_operands(1, 1000, k, bits, 64, device="cuda")
    eye = torch.eye(k, dtype=torch.bfloat16, device="cuda")
    fused = triton_lowbit_mm.lowbit_mm_triton(eye, packed, scale_zeros, bits, 64)
    out = dequantize_lowbit_triton(packed, scale_zeros, bits, 64, torch.empty_like(fused.T))
    assert torch.equal(out, fused.T)


@requires_cuda
@pytest.mark.parametrize("bits", [4, 2])
def test_the_two_paths_agree_within_the_output_rounding_on_gpu(bits):
    # The same weights (the fused kernels' _dequantize), sums in float32 in another order, one rounding each
    # to bfloat16 (a bfloat16 bias is exact in both): M = 127 takes the fused kernel, M = 128 the other path.
    rows = weight_only.CUDA_DEQUANTIZED_GEMM_MIN_M
    x, packed, scale_zeros = make_operands(rows, 4096, 4096, bits, 128, torch.bfloat16, device="cuda")
    bias = torch.randn(4096, device="cuda").to(torch.bfloat16)
    dequantized = torch.ops.quanto_fx.lowbit_weight_mm(x, packed, scale_zeros, None, bits, 128, bias)
    fused = torch.ops.quanto_fx.lowbit_weight_mm(x[:-1], packed, scale_zeros, None, bits, 128, bias)
    torch.testing.assert_close(dequantized[:-1], fused, rtol=2.0**-7, atol=1e-3 * fused.abs().max().item())


@requires_cuda
@pytest.mark.parametrize("m", [128, 300])
def test_per_channel_ops_at_prefill_sizes_on_gpu(m):
    for dtype in DTYPES:
        x, w, scale = make_int8_operands(m, 4096, 4104, dtype, device="cuda")
        bias = torch.randn(4096, device="cuda")
        assert_matches_int8_reference(
            torch.ops.quanto_fx.int8_weight_mm(x, w, scale, bias), x, w, scale, bias
        )
    if torch.cuda.get_device_capability() >= (8, 9):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        w8 = (torch.randn(1000, 4096, device="cuda") * 0.5).to(torch.float8_e4m3fn)
        scale = torch.rand(1000, device="cuda") + 0.5
        out = torch.ops.quanto_fx.float8_weight_mm(x, w8, scale)
        assert_matches_int8_reference(out, x, w8, scale)
