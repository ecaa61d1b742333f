"""Graph-inspection debugging: what dynamo captured, where and why graphs broke, what the passes fused and
why some int8 GEMMs were left alone, which fused kernels are in the generated code, and which ops fell back
to dequantize-and-run-in-float."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import torch

from .compiler import quanto_backend, with_session

log = logging.getLogger("quanto_fx.explain")

# Every quanto_fx op in the generated code: the fused int8 GEMMs and the weight-only / float8 GEMMs.
_FUSED_KERNEL = re.compile(r"torch\.ops\.quanto_fx\.(\w+)\.default\(")


def dump_text(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


def _report_dict(report) -> dict:
    return {k: v for k, v in dataclasses.asdict(report).items() if k != "graphs"}


def dump_graph_report(folder: Path, graph_id: int, report) -> None:
    """Write the graph before and after each pass stage, and the report as JSON."""
    for stage, text in report.graphs.items():
        dump_text(folder, f"graph_{graph_id}_post_grad_{stage}.txt", text)
    dump_text(folder, f"graph_{graph_id}_report.json", json.dumps(_report_dict(report), indent=2))


def format_graph_report(graph_id: int, report) -> str:
    left = len(report.unfused)
    lines = [f"graph {graph_id}: {len(report.fused)} rewrite(s), {left} int8 GEMM(s) left to inductor"]
    lines += [f"  fused   [{f['stage']}] {f['rule']}: {', '.join(f['nodes'][:4])}..." for f in report.fused]
    lines += [f"  left    {u['node']}: {u['reason']}" for u in report.unfused]
    return "\n".join(lines)


@dataclasses.dataclass
class ExplainReport:
    """The result of :func:`explain`; ``print(report)`` gives the readable text, ``to_dict()`` the data."""

    graph_count: int
    graph_breaks: list[dict]
    captured_graphs: list[str]
    pass_reports: list
    fused_kernels: dict[str, int]
    unfused_int_mm_in_code: int
    fallbacks: dict[str, int]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["pass_reports"] = [_report_dict(r) for r in self.pass_reports]
        return out

    def __str__(self) -> str:
        lines = ["quanto_fx explain report", "=" * 24]
        lines.append(f"graphs captured: {self.graph_count}, graph breaks: {len(self.graph_breaks)}")
        for brk in self.graph_breaks:
            lines.append(f"  break: {brk['reason']}" + (f"  at {brk['where']}" if brk["where"] else ""))
        for i, code in enumerate(self.captured_graphs):
            lines.append(f"\n-- captured graph {i} " + "-" * 40)
            lines.append(code.strip())
        lines.append("\n-- fusion " + "-" * 50)
        for i, report in enumerate(self.pass_reports):
            lines.append(format_graph_report(i, report))
            # A rule that refused for the reason a GEMM was left for adds nothing here (to_dict keeps it)
            said = {u["reason"] for u in report.unfused}
            lines += [
                f"  rejected by {r['rule']} at {r['node']}: {r['reason']}"
                for r in report.rejected
                if r["reason"] not in said
            ]
        lines.append("\n-- generated code " + "-" * 42)
        kernels = ", ".join(f"{k} x{v}" for k, v in self.fused_kernels.items()) or "none"
        lines.append(f"fused kernels: {kernels}; aten._int_mm calls left: {self.unfused_int_mm_in_code}")
        lines.append("\n-- dequantize fallbacks (eager run) " + "-" * 24)
        if self.fallbacks:
            lines += [f"  {op}: {n}" for op, n in sorted(self.fallbacks.items(), key=lambda kv: -kv[1])]
        else:
            lines.append("  none: every op on a QTensor ran an integer handler")
        return "\n".join(lines)


def _graph_breaks(model, inputs) -> tuple[int, list[dict]]:
    explained = torch._dynamo.explain(model)(*inputs)
    breaks = []
    for reason in explained.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = f"{frame.filename}:{frame.lineno}" if frame is not None else ""
        breaks.append({"reason": str(reason.reason).strip().splitlines()[0], "where": where})
    return explained.graph_count, breaks


def explain(model, *example_inputs, options: dict | None = None) -> ExplainReport:
    """Compile ``model`` with ``backend="quanto"`` on ``example_inputs`` and report what happened.

    The report lists graph breaks with their reasons and locations, the graphs dynamo captured, every
    rewrite the passes made (and, for each int8 GEMM left alone, the reason), the fused kernels found in
    the generated code, and the ops that fell back to dequantize in an eager run. Runs under no_grad.
    Like ``torch._dynamo.explain`` (which it calls), it resets dynamo: other compiled functions recompile on
    their next call.
    """
    from torch._inductor.utils import run_and_get_code

    from quanto_fx.tensor import fallback_counts, reset_fallback_counts

    with torch.no_grad():
        graph_count, breaks = _graph_breaks(model, example_inputs)
        reset_fallback_counts()
        model(*example_inputs)
        fallbacks = fallback_counts()
        torch._dynamo.reset()  # compile afresh: graphs cached by dynamo's explain would not run our passes
        compiled = torch.compile(model, backend=lambda gm, inputs: quanto_backend(gm, inputs, options))
        (_, codes), session = with_session(run_and_get_code)(compiled, *example_inputs)
    code = "\n".join(codes)
    fused: dict[str, int] = {}
    for name in _FUSED_KERNEL.findall(code):
        fused[name] = fused.get(name, 0) + 1
    return ExplainReport(
        graph_count=graph_count,
        graph_breaks=breaks,
        captured_graphs=session.captured,
        pass_reports=session.reports,
        fused_kernels=fused,
        unfused_int_mm_in_code=code.count("aten._int_mm"),
        fallbacks=fallbacks,
    )
