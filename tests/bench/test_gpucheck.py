"""``gpu-check`` orchestration with stand-in stages: nothing stops at the first failure, one results JSON with
every section, one history record, a non-zero exit when tests failed."""

import json
import sys

import pytest

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


def test_results_are_on_disk_after_every_stage_and_copied(tmp_path, monkeypatch):
    """A later stage sees the combined JSON with the earlier stage in it, in the results folder and in --copy-to;
    the tuned-config file travels with the copy."""
    import pgolf.bench.gpucheck as G

    tuned = tmp_path / "tuned" / "fake_gpu.json"
    tuned.parent.mkdir()
    tuned.write_text(json.dumps({"gpu": "Fake GPU", "ops": {"mlp": {"up_fwd|m=16": {"BM": 64}}}}))
    monkeypatch.setattr(G, "_tuned_file", lambda device: tuned)
    res, copy = tmp_path / "res", tmp_path / "copy"
    probe = ("import glob, json, sys; "
             f"found = [json.load(open(p)) for d in ({str(res)!r}, {str(copy)!r}) for p in glob.glob(d + '/*.json') "
             "if 'fake_gpu' not in p]; "
             "sys.exit(0 if len(found) == 2 and all('first' in f['stages'] and f['status'] == 'running' "
             "for f in found) else 7)")
    stages = [Stage("first", _py("print('one')"), 1.0), Stage("second", _py(probe), 1.0)]
    rc, combined, path = run_gpu_check(budget_s=60, results_dir=res, history=tmp_path / "h.jsonl", stages=stages,
                                       min_stage_s=1.0, copy_to=str(copy), echo=lambda s: None)
    assert combined["stages"]["second"]["rc"] == 0 and rc == 0
    assert combined["tuned"]["content"]["ops"]["mlp"] == {"up_fwd|m=16": {"BM": 64}}
    assert json.loads((copy / "fake_gpu.json").read_text()) == json.loads(tuned.read_text())
    assert json.loads((copy / path.name).read_text())["status"]["exit"] == 0  # the final version replaced it
    assert (copy / "logs" / "first.log").read_text().startswith("one")


def test_a_test_stage_cut_at_its_limit_keeps_its_streamed_results(tmp_path):
    stream = ("import glob, json, time; d = glob.glob({res!r} + '/.tmp-*')[0]; "
              "f = open(d + '/tests.jsonl', 'a'); "
              "f.write(json.dumps(dict(id='t::a', outcome='passed', seconds=0.1, message='')) + '\\n'); "
              "f.write(json.dumps(dict(id='t::b', outcome='failed', seconds=0.2, message='bf16 off')) + '\\n'); "
              "f.close(); print('streamed', flush=True); time.sleep(60)")
    res = tmp_path / "res"
    stages = [Stage("tests", _py(stream.format(res=str(res))), 1.0)]
    rc, combined, _ = run_gpu_check(budget_s=3, results_dir=res, history=tmp_path / "h.jsonl", stages=stages,
                                    min_stage_s=1.0, echo=lambda s: None)
    t = combined["tests"]
    assert t["timed_out"] and t["source"] == "stream" and t["passed"] == 1 and t["failures"] == 1
    assert t["failed"][0]["id"] == "t::b" and rc == 1


def test_default_plan_fits_one_ten_minute_command(tmp_path):
    """The default budget leaves time to spare in a 600 s call even if every stage ran past its limit until killed
    and then got only its floor; the tests run the defaults, the benchmarks tune and write the tuned file, the
    kernel tests come first."""
    from pgolf.bench.gpucheck import DEFAULT_BUDGET_S, KILL_GRACE_S, MIN_STAGE_S, default_stages

    stages = default_stages("python3", tmp_path)
    assert DEFAULT_BUDGET_S + len(stages) * (MIN_STAGE_S + KILL_GRACE_S + 1) <= 600 - 45
    assert [s.name for s in stages] == ["tests", "kernels", "step", "eval"]
    assert stages[0].env["PGOLF_AUTOTUNE"] == "0"
    assert all(s.env == {"PGOLF_AUTOTUNE": "1", "PGOLF_TUNED_WRITE": "1"} for s in stages[1:])
    pytest_args = stages[0].argv[stages[0].argv.index("pgolf.bench.pytest_stream") + 1:]
    assert [a for a in pytest_args if a.startswith("tests/")][0] == "tests/kernels"
    assert "--loop" in stages[2].argv and stages[2].argv[stages[2].argv.index("--loop") + 1] == "off"


def test_pytest_stream_plugin_writes_each_outcome_and_runs_compiles_last(tmp_path):
    import os
    import subprocess

    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_compile_whole_model():\n    pass\n"
        "def test_fails():\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n"
        "def test_ok():\n    pass\n")
    stream = tmp_path / "out.jsonl"
    env = dict(os.environ, PGOLF_TEST_STREAM=str(stream))
    env.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pgolf.bench.pytest_stream", "-p",
                    "no:cacheprovider", str(tmp_path / "test_x.py")], env=env, cwd=tmp_path, capture_output=True)
    lines = [json.loads(ln) for ln in stream.read_text().splitlines()]
    assert [ln["id"].split("::")[1] for ln in lines] == ["test_fails", "test_skipped", "test_ok",
                                                         "test_compile_whole_model"]
    assert [ln["outcome"] for ln in lines] == ["failed", "skipped", "passed", "passed"]
    assert "one is not two" in lines[0]["message"]
    from pgolf.bench.pytest_stream import read_stream

    got = read_stream(stream)
    assert (got["tests"], got["passed"], got["failures"], got["skipped"]) == (4, 2, 1, 1)


@pytest.mark.slow
def test_smoke_gpu_check_end_to_end_on_cpu(tmp_path):
    """The real default stages with --smoke on this CPU machine: GPU tests collected and skipped, every benchmark
    section filled, one history record, everything copied."""
    from pgolf.bench.cli import main

    res, copy = tmp_path / "res", tmp_path / "copy"
    rc = main(["gpu-check", "--smoke", "--results-dir", str(res), "--history", str(tmp_path / "h.jsonl"),
               "--copy-to", str(copy), "--budget-s", "400"])
    [path] = res.glob("*.json")
    out = json.loads(path.read_text())
    assert rc == 0 and out["status"] == {"exit": 0, "tests_failed": False, "failed_stages": []}
    assert out["tests"]["skipped"] > 10 and out["tests"]["failures"] == 0  # collected, skipped without a GPU
    assert {r["op"] for r in out["kernels"]["rows"]} >= {"mlp", "softcap_ce", "attention", "newton_schulz",
                                                         "int6_matmul"}
    assert out["step"]["variants"]["auto"]["modes"]["loop_off"]["ms_per_step"] > 0
    assert out["eval"]["sliding"]["seconds"] > 0
    assert (copy / path.name).is_file() and (copy / "h.jsonl").is_file()
    assert sorted(p.name for p in (copy / "logs").iterdir()) == ["eval.log", "kernels.log", "step.log", "tests.log"]
    [rec] = read_history(tmp_path / "h.jsonl")
    assert rec["smoke"] is True and rec["results_file"].endswith(path.name)
