"""``pgolf-bench plot`` and ``pgolf-bench readme`` on synthetic data."""

import builtins
import json

import pytest

from pgolf.bench import plot, readme
from pgolf.bench.cli import main
from pgolf.bench.history import append_record
from tests.bench.helpers import rec


def _history(path):
    for i, (c, ms) in enumerate([("aaaaaaa1", 120.0), ("bbbbbbb2", 118.0), ("ccccccc3", 112.0)]):
        append_record(path, rec(c, f"2026-11-0{i + 1}T00:00:00Z", {
            "step/sota/auto/loop_off/ms_per_step": (ms, "lower"),
            "step/sota/reference/loop_off/ms_per_step": (130.0, "lower"),
            "kernels/mlp fwd+bwd M=98304/speedup": (1.3 + i / 10, "higher"),
            "kernels/attention fwd packed/speedup": (0.9, "higher")}))
    append_record(path, rec("ddddddd4", "2026-11-09T00:00:00Z", {"step/tiny/auto/loop_off/ms_per_step": (400.0, "lower")},
                            kind="cpu", smoke=True))


def test_plot_writes_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    h = tmp_path / "h.jsonl"
    _history(h)
    assert main(["plot", "--history", str(h), "--out", str(tmp_path / "plots")]) == 0
    files = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert files == ["kernel_speedup_nvidia-h200.png", "step_time_nvidia-h200.png"]   # newest full run's kind
    for f in (tmp_path / "plots").glob("*.png"):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels, series = plot.step_series([json.loads(line) for line in h.read_text().splitlines()], "nvidia-h200")
    assert len(labels) == 3 and series["sota/auto/loop_off"] == [120.0, 118.0, 112.0]
    assert main(["plot", "--history", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "p2")]) == 0
    assert "nothing to plot" in capsys.readouterr().out


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_mpl(name, *a, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    h = tmp_path / "h.jsonl"
    _history(h)
    assert main(["plot", "--history", str(h), "--out", str(tmp_path / "plots")]) == 1
    assert "needs matplotlib, which is not installed" in capsys.readouterr().err


README = "# pgolf\n\nintro\n\n## Performance\n\nold text\nmore old\n\n## Layout\n\nkeep me\n"


def test_replace_section_only_touches_performance():
    new = readme.replace_section(README, "fresh body\n")
    assert new == "# pgolf\n\nintro\n\n## Performance\n\nfresh body\n\n## Layout\n\nkeep me\n"
    assert readme.replace_section(new, "fresh body\n") == new                  # idempotent
    assert readme.replace_section("# x\n", "b\n") == "# x\n\n## Performance\n\nb\n"  # appended when missing
    last = "# x\n\n## Performance\n\nold\n"
    assert readme.replace_section(last, "b\n") == "# x\n\n## Performance\n\nb\n"


def _results(d, name, *, date, kind="nvidia-h200", smoke=False):
    data = dict(meta=dict(date=date, device_kind=kind, gpu_name="NVIDIA H200", commit_short=name[:7], torch="2.13",
                          triton="3.9"), smoke=smoke,
                step=dict(preset="sota", tokens_per_step=98_304, compile=True, peak=dict(dtype="bfloat16", tflops=800.0),
                          variants={"auto": {"modes": {"loop_off": dict(ms_per_step=101.5, tokens_per_s=968_512.0,
                                                                        mfu=0.41, peak_mib=39_000.0)}}},
                          projection={"auto": dict(steps=5012.0, train_s=592.0, steps_loop_off=2000.0,
                                                   steps_loop_on=3012.0, link_gbps=350.0, comm_ms=1.2)}),
                kernels=dict(rows=[dict(op="mlp", case="mlp fwd+bwd", impl="triton", candidate="triton",
                                        baseline="compiled", ms=1.5, speedup=1.2),
                                   dict(op="mlp", case="mlp fwd+bwd", impl="compiled", candidate="triton",
                                        baseline="compiled", ms=1.8, speedup=1.0)]),
                eval=dict(full_tokens=40_540_160, projection=dict(parts=dict(roundtrip=20.0, sliding=80.0), total_s=100.0,
                                                                  budget_s=600.0, fits=True), ttt=dict(kind="measured")),
                tests=dict(tests=10, passed=9, failures=1, errors=0, skipped=0))
    (d / f"{name}.json").write_text(json.dumps(data))


def test_readme_from_latest_gpu_results(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    assert readme.latest_results(res, committed_only=False) is None
    body = readme.render(None, None)
    assert body.startswith("No GPU results have been committed yet") and "pgolf-bench readme" in body
    _results(res, "old1234", date="2026-11-01T00:00:00Z")
    _results(res, "new5678", date="2026-11-05T00:00:00Z")
    _results(res, "cpu0000", date="2026-11-09T00:00:00Z", kind="cpu")        # CPU runs never count
    _results(res, "smk0000", date="2026-11-09T00:00:00Z", smoke=True)        # nor smoke runs
    path, data = readme.latest_results(res, committed_only=False)
    assert path.name == "new5678.json"
    body = readme.render(path, data)
    for text in ("NVIDIA H200", "`new5678`", "101.5", "968,512", "41.0%", "5,012 steps", "1.20x", "100 s",
                 "9 passed, 1 failed", "pgolf-bench readme"):
        assert text in body, text
    md = tmp_path / "README.md"
    md.write_text(README)
    changed, _ = readme.update_readme(md, res, committed_only=False)
    assert changed and "5,012 steps" in md.read_text() and md.read_text().endswith("## Layout\n\nkeep me\n")
    assert readme.update_readme(md, res, committed_only=False)[0] is False


def test_readme_committed_only_ignores_untracked(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    _results(res, "new5678", date="2026-11-05T00:00:00Z")
    # tmp_path is not a git repository: git cannot tell, so every file counts
    assert readme.committed_files(res) is None
    assert readme.latest_results(res) is not None


def test_repository_readme_section_is_current():
    assert main(["readme", "--check"]) == 0


def test_readme_summarizes_compile_sweeps(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    summary = dict(compiled=323, failed=0, over_shared_limit=0, spilling_defaults=0, spilling_other=2,
                   wgmma_defaults=30, tma=0, passed=True)
    for v, ok in (("3.9.0", True), ("3.6.0", False)):
        (res / f"compile_sm90_triton-{v}.json").write_text(json.dumps(dict(
            tool="pgolf-bench compile", target="sm_90", triton=v, quick=False, commit_short="abc1234",
            summary=dict(summary, passed=ok, failed=0 if ok else 3), rows=[])))
    (res / "compile_broken.json").write_text("{not json")
    sweeps = readme.compile_sweeps(res, committed_only=False)
    assert [d["triton"] for _, d in sweeps] == ["3.6.0", "3.9.0"]
    body = readme.render(None, None, compiles=sweeps)
    assert body.startswith("No GPU results") and "Compiled for Hopper without a GPU" in body
    assert "`compile_sm90_triton-3.6.0.json`" in body and "**FAIL**" in body and "| 323 |" in body
    assert "0 / 2" in body and body.rstrip().endswith("_Section written by `pgolf-bench readme`._")
    assert readme.latest_results(res, committed_only=False) is None  # compile reports are not GPU results
