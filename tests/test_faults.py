"""Bad input and faults thrown at the trainer, eval, quant, pack, prepare and bench check: one test per class.

1. silent wrong results  2. results overwritten or mixed  3. the wrong thing packed  4. checked too late, work lost
5. tracebacks instead of messages. Every command is run in-process through its ``main``: a user error must come
back as an exit status with ``error:`` and the flag, variable or file by name on stderr; an exception escaping
``main`` is what a user would see as a traceback, and :func:`cli` reports it as such.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.quant.helpers import RUN_FLAGS, corpus, pgolf_run

FLAGS = dict(RUN_FLAGS, warmup_steps=0, eval_stride=0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def cli(main, argv, capsys, **kw):
    """(exit status, stdout, stderr) of ``main(argv)``; an escaping exception becomes 'TRACEBACK ...'."""
    try:
        rc = main(argv, **kw)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    except BaseException as e:  # what a user would see as a traceback
        rc = f"TRACEBACK {type(e).__name__}: {e}"
    out, err = capsys.readouterr()
    return rc, out, err


def named_error(result, *words, code=None):
    """Assert a clean failure: a non-zero status (``code`` if given) and an error naming every one of ``words``."""
    rc, _, err = result
    assert isinstance(rc, int) and rc != 0, f"not a clean failure: {rc!r}\n{err}"
    assert code is None or rc == code, (rc, err)
    assert "error:" in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def train_argv(run_dir, **kw) -> list[str]:
    c = corpus()
    flags = dict(FLAGS, data_path=c["shard_dir"], tokenizer_path=c["tokenizer_path"], run_dir=str(run_dir))
    flags.update(kw)
    return ["--preset", "tiny"] + [a for k, v in flags.items() for a in ("--" + k.replace("_", "-"), str(v))]


def eval_argv(artifact, *extra, tokenizer=None) -> list[str]:
    c = corpus()
    return ["--artifact", str(artifact), "--data", c["shard_dir"], "--tokenizer", str(tokenizer or c["tokenizer_path"]),
            "--val-max-tokens", "256", *extra]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run():
    run_dir, _ = pgolf_run()
    return run_dir


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


# ---- 1. silent wrong results ------------------------------------------------------------------------------------

def test_silent_wrong_results_are_refused_by_name(finished_run, tmp_path, capsys):
    from pgolf.bench import check as bench_check
    from pgolf.data.prepare import train_tokenizer
    from pgolf.data.synthetic import MarkovSource
    from pgolf.eval.cli import main as eval_main
    from pgolf.train.cli import main as train_main
    from tests.bench.helpers import rec

    art = finished_run / "final_model.pgq"
    # another tokenizer with the same vocab size: the artifact's fingerprint refuses it
    other = train_tokenizer(MarkovSource(seed=1).sample_documents(300, 1), 512, tmp_path / "other")
    named_error(cli(eval_main, eval_argv(art, tokenizer=other), capsys), "tokenizer mismatch", str(other))
    # values that used to fall back to something else without a word
    named_error(cli(eval_main, eval_argv(art, "--val-max-tokens", "-1"), capsys), "--val-max-tokens")
    named_error(cli(eval_main, eval_argv(art, "--sliding", "--stride", "0"), capsys), "--stride")
    named_error(cli(eval_main, eval_argv(art, "--seq-len", "0"), capsys), "--seq-len")
    named_error(cli(eval_main, eval_argv(art, "--stride", "32"), capsys), "--stride")  # ignored without --sliding
    for flag, value in (("iterations", "-1"), ("device", "bogus"), ("compile", "maybe"), ("loader", "random")):
        run_dir = tmp_path / f"bad_{flag}"
        named_error(cli(train_main, train_argv(run_dir, **{flag: value}), capsys), "--" + flag, value)
        assert not run_dir.exists()  # refused before anything was written
    # pgolf-bench check with nothing valid to compare, or about to judge the wrong pair
    h = tmp_path / "history.jsonl"
    assert bench_check.run_check(str(tmp_path / "histroy.jsonl"), "cpu") == 2  # a mistyped --history
    h.write_text("garbage\n{not json\n")
    assert bench_check.run_check(str(h), "cpu") == 2
    runs = [rec(c, f"2026-11-0{i}T00:00:00Z", {"x/ms": (100.0 + i, "lower")}, kind="cpu")
            for i, c in enumerate(("aaaaaaa1", "bbbbbbb2", "ccccccc3"), 1)]
    h.write_text("".join(json.dumps(r) + "\n" for r in runs[:2]) + json.dumps(runs[2])[:40] + "\n")
    assert bench_check.run_check(str(h), "cpu") == 2  # the newest record is truncated: not the older pair
    assert "truncated" in capsys.readouterr().err
    h.write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert bench_check.run_check(str(h), "cpu", base_rev="0123456") == 2  # an unknown --base
    assert bench_check.run_check(str(h), "cpu") == 0
    out = capsys.readouterr().out
    assert "newest: history line 3" in out and "base:   history line 2" in out  # which two records it compared


# ---- 2. results overwritten or mixed ----------------------------------------------------------------------------

def test_existing_outputs_are_refused_and_replaced_whole_only_with_force(finished_run, tmp_path, capsys):
    from pgolf.data.prepare import main as prepare_main
    from pgolf.quant.cli import main as quant_main
    from pgolf.quant.pack import main as pack_main
    from pgolf.train.cli import main as train_main

    # a run dir (or a repeated --run-id) is never trained into again; --force replaces its outputs, log not appended
    run_dir = copy_run(finished_run, tmp_path / "run")
    before = files_of(run_dir)
    named_error(cli(train_main, train_argv(run_dir, iterations=1), capsys), "--run-dir", str(run_dir), "--force")
    assert files_of(run_dir) == before
    assert cli(train_main, train_argv(run_dir, iterations=1, quant_method="none") + ["--force", "1"], capsys)[0] == 0
    log = (run_dir / "train.log").read_text()
    assert log.count("run_id:") == 1 and not (run_dir / "final_model.pgq").exists()  # the old run's outputs are gone
    # python -m pgolf.quant --out over an existing artifact
    art = tmp_path / "existing.pgq"
    art.write_bytes((finished_run / "final_model.pgq").read_bytes())
    c = corpus()
    named_error(cli(quant_main, ["--checkpoint", str(finished_run / "final_model.pt"), "--preset", "tiny",
                                 "--data-path", c["shard_dir"], "--out", str(art), "--quant-method", "rtn"], capsys),
                "--out", str(art), "--force")
    assert art.read_bytes() == (finished_run / "final_model.pgq").read_bytes()
    # pgolf-pack into an existing folder: refused; --force replaces the folder whole (no stale file survives)
    out = tmp_path / "sub"
    out.mkdir()
    (out / "README.md").write_text("my own words")
    (out / "train_seed999.log").write_text("another run's log")
    named_error(cli(pack_main, [str(finished_run), "--out", str(out)], capsys), "--out", str(out))
    assert (out / "README.md").read_text() == "my own words"
    assert cli(pack_main, [str(finished_run), "--out", str(out), "--force"], capsys)[0] == 0
    assert not (out / "train_seed999.log").exists() and "my own words" not in (out / "README.md").read_text()
    # pgolf-pack RUN --out RUN (or inside it): refused, the run dir untouched
    before = files_of(finished_run)
    for target in (finished_run, finished_run / "sub"):
        named_error(cli(pack_main, [str(finished_run), "--out", str(target), "--force"], capsys), "--out", "run folder")
    assert files_of(finished_run) == before
    # a failed prepare over an existing output folder leaves the old folder as it was (no mix of old and new)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document number {i} " * 5}) + "\n" for i in range(300)))
    prep = tmp_path / "prepared"
    argv = ["--input", str(docs), "--out", str(prep), "--tokenizer", c["tokenizer_path"], "--num-val-docs", "3",
            "--shard-tokens", "4000"]
    assert not str(cli(prepare_main, argv, capsys)[0]).startswith("TRACEBACK")
    old = files_of(prep)
    named_error(cli(prepare_main, argv, capsys), "--out", str(prep), "--force")
    docs.write_text(docs.read_text() + "{broken\n")  # the shards of the first 256 documents are written before it
    named_error(cli(prepare_main, argv + ["--force", "--shard-tokens", "2000"], capsys), f"{docs}:301")
    assert files_of(prep) == old and [p.name for p in tmp_path.iterdir() if p.name.startswith(".prepared")] == []


# ---- 3. the wrong thing packed ----------------------------------------------------------------------------------

def test_pack_uses_and_verifies_the_artifact_inside_the_run_dir(finished_run, tmp_path, capsys):
    from pgolf.quant.pack import main as pack_main
    from pgolf.quant.quantize import QuantSettings, quantize_state

    # a copied run dir without its artifact: the summary's absolute path still names the original, never used
    copy = copy_run(finished_run, tmp_path / "copy")
    (copy / "final_model.pgq").unlink()
    named_error(cli(pack_main, [str(copy), "--out", str(tmp_path / "a")], capsys), str(copy / "final_model.pgq"))
    assert not (tmp_path / "a").exists()
    # a re-quantized (or replaced) artifact: its size / SHA-256 is not what the run recorded and scored
    requant = copy_run(finished_run, tmp_path / "requant")
    ck = torch.load(finished_run / "final_model.pt", weights_only=True)
    qm = quantize_state(ck["model"], None, QuantSettings(method="rtn", mlp_k=30.0, passthrough_max=1024),
                        model_config=ck["config"])
    from pgolf.quant.artifact import save_artifact

    save_artifact(requant / "final_model.pgq", qm)
    named_error(cli(pack_main, [str(requant), "--out", str(tmp_path / "b")], capsys), "not the artifact this run")
    # the tokenizer / model config the artifact records must be the run's
    other_tok = copy_run(finished_run, tmp_path / "othertok")
    s = json.loads((other_tok / "summary.json").read_text())
    s["tokenizer"] = dict(s["tokenizer"], sha256="0" * 64)
    (other_tok / "summary.json").write_text(json.dumps(s))
    named_error(cli(pack_main, [str(other_tok), "--out", str(tmp_path / "c")], capsys), "tokenizer")
    # a run that did not finish (its evals pending) is not packed
    pending = copy_run(finished_run, tmp_path / "pending")
    s = json.loads((pending / "summary.json").read_text())
    s["status"] = "trained"
    (pending / "summary.json").write_text(json.dumps(s))
    named_error(cli(pack_main, [str(pending), "--out", str(tmp_path / "d")], capsys), "not complete")
    # a complete copy packs its own artifact, byte for byte
    good = copy_run(finished_run, tmp_path / "good")
    assert cli(pack_main, [str(good), "--out", str(tmp_path / "e")], capsys)[0] == 0
    assert (tmp_path / "e" / "final_model.pgq").read_bytes() == (good / "final_model.pgq").read_bytes()
    sub = json.loads((tmp_path / "e" / "submission.json").read_text())
    assert sub["val_bpb"] == s["artifact"]["val_bpb"]
    assert s["artifact"]["sha256"] == hashlib.sha256((good / "final_model.pgq").read_bytes()).hexdigest()


# ---- 4. checked too late, work lost -----------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,words", [("eval_stride", "512", "--eval-stride"),
                                              ("eval_batch_seqs", "0", "--eval-batch-seqs"),
                                              ("gptq_block_size", "0", "--gptq-block-size"),
                                              ("gptq_calibration_tokens", "100", "--gptq-calibration-tokens"),
                                              ("lqer_top", "0", "--lqer-top")])
def test_settings_used_after_training_are_checked_before_it(tmp_path, capsys, flag, value, words):
    from pgolf.train.cli import main as train_main

    extra = {"lqer_rank": "2"} if flag == "lqer_top" else {}
    result = cli(train_main, train_argv(tmp_path / "run", **{flag: value}, **extra), capsys)
    named_error(result, words)
    assert "step:1/" not in result[1] and not (tmp_path / "run").exists()


def test_trained_weights_survive_a_later_failure_with_the_way_to_finish(tmp_path, capsys, monkeypatch):
    import pgolf.train.trainer as trainer
    from pgolf.model.gpt import GPT
    from pgolf.quant.cli import main as quant_main
    from pgolf.train.cli import main as train_main

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "evaluate", ctrl_c)  # Ctrl-C in the final evals
    run_dir = tmp_path / "run"
    rc, out, err = cli(train_main, train_argv(run_dir), capsys)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["failed_phase"] == "final_evals" and s["steps"] == FLAGS["iterations"]
    ck = torch.load(run_dir / "final_model.pt", weights_only=True)
    GPT(trainer.GPTConfig.from_dict(ck["config"])).load_state_dict(ck["model"])  # the trained weights, whole
    assert "FAILED in phase final_evals: interrupted" in (run_dir / "train.log").read_text()
    quant = next(line for line in s["resume"] if "pgolf.quant" in line)
    argv = shlex.split(quant)[3:]
    result = cli(quant_main, argv, capsys)
    assert result[0] == 0 and (run_dir / "final_model.pgq").is_file(), (quant, result)  # the way to finish
    # a full disk at the checkpoint: the summary is there first and says what happened
    monkeypatch.undo()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "full" / "final_model.pt"))

    monkeypatch.setattr(trainer, "atomic_torch_save", full)
    named_error(cli(train_main, train_argv(tmp_path / "full"), capsys), "No space left on device")
    s = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert s["status"] == "failed" and s["failed_phase"] == "save" and "No space" in s["error"]


def test_a_full_disk_during_pack_leaves_no_half_written_folder(finished_run, tmp_path, capsys, monkeypatch):
    from pgolf.quant.pack import main as pack_main

    real = Path.write_bytes

    def full(self, data):
        if self.suffix == ".pgq":
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    named_error(cli(pack_main, [str(finished_run), "--out", str(tmp_path / "sub")], capsys), "No space left")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temp folder


# ---- 5. tracebacks instead of messages --------------------------------------------------------------------------

def test_user_errors_are_named_without_a_traceback(finished_run, tmp_path, capsys, monkeypatch):
    from pgolf.data.prepare import main as prepare_main
    from pgolf.data.shards import write_shard
    from pgolf.eval.cli import main as eval_main
    from pgolf.quant.cli import main as quant_main
    from pgolf.quant.pack import main as pack_main
    from pgolf.train.cli import main as train_main

    c = corpus()
    art = finished_run / "final_model.pgq"
    named_error(cli(eval_main, eval_argv(finished_run), capsys), str(finished_run), "folder")
    named_error(cli(train_main, train_argv(tmp_path / "r", num_layers="abc"), capsys), "--num-layers", "'abc'")
    assert "<lambda>" not in capsys.readouterr().err
    named_error(cli(train_main, train_argv(tmp_path / "r", betas="0.9"), capsys), "--betas")
    monkeypatch.setenv("MLP_MULT", "abc")
    named_error(cli(train_main, train_argv(tmp_path / "r"), capsys), "MLP_MULT")
    monkeypatch.delenv("MLP_MULT")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    named_error(cli(train_main, train_argv(tmp_path / "r", device="cuda"), capsys), "--device", "CUDA")
    monkeypatch.undo()
    # a run dir that cannot be written (a file where a folder should be; a read-only folder)
    (tmp_path / "afile").write_text("x")
    named_error(cli(train_main, train_argv(tmp_path / "afile" / "run"), capsys), "--run-dir")
    import tempfile

    def read_only(*a, **k):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    named_error(cli(train_main, train_argv(tmp_path / "ro" / "run"), capsys), "--run-dir", "Read-only")
    monkeypatch.undo()
    assert not (tmp_path / "r").exists() and not (tmp_path / "ro").exists()
    # a corrupt summary.json
    bad = copy_run(finished_run, tmp_path / "corrupt")
    (bad / "summary.json").write_text('{"run_id": ')
    named_error(cli(pack_main, [str(bad), "--out", str(tmp_path / "p")], capsys), str(bad / "summary.json"))
    named_error(cli(eval_main, eval_argv(bad / "final_model.pgq", "--ttt", "chunk"), capsys),
                str(bad / "summary.json"))
    named_error(cli(eval_main, eval_argv(art, "--ttt", "chunk", "--ttt-set", "epochs=abc"), capsys), "epochs")
    # a .pgq or a truncated .pt as --checkpoint
    quant = ["--preset", "tiny", "--data-path", c["shard_dir"], "--quant-method", "rtn", "--out"]
    named_error(cli(quant_main, ["--checkpoint", str(art)] + quant + [str(tmp_path / "q1.pgq")], capsys), "artifact")
    cut = tmp_path / "cut.pt"
    cut.write_bytes((finished_run / "final_model.pt").read_bytes()[:5000])
    named_error(cli(quant_main, ["--checkpoint", str(cut)] + quant + [str(tmp_path / "q2.pgq")], capsys), str(cut))
    # a token id >= vocab in a train shard: named file and position, in train.log too
    data = tmp_path / "data"
    shutil.copytree(c["shard_dir"], data)
    train_file = next(data.glob("fineweb_train_*.bin"))
    tokens = np.fromfile(train_file, dtype="<u2", offset=1024).astype(np.int64)
    tokens[7] = 600  # vocab 512
    write_shard(train_file, tokens)
    run_dir = tmp_path / "badtok"
    result = cli(train_main, train_argv(run_dir, data_path=str(data)), capsys)
    named_error(result, str(train_file), "position 7", "600")
    assert "FAILED in phase train" in (run_dir / "train.log").read_text()
    # every prepare error
    docs = tmp_path / "d.jsonl"
    docs.write_text('{"text": "a b c"}\n{"text": "d e"}\n')
    csv = tmp_path / "d.csv"
    csv.write_text("a")
    base = ["--out", str(tmp_path / "o"), "--tokenizer", c["tokenizer_path"]]
    for src, argv, words in ((tmp_path / "missing.jsonl", [], ("--input", "does not exist")),
                             (csv, [], ("--input", "unsupported")),
                             (docs, ["--num-val-docs", "5"], ("--num-val-docs", "none for training")),
                             (docs, ["--shard-tokens", "0"], ("--shard-tokens",)),
                             (docs, ["--max-sentences", "0"], ("--max-sentences",))):
        named_error(cli(prepare_main, ["--input", str(src)] + base + argv, capsys), *words)
    named_error(cli(prepare_main, ["--input", str(docs), "--out", str(tmp_path / "o"), "--train-tokenizer",
                                   "--vocab-size", "0"], capsys), "--vocab-size")
    named_error(cli(prepare_main, ["--input", str(docs), "--out", str(tmp_path / "o"), "--tokenizer",
                                   str(tmp_path / "nope.model")], capsys), "nope.model")
    assert not (tmp_path / "o").exists()
