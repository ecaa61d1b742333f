"""quanto_fx.save / load: bit-exact round trips, and clear refusals that leave the model as it was."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import quanto_fx
from quanto_fx import QTensor, calibration, freeze, qfloat8_e4m3fn, quantize
from quanto_fx.nn import QModuleMixin


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4)
    )


@pytest.fixture
def saved(tmp_path):
    qnet = quantize(net())
    x = torch.randn(8, 16)
    with torch.no_grad(), calibration():
        qnet(x)
    freeze(qnet)
    path = tmp_path / "model.safetensors"
    quanto_fx.save(qnet, path)
    return qnet, path, x


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_untouched(model):
    assert not any(isinstance(m, QModuleMixin) for m in model.modules())
    for key, value in net().state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_roundtrip_is_bit_exact(saved):
    qnet, path, x = saved
    loaded = quanto_fx.load(path, net())
    assert quanto_fx.quantization_map(loaded) == quanto_fx.quantization_map(qnet)
    for key, value in qnet.state_dict().items():
        other = loaded.state_dict()[key]
        if isinstance(value, QTensor):
            assert isinstance(other, QTensor) and other.axis == value.axis
            assert torch.equal(other._data, value._data) and torch.equal(other._scale, value._scale)
        else:
            assert torch.equal(other, value)
    assert torch.equal(loaded(x)._data, qnet(x)._data) and torch.equal(loaded(x)._scale, qnet(x)._scale)


def test_load_into_a_meta_skeleton(saved):
    qnet, path, x = saved
    with torch.device("meta"):
        skeleton = net()
    loaded = quanto_fx.load(path, skeleton)
    assert torch.equal(loaded(x)._data, qnet(x)._data)


def test_checkpoint_is_about_a_quarter_of_float(saved, tmp_path):
    big = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    float_path, quant_path = tmp_path / "f.safetensors", tmp_path / "q.safetensors"
    save_file(big.state_dict(), str(float_path))
    quanto_fx.save(freeze(quantize(big, inplace=False)), quant_path)
    assert quant_path.stat().st_size <= 0.3 * float_path.stat().st_size


def rewrite(path, tensors=None, metadata=None):
    old_tensors, old_metadata = read(path)
    save_file(
        tensors if tensors is not None else old_tensors,
        str(path),
        metadata=metadata if metadata is not None else old_metadata,
    )


def test_missing_key(saved):
    _, path, _ = saved
    tensors, _ = read(path)
    del tensors["3.bias"]
    rewrite(path, tensors=tensors)
    model = net()
    with pytest.raises(ValueError, match="(?s)does not fit the model.*3.bias"):
        quanto_fx.load(path, model)
    assert_untouched(model)


def test_extra_key(saved):
    _, path, _ = saved
    tensors, _ = read(path)
    tensors["9.weight"] = torch.zeros(2)
    rewrite(path, tensors=tensors)
    model = net()
    with pytest.raises(ValueError, match="9.weight"):
        quanto_fx.load(path, model)
    assert_untouched(model)


def test_misshaped_key(saved):
    _, path, _ = saved
    tensors, _ = read(path)
    tensors["3.bias"] = torch.zeros(7)
    rewrite(path, tensors=tensors)
    model = net()
    with pytest.raises(ValueError, match="3.bias"):
        quanto_fx.load(path, model)
    assert_untouched(model)


def test_unknown_qtype(saved):
    _, path, _ = saved
    _, metadata = read(path)
    qmap = json.loads(metadata["quantization_map"])
    qmap["0"]["weights"] = "qint9"
    rewrite(path, metadata=metadata | {"quantization_map": json.dumps(qmap)})
    model = net()
    with pytest.raises(ValueError, match="unknown qtype 'qint9'"):
        quanto_fx.load(path, model)
    assert_untouched(model)


def test_a_map_entry_that_is_not_a_mapping_is_refused(saved):
    _, path, _ = saved
    _, metadata = read(path)
    qmap = json.loads(metadata["quantization_map"])
    qmap["0"] = "QLinear"
    rewrite(path, metadata=metadata | {"quantization_map": json.dumps(qmap)})
    model = net()
    with pytest.raises(ValueError, match="entry '0' is not a mapping"):
        quanto_fx.load(path, model)
    assert_untouched(model)


def _forge_weight(path, data, scale, axis):
    """Store 0.weight as the given QTensor parts, its entry saying what they are."""
    tensors, metadata = read(path)
    tensors["0.weight._data"], tensors["0.weight._scale"] = data, scale
    qtensors = json.loads(metadata["qtensors"])
    qtensors["0.weight"]["axis"] = axis
    rewrite(path, tensors=tensors, metadata=metadata | {"qtensors": json.dumps(qtensors)})


def test_a_weight_along_the_wrong_axis_is_refused(saved):
    # a valid QTensor (scales along the input features), which load_state_dict takes: shapes match
    _, path, _ = saved
    q = QTensor.quantize(torch.randn(32, 16), torch.int8, axis=1)
    _forge_weight(path, q._data, q._scale, 1)
    model = net()
    with pytest.raises(
        ValueError, match="'0' is frozen with qint8 weights .* holds a torch.int8 QTensor along axis 1"
    ):
        quanto_fx.load(path, model)
    assert_untouched(model)


def test_a_weight_of_another_qtype_is_refused(saved):
    # float8 codes under a qint8 entry would run the float8 kernels
    _, path, _ = saved
    q = QTensor.quantize(torch.randn(32, 16), qfloat8_e4m3fn, axis=0)
    _forge_weight(path, q._data, q._scale, 0)
    model = net()
    with pytest.raises(ValueError, match="holds a torch.float8_e4m3fn QTensor"):
        quanto_fx.load(path, model)
    assert_untouched(model)


def test_nan_scale_is_refused(saved):
    _, path, _ = saved
    tensors, _ = read(path)
    tensors["0.weight._scale"][0] = float("nan")
    rewrite(path, tensors=tensors)
    with pytest.raises(ValueError, match="QTensor '0.weight'.*non-finite"):
        quanto_fx.load(path, net())


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file(net().state_dict(), str(path))
    with pytest.raises(ValueError, match="not a quanto_fx checkpoint"):
        quanto_fx.load(path, net())


@pytest.mark.parametrize(
    "content", [b"", b"not a safetensors file at all", b"\x10\x00\x00\x00\x00\x00\x00\x00{"]
)
def test_garbage_and_truncated_files(tmp_path, saved, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        quanto_fx.load(path, net())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(saved[1].read_bytes()[:-100])
    model = net()
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        quanto_fx.load(truncated, model)
    assert_untouched(model)


def test_save_refuses_a_float_model(tmp_path):
    with pytest.raises(ValueError, match="no quantized module"):
        quanto_fx.save(net(), tmp_path / "x.safetensors")


def test_load_into_a_missing_path_raises_file_not_found(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        quanto_fx.load(path, net())


def test_save_into_a_directory_is_refused(saved, tmp_path):
    qnet, _, _ = saved
    with pytest.raises(IsADirectoryError, match=f"{re.escape(str(tmp_path))} is a directory"):
        quanto_fx.save(qnet, tmp_path)


def test_an_already_quantized_skeleton_is_refused(saved):
    _, path, _ = saved
    skeleton = quantize(net())
    with pytest.raises(
        ValueError, match="skeleton is already quantized .* expect the float model.s skeleton"
    ):
        quanto_fx.load(path, skeleton)


def test_a_weight_of_another_qtype_is_described_without_groups(saved):
    # an int8 weight under a float8 entry: the message says what float8 weights are, no int4 group size
    _, path, _ = saved
    _, metadata = read(path)
    qmap = json.loads(metadata["quantization_map"])
    qmap["0"] |= {"weights": "qfloat8_e4m3fn", "activations": None}
    rewrite(path, metadata=metadata | {"quantization_map": json.dumps(qmap)})
    model = net()
    with pytest.raises(ValueError, match="qfloat8_e4m3fn weights \\(per output channel\\), but holds") as e:
        quanto_fx.load(path, model)
    assert "None" not in str(e.value)
    assert_untouched(model)


@pytest.mark.parametrize("key", ["0.in_scale", "3.out_scale"])
@pytest.mark.parametrize(
    "value, problem",
    [
        (float("nan"), "non-finite"),
        (float("inf"), "non-finite"),
        (-0.5, "strictly positive"),
        (0.0, "strictly positive"),
    ],
)
def test_a_bad_activation_scale_is_refused(saved, key, value, problem):
    # calibration only writes finite positive scales (update_scale keeps 1.0 or the last one otherwise)
    _, path, _ = saved
    tensors, _ = read(path)
    tensors[key] = torch.tensor(value)
    rewrite(path, tensors=tensors)
    model = net()
    with pytest.raises(ValueError, match=f"activation scale '{key}'.*{problem}"):
        quanto_fx.load(path, model)
    assert_untouched(model)


class WithPositions(torch.nn.Module):
    """A Linear after an offset held in a non-persistent buffer, like BERT's position ids."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 4)
        self.register_buffer("offset", torch.arange(16.0), persistent=False)

    def forward(self, x):
        return self.linear(x + self.offset)


def test_a_meta_skeleton_with_non_persistent_buffers_is_refused(tmp_path):
    path = tmp_path / "positions.safetensors"
    quanto_fx.save(freeze(quantize(WithPositions(), activations=None)), path)
    with torch.device("meta"):
        skeleton = WithPositions()
    with pytest.raises(ValueError, match="non-persistent buffers \\['offset'\\] are on the meta device"):
        quanto_fx.load(path, skeleton)
    assert type(skeleton.linear) is torch.nn.Linear and skeleton.linear.weight.is_meta  # untouched
    loaded = quanto_fx.load(path, WithPositions())  # a real skeleton keeps its own buffer
    assert torch.equal(loaded.offset, torch.arange(16.0))


def test_a_meta_transformers_skeleton_names_every_buffer_left_on_meta(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    path = tmp_path / "bert.safetensors"
    quanto_fx.save(freeze(quantize(transformers.BertModel(config), activations=None)), path)
    with torch.device("meta"):
        skeleton = transformers.BertModel(config)
    with pytest.raises(ValueError, match="embeddings.position_ids.*embeddings.token_type_ids.*meta device"):
        quanto_fx.load(path, skeleton)
