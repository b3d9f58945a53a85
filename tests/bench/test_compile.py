"""``pgolf-bench compile``: every kernel compiled for Hopper (sm_90) on this CPU machine, through each op's own
launcher at the record shapes, and the defects that make the command fail (compile errors, shared memory over
the limit, spilling defaults).

The quick sweep below is the CI check of the real kernels (all five ops, every dtype they support on a GPU);
the others use small op sets or synthetic rows."""

from __future__ import annotations

import json

import pytest

from pgolf.bench import compile as C
from pgolf.bench.cli import main
from pgolf.kernels import launcher

SPILLING_UP_BWD = dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3)  # 255 regs + a stack on sm_90


@pytest.mark.slow
def test_quick_sweep_of_every_kernel_passes(tmp_path, capsys):
    out = tmp_path / "quick.json"
    assert main(["compile", "--quick", "--jobs", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    s = report["summary"]
    assert s["passed"] and s["failed"] == 0 and s["over_shared_limit"] == 0 and s["spilling_defaults"] == 0
    assert report["target"] == "sm_90" and report["triton"] and report["quick"] is True
    # every declared kernel compiled in every dtype, with plausible resource numbers
    seen = {(r["kernel"], r["dtype"]) for r in report["rows"]}
    assert seen == {(k, dt) for k in launcher.declared() for dt in C.DTYPES}
    for r in report["rows"]:
        assert r["status"] == "ok" and r["default"] and r["calls"]
        assert 0 < r["registers"] <= C.MAX_REGISTERS and 0 <= r["shared_bytes"] <= report["shared_limit"]
    # the GEMM-shaped kernels use Hopper's tensor cores in bf16/fp16; nothing uses TMA yet
    assert s["defaults_without_wgmma"] == []
    assert {r["kernel"] for r in report["rows"] if r["wgmma"]} == set(C.WGMMA_EXPECTED)
    text = capsys.readouterr().out
    assert "mlp.up_bwd" in text and "PASSED" in text and "smem KB" in text


def test_a_spilling_default_fails_the_check(tmp_path, capsys):
    """What CI would say if someone made a spilling config the MLP backward's default."""
    out = tmp_path / "bad.json"
    rc = main(["compile", "--quick", "--op", "mlp", "--dtype", "bfloat16", "--jobs", "1", "--json", str(out),
               "--set-default", f"mlp.up_bwd={json.dumps(SPILLING_UP_BWD)}"])
    assert rc == 1
    report = json.loads(out.read_text())
    assert report["summary"]["spilling_defaults"] == 1 and not report["summary"]["passed"]
    [bad] = report["summary"]["problems"]
    assert bad["kernel"] == "mlp.up_bwd" and bad["config"] == SPILLING_UP_BWD and "spills" in bad["why"][0]
    fwd = [r for r in report["rows"] if r["kernel"] == "mlp.up_fwd"]
    assert fwd and all(r["spill_bytes"] == 0 for r in fwd)  # the untouched kernel still passes
    assert "FAILED" in capsys.readouterr().out


def test_verdicts_from_rows():
    """Failures and configs over the shared-memory limit fail whatever their source; spills only a default."""
    target = C.TARGETS["sm_90"]

    def row(**kw):
        base = dict(kernel="mlp.up_fwd", dtype="bfloat16", config={"BM": 128}, variant={"FORWARD": True},
                    sources=["default"], calls=["train M=98304 [m=131072]"], default=True, status="ok", error=None,
                    shared_bytes=1024, registers=128, spill_bytes=0, wgmma=True, mma_sync=False, tma=False)
        return {**base, **kw}

    assert C.summarize([row()], target)["passed"]
    assert C.problems(row(), target) == []
    over = row(shared_bytes=target.shared_limit + 1, default=False)
    assert C.problems(over, target) and not C.summarize([row(), over], target)["passed"]
    spilling_candidate = row(default=False, spill_bytes=64, registers=255)
    s = C.summarize([row(), spilling_candidate], target)
    assert s["passed"] and s["spilling_other"] == 1 and s["spilling_defaults"] == 0
    assert not C.summarize([row(spill_bytes=8)], target)["passed"]
    failed = row(status="error", error="CompilationError: boom", default=False)
    s = C.summarize([row(), failed], target)
    assert not s["passed"] and s["failed"] == 1 and s["problems"][0]["error"].startswith("CompilationError")
    assert C.summarize([row(wgmma=False)], target)["defaults_without_wgmma"] == ["mlp.up_fwd bfloat16"]
    text = C.format_report(dict(target="sm_90", shared_limit=target.shared_limit, quick=True, seconds=1.0,
                                triton="x", torch="y", rows=[row(), failed], summary=s))
    assert "FAILED" in text and "CompilationError: boom" in text


def test_a_worker_that_dies_is_reported_as_failed_rows():
    results = list(C._run_workers([("no_such_op", "bfloat16")], dict(target="sm_90", quick=True, set_defaults={}),
                                  1))
    [(unit, res)] = results
    assert unit == ("no_such_op", "bfloat16")
    [r] = res["rows"]
    assert r["status"] == "error" and "compile worker exited with 1" in r["error"] and "no_such_op" in r["error"]


@pytest.mark.parametrize("args,named", [
    (["--op", "mlpp"], "--op mlpp"), (["--dtype", "float64"], "--dtype float64"), (["--target", "sm_75"], "--target"),
    (["--set-default", "mlp.nope={}"], "--set-default mlp.nope"), (["--set-default", "mlp.up_fwd=[1]"], "--set-default"),
    (["--set-default", "mlp.up_fwd"], "--set-default"),
])
def test_bad_arguments_are_named(args, named, capsys):
    assert main(["compile", "--quick", *args]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_tune_without_a_gpu_says_so(capsys):
    assert main(["tune", "--op", "mlp"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "pgolf-bench compile" in err and "Traceback" not in err
    assert main(["tune", "--op", "mlpp"]) == 2
    assert "--op mlpp" in capsys.readouterr().err
