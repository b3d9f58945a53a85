"""Sliding-window eval: every target scored exactly once, with at least ``window − stride`` tokens of context.

Window starts run ``ws = 0, stride, 2·stride, ...`` while ``ws + window − stride < N`` (N targets). Each window
covers targets ``[ws, min(ws + window, N))``, so only the last one can be shorter than ``window``. The first window
scores all its positions; every later window scores its positions from offset ``window − stride`` on (its last
``stride`` positions, or fewer for a short last window). The scored ranges therefore tile ``[0, N)`` exactly and each
target after the first window sees at least ``window − stride`` tokens of context.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from pgolf.data.tokenizer import ByteTables
from pgolf.eval.bpb import EvalResult, _finish, _prepare_tokens, _rank_slice, _resolve_rank, _score_plan
from pgolf.eval.scoring import model_device


def _plan_tensors(n_targets: int, window: int, stride: int, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """(starts, ends, first_scored_offsets) as int64 tensors; checks the exactly-once tiling."""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 1 and 1 <= stride <= window, got window={window}, stride={stride}")
    if n_targets <= 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty.clone(), empty.clone()
    # number of k >= 0 with k·stride + window − stride < N; the window at 0 always exists
    m = n_targets - window + stride
    count = max(1, -(-m // stride)) if m > 0 else 1
    starts = torch.arange(count, dtype=torch.int64, device=device) * stride
    ends = torch.clamp(starts + window, max=n_targets)
    offsets = torch.full_like(starts, window - stride)
    offsets[0] = 0
    # invariant: the scored ranges [start + offset, end) tile [0, N) in order, each non-empty
    first = starts + offsets
    assert int(first[0]) == 0 and int(ends[-1]) == n_targets, "sliding plan does not span all targets"
    assert bool((first[1:] == ends[:-1]).all()), "sliding plan leaves a gap or scores a target twice"
    assert bool((ends > first).all()), "sliding plan has a window that scores nothing"
    assert int((ends - first).sum()) == n_targets, "sliding plan does not score every target exactly once"
    return starts, ends, offsets


def window_plan(n_targets: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_scored_offset)`` per window over ``n_targets`` targets.

    The window feeds inputs ``tokens[start:end]`` and scores targets ``start + first_scored_offset .. end − 1``.
    """
    starts, ends, offsets = _plan_tensors(n_targets, window, stride)
    return list(zip(starts.tolist(), ends.tolist(), offsets.tolist()))


def evaluate_sliding(model: nn.Module, val_tokens: Tensor, tables: ByteTables, *, window: int = 2048,
                     stride: int = 64, batch_windows: int | str = 32, doc_isolated: bool = False, bos_id: int = 1,
                     rank: int | None = None, world_size: int | None = None,
                     autocast_dtype: torch.dtype | None = None, reduce: bool = True, scored_rows_only: bool = True,
                     compile: bool = False, cuda_graphs: bool = False) -> EvalResult:
    """Sliding-window eval over all ``N = len(val_tokens) − 1`` targets (see the module docstring for the plan).

    Windows go ``batch_windows`` per forward as ``(B, window)`` (the short last window is padded at its end), or,
    with ``doc_isolated``, flattened to ``(1, B·window)`` with cu_seqlens at window starts and BOS positions. The
    plan is split contiguously across ranks; ``reduce=False`` returns this rank's partial sums. ``batch_windows=
    'auto'``: the largest batch whose forward fits in GPU memory (:func:`pgolf.eval.scoring.fit_batch`). The head and loss
    run on the scored rows only (``scored_rows_only=False``: on every position, then masked, the old path);
    ``compile`` / ``cuda_graphs`` as in :class:`pgolf.eval.scoring.WindowScorer`, warmed up before the clock starts.
    """
    if batch_windows == "auto":
        from pgolf.eval.scoring import fit_batch

        batch_windows = fit_batch(model, min(window, max(len(val_tokens) - 1, 1)), doc_isolated=doc_isolated,
                                  autocast_dtype=autocast_dtype, vocab_size=model.config.vocab_size)
    if not isinstance(batch_windows, int) or batch_windows < 1:
        raise ValueError(f"need batch_windows >= 1 or 'auto', got {batch_windows!r}")
    t0 = time.perf_counter()
    rank, world_size = _resolve_rank(rank, world_size)
    device = model_device(model)
    tokens = _prepare_tokens(val_tokens, device)
    n_targets = max(tokens.numel() - 1, 0)
    starts, ends, offsets = _plan_tensors(n_targets, window, stride)
    n_windows = starts.numel()
    lo, hi = _rank_slice(n_windows, rank, world_size)
    tables = tables.to(device)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    sums, warm, gathered = _score_plan(model, tokens, tables, starts[lo:hi], (ends - starts)[lo:hi], offsets[lo:hi],
                                       width=min(window, n_targets) if n_targets else window, batch=batch_windows,
                                       doc_isolated=doc_isolated, bos_id=bos_id, autocast_dtype=autocast_dtype,
                                       gather=scored_rows_only, compile=compile, cuda_graphs=cuda_graphs,
                                       vocab_size=vocab)
    return _finish(*sums, reduce=reduce, rank=rank, world_size=world_size, t0=t0 + warm, mode="sliding",
                   seq_len=window, stride=stride, batch=batch_windows, doc_isolated=doc_isolated, windows=n_windows,
                   scored_rows_only=gathered, warmup_s=warm)
