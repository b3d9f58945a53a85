"""Exponential moving average of a model's weights, kept as fp32 copies of every floating state tensor.

After each optimizer step ``ema ← d·ema + (1 − d)·w`` for every floating tensor of ``model.state_dict()``
(parameters and buffers; integer buffers are ignored). At the end of training ``copy_to`` writes the average
into the model, cast to each tensor's own dtype, so it replaces the weights before quantization and eval.
A ``torch.compile``-wrapped model is unwrapped (``_orig_mod``) so names match the plain module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


class EMA:
    """fp32 EMA of ``model``'s floating state tensors with decay ``decay`` in [0, 1)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        sd = _unwrap(model).state_dict()
        self.names = [k for k, v in sd.items() if v.is_floating_point()]
        if not self.names:
            raise ValueError("EMA: the model has no floating-point state tensors")
        self.shadow: list[Tensor] = [sd[k].detach().to(torch.float32, copy=True) for k in self.names]

    def _tensors(self, model: nn.Module) -> list[Tensor]:
        sd = _unwrap(model).state_dict()
        missing = [k for k in self.names if k not in sd]
        if missing:
            raise KeyError(f"EMA: model lacks state tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        out = [sd[k] for k in self.names]
        for k, t, s in zip(self.names, out, self.shadow):
            if t.shape != s.shape:
                raise ValueError(f"EMA: {k} has shape {tuple(t.shape)}, the average has {tuple(s.shape)}")
        return out

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """ema ← d·ema + (1 − d)·w for every tracked tensor (d = ``decay`` or self.decay)."""
        d = self.decay if decay is None else float(decay)
        ws = [w.detach() if w.dtype == torch.float32 else w.detach().float() for w in self._tensors(model)]
        torch._foreach_mul_(self.shadow, d)
        torch._foreach_add_(self.shadow, ws, alpha=1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the average into ``model`` in place, cast to each tensor's dtype."""
        for t, s in zip(self._tensors(model), self.shadow):
            t.copy_(s)

    def state_dict(self) -> dict:
        """{'decay': float, 'shadow': {name: fp32 tensor}}."""
        return {"decay": self.decay, "shadow": dict(zip(self.names, self.shadow))}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (same tensor names and shapes required)."""
        shadow = state["shadow"]
        if set(shadow) != set(self.names):
            raise KeyError(f"EMA state names differ: missing {sorted(set(self.names) - set(shadow))[:5]}, "
                           f"unexpected {sorted(set(shadow) - set(self.names))[:5]}")
        for k, s in zip(self.names, self.shadow):
            if shadow[k].shape != s.shape:
                raise ValueError(f"EMA state {k} has shape {tuple(shadow[k].shape)}, expected {tuple(s.shape)}")
            s.copy_(shadow[k])
        self.decay = float(state["decay"])
