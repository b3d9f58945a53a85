"""``pgolf-bench kernels``: every op's benchmark cases against their alternatives.

Cases run round-robin over ops (:func:`interleave`). Op modules are discovered at run time: every module ``pgolf/bench/ops/<op>.py`` that defines
``cases(smoke: bool, device) -> list[Case]`` (see :mod:`pgolf.bench.core`). A module that is missing, fails to
import or raises while listing its cases is reported and skipped; an implementation that raises while being timed
becomes an error row. Between cases the compile caches are reset (``torch._dynamo.reset()``), so no case can
push a shared compiled function past its recompile limit and be timed in eager mode by accident.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
import traceback
from types import ModuleType
from typing import Any, Callable, Iterable

import torch

from pgolf.bench.core import Case, run_case
from pgolf.bench.env import reset_device
from pgolf.bench.history import metric

OPS_PACKAGE = "pgolf.bench.ops"
EXPECTED_OPS = ("mlp", "softcap_ce", "attention", "newton_schulz", "int6_matmul")


def discover(package: str = OPS_PACKAGE) -> dict[str, ModuleType | str]:
    """{module name: module, or the error text when it cannot be imported / has no ``cases``}."""
    pkg = importlib.import_module(package)
    found: dict[str, ModuleType | str] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"{package}.{info.name}")
        except Exception as e:  # noqa: BLE001 - a broken op module must not stop the others
            found[info.name] = f"import failed: {type(e).__name__}: {e}"
            continue
        found[info.name] = mod if callable(getattr(mod, "cases", None)) else "defines no cases(smoke, device)"
    return found


def collect_cases(modules: dict[str, ModuleType | str], *, smoke: bool, device: torch.device,
                  ops: Iterable[str] | None = None) -> tuple[list[Case], dict[str, dict[str, Any]]]:
    """(cases, status per op module). ``ops`` filters by module name or by ``Case.op``."""
    wanted = set(ops) if ops else None
    cases: list[Case] = []
    status: dict[str, dict[str, Any]] = {}
    for name, mod in modules.items():
        if isinstance(mod, str):
            if wanted is None or name in wanted:
                status[name] = dict(status="error", error=mod, cases=0)
            continue
        try:
            got = list(mod.cases(smoke, device))
        except Exception as e:  # noqa: BLE001
            if wanted is None or name in wanted:
                status[name] = dict(status="error", error=f"cases() raised {type(e).__name__}: {e}", cases=0)
            continue
        got = [c for c in got if wanted is None or name in wanted or c.op in wanted]
        if wanted is not None and not got and name not in wanted:
            continue
        status[name] = dict(status="ok", cases=len(got), error=None)
        cases += got
    for op in EXPECTED_OPS:
        if op not in status and (wanted is None or op in wanted) and not any(c.op == op for c in cases):
            status[op] = dict(status="missing", error=f"no benchmark module {OPS_PACKAGE}.{op}", cases=0)
    if wanted:
        known = set(modules) | {c.op for c in cases} | set(EXPECTED_OPS)
        for op in sorted(wanted - known):
            status[op] = dict(status="unknown", error=f"no op called {op!r}", cases=0)
    return cases, status


def run_kernels(*, smoke: bool, device: torch.device, ops: Iterable[str] | None = None, reps: int = 10,
                package: str = OPS_PACKAGE, log: Callable[[str], None] = print,
                on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every case; returns {'ops': status per op, 'rows': timing rows, 'seconds': wall time}."""
    t0 = time.perf_counter()
    modules = discover(package)
    cases, status = collect_cases(modules, smoke=smoke, device=device, ops=ops)
    cases = interleave(cases)
    for op, st in status.items():
        if st["status"] != "ok":
            log(f"[kernels] {op}: {st['status']}: {st['error']}")
    result: dict[str, Any] = dict(ops=status, rows=[], seconds=None)
    for i, case in enumerate(cases, 1):
        log(f"[kernels] {i}/{len(cases)} {case.name}")
        reset_device(device)
        tc = time.perf_counter()
        try:
            rows = run_case(case, device, reps=reps, errors="record")
        except Exception as e:  # noqa: BLE001 - build() failed
            rows = [dict(op=case.op, case=case.name, mode=case.mode, impl="(build)", ms=None, ms_p20=None,
                         ms_p80=None, peak_mib=None, tflops=None, gbps=None, speedup=None, params=case.params,
                         candidate=case.candidate, baseline=case.baseline,
                         error=f"build() raised {type(e).__name__}: {e}"[:500])]
            log("".join(traceback.format_exception_only(type(e), e)).strip())
        for r in rows:
            r["case_seconds"] = round(time.perf_counter() - tc, 2)
            r["params"] = _jsonable(r.get("params"))
            if r.get("error"):
                log(f"[kernels]   {r['impl']}: {r['error']}")
        result["rows"] += rows
        if on_progress is not None:
            on_progress(result)
    reset_device(device)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def interleave(cases: list[Case]) -> list[Case]:
    """Round-robin over ops, each op's cases in their own order (its record shape first), so a run cut short by a
    time limit has measured every op."""
    by_op: dict[str, list[Case]] = {}
    for c in cases:
        by_op.setdefault(c.op, []).append(c)
    queues = list(by_op.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def metrics(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """History metrics: ``kernels/<case>/<impl>/ms`` (lower) and ``kernels/<case>/speedup`` of the candidate
    over the baseline (higher)."""
    out: dict[str, dict[str, Any]] = {}
    for r in result.get("rows", []):
        if r.get("ms") is None:
            continue
        out[f"kernels/{r['case']}/{r['impl']}/ms"] = metric(r["ms"], "ms", "lower")
        if r["impl"] == r.get("candidate") and r.get("speedup") is not None and r["impl"] != r.get("baseline"):
            out[f"kernels/{r['case']}/speedup"] = metric(r["speedup"], "x", "higher")
    return out


def format_table(result: dict[str, Any]) -> str:
    """The printed table: op, case, impl, ms, TFLOP/s, GB/s, speedup vs baseline, peak MiB."""
    head = ("op", "case", "impl", "ms", "TFLOP/s", "GB/s", "speedup", "peak MiB")
    rows = [head]
    for r in result.get("rows", []):
        impl = r["impl"] + (" *" if r["impl"] == r.get("candidate") else "") + \
            (" (base)" if r["impl"] == r.get("baseline") else "")
        if r.get("error"):
            rows.append((r["op"], r["case"], impl, "error", "", "", "", ""))
            continue
        rows.append((r["op"], r["case"], impl, f"{r['ms']:.4f}" if r["ms"] < 1 else f"{r['ms']:.3f}",
                     _num(r['tflops']) if r.get("tflops") is not None else "-",
                     _num(r['gbps']) if r.get("gbps") is not None else "-",
                     f"{r['speedup']:.2f}x" if r.get("speedup") is not None else "-",
                     f"{r['peak_mib']:.1f}" if r.get("peak_mib") is not None else "-"))
    lines = []
    if len(rows) > 1:
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
        for j, row in enumerate(rows):
            lines.append("  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("* = implementation under test; (base) = what the speedup is relative to")
    else:
        lines.append("no kernel benchmark cases ran")
    bad = {op: st for op, st in result.get("ops", {}).items() if st["status"] != "ok"}
    for op, st in bad.items():
        lines.append(f"{op}: {st['status']} ({st['error']})")
    return "\n".join(lines)


def _num(x: float) -> str:
    """1234.5 → '1234', 12.34 → '12.3', 0.01234 → '0.0123'."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"
