"""Score-first TTT: chunked TTT gains on a drifting corpus and equals sliding eval without training; illegal
orders are caught by the ledger; the LoRA forward is the model's own forward; LoRA state never crosses documents;
phased TTT; an optional 2-rank gloo run matches the single-process one.

Corpus: word-level tokens (BOS = 1, word i = 2 + i) from two seeded :class:`MarkovSource` chains over the same
24 words; the validation stream switches from chain A to chain B halfway. The tiny model is pre-trained for a
few steps on chain A only, so only adaptation can learn B.
"""

from __future__ import annotations

import copy
import math
import os
import time

import pytest
import torch

from pgolf.data.synthetic import MarkovSource
from pgolf.data.tokenizer import ByteTables
from pgolf.eval import ComplianceViolation, Ledger, MeasuredRates, evaluate_sliding, plan_ttt, run_ttt
from pgolf.eval.ttt import ChunkTTT, DocLoRA, LoRAHooks, TTTSettings, cosine_lr, document_spans, lora_token_nll
from pgolf.model import GPT, GPTConfig
from pgolf.utils import distributed_session

BOS = 1
NW = 24
V = 32
N_VAL = 8192
CHUNK = dict(window=64, stride=32, batch_windows=16, chunk_tokens=1024, seq_len=64, epochs=3, lr=0.5)
LORA = dict(lora_rank=4, lora_alpha=8.0, lora_chunk=32, lora_window=64, lora_lr=1e-2, lora_batch_docs=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def word_stream(src: MarkovSource, n: int, seed: int) -> list[int]:
    out: list[int] = []
    for d in src.sample_word_ids(4000, seed):
        out.append(BOS)
        out.extend((d + 2).tolist())
        if len(out) >= n:
            break
    return out[:n]


SRC_A = MarkovSource(seed=0, num_words=NW, p_end=1 / 30)
SRC_B = MarkovSource(seed=5, num_words=NW, p_end=1 / 30)


def word_tables() -> ByteTables:
    base = torch.zeros(V, dtype=torch.int16)
    base[2:2 + NW] = torch.tensor([len(w) for w in SRC_A.words], dtype=torch.int16)
    space = torch.zeros(V, dtype=torch.bool)
    space[2:2 + NW] = True
    boundary = torch.ones(V, dtype=torch.bool)
    boundary[2:2 + NW] = False
    return ByteTables(base, space, boundary)


TABLES = word_tables()


def drift_val(n: int = N_VAL) -> torch.Tensor:
    """n + 1 tokens: chain A for the first half, chain B after."""
    return torch.tensor(word_stream(SRC_A, n // 2, 11) + word_stream(SRC_B, n - n // 2 + 1, 12))


SMALL_CFG = GPTConfig(vocab_size=V, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_hidden=64,
                      rope_dims=8, num_loops=0, parallel_residual="none", xsa_last_n=2, qk_gain_init=4.0,
                      tied_embed_init_std=0.05, bos_id=BOS)

# every element of the sota architecture on: looping, two-lane parallel residuals, XSA, skip gates, sparse gate,
# BOS SmearGate (and BigramHash, which sota lacks, for good measure)
SOTA_CFG = GPTConfig(vocab_size=V, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, mlp_hidden=64,
                     rope_dims=4, qk_gain_init=4.0, xsa_last_n=4, num_loops=1, loop_start=1, loop_end=2,
                     parallel_residual="two_lane", parallel_start=3, smear_gate="bos", attn_gate="sparse",
                     attn_gate_kappa=0.5, bigram_buckets=17, bigram_dim=8, bos_id=BOS)


def pretrained_small(steps: int = 60, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(SMALL_CFG)
    train = torch.tensor(word_stream(SRC_A, 60_000, 13))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        s = torch.randint(0, train.numel() - 65, (8,), generator=g)
        b = train[s[:, None] + torch.arange(65)]
        m.loss(b[:, :-1], b[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    return m


def randomized_sota(seed: int = 1) -> GPT:
    """The sota-like config with every parameter perturbed, so every gate, smear and mix matters."""
    torch.manual_seed(seed)
    m = GPT(SOTA_CFG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim >= 2 and not any(k in name for k in ("resid_mix", "skip", "lane")):
                fan_in = 1 if "emb" in name else p.shape[1]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            else:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        m.smear_lambda.fill_(0.8)
    m.looping_active = True
    m.eval()
    return m


@pytest.fixture(scope="module")
def drift():
    val = drift_val()
    model = pretrained_small()
    base = evaluate_sliding(model, val, TABLES, window=CHUNK["window"], stride=CHUNK["stride"],
                            batch_windows=CHUNK["batch_windows"])
    return val, model, base


# ---------------------------------------------------------------------------------------------------------------
# chunked TTT


def test_chunk_ttt_lowers_bpb_on_drifting_corpus(drift):
    val, model, base = drift
    m = copy.deepcopy(model)
    res = run_ttt(m, val, TABLES, mode="chunk", settings=CHUNK, log=None)
    assert res.tokens == N_VAL == base.tokens and res.bytes == base.bytes
    assert res.n_chunks == 8 and res.adapt_steps == 7 * CHUNK["epochs"]
    gain = base.val_bpb - res.val_bpb
    assert gain > 0.08, f"TTT {res.val_bpb:.4f} vs no TTT {base.val_bpb:.4f}"
    # the gain comes from the drifted half: chain A was already learned in pre-training
    half = N_VAL // 2
    sa = evaluate_sliding(model, val[: half + 1], TABLES, window=64, stride=32)
    assert sa.val_bpb < 0.3 < base.val_bpb  # the pre-trained model knows A, not B
    # deterministic
    res2 = run_ttt(copy.deepcopy(model), val, TABLES, mode="chunk", settings=CHUNK, log=None)
    assert res2.nll_sum == res.nll_sum
    # the report's evidence
    assert res.ledger.tokens_scored == N_VAL and res.ledger.max_times_scored == 1
    assert res.ledger.min_adapt_gap >= 1
    assert res.probes["normalization"]["max_abs_logsumexp"] < 1e-4
    assert res.probes["causality"]["max_abs_prefix_change"] < 1e-5 and res.probes["causality"]["suffix_changed"]


def test_chunk_ttt_without_training_equals_sliding_eval(drift):
    val, model, base = drift
    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = run_ttt(m, val, TABLES, mode="chunk", settings=dict(CHUNK, epochs=0, probes=False), log=None)
    assert (res.tokens, res.bytes) == (base.tokens, base.bytes)
    assert res.nll_sum == pytest.approx(base.nll_sum, rel=1e-9)
    assert res.adapt_steps == 0 and res.ledger.min_adapt_gap is None
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_chunk_plan_windows_chunks_and_reads(drift):
    val, model, _ = drift
    s = TTTSettings.from_dict(dict(CHUNK, epochs=1, probes=False, bos_id=BOS))
    led = Ledger(N_VAL)
    r = ChunkTTT(copy.deepcopy(model), val, TABLES, s, led, rank=0, world_size=1, log=lambda m: None)
    S = s.chunk_tokens
    for c in range(r.n_chunks):  # each window belongs to the chunk of its first scored target
        w0, w1 = r.bounds[c], r.bounds[c + 1]
        assert bool(((r.first[w0:w1] // S) == c).all()) and w1 > w0
    r.run()
    summ = led.summary(require_complete=True)
    # training read exactly the targets of chunks 0..C-2 (S a multiple of seq_len) and never the last chunk
    assert summ.adapted_targets == (r.n_chunks - 1) * S
    assert (led.first_adapt[(r.n_chunks - 1) * S:] == -1).all()
    assert (led.first_adapt[: (r.n_chunks - 1) * S] > led.scored_at[: (r.n_chunks - 1) * S]).all()
    # chunk c's training comes after chunk c's scoring and before chunk c+1's
    for c in range(r.n_chunks - 1):
        t_next = r.chunk_targets(c + 1)[0]
        assert led.first_adapt[c * S] < led.scored_at[t_next]
    assert cosine_lr(1.0, 0, 8) == 1.0 and cosine_lr(1.0, 7, 8) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(1.0, 3, 7) == pytest.approx(0.5)
    assert r.opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(s.lr, r.n_chunks - 2, r.n_chunks))
    assert all("momentum_buffer" in r.opt.state[p] for p in r.params)  # one SGD, state carried across chunks
    # the budget planner's view of the same run
    plan = plan_ttt(1e6, MeasuredRates(1e5, 3e4), N_VAL, window=64, stride=32, seq_len=64, chunk_tokens=(1024,),
                    max_epochs=1)
    assert (plan.n_chunks, plan.n_windows, plan.epochs) == (r.n_chunks, r.starts.numel(), 1)
    assert plan.train_seconds == pytest.approx(summ.adapt_reads / 3e4)


def test_chunk_ttt_parameter_subset(drift):
    val, model, _ = drift
    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    run_ttt(m, val, TABLES, mode="chunk", settings=dict(CHUNK, epochs=1, params=["blocks.*.mlp.*"], probes=False),
            log=None)
    changed = {k for k, v in m.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("blocks.") and ".mlp." in k for k in changed)
    assert all(p.requires_grad for p in m.parameters())  # flags restored
    with pytest.raises(ValueError, match="no parameter matches"):
        run_ttt(copy.deepcopy(model), val, TABLES, mode="chunk", settings=dict(CHUNK, params=["nope*"]), log=None)


class TrainBeforeScore(ChunkTTT):
    def run(self):
        for c in range(self.n_chunks):
            if c < self.n_chunks - 1:
                self.train_chunk(c)
            self.score_chunk(c)


class MultiEpochFirst(ChunkTTT):
    """Scores chunk 0, then trains over the whole stream for several epochs before scoring the rest."""

    def run(self):
        self.score_chunk(0)
        for _ in range(2):
            for c in range(self.n_chunks - 1):
                self.train_chunk(c)
        for c in range(1, self.n_chunks):
            self.score_chunk(c)


class ScoreTwice(ChunkTTT):
    def run(self):
        self.score_chunk(0)
        self.train_chunk(0)
        self.score_chunk(0)  # "best of two passes"


@pytest.mark.parametrize("variant,position,kind", [
    (TrainBeforeScore, 0, "adapt_before_score"),
    (MultiEpochFirst, None, "adapt_before_score"),
    (ScoreTwice, 0, "rescore"),
])
def test_illegal_orders_are_caught(drift, variant, position, kind):
    val, model, _ = drift
    s = TTTSettings.from_dict(dict(CHUNK, probes=False, bos_id=BOS))
    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    led = Ledger(N_VAL)
    r = variant(m, val, TABLES, s, led, rank=0, world_size=1, log=lambda msg: None)
    with pytest.raises(ComplianceViolation) as ei:
        r.run()
    e = ei.value
    assert e.kind == kind and e.step is not None and f"step {e.step}" in str(e)
    if variant is MultiEpochFirst:
        # chunk 0's windows scored up to the end of its last window; chunk 1's training reads past that
        position = r.chunk_targets(0)[1]
        assert e.label.startswith("chunk_sgd:chunk=1")
    assert e.position == position and f"position {position}" in str(e)
    if variant is TrainBeforeScore:  # the guard fires before the illegal update is applied
        assert e.step == 1 and all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_ledger_overhead_is_small(drift):
    """Ledger time (measured inside every ledger call) against the eval's wall time; the record-sized bookkeeping
    (40.5 M targets) is timed by pgolf.eval.ledger.bench_ledger (see the report)."""
    val, model, _ = drift
    res = run_ttt(copy.deepcopy(model), val, TABLES, mode="chunk", settings=dict(CHUNK, probes=False), log=None)
    frac = res.ledger.overhead_seconds / res.seconds
    if frac >= 0.02:  # a descheduled timer on a loaded machine: replay the same bookkeeping, best of 5
        best = math.inf
        for _ in range(5):
            led = Ledger(N_VAL)
            t0 = time.perf_counter()
            for c in range(8):
                led.score(c * 1024, (c + 1) * 1024)
                for e in range(CHUNK["epochs"] if c < 7 else 0):
                    led.adapt([(c * 1024, (c + 1) * 1024)], collective=True, label="x")
            led.summary()
            best = min(best, time.perf_counter() - t0)
        frac = best / res.seconds
    assert frac < 0.02, f"ledger overhead {100 * frac:.2f}% of eval"


# ---------------------------------------------------------------------------------------------------------------
# LoRA forward = the model's forward


def _rand_batch(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, V, (B, T + 1), generator=g)
    x[:, 0] = BOS
    x[0, T // 2] = BOS  # a document boundary inside a row: the smear gate's BOS reset must be honoured too
    return x[:, :-1], x[:, 1:]


def test_zero_lora_forward_equals_model_loss_exactly():
    model = randomized_sota()
    x, y = _rand_batch(3, 40, seed=2)
    ref = model.loss(x, y, reduction="none")
    gen = torch.Generator().manual_seed(0)
    a0 = DocLoRA.initial_a(model, 4, TTTSettings().lora_sites, gen, "cpu")
    lora = DocLoRA(model, 3, 4, 8.0, TTTSettings().lora_sites, a0)
    with torch.no_grad():
        got = lora_token_nll(model, lora, x, y)
        got_rows = lora_token_nll(model, lora, x[1:], y[1:], rows=torch.tensor([2, 0]))
    assert torch.equal(got, ref)
    assert torch.equal(got_rows, ref[1:])
    # hooks are removed afterwards
    assert torch.equal(model.loss(x, y, reduction="none"), ref)


def test_every_lora_site_is_live_and_gates_matter():
    model = randomized_sota()
    x, y = _rand_batch(2, 24, seed=3)
    ref = model.loss(x, y, reduction="none")
    sites = TTTSettings().lora_sites
    a0 = DocLoRA.initial_a(model, 4, sites, torch.Generator().manual_seed(0), "cpu")
    lora = DocLoRA(model, 2, 4, 8.0, sites, a0)
    n_slots = len(model.config.layer_plan(True)[0] + model.config.layer_plan(True)[1])
    assert len(lora.keys()) == n_slots * 5 + 1  # q, k, v, o, mlp per virtual slot + head
    for key in lora.keys():
        with torch.no_grad():
            lora.B[key].normal_(0, 0.5)
            out = lora_token_nll(model, lora, x, y)
            lora.B[key].zero_()
        assert not torch.allclose(out, ref), f"LoRA site {key} has no effect"
    # the equality above is meaningful: the sparse gate and the smear gate change the model's output
    for drop in ("gate", "smear"):
        m2 = copy.deepcopy(model)
        with torch.no_grad():
            if drop == "gate":
                for blk in m2.blocks:
                    blk.attn.gate_w = None
            else:
                m2.smear_lambda.zero_()
        assert not torch.allclose(m2.loss(x, y, reduction="none"), ref)


def test_hooks_detect_a_changed_layer_plan():
    model = randomized_sota()
    x, y = _rand_batch(1, 16, seed=4)
    sites = ("q", "mlp")
    lora = DocLoRA(model, 1, 2, 2.0, sites, DocLoRA.initial_a(model, 2, sites, torch.Generator(), "cpu"))
    model.looping_active = False  # the adapters were laid out for the looped plan
    with pytest.raises((RuntimeError, KeyError)):
        with torch.no_grad(), LoRAHooks(model, lora) as h:
            h.forward_nll(x, y)


# ---------------------------------------------------------------------------------------------------------------
# per-document LoRA TTT


def doc_tokens(src, seed, n_docs):
    return [[BOS] + (d + 2).tolist() for d in src.sample_word_ids(n_docs, seed)]


def test_lora_state_never_crosses_documents():
    model = pretrained_small(steps=20)
    docs = doc_tokens(SRC_B, 21, 6)
    docs[1] = docs[1] + docs[1][1:] + docs[1][1:]  # a long document: several chunks, several AdamW steps
    tail = [BOS, 2, 3]

    def run(doc_list, batch_docs):
        stream = torch.tensor([t for d in doc_list for t in d] + tail)
        res = run_ttt(copy.deepcopy(model), stream, TABLES, mode="lora",
                      settings=dict(LORA, lora_chunk=16, lora_batch_docs=batch_docs, probes=False), log=None)
        return res

    full = run(docs, 1)
    assert full.n_docs == len(docs) + 1 and full.tokens == sum(map(len, docs)) + len(tail) - 1
    assert full.adapt_steps >= 2  # the long document adapts over several chunks
    without_first = run(docs[1:], 1)
    # per-document nll of docs 1.. identical whether or not doc 0 preceded them (batch of one doc: exact)
    assert torch.equal(full.doc_nll[1:], without_first.doc_nll)
    # batched: doc 0 shares the batch (and the padded forward) with doc 1; scores agree to float rounding
    batched = run(docs, 4)
    batched_wo = run(docs[1:], 4)
    torch.testing.assert_close(batched.doc_nll, full.doc_nll, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched_wo.doc_nll, without_first.doc_nll, rtol=1e-5, atol=1e-6)
    # a shuffled order inside the batch does not change any document's score either
    perm = [3, 0, 5, 1, 4, 2]
    shuffled = run([docs[i] for i in perm], 8)
    torch.testing.assert_close(shuffled.doc_nll[: len(docs)], full.doc_nll[perm], rtol=1e-5, atol=1e-6)


def test_lora_scores_each_chunk_before_adapting_on_it():
    """A document's first chunk is scored by the un-adapted model (B = 0): its nll equals the base model's."""
    model = pretrained_small(steps=20)
    docs = doc_tokens(SRC_A, 22, 12)
    stream = torch.tensor([t for d in docs for t in d] + [BOS])
    K = 8
    res = run_ttt(copy.deepcopy(model), stream, TABLES, mode="lora",
                  settings=dict(LORA, lora_chunk=K, lora_batch_docs=5, probes=False), log=None)
    starts, ends = document_spans(stream, BOS)
    with torch.no_grad():
        for d in range(len(docs)):
            s, e = int(starts[d]), int(ends[d])
            base = model.loss(stream[None, s:e], stream[None, s + 1:e + 1], reduction="none")[0].double()
            if e - s <= K:  # single-chunk documents: scored before any step, so exactly the base model
                assert float(res.doc_nll[d]) == pytest.approx(float(base.sum()), rel=1e-6)
    assert res.ledger.known_input_reads > 0  # BOS inputs of documents whose predecessor was not scored yet
    assert res.ledger.min_adapt_gap >= 1 and res.ledger.max_times_scored == 1


def test_phased_ttt_runs_global_sgd_on_scored_prefix_only(drift):
    val, model, _ = drift
    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    st = dict(LORA, phase_prefix_docs=90, phases=3, phase_chunk_tokens=512, phase_seq_len=64, phase_lr=0.05,
              probes=True)
    res = run_ttt(m, val[:4097], TABLES, mode="phased", settings=st, log=None)
    phases = res.timings["phases"]
    assert [p["docs"] for p in phases] == [30, 60, 90] and sum(p["steps"] for p in phases) > 0
    assert res.ledger.adapt_kinds.get("phase_sgd", 0) == sum(p["steps"] for p in phases)
    assert res.ledger.min_adapt_gap >= 1 and res.tokens == 4096
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())  # base weights moved
    assert res.probes["normalization"]["max_abs_nll_minus_logp"] < 1e-4
    # with no prefix documents phased TTT is exactly per-document LoRA TTT
    a = run_ttt(copy.deepcopy(model), val[:2049], TABLES, mode="phased", settings=dict(LORA, phase_prefix_docs=0,
                probes=False), log=None)
    b = run_ttt(copy.deepcopy(model), val[:2049], TABLES, mode="lora", settings=dict(LORA, probes=False), log=None)
    assert a.nll_sum == b.nll_sum


# ---------------------------------------------------------------------------------------------------------------
# distributed (gloo, 2 ranks): same result as one process


PHASED_DIST = dict(LORA, lora_batch_docs=8, phase_prefix_docs=64, phases=2, phase_chunk_tokens=512, phase_seq_len=64,
                   phase_lr=0.05, probes=False)


def _dist_worker(rank, world, port, path, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with distributed_session():
        model = GPT(SMALL_CFG)
        model.load_state_dict(torch.load(path, weights_only=True))
        val = drift_val(4096)
        res = {}
        for mode, st in (("chunk", dict(CHUNK, epochs=2, probes=False)), ("phased", PHASED_DIST)):
            r = run_ttt(copy.deepcopy(model), val, TABLES, mode=mode, settings=st, log=None)
            res[mode] = {"nll": r.nll_sum, "tokens": r.tokens, "scored": r.ledger.tokens_scored,
                         "steps": r.adapt_steps, "max": r.ledger.max_times_scored, "gap": r.ledger.min_adapt_gap}
        torch.save(res, f"{out}.{rank}")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_rank_gloo_matches_single_process(tmp_path, drift):
    import socket

    import torch.multiprocessing as mp

    _, model, _ = drift
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    single = {mode: run_ttt(copy.deepcopy(model), drift_val(4096), TABLES, mode=mode, settings=st, log=None)
              for mode, st in (("chunk", dict(CHUNK, epochs=2, probes=False)), ("phased", PHASED_DIST))}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported modules (spawn would re-import torch on a loaded 2-core machine)
    mp.start_processes(_dist_worker, args=(2, port, str(path), str(tmp_path / "r")), nprocs=2, join=True,
                       start_method="fork")
    outs = [torch.load(f"{tmp_path / 'r'}.{r}", weights_only=False) for r in range(2)]
    for o in outs:
        for mode, one in single.items():
            r = o[mode]
            assert r["tokens"] == r["scored"] == 4096 and r["max"] == 1 and r["gap"] >= 1
            assert r["nll"] == pytest.approx(one.nll_sum, rel=1e-5), mode
        assert o["chunk"]["steps"] == single["chunk"].adapt_steps  # collective steps counted once
    # phased: both ranks' LoRA steps are counted, the shared global-SGD steps once
    assert outs[0]["phased"]["steps"] == single["phased"].adapt_steps


# ---------------------------------------------------------------------------------------------------------------
# the eval fast path inside TTT


def test_lora_rows_nll_is_the_full_forward_at_those_rows():
    """The LoRA path gathers a chunk's rows before the head: the same nll as the full forward there, with a
    non-zero adapter (head LoRA included)."""
    model = randomized_sota()
    x, y = _rand_batch(3, 40, seed=4)
    gen = torch.Generator().manual_seed(0)
    sites = TTTSettings().lora_sites
    lora = DocLoRA(model, 3, 4, 8.0, sites, DocLoRA.initial_a(model, 4, sites, gen, "cpu"))
    with torch.no_grad():
        for p in lora.B.values():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        pos = torch.tensor([[30, 31, 32, 33], [0, 1, 2, 3], [36, 37, 38, 39]])
        with LoRAHooks(model, lora) as h:
            full = h.forward_nll(x, y, torch.tensor([0, 1, 2]))
            rows = h.rows_nll(x, y, pos, torch.tensor([0, 1, 2]))
    assert torch.allclose(rows, full.gather(1, pos), rtol=1e-6, atol=1e-6)


def test_ttt_logs_its_phases_and_lora_resets(drift):
    val, model, _ = drift
    lines = []
    res = run_ttt(copy.deepcopy(model), val[:1025], TABLES, mode="lora", settings=dict(LORA, probes=False),
                  log=lines.append)
    t = res.timings
    assert t["score_s"] > 0 and t["adapt_s"] > 0 and t["reset_s"] > 0 and t["warmup_s"] == 0.0
    timing = [ln for ln in lines if ln.startswith("ttt_timing")]
    assert timing and "score:" in timing[0] and "adapt:" in timing[0] and "reset:" in timing[0]


def test_compiled_chunk_ttt_matches_and_warms_up_outside_the_clock(drift, monkeypatch):
    import pgolf.eval.scoring as S

    monkeypatch.setattr(S, "COMPILE_BACKEND", "aot_eager")
    val, model, _ = drift
    short = val[: 2 * CHUNK["chunk_tokens"] + 1]
    eager = run_ttt(copy.deepcopy(model), short, TABLES, mode="chunk", settings=dict(CHUNK, probes=False), log=None)
    torch._dynamo.reset()
    comp = run_ttt(copy.deepcopy(model), short, TABLES, mode="chunk", settings=dict(CHUNK, probes=False,
                                                                                   compile=True), log=None)
    torch._dynamo.reset()
    assert comp.timings["warmup_s"] > 0 and comp.adapt_steps == eager.adapt_steps
    assert comp.tokens == eager.tokens and abs(comp.val_bpb - eager.val_bpb) < 1e-5
    assert comp.ledger.tokens_scored == comp.tokens  # the warm-up scored nothing and adapted on nothing real
    with pytest.raises(ValueError, match="chunk mode"):
        run_ttt(copy.deepcopy(model), short, TABLES, mode="lora", settings=dict(LORA, compile=True), log=None)


# ---------------------------------------------------------------------------------------------------------------
# the founding systems' chunk TTT variants: AdamW (#490), Muon-NS + entropy-adaptive epochs (#1148),
# discriminative per-block LR (#1406), cosine floor (#490's root script)

VARIANTS = {
    "adamw": dict(optimizer="adamw", lr=0.01, lr_floor=0.1),
    "muon": dict(optimizer="muon", lr=0.05, ns_steps=3),
    "entropy": dict(optimizer="muon", lr=0.05, entropy_epochs=True, entropy_low=0.0, entropy_high=0.0),
    "block_lr": dict(optimizer="adamw", lr=0.01, block_lr=(0.3, 1.0)),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_chunk_variants_adapt_legally_and_help_on_drift(drift, name):
    val, model, base = drift
    res = run_ttt(copy.deepcopy(model), val, TABLES, mode="chunk", settings=dict(CHUNK, probes=False, **VARIANTS[name]),
                  log=None)
    assert res.tokens == base.tokens and res.ledger.min_adapt_gap >= 1 and res.ledger.max_times_scored == 1
    assert res.val_bpb < base.val_bpb - 0.02, f"{name}: TTT {res.val_bpb:.4f} vs none {base.val_bpb:.4f}"
    kind = VARIANTS[name]["optimizer"]
    assert res.ledger.adapt_kinds == {f"chunk_{kind}": res.adapt_steps}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_chunk_variants_refuse_to_adapt_on_unscored_tokens(drift, name):
    val, model, _ = drift
    s = TTTSettings.from_dict(dict(CHUNK, probes=False, bos_id=BOS, **VARIANTS[name]))
    r = TrainBeforeScore(copy.deepcopy(model), val, TABLES, s, Ledger(N_VAL), rank=0, world_size=1,
                         log=lambda msg: None)
    with pytest.raises(ComplianceViolation) as ei:
        r.run()
    assert ei.value.kind == "adapt_before_score" and ei.value.position == 0


def test_entropy_epochs_follow_the_scored_chunks_nll(drift):
    """#1148: +1 epoch above entropy_high, −1 (at least 1) below entropy_low, read from the chunk's scored NLL;
    deciding before the chunk is scored is a violation."""
    val, model, _ = drift
    kw = dict(CHUNK, probes=False, optimizer="muon", lr=0.02, entropy_epochs=True)
    up = run_ttt(copy.deepcopy(model), val, TABLES, mode="chunk", settings=dict(kw, entropy_low=0.0, entropy_high=0.0),
                 log=None)
    down = run_ttt(copy.deepcopy(model), val, TABLES, mode="chunk",
                   settings=dict(kw, entropy_low=50.0, entropy_high=60.0), log=None)
    same = run_ttt(copy.deepcopy(model), val, TABLES, mode="chunk",
                   settings=dict(kw, entropy_low=0.0, entropy_high=60.0), log=None)
    n = up.n_chunks - 1
    assert up.timings["epochs_per_chunk"] == [CHUNK["epochs"] + 1] * n and up.adapt_steps == n * 4
    assert down.timings["epochs_per_chunk"] == [CHUNK["epochs"] - 1] * n
    assert same.timings["epochs_per_chunk"] == [CHUNK["epochs"]] * n
    # the decision reads only scored tokens: asking for chunk 1's epochs before it is scored raises
    s = TTTSettings.from_dict(dict(kw, entropy_low=0.0, entropy_high=0.0, bos_id=BOS))
    r = ChunkTTT(copy.deepcopy(model), val, TABLES, s, Ledger(N_VAL), rank=0, world_size=1, log=lambda m: None)
    r.score_chunk(0)
    with pytest.raises(ComplianceViolation):
        r.chunk_epochs(1)


def test_muon_ns_step_is_the_orthogonalized_gradient():
    from pgolf.eval.ttt import MuonNS
    from pgolf.kernels import reference
    from pgolf.train.muon import CLASSIC_COEFFS

    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(6, 10)), torch.nn.Parameter(torch.randn(10))
    w.grad, b.grad = torch.randn(6, 10), torch.randn(10)
    w0, b0 = w.detach().clone(), b.detach().clone()
    MuonNS([w, b], lr=0.1, steps=3).step()
    ns = reference.newton_schulz(w.grad, CLASSIC_COEFFS, 3, 1e-7, torch.float32)
    assert torch.allclose(w.detach(), w0 - 0.1 * ns, atol=1e-6)
    assert torch.allclose(b.detach(), b0 - 0.1 * b.grad)  # vectors take the raw gradient


def test_block_lr_scales_every_parameter_of_a_block(drift):
    from pgolf.eval.ttt import make_optimizer, select_params

    _, model, _ = drift
    s = TTTSettings.from_dict(dict(CHUNK, optimizer="adamw", block_lr=(0.3, 1.0)))
    opt = make_optimizer(model, select_params(model), s)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    n = len(model.blocks)
    for name, p in model.named_parameters():
        want = 0.3 + 0.7 * int(name.split(".")[1]) / (n - 1) if name.startswith("blocks.") else 1.0
        assert scale[id(p)] == pytest.approx(want), name
    assert cosine_lr(1.0, 7, 8, floor=0.1) == 0.1 and cosine_lr(1.0, 0, 8, floor=0.1) == 1.0
    with pytest.raises(ValueError, match="optimizer"):
        TTTSettings.from_dict(dict(optimizer="lion"))


# ---------------------------------------------------------------------------------------------------------------
# LoRA sliding TTT with periodic reset (#1499)

SLIDE = dict(CHUNK, probes=False, slide_lora_rank=4, slide_lora_lr=3e-2, batch_windows=8, slide_lora_reset=8)


def test_lora_sliding_scores_every_window_first_and_helps_on_drift(drift):
    val, model, base = drift
    res = run_ttt(copy.deepcopy(model), val, TABLES, mode="lora_sliding", settings=SLIDE, log=None)
    n_batches = math.ceil(base.windows / SLIDE["batch_windows"])
    assert res.tokens == base.tokens and res.bytes == base.bytes and res.adapt_steps == n_batches
    assert res.ledger.min_adapt_gap >= 1 and res.ledger.max_times_scored == 1
    assert res.timings["reset_s"] > 0 and res.val_bpb < base.val_bpb - 0.005
    # the base model is frozen: only the adapters learn
    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    run_ttt(m, val, TABLES, mode="lora_sliding", settings=SLIDE, log=None)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_lora_sliding_resets_matter_and_adapting_first_is_caught(drift):
    from pgolf.eval.ttt import LoRASlidingTTT

    val, model, _ = drift
    often = run_ttt(copy.deepcopy(model), val, TABLES, mode="lora_sliding", settings=dict(SLIDE, slide_lora_reset=1),
                    log=None)
    never = run_ttt(copy.deepcopy(model), val, TABLES, mode="lora_sliding",
                    settings=dict(SLIDE, slide_lora_reset=10_000), log=None)
    assert often.val_bpb != never.val_bpb

    class AdaptFirst(LoRASlidingTTT):
        def run(self):
            lora, opt = self.new_adapter()
            with LoRAHooks(self.model, lora) as hooks:
                self.adapt_batch(hooks, opt, slice(0, self.s.batch_windows))

    s = TTTSettings.from_dict(dict(SLIDE, bos_id=BOS))
    with pytest.raises(ComplianceViolation) as ei:
        AdaptFirst(copy.deepcopy(model), val, TABLES, s, Ledger(N_VAL), rank=0, world_size=1).run()
    assert ei.value.kind == "adapt_before_score" and ei.value.label == "slide_lora_adamw"


def test_temperature_scores_and_trains_at_it_and_is_restored(drift):
    """#490's fixed temperature: the scored distribution is softmax(softcapped logits / T), still normalized."""
    val, model, base = drift
    kw = dict(CHUNK, probes=True, epochs=0)
    hot = run_ttt(copy.deepcopy(model), val, TABLES, mode="chunk", settings=dict(kw, temperature=0.5), log=None)
    m = copy.deepcopy(model)
    m.temperature = 0.5
    direct = evaluate_sliding(m, val, TABLES, window=CHUNK["window"], stride=CHUNK["stride"])
    assert abs(hot.val_bpb - direct.val_bpb) < 1e-9 and abs(hot.val_bpb - base.val_bpb) > 1e-3
    assert hot.probes["normalization"]["max_abs_nll_minus_logp"] < 1e-4
    m2 = copy.deepcopy(model)
    run_ttt(m2, val, TABLES, mode="chunk", settings=dict(CHUNK, probes=False, temperature=0.9), log=None)
    assert m2.temperature == 1.0  # restored
    # lora_sliding applies slide_temperature only after an update since the last reset: never with a reset per batch
    a = run_ttt(copy.deepcopy(model), val, TABLES, mode="lora_sliding",
                settings=dict(SLIDE, slide_lora_reset=1, slide_temperature=0.5), log=None)
    b = run_ttt(copy.deepcopy(model), val, TABLES, mode="lora_sliding", settings=dict(SLIDE, slide_lora_reset=1),
                log=None)
    c = run_ttt(copy.deepcopy(model), val, TABLES, mode="lora_sliding", settings=dict(SLIDE, slide_temperature=0.5),
                log=None)
    assert a.val_bpb == b.val_bpb and c.val_bpb != b.val_bpb


def test_bf16_weights_as_490_runs(drift):
    val, model, _ = drift
    m = copy.deepcopy(model)
    res = run_ttt(m, val[:2049], TABLES, mode="chunk", settings=dict(CHUNK, probes=False, optimizer="adamw",
                                                                     lr=1e-3, weights_dtype="bf16"), log=None)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters()) and math.isfinite(res.val_bpb)
