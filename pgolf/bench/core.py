"""What a kernel benchmark is, and how one case is timed.

Each op's benchmark module ``pgolf/bench/ops/<op>.py`` defines ``cases(smoke: bool, device) -> list[Case]``.
A :class:`Case` is one shape and mode with several implementations of the same computation (e.g. 'triton',
'eager', 'compiled'); ``build()`` allocates the inputs and returns zero-argument callables, so a full-size case
holds GPU memory only while it is timed. ``smoke`` asks for tiny shapes that run on CPU in seconds.
Timing: ``triton.testing.do_bench`` (median, after warm-up) on CUDA; the median of repeated
``time.perf_counter`` runs on CPU. Peak memory is measured per implementation on CUDA.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Case:
    op: str                      # 'mlp', 'softcap_ce', 'attention', 'newton_schulz', 'int6_matmul'
    name: str                    # unique, human-readable: 'mlp fwd+bwd M=98304'
    mode: str                    # 'fwd' | 'fwd+bwd' | 'step'
    build: Callable[[], dict[str, Callable[[], Any]]]  # impl name → zero-arg callable running it once
    baseline: str                # impl the speedups are relative to (the best alternative, e.g. 'compiled')
    params: dict[str, Any] = field(default_factory=dict)  # shapes, dtype, ...
    flops: float | None = None   # per call, for TFLOP/s
    bytes_moved: float | None = None  # per call, for GB/s
    candidate: str = "triton"    # the implementation under test


def time_callable(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` on ``device`` (do_bench on CUDA, perf_counter median elsewhere)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_case(case: Case, device: torch.device, *, reps: int = 10) -> list[dict[str, Any]]:
    """Time every implementation of ``case``; one result row per implementation (speedup vs the baseline)."""
    impls = case.build()
    rows = []
    for impl, fn in impls.items():
        peak = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base_mem = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            peak = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**20
        ms = time_callable(fn, device, reps=reps)
        rows.append(dict(op=case.op, case=case.name, mode=case.mode, impl=impl, ms=ms, peak_mib=peak,
                         tflops=case.flops / ms / 1e9 if case.flops else None,
                         gbps=case.bytes_moved / ms / 1e6 if case.bytes_moved else None, params=case.params))
    base = next((r["ms"] for r in rows if r["impl"] == case.baseline), None)
    for r in rows:
        r["speedup"] = base / r["ms"] if base else None
    del impls
    return rows
