"""Every op's smoke cases as pytest-benchmark tests (one test per case and implementation).

By default (``make test``) only the implementation under test of each case runs, once, so the suite stays fast
while every op's benchmark module is still exercised; the alternatives are skipped. ``PGOLF_BENCH_ROUNDS=N`` (or
``--benchmark-only``) runs every implementation N rounds (default 5) for real pytest-benchmark statistics
(``--benchmark-json OUT`` keeps them). On CPU the Triton implementations run under ``TRITON_INTERPRET=1``.
"""

import os

import pytest
import torch

from pgolf.bench import kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS_ENV = os.environ.get("PGOLF_BENCH_ROUNDS")


def _params():
    out = []
    cases, status = kernels.collect_cases(kernels.discover(), smoke=True, device=DEVICE)
    for case in cases:
        try:
            impls = list(case.build())
        except Exception as e:  # noqa: BLE001 - surfaces as a failing test below
            out.append(pytest.param(case, None, id=f"{case.name}-build", marks=pytest.mark.xfail(
                reason=f"build() raised {e}", strict=False)))
            continue
        out += [pytest.param(case, impl, id=f"{case.name}-{impl}") for impl in impls]
    for op, st in status.items():
        if st["status"] == "error":
            out.append(pytest.param(None, op, id=f"{op}-module-error"))
    return out or [pytest.param(None, None, id="no-op-modules", marks=pytest.mark.skip(
        reason="no pgolf/bench/ops/<op>.py module defines cases yet"))]


@pytest.mark.parametrize("case,impl", _params())
def test_smoke_case(benchmark, request, case, impl):
    if case is None:
        pytest.fail(f"benchmark module for {impl} failed: "
                    f"{kernels.collect_cases(kernels.discover(), smoke=True, device=DEVICE)[1][impl]['error']}")
    full = bool(ROUNDS_ENV) or request.config.getoption("benchmark_only", False)
    if not full and impl != case.candidate:
        pytest.skip("alternatives run with PGOLF_BENCH_ROUNDS=N or --benchmark-only")
    rounds = int(ROUNDS_ENV or 5) if full else 1
    fn = case.build()[impl]
    benchmark.group = case.name
    benchmark.extra_info.update(op=case.op, impl=impl, baseline=case.baseline, mode=case.mode)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1 if rounds > 1 else 0)
