"""GPU check and timing of the weight-only and float8 GEMMs (decode and prefill shapes).

Run on a CUDA machine with triton, through ``bench/gpu_all.sh`` (about 1 minute). It first checks every op
against its reference on the GPU (and stops on a mismatch), then times CUDA-graph replays (no host overhead),
microseconds per call, against bf16 ``F.linear`` and torch's own CUDA int4 kernel (tinygemm,
``aten._weight_int4pack_mm``, a peer: same scales and zeros, its own weight layout). Targets (H100,
M <= 16): int4 weights <= 0.35x bf16, int8 weights <= 0.60x. From ``CUDA_DEQUANTIZED_GEMM_MIN_M`` rows the ops
dequantize the weight and call torch's GEMM; the fused Triton kernels are timed beside them there.
"""

import torch
import torch.nn.functional as F
import triton
from gpu_timing import gpu_us, rel_error, tinygemm

import quanto_fx.kernels  # noqa: F401  (registers the ops)
from quanto_fx import QTensor, qfloat8_e4m3fn, qint2, qint4
from quanto_fx.kernels import triton_int8_weight_mm, triton_lowbit_mm
from quanto_fx.kernels.float8_mm import float8_mm_reference, scaled_mm_works
from quanto_fx.kernels.weight_only import (
    CUDA_DEQUANTIZED_GEMM_MIN_M,
    lowbit_weight_mm_reference,
    per_channel_weight_mm_reference,
)
from quanto_fx.tensor import PackedQTensor

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
print("float8 _scaled_mm works:", scaled_mm_works("cuda", torch.bfloat16), flush=True)
ops = torch.ops.quanto_fx


def check(name, out, ref, tolerance, fatal=True):
    error = rel_error(out, ref)
    status = "ok" if error <= tolerance else "MISMATCH"
    print(f"  check {name}: max error {error:.2e} of max |ref| ({status})", flush=True)
    if status != "ok" and fatal:
        raise SystemExit(1)
    return status == "ok"


