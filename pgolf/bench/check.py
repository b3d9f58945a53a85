"""``pgolf-bench check``: did the newest run get slower than its base?

The *newest run* is the latest record (by date, then file order) of this device kind — by default the device
this command runs on (``cpu`` without CUDA), or ``--device-kind``. Its *base* is a record that is comparable (same
device kind, same suite, same smoke flag; see :func:`pgolf.bench.history.comparable`):

- ``--base REV``: the newest comparable record whose commit is REV (a full or short sha, or anything
  ``git rev-parse`` resolves), other than the newest run itself;
- otherwise the comparable record just before the newest run.

Every metric with a direction is compared: ``lower``-is-better metrics regress when ``(new − base)/base`` exceeds
the threshold, ``higher``-is-better ones when ``(base − new)/base`` does. The threshold is the metric's own
``threshold`` if it has one, else ``--threshold`` (default 0.05). Metrics present on one side only are listed
(``missing`` / ``new``) and do not fail the check unless ``--strict``; informational metrics (no direction) are
never compared. Exit status: 1 when something regressed; 2 when there is nothing valid to compare although the user
asked for something (:func:`check_history`: a ``--history`` file that does not exist, a history whose lines are all
unreadable, a newest line that is truncated, so the newest run would be lost and the wrong pair judged, or a
``--base`` revision no comparable run has); 0 otherwise, including when the history simply has no comparable base
yet (a CPU CI machine has no GPU history), which is said plainly. The output names the two records compared, with
their history line numbers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pgolf.bench.history import comparable


@dataclass
class Row:
    name: str
    base: float | None
    new: float | None
    unit: str
    better: str | None
    change: float | None     # (new − base) / base, signed
    worse_by: float | None   # the fraction by which new is worse than base (negative: better)
    threshold: float | None
    status: str              # regressed | improved | ok | missing | new | info | skipped


@dataclass
class CheckResult:
    newest: dict[str, Any] | None
    base: dict[str, Any] | None
    rows: list[Row]
    message: str
    error: str | None = None  # nothing valid to compare although something was asked for (exit 2)

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.status == "regressed"]

    def exit_code(self, strict: bool = False) -> int:
        if self.error:
            return 2
        if self.regressions:
            return 1
        if strict and any(r.status == "missing" for r in self.rows):
            return 1
        return 0


def _order_key(indexed: tuple[int, dict[str, Any]]) -> tuple[str, int]:
    i, r = indexed
    return (str(r.get("date") or ""), i)


def _commit_matches(record: dict[str, Any], revs: Sequence[str]) -> bool:
    commit = str(record.get("commit") or "").lower()
    short = str(record.get("commit_short") or "").lower()
    for rev in revs:
        rev = rev.lower()
        if not rev:
            continue
        if commit and (commit == rev or (len(rev) >= 4 and commit.startswith(rev))):
            return True
        if short and short == rev:
            return True
    return False


def select_runs(records: list[dict[str, Any]], device_kind: str, base_rev: str | None = None,
                suite: str | None = None) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str]:
    """(newest, base, message): the newest record of ``device_kind`` (optionally of ``suite``) and its base."""
    mine = [(i, r) for i, r in enumerate(records) if r.get("device_kind") == device_kind
            and (suite is None or r.get("suite") == suite)]
    if not mine:
        kinds = sorted({str(r.get("device_kind")) for r in records})
        other = f" (history has runs on: {', '.join(kinds)})" if kinds else " (the history is empty)"
        return None, None, f"no benchmark runs on device kind '{device_kind}'{other}: nothing to compare"
    mine.sort(key=_order_key)
    newest_i, newest = mine[-1]
    earlier = [(i, r) for i, r in mine[:-1] if comparable(r, newest)]
    what = f"suite '{newest.get('suite')}'{' (smoke)' if newest.get('smoke') else ''} on '{device_kind}'"
    if base_rev:
        from pgolf.bench.env import resolve_rev

        revs = [base_rev, resolve_rev(base_rev)]
        cands = [(i, r) for i, r in mine if i != newest_i and comparable(r, newest) and _commit_matches(r, revs)]
        if not cands:
            return newest, None, (f"no comparable base: no other run of {what} has commit {base_rev}"
                                  f"{' (' + revs[1][:12] + ')' if revs[1] != base_rev else ''}")
        return newest, cands[-1][1], f"base: newest run of {what} at commit {base_rev}"
    if not earlier:
        return newest, None, f"no comparable base: the newest run is the only run of {what}"
    return newest, earlier[-1][1], f"base: the previous run of {what}"


def compare(newest: dict[str, Any], base: dict[str, Any], threshold: float = 0.05) -> list[Row]:
    """One :class:`Row` per metric name present in either record."""
    nm, bm = newest.get("metrics", {}), base.get("metrics", {})
    rows = []
    for name in sorted(set(nm) | set(bm)):
        n, b = nm.get(name), bm.get(name)
        meta = n or b
        better = meta.get("better")
        unit = meta.get("unit", "")
        own = (n or {}).get("threshold", (b or {}).get("threshold"))
        thr = float(own) if own is not None else threshold
        nv = _val(n)
        bv = _val(b)
        if nv is None and bv is None:
            continue
        if nv is None:
            rows.append(Row(name, bv, None, unit, better, None, None, thr, "missing"))
            continue
        if bv is None:
            rows.append(Row(name, None, nv, unit, better, None, None, thr, "new"))
            continue
        change = (nv - bv) / bv if bv else None
        if better is None:
            rows.append(Row(name, bv, nv, unit, better, change, None, None, "info"))
            continue
        if not bv > 0:
            rows.append(Row(name, bv, nv, unit, better, None, None, thr, "skipped"))
            continue
        worse = (nv - bv) / bv if better == "lower" else (bv - nv) / bv
        status = "regressed" if worse > thr else "improved" if worse < -thr else "ok"
        rows.append(Row(name, bv, nv, unit, better, change, worse, thr, status))
    order = {"regressed": 0, "missing": 1, "improved": 2, "ok": 3, "new": 4, "skipped": 5, "info": 6}
    rows.sort(key=lambda r: (order[r.status], r.name))
    return rows


def _val(m: dict[str, Any] | None) -> float | None:
    if not m or m.get("value") is None:
        return None
    v = float(m["value"])
    return v if math.isfinite(v) else None


def check(records: list[dict[str, Any]], device_kind: str, *, base_rev: str | None = None, threshold: float = 0.05,
          suite: str | None = None) -> CheckResult:
    """Select the newest run and its base and compare them; a ``base_rev`` without a comparable run is an error."""
    newest, base, msg = select_runs(records, device_kind, base_rev, suite)
    rows = compare(newest, base, threshold) if newest is not None and base is not None else []
    error = f"--base {base_rev}: {msg}" if base_rev and base is None else None
    return CheckResult(newest, base, rows, msg, error)


def check_history(path: str | os.PathLike, device_kind: str, *, explicit: bool = True, base_rev: str | None = None,
                  threshold: float = 0.05, suite: str | None = None) -> CheckResult:
    """:func:`check` on the history file ``path``, refusing (``error``) a history it cannot trust: a missing file
    named by the user (``explicit``), lines none of which is a record, or an unreadable newest line."""
    p = Path(path)
    if not p.is_file():
        if explicit:
            return CheckResult(None, None, [], "", f"--history {p} does not exist (check the path)")
        return check([], device_kind, base_rev=base_rev, threshold=threshold, suite=suite)
    records, bad, last = _read_lines(p)
    if bad and not records:
        return CheckResult(None, None, [], "", f"{p}: none of its {len(bad)} non-empty lines is a benchmark record "
                                               f"(lines {', '.join(map(str, bad[:5]))}...): nothing valid to compare")
    if bad and bad[-1] == last:
        return CheckResult(None, None, [], "", f"{p}:{last}: the newest line is not a complete benchmark record "
                                               f"(truncated?); the newest run would be lost and the wrong pair "
                                               f"compared. Repair or remove that line")
    res = check(records, device_kind, base_rev=base_rev, threshold=threshold, suite=suite)
    if bad:
        res.message += f" ({len(bad)} unreadable line(s) skipped: {', '.join(map(str, bad[:5]))})"
    return res


def run_check(history: str | None, device_kind: str, *, base_rev: str | None = None, threshold: float = 0.05,
              suite: str | None = None, strict: bool = False, show_all: bool = False) -> int:
    """``pgolf-bench check``: print what was compared (or why nothing could be) and return the exit status."""
    import sys

    from pgolf.bench.history import default_history_path

    path = Path(history) if history else default_history_path()
    res = check_history(path, device_kind, explicit=bool(history), base_rev=base_rev, threshold=threshold,
                        suite=suite)
    if res.error:
        print(f"pgolf-bench check: error: {res.error}", file=sys.stderr)
        return res.exit_code(strict)
    print(f"history: {path}; device kind: {device_kind}; threshold {threshold:.0%}")
    print(format_result(res, show_all=show_all))
    if res.base is None:
        print("check: nothing to compare, exit 0")
    return res.exit_code(strict)


def _read_lines(path: Path) -> tuple[list[dict[str, Any]], list[int], int]:
    """(records with their ``_line``, numbers of the unreadable non-empty lines, number of the last non-empty)."""
    records, bad, last = [], [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            last = n
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if isinstance(rec, dict) and isinstance(rec.get("metrics"), dict):
                records.append(dict(rec, _line=n))
            else:
                bad.append(n)
    return records, bad, last


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.2f}"
    return f"{v:.4g}"


def format_result(res: CheckResult, *, show_all: bool = False) -> str:
    """The two records compared (with their history lines), then one row per metric and the verdict."""
    if res.error:
        return f"ERROR: {res.error} (exit 2)"
    lines = [res.message]
    if res.newest is None or res.base is None:
        if res.newest is not None:
            lines.insert(0, f"newest: {_describe(res.newest)}")
        return "\n".join(lines)
    lines = [f"newest: {_describe(res.newest)}", f"base:   {_describe(res.base)}", res.message, ""]
    shown = [r for r in res.rows if show_all or r.status != "info"]
    header = ("metric", "base", "new", "unit", "better", "change", "threshold", "status")
    table = [header] + [(r.name, _fmt(r.base), _fmt(r.new), r.unit, r.better or "-",
                         f"{r.change * 100:+.1f}%" if r.change is not None else "-",
                         f"{r.threshold * 100:.0f}%" if r.threshold is not None and r.better else "-",
                         r.status.upper() if r.status == "regressed" else r.status) for r in shown]
    lines += _table(table)
    counts = {s: sum(r.status == s for r in res.rows) for s in ("regressed", "improved", "ok", "missing", "new")}
    lines.append("")
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items()) + (
        f"; FAIL: {counts['regressed']} metric(s) worse than their threshold" if counts["regressed"] else "; PASS"))
    return "\n".join(lines)


def _describe(r: dict[str, Any]) -> str:
    dirty = " (dirty tree)" if r.get("dirty") else ""
    where = f"history line {r['_line']}: " if r.get("_line") else ""
    return (f"{where}{r.get('suite')}{' smoke' if r.get('smoke') else ''} @ {r.get('commit_short') or r.get('commit')}{dirty} "
            f"{r.get('date')} on {r.get('gpu_name') or r.get('device_kind')} (torch {r.get('torch')}, "
            f"triton {r.get('triton')})")


def _table(rows: list[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return out
