"""The demo's answer depends on its settings only: never on the machine's speed, and the same when run again."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import pytest

from pgolf import demo

SMALL = ["--train-docs", "300", "--val-docs", "12", "--iterations", "3"]


def _run(capsys, tmp_path: Path, name: str, *extra: str) -> tuple[int, str, str]:
    rc = demo.main(["--data-dir", str(tmp_path / "corpus"), "--run-dir", str(tmp_path / name), *SMALL, *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _result(out: str) -> list[str]:
    """The lines that must agree: val_bpb, the artifact's exact score, each step's loss (times cut off)."""
    keys = ("val_bpb:", "final_quant_roundtrip_exact", "pre_quant_val_bpb:", "ttt_val_bpb:", "step:")
    return [ln.split(" train_time")[0] for ln in out.splitlines() if ln.startswith(keys)]


@pytest.mark.slow
def test_the_demo_prints_the_same_val_bpb_again_on_a_machine_a_million_times_slower(capsys, tmp_path, monkeypatch):
    """A second run whose training clock reads 11.6 days at every step: the same steps, losses and scores."""
    rc, first, _ = _run(capsys, tmp_path, "a")
    assert rc == 0 and "steps: 3 of 3 (fixed)" in first
    assert any(ln.startswith("val_bpb: ") for ln in first.splitlines())
    from pgolf.train.schedule import WallClock

    monkeypatch.setattr(WallClock, "elapsed_ms", property(lambda self: 1e6 * 1000.0))
    rc, slow, _ = _run(capsys, tmp_path, "b")
    assert rc == 0 and "steps: 3 of 3 (fixed)" in slow and _result(slow) == _result(first)
    assert [ln.split()[0] for ln in _result(first) if "train_loss" in ln] == ["step:1/3", "step:2/3", "step:3/3"]


def test_the_guard_stops_the_demo_with_an_error_and_is_removed_after(capsys, tmp_path):
    before = signal.getsignal(signal.SIGALRM)
    rc, out, err = _run(capsys, tmp_path, "guarded", "--guard-seconds", "0.2")
    assert rc == 1 and "--guard-seconds" in err and "val_bpb:" not in out
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.parametrize("flag,value", [("--iterations", "0"), ("--threads", "0"), ("--guard-seconds", "-1")])
def test_a_bad_setting_is_refused_before_any_work(capsys, tmp_path, flag, value):
    rc = demo.main(["--data-dir", str(tmp_path / "corpus"), "--run-dir", str(tmp_path / "r"), flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and not (tmp_path / "corpus").exists()


def test_the_corpus_and_its_tokenizer_are_the_same_bytes_when_built_again(tmp_path):
    from pgolf.data.synthetic import build_default_corpus

    def digest(folder: Path) -> dict[str, str]:
        meta = build_default_corpus(folder, num_train_docs=200, num_val_docs=10)
        files = [Path(meta["tokenizer_path"]), *sorted(Path(meta["shard_dir"]).glob("*.bin"))]
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    a, b = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert a == b and len(a) >= 3


def test_the_demo_trains_a_fixed_number_of_steps_with_no_clock_in_its_schedule(tmp_path):
    meta = {"shard_dir": str(tmp_path), "tokenizer_path": str(tmp_path / "t.model")}
    cfg, model_cfg = demo.demo_config(meta, str(tmp_path / "r"), force=False, iterations=200, seed=1)
    assert cfg.iterations == 200 and cfg.max_wallclock_seconds == 0 and cfg.device == "cpu"
    assert cfg.warmdown_frac == 0 and cfg.warmdown_iters == 100 and cfg.gptq_calibration_batches > 0
