"""The ``quanto_fx`` op library fragment that every fused op is defined and implemented in."""

import torch

# Plain torch.library registrations, not custom_op: custom_op's Python autograd wrapper and register_kernel's
# dynamo guard cost ~40 us and ~15 us a call on the CPU machine, right after a GEMM has flushed the caches,
# against ~8 us here; at M = 1 that decides whether the fused op beats the unfused chain. Inference ops: no
# autograd formula. The ops are opaque to inductor either way.
LIB = torch.library.Library("quanto_fx", "FRAGMENT")
TAGS = (torch.Tag.pt2_compliant_tag,)
