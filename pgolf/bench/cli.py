"""``pgolf-bench`` (or ``python -m pgolf.bench``): how fast is this commit, will it fit the budgets, did it get slower?

Subcommands::

    pgolf-bench kernels [--smoke] [--ops mlp,attention] [--json OUT]      every op's cases vs their alternatives
    pgolf-bench step [--preset sota] [--smoke] [--steps N] [--json OUT]    training step, kernels vs compiled reference
    pgolf-bench eval [--artifact FILE | --preset P] [--smoke] [--json OUT] round trip, sliding eval, TTT; 600 s budget
    pgolf-bench check [--base REV] [--threshold 0.05] [--history FILE]     regression check on this device kind
    pgolf-bench compile [--target sm_90] [--op mlp,...] [--quick] [--json OUT]  every kernel compiled for a GPU, no GPU
    pgolf-bench tune [--op mlp,...] [--keep]                               tune launch configs on this GPU, write its file
    pgolf-bench gpu-check [--budget-s S] [--copy-to DIR]                   tests + all benchmarks (make gpu-check)
    pgolf-bench plot [--out DIR]                                           PNG charts from the history
    pgolf-bench readme                                                     README "## Performance" from bench/results

kernels, step and eval append one record to the history (``bench/history.jsonl``, or ``--history FILE`` /
``PGOLF_BENCH_HISTORY``) unless ``--no-history``; ``--smoke`` runs are recorded only into an explicitly named
history, so the tracked file holds real measurements alone. Without a CUDA device they need ``--smoke`` (tiny shapes: proves
the harness) or an explicit ``--device cpu``. Exit status: 0 ok, 1 a benchmark part failed / a regression / failed
tests, 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def _common(p: argparse.ArgumentParser, *, smoke: bool = True, json_out: bool = True) -> None:
    if smoke:
        p.add_argument("--smoke", action="store_true", help="tiny shapes that run on CPU in seconds (harness check)")
        p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    if json_out:
        p.add_argument("--json", metavar="OUT", help="write the full result as JSON to OUT")
    p.add_argument("--history", metavar="FILE", help="history file (default bench/history.jsonl or $PGOLF_BENCH_HISTORY)")
    p.add_argument("--no-history", action="store_true", help="do not append a record to the history")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pgolf-bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="cmd", required=True)

    k = sub.add_parser("kernels", help="every op's benchmark cases against their alternatives")
    _common(k)
    k.add_argument("--ops", help="comma-separated op (or module) names, e.g. mlp,attention (default: all)")
    k.add_argument("--reps", type=int, default=10, help="timed calls per implementation on CPU (CUDA: do_bench)")

    s = sub.add_parser("step", help="full training step: kernels on vs compiled reference, MFU, 600 s projection")
    _common(s)
    s.add_argument("--preset", default="sota")
    s.add_argument("--steps", type=int, help="timed steps per variant and loop mode (default 30; smoke 3)")
    s.add_argument("--warmup", type=int, help="untimed steps before timing, incl. compile (default 5; smoke 1)")
    s.add_argument("--tokens", type=int, help="tokens per step on this GPU (default train_batch_tokens / 8)")
    s.add_argument("--variants", default="auto,reference", help="backends to time (default auto,reference)")
    s.add_argument("--loop", choices=("off", "on", "both"), default="both",
                   help="depth-recurrence modes to time (default both; the 600 s projection needs both)")
    s.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the model (auto: on CUDA only, as the trainer)")
    s.add_argument("--link-gbps", type=float, default=None, help="all-reduce bus bandwidth for the projection "
                   "(default 350 GB/s, NVLink 4 ring)")
    s.add_argument("--latency-us", type=float, default=None, help="fixed cost per collective (default 20 us)")
    s.add_argument("--overlap", type=float, default=0.0, help="fraction of communication hidden behind compute "
                   "(default 0: the trainer all-reduces after the backward)")

    e = sub.add_parser("eval", help="artifact round trip, sliding-window eval, TTT; projection to the 600 s budget")
    _common(e)
    src = e.add_mutually_exclusive_group()
    src.add_argument("--artifact", metavar="FILE", help="a pgolf checkpoint (final_model.pt) to evaluate")
    src.add_argument("--preset", default=None, help="a preset's architecture with random weights (default sota)")
    e.add_argument("--tokens", type=int, help="validation tokens in the measured slice (default 65,536; smoke 1,024)")
    e.add_argument("--full-tokens", type=int, help="validation tokens of the full set (default 40,540,160 for sp8192)")
    e.add_argument("--data-path", help="folder with fineweb_val_*.bin (default: the shared data when present)")
    e.add_argument("--tokenizer-path", help="SentencePiece model for the byte counts")
    e.add_argument("--no-roundtrip", action="store_true", help="skip the artifact round trip")
    e.add_argument("--no-ttt", action="store_true", help="skip the TTT estimate")
    e.add_argument("--cuda-graphs", action="store_true", help="also time sliding eval with the compiled CUDA-graph "
                   "scorer (CUDA only; its compile and capture run on random tokens before the clock)")

    co = sub.add_parser("compile", help="compile every Triton kernel for a GPU target on this machine (no GPU "
                        "needed): shared memory, registers, spills, wgmma/TMA; exit 1 on a defect")
    co.add_argument("--target", default="sm_90", help="GPU architecture (sm_80, sm_86, sm_89, sm_90, sm_100; "
                    "default sm_90)")
    co.add_argument("--op", help="comma-separated ops (default: mlp,softcap_ce,attention,newton_schulz,int6_matmul)")
    co.add_argument("--dtype", help="comma-separated dtypes (default: bfloat16,float16,float32)")
    co.add_argument("--quick", action="store_true", help="the default configs only (not every candidate and "
                    "tuned-file entry)")
    co.add_argument("--json", metavar="OUT", help="write the report (every row, the summary, versions) as JSON")
    co.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes (default: "
                    "the CPU count, at most 4)")
    co.add_argument("--set-default", action="append", default=[], metavar="KERNEL=JSON",
                    help="compile as if KERNEL's default config were JSON, e.g. "
                    "mlp.up_bwd='{\"BM\": 128, \"BN\": 256, \"BK\": 64, \"GROUP_M\": 8, \"num_warps\": 8, "
                    "\"num_stages\": 3}' (repeatable)")

    tu = sub.add_parser("tune", help="tune every kernel's launch config at the record shapes on this GPU and write "
                        "its tuned-config file")
    tu.add_argument("--op", help="comma-separated ops (default: all five)")
    tu.add_argument("--dtype", default="bfloat16", help="comma-separated dtypes (default bfloat16)")
    tu.add_argument("--keep", action="store_true", help="keep the file's entries; tune only the shapes it lacks")
    tu.add_argument("--device", default="cuda", help="cuda | cuda:N")

    c = sub.add_parser("check", help="compare the newest run on this device kind with its base")
    c.add_argument("--base", metavar="REV", help="compare with the newest run at commit REV (default: previous run)")
    c.add_argument("--threshold", type=float, default=0.05, help="allowed fraction a metric may get worse (0.05)")
    c.add_argument("--history", metavar="FILE")
    c.add_argument("--device-kind", help="device kind to check (default: this machine's, e.g. nvidia-h200 or cpu)")
    c.add_argument("--suite", help="only runs of this suite (kernels, step, eval, gpu-check)")
    c.add_argument("--strict", action="store_true", help="also fail when a base metric is missing in the newest run")
    c.add_argument("--all", action="store_true", help="also list informational metrics")

    g = sub.add_parser("gpu-check", help="GPU tests + kernels + step + eval into bench/results/, one history record")
    g.add_argument("--budget-s", type=float, default=None, help="total time limit (default 480 s: the command fits one "
                   "10-minute slot)")
    g.add_argument("--smoke", action="store_true", help="run the benchmarks with --smoke (harness check)")
    g.add_argument("--results-dir", default=None, help="default bench/results in the repository")
    g.add_argument("--history", metavar="FILE")
    g.add_argument("--copy-to", metavar="DIR", help="also copy the results, the tuned-config file, the history and the "
                   "logs to DIR (after every stage)")
    g.add_argument("--skip", default="", help="comma-separated stages to skip (tests,kernels,step,eval)")
    g.add_argument("--pytest-args", default=None, help="pytest arguments instead of 'tests' (one string)")
    g.add_argument("--step-steps", type=int, help="--steps for the step benchmark")
    g.add_argument("--preset", help="preset of the step and eval benchmarks (default sota; tiny with --smoke)")

    pl = sub.add_parser("plot", help="speedup per kernel and step time over commits, as PNG")
    pl.add_argument("--out", default="bench/plots", help="output folder (default bench/plots)")
    pl.add_argument("--history", metavar="FILE")
    pl.add_argument("--device-kind", help="default: the kind of the newest full run")

    r = sub.add_parser("readme", help="rewrite README.md's '## Performance' section from bench/results")
    r.add_argument("--readme", default=None, help="default README.md in the repository")
    r.add_argument("--results-dir", default=None, help="default bench/results in the repository")
    r.add_argument("--all-files", action="store_true", help="also use results files git does not track")
    r.add_argument("--check", action="store_true", help="only report whether the section is up to date (exit 1 if not)")
    return ap


def _device(args) -> Any:
    from pgolf.bench.env import resolve_device

    dev = resolve_device(args.device)
    if dev.type == "cpu" and not args.smoke and args.device == "auto":
        raise ValueError("no CUDA device. Pass --smoke (tiny shapes: checks the harness) or "
                         "--device cpu (full shapes on the CPU: very slow).")
    return dev


def _write_json(path: str | None, suite: str, env: dict, smoke: bool, result: dict) -> None:
    if not path:
        return
    from pgolf.bench.env import command_line
    from pgolf.utils import atomic_write_json

    atomic_write_json(path, dict(suite=suite, meta=env, smoke=smoke, command=command_line(), result=result))


def _append(args, suite: str, env: dict, metrics: dict, smoke: bool) -> None:
    if args.no_history:
        return
    if smoke and not (args.history or os.environ.get("PGOLF_BENCH_HISTORY")):
        print("history: smoke runs are not recorded in the tracked history (pass --history FILE to record one)")
        return
    from pgolf.bench.env import command_line
    from pgolf.bench.history import append_record, default_history_path, make_record

    path = Path(args.history) if args.history else default_history_path()
    rec = make_record(suite, env, metrics, smoke=smoke, command=command_line(), results_file=args.json)
    append_record(path, rec)
    print(f"history: appended a '{suite}' record with {len(rec['metrics'])} metrics to {path}")


def cmd_kernels(args) -> int:
    from pgolf.bench import kernels
    from pgolf.bench.env import environment

    dev = _device(args)
    env = environment(dev)
    print(f"kernels on {env.get('gpu_name') or 'CPU'} ({env['device_kind']}), commit {env['commit_short']}, "
          f"torch {env['torch']}, triton {env['triton']}{' [smoke]' if args.smoke else ''}")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else None
    res = kernels.run_kernels(smoke=args.smoke, device=dev, ops=ops, reps=args.reps,
                              on_progress=lambda r: _write_json(args.json, "kernels", env, args.smoke, r))
    _write_json(args.json, "kernels", env, args.smoke, res)
    print()
    print(kernels.format_table(res))
    _append(args, "kernels", env, kernels.metrics(res), args.smoke)
    failed = [r for r in res["rows"] if r.get("error")] or \
        [op for op, st in res["ops"].items() if st["status"] in ("error", "unknown")]
    return 1 if failed else 0


def cmd_step(args) -> int:
    from pgolf.bench import step
    from pgolf.bench.env import environment

    dev = _device(args)
    env = environment(dev)
    print(f"step on {env.get('gpu_name') or 'CPU'} ({env['device_kind']}), commit {env['commit_short']}, "
          f"torch {env['torch']}, triton {env['triton']}{' [smoke]' if args.smoke else ''}")
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    res = step.run_step(args.preset, smoke=args.smoke, device=dev, steps=args.steps, warmup=args.warmup,
                        variants=variants, compile_mode=args.compile, tokens=args.tokens,
                        link_gbps=args.link_gbps or step.DEFAULT_LINK_GBPS,
                        latency_us=args.latency_us if args.latency_us is not None else step.DEFAULT_LATENCY_US,
                        overlap=args.overlap, loops={"off": (False,), "on": (True,), "both": (False, True)}[args.loop],
                        on_progress=lambda r: _write_json(args.json, "step", env, args.smoke, r))
    _write_json(args.json, "step", env, args.smoke, res)
    print()
    print(step.format_report(res))
    _append(args, "step", env, step.metrics(res), args.smoke)
    bad = [m for vr in res["variants"].values() for m in vr["modes"].values() if m.get("error")] + \
        [vr for vr in res["variants"].values() if vr.get("error")]
    return 1 if bad else 0


def cmd_eval(args) -> int:
    from pgolf.bench import evalbench
    from pgolf.bench.env import environment

    dev = _device(args)
    env = environment(dev)
    print(f"eval on {env.get('gpu_name') or 'CPU'} ({env['device_kind']}), commit {env['commit_short']}, "
          f"torch {env['torch']}, triton {env['triton']}{' [smoke]' if args.smoke else ''}")
    res = evalbench.run_eval(preset=args.preset or (None if args.artifact else "sota"), artifact=args.artifact,
                             smoke=args.smoke, device=dev, n_tokens=args.tokens, full_tokens=args.full_tokens,
                             data_path=args.data_path, tokenizer_path=args.tokenizer_path,
                             do_roundtrip=not args.no_roundtrip, do_ttt=not args.no_ttt, cuda_graphs=args.cuda_graphs,
                             on_progress=lambda r: _write_json(args.json, "eval", env, args.smoke, r))
    _write_json(args.json, "eval", env, args.smoke, res)
    print()
    print(evalbench.format_report(res))
    _append(args, "eval", env, evalbench.metrics(res), args.smoke)
    bad = [k for k in ("roundtrip", "ttt") if isinstance(res.get(k), dict) and res[k].get("error")]
    return 1 if bad else 0


def cmd_check(args) -> int:
    from pgolf.bench.check import run_check
    from pgolf.bench.env import device_kind

    return run_check(args.history, args.device_kind or device_kind(), base_rev=args.base, threshold=args.threshold,
                     suite=args.suite, strict=args.strict, show_all=args.all)


def cmd_gpu_check(args) -> int:
    import shlex

    from pgolf.bench.env import REPO_ROOT
    from pgolf.bench.gpucheck import DEFAULT_BUDGET_S, run_gpu_check

    rc, _, _ = run_gpu_check(budget_s=args.budget_s or float(os.environ.get("GPU_CHECK_BUDGET_S", DEFAULT_BUDGET_S)),
                             results_dir=args.results_dir or REPO_ROOT / "bench" / "results", history=args.history,
                             smoke=args.smoke, copy_to=args.copy_to,
                             skip=tuple(s.strip() for s in args.skip.split(",") if s.strip()),
                             pytest_args=shlex.split(args.pytest_args) if args.pytest_args else None,
                             step_steps=args.step_steps, preset=args.preset)
    return rc


def cmd_compile(args) -> int:
    import json

    from pgolf.bench.compile import DTYPES, OPS, format_report, run_sweep
    from pgolf.utils import atomic_write_json

    defaults = {}
    for item in args.set_default:
        name, sep, text = item.partition("=")
        try:
            defaults[name] = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--set-default {item!r}: not KERNEL=JSON ({e})") from None
        if not sep or not isinstance(defaults[name], dict):
            raise ValueError(f"--set-default {item!r}: expected KERNEL={{...config...}}")
    report = run_sweep(ops=_names(args.op, OPS), dtypes=_names(args.dtype, DTYPES), target=args.target,
                       quick=args.quick, jobs=args.jobs, set_defaults=defaults)
    print(format_report(report))
    if args.json:
        atomic_write_json(args.json, report)
        print(f"report written to {args.json}")
    return 0 if report["summary"]["passed"] else 1


def cmd_tune(args) -> int:
    import torch

    from pgolf.bench.compile import DTYPES, check_args
    from pgolf.bench.tune import OPS, run_tune

    ops, dtypes = _names(args.op, OPS), _names(args.dtype, DTYPES)
    check_args(ops, dtypes, "sm_90")
    if not torch.cuda.is_available():
        raise RuntimeError("pgolf-bench tune needs a CUDA GPU (pgolf-bench compile checks configs without one)")
    run_tune(device=torch.device(args.device), ops=ops, dtypes=dtypes, keep=args.keep)
    return 0


def _names(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip()) if text else default


def cmd_plot(args) -> int:
    from pgolf.bench.history import default_history_path, read_history
    from pgolf.bench.plot import PlotUnavailable, make_plots

    path = Path(args.history) if args.history else default_history_path()
    try:
        files = make_plots(read_history(path), args.out, args.device_kind)
    except PlotUnavailable as e:
        print(f"pgolf-bench plot: {e}", file=sys.stderr)
        return 1
    if not files:
        print(f"nothing to plot: {path} has no kernel speedups or step timings"
              f"{' for ' + args.device_kind if args.device_kind else ''}")
        return 0
    for f in files:
        print(f"wrote {f}")
    return 0


def cmd_readme(args) -> int:
    from pgolf.bench.env import REPO_ROOT
    from pgolf.bench.readme import compile_sweeps, latest_results, render, replace_section, update_readme

    readme = Path(args.readme) if args.readme else REPO_ROOT / "README.md"
    results = Path(args.results_dir) if args.results_dir else REPO_ROOT / "bench" / "results"
    if args.check:
        found = latest_results(results, committed_only=not args.all_files)
        body = render(found[0] if found else None, found[1] if found else None, repo_root=REPO_ROOT,
                      compiles=compile_sweeps(results, committed_only=not args.all_files))
        current = readme.read_text(encoding="utf-8")
        ok = replace_section(current, body) == current
        print(f"{readme}: Performance section {'is up to date' if ok else 'is out of date: run pgolf-bench readme'}")
        return 0 if ok else 1
    changed, body = update_readme(readme, results, committed_only=not args.all_files)
    found = latest_results(results, committed_only=not args.all_files)
    print(f"{readme}: Performance section {'rewritten' if changed else 'already up to date'} from "
          f"{found[0] if found else 'no GPU results (section says so)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests): leave the thread count as found


def _main(args) -> int:
    if args.cmd in ("kernels", "step", "eval"):
        # Triton kernels on a machine without CUDA run under the interpreter, which must be chosen before any
        # module defining @triton.jit kernels is imported.
        import torch

        if not torch.cuda.is_available() or getattr(args, "device", "auto") == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")
            if args.smoke:
                # A smoke run only proves the harness; one thread avoids OpenMP spin-waits on a busy shared CPU
                # (10x slower with 2 threads under load). PGOLF_BENCH_THREADS overrides.
                torch.set_num_threads(int(os.environ.get("PGOLF_BENCH_THREADS", "1")))
    handler = {"kernels": cmd_kernels, "step": cmd_step, "eval": cmd_eval, "check": cmd_check,
               "gpu-check": cmd_gpu_check, "plot": cmd_plot, "readme": cmd_readme, "compile": cmd_compile,
               "tune": cmd_tune}[args.cmd]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("PGOLF_BENCH_DEBUG"):
            raise
        print(f"pgolf-bench {args.cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
