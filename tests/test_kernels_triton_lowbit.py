"""The low-bit (int4 / int2) and int8 weight-only Triton kernels without a GPU (interpreter, compiled for an
H100) and, where there is one, on it.

The reference below is written from the format in ``quanto_fx/kernels/triton_lowbit_mm.py``'s docstring, in
plain torch: unpack the codes with shifts, dequantize per group, ``x.float() @ w.T``; for int8,
``x.float() @ (w.float() * scale[:, None]).T``.
"""

import re

import pytest
import torch

from .utils import INTERPRETING, assert_passes_in_the_interpreter, compile_for_sm90, config_id, requires_cuda

triton = pytest.importorskip("triton")
from quanto_fx.kernels.triton_int8_weight_mm import (  # noqa: E402
    INT8_CONFIG_TIERS,
    INT8_CONFIGS,
    _prune_int8_configs,
    int8_weight_mm_kernel,
    int8_weight_mm_triton,
)
from quanto_fx.kernels.triton_lowbit_gemv_fma import lowbit_gemv_fma_kernel  # noqa: E402
from quanto_fx.kernels.triton_lowbit_mm import (  # noqa: E402
    CONFIG_TIERS,
    CONFIGS,
    FLOAT32_MAX_SLICES,
    GEMV_CONFIGS,
    _fit_block_k,
    _forced_lowbit_config,
    _prune_configs,
    _prune_gemv_configs,
    lowbit_gemv_kernel,
    lowbit_mm_kernel,
    lowbit_mm_triton,
    min_block_k,
)

