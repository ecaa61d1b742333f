"""QTensor traces through dynamo and AOTAutograd (``__tensor_flatten__`` / ``__tensor_unflatten__``)."""

import warnings

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from quanto_fx import PackedQTensor, QTensor, calibration, freeze, qfloat8_e4m3fn, qint2, qint4, quantize


def test_flatten_unflatten_roundtrip():
    qx = QTensor.quantize(torch.randn(3, 4, dtype=torch.bfloat16), axis=0)
    names, meta = qx.__tensor_flatten__()
    # the inner tensors and the context __tensor_unflatten__ reads: the codes, the scales, then the axis
    assert names == ["_data", "_scale"] and meta == (0,)
    # rebuilt from copies, so nothing below can hold merely because it reads qx's own tensors
    inner = {name: getattr(qx, name).clone() for name in names}
    rebuilt = QTensor.__tensor_unflatten__(inner, meta, qx.shape, qx.stride())
    assert type(rebuilt) is QTensor and rebuilt._data is inner["_data"] and rebuilt._scale is inner["_scale"]
    # the outer dtype comes from the bfloat16 scales, not float32
    assert rebuilt.dtype == torch.bfloat16 and rebuilt.shape == qx.shape == (3, 4)
    assert rebuilt.axis == qx.axis == 0 and rebuilt.qdtype == torch.int8
    assert torch.equal(rebuilt.dequantize(), qx.dequantize()) and rebuilt.dequantize().dtype == torch.bfloat16


def test_qtensor_inputs_under_aot_eager():
    def f(x, w, b):
        return F.relu(F.linear(x, w, b)).dequantize() * 2

    x, w = QTensor.quantize(torch.randn(2, 5, 16)), QTensor.quantize(torch.randn(8, 16), axis=0)
    b = torch.randn(8)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, w, b), f(x, w, b))


def test_quantize_inside_the_compiled_function_with_grads():
    def f(x, w):
        qx, qw = QTensor.quantize(x), QTensor.quantize(w, axis=0)
        return (qx @ qw.t()).dequantize().sum()

    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    eager = f(x, w)
    eager.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x, w)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(w.grad, gw)


def _cache_key(t):
    return t._stable_hash_for_caching()


def test_the_compile_cache_key_follows_structure_not_values():
    w = torch.randn(16, 256)
    q = QTensor.quantize(w, axis=0)
    assert _cache_key(q) == _cache_key(QTensor.quantize(torch.randn(16, 256), axis=0))
    assert _cache_key(q) != _cache_key(QTensor.quantize(w))  # per-tensor scale: another graph
    assert _cache_key(q) != _cache_key(QTensor.quantize(w.t().contiguous().t(), axis=0))  # strides
    assert _cache_key(q) != _cache_key(QTensor.quantize(w, qfloat8_e4m3fn, axis=0))
    p = PackedQTensor.quantize(w, qint4, group_size=128)
    assert _cache_key(p) == _cache_key(PackedQTensor.quantize(torch.randn(16, 256), qint4, group_size=128))
    assert _cache_key(p) != _cache_key(PackedQTensor.quantize(w, qint4, group_size=64))
    assert _cache_key(p) != _cache_key(PackedQTensor.quantize(w, qint2, group_size=128))


def test_compiling_quantized_weights_does_not_warn_about_the_cache_key():
    import quanto_fx

    warned_once = getattr(torch._dynamo.utils, "warn_once_cache", set())
    warned_once.difference_update({m for m in warned_once if "_stable_hash_for_caching" in m})
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    quanto_fx.quantize(model, weights=qint4, activations=None, group_size=32)
    quanto_fx.freeze(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="quanto")
    x = torch.randn(2, 64)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert not [w for w in caught if "_stable_hash_for_caching" in str(w.message)]


def test_an_eager_call_between_compiled_calls_does_not_recompile_a_static_model():
    # The first eager call outside calibration marks each static layer checked for calibration: a graph
    # that read (and guarded on) that flag would be compiled again after it
    model = quantize(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)))
    x = torch.randn(4, 16)
    with torch.no_grad(), calibration():
        model(x)
    freeze(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        first = compiled(x)
        model(x)
        again = compiled(x)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(first._data, again._data)
