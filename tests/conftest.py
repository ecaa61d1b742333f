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
