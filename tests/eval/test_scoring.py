"""The eval fast path (pgolf.eval.scoring): the head and loss on the scored rows only give the same val_bpb as the
head on every position; the head's rows per batch; forward only (nothing saved for a backward, the attention
kernel's forward-only variant); the compiled scorer and its warm-up on random tokens."""

from __future__ import annotations

import math

import pytest
import torch

from pgolf import kernels
from pgolf.eval import evaluate, evaluate_sliding
from pgolf.eval.scoring import WindowScorer, gathered_rows
from pgolf.model import GPT, GPTConfig
from tests.eval.test_bpb import BOS, make_tables, make_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

V = 61
TABLES = make_tables(V, seed=3)
# every element of the sota architecture that touches positions: looping, two lanes, XSA, smear, bigram, gates
CFG = GPTConfig(vocab_size=V, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, mlp_hidden=64, rope_dims=4,
                qk_gain_init=4.0, xsa_last_n=3, num_loops=1, loop_start=1, loop_end=1, parallel_residual="two_lane",
                parallel_start=2, smear_gate="bos", attn_gate="sparse", bigram_buckets=17, bigram_dim=8, bos_id=BOS)


def random_model(seed: int = 0, cfg: GPTConfig = CFG) -> GPT:
    torch.manual_seed(seed)
    m = GPT(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim >= 2 and "resid_mix" not in name and "skip" not in name and "lane" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1] if "emb" not in name else 1))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    m.looping_active = True
    return m


MODEL = random_model()


@pytest.mark.parametrize("n,window,stride,batch,doc_isolated", [
    (700, 64, 16, 5, False),   # short last window, a padded last batch
    (700, 64, 16, 5, True),
    (640, 64, 64, 3, True),    # stride == window
    (40, 64, 16, 4, False),    # N < window: one window scored from its start
    (523, 48, 7, 8, True),     # odd stride
])
def test_scored_rows_only_equals_the_full_head(n, window, stride, batch, doc_isolated):
    tokens = make_tokens(n + 1, V, seed=n)
    kw = dict(window=window, stride=stride, batch_windows=batch, doc_isolated=doc_isolated, bos_id=BOS)
    new = evaluate_sliding(MODEL, tokens, TABLES, **kw)
    old = evaluate_sliding(MODEL, tokens, TABLES, scored_rows_only=False, **kw)
    assert new.scored_rows_only and not old.scored_rows_only
    assert (new.tokens, new.bytes) == (old.tokens, old.bytes) and new.tokens == n
    assert abs(new.val_bpb - old.val_bpb) < 1e-6 and abs(new.val_loss - old.val_loss) < 1e-6


def test_plain_eval_equals_model_loss():
    tokens = make_tokens(4 * 48 + 1, V, seed=9)
    res = evaluate(MODEL, tokens, TABLES, seq_len=48, batch_seqs=3, doc_isolated=True)
    x, y = tokens[:-1].view(4, 48), tokens[1:].view(4, 48)
    with torch.no_grad():
        nll = sum(float(MODEL.loss(x[i:i + 1], y[i:i + 1], reduction="sum", cu_seqlens=_cu(x[i]), max_seqlen=48))
                  for i in range(4))
    assert res.tokens == 4 * 48 and abs(res.val_loss - nll / (4 * 48)) < 1e-6


def _cu(row):
    starts = [0] + [i for i in range(1, row.numel()) if int(row[i]) == BOS]
    return torch.tensor(starts + [row.numel()], dtype=torch.int32)


def test_the_head_runs_one_row_per_scored_token(monkeypatch):
    """A batch of later windows sends batch·stride rows to the head (batch·window before); only the batch holding
    the plan's first window, which is scored from its start, sends every row."""
    rows = []
    real = kernels.lm_head_loss
    monkeypatch.setattr(kernels, "lm_head_loss", lambda h, *a: rows.append(h.shape[0]) or real(h, *a))
    tokens = make_tokens(1001, V, seed=4)
    evaluate_sliding(MODEL, tokens, TABLES, window=64, stride=16, batch_windows=8)
    assert rows[0] == 8 * 64 and set(rows[1:]) == {8 * 16} and len(rows) == math.ceil(60 / 8)
    rows.clear()
    evaluate_sliding(MODEL, tokens, TABLES, window=64, stride=16, batch_windows=8, scored_rows_only=False)
    assert set(rows) == {8 * 64}


def test_gathered_rows_of_a_plan():
    assert gathered_rows(torch.tensor([64, 64, 50]), torch.tensor([0, 48, 48]), 64) == 16
    assert gathered_rows(torch.tensor([64, 64]), torch.tensor([0, 0]), 64) == 64  # plain eval


