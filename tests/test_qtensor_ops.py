"""Each handled aten op against its float reference, within the bound its quantization allows."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import quanto_fx
from quanto_fx import QTensor
from quanto_fx.tensor import int8_mm

from .utils import dequantized


def q(x, **kw):
    return QTensor.quantize(x, **kw)


def matmul_bound(a: QTensor, b: QTensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case |a@b - x@w| when each operand is off by at most half its step (plus float slack)."""
    da, db = a._scale / 2, b._scale / 2
    return x.abs() @ db.expand_as(w) + da.expand_as(x) @ w.abs() + da.expand_as(x) @ db.expand_as(w) + 1e-4


# -- integer matrix products ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 40), n=st.integers(1, 40), seed=st.integers(0, 1000))
def test_int8_mm_equals_int64_reference(m, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    out = int8_mm(a, b)
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), a.long() @ b.long())


def test_int8_mm_with_a_single_column_of_k():
    # aten._int_mm on CPU sums wrongly for K == 1 and N > 1 (torch 2.13); int8_mm must not
    a = torch.randint(-127, 128, (5, 1), dtype=torch.int8)
    b = torch.randint(-127, 128, (1, 16), dtype=torch.int8)
    assert torch.equal(int8_mm(a, b).long(), a.long() @ b.long())


def test_int8_mm_on_device_handles_any_shape(device):
    # On CUDA, cuBLAS needs M > 16 and K, N multiples of 8: these shapes need padding.
    for m, k, n in [(1, 5, 3), (16, 8, 8), (17, 24, 40), (3, 100, 7)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=device)
        assert torch.equal(int8_mm(a, b).cpu().long(), a.cpu().long() @ b.cpu().long())


def test_int8_mm_errors():
    a = torch.zeros(2, 3, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"incompatible shapes \(2, 3\) @ \(4, 5\)"):
        int8_mm(a, torch.zeros(4, 5, dtype=torch.int8))
    with pytest.raises(TypeError, match="int8 operands"):
        int8_mm(a.int(), torch.zeros(3, 5, dtype=torch.int8))


@pytest.mark.parametrize("a_axis, b_axis", [(None, None), (0, None), (None, 1), (0, 1)])
def test_mm_scales_and_bound(device, a_axis, b_axis):
    x, w = torch.randn(9, 16, device=device), torch.randn(16, 5, device=device)
    a, b = q(x, axis=a_axis), q(w, axis=b_axis)
    out = torch.mm(a, b)
    if a_axis is not None and b_axis is not None:
        # per-row x per-column scales: an outer-product scale, returned as float
        assert type(out) is torch.Tensor
    else:
        assert isinstance(out, QTensor) and out._data.dtype == torch.int32
        assert torch.equal(out._data.long().cpu(), a._data.long().cpu() @ b._data.long().cpu())
        assert out.axis == (0 if a_axis == 0 else 1 if b_axis == 1 else None)
    ref = dequantized(a) @ dequantized(b)
    torch.testing.assert_close(dequantized(out), ref, rtol=1e-5, atol=1e-5)
    assert torch.all((dequantized(out) - x @ w).abs() <= matmul_bound(a, b, x, w))


def test_matmul_linear_addmm_bmm_dot_stay_integer(device):
    quanto_fx.reset_fallback_counts()
    x, w, bias = (
        torch.randn(2, 7, 16, device=device),
        torch.randn(5, 16, device=device),
        torch.randn(5, device=device),
    )
    qx, qw = q(x), q(w, axis=0)
    for out in (F.linear(qx, qw), F.linear(qx, qw, bias), torch.matmul(qx, qw.t()), qx @ qw.t()):
        assert isinstance(out, QTensor) and out._data.dtype == torch.int32 and out.shape == (2, 7, 5)
    out = F.linear(qx[0], qw, bias)  # 2-d input: addmm with an int32 bias
    assert isinstance(out, QTensor) and out._data.dtype == torch.int32
    # Integer references in int64 on the CPU: CUDA has no int64 matmul.
    expected_bias = torch.round(bias / out._scale.reshape(-1)).cpu()
    acc = qx[0]._data.cpu().long() @ qw._data.cpu().long().t()
    assert torch.equal(out._data.cpu().long(), acc + expected_bias.long())
    assert torch.all(
        (dequantized(out) - F.linear(x[0], w, bias)).abs() <= matmul_bound(qx[0], qw.t(), x[0], w.t()) + 1e-4
    )
    ref = F.linear(x, w, bias)
    bound = matmul_bound(qx, qw.t(), x, w.t())  # the 3-d product, by the same bound as its first matrix
    assert torch.all((dequantized(F.linear(qx, qw, bias)) - ref).abs() <= bound + 1e-4)
    bq = torch.bmm(q(x), q(x.transpose(1, 2)))
    assert isinstance(bq, QTensor)
    qx_cpu = q(x)._data.cpu().long()
    assert torch.equal(bq._data.cpu().long(), torch.bmm(qx_cpu, qx_cpu.transpose(1, 2)))
    v1, v2 = torch.randn(16, device=device), torch.randn(16, device=device)
    d = torch.dot(q(v1), q(v2))
    assert (
        isinstance(d, QTensor)
        and d.shape == ()
        and d._data.item() == int((q(v1)._data.long() * q(v2)._data.long()).sum())
    )
    assert quanto_fx.fallback_counts() == {}


