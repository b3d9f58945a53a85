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

# legal score-first TTT, its run-time ledger, the compliance report and TTT budget sizing
from pgolf.eval.budget import MeasuredRates, TTTPlan, estimate_lora_seconds, measure_rates, plan_ttt  # noqa: E402
from pgolf.eval.compliance import ComplianceReport, probe_causality, probe_normalization  # noqa: E402
from pgolf.eval.ledger import (ComplianceViolation, Ledger, LedgerSummary, ValidationTokens,  # noqa: E402
                               assert_not_validation, mark_validation, set_active_ledger)
from pgolf.eval.ttt import TTTResult, TTTSettings, run_ttt  # noqa: E402

__all__ += ["MeasuredRates", "TTTPlan", "estimate_lora_seconds", "measure_rates", "plan_ttt", "ComplianceReport",
            "probe_causality", "probe_normalization", "ComplianceViolation", "Ledger", "LedgerSummary",
            "ValidationTokens", "assert_not_validation", "mark_validation", "set_active_ledger", "TTTResult",
            "TTTSettings", "run_ttt"]
