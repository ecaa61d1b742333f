"""The examples run on real data and meet the accuracy and size targets."""

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # examples import their shared stdlib_text module
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
    # compiled with backend="quanto": what eager computes (per-token scales may flip a rounding)
    assert abs(results["W8A8 dynamic, quanto"]["sqnr_db"] - results["W8A8 dynamic"]["sqnr_db"]) < 0.5
    # int4 weights cost accuracy; the mixed plan (budget 30 dB on calibration windows) buys most of it back
    w4, mixed = results["W4 (int4 weights)"], results["W4/W8 mixed"]
    assert w4["perplexity"] < 1.05 * float_ppl and mixed["sqnr_db"] > w4["sqnr_db"] + 3
    assert mixed["sqnr_db"] > 28  # on held-out windows
    # no layer kept float, some at int4: fewer bytes than int8 everywhere (0.5625 bytes a weight at int4)
    assert mixed["float_layers"] == 0 and mixed["int4_layers"] > 0


def test_llama_decoder_compiles_with_every_linear_fused():
    import torch

    import quanto_fx

    example = load_example("transformer")
    text = example.load_text()
    vocab = sorted(set(text))
    ids = example.windows(example.encode(text, vocab))[:4]
    qmodel = quanto_fx.freeze(quanto_fx.quantize(example.make_model(len(vocab)), activation_mode="dynamic"))
    report = quanto_fx.explain(qmodel, ids, options={"fusion": True})  # the rules, forced on the CPU
    # 2 layers x 7 projections + the LM head, in one graph, each a fused int8 GEMM with its rescale
    assert report.graph_count == 1 and not report.graph_breaks
    assert report.fused_kernels == {"int8_mm_rescale": 15} and report.unfused_int_mm_in_code == 0
    with torch.no_grad():
        eager = qmodel(input_ids=ids).logits
        compiled = torch.compile(qmodel, backend="quanto")(input_ids=ids).logits
    # per-token scales computed by inductor may flip a rounding: within a few int8 steps of eager
    assert (compiled - eager).abs().max() <= 0.03 * eager.abs().max()
