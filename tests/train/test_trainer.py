"""End-to-end trainer tests on the synthetic corpus and the real sp1024 shards (CPU, small and fast)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pgolf.data.synthetic import build_default_corpus
from pgolf.model.gpt import GPT
from pgolf.train.config import resolve
from pgolf.train.trainer import TrainingDiverged, train
from pgolf.utils import distributed_session

REPO = Path(__file__).resolve().parents[2]
SMALL_MODEL = dict(model_dim=64, num_heads=4, num_kv_heads=2, mlp_hidden=128, num_layers=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_default_corpus(tmp_path_factory.mktemp("synthetic"), num_train_docs=1500, num_val_docs=60)


# Runs compared bit for bit use one torch thread: with two threads set explicitly, the first run in a process
# can differ from later ones in the last digits (torch's CPU thread pool, not pgolf: one thread never does).
@pytest.fixture
def single_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


bitwise = pytest.mark.usefixtures("single_thread")


def settings(corpus, run_dir, **overrides):
    flags = dict(data_path=corpus["shard_dir"], tokenizer_path=corpus["tokenizer_path"], run_dir=str(run_dir),
                 max_wallclock_seconds=0.0, iterations=4, train_batch_tokens=1024, train_seq_len=128,
                 eval_seq_len=128, val_max_tokens=2048, train_log_every=1, save_checkpoint=False, **SMALL_MODEL)
    flags.update(overrides)
    return resolve("tiny", env={}, flags=flags)


def run(corpus, run_dir, **overrides):
    cfg, model_cfg = settings(corpus, run_dir, **overrides)
    return train(cfg, model_cfg, log=lambda s: None)


def losses(summary):
    return [h["train_loss"] for h in summary["history"]]


@bitwise
def test_same_seed_same_losses_and_other_seed_differs(corpus, tmp_path):
    a = run(corpus, tmp_path / "a", seed=7)
    b = run(corpus, tmp_path / "b", seed=7)
    c = run(corpus, tmp_path / "c", seed=8)
    assert len(losses(a)) == 4
    assert losses(a) == losses(b)
    assert a["val_bpb"] == b["val_bpb"]
    assert losses(a) != losses(c)


@bitwise
def test_compile_warmup_restores_the_initial_state(corpus, tmp_path):
    """Warm-up steps on synthetic tokens must leave no trace: the timed run is identical to a run without them."""
    plain = run(corpus, tmp_path / "plain", seed=3, warmup_steps=0)
    warmed = run(corpus, tmp_path / "warm", seed=3, warmup_steps=2)
    assert losses(plain) == losses(warmed)
    assert plain["val_bpb"] == warmed["val_bpb"]


def test_short_run_beats_the_unigram_entropy(corpus, tmp_path):
    s = run(corpus, tmp_path / "run", iterations=40, train_batch_tokens=2048, val_max_tokens=4096,
            **{k: None for k in SMALL_MODEL})  # the real tiny preset
    assert s["val_bpb"] < corpus["unigram_bpb"], (s["val_bpb"], corpus["unigram_bpb"])
    assert s["val_bpb"] > corpus["entropy_floor_bpb"] - 0.05  # nothing beats the source's entropy (up to sampling)


def test_tiny_preset_on_real_sp1024_shards_lowers_val_bpb(shared_data, tmp_path):
    flags = dict(data_path=str(shared_data / "shards" / "fineweb10B_sp1024"),
                 tokenizer_path=str(shared_data / "tokenizers" / "fineweb_1024_bpe.model"), vocab_size=1024,
                 max_wallclock_seconds=0.0, train_batch_tokens=2048, train_seq_len=256, eval_seq_len=256,
                 val_max_tokens=8192, save_checkpoint=False, train_log_every=10)
    cfg0, m0 = resolve("tiny", env={}, flags=dict(flags, iterations=0, run_dir=str(tmp_path / "init")))
    cfg1, m1 = resolve("tiny", env={}, flags=dict(flags, iterations=25, run_dir=str(tmp_path / "trained")))
    before = train(cfg0, m0, log=lambda s: None)["val_bpb"]
    after = train(cfg1, m1, log=lambda s: None)["val_bpb"]
    assert after < before - 0.3, (before, after)


def test_nonfinite_loss_stops_with_step_and_last_good_values(corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = GPT.loss

    def flaky(self, *a, **k):
        calls["n"] += 1
        out = real(self, *a, **k)
        return out * float("nan") if calls["n"] >= 3 else out

    monkeypatch.setattr(GPT, "forward", flaky)
    with pytest.raises(TrainingDiverged, match=r"non-finite at step 3.*last good values: \{'step': 2"):
        run(corpus, tmp_path / "nan", iterations=5)


def test_wallclock_cap_stops_the_run_and_writes_logs_and_summary(corpus, tmp_path):
    s = run(corpus, tmp_path / "cap", iterations=100000, max_wallclock_seconds=1.5, gptq_reserve_seconds=0.0,
            save_checkpoint=True)
    assert 1 <= s["steps"] < 100000
    assert s["train_time_ms"] >= 1500
    log = (tmp_path / "cap" / "train.log").read_text()
    assert "stopping_early: wallclock_cap" in log
    assert f"step:{s['steps']}/100000 train_loss:" in log and "final val_loss:" in log
    on_disk = json.loads((tmp_path / "cap" / "summary.json").read_text())
    assert on_disk["val_bpb"] == s["val_bpb"] and on_disk["steps"] == s["steps"]
    ckpt = torch.load(tmp_path / "cap" / "final_model.pt", weights_only=True)
    model = GPT(s["model_obj"].config)
    model.load_state_dict(ckpt["model"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), s["model_obj"].state_dict().values()))


def test_loop_switches_on_at_its_training_fraction(corpus, tmp_path):
    s = run(corpus, tmp_path / "loop", iterations=10, loop_activate_frac=0.5)
    assert s["loop_on_step"] == 5


def test_bad_inputs_give_clear_errors(corpus, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="fineweb_train_"):
        run(corpus, tmp_path / "r1", data_path=str(empty))
    with pytest.raises(ValueError, match="vocab"):
        run(corpus, tmp_path / "r2", vocab_size=1024)
    with pytest.raises(ValueError, match="no tokenizer"):
        run(corpus, tmp_path / "r3", tokenizer_path="")
    with pytest.raises(ValueError, match="train-batch-tokens"):
        run(corpus, tmp_path / "r4", train_batch_tokens=1000, loader="sequential")
    with pytest.raises(ValueError, match="train-batch-tokens"):
        run(corpus, tmp_path / "r5", train_batch_tokens=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, corpus, run_dir, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed_session():
        cfg, model_cfg = settings(corpus, run_dir, grad_accum_base=2, loader="packed", seed=11, iterations=3)
        s = train(cfg, model_cfg, log=lambda m: None)
        if rank == 0:
            torch.save({"losses": losses(s), "val_bpb": s["val_bpb"], "state": s["model_obj"].state_dict()}, out)


def test_two_rank_gloo_run_matches_one_rank_with_the_same_global_batch(corpus, tmp_path):
    """World 1 with 2 micro-batches and world 2 with 1 each read the same tokens and must take the same steps."""
    torch.set_num_threads(1)
    cfg, model_cfg = settings(corpus, tmp_path / "one", grad_accum_base=2, loader="packed", seed=11, iterations=3)
    one = train(cfg, model_cfg, log=lambda m: None)
    out = tmp_path / "two.pt"
    mp.start_processes(_rank_main, args=(2, _free_port(), corpus, str(tmp_path / "two"), str(out)), nprocs=2,
                       join=True, start_method="spawn")
    two = torch.load(out, weights_only=True)
    assert two["losses"] == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    assert two["val_bpb"] == pytest.approx(one["val_bpb"], rel=1e-5)
    for name, p in one["model_obj"].state_dict().items():
        torch.testing.assert_close(two["state"][name], p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("preset,count", [("baseline", 17_059_912), ("pr1493", 35_944_536), ("sota", 35_945_671)])
def test_cli_prints_the_exact_record_parameter_counts(preset, count):
    out = subprocess.run([sys.executable, "-m", "pgolf.train", "--preset", preset, "--print-params"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert f"params:{count} " in out


def test_env_names_and_flags_override_the_preset():
    cfg, m = resolve("sota", env={"QK_GAIN_INIT": "5.25", "TRAIN_BATCH_TOKENS": "4096", "NUM_LAYERS": "9",
                                  "MLP_MULT": "3"},
                     flags={"train_batch_tokens": 8192})
    assert m.qk_gain_init == 5.25 and m.num_layers == 9 and m.mlp_hidden == 1536
    assert cfg.train_batch_tokens == 8192  # a flag beats the environment
    assert cfg.ns_coefficients == "polar_express" and cfg.min_lr == 0.10  # sota preset values survive
    with pytest.raises(ValueError, match="unknown preset"):
        resolve("nope", env={})
    with pytest.raises(ValueError, match="cannot read"):
        resolve("sota", env={"NUM_LAYERS": "eleven"})


def test_cli_reports_bad_setting_without_traceback():
    r = subprocess.run([sys.executable, "-m", "pgolf.train", "--preset", "tiny", "--data-path", "/nonexistent",
                        "--tokenizer-path", "/nonexistent.model"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1
    assert "pgolf-train: error:" in r.stderr and "Traceback" not in r.stderr


def test_math_sanity_of_summary(corpus, tmp_path):
    s = run(corpus, tmp_path / "m")
    assert s["val_loss"] / math.log(2) * s["val"]["tokens"] / s["val"]["bytes"] == pytest.approx(s["val_bpb"])


def _rank_skewed_clock(rank, world, port, corpus, run_dir, out_dir):
    """Rank 1's clock runs ahead; the loop switch must still happen at the same step on both ranks."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pgolf.train import schedule

    if rank == 1:
        real = schedule.WallClock.frac
        schedule.WallClock.frac = property(lambda self: real.fget(self) + 0.3)
    with distributed_session():
        cfg, model_cfg = settings(corpus, run_dir, grad_accum_base=2, seed=11, iterations=6,
                                  max_wallclock_seconds=3600.0, gptq_reserve_seconds=0.0, loop_activate_frac=0.2)
        s = train(cfg, model_cfg, log=lambda m: None)
        torch.save({"loop_on_step": s["loop_on_step"]}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ranks_with_skewed_clocks_switch_the_loop_at_the_same_step(corpus, tmp_path):
    mp.start_processes(_rank_skewed_clock, args=(2, _free_port(), corpus, str(tmp_path / "run"), str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    steps = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["loop_on_step"] for r in (0, 1)]
    assert steps[0] is not None and steps[0] == steps[1]


@bitwise
def test_doc_isolated_eval_changes_only_the_evaluation(corpus, tmp_path):
    plain = run(corpus, tmp_path / "plain", seed=5, quant_method="none")
    iso = run(corpus, tmp_path / "iso", seed=5, quant_method="none", eval_doc_isolated=True)
    assert losses(plain) == losses(iso)  # training is the same
    assert iso["val"]["doc_isolated"] is True and plain["val"]["doc_isolated"] is False
    assert iso["val"]["tokens"] == plain["val"]["tokens"]
    assert iso["val_bpb"] != plain["val_bpb"]  # windows hold several documents, so isolation changes the scores