# -- element-wise ----------------------------------------------------------------------------------------


def test_add_widens_and_is_exact(device):
    x = torch.randn(6, 4, device=device)
    a = q(x)
    b = QTensor.quantize(torch.randn(6, 4, device=device), scale=a._scale)
    s = a + b
    assert s._data.dtype == torch.int16 and torch.equal(s._data, a._data.short() + b._data.short())
    torch.testing.assert_close(dequantized(s), dequantized(a) + dequantized(b), rtol=1e-6, atol=1e-7)
    assert (s + s)._data.dtype == torch.int32


def test_add_with_different_scales_is_the_float_sum_counted_as_a_fallback():
    # residual connections add activations quantized at different scales: no common integer grid exists
    quanto_fx.reset_fallback_counts()
    a, b = q(torch.randn(4)), q(torch.randn(4) * 3)
    out = a + b
    assert type(out) is torch.Tensor and torch.equal(out, dequantized(a) + dequantized(b))
    assert quanto_fx.fallback_counts() == {"add": 1}


def test_mul_is_int32_with_product_scale(device):
    a, b = q(torch.randn(5, 3, device=device), axis=0), q(torch.randn(5, 3, device=device))
    p = a * b
    assert p._data.dtype == torch.int32 and p.axis == 0
    torch.testing.assert_close(dequantized(p), dequantized(a) * dequantized(b), rtol=1e-6, atol=1e-7)
    s = a * 2.5
    assert torch.equal(s._data, a._data) and torch.allclose(dequantized(s), dequantized(a) * 2.5)


