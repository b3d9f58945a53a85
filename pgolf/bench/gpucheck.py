"""``make gpu-check`` / ``pgolf-bench gpu-check``: everything a GPU machine should run, in one command.

Stages, each a subprocess so that a crash (an illegal memory access poisons the CUDA context) or a hang in one
cannot take the others down, each with its own time limit:

1. ``tests``: ``python -m pytest -m gpu tests`` (the GPU-marked tests), with a JUnit XML report;
2. ``kernels``: ``pgolf-bench kernels``;
3. ``step``: ``pgolf-bench step --preset sota``;
4. ``eval``: ``pgolf-bench eval --preset sota``
(``--smoke`` runs all three with ``--smoke`` and the ``tiny`` preset: a harness check that also works on CPU).

Nothing stops at the first failure. The time budget (default 1140 s) is shared out in proportion to
``Stage.share``; what an early stage leaves unused goes to the later ones. The benchmarks write their JSON after
every case / variant, so a stage that runs out of time still contributes what it measured. At the end one JSON
with the sections ``meta``, ``stages``, ``tests``, ``kernels``, ``step``, ``eval`` is written to
``bench/results/<date>_<device kind>_<commit>.json``, one ``gpu-check`` record with every metric is appended to the
history, and the exit status is non-zero when a test failed or a stage failed.
"""

from __future__ import annotations

import codecs
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pgolf.utils import atomic_write_json

DEFAULT_BUDGET_S = 1140.0


@dataclass
class Stage:
    name: str
    argv: list[str]
    share: float
    output: str | None = None      # JSON file the stage writes (read back into the section of the same name)
    env: dict[str, str] = field(default_factory=dict)


def default_stages(python: str, tmp: Path, *, smoke: bool = False, pytest_args: list[str] | None = None,
                   step_steps: int | None = None, preset: str | None = None) -> list[Stage]:
    bench = [python, "-m", "pgolf.bench"]
    preset = preset or ("tiny" if smoke else "sota")
    sm = ["--smoke"] if smoke else []
    step_args = ["--steps", str(step_steps)] if step_steps else []
    return [
        Stage("tests", [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        "--continue-on-collection-errors",
                        f"--junitxml={tmp / 'junit.xml'}", *(pytest_args or ["tests"])], 0.20),
        Stage("kernels", [*bench, "kernels", *sm, "--json", str(tmp / "kernels.json"), "--no-history"], 0.25,
              str(tmp / "kernels.json")),
        Stage("step", [*bench, "step", "--preset", preset, *sm, *step_args, "--json", str(tmp / "step.json"),
                       "--no-history"], 0.40, str(tmp / "step.json")),
        Stage("eval", [*bench, "eval", "--preset", preset, *sm, "--json", str(tmp / "eval.json"), "--no-history"],
              0.15, str(tmp / "eval.json")),
    ]


