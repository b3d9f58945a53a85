"""The 2026-04-27 lineage (PR #1855 and descendants): banked weights into the sota architecture, strictly.

Logits are checked against ``record_reference.banked_logits`` (independent float64 forward of the record) on
short rows; parameter counts against the records' logs on full-size shapes (meta tensors, nothing allocated).
"""

from __future__ import annotations

import pytest
import torch

from pgolf.model import GPT
from pgolf.model.convert import UnsupportedElementError, convert_banked_state_dict, convert_state_dict
from pgolf.model.records import BANKED, PER_LAYER, RECORDS
from tests.model.record_reference import BOS, D, H, HID, HKV, L, V, banked_logits, banked_state_dict

TOL = dict(rtol=1e-5, atol=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")


def model_of(cfg, sd):
    model = GPT(cfg)
    model.load_state_dict(sd, strict=True)
    return model.double().eval()


def row(T=48, seed=3):
    ids = torch.randint(2, V, (1, T), generator=torch.Generator().manual_seed(seed))
    ids[0, [5, 20, 21]] = BOS
    return ids


def assert_same_logits(cfg, sd, raw, looping=True, **ref):
    model = model_of(cfg, sd)
    model.looping_active = looping
    ids = row()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_logits(ids), banked_logits(raw, ids, looping=looping, **ref), **TOL)


def test_config_of_the_2026_04_27_record():
    cfg, sd = convert_banked_state_dict(banked_state_dict(), env={"SPARSE_ATTN_GATE_SCALE": "0.5"})
    assert (cfg.vocab_size, cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_hidden) == \
        (V, L, D, H, HKV, HID)
    assert (cfg.num_loops, cfg.loop_start, cfg.loop_end, cfg.parallel_residual, cfg.parallel_start) == \
        (2, 3, 5, "two_lane", 8)
    assert (cfg.smear_gate, cfg.smear_width, cfg.attn_gate, cfg.attn_gate_width, cfg.attn_gate_kappa) == \
        ("bos", 12, "sparse", 12, 0.5)
    assert cfg.rope_tables == "bf16_freq" and cfg.rope_train_seq_len == 0 and cfg.xsa_last_n == 11
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_banks_become_per_layer_matrices_and_names_become_pgolf_names():
    raw = banked_state_dict(seed=1)
    _, sd = convert_banked_state_dict(raw, env={})
    for i in (0, 7, L - 1):
        assert torch.equal(sd[f"blocks.{i}.attn.c_q.weight"], raw["qo_bank"][i])
        assert torch.equal(sd[f"blocks.{i}.attn.proj.weight"], raw["qo_bank"][L + i])
        assert torch.equal(sd[f"blocks.{i}.attn.c_k.weight"], raw["kv_bank"][i])
        assert torch.equal(sd[f"blocks.{i}.attn.c_v.weight"], raw["kv_bank"][L + i])
        assert torch.equal(sd[f"blocks.{i}.mlp.fc.weight"], raw["mlp_up_bank"][i])
        assert torch.equal(sd[f"blocks.{i}.mlp.proj.weight"], raw["mlp_down_bank"][i])
        assert torch.equal(sd[f"blocks.{i}.attn.gate_w"], raw[f"blocks.{i}.attn.attn_gate_w"])
    assert torch.equal(sd["lane_resid"], raw["parallel_resid_lambdas"])
    assert torch.equal(sd["lane_mix"], raw["parallel_post_lambdas"])
    assert sd["smear_gate"].shape == (12,) and sd["smear_lambda"].shape == ()


@pytest.mark.parametrize("looping", [True, False])
@pytest.mark.parametrize("scale", ["0.5", "1.0"])
def test_logits_match_the_record_forward(looping, scale):
    raw = banked_state_dict(seed=2, record_dtypes=True)
    cfg, sd = convert_banked_state_dict(raw, env={"SPARSE_ATTN_GATE_SCALE": scale})
    assert_same_logits(cfg, sd, raw, looping, gate_scale=float(scale))


@pytest.mark.parametrize("gate, expected", [("gated", "gated"), ("attn_out", "attn_out")])
def test_the_other_head_gates_of_the_script(gate, expected):
    raw = banked_state_dict(seed=4, gate=gate)
    cfg, sd = convert_banked_state_dict(raw, env={})
    assert cfg.attn_gate == expected
    assert_same_logits(cfg, sd, raw)


def test_parallel_start_zero_runs_no_lanes():
    raw = banked_state_dict(seed=5)
    cfg, sd = convert_banked_state_dict(raw, env={"PARALLEL_START_LAYER": "0"})
    assert cfg.parallel_residual == "none" and "lane_mix" not in sd
    assert_same_logits(cfg, sd, raw, parallel_start=0, gate_scale=1.0)