def test_relu(device):
    x = torch.randn(4, 10, device=device)
    r = torch.relu(q(x))
    assert isinstance(r, QTensor) and torch.equal(dequantized(r), torch.relu(dequantized(q(x))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_is_the_float_softmax_of_the_dequantized_value(device, dtype):
    # 1024 near-equal logits: every probability is ~1/1024, below any fixed int8 grid over [0, 1]
    quanto_fx.reset_fallback_counts()
    x = torch.randn(3, 1024, device=device, dtype=dtype) * 1e-3
    sm = torch.softmax(q(x), dim=-1)
    assert type(sm) is torch.Tensor and sm.dtype == dtype
    assert torch.equal(sm, torch.softmax(dequantized(q(x)), dim=-1))
    torch.testing.assert_close(sm.float().sum(-1), torch.ones(3, device=device), rtol=0, atol=1e-2)
    assert quanto_fx.fallback_counts() == {"_softmax": 1}


def int32_acc(values, scale, axis=None):
    values = torch.as_tensor(values, dtype=torch.int32)
    return QTensor(values, torch.as_tensor(scale, dtype=torch.float32), axis)


def test_int32_plus_a_float_bias_of_higher_rank_keeps_the_right_scales():
    # a per-column scale (1, 4) on axis 1; the sum is 3-d, where the columns are dimension 2
    acc = int32_acc(torch.arange(12).reshape(3, 4), [[0.1, 0.2, 0.3, 0.7]], axis=1)
    bias = torch.randn(2, 3, 4)
    out = acc + bias
    ref = dequantized(acc) + bias
    torch.testing.assert_close(dequantized(out), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dequantized(out.select(1, 0)), ref.select(1, 0), rtol=1e-6, atol=1e-6)
    same_rank = acc + torch.randn(4)  # broadcasts to acc's shape: stays an int32 QTensor
    assert isinstance(same_rank, QTensor) and same_rank._data.dtype == torch.int32 and same_rank.axis == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_float_bias_is_added_in_float(bad):
    acc = int32_acc([[1, 2], [3, 4]], 0.5)
    bias = torch.tensor([bad, 1.0])
    out = acc + bias
    ref = torch.tensor([[0.5, 1.0], [1.5, 2.0]]) + bias
    torch.testing.assert_close(dequantized(out), ref, equal_nan=True)
    qx, qw = q(torch.randn(3, 8)), q(torch.randn(2, 8), axis=0)
    lin = F.linear(qx, qw, bias)  # addmm: the bias joins the int32 accumulator
    torch.testing.assert_close(dequantized(lin), dequantized(qx) @ dequantized(qw).t() + bias, equal_nan=True)


def test_a_bias_next_to_the_int32_minimum_is_added_in_float():
    # |-2**31| does not fit int32: the bound on the accumulator must not wrap around to a small number
    acc = int32_acc([[-(2**31), 0]], 1.0)
    bias = torch.tensor([-1.0, 0.0])
    expected = acc._data.double() + bias.double()  # -2**31 - 1 lies outside int32: the sum is float
    torch.testing.assert_close(dequantized(acc + bias).double(), expected, rtol=1e-6, atol=0)
    with pytest.raises(OverflowError, match="add_: the bias does not fit int32"):
        acc.add_(bias)


def test_empty_int32_qtensor_plus_a_bias():
    acc = int32_acc(torch.zeros(0, 4), 0.5)
    out = acc + torch.ones(4)
    assert out.shape == (0, 4)
    assert acc.add_(torch.ones(4)) is acc and acc.shape == (0, 4)


def test_in_place_bias_add_on_an_int32_accumulator():
    acc = int32_acc([1, 2, 3], 0.5)
    assert acc.add_(torch.tensor([1.0, -1.0, 0.2])) is acc
    assert acc._data.tolist() == [3, 0, 3]  # the bias rounded to the accumulator's scale
    # a bias beyond int32 at the accumulator's scale cannot join it in place (the out-of-place add is float)
    tiny = int32_acc([1, 2], 1e-12)
    with pytest.raises(OverflowError, match="add_: the bias does not fit int32"):
        tiny.add_(torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="add_: the bias contains non-finite values"):
        tiny.add_(torch.tensor([float("nan"), 1.0]))
    assert tiny._data.tolist() == [1, 2]
    torch.testing.assert_close(tiny + torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))
    # a number, as for in-place ops on any QTensor, is refused (the out-of-place add takes it in float)
    with pytest.raises(NotImplementedError, match="would modify a QTensor in place"):
        acc.add_(1.0)
    assert acc._data.tolist() == [3, 0, 3]
    torch.testing.assert_close(acc + 1.0, torch.tensor([2.5, 1.0, 2.5]))


def test_view_as_a_dtype_reinterprets_the_float_value():
    # a QTensor stands for a float tensor: view(dtype) reinterprets its float value, never the integer codes
    qx = q(torch.randn(2, 4))
    for dtype in (torch.int16, torch.float32, torch.int32):
        out = qx.view(dtype)
        assert type(out) is torch.Tensor and out.dtype == dtype
        assert torch.equal(out, dequantized(qx).view(dtype))


# -- shape and movement ----------------------------------------------------------------------------------

SHAPE_OPS = {
    "view": lambda t: t.view(3, 8),
    "reshape": lambda t: t.reshape(-1),
    "transpose": lambda t: t.transpose(0, 1),
    "t": lambda t: t.t(),
    "permute": lambda t: t.permute(1, 0),
    "contiguous": lambda t: t.t().contiguous(),
    "clone": lambda t: t.clone(),
    "detach": lambda t: t.detach(),
    "unsqueeze": lambda t: t.unsqueeze(1),
    "squeeze": lambda t: t.unsqueeze(0).squeeze(0),
    "expand": lambda t: t.unsqueeze(0).expand(3, 6, 4),
    "slice": lambda t: t[1:5:2],
    "slice_cols": lambda t: t[:, 1:3],
    "select": lambda t: t[2],
    "select_col": lambda t: t[:, 1],
    "index": lambda t: t[torch.tensor([0, 2, 5])],
    "split": lambda t: t.split(2, dim=0)[1],
    "split_sizes": lambda t: t.split([1, 3], dim=1)[1],
    "chunk_cols": lambda t: t.chunk(2, dim=1)[1],
    "unbind": lambda t: t.unbind(0)[3],
}


@pytest.mark.parametrize("name", sorted(SHAPE_OPS))
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_shape_ops_match_float(name, axis):
    quanto_fx.reset_fallback_counts()
    qx = q(torch.randn(6, 4), axis=axis)
    op = SHAPE_OPS[name]
    out = op(qx)
    torch.testing.assert_close(dequantized(out), op(dequantized(qx)), rtol=0, atol=0)
    if axis is None or name not in ("view", "reshape", "index"):
        assert isinstance(out, QTensor) and out._data.dtype == torch.int8
        assert quanto_fx.fallback_counts() == {}


def test_cat_stack_same_scale_and_mismatch():
    a = q(torch.randn(3, 4))
    b = QTensor.quantize(torch.randn(3, 4), scale=a._scale)
    for out, ref in ((torch.cat([a, b]), torch.cat), (torch.stack([a, b], 1), lambda ts: torch.stack(ts, 1))):
        assert isinstance(out, QTensor)
        assert torch.equal(dequantized(out), ref([dequantized(a), dequantized(b)]))
    # per-channel along the cat dimension: the scales are concatenated too
    pa, pb = q(torch.randn(3, 4), axis=0), q(torch.randn(2, 4), axis=0)
    pc = torch.cat([pa, pb])
    assert pc._scale.shape == (5, 1) and torch.equal(
        dequantized(pc), torch.cat([dequantized(pa), dequantized(pb)])
    )
    other = q(torch.randn(3, 4) * 5)  # another scale: joined in float
    assert torch.equal(torch.cat([a, other]), torch.cat([dequantized(a), dequantized(other)]))
    assert torch.equal(torch.stack([a, other]), torch.stack([dequantized(a), dequantized(other)]))


def test_to_moves_device_and_float_dtype(device):
    qx = q(torch.randn(4, 4), axis=0)
    moved = qx.to(device)
    assert (
        isinstance(moved, QTensor)
        and moved.device.type == device.type
        and moved._scale.device.type == device.type
    )
    half = qx.to(torch.float16)
    assert isinstance(half, QTensor) and half.dtype == torch.float16 and torch.equal(half._data, qx._data)
    as_int = qx.to(torch.int32)  # casting to an integer dtype casts the float value
    assert type(as_int) is torch.Tensor and torch.equal(as_int, dequantized(qx).to(torch.int32))


# -- fallback, errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op",
    [
        torch.exp,
        torch.tanh,
        F.gelu,
        lambda t: t.sum(dim=0),
        lambda t: t - 1.0,
        lambda t: torch.where(t > 0, t, 0.0),
    ],
)
def test_fallback_equals_dequantize_then_op(op):
    quanto_fx.reset_fallback_counts()
    qx = q(torch.randn(5, 6))
    out = op(qx)
    assert type(out) is torch.Tensor
    assert torch.equal(out, op(dequantized(qx)))
    assert sum(quanto_fx.fallback_counts().values()) >= 1


