"""The byte sidecar of a text-rewriting tokenizer (CaseOps): every scoring path counts the target at stream position
j as ``sidecar[j]`` bytes. A sidecar holding the tokenizer's own counts gives exactly the tokenizer's result; a
random one gives Σ sidecar over the scored targets, window by window; a sidecar of another stream is refused."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pgolf.data.tokenizer import ByteTables, count_bytes
from pgolf.eval import evaluate, evaluate_sliding, run_ttt
from pgolf.eval.scoring import WindowScorer
from tests.eval import test_scoring as sc
from tests.eval import test_ttt as tt
from tests.eval.test_bpb import BOS, make_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def table_sidecar(tokens: torch.Tensor, tables: ByteTables) -> torch.Tensor:
    """The sidecar a tokenizer that rewrites nothing would ship: position j holds the counted bytes of target j."""
    counted = count_bytes(tokens[:-1], tokens[1:], tables).to(torch.int32)
    return torch.cat([torch.zeros(1, dtype=torch.int32), counted])


def random_sidecar(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    side = torch.randint(0, 9, (n,), generator=g, dtype=torch.int32)
    side[-1] = 50  # a count shifted by one position would miss it
    return side


@pytest.mark.parametrize("gather,doc_isolated", [(True, False), (False, False), (True, True)])
def test_each_window_counts_the_sidecar_of_its_scored_targets(gather, doc_isolated):
    tokens = make_tokens(301, sc.V, seed=4)
    side = random_sidecar(301, seed=5)
    starts = torch.tensor([0, 37, 100, 236])
    lengths = torch.tensor([64, 64, 50, 64])
    offsets = torch.tensor([0, 48, 13, 63])
    scorer = WindowScorer(sc.MODEL, sc.TABLES.with_sidecar(side), width=64, batch=3, gather=gather,
                          doc_isolated=doc_isolated, bos_id=BOS)
    _, nbytes, count = scorer.score(tokens, starts, lengths, offsets)
    expected = sum(int(side[s + o + 1:s + n + 1].sum()) for s, n, o in zip(starts.tolist(), lengths.tolist(),
                                                                            offsets.tolist()))
    assert int(count) == int((lengths - offsets).sum()) and int(nbytes) == expected


def test_plain_and_sliding_eval_count_the_sidecar():
    tokens = make_tokens(641, sc.V, seed=6)
    for run in (lambda t: evaluate(sc.MODEL, tokens, t, seq_len=64, batch_seqs=3),
                lambda t: evaluate_sliding(sc.MODEL, tokens, t, window=64, stride=16, batch_windows=5)):
        base = run(sc.TABLES)
        same = run(sc.TABLES.with_sidecar(table_sidecar(tokens, sc.TABLES)))
        assert (same.bytes, same.nll_sum, same.val_bpb) == (base.bytes, base.nll_sum, base.val_bpb)
        side = random_sidecar(tokens.numel(), seed=7)
        other = run(sc.TABLES.with_sidecar(side))
        assert other.nll_sum == base.nll_sum and other.bytes == int(side[1:].sum())
        assert other.val_bpb == pytest.approx(other.nll_sum / (math.log(2) * other.bytes), rel=1e-12)


def test_sliding_eval_split_over_ranks_counts_each_ranks_own_targets():
    tokens = make_tokens(641, sc.V, seed=8)
    side = random_sidecar(tokens.numel(), seed=9)
    kw = dict(window=64, stride=16, batch_windows=4, world_size=2, reduce=False)
    parts = [evaluate_sliding(sc.MODEL, tokens, sc.TABLES.with_sidecar(side), rank=r, **kw) for r in (0, 1)]
    lut = [evaluate_sliding(sc.MODEL, tokens, sc.TABLES.with_sidecar(table_sidecar(tokens, sc.TABLES)), rank=r,
                            **kw) for r in (0, 1)]
    plain = [evaluate_sliding(sc.MODEL, tokens, sc.TABLES, rank=r, **kw) for r in (0, 1)]
    assert [p.bytes for p in lut] == [p.bytes for p in plain]
    first = parts[0].tokens  # rank 0 scores targets 1 .. first
    assert (parts[0].bytes, parts[1].bytes) == (int(side[1:first + 1].sum()), int(side[first + 1:].sum()))


@pytest.mark.parametrize("mode,settings", [
    ("chunk", dict(tt.CHUNK, epochs=1, probes=False)),
    ("lora", dict(tt.LORA, probes=False)),
    ("phased", dict(tt.PHASED_DIST)),
    ("lora_sliding", dict(tt.SLIDE, slide_lora_reset=4)),
])
def test_every_ttt_mode_counts_the_sidecar(mode, settings):
    val = tt.drift_val(2048)
    model = tt.pretrained_small(steps=10)
    base = run_ttt(copy.deepcopy(model), val, tt.TABLES, mode=mode, settings=settings, log=None)
    same = run_ttt(copy.deepcopy(model), val, tt.TABLES.with_sidecar(table_sidecar(val, tt.TABLES)), mode=mode,
                   settings=settings, log=None)
    assert (same.bytes, same.nll_sum, same.val_bpb) == (base.bytes, base.nll_sum, base.val_bpb)
    side = random_sidecar(val.numel(), seed=10)
    other = run_ttt(copy.deepcopy(model), val, tt.TABLES.with_sidecar(side), mode=mode, settings=settings, log=None)
    assert other.tokens == val.numel() - 1 and other.bytes == int(side[1:].sum())
    assert other.nll_sum == base.nll_sum


def test_a_sidecar_of_another_stream_is_refused():
    tokens = make_tokens(641, sc.V, seed=11)
    short = sc.TABLES.with_sidecar(random_sidecar(600, seed=12))
    with pytest.raises(ValueError, match="sidecar covers 600 tokens but the scored stream has 641"):
        evaluate(sc.MODEL, tokens, short, seq_len=64)
    with pytest.raises(ValueError, match="sidecar covers 600 tokens"):
        run_ttt(copy.deepcopy(sc.MODEL), tokens, short, mode="lora", settings=dict(tt.LORA, probes=False), log=None)


def test_a_compiled_scorer_counts_the_sidecar_as_the_eager_one(monkeypatch):
    """The sidecar positions are an input of the compiled batch function (warmed up on random tokens first)."""
    import pgolf.eval.scoring as S

    monkeypatch.setattr(S, "COMPILE_BACKEND", "aot_eager")  # as tests/eval/test_scoring.py: no C++ build here
    tokens = make_tokens(101, sc.V, seed=13)
    tables = sc.TABLES.with_sidecar(random_sidecar(101, seed=14))
    kw = dict(window=64, stride=16, batch_windows=2)
    eager = evaluate_sliding(sc.MODEL, tokens, tables, **kw)
    torch._dynamo.reset()
    comp = evaluate_sliding(sc.MODEL, tokens, tables, compile=True, **kw)
    torch._dynamo.reset()
    assert comp.warmup_s > 0 and (comp.bytes, comp.tokens) == (eager.bytes, eager.tokens)
    assert (eager.bytes, eager.tokens) == (int(tables.sidecar[1:].sum()), 100)
