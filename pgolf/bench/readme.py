"""``pgolf-bench readme``: rewrite README.md's "## Performance" section from the latest committed GPU results.

The results are the files ``make gpu-check`` writes to ``bench/results/*.json``. Only files git tracks count
(``--all-files`` lifts that), only GPU runs (device kind other than ``cpu``) and only full runs (not smoke); the
newest by its ``meta.date`` wins. Without one, the section says plainly that no GPU results exist yet. The
committed ``pgolf-bench compile`` sweeps (``bench/results/compile_*.json``, one per target and triton version)
are summarized in either case: what a GPU would say about the kernels' builds, checked without one. Everything
from the "## Performance" heading to the next level-2 heading is replaced; the rest of the README is untouched.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

HEADING = "## Performance"
COMMAND = "pgolf-bench readme"


def committed_files(results_dir: Path) -> set[Path] | None:
    """Files under ``results_dir`` that git tracks (None when git cannot tell, e.g. no repository)."""
    d = Path(results_dir).resolve()
    cwd = d if d.is_dir() else d.parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True, text=True,
                             timeout=20)
        if top.returncode != 0:
            return None
        out = subprocess.run(["git", "ls-files", "-z", "--full-name", "--", str(d)], cwd=cwd, capture_output=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    root = Path(top.stdout.strip())
    return {(root / p).resolve() for p in out.stdout.decode().split("\0") if p}


def latest_results(results_dir: str | Path, *, committed_only: bool = True) -> tuple[Path, dict[str, Any]] | None:
    d = Path(results_dir)
    if not d.is_dir():
        return None
    files = sorted(d.glob("*.json"))
    if committed_only:
        tracked = committed_files(d)
        if tracked is not None:
            files = [f for f in files if f.resolve() in tracked]
    best = None
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        meta = data.get("meta") or {}
        if data.get("smoke") or meta.get("device_kind") in (None, "cpu"):
            continue
        key = str(meta.get("date") or "")
        if best is None or key > best[0]:
            best = (key, f, data)
    return (best[1], best[2]) if best else None


def compile_sweeps(results_dir: str | Path, *, committed_only: bool = True) -> list[tuple[Path, dict[str, Any]]]:
    """The ``pgolf-bench compile`` reports under ``results_dir`` (full sweeps first, then by target and triton)."""
    d = Path(results_dir)
    files = sorted(d.glob("compile_*.json")) if d.is_dir() else []
    if committed_only:
        tracked = committed_files(d)
        if tracked is not None:
            files = [f for f in files if f.resolve() in tracked]
    out = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("tool") == "pgolf-bench compile" and "summary" in data:
            out.append((f, data))
    return sorted(out, key=lambda fd: (fd[1].get("quick", False), fd[1].get("target", ""), fd[1].get("triton", "")))


def render_compile(sweeps: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """Lines summarizing the compile sweeps (empty without any)."""
    if not sweeps:
        return []
    rows = []
    for f, d in sweeps:
        s = d["summary"]
        rows.append((f"`{f.name}`", d.get("target"), d.get("triton"), f"commit `{d.get('commit_short', '?')}`",
                     "defaults" if d.get("quick") else "every config", s["compiled"], s["failed"],
                     s["over_shared_limit"], f"{s['spilling_defaults']} / {s['spilling_other']}", s["wgmma_defaults"],
                     s["tma"], "pass" if s["passed"] else "**FAIL**"))
    lines = ["**Compiled for Hopper without a GPU** (`pgolf-bench compile`: every kernel through its own launcher at "
             "the record shapes, bf16/fp16/fp32; shared memory, registers and spills from the compiled code):", ""]
    lines += _table(("report", "target", "triton", "tree", "configs", "compiled", "failed", "over smem",
                     "spilling (defaults / others)", "bf16/fp16 GEMM defaults on wgmma", "TMA", "verdict"), rows)
    return lines + [""]


def _table(head: tuple[str, ...], rows: list[tuple]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def render(path: Path | None, data: dict[str, Any] | None, *, repo_root: Path | None = None,
           compiles: list[tuple[Path, dict[str, Any]]] | None = None) -> str:
    """The section body (without the heading)."""
    compiled = "\n".join(render_compile(compiles or []))
    if data is None:
        return ("No GPU results have been committed yet: `bench/results/` holds no `make gpu-check` output, so this\n"
                "repository makes no speed claims. On a GPU machine, `make gpu-check` runs the GPU tests and the three\n"
                "benchmarks (kernels, training step, eval) and writes `bench/results/<date>_<gpu>_<commit>.json`;\n"
                f"commit that file and run `{COMMAND}` to fill this section. On CPU,\n"
                "`pgolf-bench step --preset tiny --smoke` and `pgolf-bench check` prove only that the harness works.\n\n"
                + (compiled + "\n" if compiled else "") + f"_Section written by `{COMMAND}`._\n")
    meta = data.get("meta", {})
    rel = str(path) if path is not None else "?"
    if path is not None and repo_root is not None:
        try:
            rel = str(path.resolve().relative_to(repo_root.resolve()))
        except ValueError:
            pass
    lines = [f"Measured by `make gpu-check` on one {meta.get('gpu_name')} (`{meta.get('device_kind')}`), commit "
             f"`{meta.get('commit_short')}`{' (dirty tree)' if meta.get('dirty') else ''}, {meta.get('date')}, "
             f"torch {meta.get('torch')}, triton {meta.get('triton')}; raw results in `{rel}`. "
             f"Section written by `{COMMAND}`.", ""]
    st = data.get("step") or {}
    if st.get("variants"):
        lines += [f"**Training step**, preset `{st.get('preset')}`, {st.get('tokens_per_step', 0):,} tokens per GPU "
                  f"(one of 8 ranks, grad_accum 1), torch.compile {'on' if st.get('compile') else 'off'}; MFU against "
                  f"the measured {st['peak']['dtype']} matmul peak of {st['peak']['tflops']:.0f} TFLOP/s:", ""]
        rows = []
        for v, vr in st["variants"].items():
            for name, m in vr.get("modes", {}).items():
                if "ms_per_step" not in m:
                    rows.append((v, name.replace("loop_", ""), "error", "", "", ""))
                    continue
                rows.append((v, name.replace("loop_", ""), f"{m['ms_per_step']:.1f}", f"{m['tokens_per_s']:,.0f}",
                             f"{m.get('mfu', 0) * 100:.1f}%",
                             f"{m['peak_mib']:,.0f}" if m.get("peak_mib") is not None else "-"))
        lines += _table(("kernels", "loop", "ms/step", "tokens/s", "MFU", "peak MiB"), rows)
        lines.append("")
        for v, pr in (st.get("projection") or {}).items():
            if pr:
                lines.append(f"- `{v}`: about **{pr['steps']:,.0f} steps** fit in {pr['train_s']:.0f} s on 8 GPUs of "
                             f"this kind ({pr['steps_loop_off']:,.0f} before the loop switches on, "
                             f"{pr['steps_loop_on']:,.0f} after; all-reduce model: ring, {pr['link_gbps']:.0f} GB/s, "
                             f"{pr['comm_ms']:.2f} ms per step).")
        lines.append("- For comparison, the R6 record took 4,945 steps at 121.3 ms/step on 8×H100.")
        lines.append("")
    kr = data.get("kernels") or {}
    krows = [r for r in kr.get("rows", []) if r.get("impl") == r.get("candidate") and r.get("ms") is not None]
    if krows:
        base_ms = {(r["case"], r["impl"]): r["ms"] for r in kr["rows"] if r.get("ms") is not None}
        rows = []
        for r in krows:
            b = base_ms.get((r["case"], r.get("baseline")))
            rows.append((r["op"], r["case"], f"{r['ms']:.3f}", f"{r.get('baseline')}",
                         f"{b:.3f}" if b else "-", f"{r['speedup']:.2f}x" if r.get("speedup") else "-"))
        lines += ["**Kernels** (median ms, `triton.testing.do_bench`):", ""]
        lines += _table(("op", "case", "kernel ms", "baseline", "baseline ms", "speedup"), rows)
        lines.append("")
    ev = data.get("eval") or {}
    if ev.get("projection"):
        p = ev["projection"]
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in p["parts"].items() if v is not None)
        lines += [f"**Eval**, projected to {ev.get('full_tokens', 0):,} validation tokens on 8 GPUs: {parts}; "
                  f"total **{p['total_s']:.0f} s** of {p['budget_s']:.0f} s"
                  f"{'' if p['fits'] else ' (over budget)'}. TTT is {ev.get('ttt', {}).get('kind', 'not measured')}.",
                  ""]
    t = data.get("tests") or {}
    if "tests" in t:
        lines += [f"**GPU tests**: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                  f"{t['skipped']} skipped.", ""]
    lines += render_compile(compiles or [])
    return "\n".join(lines).rstrip() + "\n"


def replace_section(readme_text: str, body: str) -> str:
    """``readme_text`` with the body of its "## Performance" section replaced (appended when missing)."""
    lines = readme_text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == HEADING), None)
    block = HEADING + "\n\n" + body.rstrip("\n") + "\n"
    if start is None:
        sep = "" if readme_text.endswith("\n") or not readme_text else "\n"
        return readme_text + sep + "\n" + block
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
    after = "".join(lines[end:])
    return "".join(lines[:start]) + block + ("\n" + after if after else "")


def update_readme(readme: str | Path, results_dir: str | Path, *, committed_only: bool = True) -> tuple[bool, str]:
    """Rewrite the section in place; (changed, body)."""
    from pgolf.bench.env import REPO_ROOT
    from pgolf.utils import atomic_write_text

    readme = Path(readme)
    found = latest_results(results_dir, committed_only=committed_only)
    body = render(found[0] if found else None, found[1] if found else None, repo_root=REPO_ROOT,
                  compiles=compile_sweeps(results_dir, committed_only=committed_only))
    old = readme.read_text(encoding="utf-8") if readme.exists() else ""
    new = replace_section(old, body)
    if new != old:
        atomic_write_text(readme, new)
    return new != old, body
