"""int4 / int2 weights: packing, group-wise quantization, PackedQTensor, QLinear, checkpoints, compile."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import quanto_fx
from quanto_fx import freeze, qint2, qint4, qint8, quantization_map, quantize, requantize
from quanto_fx.kernels.weight_only import lowbit_weight_mm, lowbit_weight_mm_reference
from quanto_fx.tensor import PackedQTensor, fallback_counts, reset_fallback_counts
from quanto_fx.tensor.groupwise import dequantize_groupwise, quantize_groupwise
from quanto_fx.tensor.packing import pack, unpack

from .utils import WEIGHT_ONLY_TOLERANCE, assert_close_to_max, sqnr

BITS = {qint4: 4, qint2: 2}


@given(
    bits=st.sampled_from([2, 4]),
    rows=st.integers(1, 5),
    bytes_per_row=st.integers(1, 9),
    seed=st.integers(0, 99),
)
def test_pack_unpack_round_trip_is_exact(bits, rows, bytes_per_row, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, bytes_per_row * 8 // bits), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, bytes_per_row)
    assert torch.equal(unpack(packed, bits), codes)


def test_pack_layout_puts_the_first_code_in_the_low_bits():
    # The portable layout that checkpoints hold (documented in packing.py), checked on one byte.
    assert pack(torch.tensor([[1, 2]]), 4).item() == 0x21
    assert pack(torch.tensor([[1, 2, 3, 0]]), 2).item() == 0b00_11_10_01


@pytest.mark.parametrize(
    "codes, bits, message",
    [
        (torch.zeros(2, 3, dtype=torch.uint8), 4, "not a multiple of 2"),
        (torch.full((1, 2), 16), 4, r"codes must lie in \[0, 15\]"),
        (torch.full((1, 4), -1), 2, r"codes must lie in \[0, 3\]"),
        (torch.zeros(1, 2), 3, "supports"),
    ],
)
def test_pack_rejects_what_it_cannot_store(codes, bits, message):
    with pytest.raises(ValueError, match=message):
        pack(codes, bits)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shift", [False, True])
def test_groupwise_error_is_at_most_half_a_step(bits, shift):
    w = torch.randn(24, 256)
    codes, scale_zeros = quantize_groupwise(w, bits, 64, shift)
    assert scale_zeros.shape == (4, 24, 2) and int(codes.max()) < 2**bits
    step = scale_zeros[..., 0].t().repeat_interleave(64, dim=1)
    error = (dequantize_groupwise(codes, scale_zeros, bits) - w).abs()
    assert bool((error <= step / 2 * (1 + 1e-5)).all())
    if not shift:
        assert bool((scale_zeros[..., 1] == 0).all()) and int(codes.min()) >= 1  # symmetric: mid +- (mid - 1)


def test_shifted_groups_use_every_code_and_beat_symmetric_at_two_bits():
    w = torch.randn(32, 512)
    shifted = PackedQTensor.quantize(w, qint2, 128, shift=True)
    symmetric = PackedQTensor.quantize(w, qint2, 128, shift=False)
    assert set(shifted.codes().unique().tolist()) == {0, 1, 2, 3}
    assert sqnr(w, shifted.dequantize()) > sqnr(w, symmetric.dequantize()) + 3


def test_packed_qtensor_describes_a_float_weight():
    w = torch.randn(32, 256, dtype=torch.bfloat16)
    p = PackedQTensor.quantize(w, qint4, 128)
    assert p.shape == (32, 256) and p.dtype == torch.bfloat16 and p._packed.shape == (32, 128)
    assert p.scale.shape == p.zero.shape == (32, 2)
    assert p.t().shape == (256, 32) and torch.equal(p.t().dequantize(), p.dequantize().t())
    assert sqnr(w, p.dequantize()) > 18  # int4, groups of 128, on Gaussian weights: ~21 dB


@pytest.mark.parametrize("wqtype", [qint4, qint2])
@pytest.mark.parametrize(
    "out_features", [48, 20]
)  # 48: aten's CPU int4 kernel; 20 (not a multiple of 16): reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_on_packed_weight_matches_the_dequantized_weight(
    wqtype, out_features, dtype, aten_weight_kernels
):
    w = PackedQTensor.quantize(torch.randn(out_features, 256, dtype=dtype), wqtype, 64)
    assert (w._kernel is not None) == (out_features % 16 == 0)
    x, bias = torch.randn(2, 3, 256, dtype=dtype), torch.randn(out_features, dtype=dtype)
    reset_fallback_counts()
    out = F.linear(x, w, bias)
    assert fallback_counts() == {}  # the GEMM ran in lowbit_weight_mm, not on a dequantized weight
    expected = F.linear(x.float(), w.dequantize().float(), bias.float())
    assert out.dtype == dtype
    # fp32 on aten's CPU kernel computes in bf16; the reference path (N = 20) in fp32
    exact = dtype == torch.float32 and w._kernel is None
    assert_close_to_max(out.float(), expected, 1e-5 if exact else WEIGHT_ONLY_TOLERANCE)


def test_lowbit_weight_mm_checks_its_arguments():
    w = PackedQTensor.quantize(torch.randn(16, 128), qint4, 64)
    args = (w._packed, w._scale_zeros, w._kernel, 4, 64)
    with pytest.raises(ValueError, match="x has 64 features but the weight takes 128"):
        lowbit_weight_mm(torch.randn(2, 64), *args)
    with pytest.raises(TypeError, match="x must be a 2-d float"):
        lowbit_weight_mm(torch.ones(2, 128, dtype=torch.int32), *args)
    with pytest.raises(ValueError, match=r"scale_zeros of a \(16, 128\) weight in groups of 64 must"):
        lowbit_weight_mm(torch.randn(2, 128), w._packed, w._scale_zeros[:1], None, 4, 64)
    ref = lowbit_weight_mm_reference(torch.ones(1, 128), w._packed, w._scale_zeros, 4)
    torch.testing.assert_close(ref, w.dequantize().sum(1, keepdim=True).t())


def test_other_ops_dequantize_and_in_place_ops_refuse():
    w = PackedQTensor.quantize(torch.randn(16, 64), qint4, 32)
    reset_fallback_counts()
    torch.testing.assert_close(w * 2, w.dequantize() * 2)
    assert fallback_counts() == {"mul": 1}
    with pytest.raises(NotImplementedError, match="modify a PackedQTensor in place"):
        w.mul_(2)


def test_moves_copies_and_conversions_keep_the_codes(aten_weight_kernels):
    w = PackedQTensor.quantize(torch.randn(32, 128), qint4, 64)
    half = w.to(torch.bfloat16)
    assert isinstance(half, PackedQTensor) and half.dtype == torch.bfloat16
    assert torch.equal(half._packed, w._packed) and half._kernel is not None
    dup = copy.deepcopy(w)
    assert torch.equal(dup._packed, w._packed) and dup._packed.data_ptr() != w._packed.data_ptr()
    target = PackedQTensor.quantize(torch.randn(32, 128), qint4, 64)
    target.copy_(w)
    torch.testing.assert_close(F.linear(torch.ones(1, 128), target), F.linear(torch.ones(1, 128), w))
    with pytest.raises(NotImplementedError, match="same qtype, group size, shape"):
        target.copy_(PackedQTensor.quantize(torch.randn(32, 128), qint2, 64))


def test_torch_save_round_trip_is_exact_and_rebuilds_the_kernel_layout(aten_weight_kernels):
    w = PackedQTensor.quantize(torch.randn(32, 128), qint2, 64)
    buf = io.BytesIO()
    torch.save({"w": w}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["w"]
    assert torch.equal(loaded._packed, w._packed) and torch.equal(loaded._scale_zeros, w._scale_zeros)
    assert loaded._kernel is not None and loaded.qtype == qint2 and loaded.group_size == 64
    x = torch.randn(3, 128)
    assert torch.equal(F.linear(x, loaded), F.linear(x, w))


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))


@pytest.mark.parametrize("wqtype, min_sqnr", [(qint4, 15.0), (qint2, 3.0)])
def test_quantized_mlp_tracks_float_and_freezing_keeps_outputs(wqtype, min_sqnr):
    model, x = mlp(), torch.randn(8, 256)
    reference = model(x)
    q = quantize(model, weights=wqtype, activations=None, inplace=False, group_size=64)
    before = q(x)
    freeze(q)
    assert isinstance(q[0].weight, PackedQTensor) and q[0].weight.group_size == 64
    with torch.no_grad():
        after = q(x)
    assert_close_to_max(after, before, WEIGHT_ONLY_TOLERANCE)
    assert sqnr(reference, after) > min_sqnr


def test_quantization_aware_training_reaches_the_float_weights():
    q = quantize(mlp(), weights=qint4, activations=None, group_size=64)
    x = torch.randn(4, 256)
    q(x).square().mean().backward()
    # straight through: each float weight gets the gradient of its dequantized value in the float model
    w0, w2 = (q[i].qweight.dequantize().detach().requires_grad_() for i in (0, 2))
    F.linear(F.gelu(F.linear(x, w0, q[0].bias)), w2, q[2].bias).square().mean().backward()
    torch.testing.assert_close(q[0].weight.grad, w0.grad)
    torch.testing.assert_close(q[2].weight.grad, w2.grad)


def test_frozen_int4_layers_pass_gradients_to_their_inputs():
    q = freeze(quantize(mlp(), weights=qint4, activations=None, group_size=64))
    x = torch.randn(4, 256, requires_grad=True)
    q(x).sum().backward()
    expected = torch.autograd.functional.vjp(
        lambda t: F.linear(F.gelu(F.linear(t, q[0].weight.dequantize(), q[0].bias)), q[2].weight.dequantize(),
                           q[2].bias).sum(), x.detach())[1]  # fmt: skip
    assert_close_to_max(x.grad, expected, WEIGHT_ONLY_TOLERANCE)  # the forward ran the bf16 CPU kernel


def test_checkpoint_round_trip_is_bit_exact_and_small(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False), torch.nn.Linear(512, 512, bias=False))
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    q = freeze(quantize(model, weights=qint4, activations=None, inplace=False))
    path = tmp_path / "int4.safetensors"
    quanto_fx.save(q, path)
    assert path.stat().st_size <= 0.16 * float_bytes
    with torch.device("meta"):
        skeleton = torch.nn.Sequential(
            torch.nn.Linear(512, 512, bias=False), torch.nn.Linear(512, 512, bias=False)
        )
    loaded = quanto_fx.load(path, skeleton)
    for a, b in zip(q, loaded, strict=True):
        assert torch.equal(a.weight._packed, b.weight._packed)
        assert torch.equal(a.weight._scale_zeros, b.weight._scale_zeros)
    x = torch.randn(2, 512)
    assert torch.equal(loaded(x), q(x))


def test_requantize_from_state_dict_keeps_the_group_size():
    q = freeze(quantize(mlp(), weights=qint2, activations=None, inplace=False, group_size=32))
    qmap = quantization_map(q)
    assert qmap["0"]["group_size"] == 32
    with torch.device("meta"):
        skeleton = mlp()
    rebuilt = requantize(skeleton, q.state_dict(), qmap)
    assert rebuilt[0].weight.group_size == 32
    x = torch.randn(2, 256)
    assert torch.equal(rebuilt(x), q(x))


def test_corrupted_packed_checkpoints_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    q = freeze(quantize(mlp(), weights=qint4, activations=None, inplace=False))
    path = tmp_path / "q.safetensors"
    quanto_fx.save(q, path)
    with safe_open(path, framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["0.weight._scale_zeros"][0, 0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, bad, metadata=metadata)
    with pytest.raises(ValueError, match=r"PackedQTensor '0.weight'.*scale contains non-finite"):
        quanto_fx.load(bad, mlp())
    del tensors["0.weight._scale_zeros"]
    save_file(tensors, bad, metadata=metadata)
    with pytest.raises(ValueError, match="lacks one of"):
        quanto_fx.load(bad, mlp())


def test_compiled_int4_model_runs_the_weight_only_kernel():
    from torch._inductor.utils import run_and_get_code

    q = freeze(quantize(mlp(), weights=qint4, activations=None, group_size=64))
    x = torch.randn(3, 256)
    with torch.no_grad():
        expected = q(x)
        torch._dynamo.reset()
        out, codes = run_and_get_code(torch.compile(q, backend="quanto"), x)
    assert "quanto_fx.lowbit_weight_mm" in "\n".join(codes)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_past_the_cpu_kernel_range_the_weight_only_ops_compute_in_float32(monkeypatch):
    from quanto_fx.kernels import cpu_vnni_mm
    from quanto_fx.kernels.weight_only import (
        CPU_KERNEL_MAX_M,
        int8_weight_mm,
        per_channel_weight_mm_reference,
    )

    monkeypatch.setenv(cpu_vnni_mm.ENABLE_VARIABLE, "0")  # int8 would take torch._int_mm (test_cpu_vnni_mm)
    x = torch.randn(CPU_KERNEL_MAX_M + 1, 128)
    packed = PackedQTensor.quantize(torch.randn(32, 128), qint4, 64)
    out = lowbit_weight_mm(x, packed._packed, packed._scale_zeros, packed._kernel, 4, 64)
    assert_close_to_max(out, lowbit_weight_mm_reference(x, packed._packed, packed._scale_zeros, 4), 1e-5)
    w, scale = torch.randint(-127, 128, (32, 128), dtype=torch.int8), torch.rand(32)
    assert_close_to_max(int8_weight_mm(x, w, scale), per_channel_weight_mm_reference(x, w, scale), 1e-5)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])  # added by each block's addmm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra_rows", [3, 50])  # M = 19: the transposed output; M = 66: column slices
def test_blocked_float_gemm_spans_several_blocks_and_a_partial_one(monkeypatch, dtype, extra_rows, with_bias):
    from quanto_fx.kernels import cpu_vnni_mm, weight_only

    # 16-row blocks (the smallest) over N = 40: blocks of 16, 16 and 8 rows through one reused buffer
    monkeypatch.setattr(weight_only, "DEQUANTIZE_BLOCK_BYTES", 1)
    monkeypatch.setenv(cpu_vnni_mm.ENABLE_VARIABLE, "0")  # int8 would take torch._int_mm
    x = torch.randn(weight_only.CPU_KERNEL_MAX_M + extra_rows, 128, dtype=dtype)
    packed = PackedQTensor.quantize(torch.randn(40, 128), qint4, 64)
    bias = torch.randn(40) if with_bias else None
    added = 0.0 if bias is None else bias
    out = lowbit_weight_mm(x, packed._packed, packed._scale_zeros, packed._kernel, 4, 64, bias)
    reference = lowbit_weight_mm_reference(x.float(), packed._packed, packed._scale_zeros, 4) + added
    # 16-bit x: the weights (scale and zero) and the output rounded to it (2**-8 each for bfloat16) against a
    # float32 reference: a few of those roundings of the largest output
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and out.shape == (x.shape[0], 40)
    assert_close_to_max(out.float(), reference, tolerance)
    w, scale = torch.randint(-127, 128, (40, 128), dtype=torch.int8), torch.rand(40)
    expected = weight_only.per_channel_weight_mm_reference(x.float(), w, scale) + added
    assert_close_to_max(weight_only.int8_weight_mm(x, w, scale, bias).float(), expected, tolerance)


def test_dequantize_groupwise_into_a_buffer_matches_the_allocating_form():
    codes, scale_zeros = quantize_groupwise(torch.randn(24, 64), 4, 32, shift=True)
    buffer = torch.full((24, 64), float("nan"))
    out = dequantize_groupwise(codes, scale_zeros, 4, out=buffer)
    assert out.data_ptr() == buffer.data_ptr()
    assert torch.equal(out, dequantize_groupwise(codes, scale_zeros, 4))


@pytest.mark.parametrize("in_features", [5, 24, 100])  # aten's int8 CPU kernel segfaults unless K % 16 == 0
def test_int8_weight_only_takes_any_number_of_features(in_features):
    model = torch.nn.Sequential(torch.nn.Linear(in_features, 8))
    q = freeze(quantize(model, weights=qint8, activations=None, inplace=False))
    x = torch.randn(2, in_features)
    with torch.no_grad():
        assert_close_to_max(q(x), F.linear(x, q[0].weight.dequantize(), q[0].bias), 1e-5)


def test_frozen_packed_state_dict_loads_into_a_float_weight_as_its_value():
    frozen = freeze(quantize(mlp(), weights=qint4, activations=None, inplace=False))
    unfrozen = quantize(mlp(), weights=qint4, activations=None, inplace=False)
    unfrozen.load_state_dict(frozen.state_dict())  # copy_ of a PackedQTensor into a float Parameter
    assert torch.equal(unfrozen[0].weight, frozen[0].weight.dequantize())


def test_orientation_is_kept_by_copies_and_identity_permutations():
    w = PackedQTensor.quantize(torch.randn(64, 64), qint4, 32)
    assert not w.transpose(1, 1).transposed and not w.transpose(-1, 1).transposed
    assert not w.permute([-2, 1]).transposed and w.permute([1, 0]).transposed
    with pytest.raises(NotImplementedError, match="orientation"):
        PackedQTensor.quantize(torch.randn(64, 64), qint4, 32).copy_(w.t())


def test_casts_the_kernel_cannot_take_compute_on_the_value():
    w = PackedQTensor.quantize(torch.randn(16, 64), qint4, 32)
    x = torch.randn(3, 64, dtype=torch.float64)
    out = F.linear(x, w.to(torch.float64))  # float64 falls back to the float GEMM
    torch.testing.assert_close(out, x @ w.dequantize().double().t(), rtol=1e-5, atol=1e-5)
    as_float8 = w.to(torch.float8_e4m3fn)
    assert type(as_float8) is torch.Tensor and as_float8.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(as_float8.float(), w.dequantize().to(torch.float8_e4m3fn).float())


def test_deepcopy_keeps_requires_grad_and_training_builds_no_kernel_layout(aten_weight_kernels):
    w = PackedQTensor.quantize(torch.randn(16, 64), qint4, 32).requires_grad_()
    assert copy.deepcopy(w).requires_grad
    q = quantize(mlp(), weights=qint4, activations=None, group_size=64)
    assert q[0].qweight._kernel is None  # the float weight trains: dequantized at once, no GEMM layout
    with torch.no_grad():
        assert q[0].qweight._kernel is not None


def test_explain_counts_the_weight_only_kernels():
    q = freeze(quantize(mlp(), weights=qint4, activations=None, group_size=64))
    report = quanto_fx.explain(q, torch.randn(3, 256))
    assert report.fused_kernels == {"lowbit_weight_mm": 2} and not report.graph_breaks
