"""The compliance guard: validation tokens never reach training, a compile warm-up or GPTQ calibration.

This module sits below both :mod:`pgolf.quant` (GPTQ calibration) and :mod:`pgolf.eval` (the ledger, TTT), so the
trainer and the quantizer use the guard without importing the evaluation package (and a packed ``train_gpt.py``
does not carry the ledger).

- :class:`ValidationTokens`: a tensor subclass flagging validation data; slicing, indexing, copies, device moves
  and reshapes keep the flag, so it follows the data into derived batches. :func:`mark_validation` flags,
  :func:`strip_validation` drops the flag (scoring code does so once at its entry), :func:`is_validation` tests.
- :func:`assert_not_validation`: call it on every batch of a warm-up, a calibration pass or a training step. It
  raises :class:`ComplianceViolation` when explicit validation ``positions`` are given, when the batch carries the
  flag, or, while a ledger with a fingerprint of the validation stream is active (:func:`set_active_ledger`, set by
  :mod:`pgolf.eval.ttt`), when the batch holds a long verbatim run of validation tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor


class ComplianceViolation(RuntimeError):
    """A validation token was used illegally. Attributes name what, where and when.

    kind: 'adapt_before_score' | 'rescore' | 'val_in_<context>' | 'bad_range' | 'unscored_at_end' | ...
    position: target index t (token ``t + 1``), or the token position for provenance checks; None if unknown.
    step: event id / step number at which it happened (None if unknown). label: the step's description.
    """

    def __init__(self, kind: str, message: str, *, position: int | None = None, step: int | None = None,
                 label: str | None = None):
        self.kind, self.position, self.step, self.label = kind, position, step, label
        where = []
        if position is not None:
            where.append(f"position {position}")
        if step is not None:
            where.append(f"step {step}")
        if label:
            where.append(f"({label})")
        super().__init__(f"[{kind}] {message}" + (f" — at {' '.join(where)}" if where else ""))


class ValidationTokens(Tensor):
    """A tensor subclass marking validation data. Ops on it (slicing, indexing, ``clone``, ``to``, ``cat`` with
    other tensors, reshapes) return ``ValidationTokens`` too, so the flag follows the data into derived batches.

    Scoring code calls :func:`strip_validation` once at its entry (the one place validation tokens are allowed)
    so model compute runs on plain tensors.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def mark_validation(tokens: Tensor) -> ValidationTokens:
    """The same data flagged as validation tokens (no copy)."""
    return torch.as_tensor(tokens).as_subclass(ValidationTokens)


def is_validation(t: Any) -> bool:
    """True for a tensor carrying the validation flag (or a list/tuple/dict containing one)."""
    if isinstance(t, ValidationTokens):
        return True
    if isinstance(t, (list, tuple)):
        return any(is_validation(x) for x in t)
    if isinstance(t, dict):
        return any(is_validation(x) for x in t.values())
    for attr in ("x", "y", "input_ids", "tokens"):  # batch objects (e.g. PackedBatch)
        v = getattr(t, attr, None)
        if isinstance(v, Tensor) and isinstance(v, ValidationTokens):
            return True
    return False


def strip_validation(t: Tensor) -> Tensor:
    """A plain ``torch.Tensor`` view of ``t`` (drops the flag; no copy)."""
    return t.as_subclass(Tensor) if isinstance(t, ValidationTokens) else t


def assert_not_validation(batch: Any = None, *, context: str, step: int | None = None,
                          positions: Sequence[int] | np.ndarray | Tensor | None = None) -> None:
    """Raise :class:`ComplianceViolation` if validation tokens reach ``context``.

    Call it on every batch of a compile warm-up, a GPTQ calibration pass, a training step or a TTT timing run:
    ``assert_not_validation(x, context="gptq_calibration", step=i)``. It raises when ``positions`` (validation
    token positions the caller is about to use) is non-empty, when ``batch`` carries the
    :class:`ValidationTokens` flag, or when the active ledger has a fingerprint and ``batch`` contains a verbatim
    run of ``k`` validation tokens (default 64).
    """
    led = active_ledger()
    if led is not None:
        led.guard(batch, context=context, step=step, positions=positions)
    else:
        _guard(batch, context=context, step=step, positions=positions, fingerprint=None)


_ACTIVE: list[Any] = []


def set_active_ledger(ledger: Any | None) -> None:
    """Make ``ledger`` (a :class:`pgolf.eval.ledger.Ledger`) the one :func:`assert_not_validation` consults for a
    content fingerprint (None clears)."""
    _ACTIVE.clear()
    if ledger is not None:
        _ACTIVE.append(ledger)


def active_ledger() -> Any | None:
    """The ledger set by :func:`set_active_ledger`, or None."""
    return _ACTIVE[0] if _ACTIVE else None


def _guard(batch: Any, *, context: str, step: int | None, positions, fingerprint: Any | None) -> None:
    """The checks of :func:`assert_not_validation`; ``fingerprint``: a ledger's ``Fingerprint`` (``k``, ``find``)."""
    kind = f"val_in_{context}"
    if positions is not None:
        pos = np.asarray(positions.cpu() if isinstance(positions, Tensor) else positions).reshape(-1)
        if pos.size:
            raise ComplianceViolation(kind, f"validation token position {int(pos[0])} ({pos.size} positions) would "
                                      f"reach {context}", position=int(pos[0]), step=step, label=context)
    if batch is None:
        return
    if is_validation(batch):
        where = None
        if fingerprint is not None and isinstance(batch, Tensor):
            hit = fingerprint.find(strip_validation(batch).detach().cpu().numpy())
            where = hit[1] if hit else None
        raise ComplianceViolation(kind, f"a tensor derived from the validation tokens (provenance flag) reached "
                                  f"{context}" + ("" if where is not None else "; position unknown"),
                                  position=where, step=step, label=context)
    if fingerprint is not None:
        tensors = [batch] if isinstance(batch, (Tensor, np.ndarray)) else \
            [v for v in (batch if isinstance(batch, (list, tuple)) else []) if isinstance(v, (Tensor, np.ndarray))]
        for t in tensors:
            arr = t.detach().cpu().numpy() if isinstance(t, Tensor) else t
            if not np.issubdtype(arr.dtype, np.integer) or arr.shape[-1] < fingerprint.k:
                continue
            hit = fingerprint.find(arr)
            if hit is not None:
                raise ComplianceViolation(kind, f"the batch holds a verbatim run of {fingerprint.k} validation tokens "
                                          f"(batch offset {hit[0]}) in {context}", position=hit[1], step=step,
                                          label=context)


__all__ = ["ComplianceViolation", "ValidationTokens", "mark_validation", "is_validation", "strip_validation",
           "assert_not_validation", "set_active_ledger", "active_ledger"]