# -- the format, in plain torch ------------------------------------------------------------------------


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) codes in [0, 2**bits) -> uint8 (N, K // per_byte), code k at bit (k % per_byte) * bits."""
    per_byte = 8 // bits
    q = q.to(torch.int32).reshape(q.shape[0], -1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=q.device) * bits
    return (q << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (N, K // per_byte) -> int32 codes (N, K)."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & (2**bits - 1)
    return codes.reshape(packed.shape[0], -1)


def dequantize_reference(packed, scale_zeros, bits: int, group_size: int) -> torch.Tensor:
    """w (N, K) float32: (q - 2**(bits - 1)) * scale + zero, scale and zero of group k // group_size."""
    q = unpack_codes(packed, bits)
    scale = scale_zeros[..., 0].float().T.repeat_interleave(group_size, dim=1)
    zero = scale_zeros[..., 1].float().T.repeat_interleave(group_size, dim=1)
    return (q - 2 ** (bits - 1)).float() * scale + zero


def lowbit_mm_reference(x, packed, scale_zeros, bits: int, group_size: int) -> torch.Tensor:
    """x @ w.T in float32."""
    return x.float() @ dequantize_reference(packed, scale_zeros, bits, group_size).T


def make_operands(m, n, k, bits, group_size, dtype=torch.float32, device="cpu", seed=0):
    """x (M, K) of ``dtype``, random codes packed (N, K // per_byte), float32 scale_zeros (K // g, N, 2)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    packed = pack_codes(torch.randint(0, 2**bits, (n, k), generator=gen), bits)
    scale = torch.rand(k // group_size, n, generator=gen) * 0.1 + 0.01
    zero = torch.randn(k // group_size, n, generator=gen) * 0.05
    scale_zeros = torch.stack([scale, zero], dim=-1)
    return x.to(device), packed.to(device), scale_zeros.to(device)


# Triton's names of the float dtypes (test ids, compile signatures).
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# Relative error allowed: max |out - reference| / max |reference|. float32 sums in another order; with 16-bit
# x the output, each group's scale and zero and each weight are rounded to x's dtype (bfloat16: up to 2**-8
# relative each; measured up to 5e-3 in the interpreter).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_matches_reference(out, x, packed, scale_zeros, bits, group_size, bias=None):
    ref = lowbit_mm_reference(x.cpu(), packed.cpu(), scale_zeros.cpu(), bits, group_size)
    ref = ref if bias is None else ref + bias.cpu().float()
    assert out.dtype == x.dtype and out.shape == ref.shape
    err = (out.cpu().float() - ref).abs().max() / ref.abs().max()
    assert err <= TOLERANCE[x.dtype], f"relative error {err:.3g}"


def run(m, n, k, bits, group_size, config, dtype=torch.float32, device="cpu", seed=0):
    x, packed, scale_zeros = make_operands(m, n, k, bits, group_size, dtype, device, seed)
    out = lowbit_mm_triton(x, packed, scale_zeros, bits, group_size, config)
    assert_matches_reference(out, x, packed, scale_zeros, bits, group_size)


# -- the reference's own format checks (no kernel) -------------------------------------------------------


def test_unpack_reads_the_documented_bit_layout():
    # Least significant bits first: byte 0x21 holds int4 codes 1 (k = 0) and 2 (k = 1); 0b11_10_01_00 holds
    # int2 codes 0, 1, 2, 3.
    assert unpack_codes(torch.tensor([[0x21, 0xF0]], dtype=torch.uint8), 4).tolist() == [[1, 2, 0, 15]]
    assert unpack_codes(torch.tensor([[0b11100100]], dtype=torch.uint8), 2).tolist() == [[0, 1, 2, 3]]
    packed = torch.tensor([[0x21]], dtype=torch.uint8)
    scale_zeros = torch.tensor([[[0.5, 1.0]]])  # one group of K = 2 (fine for the reference)
    assert dequantize_reference(packed, scale_zeros, 4, 2).tolist() == [
        [(1 - 8) * 0.5 + 1, (2 - 8) * 0.5 + 1]
    ]


@pytest.mark.parametrize("bits", [4, 2])
def test_pack_unpack_round_trip(bits):
    q = torch.randint(0, 2**bits, (5, 64))
    packed = pack_codes(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), q.to(torch.int32))


def test_reference_agrees_with_the_library_format():
    # The format is shared with quanto_fx.tensor (PackedQTensor): same bytes, same dequantization.
    from quanto_fx.tensor.groupwise import dequantize_groupwise
    from quanto_fx.tensor.packing import pack, unpack

    for bits in (4, 2):
        _, packed, scale_zeros = make_operands(1, 24, 128, bits, 32, seed=bits)
        codes = unpack_codes(packed, bits)
        assert torch.equal(pack(codes, bits), packed)
        assert torch.equal(unpack(packed, bits).to(torch.int32), codes)
        expected = dequantize_groupwise(codes, scale_zeros, bits)
        torch.testing.assert_close(dequantize_reference(packed, scale_zeros, bits, 32), expected)


# -- bad inputs: checked before any launch ---------------------------------------------------------------


def _bad_inputs():
    x, packed, sz = make_operands(3, 40, 64, 4, 32)
    g = 32
    return [
        # (id, args, exception, words the message must contain)
        ("packed-int8", (x, packed.to(torch.int8), sz, 4, g), TypeError, ["packed", "uint8"]),
        ("scale_zeros-shape", (x, packed, sz[:, :-1], 4, g), ValueError, ["scale_zeros", "(2, 40, 2)"]),
        ("scale_zeros-transposed", (x, packed, sz.transpose(0, 1), 4, g), ValueError, ["scale_zeros"]),
        ("scale_zeros-int", (x, packed, sz.to(torch.int32), 4, g), TypeError, ["scale_zeros"]),
        (
            "K-not-multiple-of-group",
            (x[:, :48], packed[:, :24], sz[:1], 4, g),
            ValueError,
            ["group_size", "48"],
        ),
        ("packed-width", (x, packed[:, :16], sz, 4, g), ValueError, ["packed", "(N, 32)"]),
        ("packed-for-int2", (x, packed, sz, 2, g), ValueError, ["packed", "bits = 2"]),
        ("packed-1d", (x, packed.flatten(), sz, 4, g), ValueError, ["packed"]),
        ("x-int8", (x.to(torch.int8), packed, sz, 4, g), TypeError, ["x must be a 2-d float32", "int8"]),
        ("x-3d", (x[None], packed, sz, 4, g), TypeError, ["x must be a 2-d", "(1, 3, 64)"]),
        ("bits-3", (x, packed, sz, 3, g), ValueError, ["bits"]),
        ("bits-8", (x, packed, sz, 8, g), ValueError, ["bits"]),
        ("group-48", (x, packed, sz, 4, 48), ValueError, ["group_size", "power of two"]),
        ("group-8", (x, packed, sz, 4, 8), ValueError, ["group_size"]),
        ("group-float", (x, packed, sz, 4, 32.0), TypeError, ["group_size"]),
        ("packed-on-meta", (x, packed.to("meta"), sz, 4, g), ValueError, ["packed is on meta"]),
    ]


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("args, exc, words", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_problem(args, exc, words):
    with pytest.raises(exc) as info:
        lowbit_mm_triton(*args)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "config, words",
    [
        ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, ["BLOCK_K", ">= 32"]),  # 8 bytes of K: under tl.dot's
        ({"BLOCK_M": 16, "BLOCK_N": 8, "BLOCK_K": 32}, ["BLOCK_N"]),
        ({"BLOCK_M": 24, "BLOCK_N": 16, "BLOCK_K": 32}, ["BLOCK_M"]),
        ({"BLOCK_M": 16, "BLOCK_N": 16}, ["lacks", "BLOCK_K"]),
        ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "block_n": 16}, ["unknown", "block_n"]),
        ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SLICES": 0}, ["SLICES", ">= 1"]),
        ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SLICES": 3}, ["SLICES", "power of two"]),
        ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2}, ["unknown", "SPLIT_K"]),
        ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SLICES": 2, "GROUP_M": 4}, ["GROUP_M", "decode"]),
        ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SLICES": 8}, ["SLICES = 8", "float32", "at most 4"]),
    ],
    ids=[
        "BLOCK_K-16",
        "BLOCK_N-8",
        "BLOCK_M-24",
        "missing",
        "unknown-key",
        "SLICES-0",
        "SLICES-3",
        "SPLIT_K",
        "GROUP_M-with-SLICES",
        "SLICES-8-float32",
    ],
)
def test_bad_configs_raise(config, words):
    with pytest.raises(ValueError) as info:
        lowbit_mm_triton(*make_operands(3, 40, 64, 4, 32), 4, 32, config)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "bias, exc, words",
    [
        (torch.ones(40, dtype=torch.int32), TypeError, ["bias must be a float", "int32"]),
        (torch.ones(39), ValueError, ["bias must be a (40,) tensor", "(39,)"]),
        (torch.ones(1, 40), ValueError, ["bias must be a (40,) tensor", "(1, 40)"]),
        (torch.ones(40, device="meta"), ValueError, ["bias must be a (40,) tensor on cpu", "on meta"]),
        ([1.0] * 40, TypeError, ["bias must be a float tensor", "list"]),
    ],
    ids=["int", "short", "2d", "meta", "list"],
)
def test_bad_bias_raises_naming_the_problem(bias, exc, words):
    for call in (
        lambda: lowbit_mm_triton(*make_operands(3, 40, 64, 4, 32), 4, 32, bias=bias),
        lambda: int8_weight_mm_triton(*make_int8_operands(3, 40, 64), bias=bias),
    ):
        with pytest.raises(exc) as info:
            call()
        for word in words:
            assert word in str(info.value)


def test_forced_configs_pick_the_kernel_and_a_warp_per_slice():
    base = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}
    meta, options = _forced_lowbit_config({**base, "SLICES": 8}, 4, torch.bfloat16)
    assert meta == {**base, "SLICES": 8} and options == {"num_warps": 8, "num_stages": 3}
    meta, options = _forced_lowbit_config({**base, "SLICES": 2, "num_warps": 4}, 4, torch.bfloat16)
    assert options["num_warps"] == 4
    meta, options = _forced_lowbit_config(base, 4, torch.float32)  # no SLICES: the GEMM, with GROUP_M
    assert meta == {**base, "GROUP_M": 8} and options == {"num_warps": 4, "num_stages": 3}


@pytest.mark.skipif(INTERPRETING, reason="CPU tensors are allowed in the interpreter")
def test_cpu_tensors_outside_the_interpreter_raise():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        lowbit_mm_triton(*make_operands(3, 40, 64, 4, 32), 4, 32)


# -- int8 weights: reference, operands, bad inputs ---------------------------------------------------------


def per_channel_weight_mm_reference(x, w, scale) -> torch.Tensor:
    """x @ (w * scale[:, None]).T in float32."""
    return x.float() @ (w.float() * scale.float().reshape(-1, 1)).T


def make_int8_operands(m, n, k, dtype=torch.float32, device="cpu", seed=0, scale_2d=False):
    """x (M, K) of ``dtype``, int8 w (N, K) in [-127, 127], float32 scale (N,) or (N, 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
    scale = torch.rand(n, generator=gen) * 0.01 + 0.001
    if scale_2d:
        scale = scale[:, None]
    return x.to(device), w.to(device), scale.to(device)


def assert_matches_int8_reference(out, x, w, scale, bias=None):
    ref = per_channel_weight_mm_reference(x.cpu(), w.cpu(), scale.cpu()).float()
    ref = ref if bias is None else ref + bias.cpu().float()
    assert out.dtype == x.dtype and out.shape == ref.shape
    err = (out.cpu().float() - ref).abs().max() / ref.abs().max()
    assert err <= TOLERANCE[x.dtype], f"relative error {err:.3g}"


def run_int8(m, n, k, config, dtype=torch.float32, device="cpu", seed=0, scale_2d=False):
    x, w, scale = make_int8_operands(m, n, k, dtype, device, seed, scale_2d)
    out = int8_weight_mm_triton(x, w, scale, config)
    assert_matches_int8_reference(out, x, w, scale)


def _bad_int8_inputs():
    x, w, scale = make_int8_operands(3, 40, 64)
    return [
        # (id, args, exception, words the message must contain)
        (
            "w-uint8",
            (x, w.to(torch.uint8), scale),
            TypeError,
            ["w must have dtype torch.int8 or a float8", "uint8"],
        ),
        ("w-float", (x, w.float(), scale), TypeError, ["w must have dtype", "float32"]),
        ("w-1d", (x, w.flatten(), scale), ValueError, ["w must be 2-D", "(2560,)"]),
        ("w-K-mismatch", (x, w[:, :32], scale), ValueError, ["K = 64", "(40, 32)"]),
        ("w-transposed", (x, w.T, scale), ValueError, ["w must be 2-D (N, K)", "(64, 40)"]),
        ("scale-int", (x, w, scale.to(torch.int32)), TypeError, ["scale must be a float", "int32"]),
        ("scale-size", (x, w, scale[:39]), ValueError, ["N = 40", "(39,)"]),
        ("scale-1xN", (x, w, scale[None]), ValueError, ["scale", "(40, 1)", "(1, 40)"]),
        ("scale-3d", (x, w, scale[:, None, None]), ValueError, ["scale", "(40, 1, 1)"]),
        ("scale-0d", (x, w[:1], scale[0]), ValueError, ["scale", "(1,) or (1, 1)", "got ()"]),
        ("x-int8", (x.to(torch.int8), w, scale), TypeError, ["x must be a 2-d float32", "int8"]),
        ("x-float64", (x.double(), w, scale), TypeError, ["x must be a 2-d float32", "float64"]),
        ("x-1d", (x[0], w, scale), TypeError, ["x must be a 2-d", "(64,)"]),
        ("x-list", (x.tolist(), w, scale), TypeError, ["x must be a torch.Tensor"]),
        ("w-on-meta", (x, w.to("meta"), scale), ValueError, ["w is on meta"]),
        ("scale-on-meta", (x, w, scale.to("meta")), ValueError, ["scale is on meta"]),
    ]


BAD_INT8_INPUTS = _bad_int8_inputs()


@pytest.mark.parametrize(
    "args, exc, words", [c[1:] for c in BAD_INT8_INPUTS], ids=[c[0] for c in BAD_INT8_INPUTS]
)
def test_int8_bad_inputs_raise_naming_the_problem(args, exc, words):
    with pytest.raises(exc) as info:
        int8_weight_mm_triton(*args)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "config, words",
    [
        ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 8}, ["BLOCK_K", ">= 16"]),
        ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 48}, ["BLOCK_K", "power of two"]),
        ({"BLOCK_M": 16, "BLOCK_N": 8, "BLOCK_K": 32}, ["BLOCK_N"]),
        ({"BLOCK_M": 16, "BLOCK_N": 16}, ["lacks", "BLOCK_K"]),
        ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "bits": 8}, ["unknown", "bits"]),
    ],
    ids=["BLOCK_K-8", "BLOCK_K-48", "BLOCK_N-8", "missing", "unknown-key"],
)
def test_int8_bad_configs_raise(config, words):
    with pytest.raises(ValueError) as info:
        int8_weight_mm_triton(*make_int8_operands(3, 40, 64), config)
    for word in words:
        assert word in str(info.value)


