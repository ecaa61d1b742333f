"""FX graph passes on the post-grad aten graph (installed as quanto_fx.passes).

``run_passes(graph)`` rewrites int8 GEMM chains into the fused ops of ``quanto_fx.kernels`` following the
rules table in ``rules.py``; see README.md for the invariants every pass keeps.
"""

from .pipeline import GraphReport, counters, run_passes
from .rules import RULES, STAGES, Rule

__all__ = ["GraphReport", "RULES", "Rule", "STAGES", "counters", "run_passes"]
