"""The optimizer set of a training run: Muon for 2-D block matrices, AdamW for embeddings and scalars.

:func:`build_optimizers` takes the model's parameter groups — 'muon' (block matrices), 'tok' (embedding
tables) and 'scalar' (everything else) — and returns an :class:`Optimizers` that steps, zeroes, schedules
(``lr = base_lr · multiplier`` on every group) and checkpoints them together. 'tok' and 'scalar' are two param
groups of a single AdamW (one fused kernel on CUDA). Every param group records ``name`` and ``base_lr``.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from pgolf.train.muon import Muon

GROUP_NAMES = ("muon", "tok", "scalar")


class Optimizers:
    """A list of optimizers driven as one: ``step``, ``zero_grad``, LR multiplier, Muon momentum, checkpoints.

    ``muon`` and ``adam`` are the two members (None when their groups were empty).
    """

    def __init__(self, muon: Muon | None = None, adam: torch.optim.Optimizer | None = None):
        self.muon = muon
        self.adam = adam
        self.optimizers: list[torch.optim.Optimizer] = [o for o in (muon, adam) if o is not None]

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers)

    def __len__(self) -> int:
        return len(self.optimizers)

    @property
    def param_groups(self) -> list[dict]:
        """Every param group of every optimizer (each has 'name', 'lr', 'base_lr')."""
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def set_lr_multiplier(self, m: float) -> None:
        """lr = base_lr · m on every param group."""
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * m

    def set_muon_momentum(self, mu: float) -> None:
        """Set Muon's momentum μ on all its groups (no-op without Muon)."""
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {mu!r}")
        if self.muon is not None:
            for g in self.muon.param_groups:
                g["momentum"] = mu

    def state_dict(self) -> dict:
        """{'muon': ..., 'adam': ...} for the members present."""
        return {k: o.state_dict() for k, o in (("muon", self.muon), ("adam", self.adam)) if o is not None}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` of an Optimizers built over the same groups."""
        have = {k for k, o in (("muon", self.muon), ("adam", self.adam)) if o is not None}
        if set(state) != have:
            raise KeyError(f"optimizer state holds {sorted(state)}, this Optimizers has {sorted(have)}")
        for k in have:
            getattr(self, k).load_state_dict(state[k])


def build_optimizers(groups: dict[str, list[tuple[str, nn.Parameter]]], *, matrix_lr: float, muon_momentum: float,
                     muon_wd: float, row_normalize: bool, ns_steps: int, ns_coefficients, tok_lr: float,
                     tok_wd: float, scalar_lr: float, scalar_wd: float, betas: tuple[float, float],
                     eps: float, row_orientation: str = "stored") -> Optimizers:
    """Muon over groups['muon'], one AdamW with param groups 'tok' and 'scalar'; empty groups are skipped.

    groups: {'muon' | 'tok' | 'scalar': [(name, param), ...]} (missing keys count as empty). Muon params must be
    2-D. AdamW uses fused=True only when all its params are on CUDA. A param may appear in one group only.
    """
    unknown = set(groups) - set(GROUP_NAMES)
    if unknown:
        raise ValueError(f"unknown parameter group(s) {sorted(unknown)}; expected {', '.join(GROUP_NAMES)}")
    seen: dict[int, str] = {}
    for gname in GROUP_NAMES:
        for pname, p in groups.get(gname, []):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"group {gname!r}: {pname!r} is not a tensor")
            if id(p) in seen:
                raise ValueError(f"parameter {pname!r} appears twice (also as {seen[id(p)]!r})")
            seen[id(p)] = pname
    muon_params = [p for _, p in groups.get("muon", [])]
    muon = None
    if muon_params:
        muon = Muon([{"params": muon_params, "name": "muon", "base_lr": matrix_lr}], lr=matrix_lr,
                    momentum=muon_momentum, nesterov=True, weight_decay=muon_wd, row_normalize=row_normalize,
                    ns_steps=ns_steps, ns_coefficients=ns_coefficients, row_orientation=row_orientation)
    adam_groups = []
    for gname, lr, wd in (("tok", tok_lr, tok_wd), ("scalar", scalar_lr, scalar_wd)):
        ps = [p for _, p in groups.get(gname, [])]
        if ps:
            adam_groups.append({"params": ps, "name": gname, "lr": lr, "base_lr": lr, "weight_decay": wd})
    adam = None
    if adam_groups:
        all_cuda = all(p.device.type == "cuda" for g in adam_groups for p in g["params"])
        adam = torch.optim.AdamW(adam_groups, lr=adam_groups[0]["lr"], betas=tuple(betas), eps=eps,
                                 fused=True if all_cuda else None)
    return Optimizers(muon, adam)
