"""Per-row scale rules of the quantizer: pgolf's SDClip and the founding records' absmax, percentile and
percentile-search scales, each applied by round-to-nearest or inside GPTQ.

A rule maps a weight W (N, K) and a bit width b (Q = 2^(b−1) − 1) to fp16 scales s (N,); values are
``q = clamp(round(w/s), ±Q)``:

- ``sdclip``: k·std(row)/Q (pgolf, :func:`pgolf.quant.gptq.sdclip_scales`); ``sdclip_floor``: at least 1/Q, as
  #1499 and #1550 clamp it;
- ``absmax``: absmax(row)/Q; ``absmax_floor``: at least 1/Q (#490's GPTQ, and the records' late-QAT grid);
- ``percentile``: c = the 99.99984th percentile of |row|, s = max(c/Q, 1/Q), and the row is clipped to ±c before
  rounding (the records' int8 tables and embeddings);
- ``percentile_search``: for each c in the 99.9, 99.95, 99.99, 99.999 and 100th percentile of |row|,
  s = max(c/Q, 1/Q); the candidate with the smallest mean squared weight error over the whole tensor wins (the
  first one on a tie). #1148 searches with round-to-nearest, #1406 runs one GPTQ pass per candidate.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from pgolf.quant.gptq import dequantize, qmax, quantize_rtn, sdclip_scales

SCALE_RULES = ("sdclip", "sdclip_floor", "absmax", "absmax_floor", "percentile", "percentile_search")
PERCENTILE = 0.9999984
SEARCH_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)


def quantize_rows(W: Tensor, rule: str, bits: int, k: float,
                  gptq: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
    """(int8 values (N, K), fp16 scales (N,)) of W under ``rule``; ``gptq(scale)`` rounds with GPTQ instead of RTN."""
    if rule == "percentile_search":
        return _search(W, bits, gptq)
    s = rule_scales(W, rule, bits, k)
    if gptq is not None:
        return gptq(s)
    if rule == "percentile":
        clip = _row_quantile(W, PERCENTILE)[:, None]
        return quantize_rtn(torch.maximum(torch.minimum(W.float(), clip), -clip), s, bits), s
    return quantize_rtn(W, s, bits), s


def rule_scales(W: Tensor, rule: str, bits: int, k: float) -> Tensor:
    """fp16 (N,) scales of a single-candidate rule (every rule but 'percentile_search')."""
    Q = qmax(bits)
    W = W.float()
    if rule == "sdclip":
        return sdclip_scales(W, bits, k)
    if rule == "sdclip_floor":
        return (k * W.std(dim=1) / Q).clamp_min(1.0 / Q).to(torch.float16)
    if rule in ("absmax", "absmax_floor"):
        s = W.abs().amax(dim=1) / Q
        s = s.clamp_min(1.0 / Q) if rule == "absmax_floor" else torch.where(s > 0, s, torch.ones_like(s))
        return s.to(torch.float16)
    if rule == "percentile":
        return (_row_quantile(W, PERCENTILE) / Q).clamp_min(1.0 / Q).to(torch.float16)
    raise ValueError(f"unknown scale rule {rule!r}; choose one of {', '.join(SCALE_RULES)}")


def search_candidates(W: Tensor, bits: int) -> list[Tensor]:
    """The five fp16 scale candidates of 'percentile_search', in the records' order."""
    Q = qmax(bits)
    return [(_row_quantile(W.float(), p) / Q).clamp_min(1.0 / Q).to(torch.float16) for p in SEARCH_QUANTILES]


def _search(W: Tensor, bits: int, gptq) -> tuple[Tensor, Tensor]:
    best, best_err = None, float("inf")
    for s in search_candidates(W, bits):
        q, s = gptq(s) if gptq is not None else (quantize_rtn(W, s, bits), s)
        err = float((W.float() - dequantize(q, s)).pow(2).mean())
        if err < best_err:
            best, best_err = (q, s), err
    return best


def _row_quantile(W: Tensor, p: float) -> Tensor:
    """The p-quantile of |row| per row (p = 1: the row's absmax). W: (N, K) fp32 → (N,)."""
    a = W.abs()
    return a.amax(dim=1) if p >= 1.0 else torch.quantile(a, p, dim=1)


__all__ = ["SCALE_RULES", "PERCENTILE", "SEARCH_QUANTILES", "quantize_rows", "rule_scales", "search_candidates"]
