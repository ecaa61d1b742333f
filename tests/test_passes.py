"""Each rule on the chains user code writes with QTensor ops, and the reasons reported when none applies."""

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

from quanto_fx import QTensor
from quanto_fx.passes import RULES, STAGES, GraphReport, counters, run_passes


def compile_with_report(fn, *inputs, fusion=True):
    """Compile ``fn`` with inductor and our passes, returning (output, code, reports). ``fusion=True``
    applies the int8 GEMM rules on the CPU too (under "auto" they fire on CUDA only)."""
    reports = []

    def passes(graph):
        reports.append(run_passes(graph, fusion=fusion))

    torch._dynamo.reset()
    counters.clear()
    with (
        torch.no_grad(),
        torch._inductor.config.patch(fx_graph_cache=False, post_grad_custom_pre_pass=passes),
    ):
        out, codes = run_and_get_code(torch.compile(fn, backend="inductor"), *inputs)
    return out, "\n".join(codes), reports


def assert_fused(code, op, relu_flags):
    """The generated ``code`` calls ``quanto_fx::op`` once per entry of ``relu_flags``, in that order, each
    with that relu flag as its last argument (inductor writes it ``True)`` or ``relu=False)``), and runs no
    other GEMM: no ``_int_mm`` and no float mm / addmm / bmm a rewrite could have put in its place."""
    call = f"torch.ops.quanto_fx.{op}.default("
    FileCheck().check_count(call, len(relu_flags), exactly=True).run(code)
    in_order = FileCheck()
    for relu in relu_flags:
        in_order = in_order.check(call).check_same(f"{relu})")
    in_order.run(code)
    for gemm in ("_int_mm", "extern_kernels.mm(", "extern_kernels.addmm(", "extern_kernels.bmm("):
        FileCheck().check_not(gemm).run(code)


def operands(x_axis=None, w_axis=0, m=24, k=32, n=16):
    x = QTensor.quantize(torch.randn(m, k), axis=x_axis)
    w = QTensor.quantize(torch.randn(n, k), axis=w_axis)
    return x, w


@pytest.mark.parametrize("x_axis, w_axis", [(None, 0), (None, None), (0, None)])
def test_rescale_rule_per_tensor_column_or_row(x_axis, w_axis):
    def fn(x, w):
        return F.linear(x, w).dequantize()

    x, w = operands(x_axis, w_axis)
    out, code, _ = compile_with_report(fn, x, w)
    torch.testing.assert_close(out, fn(x, w), rtol=1e-6, atol=1e-6)
    # the runtime multiplies by (x_scale * w_scale): the outer-product rule takes both factors
    assert counters["rescale_outer"] == 1 and "quanto_fx.int8_mm_rescale.default(" in code
    assert "_int_mm" not in code
    assert_fused(code, "int8_mm_rescale", [False])


def test_rescale_rule_with_a_precomputed_scale():
    def fn(a, b, scale):
        return torch._int_mm(a, b).to(torch.float32) * scale

    a = torch.randint(-127, 128, (24, 32), dtype=torch.int8)
    b = torch.randint(-127, 128, (32, 16), dtype=torch.int8)
    for scale in (torch.rand(1, 16), torch.rand(24, 1), torch.rand(())):
        out, code, _ = compile_with_report(fn, a, b, scale)
        torch.testing.assert_close(out, fn(a, b, scale), rtol=1e-6, atol=1e-6)
        assert counters["rescale"] == 1 and "_int_mm" not in code
        assert_fused(code, "int8_mm_rescale", [False])


def test_a_full_matrix_scale_is_refused_with_a_reason():
    def fn(a, b, scale):
        return torch._int_mm(a, b).to(torch.float32) * scale

    a = torch.randint(-127, 128, (24, 32), dtype=torch.int8)
    b = torch.randint(-127, 128, (32, 16), dtype=torch.int8)
    out, code, reports = compile_with_report(fn, a, b, torch.rand(24, 16))
    assert "_int_mm" in code
    assert "neither per tensor, per row nor per column" in reports[0].unfused[0]["reason"]


def test_rescale_outer_rule_for_per_row_times_per_column():
    def fn(x, w, bias):
        return F.linear(x, w, bias)  # float result: per-row x per-column scales

    x, w = operands(0, 0)
    bias = torch.randn(16)
    out, code, _ = compile_with_report(fn, x, w, bias)
    torch.testing.assert_close(out, fn(x, w, bias), rtol=1e-5, atol=1e-5)
    assert counters["rescale_outer_bias"] == 1 and "_int_mm" not in code
    assert_fused(code, "int8_mm_rescale", [False])


def test_requantize_rule_is_bit_exact():
    def fn(x, w, out_scale):
        return (x @ w.t()).rescale(torch.int8, out_scale)._data

    x, w = operands(None, 0)
    out_scale = torch.tensor(0.05)
    out, code, _ = compile_with_report(fn, x, w, out_scale)
    assert torch.equal(out, fn(x, w, out_scale))
    assert counters["requantize"] == 1 and "_int_mm" not in code
    assert_fused(code, "int8_mm_requantize", [False])


