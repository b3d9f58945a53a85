"""Muon: momentum SGD whose update is the orthogonalized (Newton-Schulz) momentum, for 2-D block matrices.

For each matrix W with gradient G (already averaged across ranks) one step is

    B ← μB + G;  U = G + μB (Nesterov) or U = B;
    U_i ← U_i / max(‖U_i‖₂, 1e-7) per row (MuonEq-R, optional; 'wide' orientation: per row of the wide
        orientation, i.e. per column of a tall matrix, as PR #1550 normalizes after its Newton-Schulz transpose);
    X = NS(U)  (quintic Newton-Schulz, ≈ the orthogonal polar factor of U);
    W ← W·(1 − lr·wd);  W ← W − lr·sqrt(max(1, rows/cols))·X.

Newton-Schulz always goes through :func:`pgolf.kernels.newton_schulz`, once per distinct matrix shape with the
matrices of that shape stacked into one batch. Under ``torch.distributed`` (world size W > 1) each shape batch
is split into W contiguous shards of ceil(n/W) matrices: rank r keeps the momentum of, and orthogonalizes, only
its shard, then an all-gather gives every rank every update, so all ranks apply identical updates.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

import pgolf.kernels

Coefficients = tuple[tuple[float, float, float], ...]

CLASSIC_COEFFS: Coefficients = ((3.4445, -4.7750, 2.0315),)
"""The classic quintic (a, b, c), used on every step."""

POLAR_EXPRESS_COEFFS: Coefficients = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
"""Polar Express: one (a, b, c) per step; steps beyond the fifth reuse the last triple."""

_NAMED_COEFFS = {"classic": CLASSIC_COEFFS, "polar_express": POLAR_EXPRESS_COEFFS}


def ns_coefficients(name: str) -> Coefficients:
    """The Newton-Schulz coefficient table called ``name``: 'classic' or 'polar_express'."""
    if not isinstance(name, str) or name not in _NAMED_COEFFS:
        raise ValueError(f"unknown Newton-Schulz coefficient set {name!r}; choose one of {', '.join(_NAMED_COEFFS)}")
    return _NAMED_COEFFS[name]


def _resolve_coefficients(spec: str | Sequence[Sequence[float]]) -> Coefficients:
    """A coefficient table from a name or an explicit sequence of (a, b, c) triples."""
    if isinstance(spec, str):
        return ns_coefficients(spec)
    try:
        table = tuple((float(a), float(b), float(c)) for a, b, c in spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"ns_coefficients must be a name or a sequence of (a, b, c) triples, got {spec!r}") from e
    if not table:
        raise ValueError("ns_coefficients must hold at least one (a, b, c) triple")
    return table


def orthogonality_error(X: Tensor) -> float:
    """max_i |σ_i − 1| over the singular values of X: (m, n) or (B, m, n), computed in float64."""
    if X.dim() not in (2, 3):
        raise ValueError(f"orthogonality_error expects a (m, n) or (B, m, n) tensor, got shape {tuple(X.shape)}")
    s = torch.linalg.svdvals(X.detach().to(torch.float64))
    return float((s - 1.0).abs().max())


def shape_scale(rows: int, cols: int) -> float:
    """Muon's update scale sqrt(max(1, rows/cols)) for a (rows, cols) matrix (2 for 2048×512)."""
    return math.sqrt(max(1.0, rows / cols))


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters; see the module docstring for the update.

    Per-group options: lr, momentum (μ), nesterov, weight_decay (decoupled, scaled by lr), row_normalize
    (MuonEq-R), row_orientation ('stored' or 'wide'), ns_steps, ns_coefficients ('classic', 'polar_express' or
    explicit triples). The momentum buffer
    ``state[p]['momentum_buffer']`` has p's dtype and exists only on the rank that owns p. ``process_group``
    (default: the world) is the group the Newton-Schulz work is split over when torch.distributed is initialized.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, row_normalize: bool = False, ns_steps: int = 5,
                 ns_coefficients: str | Sequence[Sequence[float]] = "classic", process_group=None,
                 row_orientation: str = "stored"):
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"Muon lr must be a number >= 0, got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"Muon weight_decay must be >= 0, got {weight_decay!r}")
        if int(ns_steps) != ns_steps or ns_steps < 1:
            raise ValueError(f"Muon ns_steps must be a positive integer, got {ns_steps!r}")
        _resolve_coefficients(ns_coefficients)
        if row_orientation not in ("stored", "wide"):
            raise ValueError(f"Muon row_orientation must be 'stored' or 'wide', got {row_orientation!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=bool(nesterov), weight_decay=weight_decay,
                        row_normalize=bool(row_normalize), ns_steps=int(ns_steps), ns_coefficients=ns_coefficients,
                        row_orientation=row_orientation)
        super().__init__(params, defaults)
        self.process_group = process_group
        for group in self.param_groups:
            _resolve_coefficients(group["ns_coefficients"])
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got one of shape {tuple(p.shape)}; "
                                     f"put it in an AdamW group instead")

    def _world(self) -> tuple[int, int]:
        """(rank, world size) of the process group, (0, 1) when torch.distributed is not in use."""
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return 0, 1

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step over every parameter with a gradient; returns closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = self._world()
        pending = []  # (params, async work or None, updates or a thunk giving them after the wait, group)
        for group in self.param_groups:
            buckets: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                buckets.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            # Largest matrices first so their all-gather overlaps the smaller shapes' Newton-Schulz.
            for key in sorted(buckets, key=lambda k: (-math.prod(k[0]), k[0], str(k[1]), str(k[2]))):
                pending.append(self._orthogonalize_bucket(buckets[key], group, rank, world))
        for params, work, updates, group in pending:
            if work is not None:
                work.wait()
            if callable(updates):
                updates = updates()
            self._apply(params, updates, group)
        return loss

    def _orthogonalize_bucket(self, params: list[Tensor], group: dict, rank: int, world: int):
        """Momentum + NS for this rank's shard of one same-shape bucket; starts the all-gather when distributed."""
        n = len(params)
        shard = -(-n // world)
        lo, hi = min(rank * shard, n), min((rank + 1) * shard, n)
        own = params[lo:hi]
        local = self._local_updates(own, group) if own else None
        if world == 1:
            return params, None, local, group
        m, k = params[0].shape
        out_dtype = local.dtype if local is not None else self._ns_dtype(params[0])
        padded = torch.zeros((shard, m, k), dtype=out_dtype, device=params[0].device)
        if local is not None:
            padded[: hi - lo] = local
        if dist.get_backend(self.process_group) == "nccl":
            full = torch.empty((world * shard, m, k), dtype=out_dtype, device=padded.device)
            work = dist.all_gather_into_tensor(full, padded, group=self.process_group, async_op=True)
            return params, work, (lambda: full[:n]), group
        parts = [torch.empty_like(padded) for _ in range(world)]
        work = dist.all_gather(parts, padded, group=self.process_group, async_op=True)
        return params, work, (lambda: torch.cat(parts)[:n]), group

    @staticmethod
    def _ns_dtype(p: Tensor) -> torch.dtype:
        """Newton-Schulz working/output dtype for p's device: bf16 on CUDA, fp32 elsewhere (same on every rank)."""
        return torch.bfloat16 if p.device.type == "cuda" else torch.float32

    def _local_updates(self, params: list[Tensor], group: dict) -> Tensor:
        """Update the momentum of ``params`` (all one shape) and return NS(U) stacked: (len(params), m, n)."""
        mu = group["momentum"]
        bufs, grads = [], []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            bufs.append(state["momentum_buffer"])
            grads.append(p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype))
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        if group["nesterov"]:
            U = torch.stack(torch._foreach_add(grads, bufs, alpha=mu))
        else:
            U = torch.stack(bufs)
        if group["row_normalize"]:
            wide_cols = group.get("row_orientation") == "wide" and U.shape[-2] > U.shape[-1]
            U = U / U.norm(dim=-2 if wide_cols else -1, keepdim=True).clamp_min(1e-7)
        coeffs = _resolve_coefficients(group["ns_coefficients"])
        return pgolf.kernels.newton_schulz(U, coeffs, steps=group["ns_steps"], dtype=self._ns_dtype(U))

    @staticmethod
    def _apply(params: list[Tensor], updates: Tensor, group: dict) -> None:
        """W ← W·(1 − lr·wd) − lr·scale·X for each matrix; updates: (len(params), m, n)."""
        lr, wd = group["lr"], group["weight_decay"]
        rows, cols = params[0].shape
        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_add_(params, list(updates.to(params[0].dtype).unbind(0)), alpha=-lr * shape_scale(rows, cols))
