"""CPU timing of the fused int8 ops against the unfused chains they replace (< 1 min).

Run: ``.venv/bin/python bench/kernels_cpu.py``. Prints the median ms per call of ``aten._int_mm`` alone, the
unfused ``_int_mm -> rescale`` / ``-> requantize`` chains as eager torch runs them, and the fused ops, all
measured interleaved in one process; the ratio column is fused / unfused (<= 1.0 is the bar).
"""

import statistics
import time

import torch

import quanto_fx.kernels  # noqa: F401  (registers the ops)

SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096), (512, 1024, 4096)]
ROUNDS = 15


def unfused_rescale(a, b, a_scale, b_scale, bias):
    return torch._int_mm(a, b).to(torch.float32) * a_scale * b_scale + bias


def unfused_requantize(a, b, a_scale, b_scale, bias, out_scale):
    acc = (torch._int_mm(a, b) + bias).to(torch.float32)
    return torch.round(acc * (a_scale * b_scale / out_scale)).clamp(-127, 127).to(torch.int8)


def median_ms(fns: dict, rounds: int) -> dict:
    """Median ms per call of each function, timed round-robin so that drift hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up (oneDNN primitive creation)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def contenders(m: int, k: int, n: int) -> dict:
    """The calls to time on one (M, K, N): a per-row x per-column scaled, biased linear layer."""
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8).t()  # a transposed (N, K) weight
    # rescale serves dynamic activations (a scale per row); requantize static ones (one scale per tensor)
    a_scale, b_scale = torch.rand(m, 1) * 0.01, torch.rand(1, n) * 0.01
    static_scale = torch.rand(()) * 0.01
    bias, out_scale = torch.randn(n), torch.tensor(1.0)
    ibias = torch.randint(-1000, 1000, (n,), dtype=torch.int32)
    ops = torch.ops.quanto_fx
    return {
        "int_mm": lambda: torch._int_mm(a, b),
        "unfused_rescale": lambda: unfused_rescale(a, b, a_scale, b_scale, bias),
        "rescale": lambda: ops.int8_mm_rescale(a, b, a_scale, b_scale, bias, torch.float32),
        "unfused_requantize": lambda: unfused_requantize(a, b, static_scale, b_scale, ibias, out_scale),
        "requantize": lambda: ops.int8_mm_requantize(a, b, static_scale, b_scale, ibias, out_scale),
    }


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms per call of {ROUNDS}")
    print(
        f"{'(M, K, N)':>18} {'_int_mm':>8} {'unf.resc':>9} {'fused':>8} {'ratio':>6}"
        f" {'unf.requ':>9} {'fused':>8} {'ratio':>6}"
    )
    for shape in SHAPES:
        t = median_ms(contenders(*shape), ROUNDS)
        rescale, requantize = t["rescale"] / t["unfused_rescale"], t["requantize"] / t["unfused_requantize"]
        print(
            f"{str(shape):>18} {t['int_mm']:8.3f}"
            f" {t['unfused_rescale']:9.3f} {t['rescale']:8.3f} {rescale:6.2f}"
            f" {t['unfused_requantize']:9.3f} {t['requantize']:8.3f} {requantize:6.2f}"
        )


if __name__ == "__main__":
    main()
