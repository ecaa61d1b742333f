"""torch.compile(model, backend="quanto"): correctness vs eager, fusion proven in the generated code,
options, caching, graph breaks and recompilation."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

import quanto_fx
from quanto_fx import QTensor, calibration, freeze, quantize
from quanto_fx.kernels import cpu_float8_mm, float8_dynamic_mm, float8_weight_mm
from quanto_fx.kernels.cpu_float8_mm import FLOAT16_ERROR
from quanto_fx.passes import counters

from .utils import VNNI_TOLERANCE, WEIGHT_ONLY_TOLERANCE, assert_close_to_max, dequantized, sqnr


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))


def quantized(model, x, mode="static", activations=quanto_fx.qint8):
    q = quantize(model, activation_mode=mode, activations=activations)
    if mode == "static" and activations is not None:
        with torch.no_grad(), calibration():
            q(x)
    return freeze(q)


# The int8 GEMM rules fire on CUDA under the default fusion="auto" (on the CPU inductor fuses those
# epilogues itself, faster): tests of the rules force them on the CPU.
FUSE_EVERYWHERE = {"fusion": True}


def compile_and_run(model, *inputs, **compile_kwargs):
    """Compile afresh (no dynamo or FX-graph cache, so the passes run and bump their counters)."""
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        out, codes = run_and_get_code(torch.compile(model, backend="quanto", **compile_kwargs), *inputs)
    return out, "\n".join(codes)


@pytest.fixture(scope="module")
def static_run():
    x = torch.randn(2, 16, 64)
    q = quantized(mlp(), x)
    counters.clear()
    out, code = compile_and_run(q, x, options=FUSE_EVERYWHERE)
    return q, x, out, code, dict(counters)


def test_static_mlp_is_fused_and_bit_exact(static_run):
    q, x, out, code, rule_counts = static_run
    with torch.no_grad():
        ref = q(x)
    assert isinstance(out, QTensor)
    assert torch.equal(out._data, ref._data) and torch.equal(out._scale, ref._scale)
    # Two fused requantizing GEMMs, the relu folded into the first; no bare _int_mm or rescale left.
    FileCheck().check_count("torch.ops.quanto_fx.int8_mm_requantize.default(", 2, exactly=True).run(code)
    call = "torch.ops.quanto_fx.int8_mm_requantize.default("
    FileCheck().check(call).check_same("True)").check(call).check_same("False)").run(code)  # relu: 1st only
    FileCheck().check_not("aten._int_mm").run(code)
    # the traced 3-d chains are fused, and the relu module that follows folds into the first
    assert rule_counts == {"requantize_bias_3d": 2, "sink_requantize_relu": 1, "requantize_bias_relu": 1}


@pytest.mark.parametrize("dims", [2, 3])
def test_dynamic_mlp_is_fused(dims):
    x = torch.randn(32, 64) if dims == 2 else torch.randn(2, 16, 64)
    q = quantized(mlp(), x, mode="dynamic")
    counters.clear()
    out, code = compile_and_run(q, x, options=FUSE_EVERYWHERE)
    with torch.no_grad():
        ref = q(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    FileCheck().check_count("torch.ops.quanto_fx.int8_mm_rescale.default(", 2, exactly=True).run(code)
    FileCheck().check_not("aten._int_mm").run(code)
    assert counters["rescale_outer_bias"] == 2 and counters["rescale_bias_relu"] == 1


@pytest.mark.parametrize(
    "mode, rule, op",
    [
        ("dynamic", "rescale_outer_bias", "int8_mm_rescale"),
        ("static", "requantize_bias_3d", "int8_mm_requantize"),
    ],
)
def test_training_graphs_fuse_the_runtime_chains_and_keep_gradients(mode, rule, op):
    # QAT under torch.compile: the forward graph holds the runtime's _int_mm chains, fused by the rules.
    x = torch.randn(2, 16, 64)
    torch.manual_seed(0)
    eager_model = quantize(mlp(), activation_mode=mode)
    if mode == "static":
        with torch.no_grad(), calibration():
            eager_model(x)
    compiled_model = quantize(mlp(), activation_mode=mode)
    compiled_model.load_state_dict(eager_model.state_dict())
    torch._dynamo.reset()
    counters.clear()

    def float_out(inp):  # QTensor outputs would need QTensor tangents in the compiled backward
        y = compiled_model(inp)
        return y.dequantize() if isinstance(y, QTensor) else y

    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled = torch.compile(float_out, backend="quanto", options=FUSE_EVERYWHERE)
        out, codes = run_and_get_code(compiled, x)
    assert counters[rule] == 2 and "_int_mm" not in "\n".join(codes)
    # The forward graph's code (the backward compiles later, at .backward()): its two GEMMs are the fused op,
    # the relu folded into the first (its last argument, the relu flag, True) and not into the second (False;
    # inductor writes it "relu=False)"); no float GEMM in their place.
    (code,) = codes
    call = f"torch.ops.quanto_fx.{op}.default("
    FileCheck().check_count(call, 2, exactly=True).run(code)
    FileCheck().check(call).check_same("True)").check(call).check_same("False)").run(code)
    for gemm in ("extern_kernels.mm(", "extern_kernels.addmm(", "extern_kernels.bmm("):
        FileCheck().check_not(gemm).run(code)
    ref = eager_model(x)
    ref = ref.dequantize() if isinstance(ref, QTensor) else ref
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    grads = compiled_model[0].weight.grad, eager_model[0].weight.grad
    torch.testing.assert_close(*grads, rtol=1e-4, atol=1e-4)


def test_weight_only_and_norms_compile_like_eager():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(32)
            self.rms = torch.nn.RMSNorm(32)
            self.proj = torch.nn.Linear(32, 32)

        def forward(self, x):
            return self.proj(self.rms(self.norm(x)))

    x = torch.randn(4, 8, 32)
    # Weight-only: both run int8_weight_mm, whose 16-bit rounding of x may round a code differently when the
    # compiled norms differ from eager's in the last bits.
    for activations, tolerance in ((quanto_fx.qint8, 1e-5), (None, VNNI_TOLERANCE)):
        q = quantized(Block(), x, "static", activations)
        out, _ = compile_and_run(q, x)
        with torch.no_grad():
            ref = q(x)
        torch.testing.assert_close(dequantized(out), dequantized(ref), rtol=tolerance, atol=tolerance)


def test_conv_model_compiles_like_eager():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)
    )
    x = torch.randn(2, 3, 10, 10)
    q = quantized(model, x)
    out, _ = compile_and_run(q, x)
    with torch.no_grad():
        ref = q(x)
    # unfused conv requantization: the same int8 values up to rounding ties of a different float order
    assert (out._data.int() - ref._data.int()).abs().max() <= 1
    assert sqnr(dequantized(ref), dequantized(out)) > 40


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fusion", ["auto", True])
def test_static_16_bit_graphs_are_bit_exact_with_eager(dtype, fusion):
    # Two eager paths (the fused no-grad op, the QTensor ops of grad mode) and the compiled graph each
    # requantize with the accumulator scale rounded to x's dtype, as the QTensor ops hold it; inductor
    # rounds such 16-bit intermediates only with emulate_precision_casts (the README's recipe)
    x = torch.randn(2, 16, 64, dtype=dtype)
    q = quantized(mlp().to(dtype), x)
    with torch._inductor.config.patch(emulate_precision_casts=True):
        out, _ = compile_and_run(q, x, options={"fusion": fusion})
    with torch.no_grad():
        ref = q(x)
    with_grad = q(x.clone().requires_grad_())
    assert torch.equal(ref._data, with_grad._data) and torch.equal(ref._scale, with_grad._scale)
    assert torch.equal(out._data, ref._data) and torch.equal(out._scale, ref._scale)
    assert sqnr(mlp().to(dtype)(x).float(), dequantized(ref).float()) > 25  # and close to the float model


def linear_chain(x, w, bias):
    """A chain written with QTensor ops: per-row int8 activations, per-column int8 weights, float out."""
    return F.linear(QTensor.quantize(x, axis=0), w, bias)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_auto_fusion_leaves_cpu_int8_gemms_to_inductor_and_matches_eager(mode):
    # The default: on the CPU inductor fuses each int8 GEMM's epilogue itself (1.1-1.5x faster than the
    # fused op there, bench/RESULTS.md); static graphs stay bit-exact, dynamic ones match eager.
    x = torch.randn(2, 16, 64)
    q = quantized(mlp(), x, mode=mode)
    counters.clear()
    out, code = compile_and_run(q, x)
    with torch.no_grad():
        ref = q(x)
    if mode == "static":
        assert torch.equal(out._data, ref._data) and torch.equal(out._scale, ref._scale)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    FileCheck().check_not("quanto_fx.int8_mm").run(code)
    FileCheck().check_count("aten._int_mm", 2, exactly=True).run(code)
    assert not counters
    report = quanto_fx.backend.explain(q, x)
    reasons = [u["reason"] for r in report.pass_reports for u in r.unfused]
    assert len(reasons) == 2 and all("inductor fuses this epilogue" in reason for reason in reasons)
    # the text says it once per GEMM, not again for each rule that refused the GEMM's epilogue for it
    assert str(report).count("inductor fuses this epilogue") == 2


def test_fusion_option_is_true_false_or_auto():
    with pytest.raises(Exception, match="'fusion' must be True, False or 'auto'"):
        compile_and_run(mlp(), torch.randn(2, 64), options={"fusion": "always"})


def test_fusion_can_be_disabled():
    x, w, bias = torch.randn(16, 64), QTensor.quantize(torch.randn(32, 64), axis=0), torch.randn(32)
    out, code = compile_and_run(linear_chain, x, w, bias, options={"fusion": False})
    FileCheck().check("_int_mm").run(code)
    FileCheck().check_not("quanto_fx.int8_mm").run(code)
    torch.testing.assert_close(out, linear_chain(x, w, bias))


def test_compile_modes_mean_what_they_mean_for_inductor():
    x = torch.randn(2, 16, 64)
    q = quantized(mlp(), x, mode="dynamic")
    out, code = compile_and_run(q, x, mode="reduce-overhead")  # CUDA graphs: no effect on the CPU
    torch.testing.assert_close(out, q(x), rtol=1e-5, atol=1e-5)
    assert "aten._int_mm" in code  # compiled by inductor (mode and options cannot be given together)
    with pytest.raises(Exception, match="Unrecognized mode=turbo"):
        compile_and_run(q, x, mode="turbo")


def test_unknown_option_is_refused():
    with pytest.raises(Exception, match="unknown quanto backend option"):
        compile_and_run(mlp(), torch.randn(2, 64), options={"fusoin": True})


def test_dump_dir_and_report(tmp_path, capsys):
    x = torch.randn(2, 16, 64)
    q = quantized(mlp(), x)
    compile_and_run(q, x, options={**FUSE_EVERYWHERE, "dump_dir": str(tmp_path), "report": True})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith("_captured.py") for n in names)
    for stage in ("before", "after_fuse", "after_sink", "after_epilogue"):
        assert any(n.endswith(f"_post_grad_{stage}.txt") for n in names), stage
    report = json.loads(next(tmp_path.glob("*_report.json")).read_text())
    rules = {f["rule"] for f in report["fused"]}
    assert rules == {"requantize_bias_3d", "sink_requantize_relu", "requantize_bias_relu"}
    after = next(tmp_path.glob("*_post_grad_after_epilogue.txt")).read_text()
    assert "int8_mm_requantize" in after and "_int_mm" not in after
    assert "rewrite(s)" in capsys.readouterr().out


def test_batch_size_change_recompiles_at_most_once():
    x = torch.randn(4, 64)
    q = quantized(mlp(), x, mode="dynamic")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(q, backend="quanto")
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        for batch in (4, 8, 16, 32):
            xb = torch.randn(batch, 64)
            torch.testing.assert_close(compiled(xb), q(xb), rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


class BranchyModel(torch.nn.Module):
    """Data-dependent Python control flow and .item(): dynamo must break the graph."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x):
        h = self.a(x)
        gate = torch.tanh(h)  # tanh has no integer handler: dequantize fallback
        if gate.sum().item() > 0:
            return self.b(h)
        return self.b(-gate)


