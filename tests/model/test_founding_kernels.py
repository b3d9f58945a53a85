"""The founding systems' new model elements with the Triton kernels (interpreter on CPU) and their own definitions.

- #1499's ``hidden_gain``: the fused MLP kernel gets it folded into the down-projection; forward and gradients
  (hidden_gain's included) equal the unfused reference path.
- value residual changes v before attention: the Triton attention kernel (projection XSA, packed rows) gives the
  reference's loss and gradients for a model with it.
- #1499's diagonal XSA has no kernel: it runs the reference ``attention_xsa_diagonal`` (checked against its formula
  on packed rows) and says so once when the dispatch would have used Triton.
- element definitions that the record forwards do not isolate: row token shifts vs document ones at a BOS, the
  gated-attention and SmearGate inits, the projections' record inits, the physical skip layout.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from pgolf import kernels
from pgolf.kernels import launcher
from pgolf.kernels import reference as ref
from pgolf.model import GPT, GPTConfig

V, BOS = 97, 1
pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(**kw) -> GPTConfig:
    base = dict(vocab_size=V, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, mlp_hidden=128, rope_dims=8,
                xsa_last_n=2, num_loops=0, parallel_residual="none", smear_gate="vector", token_shift="row",
                attn_gate="none", skip_gates=False, bos_id=BOS)
    base.update(kw)
    return GPTConfig(**base)


def randomized(c: GPTConfig, seed: int = 0) -> GPT:
    """Every parameter random and non-trivial (the record init zeroes the output projections)."""
    torch.manual_seed(seed)
    m = GPT(c)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim >= 2 and "resid_mix" not in name and "skip" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1] if "emb" not in name else 1))
            else:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m


def loss_and_grads(model, backend, op, x, y, **kw):
    model.zero_grad(set_to_none=True)
    with kernels.use_backend(backend, op=op):
        loss = model.loss(x, y, **kw)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_hidden_gain_folds_into_the_mlp_kernel(monkeypatch):
    monkeypatch.setattr(launcher, "POISON", True)
    model = randomized(cfg(mlp_hidden_gain=True, value_residual="softmax"))
    x, y = (torch.randint(2, V, (2, 24), generator=torch.Generator().manual_seed(s)) for s in (3, 4))
    tri = loss_and_grads(model, "triton", "mlp", x, y)
    for m in model.modules():  # the unfused path multiplies act² by the gain before the down-projection
        if hasattr(m, "fused"):
            m.fused = False
    unfused = loss_and_grads(model, "reference", "mlp", x, y)
    assert tri[0] == pytest.approx(unfused[0], rel=1e-5)
    assert unfused[1]["blocks.1.mlp.hidden_gain"].abs().max() > 1e-4
    for name, g in unfused[1].items():
        torch.testing.assert_close(tri[1][name], g, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def packed(seed=5, lengths=(23, 1, 40, 16)):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    x, y = torch.randint(2, V, (1, T), generator=g), torch.randint(2, V, (1, T), generator=g)
    cu = [0]
    for n in lengths:
        x[0, cu[-1]] = BOS
        cu.append(cu[-1] + n)
    return x, y, torch.tensor(cu + [T] * 3, dtype=torch.int32), max(lengths)


@pytest.mark.parametrize("mode", ["linear", "softmax"])
def test_value_residual_runs_through_the_attention_kernel(mode, monkeypatch):
    from pgolf.kernels import xsa_attention as xa

    for kernel, c in ((xa.FWD, dict(BLOCK_M=64, BLOCK_N=32)), (xa.BWD_DKDV, dict(BLOCK_M=64, BLOCK_N=32)),
                      (xa.BWD_DQ, dict(BLOCK_M=64, BLOCK_N=32)), (xa.BWD_PRE, dict(BLOCK_T=64))):
        monkeypatch.setattr(kernel, "interpret", c)
    model = randomized(cfg(value_residual=mode, attn_gate="gated_bias"))
    x, y, cu, m = packed()
    tri = loss_and_grads(model, "triton", "attention", x, y, cu_seqlens=cu, max_seqlen=m)
    want = loss_and_grads(model, "reference", "attention", x, y, cu_seqlens=cu, max_seqlen=m)
    assert tri[0] == pytest.approx(want[0], rel=1e-5)
    assert want[1]["blocks.2.attn.vr_lambda"].abs().max() > 1e-5
    for name, g in want[1].items():
        torch.testing.assert_close(tri[1][name], g, rtol=1e-4, atol=1e-5, msg=lambda m_, n=name: f"{n}: {m_}")


def diagonal_xsa_by_formula(q, k, v, segments):
    """y_i = Σ_j a_ij v_j − a_ii v_i with a = causal softmax inside each segment; float64, one head at a time."""
    B, T, Hq, D = q.shape
    seg = torch.zeros(T, dtype=torch.long)
    for s in segments:
        seg[s:] += 1
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & (seg[:, None] == seg[None, :])
    out = torch.zeros(B, T, Hq, D, dtype=torch.float64)
    for h in range(Hq):
        kh, vh = k[:, :, h // (Hq // k.shape[2])].double(), v[:, :, h // (Hq // k.shape[2])].double()
        s = q[:, :, h].double() @ kh.transpose(1, 2) / math.sqrt(D)
        a = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        out[:, :, h] = a @ vh - torch.diagonal(a, dim1=1, dim2=2)[..., None] * vh
    return out


@pytest.mark.parametrize("packed_rows", [False, True])
def test_diagonal_xsa_reference_is_its_formula(packed_rows):
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 70, h, 16, generator=g) for h in (4, 2, 2))
    if packed_rows:
        cu = torch.tensor([0, 23, 24, 64, 70, 70], dtype=torch.int32)
        got = ref.attention_xsa_diagonal(q, k, v, cu_seqlens=cu, max_seqlen=40)
        want = diagonal_xsa_by_formula(q, k, v, [23, 24, 64])
    else:
        got = ref.attention_xsa_diagonal(q, k, v)
        want = diagonal_xsa_by_formula(q, k, v, [])
    assert (got.double() - want).abs().max() < 1e-5
    projection = ref.attention(q, k, v, xsa=True)  # the kernels' XSA is another function
    assert (projection.double() - want).abs().max() > 1e-2


def test_diagonal_xsa_falls_back_to_the_reference_and_says_so_once():
    model = randomized(cfg(xsa_mode="diagonal"))
    assert model.kernel_fallbacks() == ["attention: diagonal XSA (y - a_ii v_i) has no Triton kernel; layers "
                                        "[1, 2] run the reference"]
    assert randomized(cfg()).kernel_fallbacks() == []
    x = torch.randint(2, V, (1, 32), generator=torch.Generator().manual_seed(2))
    kernels._FALLBACKS_NOTED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with kernels.use_backend("triton", op="attention"), torch.no_grad():
            a = model.forward_logits(x)
            b = model.forward_logits(x)
    notes = [w for w in caught if "xsa_diagonal" in str(w.message)]
    assert len(notes) == 1 and "no Triton kernel" in str(notes[0].message)
    assert torch.equal(a, b)
    with kernels.use_backend("reference", op="attention"), torch.no_grad():  # layer 0 ran the kernel above
        torch.testing.assert_close(a, model.forward_logits(x), rtol=1e-4, atol=1e-4)


def test_row_token_shift_treats_bos_as_a_token_and_smears_zeros_at_the_start():
    from pgolf.model.gpt import segment_starts

    x_ids = torch.randint(2, V, (1, 12), generator=torch.Generator().manual_seed(6))
    x_ids[0, 5] = BOS
    row, doc = randomized(cfg()), randomized(cfg(token_shift="document"))
    x = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(7))
    g = torch.sigmoid(row.smear_gate.detach())
    with torch.no_grad():
        a = row._smear_vector(x, segment_starts(x_ids, None, None))
        b = doc._smear_vector(x, segment_starts(x_ids, None, BOS))
    torch.testing.assert_close(a[0, 0], (1 - g) * x[0, 0])  # the records mix zeros into position 0
    torch.testing.assert_close(b[0, 0], x[0, 0])  # pgolf leaves a start alone
    torch.testing.assert_close(a[0, 5], (1 - g) * x[0, 5] + g * x[0, 4])  # BOS is an ordinary token for 'row'
    torch.testing.assert_close(b[0, 5], x[0, 5])
    torch.testing.assert_close(a[0, 6:], b[0, 6:])
    with torch.no_grad():
        la, lb = row.forward_logits(x_ids), doc.forward_logits(x_ids)
    assert (la - lb).abs().max() > 1e-3


def test_record_inits():
    m = GPT(cfg(attn_gate="gated_bias", smear_init=-1.5, bigram_buckets=31, bigram_dim=64, bigram_init_std=0.02,
                value_embed_dim=16, value_embed_layers=(2,), aux_proj_init="orthogonal_scaled"))
    assert torch.equal(m.blocks[0].attn.gate_w, torch.zeros(4, 64)) and torch.equal(m.blocks[0].attn.gate_b,
                                                                                     torch.full((4,), 4.0))
    assert torch.equal(m.smear_gate, torch.full((64,), -1.5))
    assert 0.015 < m.bigram.embed.weight.std() < 0.025
    P = m.bigram.proj.weight  # (64, 64): orthogonal, scaled by 1/sqrt(2 L)
    torch.testing.assert_close(P @ P.T, torch.eye(64) / 6, atol=1e-5, rtol=0)
    assert torch.equal(m.ve.proj.weight, torch.zeros(32, 16))  # a dim below 64: the records' rule leaves it zero
    assert m.blocks[0].attn.vr_lambda is None


def test_physical_skip_layout_counts_skips_from_the_layers():
    looped = dict(num_layers=11, num_loops=1, loop_start=3, loop_end=5)
    assert cfg(**looped).num_skips == 7 and cfg(**looped, skip_layout="physical").num_skips == 5
    c = cfg(**looped, recur_layers=(4, 5))
    enc, dec = c.layer_plan(True)
    assert enc == [0, 1, 2, 3, 4, 5, 3] and dec == [4, 5, 6, 7, 8, 9, 10, 4, 5]
    assert c.layer_plan(False) == (list(range(5)), list(range(5, 11)))
