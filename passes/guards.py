"""The checks a rule runs on a match before rewriting it: dtypes, shapes and constants that the traced
pattern left as wildcards. Each returns None when the match may be fused, else the reason it may not."""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import Match

from quanto_fx.kernels.checks import RESCALE_OUT_DTYPES as RESCALE_DTYPES  # a fused rescale's outputs
from quanto_fx.kernels.reference import INT8_QMAX
from quanto_fx.tensor.quantization import FLOAT8_DTYPES

aten = torch.ops.aten
prims = torch.ops.prims


def value(match: Match, name: str):
    """The example value (FakeTensor) of the matched argument ``name``; None if absent or a constant None."""
    node = match.kwargs.get(name)
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def _nodes(match: Match, target) -> list[torch.fx.Node]:
    return [n for n in match.nodes if n.target == target]


def _gemm_n(match: Match) -> int:
    return value(match, "b").shape[1]


def _varies_only_along_last_dim(t: torch.Tensor, n: int) -> bool:
    return t.numel() == 1 or (t.numel() == n and t.shape[-1] == n)


def _reshape_keeps_columns(match: Match, n: int) -> str | None:
    for node in _nodes(match, aten.reshape.default) + _nodes(match, aten.view.default):
        if node.meta["val"].shape[-1] != n:
            return f"the reshape after the int8 GEMM moves columns (to {tuple(node.meta['val'].shape)})"
    return None


def check_requantize(match: Match) -> str | None:
    """int32 [+ bias] -> int8: symmetric int8 bounds, per-tensor or per-column ratio, int32 (N,) bias."""
    n = _gemm_n(match)
    (clamp_min,) = _nodes(match, aten.clamp_min.default)
    (clamp_max,) = _nodes(match, aten.clamp_max.default)
    if (clamp_min.args[1], clamp_max.args[1]) != (-INT8_QMAX, INT8_QMAX):
        return f"clamp bounds ({clamp_min.args[1]}, {clamp_max.args[1]}) are not the symmetric int8 range"
    to_int8, to_float = sorted(
        _nodes(match, prims.convert_element_type.default), key=lambda n: n.args[1].is_floating_point
    )
    if to_int8.args[1] != torch.int8 or not to_float.args[1].is_floating_point:
        return f"the chain converts to {to_float.args[1]} then {to_int8.args[1]}, not float then int8"
    ratio = value(match, "ratio")
    if not isinstance(ratio, torch.Tensor) or not _varies_only_along_last_dim(ratio, n):
        return "the requantization scale is neither per tensor nor per output column"
    bias = value(match, "bias")
    if bias is not None and (
        bias.dtype != torch.int32 or not _varies_only_along_last_dim(bias, n) or bias.numel() != n
    ):
        return "the bias added to the int32 accumulator is not an int32 (N,) vector"
    return _reshape_keeps_columns(match, n)


def _outer_scales_reason(a_scale: torch.Tensor, b_scale: torch.Tensor, m: int, n: int) -> str | None:
    """Row scales (M, 1) and column scales (1, N), either of them possibly per tensor."""
    if not (a_scale.numel() == 1 or tuple(a_scale.shape) == (m, 1)):
        return f"the row scale shaped {tuple(a_scale.shape)} is not (M, 1)"
    if not (b_scale.numel() == 1 or tuple(b_scale.shape) == (1, n)):
        return f"the column scale shaped {tuple(b_scale.shape)} is not (1, N)"
    return None


def check_rescale(match: Match) -> str | None:
    """int32 -> float with per-tensor, per-row or per-column scales [+ (N,) bias]: the accumulator
    converted to the chain's output dtype, and the bias in it."""
    n = _gemm_n(match)
    m = value(match, "a").shape[0]
    (to_float,) = _nodes(match, prims.convert_element_type.default)
    out_dtype = match.output_node().meta["val"].dtype
    if to_float.args[1] not in RESCALE_DTYPES or out_dtype != to_float.args[1]:
        return f"the int32 accumulator is converted to {to_float.args[1]} and the chain returns {out_dtype}"
    scale = value(match, "scale")
    if scale is not None:
        per_row = scale.ndim == 2 and tuple(scale.shape) == (m, 1)
        if not (per_row or _varies_only_along_last_dim(scale, n)):
            return f"the scale shaped {tuple(scale.shape)} is neither per tensor, per row nor per column"
        if scale.ndim > 2:
            return "the scale has more than two dimensions"
    a_scale, b_scale = value(match, "a_scale"), value(match, "b_scale")
    if a_scale is not None and (reason := _outer_scales_reason(a_scale, b_scale, m, n)) is not None:
        return reason
    bias = value(match, "bias")
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) not in ((n,), (1, n))):
        return "the bias is not a float (N,) vector"
    if bias is not None and bias.dtype != out_dtype:
        return f"the bias is {bias.dtype} but the chain computes in {out_dtype}"
    return None


