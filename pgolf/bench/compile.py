"""``pgolf-bench compile``: every Triton kernel of :mod:`pgolf.kernels` compiled for a GPU, on a machine without one.

Triton compiles ahead of time on a CPU-only machine; nothing needs a driver until a launch. This command points
Triton's runtime at a stand-in driver for the target (``sm_90`` by default), puts the launcher in compile-only mode
(:func:`pgolf.kernels.launcher.compile_only`) and runs each op's own host-side launcher at the record shapes
(training and eval) on CPU tensors that are allocated but never touched. Every kernel launch then compiles, instead
of running, each config the op could pick on that GPU: its default (``--quick``), or also every tuning candidate
and every entry of the tuned-config files. For each compiled kernel it reads what the GPU would tell:

- compiled, or the compiler's error;
- shared memory per block against the target's limit (a launch over it fails);
- registers per thread and the stack frame (``cuobjdump --dump-resource-usage``; a stack means spilled registers);
- whether the code uses the Hopper tensor cores (``wgmma.mma_async`` in the PTX), the older ``mma.sync``, and TMA
  (``cp.async.bulk.tensor``).

The exit status is non-zero on any compile failure, any config over the shared-memory limit, or a spilling
default. The work is split by (op, dtype) over ``--jobs`` worker processes, which run without
``TRITON_INTERPRET`` (an interpreted kernel cannot be compiled); a worker that dies is reported as failed rows.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from pgolf.bench.shapes import Tensors, record_calls

OPS = ("attention", "mlp", "softcap_ce", "newton_schulz", "int6_matmul")  # the slowest to compile first
DTYPES = ("bfloat16", "float16", "float32")  # every op supports these three on a GPU
# Kernels whose bf16/fp16 code should run on the Hopper tensor cores (wgmma); int6's small-M path uses 16-row
# tiles, below wgmma's 64, and the others have no tl.dot.
WGMMA_EXPECTED = ("mlp.up_fwd", "mlp.up_bwd", "attention.fwd", "attention.dkdv", "attention.dq", "newton_schulz.gram",
                  "newton_schulz.poly", "newton_schulz.update", "int6_matmul.large")


@dataclass(frozen=True)
class Target:
    capability: int
    shared_limit: int  # bytes of shared memory one block may use
    sms: int           # multiprocessors (launchers size split-K from it)


TARGETS = {"sm_80": Target(80, 166_912, 108), "sm_86": Target(86, 101_376, 84), "sm_89": Target(89, 101_376, 128),
           "sm_90": Target(90, 232_448, 132), "sm_100": Target(100, 232_448, 148)}
MAX_REGISTERS = 255


def run_sweep(*, ops: tuple[str, ...] = OPS, dtypes: tuple[str, ...] = DTYPES, target: str = "sm_90",
              quick: bool = False, jobs: int = 2, set_defaults: dict[str, dict] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compile every (op, dtype) in worker processes; returns the report (rows, summary, versions)."""
    check_args(ops, dtypes, target, set_defaults)
    t0 = time.perf_counter()
    units = [(op, dt) for op in ops for dt in dtypes]
    spec = dict(target=target, quick=quick, set_defaults=set_defaults or {})
    rows: list[dict] = []
    versions: dict[str, str] = {}
    for (op, dt), result in _run_workers(units, spec, max(1, jobs)):
        rows += result["rows"]
        versions = result.get("versions") or versions
        bad = sum(1 for r in result["rows"] if problems(r, TARGETS[target]))
        log(f"[compile] {op} {dt}: {len(result['rows'])} kernels compiled in {result['seconds']:.0f}s"
            f"{f', {bad} with problems' if bad else ''}")
    from pgolf.bench.env import commit_info, utc_now

    report = dict(tool="pgolf-bench compile", date=utc_now(), **commit_info(), target=target,
                  shared_limit=TARGETS[target].shared_limit,
                  max_registers=MAX_REGISTERS, quick=quick, ops=list(ops), dtypes=list(dtypes),
                  set_defaults=set_defaults or {}, python=platform.python_version(), **versions,
                  seconds=round(time.perf_counter() - t0, 1), rows=rows)
    report["summary"] = summarize(rows, TARGETS[target])
    return report


