"""pgolf-pack: the submission folder, and its train_gpt.py reproducing the run with no pgolf installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert len(code.splitlines()) == 3 and code.startswith(b"import brotli")
    readme = (out / "README.md").read_text()
    assert f"{sub['val_bpb']:.8f}" in readme and f"{sub['bytes_total']:,}" in readme
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


def test_bundle_holds_the_runtime_modules_and_the_run_differences():
    mods = bundle.module_closure()
    assert {"pgolf.train.trainer", "pgolf.quant.artifact", "pgolf.quant.calibrate", "pgolf.model.gpt",
            "pgolf.kernels.reference", "pgolf.kernels.int6_pack", "pgolf.eval.sliding"} <= set(mods)
    assert not any(m.startswith(("pgolf.bench", "pgolf.quant.pack", "pgolf.quant.bundle", "pgolf.demo"))
                   for m in mods)
    from pgolf.train.config import resolve

    cfg, m = resolve("tiny", env={}, flags=dict(iterations=7, model_dim=64, betas=(0.8, 0.9), data_path="/x"))
    preset, over = bundle.run_overrides(cfg.to_dict(), m.to_dict())
    assert preset == "tiny" and over == {"iterations": 7, "model_dim": 64, "betas": [0.8, 0.9]}
    src = "def f(x):\n    '''doc'''\n    # comment\n    return x + 1\nclass A:\n    '''only a doc'''\n"
    small = bundle.minify(src)
    assert "doc" not in small and "comment" not in small
    ns: dict = {}
    exec(small, ns)
    assert ns["f"](1) == 2


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
    prog = tmp_path / "prog.py"
    prog.write_text(bundle.program() + "\n".join([
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
