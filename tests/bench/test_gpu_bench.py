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
