"""CPU weight-only GEMMs on AVX512-VNNI: the C++ kernels of ``cpu_vnni_mm.cpp``, built on first use.

Each row of x is split into 16-bit integers in two signed-byte planes (relative error <= 2**-16 of the row's
largest magnitude, ~3e-5 on the output: far below the weights' own error, and 60x below the bfloat16
rounding that aten's CPU kernels need). Then, by the weight-only ops of ``weight_only.py``:
- ``vnni_weight_mm``: ``vpdpbusd`` integer dot products on the int8 weights or packed int4 / int2 codes as
  stored, group scales and zeros applied to the exact sums. A GEMV for int8 weights (M <= 6; M <= 2 at
  K <= 512; any M past K = 2**16) and for packed ones at M <= 2 (M = 1 at K <= 512; 1.3-2x faster than
  aten's weight-only kernels with warm caches, on par with cold ones); a GEMM at larger M (each block of
  weight rows transposed once into column-per-lane code vectors, reused by every row of x: about half the
  fp32 GEMM's time from M = 4 to 512, bench/RESULTS.md).
- ``int8_weight_int_mm`` (int8 weights of 4 MB or more, M > 128, see :func:`int8_uses_int_mm`): the two
  planes through one ``torch._int_mm``.

The library also registers C++ CPU kernels for the weight-only ops and the dynamic-activation ops of
``dynamic_mm.py`` (``dynamic_int8_mm_prechecked``: x's int8 codes in the planes, the same kernels) with
torch's dispatcher (``cpu_native_ops.cpp``): calls these kernels take as they are run without entering
Python (a small layer's call at M = 1 spent ~14 us there, as much as its kernel); any other call reaches the
ops' Python implementations, which reach the kernels through the functions here.

They are used when all of these hold, else the callers fall back to aten / the float GEMM:
- the CPU has AVX512-VNNI (``torch.cpu._is_vnni_supported``) and a C++ compiler (``$CXX``, else ``g++`` /
  ``c++``) builds the sources against torch's headers (shipped in its wheels); the library is cached per
  source, compiler, flags and torch version in ``$QUANTO_FX_CACHE_DIR`` (default ``~/.cache/quanto_fx``),
  so a machine compiles it once (~10-20 s);
- ``QUANTO_FX_CPU_KERNELS`` is not ``0`` (the switch for comparing against aten);
- the shapes suit them (``supports``: 1 to ``MAX_IN_FEATURES`` (2**19) input features; int8 ones a multiple
  of the GEMV's 32-byte chunks; int4 / int2 groups of whole 32-bit words, i.e. int4 groups a multiple of 8
  codes, int2 of 16; ``torch._int_mm`` up to ``INT_MM_MAX_IN_FEATURES``);
- x is finite (a NaN or infinity in x takes the float path, which propagates it), and no row of x is so
  small (max |x| < ~3.8e-34, not 0) that its 16-bit scale would underflow (the float path computes it).

Each thread that calls the kernels keeps the workspaces they free, up to 64 MB, for its next calls: new
memory at every call had cost more in page faults than the work on it (``aligned_workspace`` in cpu_simd.h).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# One library: these kernels, the float8 ones of cpu_float8_mm.py (which calls it via _loaded_library()), and
# the ops' CPU kernels registered with torch's dispatcher (cpu_native_ops.cpp, built with torch's headers).
SOURCES = [
    Path(__file__).with_name(name) for name in ("cpu_vnni_mm.cpp", "cpu_float8_mm.cpp", "cpu_native_ops.cpp")
]
HEADERS = [Path(__file__).with_name("cpu_simd.h")]  # included by the sources: part of the cache key
FLAGS = ["-std=c++17", "-O3", "-shared", "-fPIC", "-fopenmp"]
FLAGS += ["-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]  # checked at run time, not -march
# int8 weights: the VNNI kernels (the GEMV, then the GEMM: see uses_gemv) up to this M, and past it for
# weights under INT_MM_MIN_WEIGHT_BYTES; torch._int_mm on x's byte planes for larger ones, where oneDNN's
# blocking wins (2-core Xeon, x fp32 time, VNNI GEMM / _int_mm: 4096 x 4096 at M = 32 0.35 / 0.45, at 256
# 0.61 / 0.52; 384 x 1536 at 256 0.52 / 0.67, at 1024 0.58 / 1.11).
INT8_VNNI_MAX_M = 128
INT_MM_MIN_WEIGHT_BYTES = 4 << 20
CHUNK_BYTES = 32  # the GEMV's narrowest step along K (a ymm register of weight bytes; 64 where groups allow)
WORD_BYTES = 4  # the GEMM's step along K: one 32-bit word of packed codes per lane
# The int32 sums must not overflow: |h * q| <= 128 * 255 per product, summed over K / 8 products per lane
# (the GEMV's 32-byte chunks) or one group of up to K (GEMM: int4 / int2 codes q <= 15; int8 weights take it
# up to K = 2**16 only); x's codes, |q| <= 32639, over K / 16 per lane.
MAX_IN_FEATURES = 1 << 19
# torch._int_mm sums |h * w| <= 128 * 128 over all of K in int32.
INT_MM_MAX_IN_FEATURES = 1 << 16
# The int8_dynamic_mm kernel up to this K: its float epilogue's error grows with K (dynamic_mm.py).
DYNAMIC_INT8_MAX_IN_FEATURES = 1 << 16
# x's dtype, whose arithmetic the dynamic kernels reproduce as they quantize it (Precision in cpu_simd.h).
PRECISIONS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# How x is stored for the kernels (their x_storage, one of PRECISIONS' values): float32 on this module's
# ctypes path, which converts x first; the native ops (cpu_native_ops.cpp) hand a 16-bit x over as it is.
FLOAT32_STORAGE = PRECISIONS[torch.float32]
ENABLE_VARIABLE = "QUANTO_FX_CPU_KERNELS"
COMPILE_TIMEOUT_S = 300


def _cache_dir() -> Path:
    if "QUANTO_FX_CACHE_DIR" in os.environ:
        return Path(os.environ["QUANTO_FX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quanto_fx"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _torch_flags() -> list[str]:
    """Compiling and linking against this torch (its headers ship in its wheels)."""
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [f"-I{root / 'include'}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-L{root / 'lib'}", "-lc10"]


def _build(compiler: str) -> Path:
    """The compiled library's path, compiled unless these sources, compiler, flags and torch are cached."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    texts = [source.read_text() for source in [*SOURCES, *HEADERS]]
    flags = [*FLAGS, *_torch_flags(), "-ltorch_cpu"]
    key = hashlib.sha256("\0".join([*texts, version, torch.__version__, *flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_vnni_mm-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target, then rename: a concurrent process never loads a half-written library.
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            subprocess.run(
                [compiler, *map(str, SOURCES), *flags, "-o", str(built)],
                check=True,
                capture_output=True,
                text=True,
                timeout=COMPILE_TIMEOUT_S,
            )
            os.replace(built, target)
    return target


def _cpu_has_avx512_vnni() -> bool:
    """Whether this CPU runs the kernels' instructions (whether they build is another matter)."""
    return torch.cpu._is_avx512_supported() and torch.cpu._is_vnni_supported()


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when this machine cannot build or run them (logged once, not raised:
    the callers have a slower but correct path)."""
    if not _cpu_has_avx512_vnni():
        logger.info("quanto_fx CPU weight-only kernels: this CPU has no AVX512-VNNI; using aten's")
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning("quanto_fx CPU weight-only kernels: no C++ compiler ($CXX, g++, c++); using aten's")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        logger.warning("quanto_fx CPU weight-only kernels failed to build; using aten's:\n%s", detail[-2000:])
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.quanto_split_x.argtypes = [pointer, size, size, ctypes.c_int, size, *[pointer] * 4, ctypes.c_int]
    library.quanto_split_x.restype = ctypes.c_int
    x_args = [ctypes.c_int, pointer, size, size]  # x's storage, x, M, K
    library.quanto_weight_mm.argtypes = [ctypes.c_int, *x_args, pointer, size, pointer, size]
    library.quanto_weight_mm.argtypes += [pointer, pointer, ctypes.c_int]
    library.quanto_weight_mm.restype = ctypes.c_int
    library.quanto_dynamic_int8_mm.argtypes = [ctypes.c_int, *x_args, pointer, size, pointer]
    library.quanto_dynamic_int8_mm.argtypes += [pointer, pointer, ctypes.c_int]
    library.quanto_dynamic_int8_mm.restype = ctypes.c_int
    library.quanto_weight_mm_uses_gemv.argtypes = [ctypes.c_int, size, size, size]
    library.quanto_weight_mm_uses_gemv.restype = ctypes.c_int
    library.quanto_combine_planes.argtypes = [pointer, size, size, pointer, pointer, pointer, ctypes.c_int]
    library.quanto_combine_planes.restype = None
    library.quanto_float8_weight_mm.argtypes = [ctypes.c_int, *x_args, pointer, size, pointer]
    library.quanto_float8_weight_mm.argtypes += [pointer, pointer, ctypes.c_int]
    library.quanto_float8_weight_mm.restype = ctypes.c_int
    library.quanto_float8_dynamic_mm.argtypes = [ctypes.c_int] * 3 + [*x_args, pointer, size, pointer]
    library.quanto_float8_dynamic_mm.argtypes += [pointer, pointer, ctypes.c_int]
    library.quanto_float8_dynamic_mm.restype = ctypes.c_int
    library.quanto_float8_path.argtypes = [ctypes.c_int, size]
    library.quanto_float8_path.restype = ctypes.c_int
    _register_native_ops(library)
    return library


def _register_native_ops(library: ctypes.CDLL) -> None:
    """Register the ops' C++ CPU kernels (cpu_native_ops.cpp) with torch's dispatcher, handing them the limits
    the kernels take; a refusal is logged and leaves the ops' Python implementations serving every call."""
    from ..tensor.groupwise import MIN_GROUP_SIZE
    from . import cpu_float8_mm  # (it imports this module)

    limits = [INT8_VNNI_MAX_M, CHUNK_BYTES, WORD_BYTES, MAX_IN_FEATURES, MIN_GROUP_SIZE]
    limits += [cpu_float8_mm.MAX_IN_FEATURES, DYNAMIC_INT8_MAX_IN_FEATURES, INT_MM_MIN_WEIGHT_BYTES]
    register = library.quanto_native_register
    register.argtypes = [ctypes.c_int64] * len(limits) + [ctypes.c_char_p, ctypes.c_int64]
    register.restype = ctypes.c_int
    error = ctypes.create_string_buffer(2000)
    if register(*limits, error, len(error)):
        message = error.value.decode(errors="replace")
        logger.warning("quanto_fx CPU kernels: the ops' C++ kernels were not registered:\n%s", message)


def _loaded_library() -> ctypes.CDLL:
    """The library, for the public kernel functions: a clear error where this machine has none."""
    library = _library()
    if library is None:
        raise RuntimeError("the quanto_fx CPU kernels do not run on this machine (see available())")
    return library


def available() -> bool:
    """Whether the kernels run on this machine (and are not switched off by ``QUANTO_FX_CPU_KERNELS=0``)."""
    return os.environ.get(ENABLE_VARIABLE, "1") != "0" and _library() is not None


def _group_bytes(bits: int, in_features: int, group_size: int | None) -> int | None:
    """Weight bytes per scale: a whole int8 row, or one int4 / int2 group; None for shapes that do not fit."""
    if bits == 8:
        return in_features
    if bits in (2, 4) and group_size and in_features % group_size == 0 and group_size * bits % 8 == 0:
        return group_size * bits // 8
    return None


def uses_gemv(bits: int, rows: int, in_features: int, group_size: int | None = None) -> bool:
    """Whether :func:`vnni_weight_mm` runs the GEMV (else the GEMM) for ``rows`` rows of x (the C++ side
    chooses: int8 weights at M <= 6, or M <= 2 for K <= 512, and at any M past K = 2**16, which the int8
    GEMM does not take; packed ones at M <= 2, or M = 1 for K <= 512, with groups of whole 32-byte chunks)."""
    groups = 1 if bits == 8 else in_features // group_size
    return bool(_loaded_library().quanto_weight_mm_uses_gemv(bits, rows, in_features, groups))


def int8_uses_int_mm(rows: int, in_features: int, out_features: int) -> bool:
    """Whether int8 weights of this shape take :func:`int8_weight_int_mm` (``torch._int_mm``) for ``rows``
    rows of x rather than :func:`vnni_weight_mm`: past ``INT8_VNNI_MAX_M`` rows, for weights of at least
    ``INT_MM_MIN_WEIGHT_BYTES``."""
    return rows > INT8_VNNI_MAX_M and in_features * out_features >= INT_MM_MIN_WEIGHT_BYTES


def _fits(bits: int, in_features: int, group_size: int | None) -> bool:
    """Whether the kernels take a weight of this shape (whatever the machine)."""
    group_bytes = _group_bytes(bits, in_features, group_size)
    step = CHUNK_BYTES if bits == 8 else WORD_BYTES
    return bool(group_bytes) and group_bytes % step == 0 and 0 < in_features <= MAX_IN_FEATURES


def supports(bits: int, in_features: int, group_size: int | None = None) -> bool:
    """Whether :func:`vnni_weight_mm` serves a weight of these bits, input features and group size (None for
    int8's per-channel scales) on this machine, for any number of rows of x."""
    return _fits(bits, in_features, group_size) and available()


def _split_x(x: torch.Tensor):
    """x (M, K) as 16-bit integers in two signed-byte planes (2, M, K), with the per-row scales (M,) (see
    ``quanto_split_x``); None when x holds a NaN, an infinity or a row too small to scale."""
    m, k = x.shape
    x = x.float().contiguous()
    planes = torch.empty((2, m, k), dtype=torch.int8)
    x_scale, x_sums = torch.empty(m, dtype=torch.float32), torch.empty((m, 1), dtype=torch.float32)
    pointers = (planes[0].data_ptr(), planes[1].data_ptr(), x_scale.data_ptr(), x_sums.data_ptr())
    if _loaded_library().quanto_split_x(x.data_ptr(), m, k, 1, k, *pointers, torch.get_num_threads()):
        return None
    return planes, x_scale


def _check_on_cpu(*tensors) -> None:
    """The C++ side reads host memory: a tensor elsewhere is refused, not handed over as a pointer."""
    if not all(t is None or t.is_cpu for t in tensors):
        devices = [t.device.type for t in tensors if t is not None]
        raise ValueError(f"the CPU kernels take CPU tensors, got tensors on {devices}")


def _run(kernel, *args) -> int:
    """Call a C++ entry point; its status 2 (a workspace it could not allocate) becomes a MemoryError."""
    status = kernel(*args)
    if status == 2:
        raise MemoryError(f"quanto_fx CPU kernel {kernel.__name__}: could not allocate its workspace")
    return status


def _check_vnni_args(x, weight, scales, bits, group_size, bias) -> None:
    """What the C++ kernel reads, checked (it trusts every index). Plain comparisons only: at M = 1 every
    microsecond here is ~0.1% of the layer."""
    if x.ndim != 2 or weight.ndim != 2:
        raise ValueError(f"x and the weight must be 2-d tensors, got {x.shape} and {weight.shape}")
    _check_on_cpu(x, weight, scales, bias)
    n, k = weight.shape[0], x.shape[1]
    if not _fits(bits, k, group_size):
        raise ValueError(f"no VNNI kernel for {bits}-bit weights, {k} features, group {group_size}")
    dtype, parts = (torch.int8, (n,)) if bits == 8 else (torch.uint8, (k // group_size, n, 2))
    if weight.dtype != dtype or weight.shape[1] != k * bits // 8 or scales.shape != parts:
        raise ValueError(
            f"a {bits}-bit weight for x of {k} features must be {dtype} ({n}, {k * bits // 8}) with scales "
            f"{parts}, got {weight.dtype} {weight.shape} and {scales.shape}"
        )
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")


def vnni_weight_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``x @ W.T + bias`` as float32 (M, N), or None when x holds a NaN or infinity (the caller's float path
    then propagates it). The GEMV or the GEMM form by the weight's bits and x's rows (see the module
    docstring), x split and the kernel run in one call.

    Args:
        x: (M, K) float activations on the CPU (any float dtype: computed from float32).
        weight: int8 (N, K) for bits = 8, else the uint8 (N, K * bits / 8) packed codes.
        scales: float (N,) per-channel scales for bits = 8, else the (K / group_size, N, 2) scales and zeros.
        bits, group_size: the weight's format; :func:`supports` must hold for them.
        bias: optional (N,) float bias, added in float32.
    """
    _check_vnni_args(x, weight, scales, bits, group_size, bias)
    return weight_mm_prechecked(x, weight, scales, bits, group_size, bias)


def contiguous_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous float32 tensor, without the ~0.5 us of two no-op conversions when it is one."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def weight_mm_prechecked(x, weight, scales, bits, group_size, bias):
    """:func:`vnni_weight_mm` for callers that have checked its arguments themselves, as the weight-only ops
    do (at M = 1 a small layer's call is ~20 us, a second round of checks ~3 us): x a 2-d float tensor, the
    weight, its scales (any float dtype, ``weight.shape[0]`` per-channel scales for int8) and the bias of
    the format's shapes, all on the CPU, and :func:`supports` true for bits, in-features and group size."""
    m, k = x.shape
    x, weight, scales = contiguous_float32(x), weight.contiguous(), contiguous_float32(scales)
    bias = None if bias is None else contiguous_float32(bias)
    out = torch.empty((m, weight.shape[0]), dtype=torch.float32)  # whatever torch's default dtype
    bad_x = _run(
        _loaded_library().quanto_weight_mm,
        bits,
        FLOAT32_STORAGE,
        x.data_ptr(),
        m,
        k,
        weight.data_ptr(),
        weight.shape[0],
        scales.data_ptr(),
        1 if bits == 8 else k // group_size,
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return None if bad_x else out


def dynamic_int8_mm_prechecked(x, weight, scales, bias):
    """The ``int8_dynamic_mm`` op's CPU kernel: x (M, K) float32, float16 or bfloat16 quantized per row to
    int8 codes as ``QTensor.quantize`` does (in x's dtype), times the int8 (N, K) weight, rescaled by x's and
    the weight's ``N`` per-channel scales (any float dtype and shape), plus the bias, as float32 (M, N); None
    when x holds a NaN or an infinity. For the op, which has checked the arguments: all on the CPU,
    :func:`supports` true for 8 bits and K."""
    m, k = x.shape
    precision = PRECISIONS[x.dtype]
    x, weight, scales = contiguous_float32(x), weight.contiguous(), contiguous_float32(scales)
    bias = None if bias is None else contiguous_float32(bias)
    out = torch.empty((m, weight.shape[0]), dtype=torch.float32)
    bad_x = _run(
        _loaded_library().quanto_dynamic_int8_mm,
        precision,
        FLOAT32_STORAGE,
        x.data_ptr(),
        m,
        k,
        weight.data_ptr(),
        weight.shape[0],
        scales.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return None if bad_x else out


def int8_weight_int_mm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """``x @ (w * scale).T`` as float32 for larger M: x's two byte planes stacked into one ``torch._int_mm``
    (oneDNN's VNNI GEMM) with the int8 weight, ``sx * (256 * high @ w.T + low @ w.T) * scale``. Integer
    exact but for x's rounding (~3e-5), and about half the fp32 GEMM's time from M = 32 to 512 (K = N =
    4096, bench/RESULTS.md), where dequantizing the weight for the fp32 GEMM cost 1.4x. None when x holds a
    NaN, an infinity or a row too small to scale (the caller's float path then computes it).

    Args:
        x: (M, K) float activations on the CPU, 0 < K <= ``INT_MM_MAX_IN_FEATURES``; w: int8 (N, K); scale:
            float (N,) per-channel scales.
    """
    _check_on_cpu(x, w, scale)
    scale = scale.reshape(-1).float().contiguous()
    if (
        x.ndim != 2
        or w.dtype != torch.int8
        or w.ndim != 2
        or w.shape[1] != x.shape[1]
        or scale.shape != w.shape[:1]
    ):
        raise ValueError(
            f"w {w.dtype} {tuple(w.shape)} and scale {tuple(scale.shape)} do not fit x {tuple(x.shape)}"
        )
    if not 0 < x.shape[1] <= INT_MM_MAX_IN_FEATURES:
        raise ValueError(f"{x.shape[1]} input features: the int32 GEMM takes 1 to {INT_MM_MAX_IN_FEATURES}")
    m, n = x.shape[0], w.shape[0]
    split = _split_x(x)
    if split is None:
        return None
    planes, x_scale = split
    products = torch._int_mm(planes.view(2 * m, -1), w.t()).contiguous()
    out = torch.empty((m, n), dtype=torch.float32)
    pointers = (products.data_ptr(), m, n, x_scale.data_ptr(), scale.data_ptr(), out.data_ptr())
    _loaded_library().quanto_combine_planes(*pointers, torch.get_num_threads())
    return out
