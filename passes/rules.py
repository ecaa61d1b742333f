"""The rewrite rules: each chain the eager runtime produces after AOTAutograd, beside the fused op that
replaces it. Patterns are plain eager functions; inductor's pattern matcher traces them into graph patterns
(constants such as clamp bounds and dtypes become wildcards, so each rule's ``check`` verifies them).

Stages, in order: "fuse" rewrites int8 GEMM chains and int8 / float8 weight-only GEMMs into fused ops;
"activations" folds x's dynamic float8 quantization into a fused float8 GEMM; "sink" moves a relu that
follows a fused op through the reshape between them; "epilogue" folds that relu into the fused op. See
README.md for the invariants every rule keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from quanto_fx.kernels import (
    float8_dynamic_mm,
    float8_weight_mm,
    int8_mm_requantize,
    int8_mm_rescale,
    int8_weight_mm,
)

from . import guards

aten = torch.ops.aten
prims = torch.ops.prims
INT8_QMAX = guards.INT8_QMAX


@dataclass(frozen=True)
class Rule:
    """One rewrite: ``pattern`` (eager chain) is replaced by ``replacement`` (fused op) when ``check`` passes.

    ``replacement`` takes the pattern's tensors plus ``out``, the example value of the matched chain's
    output (its shape restores a 3-d result). ``check`` returns None when the match may be fused, else
    the reason it may not (reported by explain()).
    """

    name: str
    stage: str
    pattern: Callable
    replacement: Callable
    example_inputs: Callable[[], list[torch.Tensor]]
    check: Callable[[dict], str | None]
    comment: str
    # Under fusion="auto", the device types where the rule fires (None: all), and why it does not elsewhere
    # (explain() reports it): see _CUDA_ONLY and _CPU_ONLY.
    auto_devices: tuple[str, ...] | None = None
    auto_reason: str = ""


def _i8(*shape):
    return torch.empty(shape, dtype=torch.int8)


def _f32(*shape):
    return torch.empty(shape, dtype=torch.float32)


def _bf16(*shape):
    return torch.empty(shape, dtype=torch.bfloat16)


def _f8(*shape):
    return torch.empty(shape, dtype=torch.float8_e4m3fn)


def _i32(*shape):
    return torch.empty(shape, dtype=torch.int32)


def _as_row(scale: torch.Tensor) -> torch.Tensor:
    """A (…, 1, N) or 0-d scale as the (1, N) / 0-d vector the fused ops take."""
    return scale.reshape(()) if scale.numel() == 1 else scale.reshape(1, -1)


def _as_column(scale: torch.Tensor) -> torch.Tensor:
    return scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)


def _requantize(a, b, ratio, bias, out):
    one = ratio.new_ones(())
    bias = None if bias is None else bias.reshape(-1)
    return int8_mm_requantize(a, b, one, _as_row(ratio), bias, one).reshape(out.shape)


def _requantize_round(x):
    return torch.round(x).clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8)


# -- stage "fuse": static activations, int32 -> int8 ------------------------------------------------------


# int8(clamp(round(f32(a @ b) * ratio))) -> int8_mm_requantize(a, b, ratio)
def requantize_pattern(a, b, ratio):
    return _requantize_round(torch._int_mm(a, b).to(torch.float32) * ratio)


def requantize_replacement(a, b, ratio, *, out):
    return _requantize(a, b, ratio, None, out)


# int8(clamp(round(f32(a @ b + bias32) * ratio))) -> int8_mm_requantize(a, b, ratio, bias32)
def requantize_bias_pattern(a, b, bias, ratio):
    return _requantize_round((torch._int_mm(a, b) + bias).to(torch.float32) * ratio)


def requantize_bias_replacement(a, b, bias, ratio, *, out):
    return _requantize(a, b, ratio, bias, out)


# 3-d input: the int32 accumulator is reshaped back to (B, S, N) before the requantization.
def requantize_3d_pattern(a, b, ratio):
    acc = torch._int_mm(a, b).reshape(2, -1, b.shape[1])
    return _requantize_round(acc.to(torch.float32) * ratio)


def requantize_bias_3d_pattern(a, b, bias, ratio):
    acc = (torch._int_mm(a, b) + bias).reshape(2, -1, b.shape[1])
    return _requantize_round(acc.to(torch.float32) * ratio)


# -- stage "fuse": dynamic activations or float outputs, int32 -> float ------------------------------------


# f32(a @ b) * (a_scale * b_scale) -> int8_mm_rescale(a, b, a_scale, b_scale): no (M, N) scale tensor
def rescale_outer_pattern(a, b, a_scale, b_scale):
    return torch._int_mm(a, b).to(torch.float32) * (a_scale * b_scale)


def rescale_outer_replacement(a, b, a_scale, b_scale, *, out):
    return int8_mm_rescale(a, b, _as_column(a_scale), _as_row(b_scale), None, out.dtype).reshape(out.shape)


# f32(a @ b) * (a_scale * b_scale) + bias -> int8_mm_rescale(a, b, a_scale, b_scale, bias)
def rescale_outer_bias_pattern(a, b, a_scale, b_scale, bias):
    return torch._int_mm(a, b).to(torch.float32) * (a_scale * b_scale) + bias


def rescale_outer_bias_replacement(a, b, a_scale, b_scale, bias, *, out):
    fused = int8_mm_rescale(a, b, _as_column(a_scale), _as_row(b_scale), bias.reshape(-1), out.dtype)
    return fused.reshape(out.shape)


# 16-bit models: the runtime multiplies the row and column scales in the model's dtype, then rescales in
# float32 and rounds the result to the model's dtype (before the bias):
# x16(f32(a @ b) * f32(a_scale * b_scale)) [+ bias] -> int8_mm_rescale(a, b, a_scale, b_scale[, bias]).
# The fused op multiplies the scales in float32 and adds the bias before its one rounding: it differs from
# eager by about one 16-bit rounding (it skips two), not bit-exact.
def rescale_outer_16bit_pattern(a, b, a_scale, b_scale):
    scale = (a_scale * b_scale).to(torch.float32)
    return (torch._int_mm(a, b).to(torch.float32) * scale).to(a_scale.dtype)


def rescale_outer_16bit_bias_pattern(a, b, a_scale, b_scale, bias):
    return rescale_outer_16bit_pattern(a, b, a_scale, b_scale) + bias


# f32(a @ b) * scale -> int8_mm_rescale(a, b, 1, scale), scale per tensor or per column
def rescale_pattern(a, b, scale):
    return torch._int_mm(a, b).to(torch.float32) * scale


def rescale_replacement(a, b, scale, *, out):
    one = scale.new_ones(())
    if scale.ndim == 2 and scale.shape[1] == 1 and scale.shape[0] > 1:  # per row
        return int8_mm_rescale(a, b, scale, one, None, out.dtype).reshape(out.shape)
    return int8_mm_rescale(a, b, one, _as_row(scale), None, out.dtype).reshape(out.shape)


# -- stage "fuse": int8 / float8 weight-only, float activations ------------------------------------------


def _weight_only_op(w: torch.Tensor):
    return int8_weight_mm if w.dtype == torch.int8 else float8_weight_mm


# x @ (float(w) * scale).T -> int8_weight_mm / float8_weight_mm(x, w, scale): the weight is dequantized
# inside the GEMM
def weight_only_pattern(x, w, scale):
    return torch.mm(x, (w.to(torch.float32) * scale).permute(1, 0))


def weight_only_replacement(x, w, scale, *, out):
    return _weight_only_op(w)(x, w, scale.reshape(-1), None)


# bias + x @ (float(w) * scale).T -> int8_weight_mm / float8_weight_mm(x, w, scale, bias)
def weight_only_bias_pattern(x, w, scale, bias):
    return torch.addmm(bias, x, (w.to(torch.float32) * scale).permute(1, 0))


def weight_only_bias_replacement(x, w, scale, bias, *, out):
    return _weight_only_op(w)(x, w, scale.reshape(-1), bias)


# The same with the weight transposed before it is dequantized: F.linear on float8 activations (dequantized
# by the QTensor fallback, x's float8 rounding compiled by inductor) times a float8 weight
def weight_only_transposed_pattern(x, w, scale):
    return torch.mm(x, w.permute(1, 0).to(torch.float32) * scale.permute(1, 0))


def weight_only_transposed_bias_pattern(x, w, scale, bias):
    return torch.addmm(bias, x, w.permute(1, 0).to(torch.float32) * scale.permute(1, 0))


# In a bfloat16 / float16 model a float8 weight is dequantized in float32 (float8 -> 16-bit casts decompose
# through float32) and rounded to the model's dtype; the kernels take the codes and scales unrounded
def weight_only_16bit_pattern(x, w, scale):
    return torch.mm(x, (w.to(torch.float32) * scale.to(torch.float32)).to(torch.bfloat16).permute(1, 0))


def weight_only_16bit_bias_pattern(x, w, scale, bias):
    return torch.addmm(
        bias, x, (w.to(torch.float32) * scale.to(torch.float32)).to(torch.bfloat16).permute(1, 0)
    )


def weight_only_transposed_16bit_pattern(x, w, scale):
    dequantized = w.permute(1, 0).to(torch.float32) * scale.permute(1, 0).to(torch.float32)
    return torch.mm(x, dequantized.to(torch.bfloat16))


def weight_only_transposed_16bit_bias_pattern(x, w, scale, bias):
    dequantized = w.permute(1, 0).to(torch.float32) * scale.permute(1, 0).to(torch.float32)
    return torch.addmm(bias, x, dequantized.to(torch.bfloat16))


# -- stage "activations": x's dynamic float8 quantization folded into the float8 GEMM -------------------


# float8_weight_mm(f32(f8(clamp(x / s))) * s) with s = max|x| / qmax per row -> float8_dynamic_mm(x): the
# C++ kernel quantizes x as the runtime does (inductor's code took ~4 ns a value for that rounding)
def _float8_rows(x):
    peak = torch.maximum(-x.amin(1, keepdim=True), x.amax(1, keepdim=True))
    x_scale = (peak / 448.0).clamp_min(1e-38)
    codes = (x / x_scale).clamp_min(-448.0).clamp_max(448.0).to(torch.float8_e4m3fn)
    return codes.to(torch.float32) * x_scale


# The same in a bfloat16 / float16 model: the clamp in float32, the dequantization in float32 then rounded
def _float8_rows_16bit(x):
    peak = torch.maximum(-x.amin(1, keepdim=True), x.amax(1, keepdim=True))
    x_scale = (peak / 448.0).clamp_min(1e-38)
    quotient = (x / x_scale).to(torch.float32).clamp_min(-448.0).clamp_max(448.0).to(torch.bfloat16)
    rows = quotient.to(torch.float8_e4m3fn).to(torch.float32) * x_scale.to(torch.float32)
    return rows.to(torch.bfloat16)


def float8_dynamic_pattern(x, w, w_scale):
    return float8_weight_mm(_float8_rows(x), w, w_scale, None)


def float8_dynamic_bias_pattern(x, w, w_scale, bias):
    return float8_weight_mm(_float8_rows(x), w, w_scale, bias)


def float8_dynamic_16bit_pattern(x, w, w_scale):
    return float8_weight_mm(_float8_rows_16bit(x), w, w_scale, None)


def float8_dynamic_16bit_bias_pattern(x, w, w_scale, bias):
    return float8_weight_mm(_float8_rows_16bit(x), w, w_scale, bias)


def float8_dynamic_replacement(x, w, w_scale, *, out, match):
    return float8_dynamic_mm(x, w, w_scale, None, guards.float8_activation_dtype(match))


def float8_dynamic_bias_replacement(x, w, w_scale, bias, *, out, match):
    return float8_dynamic_mm(x, w, w_scale, bias, guards.float8_activation_dtype(match))


# -- stage "sink": relu(reshape(fused)) -> reshape(relu(fused)), so the epilogue stage sees them adjacent ----


# clamp_min(reshape(requantize(...)), 0) -> reshape(clamp_min(...)): pointwise ops commute with reshapes
def sink_requantize_relu_pattern(x):
    return x.reshape(2, -1).clamp_min(0)


def sink_rescale_relu_pattern(x):
    return torch.relu(x.reshape(2, -1))


def sink_requantize_relu_replacement(x, *, out):
    return x.clamp_min(0).reshape(out.shape)


def sink_rescale_relu_replacement(x, *, out):
    return torch.relu(x).reshape(out.shape)


# -- stage "epilogue": fold a relu into the fused op ------------------------------------------------------


# clamp_min(int8_mm_requantize(...), 0) -> int8_mm_requantize(..., relu=True): clamping commutes with rounding
def requantize_relu_pattern(a, b, a_scale, b_scale, out_scale):
    return int8_mm_requantize(a, b, a_scale, b_scale, None, out_scale).clamp_min(0)


def requantize_relu_replacement(a, b, a_scale, b_scale, out_scale, *, out):
    return int8_mm_requantize(a, b, a_scale, b_scale, None, out_scale, relu=True)


def requantize_bias_relu_pattern(a, b, a_scale, b_scale, bias, out_scale):
    return int8_mm_requantize(a, b, a_scale, b_scale, bias, out_scale).clamp_min(0)


def requantize_bias_relu_replacement(a, b, a_scale, b_scale, bias, out_scale, *, out):
    return int8_mm_requantize(a, b, a_scale, b_scale, bias, out_scale, relu=True)


# relu(int8_mm_rescale(...)) -> int8_mm_rescale(..., relu=True)
def rescale_relu_pattern(a, b, a_scale, b_scale):
    return torch.relu(int8_mm_rescale(a, b, a_scale, b_scale, None, torch.float32))


def rescale_relu_replacement(a, b, a_scale, b_scale, *, out):
    return int8_mm_rescale(a, b, a_scale, b_scale, None, out.dtype, relu=True)


def rescale_bias_relu_pattern(a, b, a_scale, b_scale, bias):
    return torch.relu(int8_mm_rescale(a, b, a_scale, b_scale, bias, torch.float32))


def rescale_bias_relu_replacement(a, b, a_scale, b_scale, bias, *, out):
    return int8_mm_rescale(a, b, a_scale, b_scale, bias, out.dtype, relu=True)


# -- the table --------------------------------------------------------------------------------------------

_M, _K, _N = 8, 16, 8
# The int8 GEMM rules fire on CUDA only: on the CPU the fused op is aten._int_mm plus an epilogue in torch
# ops, while inductor fuses the same epilogue into one C++ loop, 1.1-1.5x faster per layer (bench/RESULTS.md).
_CUDA_ONLY = {
    "auto_devices": ("cuda",),
    "auto_reason": "inductor fuses this epilogue after aten._int_mm itself, faster than the fused op",
}
# The float8_dynamic rules fire on the CPU only: on CUDA the op would run x's quantization as separate torch
# kernels where inductor fuses it into one (not timed on a GPU).
_CPU_ONLY = {
    "auto_devices": ("cpu",),
    "auto_reason": "the op would quantize x in separate torch kernels where inductor fuses them (not timed)",
}

RULES: tuple[Rule, ...] = (
    Rule("requantize", "fuse", requantize_pattern, requantize_replacement,
         lambda: [_i8(_M, _K), _i8(_K, _N), _f32(1, _N)], guards.check_requantize,
         "int32 -> int8 at a per-tensor or per-column ratio", **_CUDA_ONLY),
    Rule("requantize_bias", "fuse", requantize_bias_pattern, requantize_bias_replacement,
         lambda: [_i8(_M, _K), _i8(_K, _N), _i32(1, _N), _f32(1, _N)], guards.check_requantize,
         "int32 + int32 bias -> int8", **_CUDA_ONLY),
    Rule("requantize_3d", "fuse", requantize_3d_pattern, requantize_replacement,
         lambda: [_i8(_M, _K), _i8(_K, _N), _f32(1, 1, _N)], guards.check_requantize,
         "as requantize, with the (B, S, N) reshape of a 3-d input in between",
         **_CUDA_ONLY),
    Rule("requantize_bias_3d", "fuse", requantize_bias_3d_pattern, requantize_bias_replacement,
         lambda: [_i8(_M, _K), _i8(_K, _N), _i32(1, _N), _f32(1, 1, _N)], guards.check_requantize,
         "as requantize_bias, with the (B, S, N) reshape of a 3-d input in between",
         **_CUDA_ONLY),
    Rule("rescale_outer_bias", "fuse", rescale_outer_bias_pattern, rescale_outer_bias_replacement,
         lambda: [_i8(_M, _K), _i8(_K, _N), _f32(_M, 1), _f32(1, _N), _f32(_N)], guards.check_rescale,
         "int32 -> float by per-row x per-column scales, + bias (dynamic activations)",
         **_CUDA_ONLY),
    Rule("rescale_outer", "fuse", rescale_outer_pattern, rescale_outer_replacement,
         lambda: [_i8(_M, _K), _i8(_K, _N), _f32(_M, 1), _f32(1, _N)], guards.check_rescale,
         "int32 -> float by per-row x per-column scales", **_CUDA_ONLY),
    Rule("rescale_outer_16bit_bias", "fuse", rescale_outer_16bit_bias_pattern, rescale_outer_bias_replacement,
         lambda: [_i8(_M, _K), _i8(_K, _N), _bf16(_M, 1), _bf16(1, _N), _bf16(_N)],
         guards.check_rescale_16bit,
         "as rescale_outer_bias in a bfloat16 / float16 model (scales multiplied in 16 bits)",
         **_CUDA_ONLY),
    Rule("rescale_outer_16bit", "fuse", rescale_outer_16bit_pattern, rescale_outer_replacement,
         lambda: [_i8(_M, _K), _i8(_K, _N), _bf16(_M, 1), _bf16(1, _N)], guards.check_rescale_16bit,
         "as rescale_outer in a bfloat16 / float16 model", **_CUDA_ONLY),
    Rule("rescale", "fuse", rescale_pattern, rescale_replacement,
         lambda: [_i8(_M, _K), _i8(_K, _N), _f32(1, _N)], guards.check_rescale,
         "int32 -> float by one scale per tensor, row or column", **_CUDA_ONLY),
    Rule("weight_only", "fuse", weight_only_pattern, weight_only_replacement,
         lambda: [_f32(_M, _K), _i8(_N, _K), _f32(_N, 1)], guards.check_weight_only,
         "float x times an int8 or float8 weight dequantized per output channel"),
    Rule("weight_only_bias", "fuse", weight_only_bias_pattern, weight_only_bias_replacement,
         lambda: [_f32(_M, _K), _i8(_N, _K), _f32(_N, 1), _f32(_N)], guards.check_weight_only,
         "as weight_only, + bias"),
    Rule("weight_only_transposed", "fuse", weight_only_transposed_pattern, weight_only_replacement,
         lambda: [_f32(_M, _K), _i8(_N, _K), _f32(_N, 1)], guards.check_weight_only,
         "as weight_only, the weight transposed before it is dequantized (float8 activations)"),
    Rule("weight_only_transposed_bias", "fuse", weight_only_transposed_bias_pattern,
         weight_only_bias_replacement,
         lambda: [_f32(_M, _K), _i8(_N, _K), _f32(_N, 1), _f32(_N)], guards.check_weight_only,
         "as weight_only_transposed, + bias"),
    Rule("weight_only_16bit", "fuse", weight_only_16bit_pattern, weight_only_replacement,
         lambda: [_bf16(_M, _K), _i8(_N, _K), _bf16(_N, 1)], guards.check_weight_only_16bit,
         "as weight_only in a bfloat16 / float16 model, a float8 weight dequantized in float32"),
    Rule("weight_only_16bit_bias", "fuse", weight_only_16bit_bias_pattern, weight_only_bias_replacement,
         lambda: [_bf16(_M, _K), _i8(_N, _K), _bf16(_N, 1), _bf16(_N)], guards.check_weight_only_16bit,
         "as weight_only_16bit, + bias"),
    Rule("weight_only_transposed_16bit", "fuse", weight_only_transposed_16bit_pattern,
         weight_only_replacement,
         lambda: [_bf16(_M, _K), _i8(_N, _K), _bf16(_N, 1)], guards.check_weight_only_16bit,
         "as weight_only_transposed in a bfloat16 / float16 model"),
    Rule("weight_only_transposed_16bit_bias", "fuse", weight_only_transposed_16bit_bias_pattern,
         weight_only_bias_replacement,
         lambda: [_bf16(_M, _K), _i8(_N, _K), _bf16(_N, 1), _bf16(_N)], guards.check_weight_only_16bit,
         "as weight_only_transposed_16bit, + bias"),
    Rule("float8_dynamic", "activations", float8_dynamic_pattern, float8_dynamic_replacement,
         lambda: [_f32(_M, _K), _f8(_N, _K), _f32(_N)], guards.check_float8_dynamic,
         "x's per-row float8 quantization and the float8 weight GEMM in one op", **_CPU_ONLY),
    Rule("float8_dynamic_bias", "activations", float8_dynamic_bias_pattern, float8_dynamic_bias_replacement,
         lambda: [_f32(_M, _K), _f8(_N, _K), _f32(_N), _f32(_N)], guards.check_float8_dynamic,
         "as float8_dynamic, + bias", **_CPU_ONLY),
    Rule("float8_dynamic_16bit", "activations", float8_dynamic_16bit_pattern, float8_dynamic_replacement,
         lambda: [_bf16(_M, _K), _f8(_N, _K), _bf16(_N)], guards.check_float8_dynamic,
         "as float8_dynamic in a bfloat16 / float16 model", **_CPU_ONLY),
    Rule("float8_dynamic_16bit_bias", "activations", float8_dynamic_16bit_bias_pattern,
         float8_dynamic_bias_replacement,
         lambda: [_bf16(_M, _K), _f8(_N, _K), _bf16(_N), _bf16(_N)], guards.check_float8_dynamic,
         "as float8_dynamic_16bit, + bias", **_CPU_ONLY),
    Rule("sink_requantize_relu", "sink", sink_requantize_relu_pattern, sink_requantize_relu_replacement,
         lambda: [_i8(_M, _N)], guards.check_sink_requantize,
         "relu(reshape(requantize)) -> reshape(relu(requantize))"),
    Rule("sink_rescale_relu", "sink", sink_rescale_relu_pattern, sink_rescale_relu_replacement,
         lambda: [_f32(_M, _N)], guards.check_sink_rescale,
         "relu(reshape(rescale)) -> reshape(relu(rescale))"),
    Rule("requantize_relu", "epilogue", requantize_relu_pattern, requantize_relu_replacement,
         lambda: [_i8(_M, _K), _i8(_K, _N), _f32(), _f32(1, _N), _f32()], guards.check_relu_bound,
         "relu folded into requantize"),
    Rule("requantize_bias_relu", "epilogue", requantize_bias_relu_pattern, requantize_bias_relu_replacement,
         lambda: [_i8(_M, _K), _i8(_K, _N), _f32(), _f32(1, _N), _i32(_N), _f32()], guards.check_relu_bound,
         "relu folded into requantize with bias"),
    Rule("rescale_relu", "epilogue", rescale_relu_pattern, rescale_relu_replacement,
         lambda: [_i8(_M, _K), _i8(_K, _N), _f32(_M, 1), _f32(1, _N)], guards.always,
         "relu folded into rescale"),
    Rule("rescale_bias_relu", "epilogue", rescale_bias_relu_pattern, rescale_bias_relu_replacement,
         lambda: [_i8(_M, _K), _i8(_K, _N), _f32(_M, 1), _f32(1, _N), _f32(_N)], guards.always,
         "relu folded into rescale with bias"),
)  # fmt: skip

STAGES: tuple[str, ...] = ("fuse", "activations", "sink", "epilogue")
