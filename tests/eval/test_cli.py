"""``python -m pgolf.eval --artifact``: val_bpb of an artifact from the file alone, in the challenge's line format."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from pgolf.eval.cli import evaluate_artifact, main
from tests.quant.helpers import REPO, corpus, pgolf_run

LINE = re.compile(r"^final_quant_roundtrip_exact val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})$", re.M)
SLIDING = re.compile(r"^final_quant_sliding_window_exact val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})$", re.M)


@pytest.fixture(autouse=True)
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run():
    run_dir, _ = pgolf_run()
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def _args(run_dir, *extra):
    c = corpus()
    return ["--artifact", str(run_dir / "final_model.pgq"), "--data", c["shard_dir"], "--tokenizer",
            c["tokenizer_path"], "--val-max-tokens", "1024", *extra]


def test_cli_prints_plain_and_sliding_val_bpb_equal_to_the_runs(run, capsys):
    run_dir, s = run
    assert main(_args(run_dir, "--sliding", "--stride", "64")) == 0
    out = capsys.readouterr().out
    plain, sliding = LINE.search(out), SLIDING.search(out)
    assert plain and sliding, out
    assert plain.group(2) == f"{s['artifact']['val_bpb']:.8f}"
    assert sliding.group(2) == f"{s['artifact']['sliding']['val_bpb']:.8f}"
    assert re.search(r"^final_quant_roundtrip val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} eval_time:\d+ms$", out, re.M)


def test_int6_matmul_path_equals_the_dequantized_path(run):
    pytest.importorskip("pgolf.kernels.int6_matmul")
    run_dir, _ = run
    c = corpus()
    kw = dict(val_max_tokens=1024)
    dense = evaluate_artifact(str(run_dir / "final_model.pgq"), c["shard_dir"], c["tokenizer_path"], **kw)
    fast = evaluate_artifact(str(run_dir / "final_model.pgq"), c["shard_dir"], c["tokenizer_path"], int6_matmul=True,
                             **kw)
    assert any(type(m).__name__ == "Int6Linear" for m in fast["model"].modules())
    assert fast["plain"].val_bpb == pytest.approx(dense["plain"].val_bpb, rel=1e-5)


def test_cli_errors_are_clear_without_traceback(run, tmp_path):
    run_dir, _ = run
    bad = tmp_path / "bad.pgq"
    blob = bytearray((run_dir / "final_model.pgq").read_bytes())
    blob[-10] ^= 1
    bad.write_bytes(bytes(blob))
    c = corpus()
    r = subprocess.run([sys.executable, "-m", "pgolf.eval", "--artifact", str(bad), "--data", c["shard_dir"],
                        "--tokenizer", c["tokenizer_path"]], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "pgolf.eval: error:" in r.stderr and "checksum mismatch" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_int6_kernel_module_is_a_clear_error(run, monkeypatch, capsys):
    run_dir, _ = run
    monkeypatch.setitem(sys.modules, "pgolf.kernels.int6_matmul", None)
    assert main(_args(run_dir, "--int6-matmul")) == 2
    assert "needs pgolf.kernels.int6_matmul" in capsys.readouterr().err


TTT_LINE = re.compile(r"^final_ttt_chunk_exact val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})$", re.M)


def test_cli_ttt_prints_a_passing_report_whose_numbers_match_the_run(run, capsys):
    run_dir, s = run
    sets = ["--ttt-set", "chunk_tokens=256", "--ttt-set", "epochs=1", "--ttt-set", "window=128",
            "--ttt-set", "stride=64", "--ttt-set", "seq_len=128"]
    assert main(_args(run_dir, "--seq-len", "128", "--ttt", "chunk", *sets)) == 0
    out = capsys.readouterr().out
    ttt = TTT_LINE.search(out)
    assert ttt, out
    assert "overall: PASS" in out
    scored = re.search(r"tokens scored ([\d,]+) = validation tokens ([\d,]+); times scored min 1 max 1", out)
    assert scored and scored.group(1) == scored.group(2), out  # every validation target scored exactly once
    assert 512 <= int(scored.group(1).replace(",", "")) <= 1024  # the capped validation stream
    assert f"artifact {(run_dir / 'final_model.pgq').stat().st_size:,}" in out
    assert f"code {s['artifact']['bytes_code']:,}" in out
    assert f"{s['train_time_ms'] / 1000:.1f} / 600" in out


def test_cli_ttt_rejects_a_bad_setting(run, capsys):
    run_dir, _ = run
    assert main(_args(run_dir, "--ttt", "chunk", "--ttt-set", "no_such_knob=1")) == 2
    assert "unknown TTT settings" in capsys.readouterr().err


def test_auto_batch_and_cuda_graph_flags(run, capsys):
    run_dir, s = run
    assert main(_args(run_dir, "--sliding", "--batch-seqs", "auto")) == 0  # CPU: the default batch
    assert SLIDING.search(capsys.readouterr().out).group(2) == f"{s['artifact']['sliding']['val_bpb']:.8f}"
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        main(_args(run_dir, "--batch-seqs", "many"))
    assert e.value.code == 2 and "--batch-seqs: cannot read 'many' as an integer or 'auto'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(_args(run_dir, "--sliding", "--cuda-graphs")) == 2
        err = capsys.readouterr().err
        assert "--cuda-graphs needs a CUDA GPU" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["pr490", "pr1148", "pr1406", "pr1499", "pr1550"])
def test_every_recipe_runs_legally_on_the_built_in_corpus(run, capsys, name):
    """Each founding submission's legal eval pipeline, end to end on the demo artifact: the report passes."""
    run_dir, _ = run
    small = ["--ttt-set", "chunk_tokens=256", "--ttt-set", "micro_batch_seqs=1"] if name != "pr1499" else \
        ["--ttt-set", "batch_windows=4", "--ttt-set", "ngram_prefill_tokens=20000"]
    assert main(_args(run_dir, "--recipe", name, *small)) == 0
    out = capsys.readouterr().out
    assert "overall: PASS" in out and "3 score before update     [pass]" in out
    assert re.search(r"^final_ttt_\w+_exact val_loss:\d+\.\d+ val_bpb:\d+\.\d+$", out, re.M)


