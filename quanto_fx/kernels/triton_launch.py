"""Launchers of the Triton kernels (``triton_int8_mm.py``): block configs, autotuning, output allocation.

They take the ops' arguments and are registered as the ops' CUDA implementations (see ``__init__``). Passing
``config`` runs one fixed config instead of autotuning (tests, the interpreter, benchmarks of one config).
Most helpers here serve every Triton launcher (``triton_lowbit_mm.py``, ``triton_int8_weight_mm.py``,
``triton_dequantize.py``): block configs and M's tiers, autotuning timed on the GPU alone, forced configs, the
device guard, the empty product.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton

from .checks import check_requantize_args, check_rescale_args
from .triton_int8_mm import int8_mm_requantize_kernel, int8_mm_rescale_kernel


def _config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> triton.Config:
    kwargs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# Block configs for Hopper, in tiers by M; the autotuner picks within the tier (timings: H200, torch 2.11).
# Tiles of 64 rows and more compile to wgmma (one warpgroup MMA is 64 rows high); 16-row tiles to mma.sync,
# also int8 tensor cores. Shared memory stays under 100 KB for the pipeline, except for the two largest
# prefill tiles (144 KB: Hopper and A100; the autotuner skips a config a GPU cannot launch). Those two took
# the fused rescale from 0.75x to 0.67x bf16's time at M = 1024 and from 0.82x to 0.68x at M = 4096.
CONFIG_TIERS = {
    # M <= 16 (decode): memory bound on the weight. 16-row mma.sync tiles beat 64-row wgmma ones by 20-25%
    # (M = 1: 6.1 vs 7.9 us at K = N = 4096), and narrow N tiles spread the weight over more SMs.
    16: [_config(16, 32, 256, 4, 4), _config(16, 64, 256, 4, 4), _config(16, 64, 128, 4, 5)],
    # 16 < M <= 64: one row tile; narrow N tiles still win (M = 32: 8.0 us vs 16.1 for 64 x 128).
    64: [_config(64, 32, 256, 4, 4), _config(64, 64, 256, 4, 3), _config(64, 128, 128, 4, 4)],
    # M > 64: compute bound.
    None: [
        _config(128, 128, 128, 8, 3),
        _config(128, 128, 64, 8, 4),
        _config(128, 256, 64, 8, 3),
        _config(64, 128, 128, 4, 4),
        _config(128, 256, 128, 8, 3),
        _config(256, 128, 128, 8, 3),
    ],
}
CONFIGS = [config for tier in CONFIG_TIERS.values() for config in tier]


def _m_bucket(m: int) -> int:
    """Autotuning key for M: the next power of two, capped, so that varying token counts reuse one tuning."""
    return min(triton.next_power_of_2(m), 4096)


def _tier(tiers: dict, m: int) -> list[triton.Config]:
    """The configs of the first tier of ``tiers`` (max M -> configs, None last) that takes M = ``m``."""
    return next(tier for max_m, tier in tiers.items() if max_m is None or m <= max_m)


def _prune_configs(configs, named_args, **kwargs):
    """The configs of M's tier."""
    return _tier(CONFIG_TIERS, named_args["M"])


def _bench_on_gpu_alone(kernel_call, quantiles):
    # Launching costs more host time than a small-M kernel runs, so eager timing measures the same launch
    # overhead for every config. Replaying a CUDA graph of launches times the GPU alone.
    return triton.testing.do_bench_cudagraph(kernel_call, quantiles=quantiles)


def _autotune(configs: list[triton.Config], key: list[str], prune=None):
    """Every Triton launcher's autotuner: ``configs`` timed on the GPU alone, once per value of ``key`` (the
    launch arguments that change the best config; triton adds the tensors' dtypes), after ``prune`` (an
    early_config_prune: the configs that suit the launch) when given."""
    return triton.autotune(
        configs=configs,
        key=key,
        prune_configs_by=None if prune is None else {"early_config_prune": prune},
        do_bench=_bench_on_gpu_alone,
    )


_int8_mm_autotune = _autotune(CONFIGS, ["M_BUCKET", "N", "K", "HAS_BIAS", "RELU"], _prune_configs)
_rescale_autotuned = _int8_mm_autotune(int8_mm_rescale_kernel)
_requantize_autotuned = _int8_mm_autotune(int8_mm_requantize_kernel)


