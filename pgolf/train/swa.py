"""Stochastic weight averaging (SWA): the uniform mean of snapshots taken every N steps late in training.

After optimizer step ``s`` (counted from 1), when ``s % every == 0`` and the step's LR multiplier was below
``threshold``, the snapshot is added to an fp32 running sum of every floating state tensor. ``source`` says what a
snapshot is: the live weights ('weights') or the EMA weights at that step ('ema'). At the end :meth:`SWA.copy_to`
writes sum / count into the model, so the SWA mean replaces the weights and the EMA is not applied (with 'ema' the
mean is one of EMA weights). PR #490 ran SWA only with EMA off; #1148, #1406 and #1550 summed snapshots and never
applied them, so their presets leave SWA off.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SWA:
    """Running sum of snapshots; ``count`` of them, the first at ``first_step``."""

    def __init__(self, every: int, threshold: float, source: str = "weights"):
        if every < 1:
            raise ValueError(f"SWA every must be >= 1, got {every}")
        if source not in ("weights", "ema"):
            raise ValueError(f"SWA source must be 'weights' or 'ema', got {source!r}")
        self.every, self.threshold, self.source = int(every), float(threshold), source
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.first_step: int | None = None

    def due(self, step: int, lr_multiplier: float) -> bool:
        """Whether step ``step`` (its LR multiplier ``lr_multiplier``) takes a snapshot."""
        return step % self.every == 0 and lr_multiplier < self.threshold

    @torch.no_grad()
    def add(self, step: int, model: nn.Module, ema=None) -> None:
        """Add one snapshot: the model's floating state, or the EMA's averages when ``source`` is 'ema'."""
        if self.source == "ema":
            if ema is None:
                raise ValueError("SWA source 'ema' needs an EMA")
            tensors = dict(zip(ema.names, ema.shadow))
        else:
            tensors = {k: v for k, v in _unwrap(model).state_dict().items() if v.is_floating_point()}
        for name, t in tensors.items():
            if name in self.sums:
                self.sums[name] += t.detach().float()
            else:
                self.sums[name] = t.detach().float().clone()
        self.count += 1
        self.first_step = step if self.first_step is None else self.first_step

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the mean of the snapshots into ``model`` (each tensor cast to its own dtype)."""
        if not self.count:
            raise ValueError("SWA has no snapshot to apply")
        state = _unwrap(model).state_dict()
        for name, total in self.sums.items():
            state[name].copy_(total / self.count)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)