torch.manual_seed(0)
for m, k, n in [
    (1, 4096, 4096),
    (4, 4096, 4096),
    (16, 4096, 4096),
    (16, 4096, 11008),
    (1, 4096, 14336),
    (1, 4096, 1024),  # few output tiles (a GQA key / value projection): the decode kernel's hardest case
    (2, 4096, 4096),
    (64, 4096, 4096),
    (128, 4096, 4096),  # prefill from here: the weight dequantized, then torch's GEMM (weight_only.py)
    (1024, 4096, 4096),
    (4096, 4096, 4096),
]:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    packed = {q.name: PackedQTensor.quantize(w, q, 128) for q in (qint4, qint2)}
    w8 = QTensor.quantize(w.float(), torch.int8, axis=0)
    w8_data, w8_scale = w8._data, w8._scale.reshape(-1).to(torch.bfloat16)
    f8 = QTensor.quantize(w.float(), qfloat8_e4m3fn, axis=0)
    x8 = QTensor.quantize(x.float(), qfloat8_e4m3fn, axis=0)
    print(f"{(m, k, n)}", flush=True)
    for name, p in packed.items():
        args = (x, p._packed, p._scale_zeros, p._kernel, p.qtype.bits, 128)
        check(
            name,
            ops.lowbit_weight_mm(*args),
            lowbit_weight_mm_reference(x.float(), *args[1:3], args[4]),
            2e-2,
        )
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    int4_args = (x, packed["qint4"]._packed, packed["qint4"]._scale_zeros, None, 4, 128)
    check(
        "int4 weights + bias (in the kernel; from 128 rows, by addmm)",
        ops.lowbit_weight_mm(*int4_args, bias),
        lowbit_weight_mm_reference(x.float(), *int4_args[1:3], 4) + bias.float(),
        2e-2,
    )
    check(
        "int8 weights",
        ops.int8_weight_mm(x, w8_data, w8_scale),
        per_channel_weight_mm_reference(x, w8_data, w8_scale),
        2e-2,
    )
    # tinygemm takes the same scales and zeros: w = (q - 8) * scale + zero, (K / G, N, 2).
    try:
        tiny = tinygemm(packed["qint4"])
        tiny_ok = check(
            "int4 tinygemm (a peer: torch's CUDA int4 kernel)",
            tiny(x),
            lowbit_weight_mm_reference(x.float(), packed["qint4"]._packed, packed["qint4"]._scale_zeros, 4),
            2e-2,
            fatal=False,
        )
    except RuntimeError as error:
        print(f"  tinygemm did not run: {error}", flush=True)
        tiny_ok = False
    f8_args = (x8._data, f8._data.t(), x8._scale, f8._scale.t(), None, torch.bfloat16)
    check("float8 W8A8", ops.float8_mm(*f8_args), float8_mm_reference(*f8_args), 2e-2)
    f8_scale = f8._scale.reshape(-1).to(torch.bfloat16)
    check(
        "float8 weights",
        ops.float8_weight_mm(x, f8._data, f8_scale),
        per_channel_weight_mm_reference(x, f8._data, f8_scale),
        2e-2,
    )
    # The configs the autotuners chose for int4 and int8, read before int2, float8 and the bias run theirs.
    int4_us = gpu_us(lambda: ops.lowbit_weight_mm(*int4_args))
    dequantized = m >= CUDA_DEQUANTIZED_GEMM_MIN_M
    if dequantized:
        int4_config = "dequantized, then torch's GEMM"
    elif m <= triton_lowbit_mm.FMA_MAX_M:
        int4_config = triton_lowbit_mm._fma_autotuned.best_config
    elif m <= triton_lowbit_mm.DECODE_MAX_M:
        int4_config = triton_lowbit_mm._gemv_autotuned.best_config
    else:
        int4_config = triton_lowbit_mm._autotuned.best_config
    int8_us = gpu_us(lambda: ops.int8_weight_mm(x, w8_data, w8_scale))
    if dequantized:
        int8_config = int4_config
    elif m <= triton_int8_weight_mm.INT8_FMA_MAX_M:
        int8_config = triton_int8_weight_mm._int8_fma_autotuned.best_config
    else:
        int8_config = triton_int8_weight_mm._int8_autotuned.best_config
    if dequantized:  # the fused kernels the ops no longer take at this M, for the threshold
        fused = {
            "int4 fused": gpu_us(lambda: triton_lowbit_mm.lowbit_mm_triton(x, *int4_args[1:3], 4, 128)),
            "int8 fused": gpu_us(lambda: triton_int8_weight_mm.int8_weight_mm_triton(x, w8_data, w8_scale)),
        }
    else:
        fused = {}
    times = {
        "bf16": gpu_us(lambda: F.linear(x, w)),
        "int4 (op)": int4_us,
        "int4 + bias": gpu_us(lambda: ops.lowbit_weight_mm(*int4_args, bias)),
        "int4 (tinygemm)": gpu_us(lambda: tiny(x)) if tiny_ok else float("nan"),
        "int2 (op)": gpu_us(
            lambda: ops.lowbit_weight_mm(
                x, packed["qint2"]._packed, packed["qint2"]._scale_zeros, None, 2, 128
            )
        ),
        "int8 weights": int8_us,
        "float8 weights": gpu_us(lambda: ops.float8_weight_mm(x, f8._data, f8_scale)),
        "float8 W8A8": gpu_us(lambda: ops.float8_mm(*f8_args)),
        **fused,
    }
    bf16 = times["bf16"]
    print("  " + "  ".join(f"{k} {v:.1f} us ({v / bf16:.2f}x)" for k, v in times.items()), flush=True)
    print(f"  configs: int4 {int4_config}, int8 {int8_config}", flush=True)
