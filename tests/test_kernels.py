"""The fused int8 ops (quanto_fx.kernels): registration, the reference, and float64 math, on every device.

On CUDA with triton installed the ops run the Triton kernels, so these tests cover them there too;
tests/test_kernels_triton.py runs the kernels without a GPU (interpreter, H100 compile).
"""

import subprocess
import sys

import pytest
import torch

import quanto_fx.kernels  # noqa: F401  (registers the ops)
from quanto_fx.kernels import int8_mm_requantize_reference, int8_mm_rescale_reference

RESCALE = torch.ops.quanto_fx.int8_mm_rescale.default
REQUANTIZE = torch.ops.quanto_fx.int8_mm_requantize.default

# (M, K, N): odd sizes exercise every edge mask of the Triton kernels; 1 is the decode case.
SHAPES = [(1, 24, 8), (5, 100, 40), (33, 24, 40), (64, 256, 96)]


def make_operands(m, k, n, *, per_channel=True, bias=None, layout="transposed", device="cpu", seed=0):
    """Random int8 operands and scales: ``a`` (M, K), ``b`` (K, N) and matching scales and bias.

    ``layout="transposed"``: ``b`` is the transpose of a contiguous (N, K) weight (as F.linear holds it);
    ``"row_major"``: ``b`` is a contiguous (K, N). ``bias`` is None, "float" or "int32".
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    b = w.t() if layout == "transposed" else w.t().contiguous()
    if per_channel:
        a_scale = torch.rand(m, 1, generator=g) * 0.02 + 0.005
        b_scale = torch.rand(1, n, generator=g) * 0.02 + 0.005
    else:
        a_scale, b_scale = torch.tensor(0.011), torch.tensor(0.007)
    if bias == "float":
        bias = torch.randn(n, generator=g)
    elif bias == "int32":
        bias = torch.randint(-20 * k * 127, 20 * k * 127, (n,), generator=g, dtype=torch.int32)
    tensors = [a, b, a_scale, b_scale, bias]
    return [t.to(device) if t is not None else None for t in tensors]


def on_cpu(reference, *args):
    """``reference(*args)`` computed on the CPU and returned on the arguments' device.

    The CPU is where the specification runs exactly on any shape: on CUDA, ``int8_mm`` relies on cuBLAS,
    which rejected small odd shapes such as (17, 104) @ (104, 40) (torch 2.11, CUDA 13, H200).
    """
    cpu_args = [t.cpu() if isinstance(t, torch.Tensor) else t for t in args]
    return reference(*cpu_args).to(args[0].device)


def requantize_out_scale(a, b, a_scale, b_scale, bias) -> torch.Tensor:
    """An output scale that maps about 90% of the outputs' range to [-127, 127] (so a few saturate)."""
    acc = a.double() @ b.double() + (0 if bias is None else bias.double())
    return ((acc * a_scale.double() * b_scale.double()).abs().amax() / 127 * 0.9).float()


def rescale_float64(a, b, a_scale, b_scale, bias, relu):
    """The rescale's math in float64."""
    out = (a.double() @ b.double()) * a_scale.double() * b_scale.double()
    if bias is not None:
        out = out + bias.double()
    return out.clamp_min(0) if relu else out


def requantize_float64(a, b, a_scale, b_scale, bias, out_scale, relu):
    """The requantize's math in float64, before rounding."""
    acc = a.double() @ b.double() + (0 if bias is None else bias.double())
    out = acc * (a_scale.double() * b_scale.double() / out_scale.double())
    return out.clamp(0 if relu else -127, 127)


# Per shape: per-channel and per-tensor scales, each without bias and with bias (+ relu on every other shape).
CASES = [
    pytest.param(shape, per_channel, bias, bias and i % 2 == 0, id=f"{i}-{per_channel=}-{bias=}")
    for i, shape in enumerate(SHAPES)
    for per_channel in (True, False)
    for bias in (False, True)
]


# opcheck tests the registration, not the numbers: a few cases that cover each argument kind once suffice.
OPCHECK_CASES = [CASES[0], CASES[3], CASES[6], CASES[9], CASES[15]]


