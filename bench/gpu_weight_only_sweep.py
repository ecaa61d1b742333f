"""GPU sweep of the weight-only Triton kernels' configs at decode shapes (M <= 16): the int4 decode kernel's
tiles, K slices and stages, the int8 kernel's tiles and stages.

Run on a CUDA machine with triton, through ``SWEEP=1 bench/gpu_all.sh`` (about 2 minutes). Each config runs
once against the reference (a mismatch stops the sweep), then is timed as a CUDA-graph replay (GPU time, no
host overhead), microseconds per call, against bf16 ``F.linear`` and torch's tinygemm int4 kernel. It prints
the fastest configs per shape: GEMV_CONFIGS in ``quanto_fx/kernels/triton_lowbit_mm.py`` and the int8 tiers in
``triton_int8_weight_mm.py`` come from its output. Then, for prefill shapes, it compares the autotuned kernels
with dequantizing the weight to bf16 and calling cuBLAS.
"""

import itertools

import torch
import torch.nn.functional as F
import triton
from gpu_timing import gpu_us, tinygemm

from quanto_fx import QTensor, qint4
from quanto_fx.kernels.triton_int8_weight_mm import int8_weight_mm_triton
from quanto_fx.kernels.triton_lowbit_mm import lowbit_mm_triton
from quanto_fx.kernels.weight_only import lowbit_weight_mm_reference, per_channel_weight_mm_reference
from quanto_fx.tensor import PackedQTensor
from quanto_fx.tensor.groupwise import dequantize_groupwise
from quanto_fx.tensor.packing import unpack

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
GROUP = 128
# int4: the decode kernel, one warp per K slice (K blocks of 128: one group each).
INT4_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": n, "BLOCK_K": 128, "SLICES": s, "num_warps": s, "num_stages": st}
    for n, s, st in itertools.product((16, 32, 64), (2, 4, 8), (2, 3))
]
# int8: the decode tier's tiles and stages.
INT8_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": n, "BLOCK_K": k, "num_warps": 4, "num_stages": st}
    for n, k, st in itertools.product((32, 64), (128, 256), (3, 4, 6))
]


def rel_error(out, ref):
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


def sweep(name, configs, run, ref, by):
    results = []
    for config in configs:
        try:
            error = rel_error(run(config), ref)
        except Exception as e:  # noqa: BLE001  (a config a GPU cannot launch: report it, go on)
            print(f"    {name} {config}: {type(e).__name__}", flush=True)
            continue
        if error > 2e-2:
            raise SystemExit(f"{name} {config}: error {error:.2e} vs the reference")
        results.append((gpu_us(lambda: run(config), rep=20), config))
    results.sort(key=lambda r: r[0])
    for t, config in results[:5]:
        print(f"    {name} {t:6.1f} us  {config}", flush=True)
    values = sorted({c[by] for c in configs})
    best = {v: min((t for t, c in results if c[by] == v), default=float("nan")) for v in values}
    print(f"    {name} best per {by}: " + " ".join(f"{v}: {t:.1f}" for v, t in best.items()), flush=True)


torch.manual_seed(0)
for m, k, n in [(1, 4096, 4096), (16, 4096, 4096), (1, 4096, 14336)]:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    p = PackedQTensor.quantize(w, qint4, GROUP)
    w8 = QTensor.quantize(w.float(), torch.int8, axis=0)
    w8_data, w8_scale = w8._data, w8._scale.reshape(-1)
    tiny = tinygemm(p)
    bf16, tiny_us = gpu_us(lambda: F.linear(x, w)), gpu_us(lambda: tiny(x))
    print(f"{(m, k, n)}: bf16 {bf16:.1f} us, tinygemm int4 {tiny_us:.1f} us", flush=True)
    sweep(
        "int4",
        INT4_CONFIGS,
        lambda c: lowbit_mm_triton(x, p._packed, p._scale_zeros, 4, GROUP, c),
        lowbit_weight_mm_reference(x.float(), p._packed, p._scale_zeros, 4),
        "SLICES",
    )
    sweep(
        "int8",
        INT8_CONFIGS,
        lambda c: int8_weight_mm_triton(x, w8_data, w8_scale, c),
        per_channel_weight_mm_reference(x, w8_data, w8_scale),
        "BLOCK_N",
    )

# Prefill: the autotuned kernels against dequantize-to-bf16 + cuBLAS.
for m, k, n in [(64, 4096, 4096), (256, 4096, 4096), (1024, 4096, 4096)]:
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
        "int8 Triton": gpu_us(lambda: int8_weight_mm_triton(x, w8_data, w8_scale)),
        "int8 dequant+cuBLAS": gpu_us(lambda: F.linear(x, w8_data.to(torch.bfloat16) * w8_scale)),
    }
    bf16 = times["bf16"]
    print(
        f"{(m, k, n)}: " + "  ".join(f"{k} {v:.1f} us ({v / bf16:.2f}x)" for k, v in times.items()),
        flush=True,
    )
