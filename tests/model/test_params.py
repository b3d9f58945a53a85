"""Parameter counts of the record presets and the optimizer's parameter groups (reference-stack 2.1, 3.1)."""

from __future__ import annotations

import pytest
import torch

from pgolf.model import GPT, GPTConfig, get_preset

RECORD_COUNTS = {"baseline": 17_059_912, "pr1493": 35_944_536, "sota": 35_945_671}


def build_meta(cfg: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


def count_from_formula(c: GPTConfig, num_skips: int) -> int:
    """Parameter count written out from the spec's tensor list (no model code)."""
    d, kv, hid, H, L = c.model_dim, c.num_kv_heads * (c.model_dim // c.num_heads), c.mlp_hidden, c.num_heads, c.num_layers
    block = d * d + 2 * d * kv + d * d  # Q, K, V, O
    block += 2 * d * hid                # W1, W2
    block += H                          # q_gain
    block += d + d + 2 * d              # attn_scale, mlp_scale, resid_mix
    if c.attn_gate in ("sparse", "attn_out"):
        block += H * c.attn_gate_width
    elif c.attn_gate == "gated":
        block += H * d
    n = c.vocab_size * d + L * block
    n += num_skips * d * (2 if c.skip_gates else 1)
    if c.parallel_residual == "two_lane":
        n += L * 2 + L * 4
    if c.smear_gate == "bos":
        n += c.smear_width + 1
    elif c.smear_gate == "vector":
        n += d
    return n


@pytest.mark.parametrize("name", sorted(RECORD_COUNTS))
def test_record_param_counts(name):
    preset = get_preset(name)
    model = build_meta(preset.model)
    assert model.num_params() == RECORD_COUNTS[name]
    assert preset.expected_params == RECORD_COUNTS[name]
    skips = {"baseline": 4, "pr1493": 8, "sota": 8}[name]  # n_skip of spec 2.6
    assert model.skip_weights.shape[0] == skips
    assert count_from_formula(preset.model, skips) == RECORD_COUNTS[name]


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")


MUON_SUFFIXES = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight",
                 "mlp.fc.weight", "mlp.proj.weight")

GROUP_CONFIGS = {
    "sota_tiny": GPTConfig(vocab_size=97, num_layers=5, model_dim=64, num_heads=4, num_kv_heads=2, mlp_hidden=128,
                           rope_dims=8, num_loops=2, loop_start=1, loop_end=2, parallel_start=3, xsa_last_n=5),
    "r1_like": GPTConfig(vocab_size=97, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, mlp_hidden=128,
                         rope_dims=8, num_loops=0, parallel_residual="none", smear_gate="vector", attn_gate="none",
                         skip_gates=False, bigram_buckets=31, bigram_dim=16, value_embed_dim=16,
                         value_embed_layers=(2, 3)),
    "gated_gptj": GPTConfig(vocab_size=97, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, mlp_hidden=64,
                            rope_dims=8, num_loops=0, parallel_residual="gptj", parallel_start=1, attn_gate="gated",
                            smear_gate="none"),
    "baseline": get_preset("baseline").model,
}


@pytest.mark.parametrize("name", sorted(GROUP_CONFIGS))
def test_optimizer_groups_partition(name):
    cfg = GROUP_CONFIGS[name]
    model = build_meta(cfg)
    groups = model.optimizer_groups()
    assert set(groups) == {"muon", "tok", "scalar"}
    muon = {n for n, _ in groups["muon"]}
    tok = {n for n, _ in groups["tok"]}
    scalar = {n for n, _ in groups["scalar"]}

    expected_muon = {f"blocks.{i}.{s}" for i in range(cfg.num_layers) for s in MUON_SUFFIXES}
    assert muon == expected_muon
    assert all(p.ndim == 2 for _, p in groups["muon"])

    expected_tok = {"tok_emb.weight"}
    if cfg.bigram_buckets:
        expected_tok.add("bigram.embed.weight")
    if cfg.value_embed_dim:
        expected_tok.add("ve.embed.weight")
    assert tok == expected_tok

    all_named = dict(model.named_parameters())
    assert scalar == set(all_named) - muon - tok
    # nothing missing, nothing duplicated (by name and by tensor identity)
    listed = [n for g in groups.values() for n, _ in g]
    assert len(listed) == len(set(listed)) == len(all_named)
    ids = [id(p) for g in groups.values() for _, p in g]
    assert len(set(ids)) == len(ids) == len(list(model.parameters()))
    for g in groups.values():
        for n, p in g:
            assert all_named[n] is p
    # every 2-D tensor outside the Muon and tok groups is a control / projection tensor the spec puts in 'scalar'
    for n in scalar:
        p = all_named[n]
        if p.ndim >= 2:
            assert any(key in n for key in ("resid_mix", "skip_weights", "skip_gates", "lane_", "gate_w",
                                            "bigram.proj", "ve.proj")), n
    if cfg.bigram_buckets:
        assert {"bigram.proj.weight", "bigram.scale"} <= scalar
    if cfg.value_embed_dim:
        assert {"ve.proj.weight", "ve.scale", "ve.layer_scales"} <= scalar