def test_forward_only_saves_nothing_for_a_backward():
    """Parameters require grad, yet scoring saves no tensor for a backward: grad mode is off inside."""
    packed = []
    tokens = make_tokens(301, V, seed=5)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        evaluate_sliding(MODEL, tokens, TABLES, window=64, stride=16, batch_windows=4, doc_isolated=True)
        assert packed == []
        MODEL.loss(tokens[None, :64], tokens[None, 1:65])  # the same hooks do see a training forward
    assert packed


def test_triton_eval_runs_the_forward_only_attention(monkeypatch):
    from pgolf.kernels import xsa_attention as xa

    seen = []
    real = xa._forward
    monkeypatch.setattr(xa, "_forward", lambda *a, stats=True: seen.append(stats) or real(*a, stats=stats))
    model = random_model(cfg=GPTConfig(**{**CFG.to_dict(), "model_dim": 64, "mlp_hidden": 128}))  # head dim 16
    tokens = make_tokens(161, V, seed=6)
    with kernels.use_backend("triton", op="attention"):
        tri = evaluate_sliding(model, tokens, TABLES, window=64, stride=32, batch_windows=4, doc_isolated=True)
    ref = evaluate_sliding(model, tokens, TABLES, window=64, stride=32, batch_windows=4, doc_isolated=True)
    assert seen and set(seen) == {False}
    assert tri.tokens == ref.tokens and abs(tri.val_bpb - ref.val_bpb) < 1e-5


def test_compiled_scorer_warms_up_on_random_tokens_and_matches(monkeypatch):
    import pgolf.eval.scoring as S

    monkeypatch.setattr(S, "COMPILE_BACKEND", "aot_eager")  # inductor needs a C++ build here; the graph is the same
    tokens = make_tokens(701, V, seed=7)
    kw = dict(window=64, stride=16, batch_windows=5, doc_isolated=True, bos_id=BOS)
    ref = evaluate_sliding(MODEL, tokens, TABLES, **kw)
    order = []
    for name in ("warmup", "score"):  # warm-up (its own random tokens, no validation input) comes first
        real = getattr(S.WindowScorer, name)
        monkeypatch.setattr(S.WindowScorer, name, lambda self, *a, _n=name, _r=real: order.append(_n) or _r(self, *a))
    torch._dynamo.reset()
    comp = evaluate_sliding(MODEL, tokens, TABLES, compile=True, **kw)
    torch._dynamo.reset()
    assert order == ["warmup", "score"]
    assert comp.warmup_s > 0 and comp.tokens == ref.tokens and abs(comp.val_bpb - ref.val_bpb) < 1e-6


def test_cuda_graphs_need_a_gpu():
    with pytest.raises(ValueError, match="cuda_graphs needs the model on a CUDA device"):
        WindowScorer(MODEL, TABLES, width=64, batch=4, cuda_graphs=True)


def test_auto_batch_is_the_default_off_the_gpu():
    tokens = make_tokens(301, V, seed=8)
    res = evaluate_sliding(MODEL, tokens, TABLES, window=64, stride=16, batch_windows="auto")
    assert res.batch == 32 and res.tokens == 300
    with pytest.raises(ValueError, match="batch_windows"):
        evaluate_sliding(MODEL, tokens, TABLES, window=64, stride=16, batch_windows="big")


@pytest.mark.gpu
def test_gpu_fast_path_graphs_and_auto_batch_match_the_full_head():
    """bf16 on CUDA with the Triton kernels: the scored-rows path, its CUDA-graph form and an auto-sized batch all
    give the full-head path's score (bf16 rounding of the head differs a little with the row count)."""
    model = random_model(cfg=GPTConfig(**{**CFG.to_dict(), "model_dim": 64, "mlp_hidden": 128})).cuda()
    tokens = make_tokens(4001, V, seed=10)
    kw = dict(window=256, stride=64, autocast_dtype=torch.bfloat16, doc_isolated=True)
    old = evaluate_sliding(model, tokens, TABLES, batch_windows=8, scored_rows_only=False, **kw)
    new = evaluate_sliding(model, tokens, TABLES, batch_windows=8, **kw)
    graphs = evaluate_sliding(model, tokens, TABLES, batch_windows=8, cuda_graphs=True, **kw)
    auto = evaluate_sliding(model, tokens, TABLES, batch_windows="auto", **kw)
    assert auto.batch >= 8 and graphs.warmup_s > 0
    for r in (new, graphs, auto):
        assert (r.tokens, r.bytes) == (old.tokens, old.bytes) and abs(r.val_bpb - old.val_bpb) < 2e-3
