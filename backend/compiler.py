"""``torch.compile(model, backend="quanto")``: inductor with the quanto_fx fusion passes.

The backend is registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so the name
works after installation without importing quanto_fx first. Do not also call ``register_backend`` here:
dynamo would then fail with "duplicate name: quanto".
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import itertools
import logging
import threading
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

log = logging.getLogger("quanto_fx.backend")


def _package_folder(name: str) -> Path:
    """Where subpackage ``name`` lives: inside the installed package, or (a source checkout, installed
    editable) passes/ at the repository's top beside quanto_fx/kernels/."""
    spec = importlib.util.find_spec(name)
    return Path(next(iter(spec.submodule_search_locations)))


# Every file whose content changes what the pass writes: a change must change the FX-graph-cache key.
_SOURCES = tuple(
    sorted(
        str(p)
        for package in ("quanto_fx.passes", "quanto_fx.kernels")
        for p in _package_folder(package).glob("*.py")
    )
)


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Options of the quanto backend, given as ``torch.compile(..., options={...})``.

    Attributes:
        fusion: "auto" (default) rewrites int8 GEMM chains into the fused ops where those are the faster
            code (CUDA: the Triton kernels; on the CPU inductor fuses the epilogue itself, faster) and int8
            weight-only chains everywhere; True rewrites every chain on every device; False: plain inductor.
        dump_dir: write each graph before and after every pass stage, and a JSON report, to this folder.
        report: print a fusion summary of every compiled graph.
    """

    fusion: bool | str = "auto"
    dump_dir: str | None = None
    report: bool = False

    @classmethod
    def from_dict(cls, options: dict | None) -> BackendOptions:
        options = dict(options or {})
        valid = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown quanto backend option(s) {unknown}; valid options: {sorted(valid)}")
        fusion = options.get("fusion", "auto")
        if not (isinstance(fusion, bool) or fusion == "auto"):
            raise TypeError(f"quanto backend option 'fusion' must be True, False or 'auto', got {fusion!r}")
        if not isinstance(options.get("report", False), bool):
            raise TypeError("quanto backend option 'report' must be a boolean")
        if options.get("dump_dir") is not None:
            options["dump_dir"] = str(options["dump_dir"])
        return cls(**options)

    @property
    def observed(self) -> bool:
        """Whether the passes must run even when a cached compilation exists (to report or dump)."""
        return self.report or self.dump_dir is not None


class Session:
    """Everything the backend saw during one compilation: captured graphs and per-graph pass reports."""

    def __init__(self) -> None:
        self.captured: list[str] = []
        self.reports: list = []


_local = threading.local()
_graph_ids = itertools.count()


def active_session() -> Session | None:
    return getattr(_local, "session", None)


class QuantoGraphPass(CustomGraphPass):
    """The post-grad pass inductor runs: the fusion stages of ``quanto_fx.passes``."""

    def __init__(self, options: BackendOptions, graph_id: int) -> None:
        self.options = options
        self.graph_id = graph_id

    def __call__(self, graph: torch.fx.Graph) -> None:
        from quanto_fx.passes import GraphReport, run_passes

        report = GraphReport()
        if self.options.fusion:
            keep_graphs = self.options.observed or active_session() is not None
            run_passes(graph, report, keep_graphs=keep_graphs, fusion=self.options.fusion)
        self._publish(report)

    def _publish(self, report) -> None:
        if (session := active_session()) is not None:
            session.reports.append(report)
        if self.options.dump_dir is not None:
            from .explain import dump_graph_report

            dump_graph_report(Path(self.options.dump_dir), self.graph_id, report)
        if self.options.report:
            from .explain import format_graph_report

            print(format_graph_report(self.graph_id, report))

    def uuid(self) -> bytes:
        options = repr(sorted(dataclasses.asdict(self.options).items())).encode()
        return hashlib.sha256(get_hash_for_files(_SOURCES) + options).digest()


def quanto_backend(
    gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None
):
    """The dynamo backend: inductor's ``compile_fx`` with the quanto_fx fusion passes.

    ``options`` are :class:`BackendOptions` (``torch.compile(..., options={...})``); ``mode`` is
    ``torch.compile``'s and sets inductor's config for that mode ("reduce-overhead", "max-autotune", ...).
    """
    from torch._inductor.compile_fx import compile_fx

    import quanto_fx.kernels  # noqa: F401  (registers the fused ops the passes write)

    opts = BackendOptions.from_dict(options)
    graph_id = next(_graph_ids)
    if (session := active_session()) is not None:
        session.captured.append(gm.code)
    if opts.dump_dir is not None:
        from .explain import dump_text

        dump_text(Path(opts.dump_dir), f"graph_{graph_id}_captured.py", gm.code)
    patches: dict = {"post_grad_custom_pre_pass": QuantoGraphPass(opts, graph_id)}
    if opts.observed or session is not None:
        patches["fx_graph_cache"] = False  # a cache hit would skip the passes and leave nothing to report
    if mode is not None:
        # torch.compile(mode=...) means for us what it means for inductor (raises on an unknown mode)
        patches.update(torch._inductor.list_mode_options(mode))
    log.debug("compiling graph %d with %s", graph_id, opts)
    return compile_fx(gm, example_inputs, config_patches=patches)


def with_session(fn):
    """Run ``fn`` with a fresh Session active in this thread; returns ``(result, session)``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        session = Session()
        _local.session = session
        try:
            return fn(*args, **kwargs), session
        finally:
            _local.session = None

    return wrapper
