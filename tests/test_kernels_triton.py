"""The Triton kernels without a GPU (interpreter, compiled for an H100) and, where there is one, on it.

The ops' tests on a CUDA device (tests/test_kernels.py) run these kernels through their autotuned path; here
each block config runs on its own.
"""

import re

import pytest
import torch

from quanto_fx.kernels import int8_mm_requantize_reference, int8_mm_rescale_reference

from .test_kernels import make_operands, on_cpu, requantize_out_scale
from .utils import INTERPRETING, assert_passes_in_the_interpreter, compile_for_sm90, config_id, requires_cuda

triton = pytest.importorskip("triton")
from quanto_fx.kernels.triton_int8_mm import int8_mm_requantize_kernel, int8_mm_rescale_kernel  # noqa: E402
from quanto_fx.kernels.triton_launch import (  # noqa: E402
    CONFIG_TIERS,
    CONFIGS,
    int8_mm_requantize_triton,
    int8_mm_rescale_triton,
)


def run_both(args_rescale, args_requantize, relu, config=None, out_dtype=torch.float32):
    """Each kernel against its reference: float within float32 rounding, int8 bit-exact."""
    out = int8_mm_rescale_triton(*args_rescale, out_dtype, relu, config=config)
    ref = on_cpu(int8_mm_rescale_reference, *args_rescale, out_dtype, relu)
    torch.testing.assert_close(out, ref, rtol=2e-6 if out_dtype == torch.float32 else 1e-2, atol=1e-5)
    out_scale = requantize_out_scale(*args_requantize)
    out = int8_mm_requantize_triton(*args_requantize, out_scale, relu, config=config)
    assert torch.equal(out, on_cpu(int8_mm_requantize_reference, *args_requantize, out_scale, relu))


@pytest.mark.parametrize("op", ["int8_mm_rescale", "int8_mm_requantize"])
def test_triton_kernels_are_the_cuda_implementations(op):
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has_kernel(f"quanto_fx::{op}", "CUDA")
    assert not has_kernel(f"quanto_fx::{op}", "CPU")  # the default (torch) implementation serves the CPU


# -- the interpreter (CPU) -----------------------------------------------------------------------------

# Small tiles so that every odd shape below spans several tiles in M, N and K (and a partial M group).
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2})
# The sizes that leave a partial tile on every edge.
ODD_SHAPES = [(m, k, n) for m in (1, 5, 33) for k in (24, 100) for n in (8, 40)]


@pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child pytest")
@pytest.mark.usefixtures("_interpreter_numpy_fix")
class TestInterpreted:
    @pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_odd_shapes(self, shape):
        i = ODD_SHAPES.index(shape)
        # Cycle through scale kinds, bias, relu and weight layout across the shapes.
        kw = {"per_channel": i % 2 == 0, "layout": "transposed" if i % 3 else "row_major", "seed": i}
        bias = i % 4 < 2
        run_both(
            make_operands(*shape, bias="float" if bias else None, **kw),
            make_operands(*shape, bias="int32" if bias else None, **kw),
            relu=i % 4 in (1, 2),
            config=INTERPRETER_CONFIG,
        )

    def test_bfloat16_output(self):
        args = make_operands(33, 100, 40, bias="float")
        run_both(args, make_operands(33, 100, 40), False, config=INTERPRETER_CONFIG, out_dtype=torch.bfloat16)

    def test_requantize_rounds_ties_to_even(self):
        a, b, _, _, _ = make_operands(5, 24, 40)
        a, b = a // 32, b // 32
        one = torch.tensor(1.0)
        out = int8_mm_requantize_triton(a, b, one, one, None, torch.tensor(2.0), config=INTERPRETER_CONFIG)
        assert torch.equal(out.double(), torch.round((a.double() @ b.double()) / 2))


@pytest.mark.skipif(INTERPRETING, reason="this is the interpreted run")
def test_kernels_in_the_interpreter():
    assert_passes_in_the_interpreter(__file__, "TestInterpreted")


# -- compiled for an H100, without one -----------------------------------------------------------------

SCALE_POINTERS = {"a_scale_ptr": "fp32", "b_scale_ptr": "fp32", "out_scale_ptr": "fp32"}
KERNELS = {
    "rescale": (int8_mm_rescale_kernel, {"out_ptr": "bf16", "bias_ptr": "fp32", **SCALE_POINTERS}),
    "requantize": (int8_mm_requantize_kernel, {"out_ptr": "i8", "bias_ptr": "i32", **SCALE_POINTERS}),
}
# What a launch specializes on, as the JIT does: ints equal to 1 become constants; pointers, N, K and the
# other strides (multiples of 16 for the usual K and N) carry a divisibility hint.
UNIT_STRIDES = {
    "transposed": ("stride_ak", "stride_bk", "stride_on", "stride_a_scale", "stride_b_scale", "stride_bias"),
    "row_major": ("stride_ak", "stride_bn", "stride_on", "stride_a_scale", "stride_b_scale", "stride_bias"),
}


def compile_for_h100(kernel, pointer_types, config, layout):
    """PTX of ``kernel`` with ``config``, bias and relu on, compiled for sm_90 (no GPU needed)."""
    constexprs = {**config.kwargs, "HAS_BIAS": True, "RELU": True, **dict.fromkeys(UNIT_STRIDES[layout], 1)}
    divisible = [name for name in kernel.arg_names if name.startswith("stride") or name in ("N", "K")]
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return compile_for_sm90(kernel, pointer_types, constexprs, divisible, **options).asm["ptx"]


@pytest.mark.skipif(INTERPRETING, reason="compiles, does not interpret")
@pytest.mark.parametrize(
    "config, layout",
    # One wgmma config is enough for the row-major weight layout.
    [(c, "transposed") for c in CONFIGS] + [(CONFIG_TIERS[None][0], "row_major")],
    ids=lambda v: config_id(v) if isinstance(v, triton.Config) else v,
)
@pytest.mark.parametrize("name", KERNELS)
def test_compiles_to_hopper_int8_tensor_cores(name, config, layout):
    ptx = compile_for_h100(*KERNELS[name], config, layout)
    if config.kwargs["BLOCK_M"] >= 64:
        assert re.search(r"wgmma\.mma_async\S*\.s32\.s8\.s8", ptx), "no int8 wgmma: off Hopper's tensor cores"
    else:  # a 16-row tile is below wgmma's 64: int8 mma.sync, still on the tensor cores (see CONFIG_TIERS)
        assert re.search(r"mma\.sync\.aligned\.m16n8k32\S*\.s32\.s8\.s8", ptx), "no int8 mma.sync"
    if name == "requantize":
        assert "div.rn.f32" in ptx  # IEEE division, as torch divides
        assert "0f4B400000" in ptx  # the round-half-even constant 1.5 * 2**23 survived optimization


# -- on a GPU ------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_every_config_on_gpu(config):
    # 70 x 200 x 136 leaves a partial tile in M, N and K for every config.
    run_both(
        make_operands(70, 200, 136, bias="float", device="cuda"),
        make_operands(70, 200, 136, bias="int32", device="cuda"),
        relu=True,
        config=config,
    )


@requires_cuda
@pytest.mark.parametrize("shape", [(1, 4096, 4096), (16, 4096, 1000), (300, 4096, 1024)], ids=str)
def test_autotuned_llm_shapes_on_gpu(shape):
    for per_channel in (True, False):
        run_both(
            make_operands(*shape, per_channel=per_channel, bias="float", device="cuda"),
            make_operands(*shape, per_channel=per_channel, bias="int32", device="cuda"),
            relu=False,
            out_dtype=torch.bfloat16,
        )
