"""The one aten-op handler table of QTensor, and the per-op fallback counter.

A handler is ``fn(func, args, kwargs)`` returning the result, or ``NotImplemented`` when it cannot keep the
computation in integers for these arguments; QTensor then dequantizes and runs the op in float (the
fallback), which is always correct, and counts it here.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import torch

Handler = Callable[[torch._ops.OpOverload, tuple, dict], object]

HANDLERS: dict[torch._ops.OpOverloadPacket, Handler] = {}
# Ops whose handlers move values without computing on them: they also take float8 data.
LAYOUT_OPS: set[torch._ops.OpOverloadPacket] = set()

_fallbacks: Counter[str] = Counter()
_fallbacks_lock = threading.Lock()


def register_handler(*ops: torch._ops.OpOverloadPacket, layout: bool = False) -> Callable[[Handler], Handler]:
    """Decorator: handle every overload of the given aten ops with the decorated function.

    ``layout=True`` marks handlers that only move values (views, copies), valid for float8 data too.
    """

    def decorator(fn: Handler) -> Handler:
        for op in ops:
            if op in HANDLERS:
                raise RuntimeError(f"{op} already has a QTensor handler: {HANDLERS[op].__name__}")
            HANDLERS[op] = fn
            if layout:
                LAYOUT_OPS.add(op)
        return fn

    return decorator


def count_fallback(func: torch._ops.OpOverload | str) -> None:
    """Count one float fallback of an aten op (or of a named integer step, e.g. "int32_bias")."""
    name = func if isinstance(func, str) else func.overloadpacket.__name__
    with _fallbacks_lock:
        _fallbacks[name] += 1


def fallback_counts() -> dict[str, int]:
    """How many times each aten op ran through the dequantize fallback since the last reset."""
    with _fallbacks_lock:
        return dict(_fallbacks)


def reset_fallback_counts() -> None:
    """Forget the fallback counts."""
    with _fallbacks_lock:
        _fallbacks.clear()
