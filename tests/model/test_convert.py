"""The converter's entry points: the 2026-04-09 (per-layer) family, recognition, record names, errors, the CLI.

Logits are checked against ``record_reference.r3_logits`` (an independent float64 forward of the record, with
its own RoPE tables) on short sequences here; ``test_record_fidelity`` runs the T = 2048/2112 grid.
"""

from __future__ import annotations

import pytest
import torch

from pgolf.model import GPT
from pgolf.model.convert import (AmbiguousRecordError, UnsupportedElementError, convert_r3_state_dict,
                                 convert_state_dict, identify, load_checkpoint, main)
from pgolf.model.records import RECORDS, UnknownRecordError, get_record
from tests.model.record_reference import D, H, HID, HKV, L, V, banked_state_dict, r3_logits, r3_state_dict

TOL = dict(rtol=1e-5, atol=1e-5)
R3_ENV_VARS = ("NUM_LOOPS", "LOOP_START", "LOOP_END", "PARALLEL_RESIDUAL_START", "XSA_LAST_N", "ROPE_DIMS",
               "ROPE_BASE", "TRAIN_SEQ_LEN", "LOGIT_SOFTCAP", "LN_SCALE")

pytestmark = pytest.mark.usefixtures("one_thread")


def load_converted(raw, **kw):
    cfg, sd = convert_r3_state_dict(raw, env={}, **kw)
    model = GPT(cfg)
    model.load_state_dict(sd, strict=True)
    return cfg, model.double()


def ids_of(T, seed):
    return torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def clean_env(monkeypatch):
    for var in R3_ENV_VARS + ("SPARSE_ATTN_GATE_SCALE",):
        monkeypatch.delenv(var, raising=False)


# ---- the 2026-04-09 family ------------------------------------------------------------------------------------

def test_converted_config_has_the_r3_layout():
    cfg, sd = convert_r3_state_dict(r3_state_dict(), env={})
    assert (cfg.vocab_size, cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_hidden) == \
        (V, L, D, H, HKV, HID)
    assert (cfg.num_loops, cfg.loop_start, cfg.loop_end) == (2, 3, 5)
    assert (cfg.parallel_residual, cfg.parallel_start) == ("gptj", 7)
    assert cfg.xsa_last_n == 11 and cfg.rope_dims == 16 and cfg.rope_train_seq_len == 2048
    assert cfg.rope_tables == "r3_compiled"
    assert cfg.logit_softcap == 30.0 and cfg.ln_scale and cfg.skip_gates and cfg.mlp_negative_slope == 0.5
    assert cfg.smear_gate == "none" and cfg.attn_gate == "none" and not cfg.bigram_buckets
    assert all(not k.startswith("_orig_mod.") for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values())


@pytest.mark.parametrize("looping", [True, False])
def test_converted_model_matches_the_record_forward(looping):
    raw = r3_state_dict(seed=1)
    _, model = load_converted(raw)
    model.looping_active = looping
    ids = ids_of(29, 2)
    with torch.no_grad():
        got = model.forward_logits(ids)
    torch.testing.assert_close(got, r3_logits(raw, ids, looping=looping), **TOL)
    assert (r3_logits(r3_state_dict(seed=3), ids) - got).abs().max() > 1e-2  # the check sees the weights


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module.", "_orig_mod.module.", "module._orig_mod."])
def test_prefixes_and_dtypes_are_handled(prefix):
    raw = r3_state_dict(seed=4, prefix=prefix, dtype=torch.float32)
    _, model = load_converted(raw)
    model.looping_active = True
    ids = ids_of(13, 5)
    plain = {k[len(prefix):]: v for k, v in raw.items()}
    with torch.no_grad():
        torch.testing.assert_close(model.forward_logits(ids), r3_logits(plain, ids), **TOL)


def test_bf16_values_are_carried_over_exactly():
    raw_bf = r3_state_dict(seed=4)
    _, sd = convert_r3_state_dict(raw_bf, env={})
    for k, v in raw_bf.items():
        assert torch.equal(sd[k.removeprefix("_orig_mod.")], v.float())


