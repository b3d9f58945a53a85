"""The one launch-config mechanism (pgolf.kernels.launcher): which config a kernel launches with, tuning, the
tuned file, compile-only mode, and that every Triton kernel of pgolf.kernels is declared through it.

The GPU path is simulated: a stand-in JIT function records launches, ``torch.device('cuda', 0)`` names the device
and ``triton.testing.do_bench`` is replaced by a table of timings per config."""

from __future__ import annotations

import importlib
import inspect
import json

import pytest
import torch
import triton.testing
from triton.runtime.jit import KernelInterface

from pgolf.kernels import TRITON_MODULES, launcher, tuning

CUDA = torch.device("cuda", 0)


class FakeJit:
    """Records ``fn[grid](*args, **kwargs)`` launches and ``warmup`` compiles."""

    def __init__(self):
        self.launches: list[tuple[tuple, dict]] = []
        self.compiled: list[dict] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, dict(kwargs)))

    def warmup(self, *args, grid, **kwargs):
        self.compiled.append(dict(kwargs, grid=grid))
        return "compiled"


@pytest.fixture
def gpu(tmp_path, monkeypatch):
    """The GPU path on this CPU machine: no interpreter, a fake GPU 'Fake GPU' and its own tuned folder."""
    monkeypatch.setattr(launcher, "INTERPRET", False)
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(tuning, "_FILES", {})
    monkeypatch.setattr(tuning, "gpu_slug", lambda device=None: "fake_gpu")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("PGOLF_AUTOTUNE", raising=False)
    monkeypatch.delenv("PGOLF_TUNED_WRITE", raising=False)
    return tmp_path / "fake_gpu.json"


@pytest.fixture
def kernel(monkeypatch):
    """A declared test kernel with two candidates, removed from the registry afterwards."""
    k = launcher.Kernel("test_op", "k", FakeJit(), [dict(BM=1, num_warps=4), dict(BM=2, num_warps=8)], dict(BM=0),
                        lambda key: dict(BM=99 if key["m"] > 8 else 98, num_warps=4))
    yield k
    launcher.KERNELS.pop(k.qualname, None)


