"""An n-gram cache mixed into the model's scores as a normalized distribution: #1499's cache, made legal.

Target ``t`` is token ``x[t + 1]`` after ``x[0..t]``. For each order ``k`` (2..7 by default) its context is the
``k − 1`` tokens ``x[t − k + 2 .. t]``. The cache counts, over every (context, next token) pair it has seen
(pre-filled from training tokens, then the validation targets already scored), ``c(ctx)`` and ``c(ctx, y)``. A
prediction backs off to the longest context seen at least ``min_count`` times and reads
``p_ng(y) = c(ctx, y) / c(ctx)``, a distribution over the whole vocabulary. The score mixes it with the model's:

    p(y) = (1 − α)·p_nn(y) + α·p_ng(y),   α = α_max · c(ctx) / (c(ctx) + κ)   (α = 0 with no context seen).

α depends on the context only, never on the token, so Σ_y p(y) = 1 for every position (condition 2; the
normalization probe checks it through :meth:`NGramMixer.log_probs`). #1499's own weighting,
``α = min(0.5, 0.2·(1 + NLL_nn(y)/3))``, reads the realized token's NLL: each candidate token gets another weight
and Σ_y p(y) ≠ 1. It is kept as ``weighting='record'`` for study mode only, where the probe reports the failure.

Legality (condition 3): the cache learns a target only in :meth:`NGramMixer.update`, called after the batch that
scored it, and the update is an adaptation step in the ledger (label ``ngram_update``): a cache that learned a
target before scoring it raises :class:`~pgolf.compliance_guard.ComplianceViolation`.

Counts live in tables of 64-bit keys (order ⊕ context hash, and that ⊕ the next token) kept as a log-structured
merge of sorted runs: an update appends one run (``torch.unique`` with counts) and merges runs of similar size, a
lookup searches every run with ``torch.searchsorted``, vectorized over all positions and orders; on the model's
device. A hash collision can only merge two contexts' counts; both tables get the same pairs, so ``p_ng`` stays a
distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

MULT = 0x5851F42D4C957F2D  # odd 64-bit multipliers of the context hash (wrapping int64 arithmetic)
PAIR_MULT = 0x2545F4914F6CDD1D
WEIGHTINGS = ("normalized", "record")


class NGramCache:
    """Counts of (context, next token) pairs for the orders ``orders``; see the module docstring."""

    def __init__(self, orders: tuple[int, ...] = (2, 3, 4, 5, 6, 7), device: torch.device | str = "cpu"):
        if not orders or min(orders) < 2:
            raise ValueError(f"n-gram orders must be >= 2 (a context of at least one token), got {orders}")
        self.orders = tuple(sorted(orders))
        self.device = torch.device(device)
        self.contexts = _CountTable()
        self.pairs = _CountTable()
        self.pairs_seen = 0

    def context_keys(self, tokens: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(keys (O, M) int64, valid (O, M) bool) of each order's context of targets (M,) in tokens (N + 1,)."""
        keys, valid = [], []
        h = torch.zeros_like(targets)
        k_done = 1
        for k in self.orders:
            while k_done < k:  # fold in x[t − k_done + 1]
                i = targets - k_done + 1
                h = h * MULT + tokens[i.clamp(min=0)] + 1
                k_done += 1
            keys.append(h * MULT + k)
            valid.append(targets - k + 2 >= 0)
        return torch.stack(keys), torch.stack(valid)

    def update(self, tokens: Tensor, targets: Tensor) -> None:
        """Learn the targets (M,) of ``tokens``: one (context, next token) pair per order each."""
        if targets.numel() == 0:
            return
        ctx, valid = self.context_keys(tokens, targets)
        y = tokens[targets + 1].expand_as(ctx)
        self.contexts.add(ctx[valid])
        self.pairs.add((ctx * PAIR_MULT + y)[valid])
        self.pairs_seen += int(valid.sum())

    def prefill(self, train_tokens: Tensor, chunk: int = 1 << 20) -> None:
        """Learn every target of a training token stream (N + 1,), in chunks."""
        t = train_tokens.to(self.device, torch.int64)
        for lo in range(0, t.numel() - 1, chunk):
            self.update(t, torch.arange(lo, min(lo + chunk, t.numel() - 1), device=self.device))

    def lookup(self, tokens: Tensor, targets: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        """(c(ctx) (O, M), c(ctx, y) (O, M) or None without y, valid (O, M)) for targets (M,) and candidate tokens
        y (M,)."""
        ctx, valid = self.context_keys(tokens, targets)
        c_ctx = torch.where(valid, self.contexts.get(ctx), 0)
        c_pair = None if y is None else torch.where(valid, self.pairs.get(ctx * PAIR_MULT + y.expand_as(ctx)), 0)
        return c_ctx, c_pair, valid


@dataclass
class NGramMixer:
    """Mixes a :class:`NGramCache` into per-token NLLs; ``ledger`` (optional) sees every cache update."""

    cache: NGramCache
    alpha: float = 0.3  # α_max
    kappa: float = 4.0  # context count at which α reaches half of α_max
    min_count: int = 1
    weighting: str = "normalized"  # 'record': #1499's token-dependent α (not a distribution; study mode only)
    ledger: object | None = None
    stats: dict = field(default_factory=lambda: dict(positions=0, hits=0, updates=0))

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"n-gram weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not 0.0 <= self.alpha <= 1.0 or self.kappa < 0 or self.min_count < 1:
            raise ValueError(f"need 0 <= alpha <= 1, kappa >= 0 and min_count >= 1; got {self.alpha}, {self.kappa}, "
                             f"{self.min_count}")

    def mix(self, nll: Tensor, tokens: Tensor, targets: Tensor, y: Tensor | None = None) -> Tensor:
        """NLL (M,) fp64 of the mixture at targets (M,) given the model's NLL there (the model's p of the realized
        token is exp(−nll)); contexts are read from ``tokens``, the realized tokens are ``y`` (default
        ``tokens[targets + 1]``); the cache is only read."""
        if nll.numel() == 0:
            return nll
        y = tokens[targets + 1] if y is None else y
        c, p_ng = self._backoff(tokens, targets, y)
        alpha = self._alpha(c, nll)
        p = (1.0 - alpha) * torch.exp(-nll) + alpha * p_ng
        self.stats["positions"] += nll.numel()
        self.stats["hits"] += int((c > 0).sum())
        return -torch.log(p.clamp_min(1e-300))

    def update(self, tokens: Tensor, lo: int, hi: int, *, collective: bool = False) -> None:
        """Learn targets ``[lo, hi)``, just scored. The ledger checks that they and the targets their contexts
        read (back to ``lo − (max order − 2)``) were scored; ``collective``: every rank learns the same range."""
        if hi <= lo:
            return
        if self.ledger is not None:
            back = max(self.cache.orders) - 2
            self.ledger.adapt([(max(lo - back, 0), hi)], label="ngram_update", collective=collective)
        self.cache.update(tokens, torch.arange(lo, hi, device=tokens.device))
        self.stats["updates"] += 1

    def log_probs(self, logp_nn: Tensor, tokens: Tensor, targets: Tensor) -> Tensor:
        """The mixture's full log-distribution (M, V) from the model's log-probs (M, V): what condition 2 is about.
        With ``weighting='record'`` every candidate token gets its own α, as that weighting does."""
        M, V = logp_nn.shape
        c_ctx, _, valid = self.cache.lookup(tokens, targets)
        order = self._order(c_ctx)
        cand = torch.arange(V, device=logp_nn.device)
        p_ng = torch.zeros_like(logp_nn, dtype=torch.float64)
        for j in range(M):
            if order[j] < 0:
                continue
            c1, c2, _ = self.cache.lookup(tokens, targets[j].expand(V), cand)
            p_ng[j] = c2[order[j]].double() / c1[order[j]].double()
        c = _at_order(c_ctx, order)
        alpha = self._alpha(c[:, None].expand(M, V), -logp_nn.double())
        return torch.log((1.0 - alpha) * logp_nn.double().exp() + alpha * p_ng)

    def _backoff(self, tokens: Tensor, targets: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(c(ctx) of the chosen order (0: none), p_ng(y)) per target."""
        c_ctx, c_pair, _ = self.cache.lookup(tokens, targets, y)
        order = self._order(c_ctx)
        c, pair = _at_order(c_ctx, order), _at_order(c_pair, order)
        return c, torch.where(c > 0, pair.double() / c.clamp(min=1).double(), 0.0)

    def _order(self, c_ctx: Tensor) -> Tensor:
        """Index of the longest order whose context was seen >= min_count times (−1: none), per target."""
        seen = c_ctx >= self.min_count
        O = seen.shape[0]
        idx = torch.arange(O, device=c_ctx.device)[:, None].expand_as(seen)
        return torch.where(seen, idx, -1).max(dim=0).values

    def _alpha(self, c: Tensor, nll: Tensor) -> Tensor:
        if self.weighting == "record":  # reads the scored token's own NLL: not a distribution
            return torch.where(c > 0, torch.clamp(0.2 * (1.0 + nll / 3.0), max=0.5), 0.0)
        c = c.double()
        return self.alpha * c / (c + self.kappa) if self.kappa > 0 else torch.where(c > 0, self.alpha, 0.0)


def _at_order(counts: Tensor, order: Tensor) -> Tensor:
    """counts (O, M) read at each target's chosen order (M,); 0 where no order was chosen (−1)."""
    return torch.where(order >= 0, counts.gather(0, order.clamp(min=0)[None])[0], 0)


class _CountTable:
    """Counts of int64 keys: a log-structured merge of sorted (keys, counts) runs."""

    def __init__(self):
        self.runs: list[tuple[Tensor, Tensor]] = []

    def add(self, keys: Tensor) -> None:
        if keys.numel() == 0:
            return
        u, c = torch.unique(keys, return_counts=True)
        self.runs.append((u, c))
        while len(self.runs) > 1 and self.runs[-2][0].numel() <= 2 * self.runs[-1][0].numel():
            (k1, c1), (k2, c2) = self.runs.pop(), self.runs.pop()
            k, inv = torch.unique(torch.cat([k2, k1]), return_inverse=True)
            self.runs.append((k, torch.zeros_like(k).scatter_add_(0, inv, torch.cat([c2, c1]))))

    def get(self, keys: Tensor) -> Tensor:
        total = torch.zeros_like(keys)
        for k, c in self.runs:
            i = torch.searchsorted(k, keys).clamp(max=k.numel() - 1)
            total += torch.where(k[i] == keys, c[i], 0)
        return total
