"""Straight-through gradients: QAT relies on them."""

import torch
import torch.nn.functional as F

from quanto_fx import QTensor

from .utils import dequantized


def test_requires_grad_carries_over_and_quantize_dequantize_is_identity_for_grads():
    x = torch.randn(4, 5, requires_grad=True)
    qx = QTensor.quantize(x)
    assert qx.requires_grad
    assert not QTensor.quantize(x.detach()).requires_grad
    g = torch.randn(4, 5)
    qx.dequantize().backward(g)
    assert torch.equal(x.grad, g)


def test_rescale_passes_gradients_straight_through():
    x = torch.randn(6, requires_grad=True)
    QTensor.quantize(x, torch.int32).rescale(torch.int8).dequantize().sum().backward()
    assert torch.equal(x.grad, torch.ones(6))


def test_mul_gradient_is_the_other_operand():
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True)
    qa, qb = QTensor.quantize(a), QTensor.quantize(b)
    grad = torch.randn(3, 4)
    (qa * qb).dequantize().backward(grad)
    torch.testing.assert_close(a.grad, dequantized(qb) * grad)
    torch.testing.assert_close(b.grad, dequantized(qa) * grad)


def test_linear_gradients_match_float_twin():
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    qx, qw = QTensor.quantize(x), QTensor.quantize(w, axis=0)
    grad = torch.randn(2, 3, 4)
    F.linear(qx, qw, bias).dequantize().backward(grad)
    # The float twin, evaluated at the dequantized operands.
    x2, w2 = dequantized(qx).clone().requires_grad_(), dequantized(qw).clone().requires_grad_()
    b2 = bias.detach().clone().requires_grad_()
    F.linear(x2, w2, b2).backward(grad)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(bias.grad, b2.grad)


def test_qat_step_reduces_loss():
    torch.manual_seed(0)
    x, target_w = torch.randn(64, 16), torch.randn(8, 16)
    y = x @ target_w.t()
    w = torch.zeros(8, 16, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.5)
    losses = []
    for _ in range(60):
        out = F.linear(QTensor.quantize(x), QTensor.quantize(w + 1e-3, axis=0)).dequantize()
        loss = F.mse_loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
