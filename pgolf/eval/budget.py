"""Sizing the TTT plan to an eval-time budget from a short, legal calibration.

:func:`measure_rates` times no-grad forwards and forward+backward passes of the model on SYNTHETIC random tokens
(every batch goes through :func:`pgolf.eval.ledger.assert_not_validation` with context 'ttt_calibration', so
feeding it validation tokens raises) and restores the model's gradients; it never steps an optimizer, so the
weights are untouched. It doubles as the TTT compile warm-up.

:func:`plan_ttt` turns those rates into the largest chunked-TTT plan (epochs, chunk size) whose predicted time
fits ``target_seconds``; :func:`estimate_lora_seconds` predicts the per-document LoRA TTT cost.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pgolf.eval.scoring import autocast_for, model_device
from pgolf.eval.ledger import assert_not_validation


@dataclass
class MeasuredRates:
    """Per-rank throughputs measured on synthetic tokens."""

    forward_tokens_per_s: float  # no-grad forward (scoring)
    train_tokens_per_s: float  # forward + backward (adaptation)
    step_seconds: float = 0.0  # fixed cost per optimizer step (all-reduce, clip, update), if measured
    seconds: float = 0.0  # how long the calibration took
    seq_len: int = 0
    batch_seqs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_rates(model: nn.Module, *, seq_len: int, batch_seqs: int, iters: int = 2, warmup: int = 1,
                  vocab_size: int | None = None, autocast_dtype: torch.dtype | None = None, seed: int = 0,
                  batches: Iterable[Tensor] | None = None) -> MeasuredRates:
    """Time ``iters`` no-grad forwards and ``iters`` forward+backward passes on (batch_seqs, seq_len) inputs.

    ``batches`` (optional) supplies the (B, seq_len + 1) token batches; by default they are uniform random tokens
    from a seeded generator. Every batch is checked by :func:`assert_not_validation` first. The model's weights
    are never changed and its ``.grad`` fields are restored.
    """
    device = model_device(model)
    V = vocab_size or model.config.vocab_size
    gen = torch.Generator().manual_seed(seed + 7919)
    src = iter(batches) if batches is not None else None
    step = [0]

    def next_batch() -> Tensor:
        b = next(src) if src is not None else torch.randint(0, V, (batch_seqs, seq_len + 1), generator=gen)
        assert_not_validation(b, context="ttt_calibration", step=step[0])
        step[0] += 1
        return b.to(device=device, dtype=torch.int64)

    saved = [(p, p.grad) for p in model.parameters()]
    was_training = model.training
    t_all = time.perf_counter()
    try:
        fwd_t = 0.0
        fwd_tok = 0
        model.eval()
        with torch.no_grad():
            for i in range(warmup + iters):
                b = next_batch()
                _sync(device)
                t0 = time.perf_counter()
                with autocast_for(device, autocast_dtype):
                    model.loss(b[:, :-1], b[:, 1:], reduction="none")
                _sync(device)
                if i >= warmup:
                    fwd_t += time.perf_counter() - t0
                    fwd_tok += b[:, :-1].numel()
        train_t = 0.0
        train_tok = 0
        model.train()
        for i in range(warmup + iters):
            b = next_batch()
            _sync(device)
            t0 = time.perf_counter()
            with autocast_for(device, autocast_dtype):
                loss = model.loss(b[:, :-1], b[:, 1:])
            loss.backward()
            _sync(device)
            if i >= warmup:
                train_t += time.perf_counter() - t0
                train_tok += b[:, :-1].numel()
            for p in model.parameters():
                p.grad = None
    finally:
        for p, g in saved:
            p.grad = g
        model.train(was_training)
    return MeasuredRates(forward_tokens_per_s=fwd_tok / max(fwd_t, 1e-9),
                         train_tokens_per_s=train_tok / max(train_t, 1e-9), seconds=time.perf_counter() - t_all,
                         seq_len=seq_len, batch_seqs=batch_seqs)


@dataclass
class TTTPlan:
    """A chunked-TTT plan and its predicted cost (seconds, per rank)."""

    epochs: int
    chunk_tokens: int
    predicted_seconds: float
    score_seconds: float
    train_seconds: float
    fixed_seconds: float
    target_seconds: float
    fits: bool
    n_chunks: int
    n_windows: int
    candidates: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def settings_overrides(self) -> dict[str, Any]:
        """The overrides to pass to :class:`pgolf.eval.ttt.TTTSettings`."""
        return {"epochs": self.epochs, "chunk_tokens": self.chunk_tokens}


def _n_windows(n_tokens: int, window: int, stride: int) -> int:
    m = n_tokens - window + stride
    return max(1, -(-m // stride)) if m > 0 else 1


def plan_ttt(target_seconds: float, measured_rates: MeasuredRates | dict, n_tokens: int, *, window: int = 2048,
             stride: int = 64, seq_len: int = 2048, chunk_tokens: Sequence[int] | int = (32_768,),
             max_epochs: int = 3, world_size: int = 1, safety: float = 0.9,
             fixed_seconds: float = 0.0) -> TTTPlan:
    """The largest ``epochs`` (≤ max_epochs; ties → the first listed chunk size) with predicted time ≤
    ``safety · target_seconds``.

    Predicted time = fixed_seconds + scoring (every sliding window's ``window`` tokens at the forward rate, split
    over ranks) + epochs · (training tokens of the C − 1 trained chunks at the train rate, split over ranks, plus
    ``step_seconds`` per optimizer step). ``fits`` is False when not even 0 epochs fits (the plan is then 0 epochs).
    """
    r = measured_rates if isinstance(measured_rates, MeasuredRates) else MeasuredRates(**measured_rates)
    chunks = [chunk_tokens] if isinstance(chunk_tokens, int) else list(chunk_tokens)
    budget = safety * float(target_seconds)
    n_win = _n_windows(n_tokens, window, stride)
    score_s = n_win * min(window, n_tokens) / r.forward_tokens_per_s / world_size
    cands = []
    for S in chunks:
        C = max(1, math.ceil(n_tokens / S))
        trained = 0
        for c in range(C - 1):
            length = min(S, n_tokens - c * S)
            trained += (length // seq_len) * seq_len
        per_epoch = trained / r.train_tokens_per_s / world_size + (C - 1) * r.step_seconds
        for e in range(max_epochs, -1, -1):
            total = fixed_seconds + score_s + e * per_epoch
            cands.append({"chunk_tokens": S, "epochs": e, "n_chunks": C, "predicted_seconds": total,
                          "train_seconds": e * per_epoch, "fits": total <= budget})
    fitting = [c for c in cands if c["fits"]]
    if fitting:
        best_e = max(c["epochs"] for c in fitting)
        best = next(c for c in fitting if c["epochs"] == best_e)
        fits = True
    else:
        best = next(c for c in cands if c["epochs"] == 0)
        fits = False
    return TTTPlan(epochs=best["epochs"], chunk_tokens=best["chunk_tokens"],
                   predicted_seconds=best["predicted_seconds"],
                   score_seconds=score_s, train_seconds=best["train_seconds"], fixed_seconds=fixed_seconds,
                   target_seconds=float(target_seconds), fits=fits, n_chunks=best["n_chunks"], n_windows=n_win,
                   candidates=cands)


def estimate_lora_seconds(doc_lengths: Sequence[int] | np.ndarray, measured_rates: MeasuredRates | dict, *,
                          chunk: int = 48, window: int = 2048, world_size: int = 1) -> float:
    """Predicted per-document LoRA TTT time: every chunk of every document runs a forward over its window (at the
    train rate: the forward keeps activations for the backward) — an upper bound (the last chunk of a document
    needs no backward) that ignores adapter overhead and padding."""
    r = measured_rates if isinstance(measured_rates, MeasuredRates) else MeasuredRates(**measured_rates)
    lens = np.asarray(doc_lengths, dtype=np.int64)
    total = 0
    for n in lens:
        ends = np.minimum(np.arange(1, -(-int(n) // chunk) + 1) * chunk, n)
        total += int(np.minimum(ends, window).sum())
    return total / r.train_tokens_per_s / world_size
