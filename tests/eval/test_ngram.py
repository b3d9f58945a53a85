"""The n-gram cache mixture (pgolf.eval.ngram): exact counts, a normalized mixture (and #1499's weighting that is
not), score-first learning checked by the ledger, and the chunk mode scoring through it."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from pgolf.compliance_guard import ComplianceViolation, mark_validation
from pgolf.eval import Ledger, evaluate_sliding, run_ttt
from pgolf.eval.ngram import NGramCache, NGramMixer
from pgolf.eval.ttt import ChunkTTT, TTTSettings
from tests.eval.test_ttt import BOS, CHUNK, N_VAL, SRC_A, TABLES, drift_val, pretrained_small, word_stream

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_counts(tokens: list[int], orders, upto: int):
    """c(order, ctx) and c(order, ctx, y) over targets [0, upto) by direct counting."""
    ctx, pair = Counter(), Counter()
    for t in range(upto):
        for k in orders:
            if t - k + 2 < 0:
                continue
            c = tuple(tokens[t - k + 2: t + 1])
            ctx[(k, c)] += 1
            pair[(k, c, tokens[t + 1])] += 1
    return ctx, pair


def test_cache_counts_are_exact():
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 7, (600,), generator=g)  # a small vocabulary: contexts repeat
    cache = NGramCache((2, 3, 4))
    for lo in range(0, 400, 37):  # many small updates: the runs merge
        cache.update(toks, torch.arange(lo, min(lo + 37, 400)))
    ctx, pair = brute_counts(toks.tolist(), (2, 3, 4), 400)
    targets = torch.arange(300, 599)
    c_ctx, c_pair, valid = cache.lookup(toks, targets, toks[targets + 1])
    for j, t in enumerate(targets.tolist()):
        for o, k in enumerate((2, 3, 4)):
            c = tuple(toks[t - k + 2: t + 1].tolist())
            assert int(c_ctx[o, j]) == ctx[(k, c)]
            assert int(c_pair[o, j]) == pair[(k, c, int(toks[t + 1]))]
    assert len(cache.contexts.runs) < 10  # merged, not one run per update


def _mixer(weighting="normalized"):
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, 11, (400,), generator=g)
    cache = NGramCache((2, 3))
    cache.update(toks, torch.arange(0, 300))
    return NGramMixer(cache, alpha=0.4, kappa=2.0, weighting=weighting), toks


def test_mixture_is_a_distribution_and_the_score_is_its_nll():
    mixer, toks = _mixer()
    t = torch.arange(300, 340)
    logp = torch.log_softmax(torch.randn(40, 11, generator=torch.Generator().manual_seed(2)).double(), -1)
    lp = mixer.log_probs(logp, toks, t)
    assert torch.allclose(torch.logsumexp(lp, -1), torch.zeros(40, dtype=torch.float64), atol=1e-12)
    nll = mixer.mix(-logp.gather(1, toks[t + 1][:, None])[:, 0], toks, t)
    assert torch.allclose(nll, -lp.gather(1, toks[t + 1][:, None])[:, 0], atol=1e-12)
    assert mixer.stats["hits"] > 0 and (nll != -logp.gather(1, toks[t + 1][:, None])[:, 0]).any()


def test_record_weighting_is_not_a_distribution():
    mixer, toks = _mixer("record")
    t = torch.arange(300, 340)
    logp = torch.log_softmax(torch.randn(40, 11, generator=torch.Generator().manual_seed(2)).double(), -1)
    lse = torch.logsumexp(mixer.log_probs(logp, toks, t), -1)
    assert lse.abs().max() > 1e-3  # Σ_y p(y) ≠ 1: α depends on the candidate token


@pytest.fixture(scope="module")
def small():
    return drift_val(), pretrained_small()


NGRAM = dict(CHUNK, probes=True, epochs=0, ngram=True, ngram_orders=(2, 3, 4), ngram_alpha=0.5)


def test_chunk_mode_scores_through_the_cache_and_passes_the_probes(small):
    """The drifting corpus repeats word sequences: the cache learns them chunk by chunk, score first."""
    val, model = small
    base = evaluate_sliding(model, val, TABLES, window=CHUNK["window"], stride=CHUNK["stride"])
    res = run_ttt(copy.deepcopy(model), val, TABLES, mode="chunk", settings=NGRAM, log=None)
    assert res.tokens == base.tokens == N_VAL and res.val_bpb < base.val_bpb - 0.05
    assert res.ledger.adapt_kinds == {"ngram_update": res.n_chunks - 1} and res.ledger.min_adapt_gap >= 1
    norm = res.probes["normalization"]
    assert norm["max_abs_logsumexp"] < 1e-4 and norm["max_abs_nll_minus_logp"] < 1e-4
    assert res.probes["causality"]["max_abs_prefix_change"] < 1e-5 and res.probes["causality"]["suffix_changed"]
    # pre-filled from training text, it helps from the first chunk on
    train = torch.tensor(word_stream(SRC_A, 20_000, 21))
    filled = run_ttt(copy.deepcopy(model), val, TABLES, mode="chunk", settings=NGRAM, log=None, prefill_tokens=train)
    assert filled.val_bpb < res.val_bpb


class LearnBeforeScoring(ChunkTTT):
    def run(self):
        for c in range(self.n_chunks):
            if c < self.n_chunks - 1:
                self.mixer.update(self.tokens, *self.chunk_targets(c))
            self.score_chunk(c)


def test_learning_a_chunk_before_scoring_it_is_caught(small):
    val, model = small
    s = TTTSettings.from_dict(dict(NGRAM, bos_id=BOS))
    r = LearnBeforeScoring(copy.deepcopy(model), val, TABLES, s, Ledger(N_VAL), rank=0, world_size=1,
                           log=lambda m: None)
    with pytest.raises(ComplianceViolation) as ei:
        r.run()
    assert ei.value.kind == "adapt_before_score" and ei.value.label == "ngram_update"


def test_study_weighting_needs_study_and_fails_the_normalization_probe(small):
    val, model = small
    with pytest.raises(ValueError, match="study"):
        TTTSettings.from_dict(dict(NGRAM, ngram_weighting="record"))
    res = run_ttt(copy.deepcopy(model), val, TABLES, mode="chunk",
                  settings=dict(NGRAM, ngram_weighting="record", study=True), log=None)
    assert res.probes["normalization"]["max_abs_nll_minus_logp"] > 1e-3  # condition 2 fails


def test_prefill_refuses_validation_tokens(small):
    val, model = small
    with pytest.raises(ComplianceViolation):
        run_ttt(copy.deepcopy(model), val, TABLES, mode="chunk", settings=NGRAM, log=None,
                prefill_tokens=mark_validation(val))


def test_lora_sliding_scores_through_the_cache_batch_by_batch(small):
    """#1499's eval: LoRA sliding TTT with the cache inside; the cache learns each batch after scoring it."""
    from tests.eval.test_ttt import SLIDE

    val, model = small
    kw = dict(SLIDE, ngram=True, ngram_orders=(2, 3, 4), ngram_alpha=0.5)
    with_cache = run_ttt(copy.deepcopy(model), val, TABLES, mode="lora_sliding", settings=kw, log=None)
    without = run_ttt(copy.deepcopy(model), val, TABLES, mode="lora_sliding", settings=SLIDE, log=None)
    assert with_cache.tokens == without.tokens and with_cache.val_bpb < without.val_bpb - 0.05
    kinds = with_cache.ledger.adapt_kinds
    assert kinds["ngram_update"] == kinds["slide_lora_adamw"] and with_cache.ledger.min_adapt_gap >= 1
