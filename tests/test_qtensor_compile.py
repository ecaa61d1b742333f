"""QTensor traces through dynamo and AOTAutograd (``__tensor_flatten__`` / ``__tensor_unflatten__``)."""

import torch
import torch.nn.functional as F

from quanto_fx import QTensor


def test_flatten_unflatten_roundtrip():
    qx = QTensor.quantize(torch.randn(3, 4), axis=0)
    names, meta = qx.__tensor_flatten__()
    rebuilt = QTensor.__tensor_unflatten__({n: getattr(qx, n) for n in names}, meta, qx.shape, qx.stride())
    assert torch.equal(rebuilt._data, qx._data) and rebuilt.axis == qx.axis


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
