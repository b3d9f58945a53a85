"""pgolf-pack: the submission folder, and its train_gpt.py reproducing the run with no pgolf installed."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf.quant import bundle
from pgolf.quant.pack import main as pack_main
from pgolf.quant.size import BUDGET_BYTES, artifact_size_table
from tests.quant.helpers import REPO, SEED, child_env, corpus, exact_lines, pgolf_run, workdir


def _site_dirs() -> str:
    """The folders holding torch, numpy, sentencepiece, brotli and triton (and only site-packages, never REPO)."""
    import brotli
    import numpy
    import sentencepiece
    import torch
    import triton

    dirs = []
    for m in (torch, numpy, sentencepiece, brotli, triton):
        d = str(Path(m.__file__).resolve().parent.parent) if m.__file__.endswith("__init__.py") \
            else str(Path(m.__file__).resolve().parent)
        if d not in dirs:
            dirs.append(d)
    assert all(Path(d).resolve() != REPO for d in dirs)
    return ":".join(dirs)


@pytest.mark.slow
def test_pack_writes_the_submission_and_its_train_gpt_reproduces_the_run_without_pgolf(tmp_path):
    run_dir, pgolf_stdout = pgolf_run()
    summary = json.loads((run_dir / "summary.json").read_text())
    out = tmp_path / "records" / "track_10min_16mb" / "2026-11-21_pgolf_tiny"
    assert pack_main([str(run_dir), "--out", str(out), "--name", "pgolf_tiny"]) == 0

    files = {p.name for p in out.iterdir()}
    assert {"train_gpt.py", "train_gpt_readable.py", "final_model.pgq", "submission.json", "README.md",
            f"train_seed{SEED}.log", "summary.json"} <= files
    sub = json.loads((out / "submission.json").read_text())
    code = (out / "train_gpt.py").read_bytes()
    assert sub["bytes_code"] == len(code) and sub["bytes_model"] == (out / "final_model.pgq").stat().st_size
    assert sub["bytes_total"] == sub["bytes_code"] + sub["bytes_model"] <= BUDGET_BYTES
    assert sub["val_bpb"] == summary["artifact"]["val_bpb"] and sub["name"] == "pgolf_tiny"
    assert {"author", "github_id", "blurb", "date", "val_loss"} <= set(sub)
    assert sub["bytes_code"] == summary["artifact"]["bytes_code"]  # the run counted exactly this wrapper
    assert len(code.splitlines()) == 4 and code.startswith((b"import brotli", b"import lzma"))
    readme = (out / "README.md").read_text()
    assert f"{sub['val_bpb']:.8f}" in readme and f"{sub['bytes_total']:,}" in readme
    code_table = readme.split("## Code", 1)[1].split("```")[1].strip().splitlines()
    assert any(ln.startswith("pgolf.train.trainer ") for ln in code_table)
    assert code_table[-1].startswith("total") and code_table[-1].endswith(f"{sub['bytes_code']:,}")
    assert sum(r.bytes for r in artifact_size_table(out / "final_model.pgq")) == sub["bytes_model"]

    # a clean environment: no site processing (so the editable pgolf install is invisible), only the folders of
    # torch/numpy/sentencepiece/brotli/triton on the path, and a working directory without pgolf
    c = corpus()
    cwd = workdir() / "isolated"
    cwd.mkdir(exist_ok=True)
    env = child_env(PYTHONPATH=_site_dirs(), DATA_PATH=c["shard_dir"], TOKENIZER_PATH=c["tokenizer_path"],
                    RUN_DIR=str(cwd / "run"))
    probe = subprocess.run([sys.executable, "-S", "-c", "import pgolf"], cwd=cwd, env=env, capture_output=True,
                           text=True)
    assert probe.returncode != 0 and "No module named 'pgolf'" in probe.stderr
    r = subprocess.run([sys.executable, "-S", str(out / "train_gpt.py")], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    mine = exact_lines(pgolf_stdout)
    theirs = exact_lines(r.stdout)
    assert any(ln.startswith("final_quant_roundtrip_exact") for ln in mine)
    assert theirs == mine
    again = json.loads((cwd / "run" / "summary.json").read_text())
    assert again["artifact"]["val_bpb"] == summary["artifact"]["val_bpb"]
    assert again["artifact"]["sliding"]["val_bpb"] == summary["artifact"]["sliding"]["val_bpb"]
    assert f"val_bpb:{summary['artifact']['val_bpb']:.8f}" in r.stdout
    assert (cwd / "run" / "final_model.pgq").read_bytes() == (run_dir / "final_model.pgq").read_bytes()

    # the program is specialized to the run: a variable that changes a decided setting is refused, by name, before
    # any work (the run had sliding eval, so this program has no code for a run without it)
    bad = subprocess.run([sys.executable, "-S", str(out / "train_gpt.py")], cwd=cwd,
                         env={**env, "EVAL_STRIDE": "0", "RUN_DIR": str(cwd / "refused")}, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "EVAL_STRIDE" in bad.stderr and "packed" in bad.stderr, bad.stderr[-2000:]
    assert not (cwd / "refused").exists()


# the sota preset shrunk onto the synthetic corpus: its own feature set (LQER, int8 gates, two-lane residuals,
# sparse gates, BOS SmearGate), so the branches decided for sota are the ones exercised
SOTA_FLAGS = dict(iterations=3, max_wallclock_seconds=0, vocab_size=512, num_layers=4, model_dim=64, num_heads=4,
                  num_kv_heads=2, mlp_hidden=128, xsa_last_n=4, loop_start=1, loop_end=2, parallel_start=3,
                  train_batch_tokens=1024, train_seq_len=128, eval_seq_len=128, eval_stride=64, val_max_tokens=1024,
                  quant_passthrough_max=1024, gptq_calibration_batches=2, lqer_top=2, warmup_steps=0, seed=SEED,
                  train_log_every=1)


@pytest.mark.slow
def test_the_packed_sota_configuration_reproduces_its_run(tmp_path):
    from tests.quant.helpers import flags_argv

    c = corpus()
    run_dir = tmp_path / "sota_run"
    argv = [sys.executable, "-m", "pgolf.train", "--preset", "sota", "--data-path", c["shard_dir"],
            "--tokenizer-path", c["tokenizer_path"], "--run-dir", str(run_dir)] + flags_argv(**SOTA_FLAGS)
    r = subprocess.run(argv, cwd=REPO, env=child_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "lqer: " in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    out = tmp_path / "packed"
    assert pack_main([str(run_dir), "--out", str(out)]) == 0
    assert "pgolf.kernels.xsa_attention" in (out / "train_gpt_readable.py").read_text()
    cwd = tmp_path / "isolated"
    cwd.mkdir()
    env = child_env(PYTHONPATH=_site_dirs(), DATA_PATH=c["shard_dir"], TOKENIZER_PATH=c["tokenizer_path"],
                    RUN_DIR=str(cwd / "run"))
    again = subprocess.run([sys.executable, "-S", str(out / "train_gpt.py")], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert exact_lines(again.stdout) == exact_lines(r.stdout) and len(exact_lines(r.stdout)) >= 5
    assert (cwd / "run" / "final_model.pgq").read_bytes() == (run_dir / "final_model.pgq").read_bytes()


def test_bundle_holds_the_runtime_modules_and_the_run_differences():
    mods = bundle.module_closure()
    assert {"pgolf.train.trainer", "pgolf.quant.artifact", "pgolf.quant.calibrate", "pgolf.model.gpt",
            "pgolf.kernels.reference", "pgolf.kernels.int6_pack", "pgolf.eval.sliding"} <= set(mods)
    assert not any(m.startswith(("pgolf.bench", "pgolf.quant.pack", "pgolf.quant.bundle", "pgolf.demo",
                                 "pgolf.quant.reach", "pgolf.quant.specialize")) for m in mods)
    from pgolf.train.config import resolve

    cfg, m = resolve("tiny", env={}, flags=dict(iterations=7, model_dim=64, betas=(0.8, 0.9), data_path="/x"))
    preset, over = bundle.run_overrides(cfg.to_dict(), m.to_dict())
    assert preset == "tiny" and over == {"iterations": 7, "model_dim": 64, "betas": [0.8, 0.9]}


def _packed(preset: str, **flags):
    from pgolf.train.config import resolve

    cfg, m = resolve(preset, env={}, flags=flags)
    return cfg, m, bundle.packed(cfg.to_dict(), m.to_dict())


def test_a_pack_holds_the_kernels_its_configuration_reaches_and_pins_what_it_decided():
    """sota on a GPU: the Triton modules of the ops the model calls, not the int6 eval kernel; the same run on
    device cpu: no Triton module. Every pin holds for the packed configuration, and one that a changed setting
    breaks says so."""
    from pgolf.kernels import TRITON_MODULES

    cfg, m, gpu = _packed("sota")
    triton = set(TRITON_MODULES.values())
    assert {"pgolf.kernels.xsa_attention", "pgolf.kernels.mlp", "pgolf.kernels.softcap_ce",
            "pgolf.kernels.newton_schulz"} <= set(gpu.modules)
    assert "pgolf.kernels.int6_matmul" not in gpu.modules  # only `pgolf.eval --int6-matmul` uses it
    _, _, cpu = _packed("sota", device="cpu")
    assert not triton & set(cpu.modules) and set(cpu.modules) < set(gpu.modules)
    assert gpu.pins and all(bool(eval(e, {"t": cfg, "m": m})) is want for e, want, _ in gpu.pins)
    other, om = _packed("sota", loader="shuffled")[:2]
    assert not all(bool(eval(e, {"t": other, "m": om})) is want for e, want, _ in gpu.pins)
    for name, (_, src) in gpu.modules.items():  # every packed module is valid Python without docstrings
        tree = ast.parse(src, name)
        assert not any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(n) for n in ast.walk(tree))


def test_the_packed_program_is_smaller_than_the_whole_closure_and_than_the_records_wrappers():
    """The specialized program of the demo configuration against the wrapper of every module of the static closure,
    and its wrapper against the records' two wrappers (raw LZMA2 + base85; brotli-11 + base85) of the same program;
    the size table's rows add up to the file."""
    import base64
    import lzma

    import brotli

    cfg, m, pk = _packed("tiny", device="cpu", iterations=150)
    wrapped, readable = bundle.build_train_gpt(cfg.to_dict(), m.to_dict())
    size = len(wrapped.encode())
    whole = "".join(bundle._path(n)[0].read_text() for n in bundle.module_closure())
    assert size < len(base64.b85encode(brotli.compress(whole.encode(), quality=11, lgwin=24)))
    prog = bundle.program(cfg.to_dict(), m.to_dict()).encode()
    r3 = len(base64.b85encode(lzma.compress(prog, format=lzma.FORMAT_RAW, filters=[
        {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])))
    r6 = len(base64.b85encode(brotli.compress(prog, quality=11)))
    line = bundle.config_line(cfg.to_dict(), m.to_dict())
    blob = wrapped.split("D(r'")[1].split("',")[0]
    assert len(blob) <= min(r3, r6) * 0.95 and wrapped.endswith(line + "\n")
    assert wrapped.isascii() and not set(blob) & set(bundle.TEXT_EXCLUDED) and len(wrapped.splitlines()) == 4
    rows = bundle.code_size_table(cfg.to_dict(), m.to_dict())
    assert sum(r[3] for r in rows) == size and [r[0] for r in rows[:-1]] == list(pk.modules)
    assert all(r[3] > 0 for r in rows) and "total (train_gpt.py)" in bundle.format_code_table(rows)
    assert readable.endswith(line.replace(",__file__)", f",None,{size})") + "\n")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=600))
