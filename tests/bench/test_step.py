"""``pgolf-bench step``: the CPU smoke run end to end, and the FLOP and projection arithmetic."""

import json
import math

import pytest
import torch

from pgolf.bench import step
from pgolf.bench.cli import main
from pgolf.bench.history import read_history
from pgolf.model.presets import get_preset


def test_step_tiny_smoke_cli(tmp_path, capsys, one_thread):
    hist, out = tmp_path / "h.jsonl", tmp_path / "step.json"
    rc = main(["step", "--preset", "tiny", "--smoke", "--steps", "2", "--warmup", "1", "--tokens", "256",
               "--history", str(hist), "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "preset tiny: 4 layers, d=128" in text and "256 tokens per GPU" in text
    assert "t8(mode)  = t1 - t_muon*(1 - f_ns)" in text and f"steps in {600 - get_preset('tiny').train['gptq_reserve_seconds']:g} s" in text
    data = json.loads(out.read_text())
    assert data["suite"] == "step" and data["meta"]["device_kind"] == "cpu" and data["smoke"] is True
    res = data["result"]
    assert set(res["variants"]) == {"auto", "reference"}
    for v in res["variants"].values():
        assert set(v["modes"]) == {"loop_off", "loop_on"}
        for m in v["modes"].values():
            assert m["error"] is None and m["steps"] == 2 and m["ms_per_step"] > 0 and m["finite"]
            assert set(m["phases_ms"]) == set(step.PHASES) and 0 < m["mfu"]
        assert v["ops"]["mlp"] == "reference"             # no CUDA: the reference everywhere
    pr = res["projection"]["auto"]
    assert pr["steps"] == pytest.approx(pr["steps_loop_off"] + pr["steps_loop_on"])
    [rec] = read_history(hist)
    assert rec["suite"] == "step" and rec["smoke"] is True and rec["device_kind"] == "cpu"
    assert rec["metrics"]["step/tiny/auto/loop_on/ms_per_step"]["better"] == "lower"
    assert rec["metrics"]["step/tiny/auto/loop_on/tokens_per_s"]["better"] == "higher"
    assert rec["metrics"]["step/tiny/auto/projected_steps_600s"]["better"] == "higher"
    assert rec["metrics"]["step/tiny/measured_peak_tflops"]["better"] is None
    assert rec["commit"] and rec["torch"] == torch.__version__


def test_sota_setup_is_a_rank_share_of_the_record_batch():
    s = step.build_setup("sota")
    assert s.tokens == 98_304 == 786_432 // 8 and s.seq_len == 2048 and s.packed
    assert step.build_setup("sota", smoke=True).tokens <= 512


def test_flops_count():
    c = get_preset("sota").model
    d, kv, h = c.model_dim, c.kv_dim, c.mlp_hidden
    per_layer = 2 * d * d + 2 * d * kv + 2 * d * h
    assert step.matmul_params(c, looping=False) == 11 * per_layer + 8192 * d
    assert step.matmul_params(c, looping=True) == 17 * per_layer + 8192 * d   # L3-5 three times: 11 + 6
    f = step.flops_per_step(c, 1000, 2048, looping=False)
    assert f == pytest.approx(6 * 1000 * step.matmul_params(c, False) + 6 * 1000 * 2048 * d * 11)


def test_projection_formula_by_hand():
    setup = step.build_setup("sota")
    vr = dict(grad_bytes=4 * 36_000_000, muon_buckets=[[[512, 512], 22], [[2048, 512], 11]],
              modes={"loop_off": dict(ms_per_step=100.0, phases_ms=dict(muon=8.0)),
                     "loop_on": dict(ms_per_step=140.0, phases_ms=dict(muon=8.0))})
    pr = step.project(vr, setup, link_gbps=400.0, latency_us=10.0)
    t_ar = 2 * 7 / 8 * 144e6 / 400e9 * 1e3
    ag = (8 * 3 * 512 * 512 + 8 * 2 * 2048 * 512) * 2
    t_ag = 7 / 8 * ag / 400e9 * 1e3
    work = 22 * 512 ** 3 + 11 * 2048 * 512 * 512
    f_ns = (3 * 512 ** 3 + 2 * 2048 * 512 * 512) / work
    comm = t_ar + t_ag + 4 * 0.01
    assert pr["f_ns"] == pytest.approx(f_ns) and pr["comm_ms"] == pytest.approx(comm)
    t8_off = 100 - 8 * (1 - f_ns) + comm
    t8_on = 140 - 8 * (1 - f_ns) + comm
    T = 600 - 8.0                                          # sota keeps 8 s for GPTQ
    expect = 0.35 * T / (t8_off / 1e3) + 0.65 * T / (t8_on / 1e3)
    assert pr["train_s"] == T and pr["steps"] == pytest.approx(expect)
    assert pr["tokens"] == pytest.approx(expect * 786_432)
    # overlap hides communication
    assert step.project(vr, setup, link_gbps=400.0, latency_us=10.0, overlap=1.0)["steps"] > pr["steps"]
    # a failed mode: no projection
    vr["modes"]["loop_on"] = dict(error="boom")
    assert step.project(vr, setup) is None
    assert math.isfinite(expect)
