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
    return time_stats(fn, device, warmup=warmup, reps=reps)["ms"]


def time_stats(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, reps: int = 10) -> dict[str, float]:
    """{'ms': median, 'ms_p20': 20th percentile, 'ms_p80': 80th percentile} of ``fn()`` in milliseconds.

    CUDA: ``triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])`` (it runs ``fn`` for about
    25 ms to warm up, then for about 100 ms, flushing the L2 cache before each call). Elsewhere: ``warmup`` untimed
    calls, then ``reps`` calls timed one by one with ``time.perf_counter``.
    """
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return dict(ms=float(med), ms_p20=float(p20), ms_p80=float(p80))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return dict(ms=statistics.median(times), ms_p20=_quantile(times, 0.2), ms_p80=_quantile(times, 0.8))


def _quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of ``xs`` (q in [0, 1])."""
    ys = sorted(xs)
    if len(ys) == 1:
        return ys[0]
    pos = q * (len(ys) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ys) - 1)
    return ys[lo] + (ys[hi] - ys[lo]) * (pos - lo)


def run_case(case: Case, device: torch.device, *, reps: int = 10, errors: str = "raise") -> list[dict[str, Any]]:
    """Time every implementation of ``case``; one result row per implementation (speedup vs the baseline).

    On CUDA a first untimed call compiles and tunes. Row keys: op, case, mode, impl, ms (median), ms_p20, ms_p80,
    peak_mib (CUDA: memory allocated by one call beyond what was allocated before it), tflops, gbps, params, speedup (baseline ms / this ms; None without a
    timed baseline), candidate, baseline, error. ``errors='record'`` turns an implementation that raises into a row
    with ``ms=None`` and the error text instead of propagating the exception (``'raise'``, the default).
    """
    if errors not in ("raise", "record"):
        raise ValueError(f"errors must be 'raise' or 'record', got {errors!r}")
    impls = case.build()
    rows = []
    for impl, fn in impls.items():
        row: dict[str, Any] = dict(op=case.op, case=case.name, mode=case.mode, impl=impl, ms=None, ms_p20=None,
                                   ms_p80=None, peak_mib=None, tflops=None, gbps=None, params=case.params,
                                   candidate=case.candidate, baseline=case.baseline, error=None)
        try:
            if device.type == "cuda":
                fn()  # first call: compiles, and tunes launch configs the tuned file lacks (never timed)
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base_mem = torch.cuda.memory_allocated(device)
                fn()
                torch.cuda.synchronize(device)
                row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**20
            stats = time_stats(fn, device, reps=reps)
        except Exception as e:  # noqa: BLE001 - reported per implementation
            if errors == "raise":
                raise
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            rows.append(row)
            continue
        ms = stats["ms"]
        row.update(stats)
        row["tflops"] = case.flops / ms / 1e9 if case.flops and ms > 0 else None
        row["gbps"] = case.bytes_moved / ms / 1e6 if case.bytes_moved and ms > 0 else None
        rows.append(row)
    base = next((r["ms"] for r in rows if r["impl"] == case.baseline and r["ms"]), None)
    for r in rows:
        r["speedup"] = base / r["ms"] if base and r["ms"] else None
    del impls
    return rows