def test_graph_breaks_fall_back_to_eager_and_fullgraph_errors_clearly():
    x = torch.randn(8, 16)
    q = quantized(BranchyModel(), x)
    out, _ = compile_and_run(q, x)
    with torch.no_grad():
        ref = q(x)
    assert torch.equal(out._data, ref._data)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.TorchDynamoException, match="item"):
        with torch.no_grad():
            torch.compile(q, backend="quanto", fullgraph=True)(x)


def test_explain_reports_breaks_fusion_and_fallbacks():
    x = torch.randn(8, 16)
    q = quantized(BranchyModel(), x)
    report = quanto_fx.backend.explain(q, x, options=FUSE_EVERYWHERE)
    assert report.graph_count >= 2 and len(report.graph_breaks) >= 1
    assert any("item" in b["reason"].lower() or "data" in b["reason"].lower() for b in report.graph_breaks)
    assert report.fused_kernels.get("int8_mm_requantize", 0) >= 2
    assert report.fallbacks.get("tanh", 0) >= 1
    text = str(report)
    assert "graph breaks:" in text and "fused kernels: int8_mm_requantize" in text
    json.dumps(report.to_dict())  # serializable


def run_python(code: str, env: dict | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_backend_name_works_in_a_fresh_process_without_importing_quanto_fx():
    out = run_python("""
        import sys, torch
        f = torch.compile(lambda x: torch.relu(x) * 2, backend="quanto")
        y = f(torch.tensor([-1.0, 3.0]))
        print(y.tolist(), "quanto_fx" in sys.modules)
    """)
    assert out.strip() == "[0.0, 6.0] True"


_CACHED_RUN = """
    import torch
    from torch._inductor.utils import run_and_get_code
    from torch._dynamo.utils import counters
    import torch.nn.functional as F
    from quanto_fx import QTensor
    torch.manual_seed(0)
    def chain(x, w, bias):
        return F.linear(QTensor.quantize(x, axis=0), w, bias)
    x, w, bias = torch.randn(16, 64), QTensor.quantize(torch.randn(32, 64), axis=0), torch.randn(32)
    with torch.no_grad():
        _, codes = run_and_get_code(torch.compile(chain, backend="quanto", options=OPTIONS), x, w, bias)
    code = "\\n".join(codes)
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    print(hits, code.count("quanto_fx.int8_mm_rescale.default("), code.count("aten._int_mm"))
"""


def test_fx_graph_cache_hits_keep_fused_code_and_options_change_the_key(tmp_path):
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    first = run_python(_CACHED_RUN.replace("OPTIONS", "{'fusion': True}"), env).split()
    second = run_python(_CACHED_RUN.replace("OPTIONS", "{'fusion': True}"), env).split()
    unfused = run_python(_CACHED_RUN.replace("OPTIONS", "{'fusion': False}"), env).split()
    assert first[0] == "0" and int(first[1]) == 1
    assert int(second[0]) >= 1 and int(second[1]) == 1 and second[2] == "0"  # served from cache, still fused
    assert int(unfused[1]) == 0 and int(unfused[2]) >= 1  # another option: not the stale fused entry


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dynamic_mlp_in_16_bits_is_fused(dtype, dims):
    # A 16-bit model multiplies its row and column scales in 16 bits before the float32 rescale: its own
    # rules. The fused op rounds once where eager rounds three times, and a changed rounding can move a
    # second-layer activation by one int8 step: the fused model must stay as close to float as eager.
    model = mlp().to(dtype)
    x = torch.randn(32, 64, dtype=dtype) if dims == 2 else torch.randn(2, 16, 64, dtype=dtype)
    q = quantized(model, x, mode="dynamic")
    counters.clear()
    out, code = compile_and_run(q, x, options=FUSE_EVERYWHERE)
    with torch.no_grad():
        eager, reference = q(x), model.float()(x.float())
    assert counters["rescale_outer_16bit_bias"] == 2 and counters["rescale_bias_relu"] == 1
    FileCheck().check_count("torch.ops.quanto_fx.int8_mm_rescale.default(", 2, exactly=True).run(code)
    FileCheck().check_not("aten._int_mm").run(code)
    assert out.dtype == dtype
    # The 1 dB is a guard band, not a derived bound. A code that a changed rounding moves by one int8 step sat
    # on a rounding boundary: its error is half a step either way, so moved codes leave the SQNR where it was.
    # 1 dB (26% more noise power than eager's) stays well under the fused model's lead measured here (44.6 vs
    # 40.5 dB in bfloat16, 53.1 vs 45.4 dB in float16) and far under what a broken fusion costs: an output
    # scale off by 2**-4 falls to 24 dB, a lost second-layer bias to 15 dB, a lost relu to 0.3 dB.
    assert sqnr(reference, out) >= sqnr(reference, eager) - 1.0
    assert_close_to_max(out, eager, 2 / 127)


# A 16-bit model's eager path rounds the dequantized float8 weight (and each layer's output) to its dtype; the
# kernels do not round the weight: the two differ by about that dtype's rounding.
SIXTEEN_BIT_ROUNDING = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


def float8_kernel_error(wqtype, rows):
    """What the CPU float8 kernels add to a layer's error on ``rows`` rows of x, as the ``_tolerance`` of
    tests/test_cpu_float8_mm.py reads it: ``FLOAT16_ERROR`` where they take a float16 path (CPUs with
    AVX512-FP16), 0 where they compute in float32 (other CPUs, or no kernels: the float32 reference) or the
    weight is not float8."""
    if wqtype.dtype not in cpu_float8_mm.FORMATS or not cpu_float8_mm.supports(1):
        return 0.0
    return FLOAT16_ERROR if cpu_float8_mm.path(wqtype.dtype, rows).startswith("float16") else 0.0


@pytest.mark.parametrize(
    "wqtype, dtype, op, rule, tolerance",
    [
        # bf16 compute on the CPU
        (quanto_fx.qint8, torch.float32, "int8_weight_mm", "weight_only_bias", WEIGHT_ONLY_TOLERANCE),
        (quanto_fx.qint8, torch.bfloat16, "int8_weight_mm", "weight_only_bias", WEIGHT_ONLY_TOLERANCE),
        # float32 compute (measured 3e-7); float8_kernel_error adds the float16 GEMV's error where it runs
        (quanto_fx.qfloat8_e4m3fn, torch.float32, "float8_weight_mm", "weight_only_bias", 1e-5),
        (quanto_fx.qfloat8_e5m2, torch.float32, "float8_weight_mm", "weight_only_bias", 1e-5),
        # float8 -> 16-bit casts decompose through float32: the 16-bit rules
        (
            quanto_fx.qfloat8_e4m3fn,
            torch.bfloat16,
            "float8_weight_mm",
            "weight_only_16bit_bias",
            SIXTEEN_BIT_ROUNDING[torch.bfloat16],
        ),
        (
            quanto_fx.qfloat8_e5m2,
            torch.float16,
            "float8_weight_mm",
            "weight_only_16bit_bias",
            SIXTEEN_BIT_ROUNDING[torch.float16],
        ),
    ],
)
def test_weight_only_chains_are_fused_into_the_weight_only_kernels(wqtype, dtype, op, rule, tolerance):
    q = freeze(quantize(mlp().to(dtype), weights=wqtype, activations=None))
    x = torch.randn(2, 5, 64, dtype=dtype)
    with torch.no_grad():
        hidden = F.relu(F.linear(x, q[0].weight.dequantize(), q[0].bias))
        expected = F.linear(hidden, q[2].weight.dequantize(), q[2].bias)
    counters.clear()
    out, code = compile_and_run(q, x)
    assert counters[rule] == 2
    assert f"quanto_fx.{op}" in code and "extern_kernels.addmm" not in code
    assert out.dtype == dtype
    # 10 rows of x: the float8 kernels' float16 GEMV on CPUs with AVX512-FP16, float32 compute elsewhere
    assert_close_to_max(out, expected, tolerance + float8_kernel_error(wqtype, x.shape[0] * x.shape[1]))


@pytest.mark.parametrize(
    "fqtype, dtype, rule",
    [
        (quanto_fx.qfloat8_e4m3fn, torch.float32, "weight_only_transposed_bias"),
        (quanto_fx.qfloat8_e5m2, torch.float32, "weight_only_transposed_bias"),
        (quanto_fx.qfloat8_e4m3fn, torch.bfloat16, "weight_only_transposed_16bit_bias"),
        (quanto_fx.qfloat8_e4m3fn, torch.float16, "weight_only_transposed_16bit_bias"),
    ],
)
def test_float8_activation_chains_become_the_dynamic_float8_op(fqtype, dtype, rule):
    """Dynamic float8 activations: the GEMM on the dequantized weight (transposed first) becomes
    float8_weight_mm instead of converting the whole weight to float32 on every call (3-5x the fp32 model's
    time before the rule; 16-bit models: 1.6-2.8x); then, on the CPU, x's float8 quantization folds into it
    as float8_dynamic_mm, the op eager inference calls: the compiled model is the eager one bit for bit
    (inductor's own rounding of x had taken ~4 ns a value and, in 16-bit models, skipped the quotient's
    16-bit rounding)."""
    model = mlp().to(dtype)
    settings = {"weights": fqtype, "activations": fqtype, "activation_mode": "dynamic"}
    q = freeze(quantize(model, inplace=False, **settings))
    x = torch.randn(2, 5, 64, dtype=dtype)
    with torch.no_grad():
        eager = q(x)
    counters.clear()
    out, code = compile_and_run(q, x)
    dynamic_rule = "float8_dynamic_bias" if dtype == torch.float32 else "float8_dynamic_16bit_bias"
    assert counters[rule] == 2 and counters[dynamic_rule] == 2
    FileCheck().check_count("torch.ops.quanto_fx.float8_dynamic_mm.default(", 2, exactly=True).run(code)
    assert "float8_weight_mm" not in code and "extern_kernels.addmm" not in code
    assert out.dtype == dtype and torch.equal(out, eager)


def test_float8_dynamic_rule_takes_quantize_constants_only():
    """The float8_dynamic rules' clamp bounds, scale divisor, floor and dtypes are pattern wildcards: a chain
    that rounds x otherwise (clamped at +-400, not e4m3fn's 448; bounds swapped, so every code is -448; int8
    codes) or whose divisor is a graph input (as dynamo traces a qtype's qmax that differed between
    recompiles of shared code) is left as it is, with the reason."""
    w = QTensor.quantize(torch.randn(32, 64), quanto_fx.qfloat8_e4m3fn, axis=0)
    data, scale, bias = w._data, w._scale.reshape(-1), torch.randn(32)

    def quantized_linear(x, divisor=448.0, low=-448.0, high=448.0, codes=torch.float8_e4m3fn):
        peak = torch.maximum(-x.amin(1, keepdim=True), x.amax(1, keepdim=True))
        x_scale = (peak / divisor).clamp_min(torch.finfo(torch.float32).tiny)
        rounded = (x / x_scale).clamp_min(low).clamp_max(high).to(codes)
        return float8_weight_mm(rounded.to(torch.float32) * x_scale, data, scale, bias)

    def clamped_at_400(x):
        return quantized_linear(x, 400.0, -400.0, 400.0)

    def bounds_swapped(x):
        return quantized_linear(x, low=448.0, high=-448.0)

    def int8_codes(x):  # (truncated, not rounded)
        return quantized_linear(x, 127.0, -127.0, 127.0, codes=torch.int8)

    def divisor_as_input(x, divisor):
        return quantized_linear(x, divisor)

    x, divisor = torch.randn(8, 64) * 3, torch.tensor(448.0)
    cases = [(quantized_linear, (x,), None), (clamped_at_400, (x,), "max|x| / 400.0")]
    cases += [(bounds_swapped, (x,), "clamp bounds 448.0, -448.0"), (int8_codes, (x,), "not one float8")]
    cases.append((divisor_as_input, (x, divisor), "computed value"))
    for fn, inputs, reason in cases:
        counters.clear()
        out, _ = compile_and_run(fn, *inputs)
        assert counters["float8_dynamic_bias"] == (reason is None), fn.__name__
        if fn is not bounds_swapped:  # (inductor orders a min above the max otherwise than eager does)
            assert_close_to_max(out, fn(*inputs), FLOAT16_ERROR)
        if reason is not None:
            assert reason in str(quanto_fx.explain(fn, *inputs)), fn.__name__
    expected = float8_dynamic_mm(x, data, scale, bias, torch.float8_e4m3fn)
    assert torch.equal(compile_and_run(quantized_linear, x)[0], expected)


def test_float8_dynamic_rules_fire_after_another_qtype_compiled_the_same_forward():
    """Two models of one class (one forward) with int8 then float8 activations: dynamo recompiles the shared
    forward and would trace the activation qtype's qmax, which differs, as a graph input; the quantization
    reads it from the qtype's dtype instead, a constant the float8_dynamic guard can check."""
    settings = {"activation_mode": "dynamic", "inplace": False}
    int8 = freeze(quantize(mlp(), weights=quanto_fx.qint8, activations=quanto_fx.qint8, **settings))
    fp8 = quanto_fx.qfloat8_e4m3fn
    float8 = freeze(quantize(mlp(), weights=fp8, activations=fp8, **settings))
    x = torch.randn(4, 64)
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        torch.compile(int8, backend="quanto")(x)
        counters.clear()
        out = torch.compile(float8, backend="quanto")(x)
        eager = float8(x)
    assert counters["float8_dynamic_bias"] == 2 and torch.equal(out, eager)


def test_float8_dynamic_rule_takes_an_x_that_is_itself_a_maximum():
    """x / scale divides x, and the scale divides the rows' max|x|, a torch.maximum: where x is a maximum too
    (a leaky relu written by hand) the guard must still tell them apart (it had raised inside inductor)."""

    class LeakyMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.maximum(h, 0.1 * h))

    settings = {"weights": quanto_fx.qfloat8_e4m3fn, "activations": quanto_fx.qfloat8_e4m3fn}
    q = freeze(quantize(LeakyMLP(), activation_mode="dynamic", **settings))
    x = torch.randn(4, 64)
    with torch.no_grad():
        eager = q(x)
    counters.clear()
    out, _ = compile_and_run(q, x)
    assert counters["float8_dynamic_bias"] == 2 and torch.equal(out, eager)


