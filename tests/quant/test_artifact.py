"""The artifact: exact round trip, both layouts, every corruption case, no code execution, the size table and the
budget check; Hessian collection through forward hooks."""

from __future__ import annotations

import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from pgolf.errors import ConfigError
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant import artifact as A
from pgolf.quant.calibrate import EMBED_KEY, calibration_batches, collect_hessians
from pgolf.quant.gptq import dequantize
from pgolf.quant.quantize import QuantSettings, quantize_state, tensor_group
from pgolf.quant.size import (BUDGET_BYTES, OverBudgetError, artifact_size_table, check_budget, format_size_table,
                              knob_groups)

CFG = GPTConfig(vocab_size=256, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, mlp_hidden=128,
                xsa_last_n=3, num_loops=1, loop_start=1, loop_end=1, parallel_start=2)
SETTINGS = QuantSettings(attn_bits=6, attn_k=12.85, mlp_bits=6, mlp_k=11.5, embed_bits=7, embed_k=14.0,
                         passthrough_max=1024, lqer_rank=2, lqer_top=2)


def make_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.looping_active = True
    return model.eval()


def random_batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (2, 32), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def quantized():
    torch.set_num_threads(1)
    model = make_model()
    hess, n_cal = collect_hessians(model, random_batches(3))
    qm = quantize_state(model.state_dict(), hess, SETTINGS, model_config=CFG.to_dict(), meta={"n_cal": n_cal})
    return model, hess, qm


def test_hooks_collect_every_linear_and_the_final_norm_output_with_looping_on():
    model = make_model()
    batches = random_batches(2)
    hess, n_cal = collect_hessians(model, batches)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(hess) == linears | {EMBED_KEY} and n_cal == 2
    assert all(m.fused for m in model.modules() if hasattr(m, "fused"))  # restored after calibration
    with torch.no_grad():
        hs = [model.hidden(x).reshape(-1, CFG.model_dim) for x in batches]
    torch.testing.assert_close(hess[EMBED_KEY], sum(h.t() @ h for h in hs) / 2)
    assert hess["blocks.0.mlp.proj.weight"].shape == (128, 128)  # the hidden activation (unfused MLP)
    assert torch.equal(hess["blocks.0.attn.c_q.weight"], hess["blocks.0.attn.c_k.weight"])  # same input
    # layer 1 is looped (runs twice per forward): its passes add into one Hessian, so looping off gives less
    off, _ = collect_hessians(model, batches, looping=False)
    assert torch.trace(hess["blocks.1.mlp.fc.weight"]) > 1.5 * torch.trace(off["blocks.1.mlp.fc.weight"])
    torch.testing.assert_close(hess["blocks.0.mlp.fc.weight"], off["blocks.0.mlp.fc.weight"])  # not looped


def test_calibration_batches_come_from_the_training_shards(tmp_path):
    from pgolf.data.shards import find_shards, write_shard

    rng = np.random.default_rng(0)
    write_shard(tmp_path / "fineweb_train_000000.bin", rng.integers(0, 100, 5000))
    write_shard(tmp_path / "fineweb_val_000000.bin", rng.integers(200, 256, 5000))
    xs = list(calibration_batches(find_shards(tmp_path, "train"), 64, 256, 3, seed=1))
    assert len(xs) == 3 and all(x.shape == (4, 64) and int(x.max()) < 100 for x in xs)


def test_calibration_refuses_validation_tokens():
    from pgolf import compliance_guard as guard

    batches = random_batches(2)
    batches[1] = guard.mark_validation(batches[1])
    with pytest.raises(guard.ComplianceViolation, match="gptq_calibration"):
        collect_hessians(make_model(), batches)


def test_recipe_assigns_groups_and_schemes(quantized):
    _, _, qm = quantized
    by = {t.name: t for t in qm.tensors}
    assert by["tok_emb.weight"].group == "embed" and by["tok_emb.weight"].bits == 7
    assert by["blocks.0.attn.c_q.weight"].group == "attn" and by["blocks.0.attn.c_q.weight"].method == "gptq"
    assert by["blocks.2.mlp.proj.weight"].group == "mlp" and by["blocks.2.mlp.proj.weight"].k == 11.5
    gate = by["blocks.0.attn.gate_w"]
    assert gate.group == "gate" and gate.bits == 8 and torch.equal(
        gate.scale, (make_model().state_dict()["blocks.0.attn.gate_w"].abs().amax(1) / 127).half())
    assert by["skip_weights"].scheme == "fp16" and by["blocks.0.attn.q_gain"].scheme == "fp16"
    assert sum(t.lqer is not None for t in qm.tensors) == 2
    assert tensor_group("blocks.0.mlp.fc.weight", torch.zeros(8, 8), SETTINGS) == "passthrough"  # small


