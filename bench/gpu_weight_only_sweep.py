"""GPU sweep of the weight-only Triton kernels' configs at decode shapes (M <= 16): the int4 kernels' tiles,
K slices and stages (the tensor-core decode kernel's, and the CUDA-core one's at M = 1, 2 and 4), the int8
kernels' (tensor cores, and CUDA cores at M = 1); then, for prefill shapes, the autotuned fused kernels
against dequantizing the weight to bf16 and calling cuBLAS: with torch ops, and as the ops do from
``CUDA_DEQUANTIZED_GEMM_MIN_M`` rows (a Triton kernel, ``triton_dequantize.py``), which sets that threshold.

Run on a CUDA machine with triton, through ``PARTS=sweep bench/gpu_all.sh`` (3-5 minutes), or
``python3 bench/gpu_weight_only_sweep.py [int4] [int8] [prefill]`` for some parts. Each config runs once
against the reference (a mismatch is reported, the config skipped and the exit status 1), then is timed as a
CUDA-graph replay (GPU time, no host overhead), microseconds per call, against bf16 ``F.linear`` and torch's
tinygemm int4 kernel. It prints the fastest configs per shape: GEMV_CONFIGS, FMA_CONFIGS and FMA_MAX_M in
``quanto_fx/kernels/triton_lowbit_mm.py`` and the int8 tiers and INT8_FMA_CONFIGS in
``triton_int8_weight_mm.py`` come from it.
"""

import itertools
import sys

import torch
import torch.nn.functional as F
import triton
from gpu_timing import gpu_us, rel_error, tinygemm

from quanto_fx import QTensor, qint4
from quanto_fx.kernels.triton_int8_weight_mm import int8_weight_mm_triton
from quanto_fx.kernels.triton_lowbit_mm import lowbit_mm_triton
from quanto_fx.kernels.weight_only import (
    lowbit_dequantized_gemm,
    lowbit_weight_mm_reference,
    per_channel_dequantized_gemm,
    per_channel_weight_mm_reference,
)
from quanto_fx.tensor import PackedQTensor
from quanto_fx.tensor.groupwise import dequantize_groupwise
from quanto_fx.tensor.packing import unpack

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
GROUP = 128
PARTS = sys.argv[1:] or ["int4", "int8", "prefill"]
# int4: the tensor-core decode kernel, one warp per K slice (K blocks of 128: one group each); 32- and 64-wide
# tiles lost to 16-wide ones at every shape on an H200 (bench/RESULTS.md).
INT4_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "SLICES": s, "num_warps": s, "num_stages": st}
    for s, st in itertools.product((2, 4, 8), (2, 3))
]
# The CUDA-core decode kernel: slices of 64 bytes (a group of 128 int4 codes), the warps of a program split
# each step's slices.
FMA_CONFIGS = [
    {"BLOCK_N": n, "BLOCK_B": 64, "SLICES": s, "num_warps": w, "num_stages": 1}
    for n, s, w in itertools.product((16, 32), (2, 4, 8, 16), (4, 8))
] + [{"BLOCK_N": 16, "BLOCK_B": 64, "SLICES": 16, "num_warps": 16, "num_stages": 1}]  # a warp per slice
# int8: the decode tier's tiles and stages, and 16-wide tiles, untimed: at N = 1024 and M = 1 the tier's
# 32-wide ones run 32 programs, and int8 weights took 1.28x bf16's time there (H200, twelfth session). Each
# compiles for sm_90 to bf16 mma.sync with cp.async and matches the reference in the interpreter (triton
# 3.6.0, no GPU).
INT8_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": n, "BLOCK_K": k, "num_warps": 4, "num_stages": st}
    for n, k, st in itertools.product((32, 64), (128, 256), (3, 4, 5, 6))
] + [
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": k, "num_warps": w, "num_stages": st}
    for k, w, st in itertools.product((128, 256), (2, 4), (3, 4))
]
# int8, the CUDA-core decode kernel at M = 1 (untimed): 8- and 16-wide tiles, slices of 64 or 128 bytes.
INT8_FMA_CONFIGS = [
    {"BLOCK_N": n, "BLOCK_B": b, "SLICES": s, "num_warps": w, "num_stages": 1}
    for n, b, s, w in itertools.product((8, 16), (64, 128), (2, 4, 8, 16), (4, 8))
] + [{"BLOCK_N": 16, "BLOCK_B": 64, "SLICES": 16, "num_warps": 16, "num_stages": 1}]


mismatches = []


