"""Helpers shared by the kernel test modules."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def saved_activation_bytes(fn: Callable, inputs: Sequence[Tensor]
                           ) -> tuple[int, list[tuple[tuple[int, ...], torch.dtype]]]:
    """Bytes of distinct storages saved for backward by fn(*inputs), excluding the inputs' own storages,
    and the (shape, dtype) of each."""
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}
    shapes = []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_ptrs and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
            shapes.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values()), shapes


def assert_fullgraph_matches_eager(f: Callable, leaves: Sequence[Tensor]) -> None:
    """f(*leaves) traces with no graph break, and its compiled (aot_eager) value and gradients equal eager's.

    Call inside the ``use_backend`` block that selects the kernel under test."""
    explained = torch._dynamo.explain(f)(*leaves)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves)
    eager = f(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
