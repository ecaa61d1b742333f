import pytest
import torch
from hypothesis import settings

# Reproducible property tests: the same examples on every run and machine.
settings.register_profile("default", derandomize=True, deadline=None)
settings.load_profile("default")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def aten_weight_kernels(monkeypatch):
    """The CPU weight-only ops on aten's kernels, as on a CPU without AVX512-VNNI: packed weights then keep
    aten's int4 layout (the VNNI kernels read the portable packing and need none)."""
    from quanto_fx.kernels import cpu_vnni_mm

    monkeypatch.setenv(cpu_vnni_mm.ENABLE_VARIABLE, "0")


@pytest.fixture(scope="class")
def _interpreter_numpy_fix():
    """Apply triton's own fix for numpy >= 2.4 to the 3.6.0 interpreter while the class runs.

    The interpreter turns a scalar into a Python int with ``int(array of shape (1,))``, which numpy 2.4
    rejects (so any ``range(tl.cdiv(K, BLOCK_K))`` fails): triton-lang/triton#9171, fixed after 3.6.0 by
    ``.item()``-ing the array, as here.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched
    yield
    interpreter._patch_lang_tensor = original


@pytest.fixture(scope="class")
def _interpreter_bfloat16_fix():
    """Let the 3.6.0 interpreter compute with bfloat16 (``tl.dot``, +, -, *) while the class runs.

    The interpreter stores bfloat16 as uint16 and hands those bits to numpy as they are: ``np.matmul`` and
    ``np.add`` compute on the bit patterns (triton-lang/triton#11584; the maintainers: bfloat16 is not
    supported there yet), it truncates float32 to bfloat16, and it has no bfloat16 constants (``get_bf16``).
    Here bfloat16 operands become float32 first, with the interpreter's own converter: a dot gets the exact
    products, as the tensor cores do; +, - and * compute in float32, and they, float32 -> bfloat16 casts and
    constants round to nearest even, as the GPU does (a * b + c rounds twice here, once in the GPU's fma:
    within the tests' tolerances). The compiled kernel is untouched: this only fixes the simulator.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    names = ("create_dot", "create_fadd", "create_fsub", "create_fmul", "cast_impl", "get_bf16")
    originals = {name: getattr(builder, name, None) for name in names}

    def to_float32(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def to_bfloat16(data):
        # To nearest even on the 16 bits dropped (finite values).
        bits = data.astype(np.float32).view(np.uint32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return interpreter.TensorHandle(bits.astype(np.uint16), tl.bfloat16)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return to_bfloat16(src.data)
        return originals["cast_impl"](self, src, dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = to_float32(a), to_float32(b)
        return originals["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)

    def in_float32(name):
        def create(self, lhs, rhs):
            if lhs.dtype.scalar != tl.bfloat16:
                return originals[name](self, lhs, rhs)
            return to_bfloat16(originals[name](self, to_float32(lhs), to_float32(rhs)).data)

        return create

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder.get_bf16 = lambda self, value: to_bfloat16(np.array([value], dtype=np.float32))
    for name in ("create_fadd", "create_fsub", "create_fmul"):
        setattr(builder, name, in_float32(name))
    yield
    for name, original in originals.items():
        if original is None:
            delattr(builder, name)
        else:
            setattr(builder, name, original)
