"""The torch.compile backend (installed as quanto_fx.backend): ``backend="quanto"`` and ``explain()``."""

from .compiler import BackendOptions, quanto_backend
from .explain import ExplainReport, explain

__all__ = ["BackendOptions", "ExplainReport", "explain", "quanto_backend"]
