"""Build the wheel and check what it installs.

`passes/` and `backend/` sit at the repository top but must install as `quanto_fx.passes` and
`quanto_fx.backend`; nothing named `passes`, `backend` or `tests` may land at the top of site-packages.
The build runs with --no-isolation (no network) on a copy of the source tree, so a stale `build/` in the
checkout can neither leak deleted files into the wheel nor be left behind by this test.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# source folder -> installed package path
PACKAGE_ROOTS = {"quanto_fx": "quanto_fx", "passes": "quanto_fx/passes", "backend": "quanto_fx/backend"}

_SKIP_AT_ROOT = {".git", ".venv", "build", "dist", ".pytest_cache", ".ruff_cache", ".hypothesis"}


def _ignore(directory: str, names: list[str]) -> set[str]:
    here = Path(directory)
    skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    if here == ROOT:
        skip |= _SKIP_AT_ROOT & set(names)
    if here == ROOT / "bench":
        skip |= {"out"} & set(names)
    return skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "dist"
    shutil.copytree(ROOT, src, ignore=_ignore)
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(out), str(src)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"wheel build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    wheels = list(out.glob("quanto_fx-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as zf:
        yield zf


def _metadata(zf: zipfile.ZipFile):
    (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    return Parser().parsestr(zf.read(name).decode())


def test_wheel_has_package_files(wheel):
    names = set(wheel.namelist())
    for required in (
        "quanto_fx/__init__.py",
        "quanto_fx/passes/__init__.py",
        "quanto_fx/backend/__init__.py",
        "quanto_fx/py.typed",
        "quanto_fx/kernels/cpu_vnni_mm.cpp",  # compiled on first use: must ship as package data
        "quanto_fx/kernels/cpu_float8_mm.cpp",
        "quanto_fx/kernels/cpu_native_ops.cpp",
        "quanto_fx/kernels/cpu_simd.h",  # included by the two kernel sources
    ):
        assert required in names, f"{required} missing from the wheel"


def test_wheel_has_no_stray_top_level(wheel):
    bad = [n for n in wheel.namelist() if n.split("/", 1)[0] in {"passes", "backend", "tests"}]
    assert not bad, f"wheel installs top-level folders it must not: {bad}"
    top_level = [n for n in wheel.namelist() if n.endswith(".dist-info/top_level.txt")]
    for name in top_level:
        assert wheel.read(name).decode().split() == ["quanto_fx"]


def test_wheel_ships_every_source_module(wheel):
    """Every .py under quanto_fx/, passes/, backend/ lands in the wheel at its installed path.

    `[tool.setuptools] packages` is an explicit list (find cannot discover the mapped folders), so a new
    subpackage that nobody added there would silently vanish from the wheel; this test names it.
    """
    names = set(wheel.namelist())
    missing = []
    for src_dir, installed in PACKAGE_ROOTS.items():
        for path in sorted((ROOT / src_dir).rglob("*.py")):
            rel = path.relative_to(ROOT / src_dir)
            if "__pycache__" in rel.parts:
                continue
            target = f"{installed}/{rel.as_posix()}"
            if target not in names:
                missing.append(f"{src_dir}/{rel.as_posix()} -> {target}")
    assert not missing, (
        "source modules missing from the wheel (add their package to [tool.setuptools] packages in "
        "pyproject.toml):\n  " + "\n  ".join(missing)
    )


def test_torch_requirement_is_a_range(wheel):
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in _metadata(wheel).get_all("Requires-Dist", [])]
    torch_reqs = [r for r in reqs if r.name == "torch"]
    assert len(torch_reqs) == 1, f"expected one torch requirement, got {torch_reqs}"
    (torch_req,) = torch_reqs
    assert torch_req.marker is None, "torch must be a core dependency, not an extra"
    ops = {spec.operator for spec in torch_req.specifier}
    assert not ops & {"==", "===", "~="}, f"torch must be a range, not a pin: {torch_req}"
    assert ops & {">=", ">"}, f"torch needs a lower bound: {torch_req}"
    # torch belongs to `dependencies` only; every extra stays free of it
    assert all(r.name != "torch" for r in reqs if r.marker is not None)


def test_import_stays_light():
    # the compiler side (inductor, triton, the backend) loads on first use, not on `import quanto_fx`
    code = "import sys, quanto_fx; print(sorted(m for m in ('torch._inductor.compile_fx', 'triton', "
    code += "'quanto_fx.backend') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
