import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quanto_fx import QTensor, qint2, qint4, qint8
from quanto_fx.qtypes import get_qtype

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3)


@st.composite
def float_tensors(draw):
    shape = draw(shapes)
    seed = draw(st.integers(0, 2**16))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * magnitude


@settings(max_examples=60, deadline=None)
@given(
    x=float_tensors(),
    per_axis=st.booleans(),
    int_dtype=st.sampled_from([torch.int8, torch.int16, qint4, qint2]),
)
def test_quantize_error_at_most_half_a_step(x, per_axis, int_dtype):
    axis = (0 if x.ndim == 1 else -1) if per_axis else None
    qx = QTensor.quantize(x, int_dtype, axis=axis)
    step = qx._scale
    err = (qx.dequantize() - x).abs()
    # half a step, plus float32 rounding of x / scale and data * scale (a few ulps of |x|)
    assert torch.all(err <= step / 2 + 4 * torch.finfo(x.dtype).eps * x.abs())
    qmax = {torch.int8: 127, torch.int16: 32767, qint4: 7, qint2: 1}[int_dtype]
    assert int(qx._data.abs().max()) <= qmax


def test_per_axis_scale_shapes():
    x = torch.randn(4, 6)
    assert QTensor.quantize(x)._scale.shape == ()
    assert QTensor.quantize(x, axis=0)._scale.shape == (4, 1)
    q = QTensor.quantize(x, axis=-1)
    assert q._scale.shape == (1, 6) and q.axis == 1
    expected = x.abs().amax(dim=0, keepdim=True) / 127
    torch.testing.assert_close(q._scale, expected)


def test_quantize_rounds_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 200.0])
    q = QTensor.quantize(x, scale=torch.tensor(1.0))
    assert q._data.tolist() == [0, 2, 2, 0, -2, 127]  # ties to even, saturation at qmax


def test_all_zero_tensor_gets_a_positive_scale():
    q = QTensor.quantize(torch.zeros(3, 4), axis=0)
    assert torch.all(q._scale > 0)
    assert torch.equal(q.dequantize(), torch.zeros(3, 4))


