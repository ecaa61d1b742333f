"""The ``quanto_fx`` op library fragment that every fused op is defined and implemented in."""

import functools

import torch

# Plain torch.library registrations, not custom_op: custom_op's Python autograd wrapper and register_kernel's
# dynamo guard cost ~40 us and ~15 us a call on the CPU machine, right after a GEMM has flushed the caches,
# against ~8 us here; at M = 1 that decides whether the fused op beats the unfused chain. Inference ops: no
# autograd formula. The ops are opaque to inductor either way.
LIB = torch.library.Library("quanto_fx", "FRAGMENT")
TAGS = (torch.Tag.pt2_compliant_tag,)


def eager_caller(op: torch._ops.OpOverload):
    """``op`` as a callable for eager calls on plain tensors, run by the dispatcher exactly as ``op(...)`` is
    (every dispatch key: autograd, dispatch modes, the profiler), without ``torch.ops``' Python-side scan of
    the arguments for ``__torch_function__`` overrides. That scan costs ~0.3 us per non-tensor argument (an
    isinstance check through torch.Tensor's metaclass), ~0.7 us of a 128 -> 64 int4 layer's ~7 us. Only for
    plain tensors with no TorchFunctionMode active: the mode or a subclass's ``__torch_function__`` would not
    see the call."""
    handle = torch._C._dispatch_find_schema_or_throw(op._schema.name, op._schema.overload_name)
    return functools.partial(torch._C._dispatch_call_boxed, handle)
