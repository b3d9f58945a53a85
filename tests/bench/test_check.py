"""The regression check on synthetic histories: what is caught, what is not, what is never compared."""

import json

import pytest

from pgolf.bench.check import check, compare, format_result, select_runs
from pgolf.bench.cli import main
from pgolf.bench.history import append_record, read_history
from tests.bench.helpers import rec

MS = "step/sota/auto/loop_off/ms_per_step"
TPS = "step/sota/auto/loop_off/tokens_per_s"


def _status(rows, name):
    return next(r.status for r in rows if r.name == name)


def test_regression_caught_and_noise_not():
    base = rec("aaaaaaa1", "2026-11-01T00:00:00Z", {MS: (100.0, "lower"), TPS: (1000.0, "higher"),
                                                     "k/x/ms": (1.0, "lower")})
    new = rec("bbbbbbb2", "2026-11-02T00:00:00Z", {MS: (107.0, "lower"), TPS: (970.0, "higher"),
                                                    "k/x/ms": (1.04, "lower")})
    res = check([base, new], "nvidia-h200")
    assert res.base is base and res.newest is new
    assert _status(res.rows, MS) == "regressed"          # 7% slower > 5%
    assert _status(res.rows, TPS) == "ok"                # 3% fewer tokens/s: noise
    assert _status(res.rows, "k/x/ms") == "ok"           # 4%: under the threshold
    assert res.exit_code() == 1
    assert "REGRESSED" in format_result(res)


def test_higher_is_better_direction_and_improvements():
    base = rec("aaaaaaa1", "2026-11-01T00:00:00Z", {TPS: (1000.0, "higher"), MS: (100.0, "lower")})
    new = rec("bbbbbbb2", "2026-11-02T00:00:00Z", {TPS: (900.0, "higher"), MS: (80.0, "lower")})
    rows = compare(new, base, 0.05)
    assert _status(rows, TPS) == "regressed"             # 10% less throughput
    assert _status(rows, MS) == "improved"
    assert compare(new, base, 0.15)[0].status != "regressed"  # a looser threshold lets it pass


def test_other_device_kinds_and_smoke_runs_are_never_compared():
    h200_old = rec("aaaaaaa1", "2026-11-01T00:00:00Z", {MS: (100.0, "lower")})
    h100 = rec("ccccccc3", "2026-11-02T00:00:00Z", {MS: (50.0, "lower")}, kind="nvidia-h100-80gb-hbm3")
    smoke = rec("ddddddd4", "2026-11-03T00:00:00Z", {MS: (1.0, "lower")}, smoke=True)
    h200_new = rec("bbbbbbb2", "2026-11-04T00:00:00Z", {MS: (101.0, "lower")})
    res = check([h200_old, h100, smoke, h200_new], "nvidia-h200")
    assert res.base is h200_old                          # not the H100 run nor the smoke run in between
    assert res.exit_code() == 0
    # the H100 kind alone has a single run: nothing to compare
    res = check([h200_old, h100, smoke, h200_new], "nvidia-h100-80gb-hbm3")
    assert res.base is None and res.exit_code() == 0 and "no comparable base" in res.message
    # a kind without any run
    res = check([h200_old], "cpu")
    assert res.newest is None and res.exit_code() == 0 and "no benchmark runs on device kind 'cpu'" in res.message


def test_other_suites_are_not_bases():
    a = rec("aaaaaaa1", "2026-11-01T00:00:00Z", {MS: (100.0, "lower")}, suite="step")
    b = rec("bbbbbbb2", "2026-11-02T00:00:00Z", {"kernels/x/ms": (1.0, "lower")}, suite="kernels")
    newest, base, msg = select_runs([a, b], "nvidia-h200")
    assert newest is b and base is None and "only run of suite 'kernels'" in msg
    newest, base, _ = select_runs([a, b, dict(a, date="2026-11-03T00:00:00Z")], "nvidia-h200", suite="step")
    assert base is a


def test_missing_new_info_and_bad_values():
    base = rec("aaaaaaa1", "2026-11-01T00:00:00Z", {MS: (100.0, "lower"), "gone/ms": (5.0, "lower"),
                                                     "peak/tflops": (700.0, None), "zero/ms": (0.0, "lower")})
    new = rec("bbbbbbb2", "2026-11-02T00:00:00Z", {MS: (100.0, "lower"), "fresh/ms": (3.0, "lower"),
                                                    "peak/tflops": (100.0, None), "zero/ms": (9.0, "lower")})
    new["metrics"]["nulled/ms"] = dict(value=None, unit="ms", better="lower")
    res = check([base, new], "nvidia-h200")
    st = {r.name: r.status for r in res.rows}
    assert st == {MS: "ok", "gone/ms": "missing", "fresh/ms": "new", "peak/tflops": "info", "zero/ms": "skipped"}
    assert res.exit_code() == 0                          # informational drops and missing metrics do not fail
    assert res.exit_code(strict=True) == 1               # unless --strict
    assert "peak/tflops" not in format_result(res) and "peak/tflops" in format_result(res, show_all=True)


