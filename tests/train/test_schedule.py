"""LR warmdown (fractional and iteration-based), momentum warmup and the pausable WallClock."""

from __future__ import annotations

import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pgolf.train.schedule import WallClock, lr_multiplier, lr_multiplier_iters, muon_momentum
from pgolf.utils import distributed_session


def test_lr_multiplier_boundaries():
    f = 0.75
    assert lr_multiplier(0.0, f) == 1.0
    assert lr_multiplier(0.2499, f) == 1.0
    assert lr_multiplier(0.25, f) == pytest.approx(1.0)  # warmdown starts exactly at 1 − f, continuously
    assert lr_multiplier(0.625, f) == pytest.approx(0.5)
    assert lr_multiplier(1.0, f) == 0.0
    assert lr_multiplier(1.3, f) == 0.0  # past the budget: clamped to the floor, never negative
    # with a floor (R5/R6): max((1 − frac)/f, min_lr)
    assert lr_multiplier(0.9, f, min_lr=0.1) == pytest.approx(max(0.1 / 0.75, 0.1))
    assert lr_multiplier(0.95, f, min_lr=0.1) == pytest.approx(0.1)
    assert lr_multiplier(1.0, f, min_lr=0.1) == pytest.approx(0.1)
    # warmdown_frac 0 never decays; 1 decays from the start
    assert lr_multiplier(0.99, 0.0) == 1.0
    assert lr_multiplier(0.4, 1.0) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        lr_multiplier(0.5, 1.5)
    with pytest.raises(ValueError):
        lr_multiplier(0.5, 0.5, min_lr=-0.1)


def test_lr_multiplier_iters_wallclock():
    # 100 steps in 10 s → 100 ms/step; 1200 warmdown iters → warmdown_ms = 120 s.
    assert lr_multiplier_iters(0, 0.0, 600_000, 1200, 20_000) == 1.0
    assert lr_multiplier_iters(100, 10_000.0, 600_000, 1200, 20_000) == 1.0
    # at 480 s elapsed (4800 steps), remaining = 120 s = warmdown_ms → boundary, multiplier 1
    assert lr_multiplier_iters(4800, 480_000.0, 600_000, 1200, 20_000) == pytest.approx(1.0)
    # at 540 s (5400 steps): remaining 60 s / 120 s
    assert lr_multiplier_iters(5400, 540_000.0, 600_000, 1200, 20_000) == pytest.approx(0.5)
    assert lr_multiplier_iters(6000, 600_000.0, 600_000, 1200, 20_000) == 0.0
    assert lr_multiplier_iters(6100, 610_000.0, 600_000, 1200, 20_000) == 0.0
    assert lr_multiplier_iters(5400, 540_000.0, 600_000, 0, 20_000) == 1.0  # no warmdown


def test_lr_multiplier_iters_without_cap():
    for cap in (None, 0):
        assert lr_multiplier_iters(0, 0.0, cap, 100, 1000) == 1.0
        assert lr_multiplier_iters(899, 5.0, cap, 100, 1000) == 1.0
        assert lr_multiplier_iters(900, 5.0, cap, 100, 1000) == pytest.approx(1.0)
        assert lr_multiplier_iters(950, 5.0, cap, 100, 1000) == pytest.approx(0.5)
        assert lr_multiplier_iters(1000, 5.0, cap, 100, 1000) == 0.0
        assert lr_multiplier_iters(10, 5.0, cap, 2000, 1000) == pytest.approx(0.495)  # warmdown longer than run


def test_muon_momentum_warmup():
    assert muon_momentum(0, 0.92, 0.99, 1500) == pytest.approx(0.92)
    assert muon_momentum(750, 0.92, 0.99, 1500) == pytest.approx(0.955)
    assert muon_momentum(1500, 0.92, 0.99, 1500) == pytest.approx(0.99)
    assert muon_momentum(10_000, 0.92, 0.99, 1500) == pytest.approx(0.99)
    assert muon_momentum(300, 0.85, 0.95, 500) == pytest.approx(0.4 * 0.85 + 0.6 * 0.95)
    assert muon_momentum(5, 0.85, 0.95, 0) == 0.95


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_wallclock_pause_excludes_time():
    clk = FakeClock()
    wc = WallClock(600, reserve_seconds=12, clock=clk)
    assert wc.budget_ms == 588_000
    wc.start()
    clk.t += 10.0
    assert wc.elapsed_ms == pytest.approx(10_000)
    with wc.paused():  # validation: 50 s off the clock
        clk.t += 50.0
        assert wc.elapsed_ms == pytest.approx(10_000)
    clk.t += 4.0
    assert wc.elapsed_ms == pytest.approx(14_000)
    assert wc.frac == pytest.approx(14_000 / 588_000)
    wc.pause()
    wc.pause()  # idempotent
    clk.t += 100.0
    wc.resume()
    wc.resume()
    clk.t += 1.0
    assert wc.elapsed_ms == pytest.approx(15_000)
    with wc.paused():
        pass
    assert wc.running
    wc.pause()
    with wc.paused():  # stays paused afterwards
        clk.t += 3.0
    assert not wc.running and wc.elapsed_ms == pytest.approx(15_000)
    wc.start()  # restart from zero
    assert wc.elapsed_ms == 0.0


def test_wallclock_sync_called_at_boundaries():
    calls = []
    wc = WallClock(10, clock=FakeClock(), sync=lambda: calls.append(1))
    wc.start()
    wc.pause()
    wc.resume()
    assert len(calls) == 3


def test_wallclock_should_stop_single_process():
    clk = FakeClock()
    wc = WallClock(10, reserve_seconds=2, clock=clk)
    wc.start()
    clk.t += 7.999
    assert not wc.should_stop()
    clk.t += 0.001
    assert wc.should_stop() and wc.frac == pytest.approx(1.0)
    nocap = WallClock(None, clock=clk)
    nocap.start()
    clk.t += 1e6
    assert nocap.frac == 0.0 and not nocap.should_stop() and nocap.budget_ms is None
    assert WallClock(0).cap_ms is None
    with pytest.raises(ValueError):
        WallClock(10, reserve_seconds=10)
    with pytest.raises(ValueError):
        WallClock(-1)


def _stop_worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    with distributed_session():
        clk = FakeClock()
        wc = WallClock(10, clock=clk)
        wc.start()
        clk.t += 5.0
        before = wc.should_stop()  # nobody at the cap
        clk.t += 6.0 if rank == 1 else 1.0  # only rank 1 passes the cap
        after = wc.should_stop()
        (Path(outdir) / f"rank{rank}.txt").write_text(f"{int(before)} {int(after)}")


def test_wallclock_should_stop_is_unanimous_across_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_stop_worker, args=(2, port, d), nprocs=2, join=False, start_method="spawn")
        deadline = time.monotonic() + 120
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail("distributed should_stop test timed out")
        assert [(Path(d) / f"rank{r}.txt").read_text() for r in range(2)] == ["0 1", "0 1"]
