"""The founding records' training elements, each against its definition, and one trainer run that uses them all.

SWA (snapshots every N steps below an LR threshold; their mean replaces the weights, of the live or the EMA
weights), late QAT (straight-through fake quant in training mode only: eval logits with and without it identical;
``late_qat_in_eval`` keeps it on, as #1499's code), Muon for the head-gate and bigram-projection matrices, MuonEq-R
in the wide orientation (#1550), the loop switch at a step, and the checks that refuse settings that cannot work.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pgolf.errors import ConfigError
from pgolf.model import GPT, GPTConfig
from pgolf.model.gpt import Linear
from pgolf.train.config import resolve, validate
from pgolf.train.ema import EMA
from pgolf.train.muon import Muon
from pgolf.train.optim import build_optimizers
from pgolf.train.qat import qat_targets
from pgolf.train.swa import SWA
from tests.train.test_muon import NSSpy, seeded

V = 97
pytestmark = pytest.mark.usefixtures("one_thread")


def model_cfg(**kw) -> GPTConfig:
    base = dict(vocab_size=V, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_hidden=128, rope_dims=8,
                xsa_last_n=1, num_loops=0, parallel_residual="none", smear_gate="vector", token_shift="row",
                attn_gate="gated_bias", skip_gates=False, bigram_buckets=31, bigram_dim=64, value_embed_dim=16,
                value_embed_layers=(1,))
    base.update(kw)
    return GPTConfig(**base)


def randomized(c=None, seed=0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(c or model_cfg())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return m


def batch(seed=1, T=24):
    ids = torch.randint(0, V, (2, T + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


# ---- SWA --------------------------------------------------------------------------------------------------------

def test_swa_is_the_mean_of_the_snapshots_it_was_due_to_take():
    model = randomized()
    swa = SWA(every=2, threshold=0.5, source="weights")
    schedule = [1.0, 0.9, 0.6, 0.45, 0.3, 0.2, 0.1]  # the LR multiplier of steps 1..7
    taken = []
    for step, mult in enumerate(schedule, start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(step) * 0.01)
        if swa.due(step, mult):
            swa.add(step, model)
            taken.append(copy.deepcopy(model.state_dict()))
    assert swa.count == 2 and swa.first_step == 4  # steps 4 and 6: even and below 0.5 (step 2 was at 0.9)
    swa.copy_to(model)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, (taken[0][name] + taken[1][name]) / 2)


def test_swa_of_ema_weights_averages_the_ema():
    model = randomized()
    ema = EMA(model, 0.5)
    swa = SWA(every=1, threshold=1.0, source="ema")
    shadows = []
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.1)
        ema.update(model)
        swa.add(step, model, ema)
        shadows.append([s.clone() for s in ema.shadow])
    swa.copy_to(model)
    state = model.state_dict()
    for name, a, b in zip(ema.names, *shadows):
        torch.testing.assert_close(state[name], (a + b) / 2)
    with pytest.raises(ValueError, match="needs an EMA"):
        SWA(1, 1.0, "ema").add(1, model)


# ---- late QAT ---------------------------------------------------------------------------------------------------

def test_late_qat_is_off_in_eval_and_straight_through_in_training():
    model = randomized()
    x, y = batch()
    model.eval()
    with torch.no_grad():
        before = model.forward_logits(x)
    targets = qat_targets(model, "matrices", passthrough_max=2048, attn_bits=6, mlp_bits=5)
    assert targets["blocks.0.mlp.fc"] == 5 and targets["blocks.1.attn.c_q"] == 6 and targets["bigram.proj"] == 6
    assert "ve.proj" not in targets  # 32 x 16: within the passthrough size, never quantized
    model.set_fake_quant(targets, floor=False, in_eval=False)
    with torch.no_grad():
        assert torch.equal(model.forward_logits(x), before)  # eval: the flag changes nothing
    # training mode: the forward is the model with fake-quantized weights, and gradients pass straight through
    model.train()
    quantized = copy.deepcopy(model)
    quantized.set_fake_quant(None)
    with torch.no_grad():
        for name, bits in targets.items():
            lin = quantized.get_submodule(name)
            Q = 2 ** (bits - 1) - 1
            s = lin.weight.abs().amax(1, keepdim=True) / Q
            lin.weight.copy_(torch.clamp(torch.round(lin.weight / s), -Q, Q) * s)
    loss = model.loss(x, y)
    loss.backward()
    want = quantized.loss(x, y)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6) and abs(loss.item() - before.sum().item()) > 0
    for name in targets:
        torch.testing.assert_close(model.get_submodule(name).weight.grad, quantized.get_submodule(name).weight.grad,
                                   rtol=1e-5, atol=1e-7)


def test_late_qat_scope_aux_floor_and_in_eval():
    model = randomized(model_cfg(bigram_dim=128))
    aux = qat_targets(model, "aux", passthrough_max=65536, attn_bits=6, mlp_bits=5)
    assert aux == {"bigram.proj": 6, "ve.proj": 6}  # the banked records' CastedLinear layers
    lin = Linear(8, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.full((4, 8), 0.01))
    lin.fake_quant = (6, True, False)  # floor 1/31 ≫ 0.01/31: every weight rounds to 0
    assert torch.equal(lin.train_weight(), torch.zeros(4, 8))
    lin.fake_quant = (6, False, False)
    torch.testing.assert_close(lin.train_weight(), lin.weight)
    lin.eval()
    lin.fake_quant = (6, True, True)  # in_eval: on outside training mode too (#1499)
    assert torch.equal(lin.train_weight(), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="not Linear layers"):
        model.set_fake_quant({"blocks.0.attn.q_gain": 6})


# ---- optimizer options -------------------------------------------------------------------------------------------

def test_muon_takes_the_gate_and_bigram_matrices_when_asked():
    model = GPT(model_cfg())
    plain, aux = model.optimizer_groups(), model.optimizer_groups(aux_to_muon=True)
    moved = {n for n, _ in aux["muon"]} - {n for n, _ in plain["muon"]}
    assert moved == {"bigram.proj.weight", "blocks.0.attn.gate_w", "blocks.1.attn.gate_w"}
    assert {n for n, _ in aux["scalar"]} == {n for n, _ in plain["scalar"]} - moved
    assert "ve.proj.weight" in {n for n, _ in aux["scalar"]} and "blocks.0.attn.gate_b" in {n for n, _ in aux["scalar"]}


def test_muoneq_r_wide_orientation_normalizes_the_columns_of_tall_matrices(monkeypatch):
    spy = NSSpy(monkeypatch)
    g = seeded((30, 10), 41) * torch.logspace(-2, 1, 10)  # tall, columns of very different norms
    for orientation in ("stored", "wide"):
        p = torch.nn.Parameter(torch.zeros(30, 10))
        p.grad = g.clone()
        Muon([p], lr=0.1, momentum=0.5, row_normalize=True, row_orientation=orientation).step()
        U = spy.calls[-1][0][0]
        dim = 0 if orientation == "wide" else 1
        torch.testing.assert_close(U, 1.5 * g / (1.5 * g).norm(dim=dim, keepdim=True), atol=1e-6, rtol=1e-5)
    wide = seeded((10, 30), 42)
    p = torch.nn.Parameter(torch.zeros(10, 30))
    p.grad = wide.clone()
    Muon([p], lr=0.1, momentum=0.5, row_normalize=True, row_orientation="wide").step()
    torch.testing.assert_close(spy.calls[-1][0][0].norm(dim=1), torch.ones(10))  # a wide matrix: its rows
    opt = build_optimizers({"muon": [("w", torch.nn.Parameter(torch.zeros(4, 4)))]}, matrix_lr=0.1, muon_momentum=0.9,
                           muon_wd=0.0, row_normalize=True, ns_steps=5, ns_coefficients="classic", tok_lr=0.1,
                           tok_wd=0.0, scalar_lr=0.1, scalar_wd=0.0, betas=(0.9, 0.95), eps=1e-8,
                           row_orientation="wide")
    assert opt.muon.param_groups[0]["row_orientation"] == "wide"


# ---- settings -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,words", [
    (dict(swa_every=2, swa_source="ema", ema_decay=0.0), "no EMA"),
    (dict(late_qat_in_eval=True, late_qat_threshold=0.0), "late QAT is off"),
    (dict(quant_method="none", quant_target_bytes=10), "no artifact"),
    (dict(quant_table_bits=9), "quant-table-bits"),
    (dict(gptq_act_order="sideways"), "gptq-act-order"),
    (dict(quant_matrix_scales="minmax"), "quant-matrix-scales"),
    (dict(token_shift="bos"), "token-shift"),
    (dict(recur_layers=(3, 40)), "recur_layers"),
])
def test_settings_that_cannot_work_are_refused_by_name(flags, words):
    with pytest.raises(ConfigError, match=words):
        train, model = resolve("pr1406", env={}, flags=flags)
        validate(train, model)


def test_founding_presets_keep_their_hard_coded_rope_length():
    assert resolve("pr1148", env={"TRAIN_SEQ_LEN": "4096"})[1].rope_train_seq_len == 1024
    assert resolve("pr1499", env={})[1].rope_train_seq_len == 0
    assert resolve("pr1550", env={"RECUR_START_STEP": "10"})[1].loop_activate_step == 10


# ---- one trainer run with the elements on ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pgolf.data.synthetic import build_default_corpus

    return build_default_corpus(tmp_path_factory.mktemp("synthetic"), num_train_docs=400, num_val_docs=30)


def test_trainer_runs_the_founding_elements(corpus, tmp_path):
    """#1499's preset at tiny widths: the recurrence switches on at its step, late QAT at its LR multiplier and
    (as #1499's code) stays on for calibration, evals and the rebuilt artifact; SWA replaces the EMA; GPTQ calibrates
    on generated sequences; selective pruning runs against its target; the artifact records the options."""
    from pgolf.quant.artifact import build_model, load_artifact
    from pgolf.train.trainer import train

    flags = dict(data_path=corpus["shard_dir"], tokenizer_path=corpus["tokenizer_path"], run_dir=str(tmp_path / "r"),
                 vocab_size=512, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, mlp_hidden=128,
                 bigram_buckets=61, xsa_last_n=2, parallel_start=3, recur_layers=(1, 2), loop_activate_step=3,
                 quant_fp16_keep="tok_emb", iterations=6, max_wallclock_seconds=0.0, warmdown_iters=3,
                 train_batch_tokens=1024, train_seq_len=128, eval_seq_len=128, eval_stride=0, val_max_tokens=1024,
                 warmup_steps=0, swa_every=1, swa_threshold=1.0, gptq_calibration="generated",
                 gptq_calibration_batches=2, quant_passthrough_max=1024, quant_target_bytes=1000, code_bytes=500,
                 save_checkpoint=False, train_log_every=1)
    cfg, mcfg = resolve("pr1499", env={}, flags=flags)
    lines: list[str] = []
    s = train(cfg, mcfg, log=lines.append)
    log = "\n".join(lines)
    assert s["loop_on_step"] == 3 and "step:3 looping:on" in log
    assert s["late_qat_on_step"] == 5 and "late_qat:on lr_mult:0.3333" in log  # (6 - 4) / 3 < 0.5 first at step 5
    assert s["swa_snapshots"] == 2 and "swa: applied the mean of 2 weights snapshots" in log  # steps 5 and 6
    assert "2 generated sequences x 128 tokens" in log and "selective_prune:" in log
    model = s["model_obj"]
    assert model.fake_quant_targets() and all(lin.fake_quant[2] for lin in model.modules()
                                              if isinstance(lin, Linear) and lin.fake_quant)
    art = load_artifact(tmp_path / "r" / cfg.artifact_name)
    assert art.meta["settings"]["calibration"] == "generated" and art.meta["settings"]["act_order"] == "ascending"
    assert art.meta["selective_prune"]["target"] == 1000 and art.meta["late_qat"]["in_eval"]
    assert build_model(art).fake_quant_targets() == model.fake_quant_targets()
    assert art["tok_emb.weight"].scheme == "fp16" and art["blocks.0.mlp.fc.weight"].bits == 5
