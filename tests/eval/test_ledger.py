"""The ledger: scoring/adaptation bookkeeping raises at once on every illegal use (naming position and step), the
provenance flag and the content fingerprint keep validation tokens out of warm-ups, calibration and training, the
summary is the report's evidence, the cost is vectorized, and the budget planner sizes a legal plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.eval import (ComplianceViolation, Ledger, assert_not_validation, mark_validation, measure_rates,
                        plan_ttt, set_active_ledger)
from pgolf.eval.budget import MeasuredRates, estimate_lora_seconds
from pgolf.eval.ledger import Fingerprint, bench_ledger, is_validation, strip_validation
from pgolf.model import GPT


def test_score_then_adapt_is_legal_and_recorded():
    led = Ledger(100)
    e1 = led.score(0, 40, label="a")
    s1 = led.adapt([(0, 40)], label="sgd:1")  # reads targets 0..39 and input token 0 (public)
    e2 = led.score(40, 100)
    s2 = led.adapt([(10, 60), (60, 100)], label="sgd:2")
    assert e1 < s1 < e2 < s2
    assert (led.scored_at[:40] == e1).all() and (led.scored_at[40:] == e2).all()
    assert (led.first_adapt[:40] == s1).all() and (led.first_adapt[40:] == s2).all()
    s = led.summary(require_complete=True)
    assert (s.tokens_scored, s.max_times_scored, s.min_times_scored, s.first_unscored) == (100, 1, 1, None)
    assert s.adapt_steps == 2 and s.adapted_targets == 100 and s.adapt_reads == 40 + 90
    assert s.min_adapt_gap == min(s1 - e1, s2 - e2) == 1 and s.adapt_kinds == {"sgd": 2}
    assert s.overhead_seconds > 0
    assert led.reads_of(5) == [(s1, "sgd:1")] and led.reads_of(20) == [(s1, "sgd:1"), (s2, "sgd:2")]
    assert led.reads_of(99) == [(s2, "sgd:2")]


def test_adapting_on_an_unscored_target_raises_with_position_and_step():
    led = Ledger(100)
    led.score(0, 30)
    with pytest.raises(ComplianceViolation) as ei:
        led.adapt([(0, 40)], label="chunk_sgd:chunk=0")
    e = ei.value
    assert (e.kind, e.position, e.step, e.label) == ("adapt_before_score", 30, 2, "chunk_sgd:chunk=0")
    assert "position 30" in str(e) and "step 2" in str(e) and "target 30 (token 31)" in str(e)
    assert (led.first_adapt == -1).all()  # nothing recorded for the rejected step


def test_first_input_token_must_be_scored_unless_public():
    led = Ledger(100)
    led.score(50, 100)
    with pytest.raises(ComplianceViolation) as ei:  # input token 50 is target 49, not scored
        led.adapt([(50, 60)])
    assert ei.value.position == 49
    led.declare_known_inputs([50])  # e.g. a document-start BOS: its value is given by the segmentation
    led.adapt([(50, 60)])
    assert led.known_input_reads == 1
    led.score(0, 50)
    led.adapt([(50, 60)])  # now scored: not counted as a public read
    assert led.known_input_reads == 1


def test_rescoring_raises():
    led = Ledger(10)
    led.score(0, 6)
    with pytest.raises(ComplianceViolation) as ei:
        led.score(4, 10, label="second pass")
    assert (ei.value.kind, ei.value.position, ei.value.step) == ("rescore", 4, 2)
    assert "scored a second time" in str(ei.value)
    with pytest.raises(ComplianceViolation, match="rescore"):
        led.score_many([(6, 8), (7, 9)])


def test_bad_ranges_and_incomplete_runs():
    led = Ledger(10)
    with pytest.raises(ComplianceViolation, match="bad_range"):
        led.score(5, 11)
    with pytest.raises(ComplianceViolation, match="bad_range"):
        led.adapt([(-1, 3)])
    led.score(0, 9)
    assert led.summary().first_unscored == 9
    with pytest.raises(ComplianceViolation) as ei:
        led.summary(require_complete=True)
    assert ei.value.kind == "unscored_at_end" and ei.value.position == 9
    with pytest.raises(ComplianceViolation):
        led.assert_scored(0, 10)


def test_provenance_flag_follows_the_data():
    val = mark_validation(torch.arange(1000))
    derived = [val[10:20], val[torch.tensor([3, 7])], val.clone(), val.to(torch.int32), val.view(10, 100),
               torch.cat([torch.zeros(3, dtype=torch.long), val[:5]]), val.unfold(0, 64, 32), val + 0,
               torch.stack([val[:4], val[4:8]])]
    assert all(is_validation(d) for d in derived)
    assert is_validation([torch.zeros(2), {"x": val[:3]}])
    plain = strip_validation(val)
    assert type(plain) is torch.Tensor and not is_validation(plain[:5])
    for i, d in enumerate(derived):
        with pytest.raises(ComplianceViolation) as ei:
            assert_not_validation(d, context="compile_warmup", step=i)
        assert ei.value.kind == "val_in_compile_warmup" and ei.value.step == i
    assert_not_validation(torch.randint(0, 9, (4, 8)), context="compile_warmup")  # synthetic: fine


def test_explicit_positions_are_rejected():
    with pytest.raises(ComplianceViolation) as ei:
        assert_not_validation(context="gptq_calibration", step=3, positions=np.array([1234, 1235]))
    assert (ei.value.kind, ei.value.position, ei.value.step) == ("val_in_gptq_calibration", 1234, 3)
    assert "position 1234" in str(ei.value) and "step 3" in str(ei.value)
    assert_not_validation(context="training", positions=[])


def test_fingerprint_finds_copies_that_lost_the_flag():
    g = np.random.default_rng(0)
    val = g.integers(0, 500, 20_000)
    train = g.integers(0, 500, 50_000)
    led = Ledger(val.size - 1)
    led.attach_fingerprint(torch.from_numpy(val), k=64, sample=16)
    set_active_ledger(led)
    try:
        assert_not_validation(torch.from_numpy(train.reshape(-1, 500)), context="training", step=0)
        leak = train[:4000].copy()
        leak[1000:1300] = val[7000:7300]  # 300 validation tokens pasted into a training batch (no flag)
        with pytest.raises(ComplianceViolation) as ei:
            assert_not_validation(torch.from_numpy(leak.reshape(4, 1000)), context="training", step=17)
        e = ei.value
        assert e.kind == "val_in_training" and e.step == 17 and 7000 <= e.position <= 7300 - 64
        # the flagged path also locates the position through the fingerprint
        with pytest.raises(ComplianceViolation) as ei:
            assert_not_validation(mark_validation(torch.from_numpy(val[5000:5200])), context="compile_warmup")
        assert 5000 <= ei.value.position <= 5200 - 64
    finally:
        set_active_ledger(None)
    # short coincidences (< k tokens) are not violations
    fp = Fingerprint.build(val, k=64, sample=16)
    assert fp.find(np.concatenate([val[100:140], train[:100]])) is None


def test_warmup_or_calibration_on_validation_tokens_is_caught():
    from pgolf.model import GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_hidden=64,
                          rope_dims=8, num_loops=0, parallel_residual="none", xsa_last_n=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rates = measure_rates(model, seq_len=32, batch_seqs=2, iters=1, warmup=1)  # synthetic tokens: legal
    assert rates.forward_tokens_per_s > 0 and rates.train_tokens_per_s > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    val = mark_validation(torch.randint(0, 32, (5000,), generator=torch.Generator().manual_seed(1)))
    batches = [torch.randint(0, 32, (2, 33)), val[:66].view(2, 33)]  # the second warm-up batch is validation
    with pytest.raises(ComplianceViolation) as ei:
        measure_rates(model, seq_len=32, batch_seqs=2, iters=1, warmup=0, batches=batches)
    assert ei.value.kind == "val_in_ttt_calibration" and ei.value.step == 1


def test_ledger_bookkeeping_is_vectorized_and_cheap():
    r = bench_ledger(n_targets=2_000_000, chunk=32_768, stride=64, batch_windows=32, seq_len=2048, epochs=3)
    assert r["score_events"] == -(-2_000_000 // 2048) and r["adapt_steps"] == 3 * (-(-2_000_000 // 32_768) - 1)
    # ~1000 score events + ~180 steps + summary over 2 M targets: well under a second even on a loaded CPU
    assert r["seconds_total"] < 2.0


def test_plan_ttt_fits_the_budget():
    rates = MeasuredRates(forward_tokens_per_s=1e6, train_tokens_per_s=3e5, step_seconds=0.01)
    n = 1_000_000
    full = plan_ttt(1e9, rates, n, window=2048, stride=64, seq_len=2048, max_epochs=3)
    assert full.epochs == 3 and full.fits
    score_s = full.n_windows * 2048 / 1e6
    assert full.score_seconds == pytest.approx(score_s)
    per_epoch = (full.n_chunks - 1) * 16 * 2048 / 3e5 + (full.n_chunks - 1) * 0.01
    assert full.predicted_seconds == pytest.approx(score_s + 3 * per_epoch)
    # a budget for scoring + 1.5 epochs at safety 1.0 → 1 epoch
    one = plan_ttt(score_s + 1.5 * per_epoch, rates, n, max_epochs=3, safety=1.0)
    assert one.epochs == 1 and one.fits and one.predicted_seconds <= score_s + 1.5 * per_epoch
    assert one.settings_overrides() == {"epochs": 1, "chunk_tokens": 32_768}
    none = plan_ttt(score_s * 0.5, rates, n)
    assert none.epochs == 0 and not none.fits
    # more ranks → more epochs fit the same budget; larger chunks are considered
    multi = plan_ttt(score_s / 4 + 2.2 * per_epoch / 4, rates, n, world_size=4, safety=1.0,
                     chunk_tokens=(32_768, 65_536))
    assert multi.epochs >= 2
    assert estimate_lora_seconds([100, 48], rates, chunk=48, window=64) == pytest.approx((48 + 64 + 64 + 48) / 3e5)


def test_multi_range_steps_are_vectorized_and_exact():
    led = Ledger(200, known_inputs=[100])
    led.score_many(np.array([[0, 50], [100, 150]]))
    with pytest.raises(ComplianceViolation) as ei:  # second range runs past the scored part of doc 2
        led.adapt(np.array([[0, 40], [100, 160]]), label="lora_adamw:chunk=0")
    assert (ei.value.position, ei.value.label) == (150, "lora_adamw:chunk=0")
    with pytest.raises(ComplianceViolation) as ei:  # overlapping ranges in one event = scoring twice
        led.score_many([(150, 170), (160, 180)])
    assert ei.value.kind == "rescore" and ei.value.position == 160
    led.score_many([(50, 100), (150, 200)])
    led.adapt([(0, 60), (40, 100), (100, 150)])  # overlapping reads: each target counted once
    s = led.summary(require_complete=True)
    assert s.adapted_targets == 150 and s.adapt_reads == 60 + 60 + 50
    assert led.known_input_reads == 0  # target 99 was scored by then


def test_lora_bookkeeping_bench_small():
    from pgolf.eval.ledger import bench_ledger_lora

    r = bench_ledger_lora(n_docs=200, mean_doc_len=300, chunk=48, window=256, batch_docs=16)
    assert r["score_events"] > 0 and r["adapt_steps"] > 0 and r["ledger_seconds"] < r["seconds_total"] + 1e-9


def test_study_ledger_records_violations_and_the_report_fails():
    """A study of an illegal variant (pre-quant TTT on the validation tokens) runs to the end: the ledger records
    each adaptation on unscored targets instead of raising, and the compliance report fails condition 3."""
    from pgolf.eval import ComplianceReport

    led = Ledger(100, study=True)
    led.adapt([(0, 100)], label="prequant_ttt:epoch=0")  # every target, before any is scored
    led.score(0, 100, label="sliding")
    led.adapt([(10, 20)], label="chunk_sgd:chunk=0")  # legal: scored already
    s = led.summary(require_complete=True)
    assert s.study and s.violations == 1 and s.violation_examples[0]["label"] == "prequant_ttt:epoch=0"
    assert s.violation_examples[0]["kind"] == "adapt_before_score" and s.min_adapt_gap == 1
    rep = ComplianceReport.build(dict(val_bpb=1.0, val_loss=2.0, tokens=100, bytes=300, seconds=1.0), ledger=s)
    c = rep.to_dict()["conditions"]["score_before_update"]
    assert c["status"] == "FAIL" and "STUDY RUN" in c["evidence"] and not rep.ok
    assert "STUDY RUN" in rep.render()
    with pytest.raises(ComplianceViolation):  # the same step in a normal ledger raises at once
        Ledger(100).adapt([(0, 100)], label="prequant_ttt:epoch=0")