def timings(monkeypatch, ms_by_bm: dict[int, float]) -> tuple[list[int], dict[str, int]]:
    """Replace do_bench by a table of milliseconds per BM. Returns (the BMs it timed, in order; a dict whose 'bm'
    the caller sets to the BM of the config being launched)."""
    timed: list[int] = []
    last: dict[str, int] = {}

    def fake_bench(fn, **kwargs):
        fn()
        timed.append(last["bm"])
        return ms_by_bm[last["bm"]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    return timed, last


def grid(meta):
    return (meta["BM"],)


def test_interpreter_always_uses_the_interpret_config(kernel, monkeypatch):
    monkeypatch.setattr(launcher, "INTERPRET", True)
    assert kernel.pick(dict(m=16), CUDA) == dict(BM=0)
    monkeypatch.setattr(launcher, "INTERPRET", False)
    assert kernel.pick(dict(m=16), torch.device("cpu")) == dict(BM=0)  # not on a GPU: the same
    kernel.run(grid, (1, 2), dict(FLAG=True), key=dict(m=16), device=torch.device("cpu"))
    assert kernel.fn.launches == [((0,), dict(FLAG=True, BM=0))]


def test_file_entry_is_used_without_tuning(gpu, kernel, monkeypatch):
    gpu.write_text(json.dumps({"ops": {"test_op": {"k|m=16": {"BM": 7, "num_warps": 2}}}}))
    timed, _ = timings(monkeypatch, {})
    kernel.run(grid, (), key=dict(m=16), device=CUDA)
    assert kernel.fn.launches == [((7,), dict(BM=7, num_warps=2))] and timed == []
    assert kernel.tuned == {}  # nothing was tuned, so nothing will be saved


def test_default_when_autotune_is_off(gpu, kernel, monkeypatch):
    monkeypatch.setenv("PGOLF_AUTOTUNE", "0")
    assert kernel.pick(dict(m=16), CUDA, bench=lambda cfg: pytest.fail("tuned with PGOLF_AUTOTUNE=0")) == \
        dict(BM=99, num_warps=4)
    assert kernel.pick(dict(m=4), CUDA) == dict(BM=98, num_warps=4)  # the default depends on the key
    launcher.save_tuned(CUDA)
    assert not gpu.exists() or "test_op" not in json.loads(gpu.read_text())["ops"]  # defaults are never saved


def test_tuning_picks_the_fastest_working_candidate_and_writes_it(gpu, monkeypatch):
    k = launcher.Kernel("test_op", "t", FakeJit(), [dict(BM=1), dict(BM=2), dict(BM=3)], dict(BM=0),
                        lambda key: dict(BM=99))
    try:
        timed, last = timings(monkeypatch, {1: 0.5, 2: 0.2, 3: 0.1})
        real_launch = k.launch

        def launch(cfg, *args):
            last["bm"] = cfg["BM"]
            if cfg["BM"] == 3:
                raise RuntimeError("out of resource: shared memory")  # the fastest cannot run: skipped
            real_launch(cfg, *args)

        monkeypatch.setattr(k, "launch", launch)
        monkeypatch.setenv("PGOLF_TUNED_WRITE", "1")
        tuning.save("other_op", {"x|m=1": {"BN": 32}}, "fake_gpu")  # another op's section must survive
        k.run(grid, (), key=dict(m=16, dtype="bfloat16"), device=CUDA)
        assert timed == [1, 2] and last["bm"] == 2  # the real launch used the pick
        saved = json.loads(gpu.read_text())
        assert saved["gpu"] == "Fake GPU" and saved["triton"]
        assert saved["ops"] == {"other_op": {"x|m=1": {"BN": 32}}, "test_op": {"t|m=16,dtype=bfloat16": {"BM": 2}}}
        k.run(grid, (), key=dict(m=16, dtype="bfloat16"), device=CUDA)
        assert timed == [1, 2]  # the key is tuned once per process
    finally:
        launcher.KERNELS.pop(k.qualname, None)


def test_bench_args_are_made_once_and_used_only_for_timing(gpu, kernel, monkeypatch):
    _, last = timings(monkeypatch, {1: 1.0, 2: 2.0})
    monkeypatch.setattr(kernel, "launch", lambda cfg, g, args, consts: (last.update(bm=cfg["BM"]),
                                                                        seen.append((cfg["BM"], args))))
    seen: list = []
    made: list = []
    kernel.run(grid, ("real",), key=dict(m=16), device=CUDA, bench_args=lambda: made.append(1) or ("scratch",))
    assert made == [1]
    assert {a for bm, a in seen[:-1]} == {("scratch",)} and seen[-1] == (1, ("real",))


def test_pinned_config_bypasses_the_choice(gpu, kernel, monkeypatch):
    monkeypatch.setattr(kernel, "pick", lambda *a, **k: pytest.fail("a pinned config must not be picked"))
    kernel.run(grid, (), dict(A=1), key=dict(m=16), device=CUDA, config=dict(BM=5, A=2))
    assert kernel.fn.launches == [((5,), dict(A=2, BM=5))]  # the config wins over consts of the same name


def test_save_tuned_groups_every_kernels_picks_by_op(gpu, kernel, monkeypatch):
    other = launcher.Kernel("test_op2", "j", FakeJit(), [], {})
    try:
        kernel.tuned["m=16"] = dict(BM=2)
        other.tuned["v=8192"] = dict(BLOCK=1)
        assert launcher.save_tuned(CUDA) == gpu
        ops = json.loads(gpu.read_text())["ops"]
        assert ops["test_op"] == {"k|m=16": {"BM": 2}} and ops["test_op2"] == {"j|v=8192": {"BLOCK": 1}}
    finally:
        launcher.KERNELS.pop(other.qualname, None)


def test_retune_ignores_the_file_and_restores_earlier_choices(gpu, kernel, monkeypatch):
    gpu.write_text(json.dumps({"ops": {"test_op": {"k|m=16": {"BM": 7}}}}))
    assert kernel.pick(dict(m=16), CUDA) == {"BM": 7}
    timed, last = timings(monkeypatch, {1: 0.3, 2: 0.4})
    real = kernel.launch
    monkeypatch.setattr(kernel, "launch", lambda cfg, *a: (last.update(bm=cfg["BM"]), real(cfg, *a)))
    with launcher.retune():
        assert kernel.pick(dict(m=16), CUDA, bench=lambda cfg: kernel.launch(cfg, grid, (), {}))["BM"] == 1
    assert timed == [1, 2]
    assert kernel.pick(dict(m=16), CUDA) == {"BM": 7}  # the choice from before the block


def test_compile_only_hands_launches_to_the_hook(kernel):
    calls = []
    with launcher.compile_only(lambda *a: calls.append(a)):
        assert launcher.compiling()
        assert launcher.on_gpu(torch.zeros(1))  # CPU tensors take the GPU path while compiling
        kernel.run(grid, (1,), dict(C=3), key=dict(m=16), device=torch.device("cpu"), config=None)
        assert kernel.pick(dict(m=16), torch.device("cpu")) == dict(BM=99, num_warps=4)  # the GPU default
    assert not launcher.compiling() and kernel.fn.launches == []
    [(k, key, g, args, consts, pinned)] = calls
    assert k is kernel and key == dict(m=16) and args == (1,) and consts == dict(C=3) and pinned is None
    assert kernel.compile(dict(BM=4, num_warps=8), g, args, consts) == "compiled"
    assert kernel.fn.compiled == [dict(C=3, BM=4, num_warps=8, grid=(4,))]


def test_sweep_lists_default_candidates_and_tuned_entries(tmp_path, kernel, monkeypatch):
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
    (tmp_path / "gpu_a.json").write_text(json.dumps({"ops": {"test_op": {
        "k|m=16": {"BM": 2, "num_warps": 8}, "k|m=4": {"BM": 5}, "other|m=16": {"BM": 6}}}}))
    assert kernel.sweep(dict(m=16), everything=False) == [(dict(BM=99, num_warps=4), ["default"])]
    got = kernel.sweep(dict(m=16), everything=True)
    assert got == [(dict(BM=99, num_warps=4), ["default"]), (dict(BM=1, num_warps=4), ["candidate 0"]),
                   (dict(BM=2, num_warps=8), ["candidate 1", "tuned gpu_a m=16"]), (dict(BM=5), ["tuned gpu_a m=4"])]
    assert kernel.sweep(dict(m=16), everything=True, pinned=dict(BM=3)) == [(dict(BM=3), ["pinned"])]


def test_poisoned_outputs(monkeypatch):
    monkeypatch.setattr(launcher, "POISON", True)
    assert torch.isnan(launcher.new_output((3, 5), torch.float16, torch.device("cpu"))).all()
    assert (launcher.new_output((3, 2), torch.uint8, torch.device("cpu")) == 255).all()
    monkeypatch.setattr(launcher, "POISON", False)
    assert launcher.new_output((2,), torch.float32, torch.device("cpu")).shape == (2,)


def test_env_flag_parsing(monkeypatch):
    for value, want in (("0", False), ("false", False), ("off", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("PGOLF_TEST_FLAG", value)
        assert launcher.env_flag("PGOLF_TEST_FLAG", not want) is want
    monkeypatch.delenv("PGOLF_TEST_FLAG")
    assert launcher.env_flag("PGOLF_TEST_FLAG", True) is True


def test_every_triton_kernel_is_declared():
    """Each @triton.jit function of an op module that no other kernel calls is a launched kernel, and each
    launched kernel is declared once with the launcher (so tuning and pgolf-bench compile see it)."""
    declared = launcher.declared()
    for module_name in sorted(set(TRITON_MODULES.values())):
        mod = importlib.import_module(module_name)
        jits = {n: f for n, f in vars(mod).items()  # JIT functions (interpreted ones on CPU) defined there
                if isinstance(f, KernelInterface) and getattr(f, "fn", None) and f.fn.__module__ == module_name}
        called = {n for n in jits for f in jits.values() if f is not jits[n] and f"{n}(" in inspect.getsource(f.fn)}
        launched = {jits[n].fn for n in set(jits) - called}
        mine = {k.fn.fn for k in declared.values() if k.fn.fn.__module__ == module_name}
        assert launched == mine, f"{module_name}: launched {sorted(f.__name__ for f in launched)}, declared " \
                                 f"{sorted(f.__name__ for f in mine)}"
    ops = {k.op for k in declared.values()}
    assert ops == {"mlp", "softcap_ce", "attention", "newton_schulz", "int6_matmul"}
