"""Plain eval: exact bpb against direct computations, doc isolation, rank splitting and byte accounting.

The stand-in model (:class:`LagModel`) has the model's ``loss`` interface: its logits at position t are
``bias + Σ_l E_l[x[t − l]]``, where a lag reaching before t's segment start (row start, or the last cu_seqlens entry
≤ t) reads a null row instead. ``lags=()`` is context-free, ``lags=(0,)`` a bigram (also context-free with respect
to window placement), and any lag ≥ 1 makes predictions depend on earlier tokens, across a BOS unless cu_seqlens
says otherwise. Every call is recorded for inspection.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pgolf.data.tokenizer import ByteTables, count_bytes
from pgolf.eval import EvalResult, evaluate, evaluate_sliding
from pgolf.eval.scoring import CU_SEQLENS_MULTIPLE, window_cu_seqlens as _window_cu_seqlens
from pgolf.utils import distributed_session

LN2 = math.log(2.0)
BOS = 1


class LagModel(nn.Module):
    def __init__(self, vocab: int, lags: tuple[int, ...] = (), *, scale: float = 1.0, seed: int = 0,
                 emb: torch.Tensor | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.lags = vocab, tuple(lags)
        self.bias = nn.Parameter(torch.randn(vocab, generator=g) * 0.5)
        if emb is None:
            emb = torch.randn(len(self.lags), vocab + 1, vocab, generator=g) * scale
            emb[:, vocab] = 0.0  # null row
        self.emb = nn.Parameter(emb)
        self.calls: list[dict] = []

    def loss(self, input_ids, target_ids, *, cu_seqlens=None, max_seqlen=None, reduction="mean"):
        assert input_ids.dtype == torch.int64 and target_ids.dtype == torch.int64
        assert input_ids.shape == target_ids.shape and input_ids.dim() == 2
        B, T = input_ids.shape
        self.calls.append(dict(input_ids=input_ids.clone(), shape=(B, T), max_seqlen=max_seqlen,
                               cu_seqlens=None if cu_seqlens is None else cu_seqlens.clone(),
                               training=self.training, grad=torch.is_grad_enabled()))
        pos = torch.arange(T, device=input_ids.device)
        if cu_seqlens is None:
            seg_start = torch.zeros_like(pos)
        else:
            assert B == 1 and cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1
            cu = cu_seqlens.to(torch.int64)
            assert int(cu[0]) == 0 and int(cu[-1]) == T and bool((cu[1:] >= cu[:-1]).all())
            assert max_seqlen is not None and int((cu[1:] - cu[:-1]).max()) <= max_seqlen
            seg_start = cu[torch.searchsorted(cu, pos, right=True) - 1]
        logits = self.bias.expand(B, T, self.vocab)
        for i, lag in enumerate(self.lags):
            src = pos - lag
            tok = input_ids[:, src.clamp(min=0)]
            tok = torch.where((src >= seg_start)[None, :], tok, self.vocab)
            logits = logits + self.emb[i][tok]
        nll = F.cross_entropy(logits.reshape(-1, self.vocab).float(), target_ids.reshape(-1), reduction="none")
        nll = nll.view(B, T)
        return nll.mean() if reduction == "mean" else nll


def make_tables(vocab: int, seed: int = 0) -> ByteTables:
    """Random tables: ids 0 (unk) and 1 (BOS) are boundaries with 0 bytes; the rest 1-4 bytes, half with a space."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(1, 5, (vocab,), generator=g).to(torch.int16)
    space = torch.rand(vocab, generator=g) < 0.5
    boundary = torch.zeros(vocab, dtype=torch.bool)
    base[:2], space[:2], boundary[:2] = 0, False, True
    return ByteTables(base, space, boundary)


