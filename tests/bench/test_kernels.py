"""``pgolf-bench kernels``: discovery of the per-op modules, tolerance of broken ones, rows, table, metrics."""

import json
import sys
import textwrap
import uuid

import pytest
import torch

from pgolf.bench import kernels
from pgolf.bench.cli import main
from pgolf.bench.core import Case, run_case

GOOD = '''
import time
import torch
from pgolf.bench.core import Case

def cases(smoke, device):
    def build():
        x = torch.ones(8, device=device)
        def broken():
            raise RuntimeError("kernel exploded")
        return {"fast": lambda: x * 2, "slow": lambda: (time.sleep(0.002), x * 2), "broken": broken}
    return [Case(op="good", name=f"good fwd n=8 smoke={smoke}", mode="fwd", build=build, baseline="slow",
                 candidate="fast", params=dict(n=8, dtype=torch.float32), flops=2e6, bytes_moved=4e6)]
'''


@pytest.fixture()
def fake_ops(tmp_path, monkeypatch):
    name = f"fake_ops_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(textwrap.dedent(GOOD))
    (pkg / "bad_import.py").write_text("import definitely_not_a_module_xyz\n")
    (pkg / "nocases.py").write_text("X = 1\n")
    (pkg / "raising.py").write_text("def cases(smoke, device):\n    raise ValueError('no shapes today')\n")
    (pkg / "_helpers.py").write_text("raise SystemExit('private modules must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for m in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[m]


def test_discover_tolerates_broken_modules(fake_ops):
    found = kernels.discover(fake_ops)
    assert set(found) == {"good", "bad_import", "nocases", "raising"}
    assert "import failed: ModuleNotFoundError" in found["bad_import"]
    assert found["nocases"] == "defines no cases(smoke, device)"


def test_run_kernels_rows_errors_and_metrics(fake_ops):
    logs = []
    progress = []
    res = kernels.run_kernels(smoke=True, device=torch.device("cpu"), package=fake_ops, reps=3, log=logs.append,
                              on_progress=lambda r: progress.append(len(r["rows"])))
    assert progress == [3]
    st = res["ops"]
    assert st["good"]["status"] == "ok" and st["good"]["cases"] == 1
    assert st["bad_import"]["status"] == "error" and st["raising"]["status"] == "error"
    assert "no shapes today" in st["raising"]["error"]
    for op in kernels.EXPECTED_OPS:                       # the real op names are reported as missing
        assert st[op]["status"] == "missing"
    rows = {r["impl"]: r for r in res["rows"]}
    assert rows["broken"]["ms"] is None and "kernel exploded" in rows["broken"]["error"]
    assert rows["slow"]["speedup"] == pytest.approx(1.0)
    assert rows["fast"]["speedup"] > 1.5                  # 2 ms of sleep vs a tiny multiply
    assert rows["fast"]["tflops"] == pytest.approx(2e6 / rows["fast"]["ms"] / 1e9)
    assert rows["fast"]["ms_p20"] <= rows["fast"]["ms"] <= rows["fast"]["ms_p80"]
    assert rows["fast"]["params"] == {"n": 8, "dtype": "torch.float32"}   # made JSON-safe
    json.dumps(res)
    table = kernels.format_table(res)
    for word in ("op", "case", "impl", "ms", "TFLOP/s", "GB/s", "speedup", "peak MiB", "fast *", "slow (base)",
                 "error", "bad_import: error"):
        assert word in table
    m = kernels.metrics(res)
    case = "good fwd n=8 smoke=True"
    assert m[f"kernels/{case}/fast/ms"]["better"] == "lower"
    assert m[f"kernels/{case}/speedup"]["better"] == "higher" and m[f"kernels/{case}/speedup"]["value"] > 1.5
    assert f"kernels/{case}/broken/ms" not in m


def test_ops_filter(fake_ops):
    cases, st = kernels.collect_cases(kernels.discover(fake_ops), smoke=True, device=torch.device("cpu"),
                                      ops=["good", "mlp", "nope"])
    assert [c.op for c in cases] == ["good"]
    assert st["mlp"]["status"] == "missing" and st["nope"]["status"] == "unknown"
    assert "raising" not in st                             # not asked for: not reported


def test_run_case_raises_by_default_and_keeps_row_keys():
    case = Case(op="x", name="x", mode="fwd", build=lambda: {"a": lambda: 1 / 0}, baseline="a")
    with pytest.raises(ZeroDivisionError):
        run_case(case, torch.device("cpu"))
    [row] = run_case(case, torch.device("cpu"), errors="record")
    assert row["error"].startswith("ZeroDivisionError") and row["speedup"] is None


def test_cli_kernels_with_unknown_op_writes_json(tmp_path, capsys):
    out = tmp_path / "k.json"
    rc = main(["kernels", "--smoke", "--ops", "no_such_op", "--json", str(out), "--no-history"])
    assert rc == 1
    data = json.loads(out.read_text())
    assert data["suite"] == "kernels" and data["result"]["ops"]["no_such_op"]["status"] == "unknown"
    for key in ("gpu_name", "torch", "triton", "commit", "device_kind", "date"):
        assert key in data["meta"]
    assert "no kernel benchmark cases ran" in capsys.readouterr().out