def _vector_stride(t: torch.Tensor, dim: int) -> int:
    """Stride of a per-row / per-column scale along ``dim``; 0 broadcasts a 0-d (per-tensor) scale."""
    return t.stride(dim) if t.ndim else 0


def _launch(kernel, autotuned, config, tensors, m, n, k, strides, **flags) -> None:
    args = (*tensors, m, n, k, _m_bucket(m), *strides)
    if config is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        autotuned[grid](*args, **flags)
    else:
        grid = (triton.cdiv(m, config.kwargs["BLOCK_M"]) * triton.cdiv(n, config.kwargs["BLOCK_N"]),)
        kernel[grid](*args, **flags, **config.all_kwargs())


def _device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the operands'. CPU tensors only reach here
    # under TRITON_INTERPRET=1 (tests).
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _strides(a, b, out, a_scale, b_scale, bias) -> tuple[int, ...]:
    return (
        *a.stride(),
        *b.stride(),
        *out.stride(),
        _vector_stride(a_scale, 0),
        _vector_stride(b_scale, 1),
        0 if bias is None else bias.stride(0),
    )


def int8_mm_rescale_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    relu: bool = False,
    *,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``quanto_fx::int8_mm_rescale`` through the fused Triton kernel (semantics: ``reference.py``)."""
    check_rescale_args(a, b, a_scale, b_scale, bias, out_dtype)
    (m, k), n = a.shape, b.shape[1]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    # Without a bias, any pointer fills the slot: HAS_BIAS=False compiles its load away.
    tensors = (a, b, out, a_scale, b_scale, a_scale if bias is None else bias)
    with _device_guard(a):
        _launch(
            int8_mm_rescale_kernel,
            _rescale_autotuned,
            config,
            tensors,
            m,
            n,
            k,
            _strides(a, b, out, a_scale, b_scale, bias),
            HAS_BIAS=bias is not None,
            RELU=relu,
        )
    return out


def int8_mm_requantize_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_scale: torch.Tensor,
    relu: bool = False,
    *,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``quanto_fx::int8_mm_requantize`` through the fused Triton kernel (bit-exact with ``reference.py``)."""
    check_requantize_args(a, b, a_scale, b_scale, bias, out_scale)
    (m, k), n = a.shape, b.shape[1]
    out = torch.empty((m, n), dtype=torch.int8, device=a.device)
    if m == 0 or n == 0:
        return out
    tensors = (a, b, out, a_scale, b_scale, a_scale if bias is None else bias, out_scale)
    with _device_guard(a):
        _launch(
            int8_mm_requantize_kernel,
            _requantize_autotuned,
            config,
            tensors,
            m,
            n,
            k,
            _strides(a, b, out, a_scale, b_scale, bias),
            HAS_BIAS=bias is not None,
            RELU=relu,
        )
    return out


def _is_power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _forced_config(config: dict, min_block_k: int) -> tuple[dict, dict]:
    """(block sizes, launch options) of a forced ``config`` dict, checked against the kernels' constraints."""
    unknown = set(config) - {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}
    if unknown:
        raise ValueError(f"config has unknown keys {sorted(unknown)}")
    missing = {"BLOCK_M", "BLOCK_N", "BLOCK_K"} - set(config)
    if missing:
        raise ValueError(f"config lacks {sorted(missing)}")
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    for name, block in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
        if not isinstance(block, int) or block < 16 or not _is_power_of_two(block):
            raise ValueError(f"config {name} must be a power of two >= 16 (tl.dot's tile), got {block!r}")
    if not isinstance(block_k, int) or block_k < min_block_k or not _is_power_of_two(block_k):
        raise ValueError(f"config BLOCK_K must be a power of two >= {min_block_k}, got {block_k!r}")
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": config.get("GROUP_M", 8)}
    options = {"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 3)}
    return meta, options


def _empty_product(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``out`` for K = 0 (the empty sum) or an empty M or N: zeros plus the bias."""
    return out.zero_() if bias is None else out.copy_(bias.to(out.dtype).expand_as(out))


def _check_runs_on(x: torch.Tensor) -> None:
    """A weight-only kernel runs on CUDA tensors, or on CPU ones under TRITON_INTERPRET=1 (tests)."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"the Triton kernel needs CUDA tensors (CPU ones only under TRITON_INTERPRET=1), got {x.device}"
        )
