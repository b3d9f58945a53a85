"""GPU-only checks of the benchmark harness itself (run by ``make gpu-check``'s test stage)."""

import pytest
import torch

from pgolf.bench import step
from pgolf.bench.env import device_kind, environment, measure_matmul_peak

pytestmark = pytest.mark.gpu


def test_measured_peak_is_plausible():
    dev = torch.device("cuda")
    pk = measure_matmul_peak(dev, smoke=True)
    assert pk["dtype"] == "bfloat16" and 20 < pk["tflops"] < 5000
    env = environment(dev)
    assert env["gpu_name"] and env["device_kind"] == device_kind(dev) != "cpu" and env["gpu_memory_gib"] > 1


def test_step_harness_on_cuda_eager():
    res = step.run_step("tiny", smoke=True, device=torch.device("cuda"), steps=2, warmup=1, compile_mode="off",
                        log=lambda s: None)
    for v in ("auto", "reference"):
        for m in res["variants"][v]["modes"].values():
            assert m["error"] is None and m["ms_per_step"] > 0 and m["peak_mib"] > 0 and m["finite"]
    assert res["projection"]["auto"]["steps"] > 0


def test_tune_writes_the_record_shape_picks(tmp_path, monkeypatch):
    """pgolf-bench tune on the MLP: every record shape class of both kernels tuned and in the GPU's file."""
    import json

    from pgolf.bench.tune import run_tune
    from pgolf.kernels import tuning

    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(tuning, "_FILES", {})
    res = run_tune(device=torch.device("cuda"), ops=("mlp",), log=lambda s: None)
    saved = json.loads((tmp_path / f"{tuning.gpu_slug()}.json").read_text())["ops"]["mlp"]
    assert set(saved) == {f"{name.split('.', 1)[1]}|{key}" for name, picks in res["picks"].items() for key in picks}
    assert {e.split("|")[0] for e in saved} == {"up_fwd", "up_bwd"} and all("num_warps" in c for c in saved.values())
