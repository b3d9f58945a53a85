"""``make gpu-check`` / ``pgolf-bench gpu-check``: everything a GPU machine should run, in one command that fits one
10-minute slot.

Stages, in the order of what is worth most if time runs out, each a subprocess so that a crash (an illegal memory
access poisons the CUDA context) or a hang in one cannot take the others down, each with its own time limit:

1. ``tests``: the GPU-marked tests (bf16 correctness of every kernel first: ``tests/kernels``, then the model,
   eval, training and bench ones; whole-model inductor compiles last), each outcome streamed to disk;
2. ``kernels``: ``pgolf-bench kernels``, every op against its best alternative, round-robin over ops with the
   record shapes first; its untimed first calls tune the launch configs the tuned file lacks;
3. ``step``: ``pgolf-bench step --preset sota --loop off`` (kernels vs the compiled reference);
4. ``eval``: ``pgolf-bench eval --preset sota`` (sliding eval and TTT projected to 8 GPUs against 600 s)
(``--smoke`` runs them with ``--smoke`` and the ``tiny`` preset: a harness check that also works on CPU).

Tuning: stages 2-4 run with ``PGOLF_AUTOTUNE=1 PGOLF_TUNED_WRITE=1``, so every launch config they tune is
written into this GPU's tuned-config file (``pgolf/kernels/tuned/<gpu>.json``) the moment it is picked; the
tests run the defaults (``PGOLF_AUTOTUNE=0``) and never write it.

Nothing stops at the first failure. The time budget (default 480 s, so the whole command ends well inside 10
minutes) is shared out in proportion to ``Stage.share``; what an early stage leaves unused goes to the later
ones. Every result is on disk as it is measured: the benchmarks rewrite their JSON after every case or variant,
the tests stream one line per outcome, and after every stage the combined JSON
``bench/results/<date>_<device kind>_<commit>.json`` (sections ``meta``, ``stages``, ``tests``, ``kernels``,
``step``, ``eval``, ``tuned``) is rewritten and, with ``--copy-to DIR``, copied to DIR together with the tuned
file and the logs. At the end one ``gpu-check`` record with every metric is appended to the history; the exit
status is non-zero when a test failed or a stage failed.
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

DEFAULT_BUDGET_S = 480.0
MIN_STAGE_S = 10.0   # a stage started after the budget is spent still gets this long
KILL_GRACE_S = 5.0   # between SIGTERM and SIGKILL of a stage past its limit
# Test folders in the order their GPU tests are worth most: kernel correctness first.
TEST_ORDER = ["tests/kernels", "tests/model", "tests/eval", "tests/train", "tests/quant", "tests/data", "tests/bench"]
TUNE_ENV = {"PGOLF_AUTOTUNE": "1", "PGOLF_TUNED_WRITE": "1"}


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
    if smoke:
        step_args = ["--steps", str(step_steps)] if step_steps else []
    else:  # one compile per variant is most of the stage: few steps are enough for a median
        step_args = ["--steps", str(step_steps or 10), "--warmup", "3"]
    return [
        Stage("tests", [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-p",
                        "pgolf.bench.pytest_stream", "--continue-on-collection-errors",
                        f"--junitxml={tmp / 'junit.xml'}", *(pytest_args or TEST_ORDER)], 0.30,
              env={"PGOLF_AUTOTUNE": "0", "PGOLF_TEST_STREAM": str(tmp / "tests.jsonl")}),
        Stage("kernels", [*bench, "kernels", *sm, "--json", str(tmp / "kernels.json"), "--no-history"], 0.30,
              str(tmp / "kernels.json"), env=dict(TUNE_ENV)),
        Stage("step", [*bench, "step", "--preset", preset, *sm, *step_args, "--loop", "off", "--json",
                       str(tmp / "step.json"), "--no-history"], 0.25, str(tmp / "step.json"), env=dict(TUNE_ENV)),
        Stage("eval", [*bench, "eval", "--preset", preset, *sm, *([] if smoke else ["--cuda-graphs"]), "--json",
                       str(tmp / "eval.json"), "--no-history"], 0.15, str(tmp / "eval.json"), env=dict(TUNE_ENV)),
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
            proc.wait(timeout=KILL_GRACE_S)
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
                  copy_to: str | None = None, stages: list[Stage] | None = None, min_stage_s: float = MIN_STAGE_S,
                  echo: Callable[[str], None] = print) -> tuple[int, dict[str, Any], Path]:
    """Run every stage; returns (exit status, the combined result, its path)."""
    from pgolf.bench.env import command_line, environment, resolve_device

    t_start = time.perf_counter()
    device = resolve_device("auto")
    env_info = environment(device)
    results_dir = Path(results_dir)
    out_path = results_dir / results_filename(env_info)
    tmp = results_dir / f".tmp-{out_path.stem}"
    logs_dir = results_dir / "logs" / out_path.stem
    tmp.mkdir(parents=True, exist_ok=True)
    logs_dir.mkdir(parents=True, exist_ok=True)
    stages = stages if stages is not None else default_stages(python or sys.executable, tmp, smoke=smoke,
                                                              pytest_args=pytest_args, step_steps=step_steps,
                                                              preset=preset)
    stages = [s for s in stages if s.name not in skip]
    echo(f"gpu-check on {env_info.get('gpu_name') or 'CPU'} ({env_info['device_kind']}), commit "
         f"{env_info['commit_short']}, torch {env_info['torch']}, triton {env_info['triton']}; budget {budget_s:.0f}s")
    combined: dict[str, Any] = dict(meta=env_info, budget_s=budget_s, smoke=smoke, command=command_line(), stages={},
                                    tests=None, kernels=None, step=None, eval=None, tuned=None, status="running")
    deadline = time.perf_counter() + budget_s
    for i, st in enumerate(stages):
        limit = max(min_stage_s, (deadline - time.perf_counter()) * st.share / sum(s.share for s in stages[i:]))
        info = run_stage(st, limit, logs_dir / f"{st.name}.log", _child_env(env_info), echo)
        _collect(combined, st, info, tmp)
        combined["seconds"] = round(time.perf_counter() - t_start, 1)
        _save(combined, out_path, logs_dir, copy_to, device)  # what is measured is on disk after every stage
    rc, hist = _finish(combined, env_info, history, out_path, smoke)
    _save(combined, out_path, logs_dir, copy_to, device, history=hist)
    shutil.rmtree(tmp, ignore_errors=True)
    _print_outcome(combined, out_path, hist, logs_dir, echo)
    return rc, combined, out_path


def _child_env(env_info: dict[str, Any]) -> dict[str, str]:
    from pgolf.bench.env import REPO_ROOT

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                            if p])
    if env_info.get("commit") and env_info["commit"] != "unknown":
        env["PGOLF_COMMIT"] = env_info["commit"]
    return env


def _collect(combined: dict[str, Any], st: Stage, info: dict[str, Any], tmp: Path) -> None:
    """Put a finished stage's outcome and results into the combined result."""
    combined["stages"][st.name] = info
    if st.output:
        try:
            data = json.loads(Path(st.output).read_text())
            combined[st.name] = data.get("result", data)
        except (OSError, json.JSONDecodeError) as e:
            combined[st.name] = dict(error=f"no results from stage {st.name}: {e}")
    if st.name == "tests":
        from pgolf.bench.pytest_stream import read_stream

        tests = parse_junit(tmp / "junit.xml") or read_stream(tmp / "tests.jsonl")
        combined["tests"] = dict(tests or dict(error="no JUnit report and no streamed results (see the stage log)"),
                                 rc=info["rc"], timed_out=info["timed_out"])


