"""FLOPs per scored token of sliding-window eval, counted on the code path that runs (``pgolf-bench eval``).

One batch of later sliding windows (each scores its last ``stride`` positions) goes through
:class:`pgolf.eval.scoring.WindowScorer` twice under :class:`torch.utils.flop_counter.FlopCounterMode`: the fast
path (head on the scored rows only) and the full-head path (head on every position, then masked), and the trunk
alone once. trunk = the trunk's count; head = a path's count minus the trunk's; each divided by the scored tokens.
The ops are the PyTorch references (``PGOLF_KERNELS=reference`` inside), so a fused Triton kernel cannot hide its
work from the counter; the numbers are exact for the model and shapes, on any device.

Attention is counted by torch's SDPA formula, which counts the full T×T score matrix (not its causal half), the
same on CPU (a formula for the CPU SDPA op is registered here: torch has one only for the GPU ops).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from pgolf.data.tokenizer import ByteTables


def flops_per_scored_token(model, tables: ByteTables, *, window: int, stride: int, batch: int = 1,
                           device: torch.device | None = None) -> dict[str, Any]:
    """{'trunk', 'head', 'head_full', 'total', 'total_full'} FLOPs per scored token, the head rows per scored token
    of each path, and the head's share of the work. ``batch`` windows of ``window`` tokens, ``stride`` scored each."""
    from pgolf import kernels
    from pgolf.eval.scoring import WindowScorer

    _register_cpu_sdpa()
    device = device or next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (window + 1,), generator=g).to(device)
    s = torch.zeros(batch, dtype=torch.int64, device=device)
    ln = torch.full_like(s, window)
    off = torch.full_like(s, window - stride)
    counts = {}
    with torch.no_grad(), kernels.use_backend("reference"):
        for name, gather in (("fast", True), ("full", False)):
            scorer = WindowScorer(model, tables.to(device), width=window, batch=batch, gather=gather, device=device)
            x, y, pos, scored, tpos = scorer._inputs(tokens, s, ln, off, stride if gather else window)
            counts[name] = _count(lambda: scorer._batch_rows(x, y, pos, scored, tpos))
            n_scored = int(scored.sum())
        counts["trunk"] = _count(lambda: model.trunk(x))
    trunk = counts["trunk"] / n_scored
    head, head_full = (counts["fast"] - counts["trunk"]) / n_scored, (counts["full"] - counts["trunk"]) / n_scored
    return dict(window=window, stride=stride, scored_tokens=n_scored, trunk=trunk, head=head, head_full=head_full,
                total=trunk + head, total_full=trunk + head_full, head_rows_per_scored_token=1.0,
                head_rows_per_scored_token_full=window / stride, head_share=head / (trunk + head),
                head_share_full=head_full / (trunk + head_full), saving=1 - (trunk + head) / (trunk + head_full),
                counted_with="torch.utils.flop_counter.FlopCounterMode on WindowScorer, reference ops")


def _count(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


_REGISTERED = False


def _register_cpu_sdpa() -> None:
    """Give the CPU flash-attention op the SDPA FLOP formula torch uses for the GPU ones."""
    global _REGISTERED
    if _REGISTERED:
        return
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op.default not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(op)
        def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)
    _REGISTERED = True
