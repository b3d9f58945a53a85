"""A pytest plugin for ``gpu-check``'s test stage (``pytest -p pgolf.bench.pytest_stream``).

- Streams one JSON line per test outcome to ``$PGOLF_TEST_STREAM`` as soon as the test ends, so a stage killed at
  its time limit (no JUnit report then) still leaves every result it got.
- Orders what is worth most first: tests whose name mentions ``compile`` (inductor compiles of whole models take
  the longest) run after all the others, keeping pytest's order otherwise.
"""

from __future__ import annotations

import json
import os


def pytest_collection_modifyitems(session, config, items) -> None:
    items.sort(key=lambda item: "compile" in item.name)  # stable: the rest keep their order


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("PGOLF_TEST_STREAM")
    if not path:
        return
    final = report.when == "call" or (report.when == "setup" and not report.passed) or \
        (report.when == "teardown" and report.failed)
    if not final:
        return
    outcome = "error" if report.failed and report.when != "call" else report.outcome
    message = ""
    if report.failed:
        message = str(getattr(report.longrepr, "reprcrash", None) and report.longrepr.reprcrash.message
                      or report.longrepr)
    elif report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])
    line = dict(id=report.nodeid, outcome=outcome, seconds=round(report.duration, 3), message=message[:300])
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def read_stream(path) -> dict | None:
    """The streamed outcomes as counts like :func:`pgolf.bench.gpucheck.parse_junit` (None when absent)."""
    try:
        lines = [json.loads(ln) for ln in open(path, encoding="utf-8") if ln.strip()]
    except (OSError, ValueError):
        return None
    counts = {k: sum(1 for ln in lines if ln["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
    failed = [dict(id=ln["id"], kind="failure" if ln["outcome"] == "failed" else "error", message=ln["message"])
              for ln in lines if ln["outcome"] in ("failed", "error")]
    return dict(tests=len(lines), failures=counts["failed"], errors=counts["error"], skipped=counts["skipped"],
                passed=counts["passed"], seconds=round(sum(ln["seconds"] for ln in lines), 1), failed=failed,
                source="stream")
