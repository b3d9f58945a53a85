"""``pgolf-bench plot``: PNG charts from the history — speedup per kernel case (newest run) and training-step
time over commits — for one device kind. Needs matplotlib (not a dependency of pgolf; ``pip install matplotlib``
or ``pip install -e '.[test]'``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pgolf.bench.env import slug


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("pgolf-bench plot needs matplotlib, which is not installed: "
                              "pip install matplotlib (or pip install -e '.[test]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pick_device_kind(records: list[dict[str, Any]], device_kind: str | None = None) -> str | None:
    """The given kind, else the kind of the newest full (non-smoke) run, else of the newest run."""
    if device_kind:
        return device_kind
    full = [r for r in records if not r.get("smoke")]
    pool = full or records
    if not pool:
        return None
    return max(enumerate(pool), key=lambda ir: (str(ir[1].get("date") or ""), ir[0]))[1].get("device_kind")


def _ordered(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    mine = [(i, r) for i, r in enumerate(records) if r.get("device_kind") == kind]
    mine.sort(key=lambda ir: (str(ir[1].get("date") or ""), ir[0]))
    return [r for _, r in mine]


def speedup_data(records: list[dict[str, Any]], kind: str) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """(the newest record with kernel speedups, {case: speedup})."""
    for r in reversed(_ordered(records, kind)):
        sp = {k[len("kernels/"):-len("/speedup")]: float(v["value"]) for k, v in r.get("metrics", {}).items()
              if k.startswith("kernels/") and k.endswith("/speedup") and v.get("value") is not None}
        if sp:
            return r, sp
    return None, {}


def step_series(records: list[dict[str, Any]], kind: str) -> tuple[list[str], dict[str, list[float | None]]]:
    """(x labels 'commit date', {series name: ms per step per record}) over the records with step timings."""
    rows = [r for r in _ordered(records, kind)
            if any(k.startswith("step/") and k.endswith("/ms_per_step") for k in r.get("metrics", {}))]
    names = sorted({k for r in rows for k in r["metrics"] if k.startswith("step/") and k.endswith("/ms_per_step")})
    labels = [f"{r.get('commit_short') or '?'}\n{str(r.get('date') or '')[:10]}" + ("\nsmoke" if r.get("smoke") else "")
              for r in rows]
    series = {n[len("step/"):-len("/ms_per_step")]: [r["metrics"].get(n, {}).get("value") for r in rows]
              for n in names}
    return labels, series


def make_plots(records: list[dict[str, Any]], out_dir: str | Path, device_kind: str | None = None) -> list[Path]:
    """Write the charts for ``device_kind``; returns the files written (none when there is nothing to draw)."""
    plt = _pyplot()
    kind = pick_device_kind(records, device_kind)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if kind is None:
        return written
    rec, sp = speedup_data(records, kind)
    if sp:
        cases = sorted(sp, key=sp.get)
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(cases) + 1.6))
        colors = ["tab:green" if sp[c] >= 1 else "tab:red" for c in cases]
        ax.barh(range(len(cases)), [sp[c] for c in cases], color=colors)
        ax.set_yticks(range(len(cases)), cases, fontsize=8)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xlabel("speedup of the kernel over its baseline (x)")
        ax.set_title(f"kernel speedups on {rec.get('gpu_name') or kind} @ {rec.get('commit_short')} "
                     f"({str(rec.get('date'))[:10]}){' smoke' if rec.get('smoke') else ''}", fontsize=9)
        fig.tight_layout()
        p = out / f"kernel_speedup_{slug(kind)}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    labels, series = step_series(records, kind)
    if series:
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels) + 3), 4))
        xs = list(range(len(labels)))
        for name, ys in series.items():
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xticks(xs, labels, fontsize=7)
        ax.set_ylabel("ms per training step (median)")
        ax.set_title(f"training step time over commits on {kind}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out / f"step_time_{slug(kind)}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    return written