def test_the_wrappers_text_decodes_to_the_bytes_it_encodes(data):
    """Blocks of 57 bytes as 67 characters, a short last block, zeros everywhere: the wrapper's own decoder gives the
    bytes back, and the text is a valid one-line raw string literal."""
    text = bundle.text_encode(data)
    assert bundle.text_decode(text, len(data)) == data
    assert len(text) <= -(-len(data) // bundle.BLOCK_BYTES) * bundle.BLOCK_CHARS
    assert ast.literal_eval(f"r'{text}'") == text


def test_quantization_does_not_import_the_evaluation_package():
    """The compliance guard sits below both packages: pgolf.quant's modules never import pgolf.eval (only the command
    line tool quant/cli.py scores its artifact with it), so a packed train_gpt.py carries no ledger."""
    import ast

    for path in sorted((REPO / "pgolf" / "quant").glob("*.py")):
        if path.name == "cli.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(n == "pgolf.eval" or n.startswith("pgolf.eval.") for n in names), path.name
    mods = bundle.module_closure()
    assert "pgolf.compliance_guard" in mods and "pgolf.eval.ledger" not in mods


@pytest.mark.slow
def test_bundled_triton_kernels_keep_their_source_for_triton_jit(tmp_path):
    """triton.jit reads a kernel's source with inspect: the bundle registers every module in linecache."""
    from pgolf.train.config import resolve

    cfg, m = resolve("sota", env={}, flags={})
    prog = tmp_path / "prog.py"
    prog.write_text(bundle.program(cfg.to_dict(), m.to_dict()) + "\n".join([
        "import inspect",
        "import pgolf.kernels",
        "mods = sorted(set(pgolf.kernels.TRITON_MODULES.values()) & set(S))",
        "assert mods, 'no Triton modules bundled'",
        "n = 0",
        "for name in mods:",
        "    m = __import__('importlib').import_module(name)",
        "    assert m.__file__.startswith('pgolf_bundle'), m.__file__",
        "    jitted = [v for v in vars(m).values() if type(v).__name__ in ('JITFunction', 'InterpretedFunction')]",
        "    n += len(jitted)",
        "    for k in jitted:",
        "        assert inspect.getsource(k.fn).lstrip().startswith(('@triton.jit', 'def ', '@')), name",
        "assert n > 0, 'no triton.jit kernels found'",
        "print('ok', len(mods), n)",
    ]) + "\n")
    env = child_env(PYTHONPATH=_site_dirs())
    r = subprocess.run([sys.executable, "-S", str(prog)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]