def _finish(combined: dict[str, Any], env_info: dict[str, Any], history, out_path: Path, smoke: bool
            ) -> tuple[int, Path]:
    """The verdict and the history record; returns (exit status, history path)."""
    from pgolf.bench import evalbench, kernels, step
    from pgolf.bench.history import append_record, default_history_path, make_record, metric

    metrics: dict[str, dict[str, Any]] = {}
    for name, mod in (("kernels", kernels), ("step", step), ("eval", evalbench)):
        sec = combined.get(name)
        if isinstance(sec, dict) and "error" not in sec:
            try:
                metrics.update(mod.metrics(sec))
            except Exception:  # noqa: BLE001 - a partial section gives no metrics
                pass
    t = combined.get("tests") or {}
    if "tests" in t:
        metrics["tests/gpu/failed"] = metric(t["failures"] + t["errors"], "tests", "lower", threshold=0.0)
        metrics["tests/gpu/passed"] = metric(t["passed"], "tests", None)
    tests_failed = bool(t.get("failures") or t.get("errors")) or (t.get("rc") not in (None, 0, 5))
    failed_stages = [n for n, s in combined["stages"].items() if n != "tests" and (s["rc"] != 0 or s["timed_out"])]
    rc = 1 if tests_failed or failed_stages else 0
    combined["status"] = dict(exit=rc, tests_failed=tests_failed, failed_stages=failed_stages)
    hist = Path(history) if history else default_history_path()
    append_record(hist, make_record("gpu-check", env_info, metrics, smoke=smoke, command=combined["command"],
                                    results_file=_rel(out_path)))
    return rc, hist


def _save(combined: dict[str, Any], out_path: Path, logs_dir: Path, copy_to: str | None, device,
          history: Path | None = None) -> None:
    """Write the combined JSON (with the tuned file as it is now) and copy results, tuned file, logs to copy_to."""
    tuned = _tuned_file(device)
    if tuned is not None and tuned.is_file():
        combined["tuned"] = dict(file=_rel(tuned), content=json.loads(tuned.read_text()))
    atomic_write_json(out_path, combined)
    if not copy_to:
        return
    dest = Path(copy_to)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out_path, dest / out_path.name)
    if tuned is not None and tuned.is_file():
        shutil.copy2(tuned, dest / tuned.name)
    if history is not None:
        shutil.copy2(history, dest / history.name)
    shutil.copytree(logs_dir, dest / "logs", dirs_exist_ok=True)


def _tuned_file(device) -> Path | None:
    """This GPU's tuned-config file (None off CUDA)."""
    if getattr(device, "type", None) != "cuda":
        return None
    from pgolf.kernels import tuning

    return tuning.path(device)


def _print_outcome(combined: dict[str, Any], out_path: Path, hist: Path, logs_dir: Path,
                   echo: Callable[[str], None]) -> None:
    t = combined.get("tests") or {}
    echo("")
    echo(f"gpu-check: {len(combined['stages'])} stages in {combined['seconds']:.0f}s; results {out_path}; "
         f"history {hist}")
    if combined.get("tuned"):
        echo(f"tuned launch configs: {combined['tuned']['file']}")
    if "tests" in t:
        echo(f"tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"
             f"{' (stopped at its time limit)' if t.get('timed_out') else ''}")
        for f in t.get("failed", [])[:20]:
            echo(f"  FAILED {f['id']}: {f['message']}")
    for n in combined["status"]["failed_stages"]:
        s = combined["stages"][n]
        echo(f"stage {n} failed: rc {s['rc']}{' (timed out)' if s['timed_out'] else ''}; log {logs_dir / (n + '.log')}")
    echo(f"exit status {combined['status']['exit']}")


def _rel(p: Path) -> str:
    from pgolf.bench.env import REPO_ROOT

    try:
        return str(p.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(p)