def sweep(name, configs, run, ref, by):
    results = []
    for config in configs:
        try:
            error = rel_error(run(config), ref)
        except Exception as e:  # noqa: BLE001  (a config a GPU cannot launch: report it, go on)
            print(f"    {name} {config}: {type(e).__name__}", flush=True)
            continue
        if error > 2e-2:
            print(f"    {name} {config}: MISMATCH, error {error:.2e} vs the reference", flush=True)
            mismatches.append(config)
            continue
        results.append((gpu_us(lambda: run(config), rep=20), config))
    results.sort(key=lambda r: r[0])
    for t, config in results[:6]:
        print(f"    {name} {t:6.1f} us  {config}", flush=True)
    values = sorted({c[by] for c in configs})
    best = {v: min((t for t, c in results if c[by] == v), default=float("nan")) for v in values}
    print(f"    {name} best per {by}: " + " ".join(f"{v}: {t:.1f}" for v, t in best.items()), flush=True)


torch.manual_seed(0)
decode_shapes = [
    (1, 4096, 4096),
    (2, 4096, 4096),
    (4, 4096, 4096),
    (16, 4096, 4096),
    (1, 4096, 14336),
    (2, 4096, 14336),
    (1, 4096, 1024),
    (4, 4096, 1024),
]
for m, k, n in decode_shapes if {"int4", "int8"} & set(PARTS) else []:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    p = PackedQTensor.quantize(w, qint4, GROUP)
    w8 = QTensor.quantize(w.float(), torch.int8, axis=0)
    w8_data, w8_scale = w8._data, w8._scale.reshape(-1)
    try:  # a peer's kernel: its failure is reported, not fatal to the sweep
        tiny = tinygemm(p)
        tiny_us = f"{gpu_us(lambda: tiny(x)):.1f} us"
    except RuntimeError as error:
        tiny_us = f"did not run ({error})"
    print(f"{(m, k, n)}: bf16 {gpu_us(lambda: F.linear(x, w)):.1f} us, tinygemm int4 {tiny_us}", flush=True)
    if "int4" in PARTS:
        int4_ref = lowbit_weight_mm_reference(x.float(), p._packed, p._scale_zeros, 4)
        int4_run = lambda c: lowbit_mm_triton(x, p._packed, p._scale_zeros, 4, GROUP, c)  # noqa: E731
        sweep("int4", INT4_CONFIGS, int4_run, int4_ref, "SLICES")
        if m <= 4:
            sweep("int4 CUDA cores", FMA_CONFIGS, int4_run, int4_ref, "SLICES")
    int8_run = lambda c: int8_weight_mm_triton(x, w8_data, w8_scale, c)  # noqa: E731
    if "int8" in PARTS and m in (1, 16):
        int8_ref = per_channel_weight_mm_reference(x, w8_data, w8_scale)
        sweep("int8", INT8_CONFIGS, int8_run, int8_ref, "BLOCK_N")
        if m == 1:
            sweep("int8 CUDA cores", INT8_FMA_CONFIGS, int8_run, int8_ref, "BLOCK_N")

# Prefill: the autotuned fused kernels against dequantize-to-bf16 + cuBLAS (torch ops; the ops' path).
prefill_shapes = [(m, 4096, 4096) for m in (64, 128, 256, 1024, 4096)] + [(256, 4096, 14336)]
for m, k, n in prefill_shapes if "prefill" in PARTS else []:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    p = PackedQTensor.quantize(w, qint4, GROUP)
    sz = p._scale_zeros.to(torch.bfloat16)
    w8 = QTensor.quantize(w.float(), torch.int8, axis=0)
    w8_data, w8_scale = w8._data, w8._scale.reshape(-1, 1).to(torch.bfloat16)
    times = {
        "bf16": gpu_us(lambda: F.linear(x, w)),
        "int4 Triton": gpu_us(lambda: lowbit_mm_triton(x, p._packed, p._scale_zeros, 4, GROUP)),
        "int4 dequant+cuBLAS": gpu_us(lambda: F.linear(x, dequantize_groupwise(unpack(p._packed, 4), sz, 4))),
        "int4 Triton dequant+cuBLAS": gpu_us(
            lambda: lowbit_dequantized_gemm(x, p._packed, p._scale_zeros, 4, GROUP)
        ),
        "int8 Triton": gpu_us(lambda: int8_weight_mm_triton(x, w8_data, w8_scale)),
        "int8 dequant+cuBLAS": gpu_us(lambda: F.linear(x, w8_data.to(torch.bfloat16) * w8_scale)),
        "int8 Triton dequant+cuBLAS": gpu_us(lambda: per_channel_dequantized_gemm(x, w8_data, w8_scale)),
    }
    bf16 = times["bf16"]
    print(
        f"{(m, k, n)}: " + "  ".join(f"{k} {v:.1f} us ({v / bf16:.2f}x)" for k, v in times.items()),
        flush=True,
    )
if mismatches:
    raise SystemExit(f"{len(mismatches)} configs did not match the reference")