@pytest.mark.skipif(INTERPRETING, reason="CPU tensors are allowed in the interpreter")
def test_int8_cpu_tensors_outside_the_interpreter_raise():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        int8_weight_mm_triton(*make_int8_operands(3, 40, 64))


def test_autotuned_launches_pick_the_decode_kernel_up_to_16_rows(monkeypatch):
    # Which autotuned kernel a launch takes, without running one: the two autotuners record their calls.
    from quanto_fx.kernels import triton_lowbit_mm

    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.name, grid))

    monkeypatch.setattr(triton_lowbit_mm, "_gemv_autotuned", Recorder("gemv"))
    monkeypatch.setattr(triton_lowbit_mm, "_autotuned", Recorder("gemm"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors get through the launcher's device check
    for m in (1, 16, 17, 64):
        lowbit_mm_triton(*make_operands(m, 40, 64, 4, 32), 4, 32)
    assert [name for name, _ in calls] == ["gemv", "gemv", "gemm", "gemm"]
    # The decode grid: N tiles first, then M tiles.
    assert calls[0][1]({"BLOCK_M": 16, "BLOCK_N": 16}) == (3, 1)
    assert calls[2][1]({"BLOCK_M": 16, "BLOCK_N": 16}) == (6,)


# M -> the tier its launch autotunes over, written out at each tier's edges: decode up to 16 rows, one row
# tile up to 64, prefill past it.
TIER_OF_M = {1: 16, 16: 16, 17: 64, 64: 64, 65: None, 4096: None}


@pytest.mark.parametrize("m", TIER_OF_M)
def test_int8_pruned_configs_are_the_tier(m):
    assert _prune_int8_configs(INT8_CONFIGS, {"M": m}) == INT8_CONFIG_TIERS[TIER_OF_M[m]]


# -- autotuning configs (no kernel) -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=TYPES.get)
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, 256])
def test_decode_configs_fit_the_group(group_size, bits, dtype):
    x = torch.empty(1, 256, dtype=dtype)
    configs = _prune_gemv_configs(GEMV_CONFIGS, {"M": 1, "x_ptr": x}, BITS=bits, GROUP_SIZE=group_size)
    # each config fitted, none lost: the (tile, slices, warps, stages) of GEMV_CONFIGS, BLOCK_K aside
    shape = lambda c: (c.kwargs["BLOCK_N"], c.kwargs["SLICES"], c.num_warps, c.num_stages)  # noqa: E731
    assert sorted(map(shape, configs)) == sorted(map(shape, GEMV_CONFIGS))
    for c in configs:
        block_k = c.kwargs["BLOCK_K"]
        assert c.kwargs["BLOCK_M"] == 16 and block_k >= min_block_k(bits)
        assert group_size % block_k == 0 or block_k == min_block_k(bits) > group_size
        assert c.kwargs["SLICES"] >= c.num_warps  # a warp's K range is its own (see the kernel)
        # float32 x: the configs whose tiles fit an H100's shared memory (test_float32_compiles_without_tf32)
        assert dtype != torch.float32 or c.kwargs["SLICES"] <= 4


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("m", [17, 64, 65, 4096])  # (M <= 16 takes the decode kernels' configs)
def test_pruned_configs_fit_the_group_and_the_tier(m, group_size, bits):
    configs = _prune_configs(CONFIGS, {"M": m}, BITS=bits, GROUP_SIZE=group_size)
    tier = CONFIG_TIERS[TIER_OF_M[m]]
    assert configs and len(configs) <= len(tier)
    for c in configs:  # in one group when the group allows it, else the smallest block tl.dot takes
        block_k = c.kwargs["BLOCK_K"]
        assert block_k >= min_block_k(bits)
        assert group_size % block_k == 0 or block_k == min_block_k(bits) > group_size
    keys = [(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in configs]
    assert len(set(keys)) == len(keys)
    # Same tiles as the tier's, BLOCK_K aside.
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs} == {
        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in tier
    }


