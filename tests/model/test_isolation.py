"""Document isolation in packed batches and causality, on a sota-like tiny model with every element on.

With cu_seqlens (B = 1) each document's per-token losses must equal those of running the document alone:
nothing may cross a BOS or a cu_seqlens boundary (attention, SmearGate, BigramHash). Without cu_seqlens the
documents do see each other (shown below, so the isolation check is able to fail).
"""

from __future__ import annotations

import math

import pytest
import torch

from pgolf.model import GPT, GPTConfig

F64 = torch.float64
BOS = 1
TOL = dict(rtol=1e-5, atol=1e-5)  # RoPE positions differ (buffer offset vs 0) and the angles are fp32


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed):
    return torch.Generator().manual_seed(seed)


CFG = GPTConfig(vocab_size=97, num_layers=5, model_dim=48, num_heads=4, num_kv_heads=2, mlp_hidden=96, rope_dims=8,
                rope_train_seq_len=0, qk_gain_init=5.0, xsa_last_n=5, ln_scale=True, skip_gates=True, num_loops=2,
                loop_start=1, loop_end=2, parallel_residual="two_lane", parallel_start=3, smear_gate="bos",
                attn_gate="sparse", bigram_buckets=31, bigram_dim=16, bos_id=BOS)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(CFG).double()
    g = gen(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim >= 2 and "resid_mix" not in name and "skip" not in name and "lane" not in name:
                fan_in = p.shape[1] if "emb" not in name else 1
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / math.sqrt(fan_in))
            else:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
        m.smear_lambda.fill_(0.8)
        m.bigram.scale.fill_(0.7)
    m.looping_active = True
    return m


# documents: the second one does NOT start with BOS (only the cu_seqlens boundary separates it)
DOCS = [
    [BOS, 5, 17, 17, 80, 3, 44, 9, 61],
    [12, 40, 7, 7, 96, 2, 33, 58, 21, 8, 70, 13, 50, 4],
    [BOS],
    [BOS, 66, 19, 30, 2, 88, 41, 5, 27, 90, 11, 64, 23],
]


def packed(docs, pad_to=8):
    ids = torch.tensor([[t for d in docs for t in d]])
    cu = [0]
    for d in docs:
        cu.append(cu[-1] + len(d))
    cu += [cu[-1]] * (pad_to - len(cu))
    return ids, torch.tensor(cu, dtype=torch.int32)


def targets_for(ids, seed=7):
    return torch.randint(0, 97, ids.shape, generator=gen(seed))


def per_doc(x, docs):
    out, s = [], 0
    for d in docs:
        out.append(x[:, s:s + len(d)])
        s += len(d)
    return out


def test_packed_losses_equal_each_document_alone(model):
    ids, cu = packed(DOCS)
    tgt = targets_for(ids)
    with torch.no_grad():
        loss = model.loss(ids, tgt, cu_seqlens=cu, max_seqlen=max(map(len, DOCS)), reduction="none")
        logits = model.forward_logits(ids, cu_seqlens=cu)
        for d, l_packed, z_packed, t in zip(DOCS, per_doc(loss, DOCS), per_doc(logits, DOCS), per_doc(tgt, DOCS)):
            alone_ids = torch.tensor([d])
            torch.testing.assert_close(l_packed, model.loss(alone_ids, t, reduction="none"), **TOL)
            torch.testing.assert_close(z_packed, model.forward_logits(alone_ids), **TOL)


@pytest.mark.parametrize("looping", [False, True])
def test_changing_one_document_leaves_the_others(model, looping):
    model.looping_active = looping
    try:
        ids, cu = packed(DOCS)
        ids2 = ids.clone()
        ids2[0, 2:8] = torch.tensor([90, 91, 92, 93, 94, 95])  # inside document 0 (tokens 0..8)
        with torch.no_grad():
            a = model.hidden(ids, cu_seqlens=cu)
            b = model.hidden(ids2, cu_seqlens=cu)
            assert (a[:, 2:9] - b[:, 2:9]).abs().max() > 1e-3
            torch.testing.assert_close(b[:, 9:], a[:, 9:], rtol=0, atol=1e-12)
            # without cu_seqlens, document 0 leaks into the next ones: the same change moves their outputs
            a_free = model.hidden(ids)
            b_free = model.hidden(ids2)
            assert (a_free[:, 9:] - b_free[:, 9:]).abs().max() > 1e-3
    finally:
        model.looping_active = True