def test_recipe_list_and_bad_recipes(run, capsys):
    run_dir, _ = run
    assert main(["--recipe", "list"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in ("pr490", "pr1148", "pr1406", "pr1499", "pr1550")) and "study mode" in out
    assert main(_args(run_dir, "--recipe", "pr9999")) == 2
    assert "--recipe 'pr9999' is not known" in capsys.readouterr().err
    assert main(_args(run_dir, "--recipe", "pr1148", "--ttt", "lora")) == 2
    assert "runs --ttt chunk" in capsys.readouterr().err


def test_prequant_ttt_runs_only_as_a_study_and_fails_condition_3(run, tmp_path, capsys):
    """#1550's illegal pre-quant TTT, measured openly: the legal score, the study's, the gain; the report FAILs
    condition 3 and the study folder is marked as a study. A normal run refuses it by name."""
    run_dir, _ = run
    ck = str(run_dir / "final_model.pt")
    assert main(_args(run_dir, "--checkpoint", ck)) == 2
    assert "illegal (condition 3" in capsys.readouterr().err
    out = tmp_path / "study"
    assert main(_args(run_dir, "--study", "prequant-ttt", "--checkpoint", ck, "--recipe", "pr1550",
                      "--study-set", "epochs=2", "--study-set", "lr=3e-3", "--study-out", str(out))) == 0
    text = capsys.readouterr().out
    legal = float(re.search(r"^legal: .* val_bpb:(\d+\.\d+)$", text, re.M).group(1))
    study = float(re.search(r"^study: .* val_bpb:(\d+\.\d+)$", text, re.M).group(1))
    gain = float(re.search(r"^gain of the illegal variant over the legal score: ([+-]\d+\.\d+) bpb", text, re.M)
                 .group(1))
    assert abs(gain - (legal - study)) < 1e-6 and study < legal  # fitting the validation text helps, illegally
    assert "3 score before update     [FAIL] STUDY RUN" in text and "overall: NOT PASSING" in text
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "study" and s["record"] is False and s["study"]["gain_bpb"] == pytest.approx(gain, abs=1e-6)
    assert (out / "final_model.pgq").stat().st_size == s["artifact"]["bytes_model"]
    assert main(_args(run_dir, "--study", "prequant-ttt", "--checkpoint", ck, "--study-out", str(out))) != 0
    err = capsys.readouterr().err
    assert "--study-out" in err and "--force" in err  # never overwritten without --force
    # pgolf-pack packs a study only as a non-record submission, labelled so
    from pgolf.quant.pack import pack

    sub = pack(out, tmp_path / "packed", allow_over_budget=True)
    assert sub["track"] == "non-record" and sub["record"] is False and "NON-RECORD STUDY" in sub["name_note"]
    assert sub["val_bpb"] == pytest.approx(study, abs=1e-8)
    assert (tmp_path / "packed" / "README.md").read_text().splitlines()[2].startswith("**NON-RECORD STUDY")


def test_cli_counts_bytes_from_the_data_folders_sidecar(run, tmp_path, capsys):
    """A sidecar of twice the tokenizer's counts halves val_bpb and leaves val_loss as it was."""
    from pgolf.data.shards import find_shards, load_tokens, read_shard, write_shard
    from pgolf.data.tokenizer import Tokenizer, count_bytes

    run_dir, s = run
    c = corpus()
    files = find_shards(c["shard_dir"], "val")
    stream = load_tokens(files)
    tables = Tokenizer(c["tokenizer_path"]).byte_tables()
    counted = torch.cat([torch.zeros(1, dtype=torch.int64), count_bytes(stream[:-1], stream[1:], tables)])
    at = 0
    for f in files:
        n = read_shard(f).shape[0]
        write_shard(tmp_path / f.name, read_shard(f))
        write_shard(tmp_path / f.name.replace("fineweb_val_", "fineweb_val_bytes_"), 2 * counted[at:at + n].numpy())
        at += n
    args = _args(run_dir)
    args[args.index("--data") + 1] = str(tmp_path)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "val_bytes_from:sidecar" in out
    loss, bpb = LINE.search(out).groups()
    assert loss == f"{s['artifact']['val_loss']:.8f}"
    assert float(bpb) == pytest.approx(s["artifact"]["val_bpb"] / 2, abs=1e-8)