def test_weight_only_rules_take_a_transposing_permute_only():
    """The patterns' permute dims are wildcards: on a square weight an identity permute (no transpose) has the
    same shapes, and rewriting it would transpose the weight silently."""
    w = QTensor.quantize(torch.randn(64, 64), quanto_fx.qfloat8_e4m3fn, axis=0)
    data, scale = w._data, w._scale

    def dequantized_then_identity(x):
        return torch.mm(x, (data.to(torch.float32) * scale).permute(0, 1))

    def identity_then_dequantized(x):
        return torch.mm(x, data.permute(0, 1).to(torch.float32) * scale.permute(0, 1))

    def transposed(x):
        return torch.mm(x, data.permute(1, 0).to(torch.float32) * scale.permute(1, 0))

    x = torch.randn(4, 64)
    for fn, fused in ((dequantized_then_identity, 0), (identity_then_dequantized, 0), (transposed, 1)):
        counters.clear()
        torch._dynamo.reset()
        out, _ = compile_and_run(fn, x)
        assert_close_to_max(out, fn(x), FLOAT16_ERROR)
        assert counters["weight_only"] + counters["weight_only_transposed"] == fused, fn.__name__


def test_the_graph_cache_key_hashes_the_passes_and_the_kernels():
    # the key must change when the passes or the ops they write change, in a source checkout (passes/ at the
    # top, kernels/ inside quanto_fx/) as in an installed wheel (both inside quanto_fx/)
    import quanto_fx.kernels
    import quanto_fx.passes
    from quanto_fx.backend import compiler

    for package in (quanto_fx.passes, quanto_fx.kernels):
        folder = os.path.dirname(package.__file__)
        modules = {name for name in os.listdir(folder) if name.endswith(".py")}
        hashed = {os.path.basename(p) for p in compiler._SOURCES if os.path.dirname(p) == folder}
        assert modules and modules == hashed, package.__name__