def check_args(ops, dtypes, target, set_defaults: dict | None = None) -> None:
    """Named errors for an unknown op, dtype, target or kernel."""
    from pgolf.kernels.launcher import declared

    kernels = tuple(declared()) if set_defaults else ()
    for what, got, known in (("--op", ops, OPS), ("--dtype", dtypes, DTYPES), ("--target", (target,), TARGETS),
                             ("--set-default", tuple(set_defaults or ()) or ("-",), kernels or ("-",))):
        bad = [g for g in got if g not in known]
        if bad or not got:
            raise ValueError(f"{what} {','.join(bad) or '(empty)'} is not known; choose from {', '.join(known)}")


def problems(row: dict, target: Target) -> list[str]:
    """What makes a compiled config unusable on the target: failed, over the shared-memory limit, spilling."""
    if row["status"] != "ok":
        return ["compile failed"]
    out = []
    if row["shared_bytes"] > target.shared_limit:
        out.append(f"shared memory {row['shared_bytes']} > {target.shared_limit}")
    if row["spill_bytes"] > 0 or row["registers"] > MAX_REGISTERS:
        out.append(f"spills ({row['spill_bytes']} B stack)")
    return out


def summarize(rows: list[dict], target: Target) -> dict[str, Any]:
    """Counts, the failing rows and the exit verdict: failures, over-limit configs and spilling defaults fail."""
    failed = [r for r in rows if r["status"] != "ok"]
    ok = [r for r in rows if r["status"] == "ok"]
    over = [r for r in ok if r["shared_bytes"] > target.shared_limit]
    spilling = [r for r in ok if r["spill_bytes"] > 0 or r["registers"] > MAX_REGISTERS]
    half = [r for r in ok if r["dtype"] in ("bfloat16", "float16") and r["kernel"] in WGMMA_EXPECTED]
    no_wgmma = sorted({f"{r['kernel']} {r['dtype']}" for r in half if not r["wgmma"] and r["default"]})
    return dict(compiled=len(rows), kernels=len({r["kernel"] for r in rows}), failed=len(failed),
                over_shared_limit=len(over), spilling_defaults=sum(1 for r in spilling if r["default"]),
                spilling_other=sum(1 for r in spilling if not r["default"]),
                wgmma_defaults=sum(1 for r in half if r["wgmma"] and r["default"]),
                tma=sum(1 for r in ok if r["tma"]), defaults_without_wgmma=no_wgmma,
                problems=[dict(kernel=r["kernel"], dtype=r["dtype"], config=r["config"], default=r["default"],
                               why=problems(r, target), error=r.get("error")) for r in failed + over + spilling],
                passed=not failed and not over and not any(r["default"] for r in spilling))


# ---------------------------------------------------------------------------------------------------------
# Worker side: one process per batch of (op, dtype) units, no TRITON_INTERPRET.

def worker_main(spec: dict) -> dict:
    """Compile the units of ``spec``; returns {'rows', 'versions', 'seconds'} for each unit in order."""
    import triton

    from pgolf.kernels import launcher

    target = TARGETS[spec["target"]]
    _install_standin(target)
    kernels = launcher.declared()
    for name, cfg in spec.get("set_defaults", {}).items():
        kernels[name].default = lambda key, cfg=cfg: dict(cfg)
    versions = dict(triton=triton.__version__, torch=torch.__version__)
    out = []
    for op, dt in spec["units"]:
        t0 = time.perf_counter()
        rows: dict[Any, dict] = {}
        hook = _Hook(rows, dt, everything=not spec["quick"])
        with launcher.compile_only(hook):
            for label, call in record_calls(op, getattr(torch, dt), Tensors(torch.device("cpu"))):
                hook.label = label
                call()
        out.append(dict(unit=[op, dt], rows=list(rows.values()), versions=versions,
                        seconds=round(time.perf_counter() - t0, 1)))
    return dict(results=out)


