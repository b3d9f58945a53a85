"""``pgolf-bench eval``: the CPU smoke run, the artifact round trip and the projection arithmetic."""

import json

import pytest
import torch

from pgolf.bench import evalbench
from pgolf.bench.cli import main
from pgolf.bench.history import read_history
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT


def test_eval_tiny_smoke_cli(tmp_path, capsys, one_thread):
    hist, out = tmp_path / "h.jsonl", tmp_path / "eval.json"
    rc = main(["eval", "--preset", "tiny", "--smoke", "--no-roundtrip", "--history", str(hist), "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    res = json.loads(out.read_text())["result"]
    assert res["full_tokens"] == 40_540_160 and "40,540,160" in text
    for part in ("plain", "sliding"):
        assert res[part]["seconds"] > 0 and res[part]["projected_s"] > 0 and res[part]["windows"] > 0
    # 1,024 random targets, window 128 stride 32: 29 windows, as the sliding plan says
    assert res["sliding"]["windows"] == evalbench._count_windows(1024, 128, 32) == 29
    t = res["ttt"]
    assert "projected_s" in t and t["score_projected_s"] > 0 and t["train_projected_s"] > 0
    p = res["projection"]
    assert p["total_s"] == pytest.approx(sum(v for v in p["parts"].values() if v is not None))
    assert p["parts"]["roundtrip"] is None and p["budget_s"] == 600.0
    [rec] = read_history(hist)
    assert rec["suite"] == "eval" and rec["metrics"]["eval/tiny/projected_total_s"]["better"] == "lower"
    # the head at one row per scored token; the full-head path for comparison, same score
    from pgolf.train.config import resolve

    f = res["flops"]
    tiny = resolve("tiny", env={}, flags={})[0]
    assert (f["window"], f["stride"]) == (tiny.eval_seq_len, tiny.eval_stride or 64)  # the preset's, not smoke's
    rows = tiny.eval_seq_len / (tiny.eval_stride or 64)
    assert f["head_rows_per_scored_token"] == 1 and f["head_rows_per_scored_token_full"] == rows
    assert f["head_full"] == pytest.approx(rows * f["head"], rel=1e-6) and f["trunk"] > 0 and 0 < f["saving"] < 1
    old = res["sliding_full_head"]
    assert old["tokens"] == res["sliding"]["tokens"] and old["val_bpb"] == pytest.approx(res["sliding"]["val_bpb"],
                                                                                           abs=1e-6)
    assert "FLOPs per scored token" in text and "sliding, full head" in text
    assert rec["metrics"]["eval/tiny/head_flops_per_scored_token"]["value"] == f["head"]


def test_flop_count_of_the_sota_head_is_one_row():
    """Counted on the real scoring path: the sota head + softcapped CE for one scored row is 2·V·d multiply-adds
    (V = 8192, d = 512), 32 times that on the full-head path at window 2048 / stride 64."""
    from pgolf.bench.evalflops import flops_per_scored_token
    from pgolf.train.config import resolve

    _, cfg = resolve("sota", env={}, flags={})
    model = GPT(GPTConfig(**{**cfg.to_dict(), "num_layers": 1, "num_loops": 0, "parallel_start": 0,
                             "xsa_last_n": 1}))
    tables = evalbench.load_tokens(cfg.vocab_size, 300, 64)[1]
    f = flops_per_scored_token(model, tables, window=256, stride=64)
    assert f["head"] == 2 * 8192 * 512 and f["head_full"] == 4 * f["head"]
    assert f["trunk"] > 0 and f["head_rows_per_scored_token_full"] == 4


def test_window_counts_match_the_records():
    # reference-stack 5.2: sp8192 has about 633 k windows of 2048 at stride 64
    n = evalbench._count_windows(40_540_160, 2048, 64)
    assert 630_000 < n < 636_000


def _small_model():
    cfg = GPTConfig(vocab_size=128, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, mlp_hidden=320,
                    num_loops=0, xsa_last_n=2, parallel_start=1)
    torch.manual_seed(0)
    return GPT(cfg)


def test_roundtrip_rebuilds_a_close_model():
    model = _small_model()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    rt, rebuilt = evalbench.roundtrip(model, torch.device("cpu"))
    assert rt["bytes"] > 0 and rt["seconds"] >= rt["unpack_s"] >= 0
    assert set(rebuilt.state_dict()) == set(ref)
    for k, v in rebuilt.state_dict().items():
        err = (v.float() - ref[k].float()).abs().max()
        assert err <= 0.05 * ref[k].float().abs().max() + 1e-3, k


def test_standin_pack_unpack_is_per_row_int8():
    model = _small_model()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    state["big"] = torch.randn(260, 256)                 # > 65,536 values: stored int8 per row
    back = evalbench._standin_unpack(evalbench._standin_pack(state), state, torch.device("cpu"))
    scale = state["big"].abs().amax(dim=1, keepdim=True) / 127
    # half a step of rounding, plus up to 127 steps of the fp16 rounding of the scale (2^-11 relative)
    assert ((back["big"] - state["big"]).abs() <= scale * (0.5 + 127 * 2 ** -11) + 1e-6).all()
    assert torch.allclose(back["tok_emb.weight"], state["tok_emb.weight"].half().float())


def test_synthetic_tokens_when_no_data(tmp_path):
    toks, tables, desc = evalbench.load_tokens(512, 300, 64, data_path=str(tmp_path / "nothing"))
    assert toks.numel() == 301 and "random tokens" in desc and tables.vocab_size == 512


def test_load_artifact_reads_checkpoints_and_artifacts(tmp_path):
    model = _small_model()
    ck = tmp_path / "final_model.pt"
    torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, ck)
    loaded, desc = evalbench.load_artifact(str(ck), torch.device("cpu"))
    assert desc.startswith("checkpoint") and torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(Exception):
        evalbench.load_artifact(str(tmp_path / "junk.pt"), torch.device("cpu"))
    artifact = pytest.importorskip("pgolf.quant.artifact")
    quantize = pytest.importorskip("pgolf.quant.quantize")
    qm = quantize.quantize_state({k: v.detach() for k, v in model.state_dict().items()}, None,
                                 quantize.QuantSettings(method="rtn"), model_config=model.config.to_dict())
    artifact.save_artifact(tmp_path / "model.pgolf", qm)
    rebuilt, desc = evalbench.load_artifact(str(tmp_path / "model.pgolf"), torch.device("cpu"))
    assert desc.startswith("artifact") and set(rebuilt.state_dict()) == set(model.state_dict())
