"""The low-bit weights' CUDA-core decode kernel (``lowbit_gemv_fma_kernel``): against the reference in the
Triton interpreter, the launcher's checks and choice of kernel, compiled for an H100 without one, and on a
GPU. The reference, operands and compile helper are the other low-bit kernels' (test_kernels_triton_lowbit).
"""

import re

import pytest
import torch

from .test_kernels_triton_lowbit import (
    assert_matches_reference,
    compile_for_h100,
    dequantize_reference,
    make_operands,
)
from .utils import INTERPRETING, assert_passes_in_the_interpreter, requires_cuda

triton = pytest.importorskip("triton")
from quanto_fx.kernels import triton_lowbit_mm  # noqa: E402
from quanto_fx.kernels.triton_lowbit_gemv_fma import fit_block_b  # noqa: E402
from quanto_fx.kernels.triton_lowbit_mm import (  # noqa: E402
    FMA_CONFIGS,
    FMA_MAX_M,
    _fma_reads,
    _prune_fma_configs,
    lowbit_mm_triton,
)

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def group_bytes(bits: int, group_size: int) -> int:
    return group_size * bits // 8


def run_fma(m, n, k, bits, group_size, config, dtype, device="cpu", seed=0):
    x, packed, scale_zeros = make_operands(m, n, k, bits, group_size, dtype, device, seed)
    out = lowbit_mm_triton(x, packed, scale_zeros, bits, group_size, config)
    assert_matches_reference(out, x, packed, scale_zeros, bits, group_size)


def fma_config_id(config) -> str:
    kw = config.kwargs
    return f"n{kw['BLOCK_N']}-b{kw['BLOCK_B']}-s{kw['SLICES']}-w{config.num_warps}"


@pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child pytest")
@pytest.mark.usefixtures("_interpreter_numpy_fix", "_interpreter_bfloat16_fix")
class TestFmaInterpreted:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=TYPES.get)
    @pytest.mark.parametrize("slices", [1, 2, 4])
    @pytest.mark.parametrize("group_size", [32, 128])
    @pytest.mark.parametrize("bits", [4, 2])
    def test_matches_reference(self, bits, group_size, slices, dtype):
        # K = 3 groups, one slice each: with 2 or 4 slices the last step runs past K. M = 1 and 3 (a program
        # per row), N = 40 a partial column tile.
        config = {"BLOCK_N": 16, "BLOCK_B": group_bytes(bits, group_size), "SLICES": slices}
        for m in (1, 3):
            run_fma(m, 40, 3 * group_size, bits, group_size, config, dtype, seed=m)

    @pytest.mark.parametrize("bits", [4, 2])
    def test_slices_within_a_group(self, bits):
        # Two slices per group of 64 (BLOCK_B half a group's bytes): both read the group's scale and zero.
        config = {"BLOCK_N": 8, "BLOCK_B": group_bytes(bits, 64) // 2, "SLICES": 4}
        run_fma(2, 40, 256, bits, 64, config, torch.bfloat16)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=TYPES.get)
    @pytest.mark.parametrize("bits", [4, 2])
    def test_reads_the_weight(self, bits, dtype):
        # x = identity: out.T is the weight, dequantized in float32 from scale and zero in x's dtype, then
        # rounded to x's dtype, bit for bit (scale and zero chosen in x's dtype: both sides round once).
        k = 64
        _, packed, scale_zeros = make_operands(k, 40, k, bits, 16)
        scale_zeros = scale_zeros.to(dtype).float()
        config = {"BLOCK_N": 16, "BLOCK_B": group_bytes(bits, 16), "SLICES": 2}
        out = lowbit_mm_triton(torch.eye(k, dtype=dtype), packed, scale_zeros, bits, 16, config)
        expected = dequantize_reference(packed, scale_zeros, bits, 16).to(dtype)
        assert torch.equal(out.T, expected)

    def test_bias_and_strided_operands(self):
        # x rows further apart than K (still 16-byte aligned), the weight's rows too, scale_zeros stored
        # (N, K // g, 2), a strided bfloat16 bias added in float32.
        m, n, k, bits, g = 3, 40, 128, 4, 32
        x, packed, scale_zeros = make_operands(m, n, k, bits, g, torch.float16)
        x_wide = torch.zeros(m, k + 8, dtype=torch.float16)
        x_wide[:, :k] = x
        packed_wide = torch.zeros(n, k // 2 + 8, dtype=torch.uint8)
        packed_wide[:, 3 : 3 + k // 2] = packed
        sz_n_first = scale_zeros.transpose(0, 1).contiguous().transpose(0, 1)
        bias = torch.randn(2 * n).to(torch.bfloat16)[::2]
        config = {"BLOCK_N": 16, "BLOCK_B": 16, "SLICES": 2}
        out = lowbit_mm_triton(
            x_wide[:, :k], packed_wide[:, 3 : 3 + k // 2], sz_n_first, bits, g, config, bias=bias
        )
        assert_matches_reference(out, x, packed, scale_zeros, bits, g, bias)


@pytest.mark.skipif(INTERPRETING, reason="this is the interpreted run")
def test_fma_kernel_in_the_interpreter():
    assert_passes_in_the_interpreter(__file__, "TestFmaInterpreted")


# -- the launcher (no kernel runs) -----------------------------------------------------------------------


class Recorder:
    """Stands in for an autotuned kernel: records its name and grid."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, grid))


def test_autotuned_launches_pick_the_fma_kernel_for_the_smallest_m_with_16_bit_x(monkeypatch):
    calls = []
    for name in ("_fma_autotuned", "_gemv_autotuned", "_autotuned"):
        monkeypatch.setattr(triton_lowbit_mm, name, Recorder(name, calls))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors get through the launcher's device check

    def kernel_for(x):
        _, packed, scale_zeros = make_operands(1, 40, 64, 4, 32)
        lowbit_mm_triton(x, packed, scale_zeros, 4, 32)
        return calls[-1][0]

    for m in range(1, FMA_MAX_M + 1):
        for dtype in (torch.bfloat16, torch.float16):
            assert kernel_for(torch.randn(m, 64).to(dtype)) == "_fma_autotuned"
    assert calls[-1][1]({"BLOCK_N": 16}) == (3, FMA_MAX_M)  # N tiles, then one program per row
    assert kernel_for(torch.randn(FMA_MAX_M + 1, 64).to(torch.bfloat16)) == "_gemv_autotuned"
    assert kernel_for(torch.randn(1, 64)) == "_gemv_autotuned"  # float32 x
    misaligned = torch.randn(1, 72).to(torch.bfloat16)[:, 1:65]
    assert kernel_for(misaligned) == "_gemv_autotuned"


def test_fma_kernel_reads_16_bit_rows_contiguous_and_aligned():
    assert _fma_reads(torch.randn(3, 72).to(torch.bfloat16)[:, :64])  # rows 144 bytes apart
    assert _fma_reads(torch.randn(1, 70).to(torch.float16)[:, :64])  # one row: its stride is never used
    assert not _fma_reads(torch.randn(3, 70).to(torch.bfloat16)[:, :64])  # rows 140 bytes apart
    assert not _fma_reads(torch.randn(1, 72).to(torch.bfloat16)[:, 1:65])  # 2 bytes past 16-byte alignment
    assert not _fma_reads(torch.randn(64, 2).to(torch.bfloat16).T)  # K not contiguous
    assert not _fma_reads(torch.randn(2, 64))  # float32


@pytest.mark.parametrize(
    "config, dtype, words",
    [
        ({"BLOCK_N": 16, "BLOCK_B": 16, "BLOCK_M": 16}, torch.bfloat16, ["unknown", "BLOCK_M"]),
        ({"BLOCK_N": 12, "BLOCK_B": 16}, torch.bfloat16, ["BLOCK_N", "power of two"]),
        ({"BLOCK_B": 16}, torch.bfloat16, ["BLOCK_N", "None"]),
        ({"BLOCK_N": 16, "BLOCK_B": 16, "SLICES": 3}, torch.bfloat16, ["SLICES", "power of two"]),
        ({"BLOCK_N": 16, "BLOCK_B": 32}, torch.bfloat16, ["BLOCK_B", "group", "at most 16"]),
        ({"BLOCK_N": 16, "BLOCK_B": 16}, torch.float32, ["16-bit", "float32"]),
    ],
)
def test_bad_fma_configs_raise(config, dtype, words):
    x, packed, scale_zeros = make_operands(1, 40, 64, 4, 32, dtype)
    with pytest.raises(ValueError) as info:
        lowbit_mm_triton(x, packed, scale_zeros, 4, 32, config)
    message = str(info.value)
    assert all(w.replace("16-bit", "bfloat16 / float16") in message for w in words), message


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, 256])
def test_fma_configs_fit_the_group(group_size, bits):
    configs = _prune_fma_configs(FMA_CONFIGS, {"M": 1}, BITS=bits, GROUP_SIZE=group_size)
    assert configs and len(configs) <= len(FMA_CONFIGS)
    for c in configs:
        assert group_size % (c.kwargs["BLOCK_B"] * (8 // bits)) == 0  # a slice's codes lie in one group
        assert c.kwargs["BLOCK_B"] == min(64, group_bytes(bits, group_size))


# -- compiled for an H100, without one -------------------------------------------------------------------


def k_loop(ptx: str) -> str:
    """The PTX from the kernel's one loop label to the branch back to it."""
    for branch in re.finditer(r"bra\s+(\$L__BB\d+_\d+);", ptx):
        start = ptx.find(branch.group(1) + ":")
        if 0 <= start < branch.start():
            return ptx[start : branch.start()]
    raise AssertionError("no loop in the PTX")


@pytest.mark.skipif(INTERPRETING, reason="compiles, does not interpret")
@pytest.mark.parametrize("config", FMA_CONFIGS, ids=fma_config_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=TYPES.get)
@pytest.mark.parametrize("bits", [4, 2])
def test_compiles_to_a_barrier_free_k_loop_on_the_cuda_cores(bits, dtype, config):
    kernel = compile_for_h100(bits, 128, fit_block_b(config, bits, 128), dtype)
    ptx = kernel.asm["ptx"]
    assert "mma" not in ptx and "cp.async" not in ptx  # FMAs, loads straight to registers
    # The K loop: from its label to the branch back to it. No barrier in it (x and the sums stay in the
    # bytes' layout: no trip through shared memory), and the weight and x load 16 bytes at a time.
    loop = k_loop(ptx)
    assert "bar.sync" not in loop
    assert len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.b(?:32|64)", loop)) >= 2
    assert not re.search(r"cvt\.rn\.f32\.[su](8|16|32)\b", loop), "an int -> float conversion"


# -- on a GPU --------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("config", FMA_CONFIGS, ids=fma_config_id)
@pytest.mark.parametrize("bits", [4, 2])
def test_every_fma_config_on_gpu(bits, config):
    # K = 5 groups of 64: the last step's slices run past K for 2 slices and more; N = 200 a partial tile.
    config = fit_block_b(config, bits, 64)
    meta = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    for dtype in (torch.bfloat16, torch.float16):
        for m in (1, 3):
            run_fma(m, 200, 320, bits, 64, meta, dtype, device="cuda", seed=m)