def check_rescale_16bit(match: Match) -> str | None:
    """x16(f32(int32) * f32(a_scale * b_scale)) [+ bias]: per-row and per-column scales, the scales, the
    result and the bias in one 16-bit dtype, both products in float32."""
    n = _gemm_n(match)
    m = value(match, "a").shape[0]
    out_dtype = match.output_node().meta["val"].dtype
    if out_dtype not in (torch.float16, torch.bfloat16):
        return f"the chain returns {out_dtype}, not a 16-bit float"
    converts = [node.args[1] for node in _nodes(match, prims.convert_element_type.default)]
    if converts.count(torch.float32) != 2 or converts.count(out_dtype) != 1:
        return f"the chain converts to {[str(d) for d in converts]}, not accumulator and scales to float32"
    a_scale, b_scale = value(match, "a_scale"), value(match, "b_scale")
    if a_scale.dtype != out_dtype or b_scale.dtype != out_dtype:
        return f"the scales are {a_scale.dtype} / {b_scale.dtype} but the chain returns {out_dtype}"
    if (reason := _outer_scales_reason(a_scale, b_scale, m, n)) is not None:
        return reason
    bias = value(match, "bias")
    if bias is not None and (bias.dtype != out_dtype or tuple(bias.shape) not in ((n,), (1, n))):
        return f"the bias ({bias.dtype}, {tuple(bias.shape)}) is not a {out_dtype} (N,) vector"
    return None


def _weight_only_operands_reason(match: Match) -> str | None:
    """What the weight-only rules share: an int8 or float8 (N, K) weight transposed, a per-output-channel
    scale, a bias of x's dtype."""
    x, w, scale = value(match, "x"), value(match, "w"), value(match, "scale")
    if w.dtype not in (torch.int8, *FLOAT8_DTYPES) or w.ndim != 2 or x.ndim != 2:
        return f"the weight is {w.dtype} {w.ndim}-d (int8 or float8 2-d needed), the input {x.ndim}-d"
    # The patterns' permute dims are wildcards: an identity permute of a square weight would match too.
    for permute in _nodes(match, aten.permute.default):
        if [dim % 2 for dim in permute.args[1]] != [1, 0]:
            return f"permute dims {list(permute.args[1])} are not a transpose"
    if tuple(scale.shape) != (w.shape[0], 1):
        return f"the weight scale shaped {tuple(scale.shape)} is not per output channel ({w.shape[0]}, 1)"
    bias = value(match, "bias")
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (w.shape[0],)):
        return f"the bias ({bias.dtype}, {tuple(bias.shape)}) is not a {x.dtype} ({w.shape[0]},) vector"
    return None


def check_weight_only(match: Match) -> str | None:
    """x @ (float(w) * scale).T [+ bias]: int8 or float8 (N, K) weight, per-output-channel scale, one float
    dtype."""
    if (reason := _weight_only_operands_reason(match)) is not None:
        return reason
    x, scale = value(match, "x"), value(match, "scale")
    (to_float,) = _nodes(match, prims.convert_element_type.default)
    if x.dtype not in RESCALE_DTYPES or to_float.args[1] != x.dtype or scale.dtype != x.dtype:
        return f"dequantized to {to_float.args[1]} by a {scale.dtype} scale for a {x.dtype} input"
    return None


def check_weight_only_16bit(match: Match) -> str | None:
    """x @ x16(f32(w) * f32(scale)).T [+ bias]: as check_weight_only in a bfloat16 / float16 model whose
    weight is dequantized in float32 (float8 -> 16-bit casts decompose through float32) and rounded to x's
    dtype, the scale in that dtype."""
    if (reason := _weight_only_operands_reason(match)) is not None:
        return reason
    x, w, scale = value(match, "x"), value(match, "w"), value(match, "scale")
    if w.dtype not in FLOAT8_DTYPES:
        return f"a {w.dtype} weight: only float8 ones are dequantized through float32 in a 16-bit model"
    converts = [node.args[1] for node in _nodes(match, prims.convert_element_type.default)]
    if x.dtype not in (torch.float16, torch.bfloat16) or scale.dtype != x.dtype:
        return f"a {scale.dtype} scale for a {x.dtype} input, not one 16-bit dtype"
    if converts.count(torch.float32) != 2 or converts.count(x.dtype) != 1:
        targets = [str(dtype) for dtype in converts]
        return f"the chain converts to {targets}, not weight and scale to float32, then to {x.dtype}"
    return None


def _float8_converts(match: Match) -> list[torch.dtype]:
    converts = (node.args[1] for node in _nodes(match, prims.convert_element_type.default))
    return [dtype for dtype in converts if dtype in FLOAT8_DTYPES]