def test_fallback_is_counted_per_op():
    quanto_fx.reset_fallback_counts()
    qx = q(torch.randn(5, 6))
    torch.exp(qx)
    torch.exp(qx)
    torch.tanh(qx)
    assert quanto_fx.fallback_counts() == {"exp": 2, "tanh": 1}


def test_copy_into_a_qtensor_parameter():
    # load_state_dict without assign=True copies into the existing QTensor parameters
    lin = torch.nn.Linear(4, 3)
    lin.weight = torch.nn.Parameter(q(torch.randn(3, 4), axis=0), requires_grad=False)
    source = q(torch.randn(3, 4), axis=0)
    lin.load_state_dict({"weight": source, "bias": lin.bias.detach()})
    assert torch.equal(lin.weight._data, source._data) and torch.equal(lin.weight._scale, source._scale)
    with pytest.raises(RuntimeError, match="copy_ into a QTensor needs a QTensor source"):
        lin.load_state_dict({"weight": torch.randn(3, 4), "bias": lin.bias.detach()})


def test_in_place_ops_on_qtensor_are_refused():
    qx = q(torch.randn(3))
    with pytest.raises(NotImplementedError, match="would modify a QTensor in place"):
        qx.mul_(2.0)


def test_incompatible_shapes_and_devices_raise():
    with pytest.raises(ValueError, match="incompatible shapes"):
        torch.mm(q(torch.randn(3, 4)), q(torch.randn(5, 2)))
    if torch.cuda.is_available():
        with pytest.raises((ValueError, RuntimeError), match="device"):
            torch.mm(q(torch.randn(3, 4)), q(torch.randn(4, 2, device="cuda")))


def test_numpy_tolist_and_item_give_the_float_value():
    qx = q(torch.randn(3, 4), axis=0)
    value = dequantized(qx)
    assert (qx.numpy() == value.numpy()).all() and qx.numpy().dtype == value.numpy().dtype
    assert qx.tolist() == value.tolist()
    assert qx[1, 2].item() == value[1, 2].item()
    with pytest.raises(RuntimeError, match="requires grad"):  # as for any tensor: detach first
        q(torch.randn(3, requires_grad=True)).numpy()
