"""Sliding-window eval: the window plan's exactly-once tiling, agreement with per-window references and plain eval,
the benefit of context, doc isolation and rank splitting."""

from __future__ import annotations

import pytest
import torch

from pgolf.eval import evaluate, evaluate_sliding, window_plan
from tests.eval.test_bpb import BOS, LagModel, _check_cu_calls, direct, make_tables, make_tokens, naive

V = 24
TABLES = make_tables(V, seed=1)


def spec_starts(n, window, stride):
    """Window starts as the spec words them: ws = 0, stride, ... while ws + window − stride < N (at least one)."""
    if n <= 0:
        return []
    return [ws for ws in range(0, n, stride) if ws + window - stride < n] or [0]


def check_plan(n, window, stride):
    plan = window_plan(n, window, stride)
    assert [s for s, _, _ in plan] == spec_starts(n, window, stride)
    hits = [0] * n
    for i, (s, e, o) in enumerate(plan):
        assert 0 <= s < e <= n and e - s <= window and s % stride == 0
        assert e == min(s + window, n), "a window ends at s + window or at the end of the stream"
        if i == 0:
            assert o == 0
        else:
            assert 1 <= e - s - o <= stride, "later windows score their last (up to) stride positions"
            assert o >= window - stride, "every scored target after the first window has window − stride context"
            assert e - s == window or i == len(plan) - 1, "only the last window may be short"
        for t in range(s + o, e):
            hits[t] += 1
    assert hits == [1] * n, "every target scored exactly once"
    if plan:
        assert plan[-1][1] == n
    return plan


@pytest.mark.parametrize("n,window,stride", [
    (1000, 128, 48),  # odd N, stride not dividing the window: short last window
    (1000, 128, 64),
    (1024, 128, 64),  # windows end exactly at N
    (1000, 128, 128),  # stride == window: plain windows plus a short tail
    (1000, 128, 1),
    (50, 128, 16),  # N < window: one window scoring everything
    (128, 128, 64),  # N == window
    (129, 128, 64),
    (1, 8, 4),
])
def test_window_plan_covers_every_target_once(n, window, stride):
    plan = check_plan(n, window, stride)
    if n <= window:
        assert plan == [(0, n, 0)]


def test_window_plan_odd_example_values():
    plan = window_plan(1000, 128, 48)
    assert plan[0] == (0, 128, 0) and plan[1] == (48, 176, 80)
    assert plan[-1] == (912, 1000, 80)  # 912 + 80 = 992 = end of the previous window (864 + 128): 8 scored
    assert plan[-2] == (864, 992, 80)
    assert len(plan) == 20


def test_window_plan_brute_force_small():
    for n in range(0, 41):
        for window in range(1, 13):
            for stride in range(1, window + 1):
                check_plan(n, window, stride)
    assert window_plan(0, 8, 4) == []


def test_window_plan_rejects_bad_stride():
    for window, stride in ((8, 0), (8, 9), (0, 1)):
        with pytest.raises(ValueError):
            window_plan(100, window, stride)


@pytest.mark.parametrize("doc_isolated", [False, True])
@pytest.mark.parametrize("n,window,stride,batch", [(333, 64, 16, 5), (333, 64, 24, 32), (200, 64, 64, 3)])
def test_sliding_matches_per_window_reference(doc_isolated, n, window, stride, batch):
    tokens = make_tokens(n + 1, V, seed=2, bos_rate=0.06 if doc_isolated else 0.0)
    model = LagModel(V, (0, 1, 4), seed=3)
    res = evaluate_sliding(model, tokens, TABLES, window=window, stride=stride, batch_windows=batch,
                           doc_isolated=doc_isolated)
    calls = list(model.calls)
    ref = naive(model, tokens, TABLES, window_plan(n, window, stride), doc_isolated=doc_isolated)
    assert (res.tokens, res.bytes) == (n, ref[1]) and ref[2] == n
    assert res.nll_sum == pytest.approx(ref[0], rel=1e-12)
    assert res.mode == "sliding" and res.seq_len == window and res.stride == stride and res.batch == batch
    assert res.windows == len(window_plan(n, window, stride))
    if doc_isolated:
        _check_cu_calls(calls, window, BOS)
    else:
        assert all(c["cu_seqlens"] is None and c["shape"] == (batch, window) for c in calls)


