"""quantize / freeze / quantization_map / requantize on whole models."""

import copy
import io
import warnings

import pytest
import torch

from quanto_fx import QTensor, calibration, freeze, qint4, quantization_map, quantize, requantize
from quanto_fx.nn import QConv2d, QLayerNorm, QLinear, QModuleMixin

from .utils import dequantized, sqnr


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(8 * 6 * 6)
        self.head = torch.nn.Sequential(
            torch.nn.Linear(8 * 6 * 6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)
        )

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.conv(x)).flatten(1)))


def inputs(n=16):
    return torch.randn(n, 3, 6, 6)


def test_quantize_swaps_supported_modules_in_place():
    net = Net()
    out = quantize(net)
    assert out is net
    assert isinstance(net.conv, QConv2d) and isinstance(net.norm, QLayerNorm)
    assert isinstance(net.head[0], QLinear) and isinstance(net.head[2], QLinear)
    assert isinstance(net.head[1], torch.nn.ReLU)


def test_quantize_clone_leaves_the_float_model_untouched():
    net = Net()
    state = copy.deepcopy(net.state_dict())
    qnet = quantize(net, inplace=False)
    assert qnet is not net and isinstance(qnet.conv, QConv2d)
    assert not any(isinstance(m, QModuleMixin) for m in net.modules())
    freeze(qnet)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key])


def test_include_exclude_patterns():
    qnet = quantize(Net(), include="head.*", exclude="head.2")
    assert isinstance(qnet.head[0], QLinear)
    assert type(qnet.head[2]) is torch.nn.Linear and type(qnet.conv) is torch.nn.Conv2d


@pytest.mark.parametrize("kwargs, message", [
    ({"include": "decoder.*"}, r"include pattern\(s\) \['decoder.\*'\] match no module"),
    ({"exclude": ["head.9"]}, r"exclude pattern\(s\) \['head.9'\] match no module"),
    ({"weights": qint4}, "weights=qint4 is weight-only"),
    ({"weights": qint4, "activations": None}, "cannot quantize .conv.: Conv2d layers take qint8 or float8"),
    ({"weights": "qint7"}, "unknown qtype 'qint7'"),
    ({"weights": None, "activations": None}, "weights=None and activations=None quantize nothing"),
    ({"include": "head.1"}, r"'head.1' matches no module that quantize\(\) replaces \(it matches ReLU"),
    ({"include": "head"}, r"include pattern 'head' matches no module .* \(it matches Sequential"),
    ({"include": ["conv", "head.2"], "exclude": "head.2"}, r"'head.2' matches no module .*: excluded"),
])  # fmt: skip
def test_bad_arguments_leave_the_model_unmodified(kwargs, message):
    net = Net()
    with pytest.raises(ValueError, match=message):
        quantize(net, **kwargs)
    assert not any(isinstance(m, QModuleMixin) for m in net.modules())


def test_quantizing_twice_and_freezing_a_float_model_are_refused():
    net = quantize(Net())
    with pytest.raises(ValueError, match="already quantized"):
        quantize(net)
    with pytest.raises(ValueError, match="call quantize"):
        freeze(Net())


def test_a_model_with_nothing_to_quantize_is_refused():
    model = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"no module to quantize \(the model holds Conv1d, ReLU, Sequential"):
        quantize(model)
    assert type(model[0]) is torch.nn.Conv1d


class ScaledLinear(torch.nn.Linear):  # a subclass may compute another function: it is not swapped
    def forward(self, x):
        return 2 * super().forward(x)


def test_modules_with_weights_that_stay_float_are_named_in_a_warning():
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 16), ScaledLinear(16, 16), ScaledLinear(16, 16), torch.nn.Conv1d(1, 1, 1)
    )
    message = r"3 module\(s\) with weights stay float.*ScaledLinear x2, Conv1d x1 \(first: '1'\)"
    with pytest.warns(UserWarning, match=message):
        quantize(model, weights=qint4, activations=None, group_size=16)
    assert isinstance(model[0], QLinear) and type(model[1]) is ScaledLinear
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluded modules are the user's choice: no warning
        quantize(torch.nn.Sequential(torch.nn.Linear(8, 8), ScaledLinear(8, 8)), exclude="1")


