"""calibration(): record activation ranges of quantized modules while samples pass through.

The active calibration is thread-local: a model calibrated in one thread never sees statistics from
another thread's samples, and inference elsewhere is unaffected.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

__all__ = ["calibration", "calibrate", "Observer", "absmax_observer", "percentile_observer", "mse_observer"]

# An observer maps a batch of float activations to the scale it wants for a symmetric range [-qmax, qmax].
Observer = Callable[[torch.Tensor, int], torch.Tensor]


def absmax_observer(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """The seed's observer: the absolute maximum maps to qmax. Exact for the batch, sensitive to outliers."""
    return x.detach().abs().amax().float() / qmax


def percentile_observer(percentile: float = 99.99) -> Observer:
    """An outlier-robust observer: the ``percentile``-th percentile of |x| maps to qmax (beyond saturates)."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")

    def observe(x: torch.Tensor, qmax: int) -> torch.Tensor:
        flat = x.detach().abs().flatten().float()
        k = max(1, min(flat.numel(), round(flat.numel() * percentile / 100)))
        return flat.kthvalue(k).values / qmax

    return observe


def mse_observer(candidates: int = 40) -> Observer:
    """An outlier-robust observer: the clipping range (a fraction of absmax) minimizing quantization MSE."""

    def observe(x: torch.Tensor, qmax: int) -> torch.Tensor:
        flat = x.detach().flatten().float()
        absmax = flat.abs().amax()
        ratios = torch.linspace(1.0 / candidates, 1.0, candidates, device=flat.device)
        scales = (absmax * ratios / qmax).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(flat[None, :] / scales[:, None]).clamp(-qmax, qmax) * scales[:, None]
        errors = (q - flat[None, :]).pow(2).mean(dim=1)
        # An all-zero batch observes 0, as absmax_observer does: the clamped scale `tiny` would pass for a
        # real observation and replace the uncalibrated sentinel (NaN stays NaN: update_scale refuses it).
        return torch.where(absmax == 0, 0.0, scales[errors.argmin()])

    return observe


_OBSERVERS: dict[str, Callable[[], Observer]] = {
    "absmax": lambda: absmax_observer,
    "percentile": percentile_observer,
    "mse": mse_observer,
}


@dataclass
class CalibrationState:
    momentum: float
    observer: Observer
    modules_seen: set[int] = field(default_factory=set)


_local = threading.local()


def active_calibration() -> CalibrationState | None:
    """The calibration running in this thread, if any."""
    return getattr(_local, "state", None)


@contextmanager
def calibration(momentum: float = 0.9, observer: str | Observer = "absmax") -> Iterator[CalibrationState]:
    """Record input and output scales of statically quantized modules while samples pass through.

    Each forward of a quantized module updates its ``in_scale`` / ``out_scale`` buffers with an exponential
    moving average: ``scale = momentum * scale + (1 - momentum) * observed`` (the first sample sets it).

    Args:
        momentum: weight of the running scale, in [0, 1).
        observer: ``"absmax"`` (the seed's), ``"percentile"`` (99.99th percentile of |x|), ``"mse"``
            (MSE-optimal clipping), or a callable ``(activations, qmax) -> scale``. The robust observers
            ignore rare outliers that would otherwise stretch the int8 range and waste its resolution.

    Raises:
        ValueError: a bad momentum or observer name; RuntimeError when no quantized module saw a sample.
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    if isinstance(observer, str):
        if observer not in _OBSERVERS:
            raise ValueError(f"unknown observer {observer!r}; valid: {', '.join(sorted(_OBSERVERS))}")
        observer = _OBSERVERS[observer]()
    if active_calibration() is not None:
        raise RuntimeError("calibration() is already active in this thread; nesting it is not supported")
    state = CalibrationState(momentum, observer)
    _local.state = state
    try:
        yield state
    finally:
        _local.state = None
    if not state.modules_seen:
        raise RuntimeError(
            "calibration() saw no sample pass through a statically quantized module: run the quantized "
            "model on representative inputs inside the `with calibration():` block"
        )


def update_scale(scale: torch.Tensor, values: torch.Tensor, qmax: int, state: CalibrationState) -> None:
    """Fold one observation of ``values`` into the ``scale`` buffer (in place)."""
    if values.numel() == 0:
        return  # an empty batch says nothing about the range (and the observers' reductions need values)
    observed = state.observer(values, qmax).to(scale.dtype)
    if not torch.isfinite(observed).all():
        raise ValueError("calibration observed non-finite activations (NaN or Inf)")
    if not bool(observed > 0):
        return  # an all-zero batch says nothing about the range: keep the scale as it is
    # 1.0 is the uncalibrated sentinel (as in the seed): the first observation replaces it.
    if bool(scale == 1):
        scale.copy_(observed)
    else:
        scale.mul_(state.momentum).add_(observed * (1 - state.momentum))


def _progress(iterable, enabled: bool, desc: str, total: int | None = None):
    """tqdm when it is installed and wanted; the plain iterable otherwise (also for mixed_precision)."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional: no bar then
            return iterable
        return tqdm(iterable, total=total, desc=desc, leave=False)
    return iterable


def _run_batch(model: torch.nn.Module, batch):
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list, else ``model(batch)`` (also for
    mixed_precision's samples)."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def calibrate(
    model: torch.nn.Module,
    batches,
    max_batches: int | None = None,
    progress: bool = True,
    momentum: float = 0.9,
    observer: str | Observer = "absmax",
) -> int:
    """Run ``model`` over ``batches`` (a DataLoader or any iterable) inside ``calibration()``, under no_grad.

    A batch may be a tensor (``model(batch)``), a tuple or list (``model(*batch)``) or a dict
    (``model(**batch)``). Stops after ``max_batches`` when given; shows a tqdm progress bar when tqdm is
    installed and ``progress`` is true. Returns the number of batches run.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive number of batches, got {max_batches}")
    total = len(batches) if hasattr(batches, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    count = 0
    with torch.no_grad(), calibration(momentum, observer):
        for batch in _progress(batches, progress, "calibrating", total):
            _run_batch(model, batch)
            count += 1
            if count == max_batches:
                break
    return count
