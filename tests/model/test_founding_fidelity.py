"""The five founding systems in pgolf (issue 16): presets with the records' parameter counts, and each record's
checkpoint loaded through ``load_checkpoint`` giving the record's own logits.

Against the independent forwards of ``founding_reference`` (float64, written from the five scripts), the converted
pgolf model in fp32, recurrence / loop on and off: max |Δlogit| <= 1e-4. T = 1152 runs the records' NTK-rescaled
RoPE (their hard-coded train length is 1024); #1499, which never rescales, runs at 512 with the records' bf16 tables
and with pgolf's exact ones. Each converted config is the preset's own at the test's small widths.
"""

from __future__ import annotations

import pytest
import torch

from pgolf.model import GPT, get_preset
from pgolf.model.convert import AmbiguousRecordError, UnsupportedElementError, convert_state_dict, load_checkpoint
from pgolf.train.cli import main as train_cli
from tests.model import founding_reference as R

LOGIT_TOL = 1e-4
LOG_COUNTS = {"pr490": 27_137_221, "pr1148": 26_928_220, "pr1406": 26_928_220, "pr1499": 37_338_221,
              "pr1550": 36_311_132}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(LOG_COUNTS))
def test_print_params_is_the_record_log_count(name, capsys):
    assert train_cli(["--preset", name, "--print-params"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"preset:{name} params:{LOG_COUNTS[name]} "), line
    assert get_preset(name).expected_params == LOG_COUNTS[name]


def tokens(T, seed):
    return torch.randint(2, R.V, (1, T), generator=torch.Generator().manual_seed(seed))


def assert_logits(model, ids, want, looping):
    model.looping_active = looping
    with torch.no_grad():
        got = model.forward_logits(ids).double()
    err = (got - want).abs().max().item()
    assert err <= LOGIT_TOL, f"max |Δlogit| {err:.3g} (looping={looping})"


def small_preset(name, **dims):
    """The preset's model at the reference's widths (everything else the preset's)."""
    c = get_preset(name).model
    return c.replace(vocab_size=R.V, model_dim=R.D, num_heads=R.H, num_kv_heads=R.HKV, mlp_hidden=R.HID, **dims)


CASES = {  # record → (its random weights, its forward (sd, ids, looping), the small widths it has)
    "pr490": (lambda: R.pr490_state_dict(1), lambda sd, ids, loop: R.pr490_logits(sd, ids),
              dict(bigram_buckets=R.BIGRAM, bigram_dim=R.BDIM)),
    "pr1148": (lambda: R.banked_early_state_dict(2), lambda sd, ids, loop: R.banked_logits(sd, ids),
               dict(bigram_buckets=R.BIGRAM, bigram_dim=R.BDIM, value_embed_dim=16)),
    "pr1406": (lambda: R.banked_early_state_dict(3),
               lambda sd, ids, loop: R.banked_logits(sd, ids, appended=(4, 5) if loop else ()),
               dict(bigram_buckets=R.BIGRAM, bigram_dim=R.BDIM, value_embed_dim=16)),
    "pr1499": (lambda: R.pr1499_state_dict(4), lambda sd, ids, loop: R.pr1499_logits(sd, ids, recur=loop),
               dict(bigram_buckets=R.BIGRAM, bigram_dim=R.BDIM)),
    "pr1550": (lambda: R.banked_early_state_dict(5, ve_dim=12, with_bigram=False, lanes=True),
               lambda sd, ids, loop: R.banked_logits(sd, ids, xsa_last_n=11, inplace=(3, 5) if loop else None,
                                                     parallel_start=7),
               dict(value_embed_dim=12)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_record_checkpoint_gives_the_records_logits(name, tmp_path):
    make_sd, forward, dims = CASES[name]
    raw = make_sd()
    torch.save(raw, tmp_path / "final_model.pt")
    loaded = load_checkpoint(tmp_path / "final_model.pt", name if name in ("pr1148", "pr1406") else None, env={})
    assert loaded.record.name == name and loaded.record.preset == name
    assert loaded.config == small_preset(name, rope_tables="r3_compiled", **dims)
    assert loaded.model.num_params() == sum(v.numel() for v in raw.values())
    T = 512 if name == "pr1499" else 1152
    ids = tokens(T, seed=T)
    for looping in (True, False):
        assert_logits(loaded.model, ids, forward(raw, ids, looping), looping)


def test_pr1499_with_pgolf_exact_rope_tables():
    raw = R.pr1499_state_dict(6)
    c = convert_state_dict(raw, "pr1499", env={}, rope_tables="exact")
    model = GPT(c.config)
    model.load_state_dict(c.state_dict)
    ids = tokens(512, seed=8)
    assert_logits(model.eval(), ids, R.pr1499_logits(raw, ids, recur=True, recipe="exact"), True)
    assert (R.pr1499_logits(raw, ids, recipe="exact") - R.pr1499_logits(raw, ids)).abs().max() > 1e-3


def test_the_2026_03_records_bf16_rope_below_their_1024():
    raw = R.banked_early_state_dict(7)
    ids = tokens(512, seed=9)
    c = convert_state_dict(raw, "pr1148", env={})
    model = GPT(c.config)
    model.load_state_dict(c.state_dict)
    assert_logits(model.eval(), ids, R.banked_logits(raw, ids), False)


def test_run_settings_and_refusals():
    raw = R.banked_early_state_dict(2)
    with pytest.raises(AmbiguousRecordError, match="pr1148.*pr1406"):
        convert_state_dict(raw, None, env={})
    assert convert_state_dict(raw, "pr1406", env={"RECUR_LAYERS": ""}).config.recur_layers == ()
    assert convert_state_dict(raw, "pr1148", env={"XSA_LAST_N": "11"}).config.xsa_last_n == 11
    with pytest.raises(UnsupportedElementError, match="TRIGRAM=1"):
        convert_state_dict(raw, "pr1406", env={"TRIGRAM": "1"})
    with pytest.raises(UnsupportedElementError, match="dtg_gate"):
        convert_state_dict({**raw, "blocks.0.dtg_gate.weight": torch.zeros(1, R.D)}, "pr1148", env={})
    c = convert_state_dict(R.pr1499_state_dict(1), None, env={"DEPTH_RECUR_COUNT": "3", "PARALLEL_RESIDUAL_START": "-1"})
    assert c.record.name == "pr1499" and c.config.recur_layers == (3, 4, 5, 3, 4, 5)
    assert c.config.parallel_residual == "none"
