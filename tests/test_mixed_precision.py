"""Sensitivity-guided mixed precision: choose_precision and PrecisionPlan, and quantizing a model in parts."""

import pytest
import torch

from quanto_fx import PackedQTensor, QTensor, choose_precision, freeze, qint4, qint8, quantize
from quanto_fx.debug import sqnr_db


def model_with_a_fragile_layer():
    """Three Linear layers; the middle one has a few huge weights per row, which int4 groups cannot hold."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(),
        torch.nn.Linear(128, 64),
    )  # fmt: skip
    with torch.no_grad():
        model[2].weight[:, ::16] *= 40
    return model


def samples():
    torch.manual_seed(1)
    return [torch.randn(16, 128) for _ in range(2)]


def test_the_fragile_layer_gets_more_bits_and_the_budget_is_met():
    model, inputs = model_with_a_fragile_layer(), samples()
    plan = choose_precision(model, inputs, budget=15.0, progress=False)
    assert plan.sensitivity["2"]["qint4"] == min(row["qint4"] for row in plan.sensitivity.values())
    assert plan.choices["0"] == qint4 and plan.choices["4"] == qint4 and plan.choices["2"] in (qint8, None)
    quantized = plan.apply(model)
    # the plan's score is what the applied model scores in inference, measured again here
    with torch.no_grad():
        reference = torch.cat([model(x).reshape(-1) for x in inputs])
        measured = sqnr_db(reference, torch.cat([quantized(x).reshape(-1) for x in inputs]))
    assert measured == pytest.approx(plan.score, abs=1e-6) and measured >= 15.0
    assert isinstance(quantized[0].weight, PackedQTensor) and isinstance(quantized[2].weight, QTensor)
    assert not any(isinstance(p, (QTensor, PackedQTensor)) for p in model.parameters())  # model untouched
    # every layer at int4 misses the budget: mixing was needed
    all_int4 = freeze(quantize(model, weights=qint4, activations=None, inplace=False))
    with torch.no_grad():
        assert sqnr_db(reference, torch.cat([all_int4(x).reshape(-1) for x in inputs])) < 15.0


def test_plan_bytes_and_table_describe_the_choice():
    model = model_with_a_fragile_layer()
    plan = choose_precision(model, samples(), budget=15.0, progress=False)
    expected = sum(
        (128 * 128 // 2 + 128 // 128 * 128 * 2 * 4) if plan.choices[n] == qint4 else (128 * 128 + 128 * 4)
        for n in ("0", "2")
    ) + (64 * 128 // 2 + 64 * 2 * 4 if plan.choices["4"] == qint4 else 64 * 128 + 64 * 4)
    assert plan.weight_bytes == expected and plan.float_bytes == (128 * 128 * 2 + 64 * 128) * 4
    lines = str(plan).splitlines()
    # one row per layer: its name, its chosen format, its score alone in each format
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:4]}
    assert {name: row[0] for name, row in rows.items()} == {
        name: choice.name if choice is not None else "float" for name, choice in plan.choices.items()
    }
    for name, row in rows.items():
        assert [float(v) for v in row[1:]] == pytest.approx(
            [plan.sensitivity[name].get(f, float("nan")) for f in ("qint4", "qint8")], abs=1e-4, nan_ok=True
        )
    assert lines[-1].startswith(f"score {plan.score:.4f} (budget 15.0)")
    assert sum(plan.counts().values()) == 3


def test_a_budget_reached_by_every_layer_at_int4_keeps_every_layer_at_int4():
    model = torch.nn.Sequential(torch.nn.Linear(128, 64))
    plan = choose_precision(model, samples(), budget=5.0, progress=False)
    assert plan.choices == {"0": qint4} and plan.steps == []


def test_layers_whose_features_the_group_size_does_not_divide_skip_int4():
    model = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.Linear(96, 32))
    plan = choose_precision(model, samples(), budget=0.0, progress=False)
    assert plan.choices == {"0": qint4, "1": qint8}  # 96 input features: no group of 128
    assert "qint4" not in plan.sensitivity["1"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"candidates": (qint8, qint4)}, "ordered smallest first"),
        ({"candidates": (qint4,), "budget": 200.0}, "budget 200.0: every layer at its largest candidate"),
        ({"include": "nothing*"}, "no nn.Linear or nn.Embedding layer"),
    ],
)
def test_impossible_requests_are_refused(kwargs, message):
    kwargs = {"budget": 20.0} | kwargs
    with pytest.raises(ValueError, match=message):
        choose_precision(model_with_a_fragile_layer(), samples(), progress=False, **kwargs)


def test_layers_no_candidate_fits_are_named():
    # 96 input features: int4 in groups of 128 does not fit the second layer, and it is the only candidate
    model = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.Linear(96, 32))
    with pytest.raises(ValueError, match=r"no candidate fits layers \['1'\] \(group_size 128"):
        choose_precision(model, samples(), budget=0.0, candidates=(qint4,), progress=False)


def test_no_samples_is_refused():
    with pytest.raises(ValueError, match="at least one sample"):
        choose_precision(model_with_a_fragile_layer(), [], budget=1.0)


def test_quantizing_more_layers_of_a_partly_quantized_model():
    model = quantize(model_with_a_fragile_layer(), weights=qint4, activations=None, include="0")
    quantize(model, weights=qint8, activations=None, include=["2", "4"])
    freeze(model)
    assert isinstance(model[0].weight, PackedQTensor) and model[2].weight.qdtype == torch.int8
    with pytest.raises(ValueError, match="already quantized.*include only float layers"):
        quantize(model, weights=qint8, include="0")


def test_embeddings_are_candidates_unless_they_renormalize():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(300, 128), torch.nn.Linear(128, 16))
    ids = [torch.randint(0, 300, (4, 8))]
    assert set(choose_precision(model, ids, budget=10.0, progress=False).choices) == {"0", "1"}
    model[0].max_norm = 1.0
    assert set(choose_precision(model, ids, budget=10.0, progress=False).choices) == {"1"}


class KeywordModel(torch.nn.Module):
    """Called as transformers models are, with keyword arguments (a dict batch)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs, scale=1.0):
        return self.model(inputs * scale)