def test_quantize_keeps_device_and_float_dtype(device):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(8, 8, device=device, dtype=dtype)
        q = QTensor.quantize(x)
        assert q.device.type == device.type and q.dtype == dtype and q._data.dtype == torch.int8
        assert q.dequantize().dtype == dtype


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_refused(bad):
    x = torch.randn(4, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        QTensor.quantize(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_scales_are_refused(bad):
    with pytest.raises(ValueError, match="scale"):
        QTensor.quantize(torch.randn(3), scale=torch.tensor(bad))
    with pytest.raises(ValueError, match="scale"):
        QTensor(torch.zeros(3, dtype=torch.int8), torch.tensor(bad))


def test_constructor_checks():
    with pytest.raises(TypeError, match="int8, int16, int32 or float8"):
        QTensor(torch.zeros(3), torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating point"):
        QTensor(torch.zeros(3, dtype=torch.int8), torch.tensor(1))
    with pytest.raises(ValueError, match="must be 0-d"):
        QTensor(torch.zeros(3, dtype=torch.int8), torch.ones(3))
    with pytest.raises(ValueError, match=r"must have shape \(3, 1\)"):
        QTensor(torch.zeros(3, 2, dtype=torch.int8), torch.ones(2), axis=0)
    with pytest.raises(ValueError, match="axis"):
        QTensor.quantize(torch.randn(3, 2), axis=2)


def test_bad_int_dtypes_are_named():
    with pytest.raises(ValueError, match="unsupported quantized dtype torch.int64"):
        QTensor.quantize(torch.randn(3), torch.int64)
    with pytest.raises(TypeError, match="floating point tensor"):
        QTensor.quantize(torch.arange(3))


@settings(max_examples=40, deadline=None)
@given(x=float_tensors(), acc=st.sampled_from([torch.int16, torch.int32]), per_axis=st.booleans())
def test_rescale_to_int8(x, acc, per_axis):
    axis = 0 if per_axis else None
    wide = QTensor.quantize(x, acc, axis=axis)
    q8 = wide.rescale(torch.int8)
    assert q8._data.dtype == torch.int8 and q8.axis == wide.axis
    err = (q8.dequantize() - wide.dequantize()).abs()
    ulps = 4 * torch.finfo(x.dtype).eps * wide.dequantize().abs()
    assert torch.all(err <= q8._scale / 2 + ulps)


def test_rescale_with_explicit_scale_saturates_and_rounds_half_even():
    wide = QTensor(torch.tensor([5, 15, 25, 10_000], dtype=torch.int32), torch.tensor(0.1))
    q8 = wide.rescale(qint8, torch.tensor(1.0))
    assert q8._data.tolist() == [0, 2, 2, 127]


def test_rescale_per_axis_to_per_tensor():
    wide = QTensor.quantize(torch.randn(4, 5), torch.int32, axis=0)
    q8 = wide.rescale(torch.int8, torch.tensor(0.05))
    assert q8.axis is None
    expected = torch.round(wide.dequantize() / 0.05).clamp(-127, 127)
    assert torch.equal(q8._data.float(), expected)


def test_mixed_devices_are_refused():
    # meta stands in for a second device on machines without a GPU
    with pytest.raises(ValueError, match="scale is on meta but data is on cpu"):
        QTensor(torch.zeros(3, dtype=torch.int8), torch.tensor(1.0, device="meta"))
    with pytest.raises(ValueError, match="scale is on meta but data is on cpu"):
        QTensor.quantize(torch.randn(3), scale=torch.tensor(1.0, device="meta"))


def test_float64_scales_dequantize_and_rescale_in_float64():
    # 2**24 + 1 is exact in float64 but not in float32
    wide = QTensor(
        torch.tensor([2**24 + 1, -(2**30) - 3], dtype=torch.int32), torch.tensor(1.0, dtype=torch.float64)
    )
    expected = torch.tensor([2**24 + 1, -(2**30) - 3], dtype=torch.float64)
    assert torch.equal(wide.dequantize(), expected)
    assert torch.equal(
        wide.rescale(torch.int32, torch.tensor(1.0, dtype=torch.float64))._data.double(), expected
    )


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
QMAX = {torch.int8: 127, torch.int16: 2**15 - 1, torch.int32: 2**31 - 1}


@pytest.mark.parametrize("float_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("int_dtype", QMAX, ids=str)
def test_absmax_codes_keep_their_sign(float_dtype, int_dtype):
    # qmax rounds up to 2**15 in bfloat16 / float16 and to 2**31 in float32, so 1.0 lands one code past qmax
    # and must saturate to it; a float16 int32 scale is floored at finfo.tiny = 2**-14 (1 / 2**31 underflows).
    expected = {torch.int8: [127, -32], torch.int16: [32767, -8192], torch.int32: [2**31 - 1, -(2**29)]}
    if float_dtype == torch.float16 and int_dtype != torch.int8:
        expected[int_dtype] = [2**14, -(2**12)]
    q = QTensor.quantize(torch.tensor([1.0, -0.25], dtype=float_dtype), int_dtype)
    assert q._data.tolist() == expected[int_dtype]


@pytest.mark.parametrize("float_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("int_dtype", QMAX, ids=str)
def test_codes_saturate_at_both_ends_without_wrapping(float_dtype, int_dtype):
    # 2**-24 is a float16 subnormal, exact in every float dtype: 3e4 / 2**-24 is past every qmax
    x = torch.tensor([3e4, -3e4, 1.0], dtype=float_dtype)
    q = QTensor.quantize(x, int_dtype, scale=torch.tensor(2**-24, dtype=float_dtype))
    qmax = QMAX[int_dtype]
    assert q._data.tolist() == [qmax, -qmax, min(2**24, qmax)]


@pytest.mark.parametrize("float_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("int_dtype", QMAX, ids=str)
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e3])
def test_codes_match_the_float64_reference(float_dtype, int_dtype, magnitude):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 64, generator=g, dtype=torch.float64) * magnitude).to(float_dtype)
    qmax = QMAX[int_dtype]
    for axis in (None, 0):
        q = QTensor.quantize(x, int_dtype, axis=axis)
        # and at a scale 4x too small, where many values saturate
        small = (q._scale / 4).clamp_min(torch.finfo(float_dtype).tiny)
        for qs in (q, QTensor.quantize(x, int_dtype, small, axis=axis)):
            quotient = x.double() / qs._scale.double()
            reference = torch.round(quotient).clamp(-qmax, qmax)
            codes = qs._data.double()
            significand_bits = 1 - math.log2(torch.finfo(float_dtype).eps)
            if qmax >= 2**significand_bits:  # x's dtype does not hold every code: divided in float64
                assert torch.equal(codes, reference)
                continue
            # Codes x's dtype holds divide in it (for int8, the kernels' arithmetic): off by at most one, and
            # only where x's dtype cannot tell the quotient from the tie between the two codes (eps * |q|)
            off = codes != reference
            assert torch.all((codes - reference).abs() <= 1)
            tie_distance = (quotient - (codes + reference) / 2).abs()
            assert torch.all(tie_distance[off] <= torch.finfo(float_dtype).eps * quotient.abs()[off])


def test_rescale_to_int32_saturates_without_wrapping():
    # float32 rounds 2**31 - 1 up to 2**31, past int32
    wide = QTensor(torch.tensor([2**31 - 1, -(2**31) + 1, 5], dtype=torch.int32), torch.tensor(1.0))
    assert wide.rescale(torch.int32, torch.tensor(1.0))._data.tolist() == [2**31 - 1, -(2**31) + 1, 5]


def test_wide_quantize_traces_under_compile():
    def f(x):
        return QTensor.quantize(x, torch.int32).dequantize()

    x = torch.tensor([1.0, -0.25, 3.0], dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x)) and compiled(x).tolist() == [1.0, -0.25, 3.0]


@pytest.mark.parametrize("name", ["qint8", "qfloat8_e4m3fn"])
def test_a_qtype_name_quantizes_as_the_qtype(name):
    x = torch.randn(4, 8)
    by_name, by_qtype = QTensor.quantize(x, name, axis=0), QTensor.quantize(x, get_qtype(name), axis=0)
    assert by_name._data.dtype == get_qtype(name).dtype
    assert torch.equal(by_name._data.float(), by_qtype._data.float())
    assert torch.equal(by_name._scale, by_qtype._scale)


def test_rescale_takes_a_qtype_name():
    wide = QTensor.quantize(torch.randn(4, 8), torch.int16, axis=0)
    scale = torch.full((4, 1), 0.05)
    assert torch.equal(wide.rescale("qint8", scale)._data, wide.rescale(qint8, scale)._data)