def test_env_and_overrides():
    raw = r3_state_dict()
    cfg, _ = convert_r3_state_dict(raw, env={"XSA_LAST_N": "4", "ROPE_DIMS": "8", "LN_SCALE": "0",
                                             "TRAIN_SEQ_LEN": "1536"})
    assert cfg.xsa_last_n == 4 and cfg.rope_dims == 8 and not cfg.ln_scale and cfg.rope_train_seq_len == 1536
    cfg, _ = convert_r3_state_dict(raw, env={"PARALLEL_RESIDUAL_START": "-1"})
    assert cfg.parallel_residual == "none"
    cfg, _ = convert_r3_state_dict(raw, env={"XSA_LAST_N": "4"}, xsa_last_n=2, rope_tables="r3_eager")
    assert cfg.xsa_last_n == 2 and cfg.rope_tables == "r3_eager"
    # variables the script never reads change nothing (its MLP slope is fixed at 0.5)
    cfg, _ = convert_r3_state_dict(raw, env={"LEAKY_RELU_SLOPE": "0.3", "ROPE_TRAIN_SEQ_LEN": "64"})
    assert cfg.mlp_negative_slope == 0.5 and cfg.rope_train_seq_len == 2048
    with pytest.raises(ValueError, match=r"cannot read NUM_LOOPS='two'"):
        convert_r3_state_dict(raw, env={"NUM_LOOPS": "two"})


def test_env_defaults_to_os_environ(monkeypatch, clean_env):
    monkeypatch.setenv("XSA_LAST_N", "3")
    cfg, _ = convert_r3_state_dict(r3_state_dict())
    assert cfg.xsa_last_n == 3


def test_missing_unknown_or_misshaped_tensors_are_named():
    raw = r3_state_dict()
    bad = dict(raw)
    del bad["_orig_mod.blocks.4.mlp.proj.weight"]
    with pytest.raises(ValueError, match=r"missing.*blocks\.4\.mlp\.proj\.weight"):
        convert_r3_state_dict(bad, env={})
    with pytest.raises(ValueError, match="tok_emb.weight"):
        convert_r3_state_dict({k: v for k, v in raw.items() if "tok_emb" not in k}, env={})
    with pytest.raises(UnsupportedElementError, match=r"does not model.*blocks\.0\.attn\.vr_lambda"):
        convert_r3_state_dict({**raw, "_orig_mod.blocks.0.attn.vr_lambda": torch.ones(2)}, env={})
    with pytest.raises(ValueError, match=r"shape.*blocks\.2\.attn\.c_v\.weight"):
        convert_r3_state_dict({**raw, "_orig_mod.blocks.2.attn.c_v.weight": torch.zeros(48, D)}, env={})
    with pytest.raises(UnsupportedElementError, match="untied lm_head"):
        convert_r3_state_dict({**raw, "_orig_mod.lm_head.weight": torch.zeros(V, D)}, env={})
    with pytest.raises(UnsupportedElementError, match="EMBEDDING_DIM"):
        convert_r3_state_dict({**raw, "embed_proj.weight": torch.zeros(D, 32)}, env={})
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        convert_r3_state_dict({**raw, "step": 7}, env={})


def test_skip_count_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"7 skip weights.*needs 8"):
        convert_r3_state_dict(r3_state_dict(n_skip=7), env={})
    with pytest.raises(ValueError, match=r"skip weights.*NUM_LOOPS=1"):
        convert_r3_state_dict(r3_state_dict(), env={"NUM_LOOPS": "1"})  # loop x2 layout has 7 skips
    cfg, _ = convert_r3_state_dict(r3_state_dict(n_skip=7), env={"NUM_LOOPS": "1"})
    assert cfg.num_skips == 7


# ---- recognition and record names -----------------------------------------------------------------------------------

def test_the_family_is_recognized_from_the_keys():
    assert identify({k.removeprefix("_orig_mod."): v for k, v in r3_state_dict().items()}) == "per_layer"
    assert identify(banked_state_dict()) == "banked"
    with pytest.raises(ValueError, match=r"not a checkpoint of a supported record.*pr1855"):
        identify({"wte.weight": torch.zeros(3)})


def test_record_names_and_aliases():
    assert get_record("pr1855") is get_record("R6") is get_record("2026-04-27") is RECORDS["pr1855"]
    assert get_record("2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT").name == "pr1493"
    with pytest.raises(UnknownRecordError, match=r"unknown record 'pr9999'.*pr1493.*pr2135"):
        get_record("pr9999")
    with pytest.raises(ValueError, match="record pr1855 saves banked weights but this state dict has per_layer"):
        convert_state_dict(r3_state_dict(), "pr1855", env={})