def test_equal_asymmetric_softcap_is_one_softcap_and_unequal_is_refused():
    raw = banked_state_dict(seed=6, asym=(30.000002, 30.000002))
    cfg, sd = convert_banked_state_dict(raw, env={})
    assert cfg.logit_softcap == pytest.approx(30.000002) and "softcap_pos" not in sd
    assert_same_logits(cfg, sd, raw, gate_scale=1.0)
    with pytest.raises(UnsupportedElementError, match=r"asymmetric logit rescale.*softcap_pos=31.5 != softcap_neg=29"):
        convert_banked_state_dict(banked_state_dict(asym=(31.5, 29.0)), env={})
    one = banked_state_dict(asym=(30.0, 30.0))
    del one["softcap_neg"]
    with pytest.raises(UnsupportedElementError, match="softcap_neg=missing"):
        convert_banked_state_dict(one, env={})


@pytest.mark.parametrize("env, named", [
    ({"PARALLEL_FINAL_LANE": "mlp"}, "PARALLEL_FINAL_LANE=mlp selects a final hidden from one lane"),
    ({"ROPE_YARN": "1"}, "ROPE_YARN=1 selects RoPE rescaled by the packed row length"),
    ({"SMEAR_GATE_BOS_FIX": "0"}, "SMEAR_GATE_BOS_FIX=0 selects a SmearGate that also smears across BOS"),
    ({"TIE_EMBEDDINGS": "0"}, "TIE_EMBEDDINGS=0 selects an untied lm_head"),
    ({"PARALLEL_START_LAYER": "4"}, r"decoder layers \[3\] \(< PARALLEL_START_LAYER=4\) run after two-lane"),
])
def test_settings_pgolf_does_not_model_are_refused_by_name(env, named):
    with pytest.raises(UnsupportedElementError, match=named):
        convert_banked_state_dict(banked_state_dict(), env=env)


def test_elements_pgolf_does_not_model_are_refused_by_name():
    raw = banked_state_dict()
    with pytest.raises(UnsupportedElementError, match=r"does not model: \['ve_shared\.embed\.weight'\]"):
        convert_banked_state_dict({**raw, "ve_shared.embed.weight": torch.zeros(V, 8)}, env={})
    with pytest.raises(UnsupportedElementError, match="untied lm_head"):
        convert_banked_state_dict({**raw, "lm_head.weight": torch.zeros(V, D)}, env={})
    attn_out = banked_state_dict(gate="attn_out")
    with pytest.raises(UnsupportedElementError, match="ATTN_OUT_GATE_SRC=q"):
        convert_banked_state_dict(attn_out, env={"ATTN_OUT_GATE_SRC": "q"})
    with pytest.raises(ValueError, match=r"7 skip weights.*needs 8"):
        convert_banked_state_dict(banked_state_dict(n_skip=7), env={})


# ---- full-size shapes: the records' parameter counts ---------------------------------------------------------------

def full_size(family, asym=False):
    """The shapes of a record's state dict at its real size, as meta tensors (q_gain real: it sets QK init)."""
    n, d, kv, hid, vocab = 11, 512, 256, 2048, 8192

    def t(*shape):
        return torch.empty(*shape, device="meta")
    sd = {"tok_emb.weight": t(vocab, d), "skip_weights": t(8, d), "skip_gates": t(8, d)}
    for i in range(n):
        p = f"blocks.{i}."
        sd.update({p + "attn.q_gain": torch.full((8,), 5.0), p + "attn_scale": t(d), p + "mlp_scale": t(d),
                   p + "resid_mix": t(2, d)})
        if family == BANKED:
            sd[p + "attn.attn_gate_w"] = t(8, 12)
        else:
            sd.update({p + "attn.c_q.weight": t(d, d), p + "attn.c_k.weight": t(kv, d),
                       p + "attn.c_v.weight": t(kv, d), p + "attn.proj.weight": t(d, d),
                       p + "mlp.fc.weight": t(hid, d), p + "mlp.proj.weight": t(d, hid)})
    if family == BANKED:
        sd.update({"qo_bank": t(2 * n, d, d), "kv_bank": t(2 * n, kv, d), "mlp_up_bank": t(n, hid, d),
                   "mlp_down_bank": t(n, d, hid), "parallel_resid_lambdas": t(n, 2),
                   "parallel_post_lambdas": t(n, 2, 2), "smear_gate.weight": t(1, 12), "smear_lambda": t(1)})
    if asym:
        sd["softcap_pos"], sd["softcap_neg"] = torch.tensor(30.0), torch.tensor(30.0)
    return sd


@pytest.mark.parametrize("name", [n for n, r in RECORDS.items() if n != "pr2135" and r.family in (PER_LAYER, BANKED)])
def test_parameter_counts_equal_the_records_logs(name):  # the founding records: tests/model/test_founding_fidelity.py
    rec = RECORDS[name]
    asym = rec.run_env.get("ASYM_LOGIT_RESCALE") == "1"
    c = convert_state_dict(full_size(rec.family, asym), name, env={})
    with torch.device("meta"):
        count = GPT(c.config).num_params()
    # the asymmetric softcap's two scalars are folded into the one softcap while they are equal
    assert count == rec.params - (2 if asym else 0)
    assert c.record is rec and rec.caseops == (rec.family == BANKED)


def test_pr2135_is_refused_for_its_smear_across_bos():
    with pytest.raises(UnsupportedElementError, match="SMEAR_GATE_BOS_FIX=0"):
        convert_state_dict(full_size(BANKED, asym=True), "pr2135", env={})
