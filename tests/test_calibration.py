import threading

import pytest
import torch

from quanto_fx import calibrate, calibration, quantize
from quanto_fx.calibrate import absmax_observer, mse_observer, percentile_observer


def model():
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def test_momentum_update_rule():
    qm = quantize(model())
    x1, x2 = torch.randn(32, 8), torch.randn(32, 8) * 4
    with torch.no_grad(), calibration(momentum=0.75):
        qm(x1)
        first = qm[0].in_scale.clone()
        qm(x2)
    torch.testing.assert_close(first, x1.abs().max() / 127)
    torch.testing.assert_close(qm[0].in_scale, 0.75 * first + 0.25 * x2.abs().max() / 127)
    assert qm[2].in_scale.item() != 1.0 and qm[2].out_scale.item() != 1.0


def quantization_mse(x, scale):
    return (torch.round(x / scale).clamp(-127, 127) * scale - x).pow(2).mean()


def test_percentile_observer_ignores_rare_outliers():
    torch.manual_seed(0)
    x = torch.randn(10_000)
    x[:3] = 80.0
    absmax, robust = absmax_observer(x, 127), percentile_observer(99.9)(x, 127)
    assert robust < absmax / 10
    bulk = x[3:]
    assert quantization_mse(bulk, robust) < quantization_mse(bulk, absmax) / 50


def test_mse_observer_clips_heavy_tails():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((20_000,))  # heavy-tailed, like transformer activations
    absmax, robust = absmax_observer(x, 127), mse_observer()(x, 127)
    # The grid includes absmax itself, so the chosen clipping is never worse; on heavy tails it is better.
    assert robust < absmax
    assert quantization_mse(x, robust) < 0.95 * quantization_mse(x, absmax)


def test_bad_arguments_and_no_samples():
    with pytest.raises(ValueError, match="momentum"):
        with calibration(momentum=1.5):
            pass
    with pytest.raises(ValueError, match="unknown observer 'minmax'"):
        with calibration(observer="minmax"):
            pass
    with pytest.raises(RuntimeError, match="saw no sample"):
        with calibration():
            pass
    with pytest.raises(ValueError, match="percentile"):
        percentile_observer(0)


def test_nested_calibration_is_refused():
    qm = quantize(model())
    with pytest.raises(RuntimeError, match="already active"):
        with calibration():
            qm(torch.randn(2, 8))
            with calibration():
                pass


def test_non_finite_activations_are_refused():
    qm = quantize(model())
    x = torch.randn(4, 8)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        with calibration():
            qm(x)


def test_two_threads_calibrate_two_models_without_mixing():
    small, large = quantize(model()), quantize(model())
    xs, xl = torch.randn(64, 8), torch.randn(64, 8) * 100
    barrier = threading.Barrier(2)
    errors = []

    def calibrate(m, x):
        try:
            with torch.no_grad(), calibration():
                barrier.wait()
                for _ in range(20):
                    m(x)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=calibrate, args=a) for a in ((small, xs), (large, xl))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    torch.testing.assert_close(small[0].in_scale, xs.abs().max() / 127)
    torch.testing.assert_close(large[0].in_scale, xl.abs().max() / 127)


def test_calibrate_over_a_dataloader_with_a_batch_limit():
    data = torch.utils.data.TensorDataset(torch.randn(40, 8))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    by_hand, by_loader = quantize(model()), quantize(model())
    by_loader.load_state_dict(by_hand.state_dict())
    with torch.no_grad(), calibration():
        for (batch,) in list(loader)[:3]:
            by_hand(batch)
    assert calibrate(by_loader, loader, max_batches=3, progress=False) == 3
    for a, b in zip(by_hand.state_dict().values(), by_loader.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_calibrate_passes_dict_batches_as_keywords():
    class Keyword(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 4)

        def forward(self, *, features):
            return self.proj(features)

    q = quantize(Keyword())
    features = torch.randn(2, 8)
    assert calibrate(q, [{"features": features}] * 2) == 2
    # the batches reached the layer: its input scale is their absmax scale (both batches alike)
    assert q.proj.in_scale.item() == pytest.approx(features.abs().max().item() / 127, rel=1e-6)


def calibrated(batches, observer):
    torch.manual_seed(1)
    qm = quantize(model())
    with torch.no_grad(), calibration(observer=observer):
        for x in batches:
            qm(x)
    return qm


@pytest.mark.parametrize("observer", ["absmax", "percentile", "mse"])
@pytest.mark.parametrize("uninformative", [torch.zeros(4, 8), torch.empty(0, 8)], ids=["all-zero", "empty"])
def test_all_zero_and_empty_batches_say_nothing(observer, uninformative):
    """Such a batch leaves the scales as they are: mse's clamped scale (finfo.tiny) for an all-zero batch
    replaced the uncalibrated sentinel, the next batch then blended 0.9 * tiny with its observation (a
    scale 10x too small); an empty batch failed in the observers' reductions."""
    x = torch.randn(32, 8)
    with_it, without = calibrated([uninformative, x], observer), calibrated([x], observer)
    assert torch.equal(with_it[0].in_scale, without[0].in_scale)
    if uninformative.numel() == 0:  # an all-zero input still gives bias outputs downstream
        for a, b in zip(with_it.state_dict().values(), without.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_the_progress_helper_wraps_an_iterable_only_when_asked():
    """``_progress(iterable, enabled, desc, total=None)``: shared with mixed_precision's layer loop."""
    from tqdm.auto import tqdm

    from quanto_fx.calibrate import _progress

    items = [1, 2, 3]
    assert _progress(items, False, "calibrating") is items
    bar = _progress(items, True, "calibrating")
    assert isinstance(bar, tqdm) and bar.desc == "calibrating" and list(bar) == items