def make_tokens(n: int, vocab: int, *, seed: int = 0, bos_rate: float = 0.05) -> torch.Tensor:
    """n random tokens in [2, vocab) starting with BOS, with BOS sprinkled in at ``bos_rate``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(2, vocab, (n,), generator=g)
    t[torch.rand(n, generator=g) < bos_rate] = BOS
    t[0] = BOS
    return t


@torch.no_grad()
def direct(model, tokens, tables):
    """(Σ nll, Σ bytes, bpb) with the whole stream as one sequence of full context."""
    x, y = tokens[:-1][None], tokens[1:][None]
    nll = model.loss(x, y, reduction="none")[0].double().sum().item()
    nbytes = int(count_bytes(x[0], y[0], tables).sum())
    return nll, nbytes, nll / (LN2 * nbytes)


@torch.no_grad()
def naive(model, tokens, tables, plan, *, doc_isolated=False, bos_id=BOS):
    """(Σ nll, Σ bytes, count) scoring each (start, end, offset) window alone, one forward per window (and per
    document piece with doc_isolated)."""
    nll_sum, byte_sum, count = 0.0, 0, 0
    for s, e, o in plan:
        x, y = tokens[s:e], tokens[s + 1:e + 1]
        cuts = [0]
        if doc_isolated:
            cuts += [p for p in (x == bos_id).nonzero().flatten().tolist() if p > 0]
        cuts.append(e - s)
        nll = torch.cat([model.loss(x[a:b][None], y[a:b][None], reduction="none")[0]
                         for a, b in zip(cuts[:-1], cuts[1:])])
        nll_sum += nll[o:].double().sum().item()
        byte_sum += int(count_bytes(x[o:], y[o:], tables).sum())
        count += e - s - o
    return nll_sum, byte_sum, count


def plain_plan(n_targets, seq_len):
    return [(i * seq_len, (i + 1) * seq_len, 0) for i in range(n_targets // seq_len)]


V = 24
TABLES = make_tables(V)


@pytest.mark.parametrize("lags", [(), (0,)])
@pytest.mark.parametrize("batch_seqs", [1, 3, 16])
def test_plain_equals_direct_for_context_free_model(lags, batch_seqs):
    seq_len, n = 32, 10 * 32
    tokens = make_tokens(n + 1, V, seed=1)
    model = LagModel(V, lags, seed=2)
    nll, nbytes, bpb = direct(model, tokens, TABLES)
    res = evaluate(model, tokens, TABLES, seq_len=seq_len, batch_seqs=batch_seqs)
    assert res.tokens == n and res.bytes == nbytes
    # fp32 nll values summed in float64 are exact at this size, so the order of summation does not matter
    assert res.nll_sum == pytest.approx(nll, rel=1e-13, abs=0)
    assert res.val_bpb == pytest.approx(bpb, rel=1e-13, abs=0)
    assert res.val_loss == pytest.approx(nll / n, rel=1e-13, abs=0)
    assert res.val_bpb == pytest.approx(res.nll_sum / (LN2 * res.bytes), rel=1e-15)
    assert res.mode == "plain" and res.seq_len == seq_len and res.stride is None and res.windows == 10


def test_plain_context_model_matches_per_window_reference_and_drops_tail():
    seq_len = 40
    tokens = make_tokens(7 * seq_len + 1 + 13, V, seed=3)  # a 13-token tail that fills no window
    model = LagModel(V, (0, 1, 3), seed=4)
    ref = naive(model, tokens, TABLES, plain_plan(tokens.numel() - 1, seq_len))
    res = evaluate(model, tokens, TABLES, seq_len=seq_len, batch_seqs=3)
    assert (res.tokens, res.bytes) == (ref[2], ref[1]) == (7 * seq_len, ref[1])
    assert res.nll_sum == pytest.approx(ref[0], rel=1e-12)
    # context crosses window starts in the direct computation, so plain eval must differ from it
    assert res.nll_sum != pytest.approx(direct(model, tokens[:7 * seq_len + 1], TABLES)[0], rel=1e-6)


def test_plain_doc_isolated_matches_per_document_reference():
    seq_len = 48
    tokens = make_tokens(6 * seq_len + 1, V, seed=5, bos_rate=0.08)
    tokens[seq_len] = BOS  # a BOS exactly at a window start
    tokens[2 * seq_len + 1] = BOS  # and one right after a window start
    model = LagModel(V, (0, 1, 2, 5), seed=6)
    res = evaluate(model, tokens, TABLES, seq_len=seq_len, batch_seqs=4, doc_isolated=True, bos_id=BOS)
    ref = naive(model, tokens, TABLES, plain_plan(6 * seq_len, seq_len), doc_isolated=True)
    assert (res.tokens, res.bytes) == (ref[2], ref[1])
    assert res.nll_sum == pytest.approx(ref[0], rel=1e-12)
    assert res.doc_isolated
    # without isolation the model sees across BOS: a different number
    plain = evaluate(model, tokens, TABLES, seq_len=seq_len, batch_seqs=4)
    assert plain.nll_sum != pytest.approx(res.nll_sum, rel=1e-6)
    assert plain.bytes == res.bytes


def _check_cu_calls(calls, width, bos_id):
    """Every call is (1, B·width) with cu_seqlens = window starts ∪ BOS positions, padded by the total."""
    assert calls
    for call in calls:
        x = call["input_ids"][0]
        total = x.numel()
        assert call["shape"][0] == 1 and total % width == 0
        cu = call["cu_seqlens"]
        assert cu is not None and cu.dtype == torch.int32 and cu.numel() % CU_SEQLENS_MULTIPLE == 0
        cu = cu.tolist()
        k = cu.index(total)
        assert all(v == total for v in cu[k:]), "padding must repeat the total"
        starts = cu[:k]
        assert starts == sorted(set(starts)), "segment starts must be strictly increasing"
        expected = set(range(0, total, width)) | set((x == bos_id).nonzero().flatten().tolist())
        assert set(starts) == expected
        assert call["max_seqlen"] >= max(b - a for a, b in zip(cu[:k + 1], cu[1:k + 1]))


def test_doc_isolated_cu_seqlens_has_every_bos_and_window_start():
    seq_len = 32
    tokens = make_tokens(9 * seq_len + 1, V, seed=7, bos_rate=0.1)
    tokens[3 * seq_len] = BOS
    tokens[4 * seq_len - 1] = BOS  # last input of a window
    model = LagModel(V, (0, 1), seed=8)
    evaluate(model, tokens, TABLES, seq_len=seq_len, batch_seqs=4, doc_isolated=True, bos_id=BOS)
    _check_cu_calls(model.calls, seq_len, BOS)
    assert [c["shape"] for c in model.calls] == [(1, 4 * seq_len)] * 3  # 9 windows: last batch padded
    # the stand-in really does read across a window start / BOS when cu_seqlens does not stop it
    call = model.calls[0]
    x = call["input_ids"]
    y = torch.zeros_like(x)
    with torch.no_grad():
        isolated = model.loss(x, y, cu_seqlens=call["cu_seqlens"], max_seqlen=seq_len, reduction="none")
        crossing = model.loss(x, y, reduction="none")
    assert not torch.equal(isolated, crossing)


def test_window_cu_seqlens_helper():
    x = torch.tensor([BOS, 5, 6, BOS, 7, 8, 9, 10, 11, BOS, 12, 13])
    cu = _window_cu_seqlens(x, 4, BOS, multiple=8)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 4, 8, 9, 12, 12, 12]
    assert _window_cu_seqlens(x, 6, None, multiple=1).tolist() == [0, 6, 12]
    with pytest.raises(ValueError):
        _window_cu_seqlens(x, 5, BOS)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("doc_isolated", [False, True])
def test_rank_split_partial_sums_add_up(world_size, doc_isolated):
    seq_len = 16
    tokens = make_tokens(11 * seq_len + 1, V, seed=9)  # 11 windows: uneven shares
    model = LagModel(V, (0, 1), seed=10)
    kw = dict(seq_len=seq_len, batch_seqs=2, doc_isolated=doc_isolated)
    full = evaluate(model, tokens, TABLES, **kw)
    parts = [evaluate(model, tokens, TABLES, rank=r, world_size=world_size, reduce=False, **kw)
             for r in range(world_size)]
    assert all(not p.reduced and p.world_size == world_size for p in parts)
    assert [p.rank for p in parts] == list(range(world_size))
    assert sum(p.tokens for p in parts) == full.tokens == 11 * seq_len
    assert sum(p.bytes for p in parts) == full.bytes
    assert sum(p.nll_sum for p in parts) == pytest.approx(full.nll_sum, rel=1e-13)
    assert full.reduced and full.world_size == 1 and full.rank == 0


def test_reduce_without_process_group_raises():
    tokens = make_tokens(4 * 8 + 1, V)
    with pytest.raises(RuntimeError, match="reduce=False"):
        evaluate(LagModel(V), tokens, TABLES, seq_len=8, rank=0, world_size=2)
    with pytest.raises(ValueError):
        evaluate(LagModel(V), tokens, TABLES, seq_len=8, rank=2, world_size=2)


def test_more_ranks_than_windows():
    tokens = make_tokens(2 * 8 + 1, V)
    model = LagModel(V, (0,))
    parts = [evaluate(model, tokens, TABLES, seq_len=8, rank=r, world_size=4, reduce=False) for r in range(4)]
    assert [p.tokens for p in parts].count(0) == 2
    assert sum(p.tokens for p in parts) == 16
    empty = next(p for p in parts if p.tokens == 0)
    assert math.isnan(empty.val_bpb) and empty.nll_sum == 0.0


def hand_tables() -> ByteTables:
    # 0 <unk>, 1 <s>, 2 "▁a", 3 "bc", 4 "▁déf" (4 UTF-8 bytes after the ▁), 5 "<0x41>" (byte piece)
    base = torch.tensor([0, 0, 1, 2, 4, 1], dtype=torch.int16)
    space = torch.tensor([False, False, True, False, True, False])
    boundary = torch.tensor([True, True, False, False, False, False])
    return ByteTables(base, space, boundary)


# (prev → target): bytes
# 1→2: 1 (space after BOS dropped)  2→3: 2   3→4: 4+1   4→1: 0 (control)  1→4: 4 (space after BOS dropped)
# 4→5: 1 (byte piece)  5→2: 1+1  2→1: 0  1→2: 1  2→0: 0 (unk)  0→2: 1 (space after unk dropped)
HAND_TOKENS = torch.tensor([1, 2, 3, 4, 1, 4, 5, 2, 1, 2, 0, 2])
HAND_BYTES = 1 + 2 + 5 + 0 + 4 + 1 + 2 + 0 + 1 + 0 + 1


@pytest.mark.parametrize("seq_len", [1, 11])
def test_leading_space_after_bos_is_not_counted(seq_len):
    tables = hand_tables()
    model = LagModel(6, (0,), seed=11)
    res = evaluate(model, HAND_TOKENS, tables, seq_len=seq_len, batch_seqs=4)
    assert res.tokens == 11 and res.bytes == HAND_BYTES == 17
    assert res.val_bpb == pytest.approx(res.nll_sum / (LN2 * 17), rel=1e-15)
    sl = evaluate_sliding(model, HAND_TOKENS, tables, window=4, stride=3, batch_windows=2)
    assert sl.tokens == 11 and sl.bytes == 17
    # were no token a boundary, the four leading-space targets after BOS/unk would each count one more byte
    no_boundary = ByteTables(tables.base_bytes, tables.has_space, torch.zeros(6, dtype=torch.bool))
    assert evaluate(model, HAND_TOKENS, no_boundary, seq_len=seq_len).bytes == 17 + 4


def test_eval_mode_no_grad_and_training_mode_restored():
    tokens = make_tokens(4 * 8 + 1, V)
    model = LagModel(V, (0, 1))
    model.train()
    evaluate(model, tokens, TABLES, seq_len=8)
    evaluate_sliding(model, tokens, TABLES, window=8, stride=4)
    assert model.training
    assert model.calls and all(not c["training"] and not c["grad"] for c in model.calls)
    model.eval()
    evaluate(model, tokens, TABLES, seq_len=8)
    assert not model.training
    # restored even when the model raises
    model.train()
    model.loss = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(model, tokens, TABLES, seq_len=8)
    assert model.training


def test_result_to_dict_is_json_serializable():
    tokens = make_tokens(4 * 8 + 1, V)
    res = evaluate(LagModel(V), tokens, TABLES, seq_len=8, batch_seqs=2)
    assert isinstance(res, EvalResult)
    d = res.to_dict()
    for key in ("val_loss", "val_bpb", "tokens", "bytes", "nll_sum", "seconds", "mode", "seq_len", "stride",
                "batch", "doc_isolated", "windows", "rank", "world_size", "reduced"):
        assert key in d
    assert json.loads(json.dumps(d)) == d
    assert d["seconds"] >= 0 and d["batch"] == 2


def test_bad_arguments():
    tokens = make_tokens(8, V)
    with pytest.raises(ValueError):
        evaluate(LagModel(V), tokens, TABLES, seq_len=8)  # 7 targets, no full window
    with pytest.raises(ValueError):
        evaluate(LagModel(V), tokens[None], TABLES, seq_len=2)
    with pytest.raises(ValueError):
        evaluate(LagModel(V), tokens, TABLES, seq_len=2, batch_seqs=0)


def _dist_worker(rank, world_size, init_file, out_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    with distributed_session():
        tokens = make_tokens(7 * 16 + 1, V, seed=12)
        model = LagModel(V, (0, 1), seed=13)
        res = evaluate(model, tokens, TABLES, seq_len=16, batch_seqs=2)
        sl = evaluate_sliding(model, tokens, TABLES, window=16, stride=4, batch_windows=3)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump([res.to_dict(), sl.to_dict()], f)


@pytest.mark.slow
def test_all_reduce_across_two_processes():
    """Rank/world_size from a real (gloo) process group and the all-reduced sums match one process."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        mp.spawn(_dist_worker, args=(2, init_file, out_file), nprocs=2, join=True)
        with open(out_file) as f:
            res, sl = json.load(f)
    tokens = make_tokens(7 * 16 + 1, V, seed=12)
    model = LagModel(V, (0, 1), seed=13)
    ref = evaluate(model, tokens, TABLES, seq_len=16, batch_seqs=2)
    ref_sl = evaluate_sliding(model, tokens, TABLES, window=16, stride=4, batch_windows=3)
    for got, want in ((res, ref), (sl, ref_sl)):
        assert got["world_size"] == 2 and got["rank"] == 0 and got["reduced"]
        assert (got["tokens"], got["bytes"]) == (want.tokens, want.bytes)
        assert got["nll_sum"] == pytest.approx(want.nll_sum, rel=1e-12)
        assert got["val_bpb"] == pytest.approx(want.val_bpb, rel=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("doc_isolated", [False, True])
def test_cuda_matches_cpu_and_autocast_is_close(doc_isolated):
    tokens = make_tokens(16 * 64 + 1, V, seed=14)
    model = LagModel(V, (0, 1, 2), seed=15)
    kw = dict(seq_len=64, batch_seqs=4, doc_isolated=doc_isolated)
    cpu = evaluate(model, tokens, TABLES, **kw)
    model.cuda()
    gpu = evaluate(model, tokens, TABLES, **kw)
    assert gpu.bytes == cpu.bytes and gpu.tokens == cpu.tokens
    assert gpu.val_bpb == pytest.approx(cpu.val_bpb, rel=1e-5)
    amp = evaluate(model, tokens, TABLES, autocast_dtype=torch.bfloat16, **kw)
    assert amp.val_bpb == pytest.approx(cpu.val_bpb, rel=2e-2)
    sl_cpu = evaluate_sliding(model.cpu(), tokens, TABLES, window=64, stride=16, doc_isolated=doc_isolated)
    sl_gpu = evaluate_sliding(model.cuda(), tokens, TABLES, window=64, stride=16, doc_isolated=doc_isolated)
    assert sl_gpu.val_bpb == pytest.approx(sl_cpu.val_bpb, rel=1e-5) and sl_gpu.bytes == sl_cpu.bytes
