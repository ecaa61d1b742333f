"""GPU timing of the fused Triton int8 ops against bf16 F.linear and the unfused int8 chain.

Run on a CUDA machine with triton, through ``bench/gpu_all.sh`` (about 2 minutes; the W8A8 linear needs the
package installed, for the backend's entry point). Times are CUDA-graph replays (no host overhead),
microseconds per call; ``_int_mm`` and the unfused chain get M padded to at least 32 (cuBLAS int8 needs
M > 16). Last, a whole dynamic W8A8 ``nn.Linear`` under ``backend="quanto"`` (activation quantization
included) against the bf16 ``nn.Linear``. The numbers in RESULTS.md came from this script.
"""

import torch
import torch.nn.functional as F
import triton
from gpu_timing import gpu_us as g
from triton.testing import do_bench

import quanto_fx.kernels  # noqa
from quanto_fx import freeze, qint8, quantize
from quanto_fx.kernels import triton_launch as tlh

print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
ops = torch.ops.quanto_fx


def unfused(a, b, sa, sb, bias):
    return (torch._int_mm(a, b).to(torch.float32) * sa * sb + bias).to(torch.bfloat16)


unfused_c = torch.compile(unfused, dynamic=False)


def e(fn):  # eager wall per call, us
    return do_bench(fn, warmup=10, rep=50) * 1e3


def w8a8_linear(k, n):
    """bf16 nn.Linear and its dynamic W8A8 clone under backend="quanto": per-row activation quantization
    (inductor) + the fused GEMM: what a model's layer costs (the project's target: <= 0.70x bf16)."""
    linear = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    qlinear = quantize(linear, weights=qint8, activations=qint8, activation_mode="dynamic", inplace=False)
    return linear, torch.compile(freeze(qlinear), backend="quanto")


def cosine(a, b):
    return float(F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


# Small-M block configs to compare by hand (set COMPARE_SMALL_CONFIGS = True).
COMPARE_SMALL_CONFIGS = False
SMALL = [
    tlh._config(16, 64, 256, 4, 4),
    tlh._config(16, 32, 256, 4, 4),
    tlh._config(16, 64, 128, 4, 5),
    tlh._config(16, 128, 128, 4, 4),
    tlh._config(64, 32, 256, 4, 4),
    tlh._config(64, 64, 128, 4, 4),
    tlh._config(64, 64, 256, 4, 3),
]
for m, k, n in [(1, 4096, 4096), (16, 4096, 11008), (32, 4096, 4096), (1024, 4096, 4096), (4096, 4096, 4096)]:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    mp = max(m, 32)
    a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
    ap = torch.randint(-127, 128, (mp, k), device="cuda", dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    b = wq.t()
    sa = torch.rand(m, 1, device="cuda") * 0.01
    sap = torch.rand(mp, 1, device="cuda") * 0.01
    sb = torch.rand(1, n, device="cuda") * 0.01
    bias = torch.randn(n, device="cuda")
    ib = torch.randint(-1000, 1000, (n,), device="cuda", dtype=torch.int32)
    osc = torch.tensor(1.0, device="cuda")
    r = {
        "bf16": g(lambda: F.linear(x, w)),
        "int_mm(M>=32)": g(lambda: torch._int_mm(ap, b)),
        "unfused_compiled(M>=32)": g(lambda: unfused_c(ap, b, sap, sb, bias)),
        "fused": g(lambda: ops.int8_mm_rescale(a, b, sa, sb, bias, torch.bfloat16)),
        "fused_requant": g(lambda: ops.int8_mm_requantize(a, b, sa, sb, ib, osc)),
        "fused_eager": e(lambda: ops.int8_mm_rescale(a, b, sa, sb, bias, torch.bfloat16)),
        "bf16_eager": e(lambda: F.linear(x, w)),
    }
    best = tlh._rescale_autotuned.best_config
    try:
        linear, compiled = w8a8_linear(k, n)
        with torch.no_grad():
            print(f"   W8A8 linear cosine vs bf16: {cosine(compiled(x), linear(x)):.4f}", flush=True)
            r["bf16_linear"] = g(lambda: linear(x))
            r["w8a8_linear_quanto"] = g(lambda: compiled(x))
        r["w8a8/bf16"] = r["w8a8_linear_quanto"] / r["bf16_linear"]
    except Exception as error:  # report and go on timing the kernels
        print(f"   W8A8 linear under backend='quanto' failed: {type(error).__name__}: {error}", flush=True)
    line = " ".join(f"{k}={v:.2f}" if k.endswith("/bf16") else f"{k}={v:.1f}" for k, v in r.items())
    unfused_us = r["unfused_compiled(M>=32)"]
    ratios = f"fused/bf16={r['fused'] / r['bf16']:.2f} fused/unf_c={r['fused'] / unfused_us:.2f}"
    print(f"{(m, k, n)} us: {line} | {ratios} best={best}", flush=True)
    if COMPARE_SMALL_CONFIGS:
        for c in SMALL:
            t = g(lambda: tlh.int8_mm_rescale_triton(a, b, sa, sb, bias, torch.bfloat16, config=c))
            print(f"   config {c}: {t:.1f} us", flush=True)
