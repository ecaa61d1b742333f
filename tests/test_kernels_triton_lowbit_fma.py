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
from quanto_fx.kernels.triton_gemv_fma_x import MAX_GRID_Y  # noqa: E402
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
        # K = 3 groups, one slice each: with 2 or 4 slices the last step runs past K. M = 1 (one row a
        # program) and 3 (two rows a program: the second program reads row 2 twice and stores it once), N = 40
        # a partial column tile.
        config = {"BLOCK_N": 16, "BLOCK_B": group_bytes(bits, group_size), "SLICES": slices}
        for m in (1, 3):
            run_fma(m, 40, 3 * group_size, bits, group_size, config, dtype, seed=m)

    @pytest.mark.parametrize("bits", [4, 2])
    def test_slices_within_a_group(self, bits):
        # Two slices per group of 64 (BLOCK_B half a group's bytes), two groups a step: slices share a group's
        # scale and zero.
        config = {"BLOCK_N": 8, "BLOCK_B": group_bytes(bits, 64) // 2, "SLICES": 4}
        run_fma(2, 40, 256, bits, 64, config, torch.bfloat16)

    @pytest.mark.parametrize("slices", [1, 2])
    @pytest.mark.parametrize("bits", [4, 2])
    def test_steps_within_a_group(self, bits, slices):
        # A quarter of a group's bytes a slice, one or two slices a step: steps start inside a group.
        config = {"BLOCK_N": 16, "BLOCK_B": group_bytes(bits, 64) // 4, "SLICES": slices}
        run_fma(1, 40, 192, bits, 64, config, torch.float16)

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
        # x rows further apart than K (still 16-byte aligned), the weight's rows too (starting 4 bytes in),
        # scale_zeros stored (N, K // g, 2), a strided bfloat16 bias added in float32.
        m, n, k, bits, g = 3, 40, 128, 4, 32
        x, packed, scale_zeros = make_operands(m, n, k, bits, g, torch.float16)
        x_wide = torch.zeros(m, k + 8, dtype=torch.float16)
        x_wide[:, :k] = x
        packed_wide = torch.zeros(n, k // 2 + 8, dtype=torch.uint8)
        packed_wide[:, 4 : 4 + k // 2] = packed
        sz_n_first = scale_zeros.transpose(0, 1).contiguous().transpose(0, 1)
        bias = torch.randn(2 * n).to(torch.bfloat16)[::2]
        config = {"BLOCK_N": 16, "BLOCK_B": 16, "SLICES": 2}
        out = lowbit_mm_triton(
            x_wide[:, :k], packed_wide[:, 4 : 4 + k // 2], sz_n_first, bits, g, config, bias=bias
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
    # N tiles, then a program per two rows (ROWS, the kernel's heuristic: min(M, 2))
    assert calls[-1][1]({"BLOCK_N": 16, "ROWS": min(FMA_MAX_M, 2)}) == (3, triton.cdiv(FMA_MAX_M, 2))
    rows = triton_lowbit_mm._fma_with_even_k.values["ROWS"]
    assert [rows({"M": m}) for m in (1, 2, 3)] == [1, 2, 2]
    assert kernel_for(torch.randn(FMA_MAX_M + 1, 64).to(torch.bfloat16)) == "_gemv_autotuned"
    assert kernel_for(torch.randn(1, 64)) == "_gemv_autotuned"  # float32 x
    misaligned = torch.randn(1, 72).to(torch.bfloat16)[:, 1:65]
    assert kernel_for(misaligned) == "_gemv_autotuned"
    # int4 weight rows starting at an odd byte: the CUDA-core kernel reads two bytes at a time.
    _, packed, scale_zeros = make_operands(1, 40, 64, 4, 32)
    odd_packed = torch.zeros(40, 33, dtype=torch.uint8)[:, 1:]
    odd_packed.copy_(packed)
    lowbit_mm_triton(torch.randn(1, 64).to(torch.bfloat16), odd_packed, scale_zeros, 4, 32)
    assert calls[-1][0] == "_gemv_autotuned"


def test_fma_kernel_reads_16_bit_rows_contiguous_and_aligned():
    packed = torch.zeros(40, 32, dtype=torch.uint8)
    assert _fma_reads(torch.randn(3, 72).to(torch.bfloat16)[:, :64], packed, 4)  # rows 144 bytes apart
    assert _fma_reads(torch.randn(1, 70).to(torch.float16)[:, :64], packed, 4)  # one row: stride unused
    assert not _fma_reads(torch.randn(3, 70).to(torch.bfloat16)[:, :64], packed, 4)  # rows 140 bytes apart
    assert not _fma_reads(torch.randn(1, 72).to(torch.bfloat16)[:, 1:65], packed, 4)  # 2 bytes past alignment
    assert not _fma_reads(torch.randn(64, 2).to(torch.bfloat16).T, packed, 4)  # K not contiguous
    assert not _fma_reads(torch.randn(2, 64), packed, 4)  # float32


def test_fma_kernel_reads_contiguous_packed_rows_in_units_of_four_codes():
    x = torch.randn(1, 64).to(torch.bfloat16)
    wide = torch.zeros(40, 34, dtype=torch.uint8)
    assert _fma_reads(x, wide[:, 2:], 4)  # int4 rows 2-byte aligned, 34 bytes apart
    assert not _fma_reads(x, wide[:, 1:33], 4)  # int4 rows starting at an odd byte
    assert _fma_reads(x, wide[:, 1:33], 2)  # int2 reads one byte at a time
    assert not _fma_reads(x, torch.zeros(40, 33, dtype=torch.uint8)[:, :32], 4)  # rows 33 bytes apart
    assert _fma_reads(x, torch.zeros(1, 33, dtype=torch.uint8)[:, :32], 4)  # one row: stride unused
    assert not _fma_reads(x, torch.zeros(32, 40, dtype=torch.uint8).T, 2)  # K not contiguous


@pytest.mark.parametrize(
    "config, words",
    [
        ({"BLOCK_N": 16, "BLOCK_B": 16, "BLOCK_M": 16}, ["unknown", "BLOCK_M"]),
        ({"BLOCK_N": 12, "BLOCK_B": 16}, ["BLOCK_N", "power of two"]),
        ({"BLOCK_B": 16}, ["lacks", "BLOCK_N"]),
        ({"BLOCK_N": 16, "BLOCK_B": 16, "SLICES": 3}, ["SLICES", "power of two"]),
        ({"BLOCK_N": 16, "BLOCK_B": 32}, ["BLOCK_B", "group", "at most 16"]),
        ({"BLOCK_N": 16, "BLOCK_B": 1}, ["BLOCK_B = 1", "fewer than", "4 codes"]),
    ],
)
def test_bad_fma_configs_raise(config, words):
    x, packed, scale_zeros = make_operands(1, 40, 64, 4, 32, torch.bfloat16)
    with pytest.raises(ValueError) as info:
        lowbit_mm_triton(x, packed, scale_zeros, 4, 32, config)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_forced_fma_config_refuses_operands_it_cannot_read():
    _, packed, scale_zeros = make_operands(1, 40, 64, 4, 32)
    config = {"BLOCK_N": 16, "BLOCK_B": 16}
    cases = [
        (torch.randn(1, 64), "float32"),
        (torch.randn(1, 72).to(torch.bfloat16)[:, 1:65], "starting 2 bytes past"),
        (torch.randn(2, 70).to(torch.bfloat16)[:, :64], "strides (70, 1)"),
        # two rows a program: 2 * MAX_GRID_Y rows fill the grid's y axis
        (torch.randn(2 * MAX_GRID_Y + 1, 64).to(torch.bfloat16), f"at most {2 * MAX_GRID_Y} rows, got M = "),
    ]
    for x, words in cases:
        with pytest.raises(ValueError, match=re.escape(words)):
            lowbit_mm_triton(x, packed, scale_zeros, 4, 32, config)
    odd_packed = torch.zeros(40, 33, dtype=torch.uint8)[:, 1:]
    odd_packed.copy_(packed)
    odd_start = "packed with strides (33, 1), starting 1 bytes past 2-byte"
    with pytest.raises(ValueError, match=re.escape(odd_start)):
        lowbit_mm_triton(torch.randn(1, 64).to(torch.bfloat16), odd_packed, scale_zeros, 4, 32, config)
    # int2 reads a byte at a time: no alignment is asked of its rows, nor reported
    _, packed2, scale_zeros2 = make_operands(1, 40, 64, 2, 32)
    with pytest.raises(ValueError, match=re.escape("and packed rows that are contiguous; got")):
        lowbit_mm_triton(torch.randn(1, 64), packed2, scale_zeros2, 2, 32, {**config, "BLOCK_B": 8})


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, 256])
def test_fma_configs_fit_the_group(group_size, bits, m):
    configs = _prune_fma_configs(FMA_CONFIGS, {"M": m}, BITS=bits, GROUP_SIZE=group_size)
    rows = min(m, 2)  # the kernel's ROWS
    assert configs == [fit_block_b(c, bits, group_size, rows) for c in FMA_CONFIGS]
    for config, fitted in zip(FMA_CONFIGS, configs):
        block_b, slices = fitted.kwargs["BLOCK_B"], fitted.kwargs["SLICES"]
        assert group_size % (block_b * (8 // bits)) == 0  # a slice's codes lie in one group
        expected = min(config.kwargs["BLOCK_B"], group_bytes(bits, group_size))
        if bits == 2 and rows == 2:  # int2 slices halved for two rows' registers
            expected //= 2
        assert block_b == expected
        assert slices == config.kwargs["SLICES"]


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
@pytest.mark.parametrize("even_k", [True, False], ids=["even-k", "k-tail"])
@pytest.mark.parametrize("rows", [1, 2])
def test_compiles_to_a_barrier_free_k_loop_on_the_cuda_cores(rows, even_k, bits, dtype, config):
    config = fit_block_b(config, bits, 128, rows)
    ptx = compile_for_h100(bits, 128, config, dtype, even_k, rows=rows).asm["ptx"]
    assert "mma" not in ptx and "cp.async" not in ptx  # FMAs, loads straight to registers
    loop = k_loop(ptx)
    # No barrier in the K loop: x and the sums stay in the bytes' layout, no trip through shared memory.
    assert "bar.sync" not in loop
    # A thread's bytes of a step, and x's words for them (2 * per_byte bytes a byte), load 16 bytes at a time.
    kw, per_byte = config.kwargs, 8 // bits
    step_bytes = kw["BLOCK_N"] * kw["SLICES"] * kw["BLOCK_B"] // (32 * config.num_warps)
    vector_loads = re.findall(r"ld\.global(?:\.\w+)*\.v(?:4\.b32|2\.b64)", loop)
    assert len(vector_loads) >= step_bytes * (1 + 2 * per_byte * rows) // 16
    assert not re.search(r"cvt\.rn\.f32\.[su](8|16|32)\b", loop), "an int -> float conversion"
    # One logic instruction a code: an AND keeps the code where it lies in its unit of four, and the exponent
    # of 2**23, OR-ed in once a unit (no shift of the weight, no second mask); once for both rows.
    codes = step_bytes * per_byte
    ands = re.findall(r"and\.b32\s+%r\d+, %r\d+, (-?\d+);", loop)
    assert sum((int(mask) & 0xFFFFFFFF) >> 23 == 0x96 for mask in ands) == codes
    assert len(re.findall(r"\bor\.b32\b", loop)) == codes // 4


# -- on a GPU --------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("config", FMA_CONFIGS, ids=fma_config_id)
@pytest.mark.parametrize("bits", [4, 2])
def test_every_fma_config_on_gpu(bits, config):
    # K = 5 groups of 64: the last step's slices run past K for 2 slices and more; N = 200 a partial tile.
    for m in (1, 3):
        fitted = fit_block_b(config, bits, 64, rows=min(m, 2))  # as the autotuner fits it for M
        meta = {**fitted.kwargs, "num_warps": fitted.num_warps, "num_stages": fitted.num_stages}
        for dtype in (torch.bfloat16, torch.float16):
            run_fma(m, 200, 320, bits, 64, meta, dtype, device="cuda", seed=m)


@requires_cuda
@pytest.mark.parametrize("bits, group_size", [(4, 16), (2, 16), (4, 128)])
def test_autotuned_m1_on_gpu_with_offset_x_bias_and_small_groups(bits, group_size):
    # x 16 bytes into a wider row takes the CUDA-core kernel; 2 bytes in, the tensor-core decode kernel.
    # Groups of 16: the configs' slices cut to 8 or 4 bytes (int2 reads x as 8-byte words).
    k, n = 512, 200
    x, packed, scale_zeros = make_operands(1, n, k, bits, group_size, torch.bfloat16, "cuda")
    bias = torch.randn(n, device="cuda")
    for offset in (8, 1):
        wide = torch.zeros(1, k + 24, dtype=torch.bfloat16, device="cuda")
        wide[:, offset : offset + k] = x
        out = lowbit_mm_triton(wide[:, offset : offset + k], packed, scale_zeros, bits, group_size, bias=bias)
        assert_matches_reference(out, x, packed, scale_zeros, bits, group_size, bias)
