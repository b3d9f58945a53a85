"""The benchmark history: one JSON record per run, appended to ``bench/history.jsonl``.

Record (schema 1), one line of JSON::

    {"schema": 1, "suite": "kernels" | "step" | "eval" | "gpu-check", "smoke": false,
     "date": "2026-11-21T11:30:00Z", "commit": "<40 hex>", "commit_short": "d5cdaef", "dirty": false,
     "device_kind": "nvidia-h200", "gpu_name": "NVIDIA H200", "torch": "2.13.0", "triton": "3.9.0",
     "python": "3.12.3", "command": "pgolf-bench step --preset sota", "results_file": "bench/results/....json",
     "metrics": {"step/sota/auto/loop_off/ms_per_step": {"value": 121.3, "unit": "ms", "better": "lower"},
                 "step/sota/auto/loop_off/tokens_per_s": {"value": 810411.0, "unit": "tok/s", "better": "higher"},
                 "step/sota/measured_peak_tflops": {"value": 720.1, "unit": "TFLOP/s", "better": null}, ...}}

``better`` is the metric's direction: ``lower`` (times, memory), ``higher`` (throughput, speedups, projected steps)
or ``null`` (informational: never compared). A metric may carry its own ``threshold`` (a fraction) that overrides
the check's default.

Appending is one ``os.write`` of the whole line on a descriptor opened with ``O_APPEND`` (then fsync): the kernel
places each such write at the current end of the file, so concurrent runs never overwrite or interleave each
other's records on a local file system (a temp file + rename of the whole file could lose a concurrent run's
record). A crash can at worst leave a truncated last line; the reader skips lines that are not valid JSON (and
the next append starts on a fresh line).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

SCHEMA = 1
DEFAULT_HISTORY = Path("bench") / "history.jsonl"
DIRECTIONS = ("lower", "higher", None)


def default_history_path() -> Path:
    """``PGOLF_BENCH_HISTORY`` if set, else ``bench/history.jsonl`` under the repository root."""
    env = os.environ.get("PGOLF_BENCH_HISTORY")
    if env:
        return Path(env)
    from pgolf.bench.env import REPO_ROOT

    return REPO_ROOT / DEFAULT_HISTORY


def metric(value: float | int | None, unit: str, better: str | None, threshold: float | None = None) -> dict[str, Any]:
    """One metric entry: value, unit, direction ('lower' | 'higher' | None) and an optional own threshold."""
    if better not in DIRECTIONS:
        raise ValueError(f"better must be 'lower', 'higher' or None, got {better!r}")
    v = None if value is None else float(value)
    m: dict[str, Any] = dict(value=v if v is not None and math.isfinite(v) else None, unit=unit, better=better)
    if threshold is not None:
        m["threshold"] = float(threshold)
    return m


def make_record(suite: str, env: dict[str, Any], metrics: dict[str, dict[str, Any]], *, smoke: bool,
                command: str | None = None, results_file: str | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A history record from a run's environment (:func:`pgolf.bench.env.environment`) and its metrics."""
    rec = dict(schema=SCHEMA, suite=suite, smoke=bool(smoke), date=env.get("date"), commit=env.get("commit"),
               commit_short=env.get("commit_short"), dirty=env.get("dirty"), device_kind=env.get("device_kind"),
               gpu_name=env.get("gpu_name"), torch=env.get("torch"), triton=env.get("triton"),
               python=env.get("python"), command=command, results_file=results_file,
               metrics={k: v for k, v in metrics.items() if v.get("value") is not None})
    if extra:
        rec.update(extra)
    return rec


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Append ``record`` as one JSON line (one O_APPEND write + fsync; see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size > 0 and not _ends_with_newline(path, size):
            data = b"\n" + data  # a previous writer died mid-line: start on a fresh line
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All valid records of ``path`` in file order ([] when the file does not exist); bad lines are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{n}: not valid JSON, skipped")
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("metrics"), dict):
                warnings.warn(f"{path}:{n}: not a benchmark record (no 'metrics' object), skipped")
                continue
            records.append(rec)
    return records


def comparable(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same device kind, same suite, same smoke flag: only such runs are ever compared."""
    return (a.get("device_kind") == b.get("device_kind") and a.get("suite") == b.get("suite")
            and bool(a.get("smoke")) == bool(b.get("smoke")))


def metric_values(records: Iterable[dict[str, Any]], name: str) -> list[tuple[dict[str, Any], float]]:
    """(record, value) for every record that has metric ``name``, in order."""
    out = []
    for r in records:
        m = r.get("metrics", {}).get(name)
        if m and m.get("value") is not None:
            out.append((r, float(m["value"])))
    return out
