"""Synthetic benchmark records for the history / check / plot / readme tests."""

from __future__ import annotations

from typing import Any


def rec(commit: str, date: str, metrics: dict[str, tuple[float, str]], *, kind: str = "nvidia-h200",
        suite: str = "gpu-check", smoke: bool = False, **extra: Any) -> dict[str, Any]:
    """A history record; ``metrics``: {name: (value, better)}."""
    units = {"lower": "ms", "higher": "tok/s", None: ""}
    return dict(schema=1, suite=suite, smoke=smoke, date=date, commit=commit * (40 // len(commit)),
                commit_short=commit[:7], dirty=False, device_kind=kind, gpu_name=kind.upper(), torch="2.13.0",
                triton="3.9.0", python="3.12", command="test", results_file=None,
                metrics={k: dict(value=v, unit=units[b], better=b) for k, (v, b) in metrics.items()}, **extra)