def test_token_shift_resets_at_cu_seqlens_boundary_without_bos(model):
    # document 1 starts without BOS: only cu_seqlens marks it; its first position must not read document 0's
    # last token through SmearGate or BigramHash
    ids, cu = packed(DOCS)
    ids2 = ids.clone()
    ids2[0, 8] = 77  # last token of document 0
    with torch.no_grad():
        a = model.hidden(ids, cu_seqlens=cu)
        b = model.hidden(ids2, cu_seqlens=cu)
    torch.testing.assert_close(b[:, 9:], a[:, 9:], rtol=0, atol=1e-12)


def test_bos_stops_smear_and_bigram_without_cu_seqlens():
    """No attention at all (α = 0): the input path alone must not carry the previous document into a BOS."""
    cfg = CFG.replace(num_layers=1, num_loops=0, parallel_residual="none")
    torch.manual_seed(0)
    m = GPT(cfg).double()
    g = gen(2)
    with torch.no_grad():
        m.tok_emb.weight.copy_(torch.randn(m.tok_emb.weight.shape, generator=g, dtype=F64))
        m.bigram.embed.weight.copy_(torch.randn(m.bigram.embed.weight.shape, generator=g, dtype=F64))
        m.bigram.proj.weight.copy_(torch.randn(m.bigram.proj.weight.shape, generator=g, dtype=F64) * 0.3)
        m.smear_gate.copy_(torch.randn(12, generator=g, dtype=F64))
        m.smear_lambda.fill_(0.9)
        m.blocks[0].attn_scale.zero_()
        m.blocks[0].mlp.fc.weight.copy_(torch.randn(m.blocks[0].mlp.fc.weight.shape, generator=g, dtype=F64) / 7)
        m.blocks[0].mlp.proj.weight.copy_(torch.randn(m.blocks[0].mlp.proj.weight.shape, generator=g, dtype=F64) / 10)
    doc_a, doc_b = [BOS, 5, 6, 7], [BOS, 40, 41, 42, 43]
    ids = torch.tensor([doc_a + doc_b])
    ids2 = ids.clone()
    ids2[0, 3] = 90  # last token before the second BOS
    with torch.no_grad():
        a, b = m.hidden(ids), m.hidden(ids2)
        torch.testing.assert_close(b[:, 4:], a[:, 4:], rtol=0, atol=1e-13)
        torch.testing.assert_close(a[:, 4:], m.hidden(torch.tensor([doc_b])), rtol=0, atol=1e-12)
        # a non-BOS token right after the change does see it (the check can fail)
        ids3 = ids.clone()
        ids3[0, 5] = 90
        c = m.hidden(ids3)
        assert (c[:, 6] - a[:, 6]).abs().max() > 1e-3


@pytest.mark.parametrize("packed_batch", [False, True])
def test_causality(model, packed_batch):
    ids, cu = packed(DOCS)
    cu = cu if packed_batch else None
    T = ids.shape[1]
    with torch.no_grad():
        base = model.forward_logits(ids, cu_seqlens=cu)
        for t in (0, 9, 20, T - 1):
            ids2 = ids.clone()
            ids2[0, t] = (ids[0, t] + 37) % 97 if ids[0, t] + 37 != BOS else 3
            out = model.forward_logits(ids2, cu_seqlens=cu)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
            assert (out[:, t] - base[:, t]).abs().max() > 1e-3


def test_causality_batched_and_gradient():
    """B > 1 rows are independent, and the gradient of position t's loss is zero for inputs after t."""
    cfg = CFG.replace(num_loops=0)
    torch.manual_seed(0)
    m = GPT(cfg).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen(3), dtype=F64))
    ids = torch.randint(2, 97, (3, 19), generator=gen(4))
    with torch.no_grad():
        full = m.hidden(ids)
        torch.testing.assert_close(m.hidden(ids[1:2]), full[1:2], rtol=0, atol=1e-12)
    # gradient through the embedding output: d h[:, t] / d E[x_s] must vanish for s > t
    emb = {}

    def hook(mod, inp, out):
        out.retain_grad()
        emb["e"] = out

    handle = m.tok_emb.register_forward_hook(hook)
    try:
        h = m.hidden(ids[:1])
        h[0, 10].sum().backward()
    finally:
        handle.remove()
    g = emb["e"].grad[0].abs().sum(-1)
    assert (g[11:] == 0).all() and (g[:11] > 0).all()