@pytest.mark.parametrize("layout", ["int8", "packed6"])
def test_round_trip_from_the_file_alone_is_bitwise_the_dequantized_model(quantized, tmp_path, layout):
    _, _, qm = quantized
    path = tmp_path / "m.pgq"
    n = A.save_artifact(path, qm, layout=layout)
    assert n == path.stat().st_size
    rebuilt = A.build_model(path)
    ref = GPT(CFG)
    ref.load_state_dict(A.dequantize_state(qm))  # dequantize(quantized) loaded into a fresh model
    ref.looping_active = True
    ref.eval()
    x = torch.randint(0, CFG.vocab_size, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(rebuilt.forward_logits(x), ref.forward_logits(x))
    back = A.load_artifact(path)
    for a, b in zip(qm.tensors, back.tensors):
        assert (a.name, a.shape, a.bits, a.k, a.group, a.stream) == (b.name, b.shape, b.bits, b.k, b.group, b.stream)
        assert torch.equal(A.dequantize_tensor(a), A.dequantize_tensor(b))
    q = back["blocks.0.mlp.fc.weight"]
    assert torch.equal(A.dequantize_tensor(q) if q.lqer is None else dequantize(q.q, q.scale),
                       dequantize(qm["blocks.0.mlp.fc.weight"].q, qm["blocks.0.mlp.fc.weight"].scale))
    assert (q.q_packed is not None) == (layout == "packed6")


def test_encoding_is_deterministic_and_int8_layout_is_the_default(quantized):
    _, _, qm = quantized
    assert A.encode(qm) == A.encode(qm)
    assert qm.layout == "int8"


def _corrupt_cases(blob: bytes):
    version = bytearray(blob)
    struct.pack_into("<H", version, 8, A.FORMAT_VERSION + 1)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    return {
        "truncated": (blob[: len(blob) - 100], A.TruncatedArtifactError, "truncated"),
        "truncated_prefix": (blob[:30], A.TruncatedArtifactError, "truncated"),
        "empty": (b"", A.TruncatedArtifactError, "truncated"),
        "corrupted": (bytes(flipped), A.CorruptedArtifactError, "checksum mismatch"),
        "wrong_magic": (b"PK\x03\x04" + blob[4:], A.NotAnArtifactError, "wrong magic"),
        "pickle": (pickle.dumps({"a": 1}), A.NotAnArtifactError, "not a pgolf artifact"),
        "newer_version": (bytes(version), A.ArtifactVersionError, "newer than this pgolf supports"),
        "trailing": (blob + b"\0", A.CorruptedArtifactError, "trailing bytes"),
    }


@pytest.mark.parametrize("case", ["truncated", "truncated_prefix", "empty", "corrupted", "wrong_magic", "pickle",
                                  "newer_version", "trailing"])
def test_each_corruption_gives_its_own_clear_error(quantized, tmp_path, case):
    _, _, qm = quantized
    data, exc, words = _corrupt_cases(A.encode(qm))[case]
    path = tmp_path / "bad.pgq"
    path.write_bytes(data)
    with pytest.raises(exc, match=words) as info:
        A.load_artifact(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, A.ArtifactError) and isinstance(info.value, ValueError)


def test_loading_never_unpickles(quantized, monkeypatch):
    _, _, qm = quantized
    blob = A.encode(qm)

    def forbidden(*a, **k):
        raise AssertionError("the loader must not unpickle anything")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert len(A.decode(blob).tensors) == len(qm.tensors)


def test_size_table_rows_sum_to_the_file_size(quantized, tmp_path):
    _, _, qm = quantized
    for layout in A.LAYOUTS:
        path = tmp_path / f"{layout}.pgq"
        A.save_artifact(path, qm, layout=layout)
        rows = artifact_size_table(path)
        assert sum(r.bytes for r in rows) == path.stat().st_size
        assert sum(r.params for r in rows if r.group != "lqer") == sum(t.numel for t in qm.tensors)
        names = [r.group for r in rows]
        assert names[0] == "container" and {"tok_emb", "attn.c_q", "mlp.fc", "fp16", "gate", "lqer"} <= set(names)
        text = format_size_table(rows, code_bytes=1234)
        assert f"{path.stat().st_size + 1234:,}" in text and "headroom" in text


def test_over_budget_says_by_how_much_and_which_knob(quantized):
    _, _, qm = quantized
    groups = knob_groups([A._tensor_entry(t) for t in qm.tensors])
    assert groups["mlp"]["k"] == 11.5 and groups["mlp"]["params"] == 3 * 2 * 128 * 64
    assert check_budget(15_000_000, 40_000, groups) == BUDGET_BYTES - 15_040_000
    with pytest.raises(OverBudgetError) as info:
        check_budget(15_990_000, 30_000, groups)
    msg = str(info.value)
    assert "16,020,000 bytes" in msg and "by 20,000 bytes" in msg
    assert "raise mlp k 11.5 ->" in msg and "--quant-mlp-k" in msg and "--quant-attn-k" in msg


def test_int6_matmul_swap_matches_the_dequantized_model(quantized, tmp_path):
    pytest.importorskip("pgolf.kernels.int6_matmul")
    _, _, qm = quantized
    for layout in A.LAYOUTS:
        path = tmp_path / f"{layout}.pgq"
        A.save_artifact(path, qm, layout=layout)
        dense = A.build_model(path)
        swapped = A.build_model(path, int6_matmul=True)
        kinds = {type(m).__name__ for m in swapped.modules()}
        assert "Int6Linear" in kinds
        x = torch.randint(0, CFG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(swapped.forward_logits(x), dense.forward_logits(x), rtol=1e-4, atol=1e-4)


def test_int6_matmul_without_the_kernel_module_is_a_clear_error(quantized, monkeypatch):
    _, _, qm = quantized
    monkeypatch.setitem(sys.modules, "pgolf.kernels.int6_matmul", None)
    with pytest.raises(ConfigError, match="needs pgolf.kernels.int6_matmul"):
        A.build_model(qm, int6_matmul=True)