def test_metric_own_threshold_overrides_default():
    base = rec("aaaaaaa1", "2026-11-01T00:00:00Z", {MS: (100.0, "lower")})
    new = rec("bbbbbbb2", "2026-11-02T00:00:00Z", {MS: (110.0, "lower")})
    new["metrics"][MS]["threshold"] = 0.2
    assert compare(new, base, 0.05)[0].status == "ok"
    new["metrics"][MS]["threshold"] = 0.0
    assert compare(new, base, 0.5)[0].status == "regressed"


def test_base_rev_selects_that_commit(tmp_path):
    runs = [rec("aaaaaaa1", "2026-11-01T00:00:00Z", {MS: (100.0, "lower")}),
            rec("bbbbbbb2", "2026-11-02T00:00:00Z", {MS: (150.0, "lower")}),
            rec("ccccccc3", "2026-11-03T00:00:00Z", {MS: (104.0, "lower")})]
    # default base: the previous run (b, 150 ms) → an improvement
    assert check(runs, "nvidia-h200").rows[0].status == "improved"
    # --base aaaaaaa: 104 vs 100 → ok; full sha works too
    res = check(runs, "nvidia-h200", base_rev="aaaaaaa1")
    assert res.base is runs[0] and res.rows[0].status == "ok"
    assert check(runs, "nvidia-h200", base_rev=runs[0]["commit"]).base is runs[0]
    # an unknown revision: nothing compared, which is an error (exit 2) naming the revision
    res = check(runs, "nvidia-h200", base_rev="0123456789")
    assert res.base is None and res.exit_code() == 2 and "has commit 0123456789" in res.error
    # the newest run is never its own base
    assert check(runs, "nvidia-h200", base_rev="ccccccc3").base is None


def test_newest_is_by_date_not_file_order():
    late = rec("bbbbbbb2", "2026-11-05T00:00:00Z", {MS: (120.0, "lower")})
    early = rec("aaaaaaa1", "2026-11-01T00:00:00Z", {MS: (100.0, "lower")})
    res = check([late, early], "nvidia-h200")  # e.g. after a merge put the older line last
    assert res.newest is late and res.base is early and res.exit_code() == 1


def test_cli_check_exit_codes(tmp_path, capsys):
    h = tmp_path / "history.jsonl"
    h.write_text("")
    assert main(["check", "--history", str(h)]) == 0     # no history yet (CPU CI: the repository's file is empty)
    assert "nothing to compare" in capsys.readouterr().out
    append_record(h, rec("aaaaaaa1", "2026-11-01T00:00:00Z", {MS: (100.0, "lower")}, kind="cpu"))
    append_record(h, rec("bbbbbbb2", "2026-11-02T00:00:00Z", {MS: (130.0, "lower")}, kind="cpu"))
    append_record(h, rec("ccccccc3", "2026-11-03T00:00:00Z", {MS: (1.0, "lower")}))  # another kind
    assert main(["check", "--history", str(h), "--device-kind", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED" in out and "+30.0%" in out
    assert main(["check", "--history", str(h), "--device-kind", "cpu", "--threshold", "0.5"]) == 0
    assert main(["check", "--history", str(h), "--device-kind", "nvidia-h200"]) == 0
    assert "no comparable base" in capsys.readouterr().out


def test_history_append_is_one_line_per_record_and_survives_a_torn_line(tmp_path):
    h = tmp_path / "h.jsonl"
    append_record(h, rec("aaaaaaa1", "2026-11-01T00:00:00Z", {MS: (100.0, "lower")}))
    with open(h, "a") as f:
        f.write('{"schema": 1, "metrics": {"x"')        # a writer that died mid-line
    append_record(h, rec("bbbbbbb2", "2026-11-02T00:00:00Z", {MS: (101.0, "lower")}))
    lines = h.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["commit_short"] == "bbbbbbb"
    with pytest.warns(UserWarning, match="not valid JSON"):
        records = read_history(h)
    assert [r["commit_short"] for r in records] == ["aaaaaaa", "bbbbbbb"]