def test_schemas_are_the_ones_the_passes_target():
    assert str(RESCALE._schema) == (
        "quanto_fx::int8_mm_rescale(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor? bias, "
        "ScalarType out_dtype, bool relu=False) -> Tensor"
    )
    assert str(REQUANTIZE._schema) == (
        "quanto_fx::int8_mm_requantize(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor? bias, "
        "Tensor out_scale, bool relu=False) -> Tensor"
    )


@pytest.mark.parametrize("shape, per_channel, bias, relu", OPCHECK_CASES)
def test_opcheck(shape, per_channel, bias, relu, device):
    args = make_operands(*shape, per_channel=per_channel, bias="float" if bias else None, device=device)
    torch.library.opcheck(RESCALE, (*args, torch.bfloat16), {"relu": relu})
    args = make_operands(*shape, per_channel=per_channel, bias="int32" if bias else None, device=device)
    torch.library.opcheck(REQUANTIZE, (*args, requantize_out_scale(*args)), {"relu": relu})


@pytest.mark.parametrize("layout", ["transposed", "row_major"])
@pytest.mark.parametrize("shape, per_channel, bias, relu", CASES)
def test_rescale_matches_reference_and_float64(shape, per_channel, bias, relu, layout, device):
    args = make_operands(
        *shape, per_channel=per_channel, bias="float" if bias else None, layout=layout, device=device
    )
    out = RESCALE(*args, torch.float32, relu)
    ref = on_cpu(int8_mm_rescale_reference, *args, torch.float32, relu)
    assert out.dtype == torch.float32 and out.shape == (shape[0], shape[2]) and out.is_contiguous()
    # Tight: the same float32 steps, up to fused multiply-adds on the GPU.
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-6 * float(ref.abs().max()))
    exact = rescale_float64(*args, relu)
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_rescale_half_outputs(out_dtype, device):
    args = make_operands(33, 100, 40, bias="float", device=device)
    out = RESCALE(*args, out_dtype)
    assert out.dtype == out_dtype
    # Rounding the same float32 value: equal, or one half-precision step apart where FMA moved it.
    ref = on_cpu(int8_mm_rescale_reference, *args, out_dtype)
    torch.testing.assert_close(out, ref, rtol=torch.finfo(out_dtype).eps, atol=0)


@pytest.mark.parametrize("layout", ["transposed", "row_major"])
@pytest.mark.parametrize("shape, per_channel, bias, relu", CASES)
def test_requantize_matches_reference_exactly(shape, per_channel, bias, relu, layout, device):
    args = make_operands(
        *shape, per_channel=per_channel, bias="int32" if bias else None, layout=layout, device=device
    )
    out_scale = requantize_out_scale(*args)
    out = REQUANTIZE(*args, out_scale, relu)
    assert out.dtype == torch.int8 and out.shape == (shape[0], shape[2]) and out.is_contiguous()
    assert torch.equal(out, on_cpu(int8_mm_requantize_reference, *args, out_scale, relu))
    assert int(out.min()) >= (0 if relu else -127)
    # float64 math: the same integers, except where float32 rounding crossed a half (then one step off).
    exact = requantize_float64(*args, out_scale, relu)
    diff = (out.double() - torch.round(exact)).abs()
    assert diff.max() <= 1
    near_half = ((exact - exact.floor()) - 0.5).abs() < 1e-4
    assert bool(near_half[diff > 0].all())


def test_requantize_rounds_ties_to_even(device):
    # Scales 1 and out_scale 2 put every odd accumulator exactly on a half.
    a, b, _, _, _ = make_operands(16, 8, 24, device=device)
    a, b = a // 32, b // 32  # |acc| <= 8 * 4 * 4: acc / 2 stays inside [-127, 127]
    one = torch.tensor(1.0, device=device)
    out = REQUANTIZE(a, b, one, one, None, torch.tensor(2.0, device=device))
    acc = a.double() @ b.double()  # exact: |acc| is small
    assert bool((acc % 2 == 1).any())
    assert torch.equal(out.double(), torch.round(acc / 2))  # torch.round: half to even