# -- the interpreter (CPU) -------------------------------------------------------------------------------

# Small tiles so that the shapes below span several tiles in M, N and K, with a partial tile in M and N
# (N = 40), and several K blocks per group (group_size 128).
# BLOCK_K = 64 is int2's smallest (16 bytes of K); below it the group size decides the path: groups of 128
# hold two K blocks (one scale and zero per column), groups of 32 take one per byte and column.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 2}
# The decode kernel's (SLICES added by each test): the same tiles, no GROUP_M (it orders the GEMM's tiles).
DECODE_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}


@pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child pytest")
@pytest.mark.usefixtures("_interpreter_numpy_fix", "_interpreter_bfloat16_fix")
class TestInterpreted:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    @pytest.mark.parametrize("group_size", [32, 128])
    @pytest.mark.parametrize("m", [1, 3, 16, 33])
    @pytest.mark.parametrize("bits", [4, 2])
    def test_matches_reference(self, bits, m, group_size, dtype):
        # K = 2 groups; N = 40 leaves a partial N tile.
        run(m, 40, 2 * group_size, bits, group_size, INTERPRETER_CONFIG, dtype, seed=m)

    @pytest.mark.parametrize("bits", [4, 2])
    def test_one_k_block_per_group_and_wide_tiles(self, bits):
        # BLOCK_K = group_size; BLOCK_N and BLOCK_M wider than N = 40 and M = 5.
        run(5, 40, 256, bits, 64, {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, torch.bfloat16)

    def test_several_row_tiles_and_groups_of_tiles(self):
        # 70 rows: 5 row tiles, GROUP_M = 2 leaves a partial group of row tiles; 3 column tiles.
        run(70, 40, 64, 4, 32, INTERPRETER_CONFIG)

    def test_float16(self):
        run(3, 40, 128, 4, 64, INTERPRETER_CONFIG, torch.float16)

    @pytest.mark.parametrize("bits", [4, 2])
    def test_reads_the_weight(self, bits):
        # x = identity: out.T is the dequantized weight itself, element by element.
        # Groups of 16 under a 64-wide K block that K = 32 ends inside: the masked, dequantize-first path.
        k = 32
        x, packed, scale_zeros = make_operands(k, 40, k, bits, 16)
        out = lowbit_mm_triton(torch.eye(k), packed, scale_zeros, bits, 16, INTERPRETER_CONFIG)
        torch.testing.assert_close(
            out.T, dequantize_reference(packed, scale_zeros, bits, 16), rtol=1e-6, atol=0
        )

    @pytest.mark.parametrize(
        "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
    )
    @pytest.mark.parametrize("slices", [1, 2, 4])
    @pytest.mark.parametrize("group_size", [32, 128])
    @pytest.mark.parametrize("bits", [4, 2])
    def test_decode_kernel(self, bits, group_size, slices, dtype):
        # K = 512: 8 blocks of 64 taken 1, 2 or 4 at a time (4 slices: two K steps). M = 1 and 17 (two row
        # tiles), N = 40 a partial column tile.
        config = {**DECODE_CONFIG, "SLICES": slices}
        for m in (1, 17):
            run(m, 40, 512, bits, group_size, config, dtype, seed=m)

    @pytest.mark.parametrize("slices", [2, 4])
    def test_decode_kernel_with_slices_past_k(self, slices):
        # K = 192 = 3 blocks of 64: the last K step's slices run past K (2 slices: the second step's second;
        # 4: the one step's last), groups of 64 (one per slice) and of 32 (per byte).
        for group_size in (64, 32):
            run(3, 40, 192, 4, group_size, {**DECODE_CONFIG, "SLICES": slices}, torch.bfloat16)

    @pytest.mark.parametrize("bits", [4, 2])
    def test_decode_kernel_reads_the_weight(self, bits):
        # As test_reads_the_weight, through the decode kernel: 2 slices, K = 96 ends inside the second.
        k = 96
        x, packed, scale_zeros = make_operands(k, 40, k, bits, 16)
        config = {**DECODE_CONFIG, "SLICES": 2}
        out = lowbit_mm_triton(torch.eye(k), packed, scale_zeros, bits, 16, config)
        torch.testing.assert_close(
            out.T, dequantize_reference(packed, scale_zeros, bits, 16), rtol=1e-6, atol=0
        )

    def test_k_ending_inside_a_block(self):
        # Groups of 32 under 64-wide K blocks, K = 96: the second block is half masked.
        run(3, 40, 96, 4, 32, INTERPRETER_CONFIG)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=TYPES.get)
    @pytest.mark.parametrize("slices", [None, 2], ids=["gemm", "decode"])
    def test_bias(self, slices, dtype):
        # Added in float32 in each kernel's epilogue; a bias in another float dtype than x's.
        config = INTERPRETER_CONFIG if slices is None else {**DECODE_CONFIG, "SLICES": slices}
        x, packed, scale_zeros = make_operands(3, 40, 256, 4, 64, dtype)
        bias = torch.randn(40).to(torch.bfloat16 if dtype == torch.float32 else torch.float32)
        out = lowbit_mm_triton(x, packed, scale_zeros, 4, 64, config, bias=bias)
        assert_matches_reference(out, x, packed, scale_zeros, 4, 64, bias)
        # The empty sum: the bias alone.
        x, packed, scale_zeros = x[:, :0], packed[:, :0], scale_zeros[:0]
        out = lowbit_mm_triton(x, packed, scale_zeros, 4, 64, config, bias=bias)
        torch.testing.assert_close(out, bias.to(dtype).expand(3, 40), rtol=0, atol=0)

    @pytest.mark.parametrize("slices", [None, 2], ids=["gemm", "decode"])
    def test_strided_operands(self, slices):
        m, n, k, bits, g = 5, 40, 128, 4, 32
        config = INTERPRETER_CONFIG if slices is None else {**DECODE_CONFIG, "SLICES": slices}
        x, packed, scale_zeros = make_operands(m, n, k, bits, g)
        x_t = x.T.contiguous().T  # column-major x
        packed_wide = torch.zeros(n, k // 2 + 8, dtype=torch.uint8)
        packed_wide[:, 3 : 3 + k // 2] = packed  # rows of packed further apart than K // 2
        sz_n_first = scale_zeros.transpose(0, 1).contiguous().transpose(0, 1)  # stored (N, K // g, 2)
        packed_view = packed_wide[:, 3 : 3 + k // 2]
        assert not (x_t.is_contiguous() or packed_view.is_contiguous() or sz_n_first.is_contiguous())
        bias = torch.randn(2 * n)[::2]  # a strided bias too
        out = lowbit_mm_triton(x_t, packed_view, sz_n_first, bits, g, config, bias=bias)
        assert_matches_reference(out, x, packed, scale_zeros, bits, g, bias)

    def test_bfloat16_scale_zeros(self):
        x, packed, scale_zeros = make_operands(3, 40, 64, 2, 32, torch.bfloat16)
        scale_zeros = scale_zeros.to(torch.bfloat16)
        out = lowbit_mm_triton(x, packed, scale_zeros, 2, 32, INTERPRETER_CONFIG)
        assert_matches_reference(out, x, packed, scale_zeros, 2, 32)

    def test_empty_operands(self):
        x, packed, scale_zeros = make_operands(0, 40, 64, 4, 32)
        assert lowbit_mm_triton(x, packed, scale_zeros, 4, 32, INTERPRETER_CONFIG).shape == (0, 40)
        x, packed, scale_zeros = make_operands(3, 40, 0, 4, 32)
        out = lowbit_mm_triton(x, packed, scale_zeros, 4, 32, INTERPRETER_CONFIG)
        assert torch.equal(out, torch.zeros(3, 40))


@pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child pytest")
@pytest.mark.usefixtures("_interpreter_numpy_fix", "_interpreter_bfloat16_fix")
class TestInt8Interpreted:
    @pytest.mark.parametrize("scale_2d", [False, True], ids=["scale-N", "scale-Nx1"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    @pytest.mark.parametrize("n", [24, 40])
    @pytest.mark.parametrize("k", [40, 64])
    @pytest.mark.parametrize("m", [1, 3, 16, 33])
    def test_matches_reference(self, m, k, n, dtype, scale_2d):
        # BLOCK_K = 32: K = 40 is a full block and an 8-wide tail; N = 24 and 40 end in partial N tiles.
        run_int8(m, n, k, INTERPRETER_CONFIG, dtype, scale_2d=scale_2d, seed=m + k + n)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=TYPES.get)
    def test_reads_the_weight(self, dtype):
        # x = identity: out.T is w * scale (float32, rounded once to x's dtype), element by element; the
        # extreme codes -128 and 127 included. Each dtype has its own path from int8 to float (float16: bits).
        k = 40
        x, w, scale = make_int8_operands(k, 24, k)
        w[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)
        out = int8_weight_mm_triton(torch.eye(k, dtype=dtype), w, scale, INTERPRETER_CONFIG)
        torch.testing.assert_close(out.T, (w.float() * scale[:, None]).to(dtype), rtol=0, atol=0)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=TYPES.get)
    def test_bias(self, dtype):
        # K = 200: 7 blocks of 32, the last one 8 wide; a bias in another float dtype than x's.
        x, w, scale = make_int8_operands(5, 40, 200, dtype)
        bias = torch.randn(40).to(torch.bfloat16 if dtype == torch.float32 else torch.float32)
        out = int8_weight_mm_triton(x, w, scale, {**INTERPRETER_CONFIG, "BLOCK_K": 32}, bias=bias)
        assert_matches_int8_reference(out, x, w, scale, bias)
        # The empty sum: the bias alone.
        out = int8_weight_mm_triton(x[:, :0], w[:, :0], scale, INTERPRETER_CONFIG, bias=bias)
        torch.testing.assert_close(out, bias.to(dtype).expand(5, 40), rtol=0, atol=0)

    def test_float16_and_a_16_bit_scale(self):
        x, w, scale = make_int8_operands(3, 40, 64, torch.float16)
        out = int8_weight_mm_triton(x, w, scale.to(torch.bfloat16), INTERPRETER_CONFIG)
        assert_matches_int8_reference(out, x, w, scale.to(torch.bfloat16))

    def test_wide_tiles_one_short_k_block(self):
        # BLOCK_K = 64 > K = 40: the only K block is the tail; tiles wider than M and N.
        run_int8(5, 24, 40, {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, torch.bfloat16)

    def test_strided_operands(self):
        m, n, k = 5, 40, 72
        x, w, scale = make_int8_operands(m, n, k)
        x_t = x.T.contiguous().T  # column-major x
        w_wide = torch.zeros(n, k + 8, dtype=torch.int8)
        w_wide[:, 3 : 3 + k] = w  # rows of w further apart than K
        scale_strided = torch.stack([scale, -scale], dim=1)[:, 0]  # stride 2
        w_view = w_wide[:, 3 : 3 + k]
        assert not (x_t.is_contiguous() or w_view.is_contiguous() or scale_strided.is_contiguous())
        out = int8_weight_mm_triton(x_t, w_view, scale_strided, INTERPRETER_CONFIG)
        assert_matches_int8_reference(out, x, w, scale)

    @pytest.mark.parametrize("fdtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    def test_float8_weights(self, fdtype, dtype):
        """float8 weights go through the same kernel (float8_weight_mm on CUDA): every finite code is read
        exactly (x = identity), and products match the float reference."""
        k = 64
        codes = torch.arange(256, dtype=torch.uint8).view(fdtype)
        finite = codes[torch.isfinite(codes.float())]  # 254 (e4m3fn) or 248 (e5m2) codes
        w = finite[: finite.numel() // k * k].reshape(-1, k)  # 3 rows of 64 codes
        # Unit scales: each output is a code's value, exact in x's dtype whatever the output rounding.
        out = int8_weight_mm_triton(torch.eye(k, dtype=dtype), w, torch.ones(w.shape[0]), INTERPRETER_CONFIG)
        torch.testing.assert_close(out.T.float(), w.float(), rtol=0, atol=0)
        x = torch.randn(5, 96).to(dtype)
        w, scale = (torch.randn(40, 96) * 0.5).to(fdtype), torch.rand(40) + 0.5
        out = int8_weight_mm_triton(x, w, scale, INTERPRETER_CONFIG)
        assert_matches_int8_reference(out, x, w, scale)

    def test_empty_operands(self):
        x, w, scale = make_int8_operands(0, 40, 64)
        assert int8_weight_mm_triton(x, w, scale, INTERPRETER_CONFIG).shape == (0, 40)
        x, w, scale = make_int8_operands(3, 0, 64)
        assert int8_weight_mm_triton(x, w, scale, INTERPRETER_CONFIG).shape == (3, 0)
        x, w, scale = make_int8_operands(3, 40, 0)
        assert torch.equal(int8_weight_mm_triton(x, w, scale, INTERPRETER_CONFIG), torch.zeros(3, 40))


@pytest.mark.skipif(INTERPRETING, reason="this is the interpreted run")
def test_lowbit_kernel_in_the_interpreter():
    assert_passes_in_the_interpreter(__file__, "TestInterpreted", "TestInt8Interpreted")


# -- compiled for an H100, without one -------------------------------------------------------------------

# H100's most shared memory for one block (227 KiB): a config over it fails to launch (OutOfResources).
H100_MAX_SHARED = 232448


def compile_for_h100(bits, group_size, config, dtype, even_k=True, has_bias=True, rows=1):
    """The compiled kernel (PTX, metadata) for sm_90, as a launch with contiguous operands specializes it: the
    CUDA-core decode kernel for a config with BLOCK_B, the decode kernel for one with SLICES, else the GEMM;
    with a float32 bias unless ``has_bias=False``; the CUDA-core kernel with ``rows`` rows a program."""
    if "BLOCK_B" in config.kwargs:
        kernel = lowbit_gemv_fma_kernel
    else:
        kernel = lowbit_gemv_kernel if "SLICES" in config.kwargs else lowbit_mm_kernel
    # Ints equal to 1 become constants; pointers, N, K and the other strides (multiples of 16 for the usual
    # K and N) carry a divisibility hint; stride_sn (2) carries none.
    unit_strides = ("stride_xk", "stride_pk", "stride_sc", "stride_b", "stride_on")
    constexprs = {
        **config.kwargs,
        "BITS": bits,
        "GROUP_SIZE": group_size,
        "HAS_BIAS": has_bias,
        "EVEN_K": even_k,
        "ROWS": rows,  # the CUDA-core kernel's
        **dict.fromkeys(unit_strides, 1),
    }
    constexprs = {name: value for name, value in constexprs.items() if name in kernel.arg_names}
    pointer_types = {
        "x_ptr": TYPES[dtype],
        "packed_ptr": "u8",
        "scale_zeros_ptr": "fp32",
        "bias_ptr": "fp32",
        "out_ptr": TYPES[dtype],
    }
    divisible = ("N", "K", "stride_xm", "stride_pn", "stride_sg", "stride_om")
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return compile_for_sm90(kernel, pointer_types, constexprs, divisible, **options)


def _unique(configs):
    return list({config_id(c): c for c in configs}.values())


@pytest.mark.skipif(INTERPRETING, reason="compiles, does not interpret")
@pytest.mark.parametrize("config", _unique(GEMV_CONFIGS + CONFIGS), ids=config_id)
@pytest.mark.parametrize("bits", [4, 2])
def test_compiles_to_hopper_bf16_tensor_cores(bits, config):
    kernel = compile_for_h100(bits, 128, _fit_block_k(config, bits, 128), torch.bfloat16)
    ptx = kernel.asm["ptx"]
    if config.kwargs["BLOCK_M"] >= 64:
        assert re.search(r"wgmma\.mma_async\S*\.f32\.bf16\.bf16", ptx), "no bf16 wgmma"
    else:  # a 16- or 32-row tile is below wgmma's 64 rows: bf16 mma.sync, still the tensor cores
        assert re.search(r"mma\.sync\.aligned\.m16n8k16\S*\.f32\.bf16\.bf16\.f32", ptx), "no bf16 mma.sync"
    # The packed weight streams through the cp.async pipeline, as whole bytes (no per-code byte loads):
    # 16-byte copies (.cg) or, for narrow tiles, 4 or 8 bytes a copy (.ca).
    assert re.search(r"cp\.async\.c[ag]\.shared\.global", ptx)
    assert "ld.global.b8" not in ptx and "ld.global.u8" not in ptx
    # One kernel writes the output: no atomic adds into a zeroed float32 buffer (and no cast after).
    assert not re.search(r"\b(red|atom)\.", ptx)
    assert kernel.metadata.shared <= H100_MAX_SHARED
    if "SLICES" in config.kwargs:  # the decode kernel: one warp per K slice, as its docstring says
        warps = config.num_warps
        mma_layout = rf"nvidia_mma<\{{[^}}]*warpsPerCTA = \[{warps}, 1, 1\]"
        assert re.search(mma_layout, kernel.asm["ttgir"]), "warps not laid along the slices"


# The most shared memory with 4-byte x tiles: the decode configs float32 x keeps, and the GEMM's largest tile.
FLOAT32_CONFIGS = [
    *_prune_gemv_configs(GEMV_CONFIGS, {"x_ptr": torch.empty(0)}, BITS=2, GROUP_SIZE=128),
    CONFIG_TIERS[None][0],
]


@pytest.mark.skipif(INTERPRETING, reason="compiles, does not interpret")
@pytest.mark.parametrize("config", FLOAT32_CONFIGS, ids=config_id)
@pytest.mark.parametrize("bits", [4, 2])
def test_float32_compiles_without_tf32(bits, config):
    kernel = compile_for_h100(bits, 128, _fit_block_k(config, bits, 128), torch.float32)
    ptx = kernel.asm["ptx"]
    # input_precision="ieee": float32 FMAs, no TF32 tensor cores (which round x to 10 mantissa bits).
    assert "tf32" not in ptx and "mma" not in ptx
    assert "fma.rn.f32" in ptx
    assert kernel.metadata.shared <= H100_MAX_SHARED


@pytest.mark.skipif(INTERPRETING, reason="compiles, does not interpret")
@pytest.mark.parametrize("config", [GEMV_CONFIGS[0], CONFIG_TIERS[64][0]], ids=config_id)
def test_float16_compiles_to_f16_mma(config):
    ptx = compile_for_h100(4, 32, _fit_block_k(config, 4, 32), torch.float16).asm["ptx"]
    assert re.search(r"mma\.sync\.aligned\.m16n8k16\S*\.f32\.f16\.f16\.f32", ptx)


@pytest.mark.skipif(INTERPRETING, reason="compiles, does not interpret")
@pytest.mark.parametrize("config", [GEMV_CONFIGS[0], CONFIG_TIERS[None][0]], ids=config_id)
@pytest.mark.parametrize("even_k", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=TYPES.get)
@pytest.mark.parametrize("bits", [4, 2])
def test_codes_become_floats_without_conversion_instructions(bits, dtype, even_k, config):
    # Int -> float conversions (cvt.rn.f32.s16 and the like) run at an eighth of the FMA rate on Hopper: one
    # per code bounded the decode kernel. The codes are OR-ed into a float's mantissa instead, and a 16-bit
    # x's weights are dequantized by packed fmas (two weights an instruction).
    ptx = compile_for_h100(bits, 128, _fit_block_k(config, bits, 128), dtype, even_k=even_k).asm["ptx"]
    assert not re.search(r"cvt\.rn\.(f16|bf16|f32)\.[su](8|16|32)\b", ptx), "an int -> float conversion"
    if dtype != torch.float32:  # float32's fma.rn.f32 would be found in its FMA dot anyway
        assert {torch.bfloat16: "fma.rn.bf16x2", torch.float16: "fma.rn.f16x2"}[dtype] in ptx


def compile_int8_for_h100(config, dtype, k_divisible=True, weight_type="i8"):
    """The int8 kernel compiled for sm_90, specialized as a launch with contiguous operands (N and K
    multiples of 16: the usual LLM shapes; ``k_divisible=False``: a K without the hint, e.g. K = 40) and a
    float32 bias. ``weight_type``: "i8", or a float8 weight ("fp8e4nv", "fp8e5")."""
    unit_strides = ("stride_xk", "stride_wk", "stride_s", "stride_b", "stride_on")
    constexprs = {**config.kwargs, "HAS_BIAS": True, **dict.fromkeys(unit_strides, 1)}
    pointer_types = {"x_ptr": TYPES[dtype], "w_ptr": weight_type, "scale_ptr": "fp32", "bias_ptr": "fp32"}
    pointer_types["out_ptr"] = TYPES[dtype]
    divisible = {"N", "stride_om"} | ({"K", "stride_xm", "stride_wn"} if k_divisible else set())
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return compile_for_sm90(int8_weight_mm_kernel, pointer_types, constexprs, divisible, **options)


@pytest.mark.skipif(INTERPRETING, reason="compiles, does not interpret")
@pytest.mark.parametrize("config", INT8_CONFIGS, ids=config_id)
def test_int8_compiles_to_hopper_bf16_tensor_cores(config):
    kernel = compile_int8_for_h100(config, torch.bfloat16)
    ptx = kernel.asm["ptx"]
    if config.kwargs["BLOCK_M"] >= 64:
        assert re.search(r"wgmma\.mma_async\S*\.f32\.bf16\.bf16", ptx), "no bf16 wgmma"
    else:  # below wgmma's 64 rows: bf16 mma.sync, still the tensor cores
        assert re.search(r"mma\.sync\.aligned\.m16n8k16\S*\.f32\.bf16\.bf16\.f32", ptx), "no bf16 mma.sync"
    # The int8 weight streams through the cp.async pipeline, 16 bytes a copy (no per-byte loads).
    assert "cp.async.cg.shared.global" in ptx
    assert "ld.global.b8" not in ptx and "ld.global.u8" not in ptx and "ld.global.s8" not in ptx
    assert kernel.metadata.shared <= H100_MAX_SHARED


@pytest.mark.skipif(INTERPRETING, reason="compiles, does not interpret")
@pytest.mark.parametrize("weight_type", ["fp8e4nv", "fp8e5"])
@pytest.mark.parametrize("config", [INT8_CONFIG_TIERS[16][0], INT8_CONFIG_TIERS[None][0]], ids=config_id)
def test_float8_weights_compile_to_hopper_conversions_and_bf16_tensor_cores(config, weight_type):
    kernel = compile_int8_for_h100(config, torch.bfloat16, weight_type=weight_type)
    ptx = kernel.asm["ptx"]
    assert re.search(r"cvt\.rn\.f16x2\.e(4m3|5m2)x2", ptx), "no hardware float8 conversion"
    assert re.search(r"(wgmma\.mma_async|mma\.sync\.aligned\.m16n8k16)\S*\.f32\.bf16\.bf16", ptx), (
        "no bf16 MMA"
    )
    assert "cp.async.cg.shared.global" in ptx  # the weight's bytes stream as int8's do
    assert kernel.metadata.shared <= H100_MAX_SHARED


@pytest.mark.skipif(INTERPRETING, reason="compiles, does not interpret")
@pytest.mark.parametrize("config", [INT8_CONFIG_TIERS[16][0], INT8_CONFIG_TIERS[None][0]], ids=config_id)
def test_int8_float32_compiles_without_tf32(config):
    kernel = compile_int8_for_h100(config, torch.float32)
    ptx = kernel.asm["ptx"]
    assert "tf32" not in ptx and "mma" not in ptx
    assert "fma.rn.f32" in ptx
    assert kernel.metadata.shared <= H100_MAX_SHARED


@pytest.mark.skipif(INTERPRETING, reason="compiles, does not interpret")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=TYPES.get)
def test_int8_weights_become_16_bit_floats_without_conversion_instructions(dtype):
    # As test_codes_become_floats_without_conversion_instructions: no int -> float cvt in the loop.
    ptx = compile_int8_for_h100(INT8_CONFIG_TIERS[16][0], dtype).asm["ptx"]
    assert not re.search(r"cvt\.rn\.(f16|bf16|f32)\.[su](8|16|32)\b", ptx), "an int -> float conversion"


@pytest.mark.skipif(INTERPRETING, reason="compiles, does not interpret")
def test_int8_float16_and_an_unaligned_k_compile_to_mma():
    ptx = compile_int8_for_h100(INT8_CONFIG_TIERS[16][0], torch.float16).asm["ptx"]
    assert re.search(r"mma\.sync\.aligned\.m16n8k16\S*\.f32\.f16\.f16\.f32", ptx)
    # K without a divisibility hint (K = 40): still tensor cores, but w's rows are not known to be aligned, so
    # its bytes load one by one, not through cp.async: correct, slower (LLM K are multiples of 16).
    ptx = compile_int8_for_h100(INT8_CONFIG_TIERS[16][0], torch.bfloat16, k_divisible=False).asm["ptx"]
    assert re.search(r"mma\.sync\.aligned\.m16n8k16\S*\.f32\.bf16\.bf16\.f32", ptx)
    assert "cp.async" not in ptx


# -- on a GPU --------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("config", _unique(GEMV_CONFIGS + CONFIGS), ids=config_id)
@pytest.mark.parametrize("bits", [4, 2])
def test_every_config_on_gpu(bits, config):
    # 70 x 200 leaves a partial tile in M and N for every config; K = 4 and 5 groups of 64 (K = 320: the
    # decode configs' last slices run past K). float32 x: the configs the autotuner keeps for it.
    config = _fit_block_k(config, bits, 64)
    meta = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    for dtype in (torch.bfloat16, torch.float32):
        if dtype == torch.float32 and config.kwargs.get("SLICES", 1) > FLOAT32_MAX_SLICES:
            continue
        for k in (256, 320):
            run(70, 200, k, bits, 64, meta, dtype, device="cuda")


@requires_cuda
@pytest.mark.parametrize("m", [1, 2, 3, 16, 100])
@pytest.mark.parametrize("bits, group_size", [(4, 128), (4, 32), (2, 64), (2, 128)])
def test_autotuned_llm_shapes_on_gpu(m, bits, group_size):
    # M = 2 and 3: the CUDA-core kernel's two rows a program (int2's slices halved), then the decode kernel.
    for dtype in (torch.bfloat16, torch.float16):
        run(m, 4096, 4096, bits, group_size, None, dtype, device="cuda")
    run(m, 1000, 4096, bits, group_size, None, torch.bfloat16, device="cuda")


@requires_cuda
@pytest.mark.parametrize("config", INT8_CONFIGS, ids=config_id)
def test_int8_every_config_on_gpu(config):
    # 70 x 200 x 200: partial tiles in M, N and K for every config.
    meta = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    for dtype in (torch.bfloat16, torch.float32):
        run_int8(70, 200, 200, meta, dtype, device="cuda")


@requires_cuda
@pytest.mark.parametrize("m", [1, 16, 100])
def test_int8_autotuned_llm_shapes_on_gpu(m):
    for dtype in (torch.bfloat16, torch.float16):
        run_int8(m, 4096, 4096, None, dtype, device="cuda")
    run_int8(m, 1000, 4104, None, torch.bfloat16, device="cuda", scale_2d=True)
