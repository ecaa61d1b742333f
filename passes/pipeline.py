"""Run the rules over a post-grad graph, stage by stage, and report what was fused and what was not."""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch._inductor.pattern_matcher import (
    CallFunction,
    Match,
    PatternExpr,
    PatternMatcherPass,
    fwd_only,
    gen_pattern,
    register_graph_pattern,
)

from .rules import RULES, STAGES, Rule

log = logging.getLogger("quanto_fx.passes")


# How many times each rule fired in this process (tests and explain() read it).
counters: Counter[str] = Counter()


@dataclass
class GraphReport:
    """What the passes did to one graph."""

    fused: list[dict] = field(default_factory=list)  # {"rule", "stage", "nodes"}
    rejected: list[dict] = field(default_factory=list)  # {"rule", "node", "reason"}: checks that said no
    unfused: list[dict] = field(default_factory=list)  # {"node", "reason"}: int8 GEMMs left as they were
    stages: dict[str, int] = field(default_factory=dict)  # stage -> number of rewrites
    graphs: dict[str, str] = field(default_factory=dict)  # "before", "after_<stage>" -> graph text


_local = threading.local()


FUSION_MODES = (True, "auto")


def _report() -> GraphReport | None:
    return getattr(_local, "report", None)


def _device_reason(rule: Rule, match: Match) -> str | None:
    """Why fusion="auto" leaves this match alone on its device (see ``Rule.auto_devices``), or None."""
    if getattr(_local, "fusion", "auto") != "auto" or rule.auto_devices is None:
        return None
    device = match.output_node().meta["val"].device.type
    if device in rule.auto_devices:
        return None
    return f"on {device}, {rule.auto_reason} (fusion='auto'; fusion=True forces the fused op)"


def _extra_check(rule: Rule, match: Match) -> bool:
    reason = _device_reason(rule, match) or rule.check(match)
    if reason is not None and (report := _report()) is not None:
        report.rejected.append({"rule": rule.name, "node": match.output_node().name, "reason": reason})
        log.debug("rule %s rejected %s: %s", rule.name, match.output_node().name, reason)
    return reason is None


def _rewrite(rule: Rule, match: Match, *args, **kwargs) -> None:
    names = [
        p.name
        for p in inspect.signature(rule.replacement).parameters.values()
        if p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    out = match.output_node().meta["val"]
    matched = [n.name for n in match.nodes]
    replacement = functools.partial(rule.replacement, out=out)
    if "match" in inspect.signature(rule.replacement).parameters:  # constants the pattern cannot pass
        replacement = functools.partial(replacement, match=match)
    match.replace_by_example(replacement, [kwargs[name] for name in names])
    counters[rule.name] += 1
    if (report := _report()) is not None:
        report.fused.append({"rule": rule.name, "stage": rule.stage, "nodes": matched})
    log.debug("rule %s fused %s", rule.name, matched)


def _accept_reshape(pattern: PatternExpr) -> PatternExpr:
    """Let every ``view`` of a traced pattern also match ``reshape``.

    Patterns are traced with decompositions that turn reshape into view, while the post-grad graphs our pass
    sees still hold ``aten.reshape`` for the runtime's reshapes: a rule must match either.
    """
    if isinstance(pattern, CallFunction):
        if torch.ops.aten.view.default in pattern.fns_set:
            pattern.fns = [*pattern.fns, torch.ops.aten.reshape.default]
            pattern.fns_set = type(pattern.fns_set)(pattern.fns)
        for arg in [*pattern.args, *pattern.kwargs.values()]:
            _accept_reshape(arg)
    return pattern


@functools.cache
def stage_pass(stage: str) -> PatternMatcherPass:
    """The pattern-matcher pass of one stage, built once per process from the rules table."""
    matcher = PatternMatcherPass(pass_name=f"quanto_fx_{stage}")
    for rule in (r for r in RULES if r.stage == stage):
        pattern = _accept_reshape(gen_pattern(rule.pattern, rule.example_inputs(), fwd_only))
        register_graph_pattern(pattern, extra_check=functools.partial(_extra_check, rule), pass_dict=matcher)(
            functools.partial(_rewrite, rule)
        )
    return matcher


# How far below an int8 GEMM a rule's chain may end (the longest, requantize_bias_3d, spans 9 nodes).
_CHAIN_DEPTH = 10


def _unfused_reason(node: torch.fx.Node, rejected: dict[str, str]) -> str:
    users = list(node.users)
    if len(users) != 1:
        return f"its int32 result has {len(users)} users; fusing would compute the GEMM twice"
    # The rejected match's output is where its chain ends: up to a requantization's final int8 cast.
    frontier = users
    for _ in range(_CHAIN_DEPTH):
        for candidate in frontier:
            if candidate.name in rejected:
                return rejected[candidate.name]
        frontier = list(dict.fromkeys(user for candidate in frontier for user in candidate.users))
    consumer = users[0]
    return f"its consumer {consumer.target} starts no chain that a rule covers"


def run_passes(
    graph: torch.fx.Graph,
    report: GraphReport | None = None,
    keep_graphs: bool = False,
    fusion: bool | str = "auto",
) -> GraphReport:
    """Apply every stage in order to ``graph`` (in place); returns the report.

    ``fusion="auto"`` applies each rule on the devices where its fused op is the faster code
    (``Rule.auto_devices``: the int8 GEMM rules on CUDA only); ``True`` applies every rule everywhere.
    """
    if fusion not in FUSION_MODES or not isinstance(fusion, (bool, str)):
        raise ValueError(f"fusion must be True or 'auto', got {fusion!r}")
    report = report or GraphReport()
    _local.report, _local.fusion = report, fusion
    try:
        if keep_graphs:
            report.graphs["before"] = str(graph)
        for stage in STAGES:
            report.stages[stage] = stage_pass(stage).apply(graph)
            if keep_graphs:
                report.graphs[f"after_{stage}"] = str(graph)
    finally:
        _local.report, _local.fusion = None, "auto"
    rejected = {r["node"]: r["reason"] for r in report.rejected}
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten._int_mm.default):
        report.unfused.append({"node": node.name, "reason": _unfused_reason(node, rejected)})
    graph.lint()
    return report
