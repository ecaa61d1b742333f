"""The C++ CPU kernels compile wherever they can run. Every kernel test skips where
``cpu_vnni_mm.available()`` is false, and a compile error makes it false too (logged; the ops keep their
slower paths): on a CPU with AVX512-VNNI and a C++ compiler, this test fails with the compiler's message."""

from __future__ import annotations

import subprocess

import pytest

from quanto_fx.kernels import cpu_vnni_mm

COMPILER = cpu_vnni_mm._compiler()


@pytest.mark.skipif(
    not cpu_vnni_mm._cpu_has_avx512_vnni() or COMPILER is None, reason="needs AVX512-VNNI and a C++ compiler"
)
def test_the_kernel_sources_compile_where_they_can_run():
    try:
        library = cpu_vnni_mm._build(COMPILER)
    except subprocess.CalledProcessError as error:
        pytest.fail(f"the CPU kernels do not compile:\n{error.stderr[-4000:]}")
    # (not available(): QUANTO_FX_CPU_KERNELS=0 makes it false for a library that loads)
    assert library.exists() and cpu_vnni_mm._library() is not None