class _Hook:
    """The compile-only hook: compiles each config of each launch once and collects one row per compiled kernel."""

    def __init__(self, rows: dict, dtype: str, everything: bool):
        self.rows, self.dtype, self.everything, self.label = rows, dtype, everything, ""

    def __call__(self, kernel, key, grid, args, consts, pinned) -> None:
        from pgolf.kernels.launcher import key_string

        for cfg, sources in kernel.sweep(key, everything=self.everything, pinned=pinned):
            t0 = time.perf_counter()
            try:
                compiled = kernel.compile(cfg, grid, args, consts)
                ident, info = compiled.hash, _inspect(compiled)
            except Exception as e:  # noqa: BLE001 - the compiler's error is the result
                ident = (kernel.qualname, json.dumps(cfg, sort_keys=True), repr(consts), self.label)
                info = dict(status="error", error=f"{type(e).__name__}: {e}"[:2000])
            row = self.rows.setdefault(ident, dict(
                kernel=kernel.qualname, dtype=self.dtype, config=cfg, variant=_jsonable(consts), sources=[],
                default=False, calls=[], compile_s=round(time.perf_counter() - t0, 2), **info))
            row["default"] |= any(s in ("default", "pinned") for s in sources)
            row["sources"] = sorted(set(row["sources"]) | set(sources))
            call = f"{self.label} [{key_string(key)}]"
            if call not in row["calls"]:
                row["calls"].append(call)


def _inspect(compiled) -> dict:
    """What a compiled kernel tells: shared memory, registers, stack (spills), tensor-core and TMA use."""
    ptx = compiled.asm.get("ptx", "")
    usage = _resource_usage(compiled.asm["cubin"])
    return dict(status="ok", error=None, shared_bytes=int(compiled.metadata.shared), registers=usage["REG"],
                spill_bytes=usage["STACK"], wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx,
                tma="cp.async.bulk.tensor" in ptx)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG and STACK of the cubin's kernel, from ``cuobjdump --dump-resource-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK):(\d+)", text)}
    if set(found) != {"REG", "STACK"}:
        raise RuntimeError(f"cuobjdump printed no REG/STACK for the kernel:\n{text[:500]}")
    return found


