"""The trainer's post-training part: calibration counted as training time, the artifact, the budget check, the demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgolf.quant.size import OverBudgetError
from pgolf.train.config import resolve
from pgolf.train.trainer import train
from tests.quant.helpers import RUN_FLAGS, corpus


def _run(tmp_path, name, logs, **kw):
    c = corpus()
    flags = dict(RUN_FLAGS, data_path=c["shard_dir"], tokenizer_path=c["tokenizer_path"], run_dir=str(tmp_path / name),
                 save_checkpoint=False, eval_stride=0)
    flags.update(kw)
    cfg, model_cfg = resolve("tiny", env={}, flags=flags)
    return train(cfg, model_cfg, log=logs.append)


def test_calibration_is_training_time_and_an_overrun_or_oversize_is_loud(tmp_path, monkeypatch):
    import pgolf.quant.calibrate as cal

    real = cal.timed_calibration

    def slow(*a, **k):  # pretend the Hessians took 100 s
        hess, n, _ = real(*a, **k)
        return hess, n, 100.0

    monkeypatch.setattr(cal, "timed_calibration", slow)
    logs: list[str] = []
    s = _run(tmp_path, "warn", logs, max_wallclock_seconds=60, iterations=2, code_bytes=15_990_000,
             budget_check="warn")
    assert s["calibration_s"] == 100.0 and s["over_cap"]
    assert s["train_time_ms"] == pytest.approx(s["train_loop_ms"] + 100_000, abs=0.2)
    text = "\n".join(logs)
    assert "gptq_calibration: 25 hessians from 2 batches" in text
    assert "over the 60s cap" in text and "NOT compliant" in text and "gptq_reserve_seconds" in text
    art = s["artifact"]
    assert art["bytes_total"] == art["bytes_model"] + 15_990_000 and art["headroom"] < 0
    assert "ERROR: artifact over budget" in text and "--quant-mlp-k" in text
    assert art["val_bpb"] != s["val_bpb"]  # the artifact's own eval, not the pre-quant one
    assert "final_quant_roundtrip_exact val_loss:" in text

    monkeypatch.setattr(cal, "timed_calibration", real)
    with pytest.raises(OverBudgetError, match=r"over budget: .* exceed 16,000,000 by"):
        _run(tmp_path, "error", [], code_bytes=15_990_000)
    on_disk = json.loads((tmp_path / "error" / "summary.json").read_text())  # the run is still recorded
    assert on_disk["artifact"]["headroom"] < 0 and (tmp_path / "error" / "final_model.pgq").is_file()


@pytest.mark.parametrize("bad,words", [(dict(quant_method="int4"), "--quant-method"),
                                       (dict(artifact_layout="int4"), "--artifact-layout"),
                                       (dict(quant_mlp_bits=9), "--quant-mlp-bits .* bit width"),
                                       (dict(quant_attn_k=0.0), "--quant-attn-k .* positive")])
def test_bad_quant_settings_fail_before_training(tmp_path, bad, words):
    logs: list[str] = []
    with pytest.raises(ValueError, match=words):
        _run(tmp_path, "bad", logs, **bad)
    assert not any(line.startswith("step:") for line in logs)


def test_no_artifact_when_quantization_is_off(tmp_path):
    s = _run(tmp_path, "none", [], quant_method="none")
    assert s["artifact"] is None and s["calibration_s"] == 0.0
    assert not (tmp_path / "none" / "final_model.pgq").exists()


@pytest.mark.slow
def test_demo_writes_and_reevaluates_its_artifact(tmp_path, capsys):
    from pgolf.demo import main

    data_dir = str(Path(corpus()["shard_dir"]).parent)  # the cached small corpus (same parameters: reused)
    assert main(["--data-dir", data_dir, "--train-docs", "300", "--val-docs", "12", "--iterations", "4",
                 "--run-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[-2].startswith("val_bpb: ") and lines[-1].startswith("entropy_floor_bpb: ")
    assert "pre_quant_val_bpb: " in out and "re-evaluating the artifact" in out
    assert "final_quant_roundtrip_exact val_loss:" in out and "WARNING: the reloaded artifact" not in out
    assert "size table:" in out and "mlp.fc" in out and "code bytes" in out
    report = out[out.index("compliance report"):]  # the demo ends with the compliance report, then the scores
    assert "overall: PASS" in report and "4 single pass             [pass]" in report
    art = json.loads((tmp_path / "demo" / "summary.json").read_text())["artifact"]
    assert (tmp_path / "demo" / "final_model.pgq").stat().st_size == art["bytes_model"]
    assert lines[-2] == f"val_bpb: {art['val_bpb']:.8f}"