def test_requantize_3d_with_relu_epilogue():
    def fn(x, w, bias, out_scale):
        return torch.relu(F.linear(x, w, bias).rescale(torch.int8, out_scale))._data

    x = QTensor.quantize(torch.randn(2, 12, 32))
    w = QTensor.quantize(torch.randn(16, 32), axis=0)
    bias, out_scale = torch.randn(16), torch.tensor(0.05)
    out, code, _ = compile_with_report(fn, x, w, bias, out_scale)
    assert torch.equal(out, fn(x, w, bias, out_scale)) and out.min() >= 0
    assert counters["requantize_bias_3d"] == 1
    assert counters["sink_requantize_relu"] == 1 and counters["requantize_bias_relu"] == 1
    # one requantizing GEMM on the flattened 3-d input, the relu folded into it (its flag is True)
    assert_fused(code, "int8_mm_requantize", [True])


def test_a_rescale_to_int16_keeps_its_own_requantization():
    def fn(x, w, out_scale):
        return (x @ w.t()).rescale(torch.int16, out_scale)._data

    x, w = operands()
    out, code, reports = compile_with_report(fn, x, w, torch.tensor(1e-3))
    assert torch.equal(out, fn(x, w, torch.tensor(1e-3)))
    (report,) = reports
    # the int8 requantize rule refuses (and says why); the int32 -> float rescale still fuses
    assert any(
        r["rule"] == "requantize" and "not the symmetric int8 range" in r["reason"] for r in report.rejected
    )
    assert counters["rescale"] == 1 and counters["requantize"] == 0


def test_an_int32_result_with_two_users_is_not_fused():
    def fn(x, w, out_scale):
        acc = x @ w.t()
        return acc.dequantize(), acc.rescale(torch.int8, out_scale)._data

    x, w = operands()
    (deq, q8), code, reports = compile_with_report(fn, x, w, torch.tensor(0.05))
    ref_deq, ref_q8 = fn(x, w, torch.tensor(0.05))
    assert torch.equal(q8, ref_q8) and torch.equal(deq, ref_deq)
    assert "has 2 users" in reports[0].unfused[0]["reason"]
    assert not counters


def test_auto_leaves_cpu_int8_gemm_chains_to_inductor_with_the_reason():
    def fn(x, w, out_scale):
        return (x @ w.t()).rescale(torch.int8, out_scale)._data, F.linear(x, w).dequantize()

    x, w = operands(None, 0)
    out_scale = torch.tensor(0.05)
    (q8, deq), code, reports = compile_with_report(fn, x, w, out_scale, fusion="auto")
    ref_q8, ref_deq = fn(x, w, out_scale)
    assert torch.equal(q8, ref_q8)  # inductor's own epilogue: still bit-exact
    torch.testing.assert_close(deq, ref_deq, rtol=1e-6, atol=1e-6)
    assert not counters and code.count("_int_mm") >= 2 and "quanto_fx.int8_mm" not in code
    reasons = [u["reason"] for u in reports[0].unfused]
    assert len(reasons) == 2 and all(r.startswith("on cpu, inductor fuses this epilogue") for r in reasons)
    # every int8 GEMM rule names CUDA as its "auto" device; weight-only rules fire everywhere
    gemm_rules = [r for r in RULES if r.stage == "fuse" and not r.name.startswith("weight_only")]
    assert gemm_rules and all(r.auto_devices == ("cuda",) for r in gemm_rules)
    assert all(r.auto_devices is None for r in RULES if r.name.startswith("weight_only"))


def test_auto_keeps_the_int8_gemm_rules_on_cuda():
    # No GPU needed: the device policy reads the match's fake output value only.
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode

    from quanto_fx.passes import pipeline

    with FakeTensorMode():
        values = {device: torch.empty(2, 2, device=device) for device in ("cuda", "cpu")}
    rule = next(r for r in RULES if r.name == "rescale_outer_bias")
    weight_only = next(r for r in RULES if r.name == "weight_only")

    def match(device):
        node = SimpleNamespace(meta={"val": values[device]})
        return SimpleNamespace(output_node=lambda: node)

    assert pipeline._device_reason(rule, match("cuda")) is None
    assert pipeline._device_reason(weight_only, match("cpu")) is None
    assert "on cpu, inductor fuses" in pipeline._device_reason(rule, match("cpu"))


def test_run_passes_refuses_an_unknown_fusion_mode():
    graph = torch.fx.symbolic_trace(lambda x: x + 1).graph
    for fusion in ("always", 1, None):
        with pytest.raises(ValueError, match="fusion must be True or 'auto'"):
            run_passes(graph, fusion=fusion)


def test_rules_table_is_well_formed():
    names = [r.name for r in RULES]
    assert len(names) == len(set(names))
    assert {r.stage for r in RULES} == set(STAGES)
    assert all(r.comment for r in RULES)


def test_run_passes_on_a_graph_without_int8_gemms_changes_nothing():
    graph = torch.fx.symbolic_trace(lambda x: torch.relu(x) + 1).graph
    before = str(graph)
    report = run_passes(graph, GraphReport())
    assert str(graph) == before and not report.fused and not report.unfused