@pytest.mark.parametrize("window", [301, 300, 512])
def test_sliding_window_covering_stream_equals_full_context(window):
    n = 300
    tokens = make_tokens(n + 1, V, seed=4)
    model = LagModel(V, (0, 1, 2, 7), seed=5)
    nll, nbytes, bpb = direct(model, tokens, TABLES)
    res = evaluate_sliding(model, tokens, TABLES, window=window, stride=16)
    assert res.windows == 1 and res.tokens == n and res.bytes == nbytes
    assert res.nll_sum == pytest.approx(nll, rel=1e-12)
    assert res.val_bpb == pytest.approx(bpb, rel=1e-12)


@pytest.mark.parametrize("lags", [(), (0,)])
def test_sliding_equals_plain_for_context_free_model(lags):
    seq_len, n = 64, 8 * 64
    tokens = make_tokens(n + 1, V, seed=6)
    model = LagModel(V, lags, seed=7)
    plain = evaluate(model, tokens, TABLES, seq_len=seq_len, batch_seqs=3)
    for stride in (16, 40, 64):
        sl = evaluate_sliding(model, tokens, TABLES, window=seq_len, stride=stride, batch_windows=7)
        assert (sl.tokens, sl.bytes) == (plain.tokens, plain.bytes)
        assert sl.val_bpb == pytest.approx(plain.val_bpb, rel=1e-13, abs=0)


def test_sliding_with_stride_equal_window_is_plain_eval():
    seq_len, n = 32, 12 * 32
    tokens = make_tokens(n + 1, V, seed=8)
    model = LagModel(V, (0, 1, 3), seed=9)
    plain = evaluate(model, tokens, TABLES, seq_len=seq_len, batch_seqs=5)
    sl = evaluate_sliding(model, tokens, TABLES, window=seq_len, stride=seq_len, batch_windows=5)
    assert (sl.tokens, sl.bytes) == (plain.tokens, plain.bytes)
    assert sl.nll_sum == pytest.approx(plain.nll_sum, rel=1e-12)


def periodic_model_and_tokens(period=23, n=40 * 64, vocab=V, seed=10):
    """A stream repeating a random pattern (10% noise) and a model that predicts the token one period back."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(2, vocab, (period,), generator=g)
    tokens = pattern.repeat(n // period + 2)[: n + 1].clone()
    noise = torch.rand(n + 1, generator=g) < 0.1
    tokens[noise] = torch.randint(2, vocab, (int(noise.sum()),), generator=g)
    emb = torch.zeros(1, vocab + 1, vocab)
    emb[0, :vocab] = 6.0 * torch.eye(vocab)  # y[t] = x[t + 1] = x[t + 1 − period]: lag period − 1
    return LagModel(vocab, (period - 1,), emb=emb, seed=seed), tokens


def test_sliding_beats_plain_when_context_helps():
    model, tokens = periodic_model_and_tokens()
    seq_len = 64
    plain = evaluate(model, tokens, TABLES, seq_len=seq_len, batch_seqs=8)
    sl = evaluate_sliding(model, tokens, TABLES, window=seq_len, stride=16, batch_windows=8)
    assert sl.tokens == plain.tokens and sl.bytes == plain.bytes
    # plain eval scores the first period − 1 targets of each window blind; sliding gives all ≥ 48 tokens of context
    assert sl.val_bpb < plain.val_bpb - 0.1
    # the full-context computation is what sliding eval reproduces when stride leaves enough context
    assert sl.nll_sum == pytest.approx(direct(model, tokens, TABLES)[0], rel=1e-12)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("doc_isolated", [False, True])
def test_sliding_rank_split_partial_sums_add_up(world_size, doc_isolated):
    tokens = make_tokens(517 + 1, V, seed=11)
    model = LagModel(V, (0, 2), seed=12)
    kw = dict(window=64, stride=24, batch_windows=4, doc_isolated=doc_isolated)
    full = evaluate_sliding(model, tokens, TABLES, **kw)
    parts = [evaluate_sliding(model, tokens, TABLES, rank=r, world_size=world_size, reduce=False, **kw)
             for r in range(world_size)]
    assert sum(p.tokens for p in parts) == full.tokens == 517
    assert sum(p.bytes for p in parts) == full.bytes
    assert sum(p.nll_sum for p in parts) == pytest.approx(full.nll_sum, rel=1e-13)
    # each rank reports the size of the whole plan
    assert all(p.windows == full.windows for p in parts)


def test_sliding_tiny_and_empty_streams():
    model = LagModel(V, (0, 1))
    one = evaluate_sliding(model, torch.tensor([BOS, 5]), TABLES, window=8, stride=4)
    assert one.tokens == 1 and one.windows == 1
    with pytest.raises(ValueError):  # nothing to score
        evaluate_sliding(model, torch.tensor([BOS]), TABLES, window=8, stride=4)
