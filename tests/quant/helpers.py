"""Shared, cached fixtures for the artifact end-to-end tests: a small synthetic corpus and one short ``pgolf-train``
run (a subprocess with one thread, so another process can reproduce it bit for bit)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEED = 5
# tiny preset, shrunk: 64 dims, 3 steps, 2 calibration batches, 1,024 validation tokens
RUN_FLAGS = dict(iterations=3, max_wallclock_seconds=0, model_dim=64, mlp_hidden=128, train_batch_tokens=1024,
                 train_seq_len=128, eval_seq_len=128, eval_stride=64, val_max_tokens=1024,
                 quant_passthrough_max=1024, gptq_calibration_batches=2, seed=SEED, train_log_every=1)


@functools.lru_cache(maxsize=None)
def workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="pgolf_quant_tests_"))
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.lru_cache(maxsize=None)
def corpus() -> dict:
    from pgolf.data.synthetic import build_default_corpus

    return build_default_corpus(workdir() / "synthetic", num_train_docs=300, num_val_docs=12)


def child_env(**extra: str) -> dict[str, str]:
    """A minimal environment, identical for the pgolf run and the bundled run (one thread)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONHASHSEED": "0", "HOME": os.environ.get("HOME", "/tmp")}
    env.update(extra)
    return env


def flags_argv(**flags) -> list[str]:
    out = []
    for k, v in flags.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


@functools.lru_cache(maxsize=None)
def pgolf_run() -> tuple[Path, str]:
    """(run_dir, stdout) of ``python -m pgolf.train --preset tiny ...`` on the small corpus."""
    c = corpus()
    run_dir = workdir() / "pgolf_run"
    argv = [sys.executable, "-m", "pgolf.train", "--preset", "tiny", "--data-path", c["shard_dir"],
            "--tokenizer-path", c["tokenizer_path"], "--run-dir", str(run_dir)] + flags_argv(**RUN_FLAGS)
    env = child_env(PYTHONPATH=str(REPO))
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir, r.stdout


def exact_lines(log: str) -> list[str]:
    """The lines that must agree between two runs of the same configuration."""
    keys = ("step:", "final val_loss", "final_quant_roundtrip_exact", "final_quant_sliding_window_exact",
            "bytes_total:")
    return [ln.split(" train_time:")[0].split(" eval_time:")[0] for ln in log.splitlines()
            if ln.startswith(keys) and "looping:on" not in ln]
