"""``make demo`` / ``python -m pgolf.demo``: the whole pipeline on CPU in a few minutes, the same answer every time.

Builds the built-in synthetic corpus (a seeded sparse Markov chain whose entropy rate is known exactly), trains the
``tiny`` preset on it for a fixed number of steps, quantizes it (GPTQ + SDClip) into the artifact, re-evaluates the
artifact from the file alone exactly as the challenge does, runs legal score-first test-time training on it and
prints the compliance report, the size and budget tables and how close the model came to the entropy floor.
``val_bpb`` is the artifact's score.

Nothing the demo computes depends on how fast the machine is: training runs ``--iterations`` steps with no training
wall-clock cap (so the LR warmdown, ``warmdown_iters``, and the loop switch follow the step count), GPTQ calibrates
on a fixed number of training batches, TTT runs its fixed, seeded plan, everything runs on the CPU with
``--threads`` threads (a fixed count: the order of a parallel reduction depends on it) that sleep rather than spin
while they wait (``OMP_WAIT_POLICY=PASSIVE``: on a busy 2-core machine a spinning thread made a step 13 times
slower), and the corpus and the tokenizer are built from a seed. The same machine type prints the same ``val_bpb`` every time; a busy machine prints
it later. ``--guard-seconds`` only guards: past it the demo stops with an error instead of printing a result.

The default run folder ``runs/demo`` belongs to the demo and is replaced by each demo run (it says so); a
``--run-dir`` of your own that already holds something is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

from pgolf.errors import UserError

BUDGET_SECONDS = 600.0
DEFAULT_RUN_DIR = "runs/demo"
ITERATIONS = 200        # about 2 minutes of training on 2 idle cores
GUARD_SECONDS = 1800.0  # the whole demo; only a machine many times slower than 2 idle cores gets near it
THREADS = 2
TTT = dict(chunk_tokens=8192, epochs=1, lr=0.002, seed=0)


class DemoGuardExceeded(UserError):
    """The demo ran past its wall-clock guard (``--guard-seconds``): it stopped instead of printing a result."""


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP: set before importing torch
    p = argparse.ArgumentParser(prog="python -m pgolf.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data/synthetic", help="where the synthetic corpus is built (reused)")
    p.add_argument("--run-dir", default=None, help=f"default {DEFAULT_RUN_DIR} (the demo's own, replaced each run)")
    p.add_argument("--force", action="store_true", help="replace the outputs of an existing --run-dir")
    p.add_argument("--iterations", type=int, default=ITERATIONS, help="training steps (fixed: the result depends "
                   f"on them, never on the machine's speed; default {ITERATIONS})")
    p.add_argument("--guard-seconds", type=float, default=GUARD_SECONDS, help="stop the demo with an error past "
                   f"this much wall clock (0 = no guard; default {GUARD_SECONDS:.0f}); it never shortens training")
    p.add_argument("--threads", type=int, default=THREADS, help=f"CPU threads (fixed; default {THREADS})")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--train-docs", type=int, default=13_700, help=argparse.SUPPRESS)  # smaller corpora for tests
    p.add_argument("--val-docs", type=int, default=800, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from pgolf.errors import ConfigError, run_cli

    def checked() -> int:
        for flag, value, low in (("--iterations", args.iterations, 1), ("--threads", args.threads, 1),
                                 ("--guard-seconds", args.guard_seconds, 0)):
            if value < low:
                raise ConfigError(f"{flag} must be at least {low}, got {value}")
        with wall_clock_guard(args.guard_seconds):
            return _demo(args)

    return run_cli("pgolf.demo", checked)


def _demo(args: argparse.Namespace) -> int:
    import torch

    from pgolf.data.synthetic import build_default_corpus
    from pgolf.eval.cli import evaluate_artifact, result_lines, ttt_with_report
    from pgolf.train.trainer import train

    fix_threads(args.threads)
    print(f"== pgolf demo: building the synthetic corpus in {args.data_dir} ==", flush=True)
    meta = build_default_corpus(args.data_dir, num_train_docs=args.train_docs, num_val_docs=args.val_docs)
    print(f"corpus: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
          f"entropy floor {meta['entropy_floor_bpb']:.4f} bpb, unigram {meta['unigram_bpb']:.4f} bpb", flush=True)
    run_dir = args.run_dir or DEFAULT_RUN_DIR
    if args.run_dir is None and Path(run_dir).is_dir() and any(Path(run_dir).iterdir()):
        print(f"(replacing the previous demo run in {run_dir})", flush=True)
    cfg, model_cfg = demo_config(meta, run_dir, force=args.force or args.run_dir is None, iterations=args.iterations,
                                 seed=args.seed)
    print(f"== training preset 'tiny' for {cfg.iterations} steps (fixed; LR warmdown over the last "
          f"{cfg.warmdown_iters}), {cfg.gptq_calibration_batches} GPTQ calibration batches, seed {cfg.seed}, "
          f"{torch.get_num_threads()} CPU threads ==", flush=True)
    s = train(cfg, model_cfg)
    art = s["artifact"]

    print(f"\n== re-evaluating the artifact {art['path']} from the file alone ==", flush=True)
    t_eval = time.perf_counter()
    r = evaluate_artifact(art["path"], meta["shard_dir"], meta["tokenizer_path"], seq_len=cfg.eval_seq_len,
                          batch_seqs=cfg.eval_batch_seqs, device=cfg.device)
    for line in result_lines(r):
        print(line)
    print("\n== legal score-first test-time training (chunked), then the compliance report ==", flush=True)
    ttt, report = ttt_with_report(r, "chunk", art["path"], t_eval, summary=Path(run_dir) / "summary.json",
                                  overrides=dict(TTT, window=cfg.eval_seq_len, stride=cfg.eval_seq_len // 2,
                                                 seq_len=cfg.eval_seq_len))
    eval_s = time.perf_counter() - t_eval
    if r["plain"].val_bpb != art["val_bpb"]:
        print(f"WARNING: the reloaded artifact scores {r['plain'].val_bpb!r}, the run's round trip {art['val_bpb']!r}")
    print_results(s, meta, cfg, ttt, report, eval_s)
    return 0


def demo_config(meta: dict, run_dir: str, *, force: bool, iterations: int, seed: int):
    """(TrainConfig, GPTConfig) of the demo run: the tiny preset on CPU for a fixed number of steps, every schedule
    on the step count (no training wall-clock cap), a warmdown over the second half, fixed calibration batches."""
    from pgolf.train.config import resolve

    return resolve("tiny", env={}, flags=dict(
        data_path=meta["shard_dir"], tokenizer_path=meta["tokenizer_path"], run_dir=run_dir, force=force,
        device="cpu", seed=seed, iterations=iterations, max_wallclock_seconds=0.0, gptq_reserve_seconds=0.0,
        warmdown_frac=0.0, warmdown_iters=max(1, iterations // 2), train_log_every=50))


def fix_threads(n: int) -> None:
    """Intra-op threads fixed at ``n`` (a parallel sum's rounding depends on the count), inter-op at 1."""
    import torch

    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already fixed in this process (the inter-op pool starts once)
        torch.set_num_interop_threads(1)


@contextlib.contextmanager
def wall_clock_guard(seconds: float) -> Iterator[None]:
    """Raise :class:`DemoGuardExceeded` in the main thread once ``seconds`` of wall clock have passed (0: never;
    also never where SIGALRM does not exist or off the main thread). It stops the demo; it changes nothing the demo
    computes."""
    import threading

    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise DemoGuardExceeded(f"the demo ran past its {seconds:g}-second wall-clock guard (--guard-seconds) and "
                                f"stopped: this machine is far slower or busier than the 2 idle cores it is sized "
                                f"for. Nothing was cut short to fit: run it again on an idle machine, or with "
                                f"--guard-seconds 0 (no guard); it prints the same val_bpb, later")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def print_results(s: dict, meta: dict, cfg, ttt, report, eval_s: float) -> None:
    """The budget table, the compliance report and the summary lines (``val_bpb`` last but one)."""
    from pgolf.quant.size import BUDGET_BYTES

    art, floor = s["artifact"], meta["entropy_floor_bpb"]
    budget_rows = [("train time", f"{s['train_time_ms'] / 1000:.1f} s", f"{BUDGET_SECONDS:.0f} s"),
                   ("eval time", f"{eval_s:.1f} s", f"{BUDGET_SECONDS:.0f} s"),
                   ("model bytes", f"{art['bytes_model']:,}", ""),
                   ("code bytes", f"{art['bytes_code']:,}", ""),
                   ("total bytes", f"{art['bytes_total']:,}", f"{BUDGET_BYTES:,}")]
    print("\n== budget (CPU demo; the challenge measures on 8xH100) ==")
    print(f"{'':<12} {'used':>12} {'limit':>12}")
    for name, used, limit in budget_rows:
        print(f"{name:<12} {used:>12} {limit:>12}")
    print(f"(train time includes {s['calibration_s']:.1f} s of GPTQ calibration; eval time: loading the artifact, "
          f"its plain eval and TTT; code bytes: the pgolf-pack train_gpt.py of this run)")
    print("\n" + report.render())
    print(f"\nsteps: {s['steps']} of {cfg.iterations} (fixed)  tokens/s: {s['tokens_per_s']:,.0f}  "
          f"params: {s['params']:,}")
    print(f"unigram_bpb: {meta['unigram_bpb']:.4f}  val_oracle_bpb: {meta['val_oracle_bpb']:.4f}")
    print(f"pre_quant_val_bpb: {s['val_bpb']:.4f}  (quantization cost {art['val_bpb'] - s['val_bpb']:+.4f})")
    print(f"ttt_val_bpb: {ttt.val_bpb:.4f}  (score-first chunked TTT on the artifact; this source never drifts, so "
          f"TTT has nothing to adapt to here)")
    print(f"val_bpb: {art['val_bpb']:.8f}")
    print(f"entropy_floor_bpb: {floor:.4f}  (gap {art['val_bpb'] - floor:+.4f} bits per byte)")


if __name__ == "__main__":
    sys.exit(main())
