"""The compliance ledger: a run-time guard that every validation token is scored once, before any adaptation reads it.

Coordinates. The validation stream holds ``N + 1`` tokens and ``N`` targets; target ``t`` is ``tokens[t + 1]``
predicted from ``tokens[: t + 1]``. The ledger keeps two numpy int32 arrays over the targets:

- ``scored_at[t]``: the event id at which target ``t`` was scored (``-1``: not yet);
- ``first_adapt[t]``: the event id of the first adaptation step that read target ``t`` (``-1``: never);
  every step's id, label and the ranges it read are kept in ``step_log`` (:meth:`Ledger.reads_of` lists the
  steps that read a target).

Event ids come from one counter shared by scoring events and adaptation steps, so ``first_adapt − scored_at ≥ 1``
is "scored before any update that used it" (condition 3), and a second :meth:`Ledger.score` of a target is a
rescoring (condition 4). Every check is a vectorized slice test over a contiguous range, never per-token Python.

An adaptation step reads ranges ``[x0, x1)``: its inputs are ``tokens[x0:x1]`` and its targets
``tokens[x0 + 1 : x1 + 1]``, i.e. targets ``[x0, x1)`` and, through the input token ``x0``, target ``x0 − 1``.
All of them must be scored already. The one exception is the first input token when its value is public without
being predicted: token 0 (the stream's leading token, never a target) and, when declared with
``known_inputs``, document-start BOS tokens (per-document TTT reads a document's own BOS before the previous
document's last target, the one that predicts this BOS, is necessarily scored; the segmentation is given).

Anything else raises :class:`ComplianceViolation` at once, naming the target position (and token position), the
step and its label. :func:`assert_not_validation` guards compile warm-ups, GPTQ calibration and training: it
rejects explicit validation positions, tensors carrying the :class:`ValidationTokens` provenance flag (kept
through slicing, indexing, copies and device moves) and, when the active ledger has a fingerprint of the
validation stream, any batch containing a long verbatim run of validation tokens.

Distributed: each rank keeps its own ledger; :meth:`Ledger.sync` merges a range across ranks (MAX of
``scored_at``, SUM of a scored indicator to catch cross-rank double scoring) before a step that reads tokens
another rank scored; :meth:`Ledger.summary` reduces the whole arrays once at the end.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

# the guard, the provenance flag and the violation live below both pgolf.quant and pgolf.eval (re-exported here)
from pgolf.compliance_guard import (ComplianceViolation, ValidationTokens, _guard, active_ledger,  # noqa: F401
                                    assert_not_validation, is_validation, mark_validation, set_active_ledger,
                                    strip_validation)

UNSET = -1


# ---------------------------------------------------------------------------------------------------------------
# content fingerprint: catches validation text that lost its flag (a numpy copy, a file round trip)

_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)


def _kgram_hashes(tokens: np.ndarray, k: int) -> np.ndarray:
    """uint64 polynomial hash of every k-gram (len(tokens) − k + 1 values), vectorized, wrapping arithmetic."""
    t = np.ascontiguousarray(tokens, dtype=np.uint64) + np.uint64(1)
    n = t.size - k + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            h = h * _HASH_MUL + t[j: j + n]
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    return h


@dataclass
class Fingerprint:
    """Sampled k-gram hashes of the validation stream with their token positions (content-defined sampling:
    a k-gram is kept when ``hash % sample == 0``, so a verbatim copy keeps the same anchors)."""

    k: int
    sample: int
    hashes: np.ndarray  # sorted uint64
    positions: np.ndarray  # int64 token position of each hash's k-gram start
    tokens: np.ndarray  # the validation stream (for verifying a candidate match)

    @classmethod
    def build(cls, tokens: np.ndarray, k: int = 64, sample: int = 16) -> "Fingerprint":
        h = _kgram_hashes(tokens, k)
        keep = np.nonzero(h % np.uint64(sample) == 0)[0]
        order = np.argsort(h[keep], kind="stable")
        return cls(k, sample, h[keep][order], keep[order].astype(np.int64), np.asarray(tokens))

    def find(self, batch: np.ndarray) -> tuple[int, int] | None:
        """(row offset in the flattened batch, validation token position) of the first verified k-token verbatim
        copy of validation text in ``batch`` (rows are searched separately), or None."""
        rows = batch.reshape(-1, batch.shape[-1]) if batch.ndim > 1 else batch.reshape(1, -1)
        for r, row in enumerate(rows):
            h = _kgram_hashes(row, self.k)
            cand = np.nonzero(h % np.uint64(self.sample) == 0)[0]
            if cand.size == 0 or self.hashes.size == 0:
                continue
            idx = np.searchsorted(self.hashes, h[cand])
            idx = np.minimum(idx, self.hashes.size - 1)
            hit = np.nonzero(self.hashes[idx] == h[cand])[0]
            for j in hit:
                off, i = int(cand[j]), int(idx[j])
                # every equal hash: verify the tokens (hash collisions never raise)
                while i < self.hashes.size and self.hashes[i] == h[cand[j]]:
                    p = int(self.positions[i])
                    if np.array_equal(self.tokens[p: p + self.k], row[off: off + self.k]):
                        return r * rows.shape[1] + off, p
                    i += 1
        return None


# ---------------------------------------------------------------------------------------------------------------
# the ledger


@dataclass
class LedgerSummary:
    """What the ledger saw; the evidence of the compliance report (all ranks merged when distributed)."""

    n_targets: int  # validation targets N
    tokens_scored: int  # targets scored at least once
    max_times_scored: int
    min_times_scored: int
    first_unscored: int | None  # lowest never-scored target (None when all were scored)
    score_events: int
    adapt_steps: int
    adapted_targets: int  # targets read by at least one adaptation step
    adapt_reads: int  # Σ over steps of targets read (a target read by 3 epochs counts 3 times)
    min_adapt_gap: int | None  # min over adapted targets of first_adapt − scored_at (None: no adaptation)
    known_input_reads: int  # adaptation input tokens admitted as public (stream start / document BOS)
    guard_checks: int  # assert_not_validation calls that passed
    overhead_seconds: float  # time spent inside the ledger (this rank)
    world_size: int = 1
    adapt_kinds: dict = field(default_factory=dict)  # label prefix → steps
    study: bool = False  # a study run: violations were recorded instead of raised
    violations: int = 0  # violations recorded (study runs only; all ranks)
    violation_examples: list = field(default_factory=list)  # the first few: kind, position, step, label

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Ledger:
    """Score/adapt bookkeeping over ``n_targets`` validation targets; raises :class:`ComplianceViolation`.

    ``known_inputs``: token positions whose value may be read as an adaptation's first input token before it is
    scored (document-start BOS tokens for per-document TTT). Token 0 is always such a position. ``study``: a study
    of an illegal variant: an adaptation before scoring or a rescoring is recorded (the summary counts it and the
    compliance report fails) instead of raised.
    """

    def __init__(self, n_targets: int, *, known_inputs: Sequence[int] | np.ndarray | None = None,
                 fingerprint: Fingerprint | None = None, study: bool = False):
        if n_targets < 0:
            raise ValueError(f"n_targets must be >= 0, got {n_targets}")
        t0 = time.perf_counter()
        self.n = int(n_targets)
        self.scored_at = np.full(self.n, UNSET, dtype=np.int32)
        self.first_adapt = np.full(self.n, UNSET, dtype=np.int32)
        self.mine = np.zeros(self.n, dtype=bool)  # scored by THIS rank (scored_at also holds synced ranks' events)
        self._known = np.zeros(self.n + 1, dtype=bool)
        self._known[0] = True
        if known_inputs is not None:
            self.declare_known_inputs(known_inputs)
        self.fingerprint = fingerprint
        self.event = 0
        self.score_events = 0
        self.adapt_steps = 0  # steps recorded by this rank (collective ones included)
        self.adapt_reads = 0
        self.collective_steps = 0  # steps every rank records (a synchronized update): counted once when merged
        self.collective_reads = 0
        self.adapted_count = 0  # targets read by at least one adaptation step (this rank)
        self.step_log: list[tuple[int, str, np.ndarray]] = []  # (step, label, (k, 2) ranges read): the full record
        self.min_gap: int | None = None  # min over reads of (step − scored_at)
        self.known_input_reads = 0
        self.guard_checks = 0
        self.adapt_kinds: dict[str, int] = {}
        self.study = study  # record violations instead of raising (study runs of illegal variants, never a record)
        self.violations: list[dict[str, Any]] = []
        self.overhead = time.perf_counter() - t0  # allocation counts as ledger cost

    # -- setup --------------------------------------------------------------------------------------------------
    def declare_known_inputs(self, positions: Sequence[int] | np.ndarray) -> None:
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() > self.n):
            raise ValueError(f"known input positions must lie in [0, {self.n}]")
        self._known[pos] = True

    def attach_fingerprint(self, tokens: Tensor | np.ndarray, k: int = 64, sample: int = 16) -> None:
        """Fingerprint the validation stream (for :func:`assert_not_validation`'s content check)."""
        t0 = time.perf_counter()
        arr = strip_validation(tokens).detach().cpu().numpy() if isinstance(tokens, Tensor) else np.asarray(tokens)
        self.fingerprint = Fingerprint.build(arr, k=k, sample=sample)
        self.overhead += time.perf_counter() - t0

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.overhead += time.perf_counter() - t0

    def _check_range(self, lo: int, hi: int, what: str) -> None:
        if not 0 <= lo <= hi <= self.n:
            raise ComplianceViolation("bad_range", f"{what} range [{lo}, {hi}) is outside the {self.n} validation "
                                      f"targets", position=lo, step=self.event)

    # -- scoring ------------------------------------------------------------------------------------------------
    def score(self, lo: int, hi: int, *, label: str | None = None) -> int:
        """Record that targets ``[lo, hi)`` were scored now (a new event). Raises on a rescoring."""
        with self._timed():
            lo, hi = int(lo), int(hi)
            self._check_range(lo, hi, "scored")
            self.event += 1
            seg = self.scored_at[lo:hi]
            if seg.size:
                if seg.max() != UNSET:  # event ids are >= 1, so max == UNSET means nothing here is scored yet
                    i = int(np.argmax(seg != UNSET))
                    raise ComplianceViolation(
                        "rescore", f"target {lo + i} (token {lo + i + 1}) is scored a second time; it was scored at "
                        f"event {int(seg[i])} (single pass: each token is scored exactly once)",
                        position=lo + i, step=self.event, label=label)
                seg[:] = self.event
                self.mine[lo:hi] = True
            self.score_events += 1
            return self.event

    def score_many(self, ranges: Iterable[tuple[int, int]] | np.ndarray, *, label: str | None = None) -> int:
        """Several target ranges scored by one forward (one event); vectorized over the ranges."""
        with self._timed():
            self.event += 1
            ev = self.event
            r = self._ranges(ranges, "scored", ev, label)
            if r.shape[0] == 1:
                lo, hi = int(r[0, 0]), int(r[0, 1])
                seg = self.scored_at[lo:hi]
                if seg.max() != UNSET:
                    i = lo + int(np.argmax(seg != UNSET))
                    self._rescore(i, ev, label)
                seg[:] = ev
                self.mine[lo:hi] = True
            elif r.shape[0] > 1:
                idx = _range_index(r)
                sa = self.scored_at[idx]
                if sa.max() != UNSET:
                    self._rescore(int(idx[np.argmax(sa != UNSET)]), ev, label)
                if _overlapping(r):
                    u, c = np.unique(idx, return_counts=True)
                    self._rescore(int(u[np.argmax(c > 1)]), ev, label)
                self.scored_at[idx] = ev
                self.mine[idx] = True
            self.score_events += 1
            return ev

    def _rescore(self, i: int, ev: int, label: str | None) -> None:
        prev = int(self.scored_at[i])
        if self.study:
            self._record("rescore", i, ev, label)
            return
        raise ComplianceViolation(
            "rescore", f"target {i} (token {i + 1}) is scored a second time" +
            (f"; it was scored at event {prev}" if prev != UNSET else " within one event") +
            " (single pass: each token is scored exactly once)", position=i, step=ev, label=label)

    def _ranges(self, ranges: Iterable[tuple[int, int]] | np.ndarray, what: str, step: int,
                label: str | None) -> np.ndarray:
        """(k, 2) int64 non-empty ranges, bounds-checked."""
        r = np.asarray(ranges if isinstance(ranges, np.ndarray) else list(ranges), dtype=np.int64).reshape(-1, 2)
        r = r[r[:, 1] > r[:, 0]]
        bad = (r[:, 0] < 0) | (r[:, 1] > self.n)
        if bad.any():
            lo, hi = (int(v) for v in r[int(np.argmax(bad))])
            raise ComplianceViolation("bad_range", f"{what} range [{lo}, {hi}) is outside the {self.n} validation "
                                      f"targets", position=lo, step=step, label=label)
        return r

    # -- adaptation ---------------------------------------------------------------------------------------------
    def adapt(self, ranges: Iterable[tuple[int, int]] | np.ndarray, *, label: str = "adapt",
              collective: bool = False) -> int:
        """Record one adaptation step (one optimizer update) that read inputs ``tokens[x0:x1]`` and targets
        ``tokens[x0+1:x1+1]`` for each ``(x0, x1)`` in ``ranges``. Raises unless everything it read was scored
        (the first input token may instead be a known public token). ``collective``: every rank records this same
        step (an all-reduced update), so merged counts take it once. Vectorized over the ranges. Returns the
        step's event id."""
        with self._timed():
            self.event += 1
            step = self.event
            r = self._ranges(ranges, "adaptation", step, label)
            if r.shape[0] == 1:  # one contiguous range (chunked TTT): plain slices
                x0, x1 = int(r[0, 0]), int(r[0, 1])
                sa = self.scored_at[x0:x1]
                if sa.min() == UNSET:
                    self._unscored(x0 + int(np.argmax(sa == UNSET)), step, label)
                fa = self.first_adapt[x0:x1]
                new = fa == UNSET
                self.adapted_count += int(np.count_nonzero(new))
                np.copyto(fa, step, where=new)
            elif r.shape[0] > 1:
                idx = _range_index(r)
                sa = self.scored_at[idx]
                if sa.min() == UNSET:
                    self._unscored(int(idx[np.argmax(sa == UNSET)]), step, label)
                fa = self.first_adapt[idx]
                new_idx = idx[fa == UNSET]
                if _overlapping(r):
                    new_idx = np.unique(new_idx)
                self.adapted_count += int(new_idx.size)
                self.first_adapt[new_idx] = step
            if r.shape[0]:
                # the first input token of each range is target x0 − 1: scored, or a declared public token
                x0s = r[:, 0]
                x0s = x0s[x0s > 0]
                unsc = x0s[self.scored_at[x0s - 1] == UNSET]
                if unsc.size:
                    priv = unsc[~self._known[unsc]]
                    if priv.size and self.study:
                        self._record("adapt_before_score", int(priv[0]) - 1, step, label)
                    elif priv.size:
                        x0 = int(priv[0])
                        raise ComplianceViolation(
                            "adapt_before_score", f"adaptation reads input token {x0} (target {x0 - 1}) which has "
                            f"not been scored yet", position=x0 - 1, step=step, label=label)
                    self.known_input_reads += int(unsc.size)  # document-start BOS read before its predictor scored
                # running evidence: the smallest (step − scored_at) of any read is at a target's first read
                if sa.min() != UNSET:  # (a study step that read unscored targets is a recorded violation instead)
                    gap = step - int(sa.max())
                    self.min_gap = gap if self.min_gap is None else min(self.min_gap, gap)
                reads = int((r[:, 1] - r[:, 0]).sum())
                self.adapt_reads += reads
                if collective:
                    self.collective_reads += reads
            self.step_log.append((step, label, r))
            self.adapt_steps += 1
            self.collective_steps += int(collective)
            kind = label.split(":", 1)[0]
            self.adapt_kinds[kind] = self.adapt_kinds.get(kind, 0) + 1
            return step

    def _record(self, kind: str, position: int, step: int, label: str | None) -> None:
        self.violations.append(dict(kind=kind, position=int(position), step=int(step), label=label))

    def _unscored(self, i: int, step: int, label: str) -> None:
        if self.study:
            self._record("adapt_before_score", i, step, label)
            return
        raise ComplianceViolation(
            "adapt_before_score", f"adaptation reads target {i} (token {i + 1}) which has not been scored yet "
            f"(score before update: train only on tokens already scored)", position=i, step=step, label=label)

    def reads_of(self, t: int) -> list[tuple[int, str]]:
        """Every adaptation step (id, label) of this rank that read target ``t`` (diagnostics; scans the log)."""
        out = []
        for step, label, r in self.step_log:
            if r.size and bool(((r[:, 0] <= t) & (t < r[:, 1])).any()):
                out.append((step, label))
        return out

    def assert_scored(self, lo: int, hi: int, *, label: str | None = None) -> None:
        """Raise unless targets ``[lo, hi)`` are all scored (e.g. before a phase that may read them)."""
        with self._timed():
            self._check_range(lo, hi, "checked")
            bad = self.scored_at[lo:hi] == UNSET
            if bad.any():
                i = lo + int(np.argmax(bad))
                raise ComplianceViolation("adapt_before_score", f"target {i} is not scored yet", position=i,
                                          step=self.event, label=label)

    # -- guards for warm-up / calibration / training --------------------------------------------------------------
    def guard(self, batch: Any = None, *, context: str, step: int | None = None,
              positions: Sequence[int] | np.ndarray | Tensor | None = None) -> None:
        """Raise if validation tokens reach ``context`` ('compile_warmup', 'gptq_calibration', 'training', ...)."""
        with self._timed():
            _guard(batch, context=context, step=step, positions=positions, fingerprint=self.fingerprint)
            self.guard_checks += 1

    # -- distributed ----------------------------------------------------------------------------------------------
    def sync(self, lo: int, hi: int) -> None:
        """Merge targets ``[lo, hi)`` across ranks (no-op without a process group). Raises if two ranks scored
        the same target. Also advances every rank's event counter to the global maximum."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        with self._timed():
            lo, hi = int(lo), int(hi)
            self._check_range(lo, hi, "synced")
            seg = self.scored_at[lo:hi]
            cnt = _allreduce_np(self.mine[lo:hi].astype(np.int32), dist.ReduceOp.SUM)
            merged = _allreduce_np(seg.copy(), dist.ReduceOp.MAX)
            ev = int(_allreduce_np(np.array([self.event], dtype=np.int64), dist.ReduceOp.MAX)[0])
            if (cnt > 1).any():
                i = int(np.argmax(cnt > 1))
                raise ComplianceViolation("rescore", f"target {lo + i} was scored by {int(cnt[i])} ranks",
                                          position=lo + i, step=self.event)
            seg[:] = merged
            self.event = max(self.event, ev)

    # -- results --------------------------------------------------------------------------------------------------
    def summary(self, *, require_complete: bool = False) -> LedgerSummary:
        """Merged evidence. Single process: counters kept during the run plus one count over the scored mask.
        Distributed: one all-reduce of the scored mask (SUM) and of ``first_adapt`` (MIN). ``require_complete``
        raises when a target was never scored."""
        t0 = time.perf_counter()
        running = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        counts = [self.score_events, self.adapt_steps - self.collective_steps, self.adapt_reads - self.collective_reads,
                  self.known_input_reads, self.guard_checks, len(self.violations)]
        gap = self.min_gap
        if running:
            times = _allreduce_np(self.mine.view(np.uint8), dist.ReduceOp.SUM)
            n_scored = int(np.count_nonzero(times))
            max_times = int(times.max()) if self.n else 0
            min_times = int(times.min()) if self.n else 0
            big = np.iinfo(np.int32).max
            fa = _allreduce_np(np.where(self.first_adapt == UNSET, big, self.first_adapt).astype(np.int32),
                               dist.ReduceOp.MIN)
            adapted = int(np.count_nonzero(fa != big))
            counts = _allreduce_np(np.array(counts, dtype=np.int64), dist.ReduceOp.SUM).tolist()
            g = _allreduce_np(np.array([big if gap is None else gap], dtype=np.int64), dist.ReduceOp.MIN)
            gap = None if int(g[0]) == big else int(g[0])
            first_unscored = int(np.argmin(times)) if n_scored < self.n else None
        else:
            times = None
            n_scored = int(np.count_nonzero(self.mine))
            max_times = 1 if n_scored else 0  # a second score of a target raised at once
            min_times = 1 if n_scored == self.n and self.n else 0
            adapted = self.adapted_count
            first_unscored = int(np.argmin(self.mine)) if n_scored < self.n else None
        counts[1] += self.collective_steps
        counts[2] += self.collective_reads
        self.overhead += time.perf_counter() - t0
        s = LedgerSummary(
            n_targets=self.n, tokens_scored=n_scored, max_times_scored=max_times, min_times_scored=min_times,
            first_unscored=first_unscored, score_events=int(counts[0]), adapt_steps=int(counts[1]),
            adapted_targets=adapted, adapt_reads=int(counts[2]), min_adapt_gap=gap, known_input_reads=int(counts[3]),
            guard_checks=int(counts[4]), overhead_seconds=self.overhead,
            world_size=dist.get_world_size() if running else 1, adapt_kinds=dict(self.adapt_kinds), study=self.study,
            violations=int(counts[5]), violation_examples=self.violations[:5])
        if require_complete and s.first_unscored is not None:
            raise ComplianceViolation("unscored_at_end", f"{self.n - s.tokens_scored} validation targets were never "
                                      f"scored", position=s.first_unscored, step=self.event)
        if s.max_times_scored > 1 and not self.study:
            i = int(np.argmax(times > 1))
            raise ComplianceViolation("rescore", f"target {i} was scored {int(times[i])} times", position=i,
                                      step=self.event)
        return s


def _range_index(r: np.ndarray) -> np.ndarray:
    """Concatenated positions of (k, 2) ranges [x0, x1), in range order (one numpy pass)."""
    lens = r[:, 1] - r[:, 0]
    offs = np.cumsum(lens) - lens
    return np.repeat(r[:, 0] - offs, lens) + np.arange(int(lens.sum()), dtype=np.int64)


def _overlapping(r: np.ndarray) -> bool:
    s = r[np.argsort(r[:, 0], kind="stable")]
    return bool((s[1:, 0] < s[:-1, 1]).any())


def _allreduce_np(arr: np.ndarray, op) -> np.ndarray:
    """All-reduce a numpy array through torch.distributed (on the GPU for NCCL)."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if dist.get_backend() == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
        g = t.to(dev)
        dist.all_reduce(g, op=op)
        return g.cpu().numpy()
    dist.all_reduce(t, op=op)
    return t.numpy()


def bench_ledger(n_targets: int = 40_540_160, chunk: int = 32_768, window: int = 2048, stride: int = 64,
                 batch_windows: int = 32, seq_len: int = 2048, epochs: int = 3) -> dict[str, float]:
    """Time the ledger's full bookkeeping of a record-sized chunked TTT run (no model): one score event per batch
    of windows, ``epochs`` adaptation steps per chunk, the final summary. Returns seconds and per-call costs."""
    t0 = time.perf_counter()
    led = Ledger(n_targets)
    alloc = time.perf_counter() - t0
    n_chunks = -(-n_targets // chunk)
    per_batch = batch_windows * stride
    t1 = time.perf_counter()
    pos = 0
    for c in range(n_chunks):
        end = min((c + 1) * chunk, n_targets)
        while pos < end:
            nxt = min(pos + per_batch, n_targets)
            led.score(pos, nxt)
            pos = nxt
        if c < n_chunks - 1:
            n_seq = (end - c * chunk) // seq_len
            for _ in range(epochs):
                led.adapt([(c * chunk, c * chunk + n_seq * seq_len)], label="chunk_sgd")
    loop = time.perf_counter() - t1
    s = led.summary(require_complete=True)
    total = time.perf_counter() - t0
    return {"n_targets": n_targets, "seconds_total": total, "seconds_alloc": alloc, "seconds_bookkeeping": loop,
            "seconds_summary": total - alloc - loop, "score_events": s.score_events, "adapt_steps": s.adapt_steps,
            "array_bytes": int(led.scored_at.nbytes + led.first_adapt.nbytes + led._known.nbytes + led.mine.nbytes)}


def bench_ledger_lora(n_docs: int = 6250, mean_doc_len: float = 957.0, chunk: int = 48, window: int = 2048,
                      batch_docs: int = 64, seed: int = 0) -> dict[str, float]:
    """Time the ledger calls of per-document LoRA TTT exactly as :class:`pgolf.eval.ttt.DocLoRATTT` makes them
    (one ``score_many`` and one ``adapt`` per chunk iteration of each batch of documents), without a model.
    Defaults: one rank's share of the R6 validation set (50,000 documents, 47.85 M tokens, over 8 ranks) with
    log-normal document lengths of mean ``mean_doc_len``."""
    rng = np.random.default_rng(seed)
    lens = np.maximum(2, rng.lognormal(np.log(mean_doc_len) - 0.5, 1.0, n_docs)).astype(np.int64)
    lens = np.maximum(2, (lens * (mean_doc_len / lens.mean())).astype(np.int64))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    n = int(lens.sum())
    t0 = time.perf_counter()
    led = Ledger(n, known_inputs=starts)
    window_tokens = 0
    for b0 in range(0, n_docs, batch_docs):
        st, ln = starts[b0:b0 + batch_docs], lens[b0:b0 + batch_docs]
        n_chunks = -(-ln // chunk)
        for i in range(int(n_chunks.max())):
            act = np.nonzero(n_chunks > i)[0]
            c1 = np.minimum((i + 1) * chunk, ln[act])
            ws = np.maximum(0, c1 - window)
            led.score_many(np.stack([st[act] + i * chunk, st[act] + c1], 1))
            learn = c1 < ln[act]
            if learn.any():
                led.adapt(np.stack([(st[act] + ws)[learn], (st[act] + c1)[learn]], 1), label="lora_adamw")
                window_tokens += int((c1 - ws)[learn].sum())
    s = led.summary(require_complete=True)
    total = time.perf_counter() - t0
    return {"n_targets": n, "n_docs": n_docs, "seconds_total": total, "ledger_seconds": s.overhead_seconds,
            "score_events": s.score_events, "adapt_steps": s.adapt_steps, "window_tokens_checked": window_tokens}