def test_zero_sized(device):
    a, b, a_scale, b_scale, _ = make_operands(3, 8, 5, per_channel=False, device=device)
    assert RESCALE(a[:0], b, a_scale, b_scale, None, torch.float32).shape == (0, 5)
    assert REQUANTIZE(a, b[:, :0], a_scale, b_scale, None, torch.tensor(1.0, device=device)).shape == (3, 0)
    empty_k = RESCALE(a[:, :0], b[:0], a_scale, b_scale, None, torch.float32)
    assert torch.equal(empty_k, torch.zeros(3, 5, device=device))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            lambda args: {**args, "a": args["a"].float()},
            TypeError,
            r"int8_mm expects int8 operands, got torch\.float32 and torch\.int8",
        ),
        (
            lambda args: {**args, "b": args["b"][:-1]},
            ValueError,
            r"int8_mm: incompatible shapes \(5, 24\) @ \(23, 8\)",
        ),
        (
            lambda args: {**args, "a_scale": args["a_scale"].view(1, -1)},
            ValueError,
            r"a_scale must be 0-d or shaped \(5, 1\), got \(1, 5\)",
        ),
        (
            lambda args: {**args, "b_scale": args["b_scale"].int()},
            TypeError,
            r"b_scale must be a floating point tensor, got torch\.int32",
        ),
        (
            lambda args: {**args, "bias": torch.zeros(3)},
            ValueError,
            r"bias must be shaped \(8,\), got \(3,\)",
        ),
    ],
)
def test_bad_arguments_raise_also_while_tracing(change, error, message):
    a, b, a_scale, b_scale, _ = make_operands(5, 24, 8)
    args = change({"a": a, "b": b, "a_scale": a_scale, "b_scale": b_scale, "bias": None})
    with pytest.raises(error, match=f"^{message}$"):
        RESCALE(*args.values(), torch.float32)
    with pytest.raises(error, match=f"^{message}$"), torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        RESCALE(*(mode.from_tensor(t) if t is not None else None for t in args.values()), torch.float32)


def test_bad_dtypes_raise():
    a, b, a_scale, b_scale, fbias = make_operands(5, 24, 8, bias="float")
    with pytest.raises(TypeError, match="out_dtype"):
        RESCALE(a, b, a_scale, b_scale, None, torch.int32)
    with pytest.raises(TypeError, match="bias"):
        REQUANTIZE(a, b, a_scale, b_scale, fbias, torch.tensor(1.0))  # requantize wants an int32 bias
    with pytest.raises(TypeError, match="out_scale"):
        REQUANTIZE(a, b, a_scale, b_scale, None, torch.ones(1, 1))


def test_imports_and_runs_without_triton():
    # A None entry in sys.modules makes triton unimportable, as where it is not installed.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, quanto_fx.kernels as k\n"
        "assert not k.HAS_TRITON\n"
        "a = torch.ones(2, 3, dtype=torch.int8); s = torch.tensor(0.5)\n"
        "out = k.int8_mm_rescale(a, a.t(), s, s, None, torch.float32)\n"
        "assert torch.equal(out, torch.full((2, 2), 0.75))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_eager_caller_runs_the_op_through_the_dispatcher():
    """Same results and errors as the op, and dispatch modes (below __torch_function__) still see the call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from quanto_fx.kernels.library import eager_caller

    a, b, a_scale, b_scale, bias = make_operands(5, 100, 40, bias="float")
    call = eager_caller(RESCALE)
    expected = RESCALE(a, b, a_scale, b_scale, bias, torch.float32)

    class Recording(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    with Recording() as recording:
        out = call(a, b, a_scale, b_scale, bias, torch.float32)
    assert torch.equal(out, expected)
    assert RESCALE in recording.ops
    with pytest.raises(TypeError, match="out_dtype"):
        call(a, b, a_scale, b_scale, bias, torch.int32)
