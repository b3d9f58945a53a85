"""Training schedules and the wall-clock budget: LR warmdown, Muon momentum warmup, a pausable timer.

There is no LR warmup. The LR multiplier is 1 until the last ``warmdown_frac`` of the training budget, then
falls linearly to 0 (or to a floor ``min_lr``). The budget is wall-clock time: ``frac = elapsed_train_ms /
(cap_ms − reserve_ms)``, where the timer is paused around validation so only training time counts.
:func:`lr_multiplier_iters` is the older (R0/R1) variant that expresses the warmdown as a number of
iterations and converts it to time with the mean step time so far.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch


def lr_multiplier(frac: float, warmdown_frac: float, min_lr: float = 0.0) -> float:
    """1 while frac < 1 − warmdown_frac, else max((1 − frac)/warmdown_frac, min_lr); warmdown_frac 0: always 1."""
    if not 0.0 <= warmdown_frac <= 1.0:
        raise ValueError(f"warmdown_frac must be in [0, 1], got {warmdown_frac!r}")
    if not 0.0 <= min_lr <= 1.0:
        raise ValueError(f"min_lr must be in [0, 1], got {min_lr!r}")
    if warmdown_frac == 0.0 or frac < 1.0 - warmdown_frac:
        return 1.0
    return max((1.0 - frac) / warmdown_frac, min_lr)


def lr_multiplier_iters(step: int, elapsed_ms: float, max_ms: float | None, warmdown_iters: int,
                        iterations: int) -> float:
    """Iteration-based warmdown (R0/R1).

    With a wall-clock cap (max_ms > 0): warmdown_ms = warmdown_iters · elapsed_ms/step, and the multiplier is
    remaining_ms/warmdown_ms once remaining_ms = max_ms − elapsed_ms drops below warmdown_ms (1 before).
    Without a cap (max_ms None or 0): (iterations − step)/warmdown_iters inside the last warmdown_iters steps.
    warmdown_iters <= 0 means no warmdown.
    """
    if warmdown_iters <= 0:
        return 1.0
    if not max_ms:
        if step < iterations - warmdown_iters:
            return 1.0
        return max((iterations - step) / warmdown_iters, 0.0)
    if step <= 0:
        return 1.0
    warmdown_ms = warmdown_iters * (elapsed_ms / step)
    remaining_ms = max(max_ms - elapsed_ms, 0.0)
    if remaining_ms >= warmdown_ms:
        return 1.0
    return remaining_ms / warmdown_ms


def muon_momentum(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Linear momentum warmup (1 − t)·start + t·end with t = min(step/warmup_steps, 1); warmup_steps 0: end."""
    if warmup_steps <= 0:
        return float(end)
    t = min(max(step, 0) / warmup_steps, 1.0)
    return (1.0 - t) * start + t * end


class WallClock:
    """Pausable training timer with an optional wall-clock cap.

    ``start()`` zeroes and starts it; ``pause()``/``resume()`` (or ``with clock.paused():``) exclude time such as
    validation. ``frac`` = elapsed_ms/(cap_ms − reserve_ms), 0 when there is no cap (cap None or 0).
    ``clock`` returns seconds (default time.perf_counter); ``sync`` (e.g. torch.cuda.synchronize) is called before
    the clock is read at start/pause/resume so queued GPU work is charged to the right side.
    """

    def __init__(self, cap_seconds: float | None, reserve_seconds: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] | None = None):
        if cap_seconds is not None and cap_seconds < 0:
            raise ValueError(f"cap_seconds must be >= 0 or None, got {cap_seconds!r}")
        if reserve_seconds < 0:
            raise ValueError(f"reserve_seconds must be >= 0, got {reserve_seconds!r}")
        if cap_seconds and reserve_seconds >= cap_seconds:
            raise ValueError(f"reserve_seconds ({reserve_seconds}) must be smaller than cap_seconds ({cap_seconds})")
        self.cap_ms = 1000.0 * cap_seconds if cap_seconds else None
        self.reserve_ms = 1000.0 * reserve_seconds
        self._clock = clock
        self._sync = sync
        self._accum_ms = 0.0
        self._t0: float | None = None

    @property
    def budget_ms(self) -> float | None:
        """Training time allowed: cap_ms − reserve_ms (None without a cap)."""
        return None if self.cap_ms is None else self.cap_ms - self.reserve_ms

    @property
    def running(self) -> bool:
        return self._t0 is not None

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return self._clock()

    def start(self) -> None:
        """Reset the elapsed time to 0 and start counting."""
        self._accum_ms = 0.0
        self._t0 = self._now()

    def pause(self) -> None:
        """Stop counting (no-op when already paused)."""
        if self._t0 is not None:
            self._accum_ms += 1000.0 * (self._now() - self._t0)
            self._t0 = None

    def resume(self) -> None:
        """Continue counting (no-op when running)."""
        if self._t0 is None:
            self._t0 = self._now()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Exclude the ``with`` block from the elapsed time (restores the previous running state)."""
        was_running = self.running
        self.pause()
        try:
            yield
        finally:
            if was_running:
                self.resume()

    @property
    def elapsed_ms(self) -> float:
        """Counted training time so far, in milliseconds."""
        live = 1000.0 * (self._clock() - self._t0) if self._t0 is not None else 0.0
        return self._accum_ms + live

    @property
    def frac(self) -> float:
        """elapsed_ms/(cap_ms − reserve_ms); 0 without a cap."""
        return 0.0 if self.budget_ms is None else self.elapsed_ms / self.budget_ms

    def should_stop(self, device: torch.device | str | None = None) -> bool:
        """True once elapsed_ms >= cap_ms − reserve_ms; unanimous across ranks (all-reduce MAX) when distributed.

        device: where the flag tensor lives for the collective (default: the current CUDA device under NCCL,
        else CPU). Every rank must call this at the same point.
        """
        local = self.budget_ms is not None and self.elapsed_ms >= self.budget_ms
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