def run_stage(stage: Stage, timeout: float, log_path: Path, env: dict[str, str],
              echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one stage, streaming its output to the console and ``log_path``; kill its process group on timeout."""
    t0 = time.perf_counter()
    echo(f"== gpu-check stage {stage.name} (limit {timeout:.0f}s): {' '.join(stage.argv)}")
    tail: list[str] = []
    timed_out = False
    with open(log_path, "w", encoding="utf-8") as logf:
        proc = subprocess.Popen(stage.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**env, **stage.env}, start_new_session=True)
        fd = proc.stdout.fileno()
        deadline = t0 + timeout
        pending = ""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def emit(text: str, final: bool = False) -> str:
            nonlocal tail
            logf.write(text)
            logf.flush()
            buf = pending + text
            lines = buf.split("\n")
            rest = "" if final else lines.pop()
            for ln in lines:
                echo(ln)
            tail = (tail + lines)[-40:]
            return rest

        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                timed_out = True
                _kill_group(proc)
                break
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                pending = emit(decoder.decode(chunk))
            elif proc.poll() is not None:
                # the child exited; drain what is left in the pipe
                while True:
                    ready, _, _ = select.select([fd], [], [], 0.1)
                    chunk = os.read(fd, 65536) if ready else b""
                    if not chunk:
                        break
                    pending = emit(decoder.decode(chunk))
                break
        if pending:
            emit("", final=True)
        proc.stdout.close()
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            rc = proc.wait()
        if timed_out:
            logf.write(f"\n[gpu-check] stage {stage.name} killed after {timeout:.0f}s\n")
    secs = time.perf_counter() - t0
    echo(f"== stage {stage.name}: rc {rc}{' (TIMED OUT)' if timed_out else ''} in {secs:.0f}s")
    return dict(rc=rc, seconds=round(secs, 1), timed_out=timed_out, limit_s=round(timeout, 1), log=str(log_path),
                argv=stage.argv, tail="\n".join(tail[-15:]))


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)  # the stage's own session: it and its children only
    except (ProcessLookupError, PermissionError):
        pass
    if sig == signal.SIGTERM:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def parse_junit(path: Path) -> dict[str, Any] | None:
    """Counts and failed test ids from a pytest JUnit XML report (None when absent or unreadable)."""
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    time_s = 0.0
    failed = []
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, 0) or 0)
        time_s += float(s.get("time", 0) or 0)
        for case in s.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                msg = (bad.get("message") or bad.text or "").strip().splitlines()
                failed.append(dict(id=f"{case.get('classname')}::{case.get('name')}",
                                   kind=bad.tag, message=(msg[0] if msg else "")[:300]))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return dict(**counts, seconds=round(time_s, 1), failed=failed)


def results_filename(env: dict[str, Any]) -> str:
    date = str(env.get("date", "")).replace("-", "").replace(":", "").replace("T", "-").rstrip("Z") or "nodate"
    return f"{date}_{env.get('device_kind', 'unknown')}_{env.get('commit_short', 'unknown')}.json"


def run_gpu_check(*, budget_s: float = DEFAULT_BUDGET_S, results_dir: str | os.PathLike = "bench/results",
                  history: str | os.PathLike | None = None, smoke: bool = False, python: str | None = None,
                  pytest_args: list[str] | None = None, step_steps: int | None = None, preset: str | None = None,
                  skip: tuple[str, ...] = (),
                  copy_to: str | None = None, stages: list[Stage] | None = None, min_stage_s: float = 30.0,
                  echo: Callable[[str], None] = print) -> tuple[int, dict[str, Any], Path]:
    """Run every stage; returns (exit status, the combined result, its path)."""
    from pgolf.bench import evalbench, kernels, step
    from pgolf.bench.env import REPO_ROOT, command_line, environment, resolve_device
    from pgolf.bench.history import append_record, default_history_path, make_record, metric

    t_start = time.perf_counter()
    device = resolve_device("auto")
    env_info = environment(device)
    results_dir = Path(results_dir)
    out_path = results_dir / results_filename(env_info)
    tmp = results_dir / f".tmp-{out_path.stem}"
    tmp.mkdir(parents=True, exist_ok=True)
    python = python or sys.executable
    stages = stages if stages is not None else default_stages(python, tmp, smoke=smoke, pytest_args=pytest_args,
                                                              step_steps=step_steps, preset=preset)
    stages = [s for s in stages if s.name not in skip]
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in
                                             child_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if env_info.get("commit") and env_info["commit"] != "unknown":
        child_env["PGOLF_COMMIT"] = env_info["commit"]
    echo(f"gpu-check on {env_info.get('gpu_name') or 'CPU'} ({env_info['device_kind']}), commit "
         f"{env_info['commit_short']}, torch {env_info['torch']}, triton {env_info['triton']}; budget {budget_s:.0f}s")
    combined: dict[str, Any] = dict(meta=env_info, budget_s=budget_s, smoke=smoke, command=command_line(), stages={},
                                    tests=None, kernels=None, step=None, eval=None)
    deadline = time.perf_counter() + budget_s
    for i, st in enumerate(stages):
        remaining = deadline - time.perf_counter()
        share = st.share / sum(s.share for s in stages[i:])
        limit = max(min_stage_s, remaining * share)
        info = run_stage(st, limit, tmp / f"{st.name}.log", child_env, echo)
        combined["stages"][st.name] = info
        if st.output:
            try:
                data = json.loads(Path(st.output).read_text())
                combined[st.name] = data.get("result", data)
            except (OSError, json.JSONDecodeError) as e:
                combined[st.name] = dict(error=f"no results from stage {st.name}: {e}")
        if st.name == "tests":
            combined["tests"] = parse_junit(tmp / "junit.xml") or dict(error="no JUnit report (see the stage log)")
            combined["tests"]["rc"] = info["rc"]
    combined["seconds"] = round(time.perf_counter() - t_start, 1)

    metrics: dict[str, dict[str, Any]] = {}
    for name, mod in (("kernels", kernels), ("step", step), ("eval", evalbench)):
        sec = combined.get(name)
        if isinstance(sec, dict) and "error" not in sec:
            try:
                metrics.update(mod.metrics(sec))
            except Exception as e:  # noqa: BLE001 - partial sections
                echo(f"[gpu-check] no metrics from {name}: {type(e).__name__}: {e}")
    t = combined.get("tests") or {}
    if "tests" in t:
        metrics["tests/gpu/failed"] = metric(t["failures"] + t["errors"], "tests", "lower", threshold=0.0)
        metrics["tests/gpu/passed"] = metric(t["passed"], "tests", None)

    tests_failed = bool(t.get("failures") or t.get("errors")) or (t.get("rc") not in (None, 0, 5))
    failed_stages = [n for n, s in combined["stages"].items()
                     if n != "tests" and (s["rc"] != 0 or s["timed_out"])]
    rc = 1 if tests_failed or failed_stages else 0
    combined["status"] = dict(exit=rc, tests_failed=tests_failed, failed_stages=failed_stages)
    atomic_write_json(out_path, combined)
    hist = Path(history) if history else default_history_path()
    rec = make_record("gpu-check", env_info, metrics, smoke=smoke, command=combined["command"],
                      results_file=_rel(out_path))
    append_record(hist, rec)
    shutil.rmtree(tmp / "__pycache__", ignore_errors=True)
    logs_dir = results_dir / "logs" / out_path.stem
    logs_dir.mkdir(parents=True, exist_ok=True)
    for f in tmp.glob("*.log"):
        shutil.move(str(f), logs_dir / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    if copy_to:
        dest = Path(copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out_path, dest / out_path.name)
        shutil.copy2(hist, dest / hist.name)
        shutil.copytree(logs_dir, dest / "logs", dirs_exist_ok=True)
    echo("")
    echo(f"gpu-check: {len(stages)} stages in {combined['seconds']:.0f}s; results {out_path}; history {hist}")
    if "tests" in t:
        echo(f"tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
        for f in t.get("failed", [])[:20]:
            echo(f"  FAILED {f['id']}: {f['message']}")
    for n in failed_stages:
        s = combined["stages"][n]
        echo(f"stage {n} failed: rc {s['rc']}{' (timed out)' if s['timed_out'] else ''}; log {logs_dir / (n + '.log')}")
    echo(f"exit status {rc}")
    return rc, combined, out_path


def _rel(p: Path) -> str:
    from pgolf.bench.env import REPO_ROOT

    try:
        return str(p.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(p)