def test_the_only_per_layer_record_is_chosen_without_a_name(clean_env):
    c = convert_state_dict(r3_state_dict(), env={})
    assert c.record.name == "pr1493" and c.family == "per_layer"


def test_a_banked_state_dict_needs_its_record_or_gate_scale(clean_env):
    raw = banked_state_dict()
    with pytest.raises(AmbiguousRecordError, match=r"SPARSE_ATTN_GATE_SCALE \(.*pr1855 0\.5.*pr1868 1\.0"):
        convert_state_dict(raw, env={})
    c = convert_state_dict(raw, env={"SPARSE_ATTN_GATE_SCALE": "0.5"})
    assert c.record is None and c.family == "banked" and c.config.attn_gate_kappa == 0.5
    assert convert_state_dict(raw, "pr1868", env={}).config.attn_gate_kappa == 1.0


# ---- load_checkpoint ------------------------------------------------------------------------------------------------

class NotAStateDict:
    pass


def test_load_checkpoint_reads_files_safely(tmp_path, clean_env):
    raw = r3_state_dict(seed=6)
    torch.save(raw, tmp_path / "final_model.pt")
    loaded = load_checkpoint(tmp_path / "final_model.pt")
    assert loaded.model.looping_active and not loaded.model.training and loaded.record.name == "pr1493"
    ids = ids_of(17, 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.double().forward_logits(ids), r3_logits(raw, ids), **TOL)
    assert load_checkpoint(tmp_path / "final_model.pt", env={"XSA_LAST_N": "5"}).config.xsa_last_n == 5

    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_checkpoint(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(ValueError, match="not a loadable state dict"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save(NotAStateDict(), tmp_path / "object.pt")  # needs arbitrary unpickling: refused by weights_only
    with pytest.raises(ValueError, match="not a loadable state dict"):
        load_checkpoint(tmp_path / "object.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


# ---- the CLI --------------------------------------------------------------------------------------------------------

def test_cli_writes_a_pgolf_checkpoint_and_never_overwrites_silently(tmp_path, capsys, clean_env):
    raw = banked_state_dict(seed=8, record_dtypes=True, prefix="_orig_mod.")
    src, out = tmp_path / "final_model.pt", tmp_path / "converted.pt"
    torch.save(raw, src)
    assert main([str(src), "--out", str(out), "--record", "pr1855"]) == 0
    assert "pr1855" in capsys.readouterr().out
    ck = torch.load(out, weights_only=True)
    assert ck["source"] == {"file": str(src), "family": "banked", "record": "pr1855"}
    again = load_checkpoint(out)  # a pgolf checkpoint: config and weights as written
    assert again.family == "pgolf" and again.config == load_checkpoint(src, "pr1855", env={}).config
    ids = ids_of(40, 9)
    with torch.no_grad():
        torch.testing.assert_close(again.model.forward_logits(ids),
                                   load_checkpoint(src, "pr1855", env={}).model.forward_logits(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pgolf checkpoint; it takes no record name"):
        load_checkpoint(out, "pr1855")

    before = out.read_bytes()
    assert main([str(src), "--out", str(out), "--record", "pr1855"]) == 1
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == before
    assert main([str(src), "--out", str(out), "--record", "pr1855", "--env", "SPARSE_ATTN_GATE_SCALE=1.0",
                 "--force"]) == 0
    assert torch.load(out, weights_only=True)["config"]["attn_gate_kappa"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted.pt", "final_model.pt"]  # no temp files left


def test_cli_errors_and_listing(tmp_path, capsys, clean_env):
    src = tmp_path / "final_model.pt"
    torch.save(banked_state_dict(seed=8), src)
    assert main([str(src), "--out", str(tmp_path / "x.pt")]) == 1
    assert "pass record=NAME (--record)" in capsys.readouterr().err
    assert main([str(src), "--out", str(tmp_path / "x.pt"), "--env", "NOEQUALS"]) == 1
    assert "--env takes NAME=VALUE" in capsys.readouterr().err
    assert main([str(src), "--out", str(tmp_path / "x.pt"), "--record", "pr2135"]) == 1
    assert "SMEAR_GATE_BOS_FIX=0" in capsys.readouterr().err
    assert main([str(src)]) == 1 and "--out is required" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    assert main(["--list-records"]) == 0
    listing = capsys.readouterr().out
    assert all(r.name in listing and r.folder in listing for r in RECORDS.values())
