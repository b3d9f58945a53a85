"""``gpu-check`` orchestration with stand-in stages: nothing stops at the first failure, one results JSON with
every section, one history record, a non-zero exit when tests failed."""

import json
import sys

from pgolf.bench.gpucheck import Stage, parse_junit, results_filename, run_gpu_check
from pgolf.bench.history import read_history

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="1" tests="4" time="1.5"><testcase classname="tests.kernels.test_mlp" name="test_ok" time="0.1"/>
<testcase classname="tests.kernels.test_mlp" name="test_bf16" time="0.2"><failure message="assert 0.3 &lt; 0.1">
trace</failure></testcase><testcase classname="t" name="s"><skipped message="no"/></testcase>
<testcase classname="t" name="ok2"/></testsuite></testsuites>"""

STEP_RESULT = {"preset": "tiny", "peak": {"tflops": 1.0}, "variants": {"auto": {"modes": {"loop_off": {
    "ms_per_step": 10.0, "tokens_per_s": 100.0, "mfu": 0.1, "first_step_s": 1.0}}}}, "projection": {"auto": None}}


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_gpu_check_runs_every_stage_and_reports(tmp_path):
    junit = tmp_path / "res" / "junit_src.xml"
    junit.parent.mkdir()
    junit.write_text(JUNIT)
    out = {n: tmp_path / f"{n}.json" for n in ("kernels", "step", "eval")}
    stages = [
        Stage("tests", _py("import shutil, sys, glob; "
                           f"shutil.copy({str(junit)!r}, glob.glob({str(tmp_path / 'res' / '.tmp-*')!r})[0] + "
                           "'/junit.xml'); print('1 failed'); sys.exit(1)"), 1.0),
        Stage("kernels", _py("import json; json.dump({'suite': 'kernels', 'result': {'ops': {}, 'rows': [{"
                             "'op': 'mlp', 'case': 'mlp fwd', 'impl': 'triton', 'ms': 1.0, 'candidate': 'triton', "
                             "'baseline': 'eager', 'speedup': 2.0}]}}, "
                             f"open({str(out['kernels'])!r}, 'w')); print('kernels done')"), 1.0, str(out["kernels"])),
        Stage("step", _py("import json, sys; json.dump({'result': " + repr(STEP_RESULT) + "}, "
                          f"open({str(out['step'])!r}, 'w')); print('partial', end=''); sys.exit(3)"), 1.0,
              str(out["step"])),
        Stage("eval", _py("import time; print('hanging', flush=True); time.sleep(60)"), 1.0, str(out["eval"])),
    ]
    lines = []
    hist = tmp_path / "history.jsonl"
    rc, combined, path = run_gpu_check(budget_s=5, results_dir=tmp_path / "res", history=hist, stages=stages,
                                       min_stage_s=1.0, copy_to=str(tmp_path / "copy"), echo=lines.append)
    assert rc == 1
    assert list(combined["stages"]) == ["tests", "kernels", "step", "eval"]   # nothing stopped at the failure
    assert combined["stages"]["tests"]["rc"] == 1
    assert combined["stages"]["step"]["rc"] == 3 and "partial" in combined["stages"]["step"]["tail"]
    assert combined["stages"]["eval"]["timed_out"] is True
    assert combined["tests"]["failures"] == 1 and combined["tests"]["passed"] == 2
    assert combined["tests"]["failed"][0]["id"] == "tests.kernels.test_mlp::test_bf16"
    assert combined["kernels"]["rows"][0]["speedup"] == 2.0
    assert combined["step"]["preset"] == "tiny"           # a failed stage still contributes what it wrote
    assert "error" in combined["eval"]
    assert combined["status"] == {"exit": 1, "tests_failed": True, "failed_stages": ["step", "eval"]}
    saved = json.loads(path.read_text())
    assert set(saved) >= {"meta", "stages", "tests", "kernels", "step", "eval"}
    assert path.parent == tmp_path / "res" and path.name == results_filename(saved["meta"])
    assert not list((tmp_path / "res").glob(".tmp-*"))
    assert (tmp_path / "res" / "logs" / path.stem / "eval.log").read_text().startswith("hanging")
    assert (tmp_path / "copy" / path.name).exists() and (tmp_path / "copy" / "history.jsonl").exists()
    [rec] = read_history(hist)
    assert rec["suite"] == "gpu-check" and rec["results_file"].endswith(path.name)
    assert rec["metrics"]["kernels/mlp fwd/speedup"]["value"] == 2.0
    assert rec["metrics"]["step/tiny/auto/loop_off/ms_per_step"]["better"] == "lower"
    assert rec["metrics"]["tests/gpu/failed"] == {"value": 1.0, "unit": "tests", "better": "lower", "threshold": 0.0}
    text = "\n".join(lines)
    assert "FAILED tests.kernels.test_mlp::test_bf16" in text and "exit status 1" in text


def test_gpu_check_all_green_exits_zero(tmp_path):
    stages = [Stage("tests", _py("import sys; sys.exit(5)"), 1.0),      # pytest: no GPU tests collected
              Stage("kernels", _py("print('ok')"), 1.0)]
    rc, combined, _ = run_gpu_check(budget_s=30, results_dir=tmp_path, history=tmp_path / "h.jsonl", stages=stages,
                                    min_stage_s=1.0, echo=lambda s: None)
    assert rc == 0 and combined["status"]["failed_stages"] == []


def test_parse_junit_missing(tmp_path):
    assert parse_junit(tmp_path / "nope.xml") is None
    (tmp_path / "bad.xml").write_text("<not xml")
    assert parse_junit(tmp_path / "bad.xml") is None


def test_results_filename():
    env = dict(date="2026-11-21T11:30:05Z", device_kind="nvidia-h200", commit_short="d5cdaef")
    assert results_filename(env) == "20261121-113005_nvidia-h200_d5cdaef.json"