def float8_activation_dtype(match: Match) -> torch.dtype:
    """The float8 dtype x is rounded to in a float8_dynamic match (check_float8_dynamic: exactly one)."""
    (x_dtype,) = _float8_converts(match)
    return x_dtype


def check_float8_dynamic(match: Match) -> str | None:
    """float8_weight_mm(f32(f8(clamp(x / s, -qmax, qmax))) * s) with s = max(max|x| / qmax, tiny) per row of a
    2-d x: QTensor.quantize(x, float8, axis=0)'s constants for x's dtype (a 16-bit x: the quotient clamped in
    float32 and rounded back, the rows dequantized in float32 and rounded to x's dtype). float8_dynamic_mm
    does not round the dequantized rows to x's dtype: on a 16-bit chain written by hand it is about one 16-bit
    rounding apart, while a quantized model's eager forward calls the op itself (bit-exact). And like eager
    inference, it raises on a non-finite x where the chain compiled by inductor returned NaN rows."""
    x, w_scale, bias = value(match, "x"), value(match, "w_scale"), value(match, "bias")
    if x.ndim != 2 or x.dtype not in RESCALE_DTYPES:
        return f"x is {x.dtype} {x.ndim}-d, not a 2-d float"
    if len(float8 := _float8_converts(match)) != 1:
        return f"x's codes are converted to {[str(d) for d in float8]}, not one float8 dtype"
    x_dtype = float8_activation_dtype(match)
    qmax, tiny = torch.finfo(x_dtype).max, torch.finfo(x.dtype).tiny
    for reduction in (*_nodes(match, aten.amin.default), *_nodes(match, aten.amax.default)):
        if [dim % 2 for dim in reduction.args[1]] != [1] or reduction.args[2] is not True:
            return f"{reduction.target} over dims {reduction.args[1]}, not each row (keepdim)"
    # max|x| / qmax divides the matched peak (x / scale divides x, which may be a maximum of its own) by a
    # constant, unless the graph computes it (then unknown)
    (peak,) = _nodes(match, aten.maximum.default)
    (to_scale,) = (node for node in _nodes(match, aten.div.Tensor) if node.args[0] is peak)
    if isinstance(to_scale.args[1], torch.fx.Node):
        return f"the scale divides max|x| by a computed value ({to_scale.args[1].name}), not a constant"
    (floor,) = (node for node in _nodes(match, aten.clamp_min.default) if node.args[0] is to_scale)
    if to_scale.args[1] != qmax or floor.args[1] != tiny:
        return f"scale = max|x| / {to_scale.args[1]} at least {floor.args[1]}, not / {qmax} at least {tiny}"
    (low,) = (node for node in _nodes(match, aten.clamp_min.default) if node is not floor)
    (high,) = _nodes(match, aten.clamp_max.default)
    if low.args[1] != -qmax or high.args[1] != qmax:
        return f"clamp bounds {low.args[1]}, {high.args[1]}, not {-qmax}, {qmax}"
    converts = [node.args[1] for node in _nodes(match, prims.convert_element_type.default)]
    expected = (
        [x_dtype, torch.float32]
        if x.dtype == torch.float32
        else [torch.float32] * 3 + [x.dtype] * 2 + [x_dtype]
    )
    if sorted(map(str, converts)) != sorted(map(str, expected)):
        return f"the chain converts to {[str(d) for d in converts]}, not {[str(d) for d in expected]}"
    if w_scale.ndim != 1 or (bias is not None and bias.dtype != x.dtype):
        return f"a {w_scale.ndim}-d weight scale or a {getattr(bias, 'dtype', None)} bias for a {x.dtype} x"
    return None


def check_relu_bound(match: Match) -> str | None:
    """clamp_min(int8, 0) is a relu only with the bound 0."""
    (clamp_min,) = _nodes(match, aten.clamp_min.default)
    return None if clamp_min.args[1] == 0 else f"clamp_min bound {clamp_min.args[1]} is not a relu"


def check_sink_requantize(match: Match) -> str | None:
    (reshape,) = _nodes(match, aten.reshape.default) or _nodes(match, aten.view.default)
    if reshape.args[0].target is not torch.ops.quanto_fx.int8_mm_requantize.default:
        return "the reshape does not follow a fused requantize"
    return check_relu_bound(match)


def check_sink_rescale(match: Match) -> str | None:
    (reshape,) = _nodes(match, aten.reshape.default) or _nodes(match, aten.view.default)
    if reshape.args[0].target is not torch.ops.quanto_fx.int8_mm_rescale.default:
        return "the reshape does not follow a fused rescale"
    return None


def always(match: Match) -> str | None:
    return None
