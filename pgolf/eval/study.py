"""``python -m pgolf.eval --study prequant-ttt``: what pre-quantization TTT on the validation tokens buys, measured as a
study, never as a record.

#1406, #1499 and #1550 fine-tuned their trained (pre-quantization) model on every validation token for several
epochs, then quantized and scored it (#1550: "Non-record", a self-declared condition-3 violation; the number it
reported is the gain over the legal score of the same artifact). This reproduces that measurement openly:

1. the legal score: the given artifact, sliding-window eval through the ledger;
2. the study: the run's pre-quantization checkpoint adapted with AdamW on all validation sequences
   (``epochs``, cosine per epoch down to ``min_lr_frac``, gradient clip, optional per-block LR and frozen
   blocks), quantized with the settings recorded in the artifact (GPTQ Hessians from the training shards of
   ``--data``, else RTN, said so), and scored the same way. Every epoch is an adaptation step on targets not yet
   scored: the study ledger records each as a violation instead of raising, so the compliance report says
   FAIL on condition 3, and the summary written with ``--study-out`` marks the artifact as a study, which
   ``pgolf-pack`` packs only as a non-record submission.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
from torch import Tensor, nn

STUDIES = ("prequant-ttt",)


@dataclass
class PrequantSettings:
    """The pre-quant TTT of the study (defaults: #1550's; the records' own in :data:`RECORD_STUDIES`)."""

    epochs: int = 6
    lr: float = 5e-4
    min_lr_frac: float = 0.1  # cosine per epoch down to this fraction of lr
    batch_seqs: int = 32
    grad_clip: float = 1.0
    block_lr: tuple[float, float] | None = None  # #1406: (0.3, 1.0) from the first block to the last
    freeze_blocks: int = 0  # #1499: block 0 frozen
    calibration_batches: int = 16

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrequantSettings":
        from pgolf.utils import check_fields

        check_fields(cls, d, "study settings")
        d = dict(d)
        if d.get("block_lr") is not None:
            d["block_lr"] = tuple(float(v) for v in d["block_lr"])
        s = cls(**d)
        if s.epochs < 1 or s.lr <= 0 or s.batch_seqs < 1 or not 0 <= s.min_lr_frac <= 1 or s.freeze_blocks < 0:
            raise ValueError(f"invalid study settings {asdict(s)}: epochs, lr and batch_seqs must be positive, "
                             f"min_lr_frac in [0, 1], freeze_blocks >= 0")
        return s


RECORD_STUDIES = {
    "pr1406": dict(epochs=10, lr=5e-4, block_lr=(0.3, 1.0)),
    "pr1499": dict(epochs=10, lr=4.5e-4, freeze_blocks=1),
    "pr1550": dict(epochs=6, lr=5e-4),
}


def prequant_ttt(model: nn.Module, val: Tensor, s: PrequantSettings, ledger, *, seq_len: int,
                 autocast_dtype: torch.dtype | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Adapt ``model`` in place on every validation sequence of ``seq_len`` (N + 1 tokens ``val``) for ``s.epochs``;
    every epoch is recorded in the study ``ledger`` as an adaptation that read all targets (unscored: violations).
    Returns timings and losses."""
    from pgolf.eval.scoring import autocast_for, model_device

    t0 = time.perf_counter()
    dev = model_device(model)
    n_seq = (val.numel() - 1) // seq_len
    x_all = val[: n_seq * seq_len].view(n_seq, seq_len).to(dev)
    y_all = val[1: n_seq * seq_len + 1].view(n_seq, seq_len).to(dev)
    opt = torch.optim.AdamW(_groups(model, s), lr=s.lr, weight_decay=0.0)
    losses = []
    model.train()
    for e in range(s.epochs):
        ledger.adapt([(0, n_seq * seq_len)], label=f"prequant_ttt:epoch={e}")
        lr = s.lr * (s.min_lr_frac + (1 - s.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * e / s.epochs)))
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        total = 0.0
        for b in range(0, n_seq, s.batch_seqs):
            with autocast_for(dev, autocast_dtype):
                loss = model.loss(x_all[b:b + s.batch_seqs], y_all[b:b + s.batch_seqs])
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], s.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += float(loss.detach())
        losses.append(total / max(1, math.ceil(n_seq / s.batch_seqs)))
        log(f"study prequant_ttt epoch {e + 1}/{s.epochs} lr {lr:.2e} train_loss {losses[-1]:.4f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return dict(epochs=s.epochs, sequences=n_seq, losses=losses, seconds=round(time.perf_counter() - t0, 3))


def _groups(model: nn.Module, s: PrequantSettings) -> list[dict[str, Any]]:
    """AdamW groups: frozen blocks out, every other parameter of block i at its ``block_lr`` multiplier."""
    from pgolf.eval.ttt import block_scale

    n = len(model.blocks)
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if name.startswith("blocks.") and int(name.split(".")[1]) < s.freeze_blocks:
            p.requires_grad_(False)
            continue
        groups.setdefault(block_scale(name, n, s.block_lr), []).append(p)
    return [{"params": ps, "lr_scale": k} for k, ps in groups.items()]


def requantize(model: nn.Module, qm_source, *, data: str | None, seq_len: int, n_batches: int,
               log: Callable[[str], None] = print):
    """The adapted model quantized with the source artifact's recorded settings: GPTQ with Hessians from the
    training shards of ``data`` when the source used GPTQ and they exist, else RTN. Returns (QuantizedModel, how)."""
    import dataclasses

    from pgolf.quant.quantize import QuantSettings, quantize_for_artifact

    recorded = dict(qm_source.meta.get("settings") or {})
    settings = QuantSettings(**{k: v for k, v in recorded.items() if k in {f.name for f in fields(QuantSettings)}})
    hessians, how = None, "rtn (the source used rtn)"
    if settings.method == "gptq":
        hessians, how = _hessians(model, data, seq_len, n_batches)
        if hessians is None:
            settings = dataclasses.replace(settings, method="rtn")
    qm = quantize_for_artifact(model.state_dict(), hessians, settings, model_config=qm_source.config,
                               layout=qm_source.layout, meta={**qm_source.meta, "study": "prequant-ttt"}, log=log)
    qm.tokenizer = getattr(qm_source, "tokenizer", None)
    return qm, how


def _hessians(model: nn.Module, data: str | None, seq_len: int, n_batches: int):
    from pgolf.data.shards import find_shards
    from pgolf.quant.calibrate import calibration_batches, collect_hessians

    files = find_shards(data, "train") if data else []
    if not files:
        return None, "rtn (no training shards in --data for GPTQ's Hessians)"
    batches = calibration_batches(files, seq_len, 4 * seq_len, n_batches, vocab_size=model.config.vocab_size)
    hess, _ = collect_hessians(model, batches)
    return hess, f"gptq with Hessians from {n_batches} training batches"
