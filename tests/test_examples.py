"""The examples run on real data and meet the accuracy and size targets."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits():
    return load_example("digits").run(verbose=False)


def test_digits_w8a8_accuracy_targets(digits):
    assert digits["float"] > 95.0  # the float CNN really learned the task
    assert digits["calibrated"] >= digits["float"] - 1.0  # within 1 point after calibration
    assert digits["qat"] >= digits["float"] - 0.5  # within 0.5 point after QAT


def test_digits_checkpoint_size_and_reload(digits):
    assert digits["quantized_bytes"] <= 0.3 * digits["float_bytes"]
    assert digits["reloaded"] == digits["frozen"]


def test_transformer_example_quantizes_end_to_end():
    results = load_example("transformer").run(verbose=False)
    float_ppl = results["float"]["perplexity"]
    assert float_ppl < 25  # trained: far below the ~80 of a uniform guess over the characters
    for name in ("W8A8 dynamic", "W8A8 static (absmax)", "W8A8 static (percentile)"):
        assert results[name]["perplexity"] < 1.02 * float_ppl, name
        assert results[name]["agreement"] > 90, name
    assert results["W8A8 dynamic"]["sqnr_db"] > 35
    # the outlier-robust observer beats the seed's absmax on this real model
    assert results["W8A8 static (percentile)"]["sqnr_db"] > results["W8A8 static (absmax)"]["sqnr_db"]