@pytest.mark.parametrize("as_batch", [lambda x: {"inputs": x, "scale": 2.0}, lambda x: [x, 2.0]])
def test_samples_take_the_batches_calibrate_takes(as_batch):
    model = KeywordModel(model_with_a_fragile_layer())
    inputs = samples()
    plan = choose_precision(model, [as_batch(x) for x in inputs], budget=15.0, progress=False)
    # scored on the model's outputs for those arguments: the same plan as scoring x * 2 directly
    direct = choose_precision(model.model, [2.0 * x for x in inputs], budget=15.0, progress=False)
    assert {n.removeprefix("model."): q for n, q in plan.choices.items()} == direct.choices
    assert plan.score == pytest.approx(direct.score, abs=1e-6)


def test_include_and_exclude_match_whole_layer_names():
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(12)])

    def chosen(**patterns):
        plan = choose_precision(model, [torch.randn(2, 16)], budget=10.0, progress=False, **patterns)
        return set(plan.choices)

    assert chosen(include="11") == {"11"}
    assert chosen(include="1*") == {"1", "10", "11"}
    assert chosen(exclude=["1", "1?"]) == {str(i) for i in range(12)} - {"1", "10", "11"}


def test_linear_subclasses_quantize_does_not_swap_are_not_candidates():
    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    plan = choose_precision(layer, [torch.randn(2, 5, 16)], budget=10.0, progress=False)
    assert set(plan.choices) == {"linear1", "linear2"}  # not self_attn.out_proj, a Linear subclass
    plan.apply(layer)