def _cuobjdump() -> str:
    import triton

    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError):
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _install_standin(target: Target) -> None:
    """Point Triton's runtime at a driver stand-in that names the target and never launches."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    from pgolf.kernels import launcher

    class StandIn:
        def __init__(self):
            self.target = GPUTarget("cuda", target.capability, 32)

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def is_active(self):
            return True

    driver.set_active(StandIn())
    launcher._SM_COUNT_STANDIN = target.sms


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (bool, int, float, str)) or v is None else str(v)) for k, v in d.items()}


# ---------------------------------------------------------------------------------------------------------
# Parent side: workers, the table, the JSON.

def _run_workers(units: list[tuple[str, str]], spec: dict, jobs: int) -> Iterator[tuple[tuple[str, str], dict]]:
    """Run the units over ``jobs`` subprocesses (round-robin); yields (unit, result) as workers finish."""
    batches = [units[i::jobs] for i in range(jobs) if units[i::jobs]]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    procs = []
    for batch in batches:
        out = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
        out.close()
        argv = [sys.executable, "-m", "pgolf.bench.compile", json.dumps(dict(spec, units=batch)), out.name]
        procs.append((batch, out.name, subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                                        stderr=subprocess.STDOUT, text=True)))
    for batch, path, proc in procs:
        text, _ = proc.communicate()
        try:
            results = json.loads(Path(path).read_text())["results"] if proc.returncode == 0 else None
        except (OSError, ValueError, KeyError):
            results = None
        finally:
            Path(path).unlink(missing_ok=True)
        if results is None:
            for op, dt in batch:
                yield (op, dt), dict(rows=[dict(kernel=f"{op}.*", dtype=dt, config={}, variant={}, sources=[],
                                                default=True, calls=[], compile_s=0.0, status="error",
                                                error=f"compile worker exited with {proc.returncode}: "
                                                      f"{text.strip()[-1500:]}")], seconds=0.0)
            continue
        for res in results:
            yield tuple(res["unit"]), res


def format_report(report: dict) -> str:
    """One table per kernel (a row per compiled config) and the summary."""
    lines = [f"pgolf-bench compile: target {report['target']} (shared memory limit {report['shared_limit']:,} B), "
             f"triton {report.get('triton')}, torch {report.get('torch')}, "
             f"{'defaults only (--quick)' if report['quick'] else 'every config'}"]
    head = ("dtype", "variant", "config", "source", "status", "smem KB", "regs", "spill B", "wgmma", "tma", "first use")
    by_kernel: dict[str, list[dict]] = {}
    for r in report["rows"]:
        by_kernel.setdefault(r["kernel"], []).append(r)
    target = TARGETS[report["target"]]
    for name in sorted(by_kernel):
        table = [head]
        for r in sorted(by_kernel[name], key=lambda r: (r["dtype"], not r["default"], _short(r["config"]))):
            ok = r["status"] == "ok"
            bad = problems(r, target)
            table.append((r["dtype"], _variant(r["variant"]), _short(r["config"]),
                          "default" if r["default"] else _source(r["sources"]),
                          "ok" if not bad else "; ".join(bad) if ok else "FAILED",
                          f"{r['shared_bytes'] / 1024:.0f}" if ok else "-", str(r["registers"]) if ok else "-",
                          str(r["spill_bytes"]) if ok else "-", ("yes" if r["wgmma"] else "mma.sync" if r["mma_sync"]
                                                                 else "no") if ok else "-",
                          ("yes" if r["tma"] else "no") if ok else "-", _first_use(r["calls"])))
        lines += ["", f"{name}", *_columns(table)]
        lines += [f"  error ({r['dtype']} {_short(r['config'])}): {r['error'].splitlines()[0][:300]}"
                  for r in by_kernel[name] if r["status"] != "ok"]
    s = report["summary"]
    lines += ["", f"{s['compiled']} compiled configs of {s['kernels']} kernels in {report['seconds']:.0f}s: "
                  f"{s['failed']} failed, {s['over_shared_limit']} over the shared-memory limit, "
                  f"{s['spilling_defaults']} spilling defaults, {s['spilling_other']} spilling non-defaults; "
                  f"{s['wgmma_defaults']} bf16/fp16 GEMM defaults on wgmma, {s['tma']} using TMA"]
    if s["defaults_without_wgmma"]:
        lines.append(f"bf16/fp16 GEMM defaults not on wgmma: {', '.join(s['defaults_without_wgmma'])}")
    lines.append("PASSED" if s["passed"] else "FAILED: compile failures, configs over the shared-memory limit or "
                                              "spilling defaults (see the rows above)")
    return "\n".join(lines)


def _short(cfg: dict) -> str:
    names = {"num_warps": "w", "num_stages": "s"}
    return " ".join(f"{names.get(k, k)}{v}" for k, v in cfg.items())


def _variant(v: dict) -> str:
    keep = {k: val for k, val in v.items() if isinstance(val, bool) or k in ("D", "G", "BM", "SPLIT_K", "DOT_PREC",
                                                                            "PREC")}
    return " ".join(f"{k}={int(val) if isinstance(val, bool) else val}" for k, val in keep.items()) or "-"


def _first_use(calls: list[str]) -> str:
    return (calls[0].split(" [")[0] + (f" (+{len(calls) - 1})" if len(calls) > 1 else "")) if calls else "-"


def _source(sources: list[str]) -> str:
    return ",".join(s.split()[0] for s in sources) if sources else "-"


def _columns(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


if __name__ == "__main__":  # a worker: python -m pgolf.bench.compile SPEC_JSON OUT_PATH
    _spec, _out = json.loads(sys.argv[1]), sys.argv[2]
    Path(_out).write_text(json.dumps(worker_main(_spec)))