def test_a_static_layer_run_uncalibrated_warns_once():
    net, x = Net(), inputs()
    qnet = freeze(quantize(net, inplace=False))
    with torch.no_grad(), calibration():
        qnet.conv(x)  # only the first layer sees samples
    with pytest.warns(UserWarning, match="static activation scales are still 1.0") as record:
        qnet(x)
    warned = sorted(str(w.message).split(":")[0] for w in record if "still 1.0" in str(w.message))
    assert warned == ["QLayerNorm", "QLinear", "QLinear"]  # the conv was calibrated
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qnet(x)  # once per layer


def test_calibrated_and_reloaded_static_layers_do_not_warn():
    net, x = Net(), inputs()
    calibrated = quantize(net, inplace=False)
    with torch.no_grad(), calibration():
        calibrated(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        freeze(calibrated)(x)
        fresh = freeze(quantize(Net()))  # frozen before its scales are loaded, as the README shows
        fresh.load_state_dict(calibrated.state_dict(), assign=True)
        assert torch.equal(fresh(x)._data, calibrated(x)._data)
        freeze(quantize(net, inplace=False, activation_mode="dynamic"))(x)  # dynamic: no scales to calibrate
    assert sqnr(net(x), dequantized(calibrated(x))) > 25


def test_root_module_is_quantized_too():
    q = quantize(torch.nn.Linear(4, 4), activations=None)
    assert isinstance(q, QLinear)


@pytest.mark.parametrize("activation_mode", ["static", "dynamic"])
def test_quantized_model_tracks_float(activation_mode):
    net = Net()
    x = inputs()
    qnet = quantize(net, inplace=False, activation_mode=activation_mode)
    if activation_mode == "static":  # dynamic scales need no calibration
        with torch.no_grad(), calibration():
            qnet(x)
    assert sqnr(net(x), dequantized(qnet(x))) > 25


def test_weight_only_gives_float_outputs():
    net = Net()
    x = inputs()
    qnet = quantize(net, activations=None, inplace=False)
    out = qnet(x)
    assert type(out) is torch.Tensor and sqnr(net(x), out) > 35


def test_qat_trains_float_weights_through_quantized_forward():
    torch.manual_seed(0)
    net = quantize(Net())
    x, y = inputs(64), torch.randint(0, 5, (64,))
    with torch.no_grad(), calibration():
        net(x)
    weight_before = net.head[0].weight.detach().clone()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(net(x).dequantize(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert not torch.equal(net.head[0].weight, weight_before)
    assert losses[-1] < 0.7 * losses[0]


def parameter_bytes(model):
    total = 0
    for p in model.parameters():
        tensors = (p._data, p._scale) if isinstance(p, QTensor) else (p,)
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def test_freeze_shrinks_parameters_to_a_quarter():
    big = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    float_bytes = parameter_bytes(big)
    frozen = freeze(quantize(big, inplace=False))
    assert all(isinstance(m.weight, QTensor) for m in frozen)
    assert parameter_bytes(frozen) <= 0.26 * float_bytes


def test_quantization_map_describes_modules():
    qnet = freeze(quantize(Net(), exclude="conv", activation_mode="dynamic"))
    qmap = quantization_map(qnet)
    assert set(qmap) == {"norm", "head.0", "head.2"}
    assert qmap["head.0"] == {
        "class": "QLinear",
        "weights": "qint8",
        "activations": "qint8",
        "activation_mode": "dynamic",
        "frozen": True,
    }
    assert qmap["norm"]["weights"] is None and qmap["norm"]["frozen"] is False


def calibrated_frozen_net():
    net = quantize(Net())
    with torch.no_grad(), calibration():
        net(inputs())
    return freeze(net)


def test_state_dict_roundtrip_with_weights_only_load_and_assign():
    qnet = calibrated_frozen_net()
    buf = io.BytesIO()
    torch.save(qnet.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)  # weights_only=True by default
    fresh = freeze(quantize(Net()))
    fresh.load_state_dict(state, assign=True)
    for key, value in qnet.state_dict().items():
        loaded = fresh.state_dict()[key]
        if isinstance(value, QTensor):
            assert torch.equal(loaded._data, value._data) and torch.equal(loaded._scale, value._scale)
        else:
            assert torch.equal(loaded, value)
    x = inputs()
    assert torch.equal(fresh(x)._data, qnet(x)._data)


def test_requantize_from_a_meta_skeleton():
    qnet = calibrated_frozen_net()
    with torch.device("meta"):
        skeleton = Net()
    rebuilt = requantize(skeleton, qnet.state_dict(), quantization_map(qnet))
    assert not any(t.is_meta for t in rebuilt.state_dict().values())
    x = inputs()
    assert torch.equal(rebuilt(x)._data, qnet(x)._data)


def test_requantize_errors_name_the_module():
    qnet = calibrated_frozen_net()
    qmap = quantization_map(qnet)
    with pytest.raises(ValueError, match="names module 'decoder'"):
        requantize(Net(), qnet.state_dict(), {"decoder": qmap["norm"]})
    with pytest.raises(ValueError, match="module 'norm' is a LayerNorm, which does not quantize to QLinear"):
        requantize(Net(), qnet.state_dict(), {"norm": qmap["head.0"]})
    with pytest.raises(ValueError, match=r"skeleton is already quantized \(quantized modules: \['conv'"):
        requantize(quantize(Net()), qnet.state_dict(), qmap)


class Shifted(Net):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.ones(()), persistent=False)  # in no state_dict

    def forward(self, x):
        return super().forward(x + self.shift)


def test_requantize_refuses_a_meta_skeleton_whose_buffers_no_state_dict_holds():
    qnet = freeze(quantize(Shifted(), activations=None))
    with torch.device("meta"):
        skeleton = Shifted()
    with pytest.raises(ValueError, match=r"non-persistent buffers \['shift'\] are on the meta device"):
        requantize(skeleton, qnet.state_dict(), quantization_map(qnet))
    rebuilt = requantize(Shifted(), qnet.state_dict(), quantization_map(qnet))
    x = inputs()
    assert torch.equal(rebuilt(x), qnet(x))


def test_requantize_loads_shards_into_a_meta_skeleton_without_strict():
    qnet = calibrated_frozen_net()
    state, qmap = qnet.state_dict(), quantization_map(qnet)
    first = {k: v for k, v in state.items() if not k.startswith("head.")}
    with torch.device("meta"):
        skeleton = Net()
    with pytest.raises(RuntimeError, match="Missing key"):  # strict: a missing key is load_state_dict's error
        requantize(skeleton, first, qmap)
    with torch.device("meta"):
        skeleton = Net()
    rebuilt = requantize(skeleton, first, qmap, strict=False)  # one shard, then the other
    second = {k: v for k, v in state.items() if k.startswith("head.")}
    rebuilt.load_state_dict(second, strict=False, assign=True)
    x = inputs()
    assert torch.equal(rebuilt(x)._data, qnet(x)._data)


@pytest.mark.parametrize("norm", [torch.nn.LayerNorm, torch.nn.RMSNorm])
def test_norms_without_affine_parameters_quantize_calibrate_and_freeze(norm):
    """A norm built with elementwise_affine=False has no weight: quantize() read the scales' device from it
    and failed with AttributeError."""
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 16), norm(16, elementwise_affine=False), torch.nn.Linear(16, 8)
    )
    x = torch.randn(32, 16)
    expected = model(x)
    qmodel = quantize(model, inplace=False)
    assert qmodel[1].weight is None and qmodel[1].in_scale.device == x.device
    with torch.no_grad(), calibration():
        qmodel(x)
    freeze(qmodel)
    assert isinstance(qmodel[1](x), QTensor)
    assert sqnr(expected, dequantized(qmodel(x))) > 25
    rebuilt = requantize(copy.deepcopy(model), qmodel.state_dict(), quantization_map(qmodel))
    assert torch.equal(rebuilt(x)._data, qmodel(x)._data)


class Tied(torch.nn.Module):
    """One Linear registered under two names."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = self.a
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))))


def test_a_module_under_two_names_is_quantized_once_under_both():
    """named_modules() names a shared module once: quantize() swapped only that name, the other stayed a
    float Linear sharing the weight."""
    tied = quantize(Tied(), activations=None)
    assert isinstance(tied.a, QLinear) and tied.b is tied.a
    # A pattern matching either name selects the module; excluding either name keeps it float under both.
    by_b = quantize(Tied(), activations=None, include="b")
    assert isinstance(by_b.a, QLinear) and by_b.b is by_b.a and type(by_b.head) is torch.nn.Linear
    kept = quantize(Tied(), activations=None, exclude="b")
    assert type(kept.a) is torch.nn.Linear and kept.b is kept.a and isinstance(kept.head, QLinear)


def test_requantize_rebuilds_a_module_under_two_names():
    tied = freeze(quantize(Tied(), activations=None))
    with torch.device("meta"):
        skeleton = Tied()
    rebuilt = requantize(skeleton, tied.state_dict(), quantization_map(tied))
    assert isinstance(rebuilt.b, QLinear) and rebuilt.b is rebuilt.a
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), tied(x))
