"""Helpers shared by the kernel test modules."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

F64 = torch.float64
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# epsilon of the error rule, in unit roundoffs of the output's scale. fp32 gets 4: there the reference's own
# error is a few ulps, and the CE kernels build tanh from exp (≤ 3 ulp against torch.tanh's ≤ 1.3 ulp).
EPS_UNITS = {torch.float32: 4.0, torch.float16: 1.0, torch.bfloat16: 1.0}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_error_within(name: str, got: Tensor, ref: Tensor, exact: Tensor, *, factor: float = 2.0) -> None:
    """max|got − exact| ≤ factor·max|ref − exact| + EPS_UNITS·u(got.dtype)·max|exact|; no NaN/inf in got."""
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} non-finite values (unwritten?)"
    exact = exact.to(F64)
    e_k = (got.to(F64) - exact).abs().max().item()
    e_r = (ref.to(F64) - exact).abs().max().item()
    eps = EPS_UNITS[got.dtype] * UNIT_ROUNDOFF[got.dtype] * exact.abs().max().item()
    assert e_k <= factor * e_r + eps, (f"{name} ({got.dtype}): kernel error {e_k:.3e} > {factor}× reference error "
                                       f"{e_r:.3e} + {eps:.3e}")


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
