"""Converted record checkpoints give the records' own logits (issue 12).

Against the independent forwards of ``record_reference`` (float64, written from the record scripts), the
converted pgolf model in fp32, at T = 2048 and 2112, loop on and off: max |Δlogit| <= 1e-4 and loss Δ <= 1e-5.
Three fixes each have a test that fails on the old behaviour: the records' RoPE tables, TRAIN_SEQ_LEN as the
RoPE scaling length, and token shifts that follow documents across the packed loader's split points.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pgolf.data.loaders import cu_seqlens_from_tokens
from pgolf.model import GPT
from pgolf.model.convert import convert_state_dict, load_checkpoint
from pgolf.model.gpt import attention_segments, round_to_bf16
from tests.model.record_reference import (BOS, V, banked_logits, banked_state_dict, r3_logits, r3_state_dict,
                                          record_cu_seqlens)

LOGIT_TOL, LOSS_TOL = 1e-4, 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def converted(raw, record, env=None, **overrides):
    c = convert_state_dict(raw, record, env=env or {}, **overrides)
    model = GPT(c.config)
    model.load_state_dict(c.state_dict, strict=True)
    return model.eval()


def tokens(T, seed, bos_every=0):
    ids = torch.randint(2, V, (1, T), generator=torch.Generator().manual_seed(seed))
    if bos_every:
        ids[0, ::bos_every] = BOS
    return ids


def assert_matches(model, ids, want, looping, **kw):
    """pgolf's fp32 logits and mean loss against the record's float64 logits."""
    model.looping_active = looping
    targets = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        got = model.forward_logits(ids, **kw)
        loss = model.loss(ids, targets, **kw)
    want_loss = F.cross_entropy(want.reshape(-1, V), targets.reshape(-1))
    err = (got.double() - want).abs().max().item()
    assert err <= LOGIT_TOL, f"max |Δlogit| {err:.3g}"
    assert abs(loss.item() - want_loss.item()) <= LOSS_TOL


@pytest.fixture(scope="module")
def r3_raw():
    return r3_state_dict(seed=1)


@pytest.fixture(scope="module")
def banked_raw():
    return banked_state_dict(seed=2, record_dtypes=True, prefix="_orig_mod.")


# ---- the done-when grid ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [2048, 2112])
@pytest.mark.parametrize("looping", [True, False])
def test_2026_04_09_record(r3_raw, T, looping):
    model = converted(r3_raw, "pr1493")
    ids = tokens(T, seed=T)
    assert_matches(model, ids, r3_logits(r3_raw, ids, looping=looping), looping)


@pytest.mark.parametrize("T", [2048, 2112])
@pytest.mark.parametrize("looping", [True, False])
def test_2026_04_27_record(banked_raw, T, looping):
    model = converted(banked_raw, "pr1855")
    ids = tokens(T, seed=T, bos_every=293)
    assert_matches(model, ids, banked_logits(banked_raw, ids, looping=looping, gate_scale=0.5), looping)


def test_descendant_with_equal_asymmetric_softcap(tmp_path):
    raw = banked_state_dict(seed=3, record_dtypes=True, asym=(29.75, 29.75))
    torch.save(raw, tmp_path / "final_model.pt")
    loaded = load_checkpoint(tmp_path / "final_model.pt", "pr2014", env={})
    ids = tokens(512, seed=5, bos_every=211)
    assert_matches(loaded.model, ids, banked_logits(raw, ids, looping=True, gate_scale=0.5), True)


def test_checkpoint_files_in_record_dtypes_with_compile_prefix(tmp_path, r3_raw, banked_raw):
    assert r3_raw["_orig_mod.tok_emb.weight"].dtype == banked_raw["_orig_mod.tok_emb.weight"].dtype == torch.bfloat16
    for raw, record, reference in ((r3_raw, "pr1493", r3_logits),
                                   (banked_raw, "pr1855", lambda sd, ids: banked_logits(sd, ids, gate_scale=0.5))):
        path = tmp_path / f"{record}.pt"
        torch.save(raw, path)
        loaded = load_checkpoint(path, record, env={})
        assert loaded.record.name == record and loaded.model.looping_active and not loaded.model.training
        ids = tokens(512, seed=11, bos_every=201)
        assert_matches(loaded.model, ids, reference(raw, ids), True)


# ---- the pieces the fixes rest on ------------------------------------------------------------------------------------

def test_attention_segments_cut_like_the_records_loader():
    g = torch.Generator().manual_seed(41)
    for trial in range(20):
        T, m = int(torch.randint(1, 300, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
        row = torch.randint(1, 4, (T,), generator=g)  # BOS = 1 about every third token, long runs without
        cu = cu_seqlens_from_tokens(row, BOS, None, 8)
        got = attention_segments(cu, T, m)
        assert got.shape == (cu.numel() + T // m,) and got.dtype == torch.int32
        want = record_cu_seqlens(row.tolist(), m)
        assert got.tolist() == want + [T] * (got.numel() - len(want))


def test_round_to_bf16_is_torch_rounding():
    x = torch.cat([torch.randn(4096) * 3000, torch.randn(4096) * 1e-3, torch.tensor([257.0, 259.0, -257.0, 0.0])])
    assert torch.equal(round_to_bf16(x), x.bfloat16().float())


# ---- packed rows: a document longer than max_seqlen -------------------------------------------------------------

def packed_row(T=2112, max_seqlen=512):
    """A row of five documents, the second 1,300 tokens long (cut twice by a max_seqlen of 512)."""
    lengths = [150, 1300, 40, 300, T - 1790]
    ids = tokens(T, seed=21)
    ids[0, 0] = 7  # the row starts inside a document, as the packed loader's rows do
    for start in torch.tensor(lengths[:-1]).cumsum(0).tolist():
        ids[0, start] = BOS
    return ids, max_seqlen


@pytest.mark.parametrize("looping", [True, False])
def test_packed_row_with_a_long_document(banked_raw, looping):
    ids, m = packed_row()
    record_cu = record_cu_seqlens(ids[0].tolist(), m)
    assert len(record_cu) > len(record_cu_seqlens(ids[0].tolist(), 10 ** 9))  # the record does cut the document
    want = banked_logits(banked_raw, ids, looping=looping, gate_scale=0.5, cu=record_cu)
    loader_cu = cu_seqlens_from_tokens(ids[0], BOS, None, 64)  # what DocumentPackedLoader hands the trainer
    assert_matches(converted(banked_raw, "pr1855"), ids, want, looping, cu_seqlens=loader_cu, max_seqlen=m)


# ---- the three fixes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["r3_compiled", "r3_eager"])
def test_rope_tables_of_the_2026_04_09_record(r3_raw, recipe):
    # the record casts its model to bf16, so its inv_freq buffer and (eagerly) its positions and angles are bf16
    model = converted(r3_raw, "pr1493", rope_tables=recipe)
    ids = tokens(2048, seed=31)
    assert_matches(model, ids, r3_logits(r3_raw, ids, recipe=recipe), True)
    other = "r3_eager" if recipe == "r3_compiled" else "r3_compiled"
    assert (r3_logits(r3_raw, ids, recipe=other) - r3_logits(r3_raw, ids, recipe=recipe)).abs().max() > 1e-2


def test_rope_tables_of_the_2026_04_27_record(banked_raw):
    ids = tokens(2048, seed=32, bos_every=700)
    want = banked_logits(banked_raw, ids, gate_scale=0.5)
    assert_matches(converted(banked_raw, "pr1855"), ids, want, True)
    exact = converted(banked_raw, "pr1855", rope_tables="exact")
    exact.looping_active = True
    with torch.no_grad():
        assert (exact.forward_logits(ids).double() - want).abs().max() > 10 * LOGIT_TOL


def test_train_seq_len_is_the_rope_scaling_length(r3_raw):
    # the 2026-04-09 Rotary scales by TRAIN_SEQ_LEN; its ROPE_TRAIN_SEQ_LEN is read but never used
    ids = tokens(2048, seed=33)
    want = r3_logits(r3_raw, ids, train_seq_len=1024)
    model = converted(r3_raw, "pr1493", env={"TRAIN_SEQ_LEN": "1024", "ROPE_TRAIN_SEQ_LEN": "2048"})
    assert model.config.rope_train_seq_len == 1024
    assert_matches(model, ids, want, True)
    assert (r3_logits(r3_raw, ids) - want).abs().max() > 1e-2  # the scaling does change the function


def test_token_shifts_follow_documents_across_split_points(banked_raw):
    # the record masks the SmearGate shift only at BOS: at a cut inside a long document the previous token
    # still belongs to that document and is smeared in
    ids, m = packed_row()
    record_cu = record_cu_seqlens(ids[0].tolist(), m)
    splits = [p for p in record_cu[1:-1] if ids[0, p] != BOS]
    assert splits, "the row must contain a split point"
    want = banked_logits(banked_raw, ids, gate_scale=0.5, cu=record_cu)
    model = converted(banked_raw, "pr1855")
    model.looping_active = True
    loader_cu = cu_seqlens_from_tokens(ids[0], BOS, None, 64)
    with torch.no_grad():
        got = model.forward_logits(ids, cu_seqlens=loader_cu, max_seqlen=m).double()
        # the old pipeline: the loader's cu_seqlens were cut at max_seqlen and every cut reset the shifts
        cut_cu = cu_seqlens_from_tokens(ids[0], BOS, m, 64)
        old = model.forward_logits(ids, cu_seqlens=cut_cu, max_seqlen=m).double()
    rows = torch.tensor(splits)
    assert (got[0, rows] - want[0, rows]).abs().max() <= LOGIT_TOL
    assert (old[0, rows] - want[0, rows]).abs().max() > 1e-2
