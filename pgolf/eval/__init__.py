"""Validation evaluation: exact bits-per-byte over the validation stream.

- :func:`evaluate`: plain eval over non-overlapping windows of ``seq_len`` (each target sees only its window).
- :func:`evaluate_sliding`: sliding-window eval (window 2048, stride 64 in the records); every target is scored
  exactly once with at least ``window − stride`` tokens of context. :func:`window_plan` lists its windows.

Both return an :class:`EvalResult` with ``val_loss`` (nats/token) and ``val_bpb = Σ nll / (ln 2 · Σ bytes)``, the
sums taken in float64 and all-reduced across ranks. The model must expose
``model.loss(input_ids, target_ids, *, cu_seqlens=None, max_seqlen=None, reduction='none')`` returning per-token nll.
"""

from pgolf.eval.bpb import EvalResult, evaluate
from pgolf.eval.sliding import evaluate_sliding, window_plan

__all__ = ["EvalResult", "evaluate", "evaluate_sliding", "window_plan"]
