"""The fused softcapped CE and the fused LM head + CE (pgolf.kernels.softcap_ce) against the reference and float64.

CPU runs use the Triton interpreter with fp32, fp16 and bf16 logits/hidden states. Outputs are NaN-poisoned
before each launch. Error rule (as in test_mlp): the kernel's max-abs error against a float64 computation of
the formula on the same rounded inputs is at most 2× the PyTorch reference's error at the same dtype plus a few
unit roundoffs of the output's scale (EPS_UNITS). The float64 computation is written out here (the reference
does its math in fp32 whatever the input dtype, so it cannot serve as the exact answer).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from pgolf import kernels
from pgolf.kernels import launcher, reference
from tests.kernels.helpers import (DTYPES, F64, assert_error_within,
                                   assert_fullgraph_matches_eager, gen, saved_activation_bytes)

K = importlib.import_module("pgolf.kernels.softcap_ce")
MLP = importlib.import_module("pgolf.kernels.mlp")

IDS = lambda d: str(d).removeprefix("torch.")  # noqa: E731


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launcher, "POISON", True)



def exact_softcap_ce(z64: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
    """float64 per-row loss: logsumexp(s) − s[y], s = cap·tanh(z/cap); rows with y < 0 or y ≥ V give 0."""
    V = z64.shape[-1]
    s = cap * torch.tanh(z64 / cap)
    valid = (targets >= 0) & (targets < V)
    st = s.gather(1, targets.clamp(0, V - 1)[:, None])[:, 0]
    return torch.where(valid, torch.logsumexp(s, dim=-1) - st, torch.zeros_like(st))


def make_ce(N, V, dtype, scale, seed, ignore=True):
    g = gen(seed)
    z = (torch.randn(N, V, generator=g) * scale).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    if ignore and N > 3:
        t[3] = -100  # F.cross_entropy's ignore_index
    gl = torch.randn(N, generator=g)
    return z, t, gl


def ce_run(fn, z, t, gl, cap):
    zl = z.detach().clone().requires_grad_(True)
    loss = fn(zl, t, cap)
    (dz,) = torch.autograd.grad(loss, zl, gl.to(loss.dtype))
    return loss.detach(), dz


# ---- softcap_ce ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("N,V", [(37, 97), (5, 129), (1, 1)])
@pytest.mark.parametrize("cap,scale", [(30.0, 20.0), (5.0, 3.0)], ids=["cap30", "cap5"])
def test_softcap_ce_vs_float64(dtype, N, V, cap, scale):
    z, t, gl = make_ce(N, V, dtype, scale, seed=N * V + int(cap))
    loss, dz = ce_run(K.softcap_ce, z, t, gl, cap)
    assert loss.dtype == torch.float32 and dz.dtype == dtype
    rl, rdz = ce_run(reference.softcap_ce, z, t, gl, cap)
    el, edz = ce_run(exact_softcap_ce, z.to(F64), t, gl.to(F64), cap)
    assert_error_within("loss", loss, rl, el)
    assert_error_within("dz", dz, rdz, edz)


@pytest.mark.parametrize("scale", [1e-3, 1e4], ids=["tiny", "saturated"])
def test_softcap_ce_extreme_logits(scale):
    """Near-zero logits (tanh's small-argument branch) and logits deep in saturation (no overflow / NaN)."""
    z, t, gl = make_ce(37, 97, torch.float32, scale, seed=2)
    loss, dz = ce_run(K.softcap_ce, z, t, gl, 30.0)
    rl, rdz = ce_run(reference.softcap_ce, z, t, gl, 30.0)
    el, edz = ce_run(exact_softcap_ce, z.to(F64), t, gl.to(F64), 30.0)
    assert_error_within("loss", loss, rl, el)
    assert_error_within("dz", dz, rdz, edz)


def test_out_of_range_targets_give_zero_loss_and_grad():
    z, t, gl = make_ce(6, 97, torch.float32, 10.0, seed=4, ignore=False)
    t[1], t[4] = -1, 97
    loss, dz = ce_run(K.softcap_ce, z, t, gl, 30.0)
    assert loss[1] == 0 and loss[4] == 0 and not dz[1].any() and not dz[4].any()
    assert (loss[[0, 2, 3, 5]] > 0).all()


def test_strided_rows():
    """A row-strided view of the logits (unit stride along the vocabulary) is read in place."""
    z, t, gl = make_ce(37, 97, torch.float32, 20.0, seed=6)
    wide = torch.randn(37, 120)
    wide[:, :97] = z
    view = wide[:, :97]
    loss, lse = K.softcap_ce_forward(view, t, 30.0)
    torch.testing.assert_close(loss, reference.softcap_ce(z, t, 30.0), rtol=1e-6, atol=1e-5)


def test_softcap_ce_saves_no_logit_copy():
    N, V = 37, 97
    z, t, _ = make_ce(N, V, torch.float16, 20.0, seed=8)
    zl = z.clone().requires_grad_(True)
    got, shapes = saved_activation_bytes(lambda a, _: K.softcap_ce(a, t, 30.0), [zl, t])
    assert got == 8 * N, shapes  # the (N, 2) fp32 row stats only; z is the input
    ref, _ = saved_activation_bytes(lambda a, _: reference.softcap_ce(a, t, 30.0), [zl, t])
    assert ref >= 4 * N * V  # the reference keeps fp32 copies of the logits


# ---- lm_head_loss (fused head) -------------------------------------------------------------------------------

def head_run(fn, h, W, t, gl, cap):
    hl = h.detach().clone().requires_grad_(True)
    Wl = W.detach().clone().requires_grad_(True)
    loss = fn(hl, Wl, t, cap)
    dh, dW = torch.autograd.grad(loss, (hl, Wl), gl.to(loss.dtype))
    return loss.detach(), dh, dW


def exact_head(h64, W64, t, cap):
    return exact_softcap_ce(h64 @ W64.t(), t, cap)


def make_head(N, d, V, dtype, seed):
    g = gen(seed)
    h = torch.randn(N, d, generator=g).to(dtype)
    W = torch.randn(V, d, generator=g) * (4.0 / math.sqrt(d))  # fp32 parameter, as in the model
    t = torch.randint(0, V, (N,), generator=g)
    t[2] = -100
    return h, W, t, torch.randn(N, generator=g)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("fused,chunk", [(True, "one"), (True, "three"), (False, "one")],
                         ids=["fused-one_chunk", "fused-three_chunks", "unfused"])
def test_lm_head_loss_vs_float64(dtype, fused, chunk, monkeypatch):
    N, d, V = 37, 24, 97
    monkeypatch.setattr(K, "FUSED_HEAD", fused)
    if chunk == "three":
        monkeypatch.setattr(K, "CHUNK_ELEMS", 16 * V)  # chunks of 16, 16, 5 rows
        assert K.chunk_rows(N, V) == 16
    h, W, t, gl = make_head(N, d, V, dtype, seed=N + V + (dtype == torch.float16))
    loss, dh, dW = head_run(K.lm_head_loss, h, W, t, gl, 30.0)
    assert loss.dtype == torch.float32 and dh.dtype == dtype and dW.dtype == torch.float32
    rl, rdh, rdW = head_run(reference.lm_head_loss, h, W, t, gl, 30.0)
    Wr = W.to(dtype)  # both compute with the weight cast to the activations' dtype; its grad passes the cast
    el, edh, edW = head_run(exact_head, h.to(F64), Wr.to(F64), t, gl.to(F64), 30.0)
    assert_error_within("loss", loss, rl, el)
    assert_error_within("dh", dh, rdh, edh)
    assert_error_within("dE", dW, rdW, edW)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_lm_head_loss_under_autocast(fused, monkeypatch):
    """fp32 hidden states under bf16 autocast: the head runs in bf16 like the reference's F.linear."""
    monkeypatch.setattr(K, "FUSED_HEAD", fused)
    h, W, t, gl = make_head(37, 24, 97, torch.float32, seed=21)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, dh, dW = head_run(K.lm_head_loss, h, W, t, gl, 30.0)
        rl, rdh, rdW = head_run(reference.lm_head_loss, h, W, t, gl, 30.0)
    assert loss.dtype == torch.float32 and dh.dtype == dW.dtype == torch.float32
    el, edh, edW = head_run(exact_head, h.bfloat16().to(F64), W.bfloat16().to(F64), t, gl.to(F64), 30.0)
    assert_error_within("loss", loss, rl, el)
    assert_error_within("dh", dh.bfloat16(), rdh.bfloat16(), edh)
    assert_error_within("dE", dW.bfloat16(), rdW.bfloat16(), edW)


def test_lm_head_loss_saves_no_logits(monkeypatch):
    monkeypatch.setattr(K, "FUSED_HEAD", True)
    N, d, V = 37, 24, 97
    h, W, t, _ = make_head(N, d, V, torch.float32, seed=9)
    inputs = [h.requires_grad_(True), W.requires_grad_(True), t]
    got, shapes = saved_activation_bytes(lambda a, b, c: K.lm_head_loss(a, b, c, 30.0), inputs)
    assert got == 8 * N, shapes  # the row stats; h, E and targets are the inputs
    ref, _ = saved_activation_bytes(lambda a, b, c: reference.lm_head_loss(a, b, c, 30.0), inputs)
    assert ref >= 4 * N * V


def test_fused_head_never_holds_all_logits(monkeypatch):
    """Every tensor made inside the fused head's forward and backward is at most one chunk of logits in bytes
    (the interpreter's own byte views of the chunk buffer are counted too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel() * t.element_size())
            return out

    N, d, V = 37, 8, 97  # d small, so the weight and its gradient (V·d) are smaller than one chunk
    monkeypatch.setattr(K, "CHUNK_ELEMS", 10 * V)
    h, W, t, gl = make_head(N, d, V, torch.float32, seed=14)
    with LargestOutput():
        loss, stats = K.lm_head_loss_forward(h, W, t, 30.0)
        dh, dW = K.lm_head_loss_backward(h, W, t, stats, gl, 30.0)
    assert LargestOutput.largest == 10 * V * 4 < N * V * 4
    torch.testing.assert_close(loss, reference.lm_head_loss(h, W, t, 30.0), rtol=1e-5, atol=1e-5)


def test_dispatch_selects_the_kernels():
    z, t, _ = make_ce(37, 97, torch.float32, 20.0, seed=10)
    with kernels.use_backend("triton", op="softcap_ce"):
        assert kernels.implementation("softcap_ce", "cpu")[0] == "triton"
        loss = kernels.softcap_ce(z, t, 30.0)
    with kernels.use_backend("triton", op="lm_head_loss"):
        assert kernels.implementation("lm_head_loss", "cpu")[0] == "triton"
    assert kernels.softcap_ce is not K and kernels.mlp is not MLP
    torch.testing.assert_close(loss, K.softcap_ce(z, t, 30.0), rtol=0, atol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_compile_fullgraph_no_graph_breaks(fused, monkeypatch):
    monkeypatch.setattr(K, "FUSED_HEAD", fused)
    h, W, t, gl = make_head(19, 16, 33, torch.float32, seed=12)

    def f(h, W):
        z = h @ W.t()
        return (kernels.lm_head_loss(h, W, t, 30.0) * gl).sum() + kernels.softcap_ce(z, t, 20.0).mean()

    leaves = [h.clone().requires_grad_(True), W.clone().requires_grad_(True)]
    with kernels.use_backend("triton"):
        assert_fullgraph_matches_eager(f, leaves)


# ---- GPU (bf16, realistic shapes) --------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("N", [2048, 16384])
def test_gpu_softcap_ce_bf16(N):
    V = 8192
    g = torch.Generator(device="cuda").manual_seed(N)
    z = (torch.randn(N, V, device="cuda", generator=g) * 10).bfloat16()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    gl = torch.full((N,), 1.0 / N, device="cuda")
    loss, dz = ce_run(K.softcap_ce, z, t, gl, 30.0)
    rl, rdz = ce_run(reference.softcap_ce, z, t, gl, 30.0)
    el, edz = ce_run(exact_softcap_ce, z.to(F64), t, gl.to(F64), 30.0)
    assert_error_within("loss", loss, rl, el)
    assert_error_within("dz", dz, rdz, edz)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_gpu_lm_head_loss_bf16(fused, monkeypatch):
    monkeypatch.setattr(K, "FUSED_HEAD", fused)
    N, d, V = 16384, 512, 8192  # fused: two chunks of 8192 rows
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, d, device="cuda", generator=g).bfloat16()
    W = torch.randn(V, d, device="cuda", generator=g) * 0.05
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    gl = torch.full((N,), 1.0 / N, device="cuda")
    loss, dh, dW = head_run(K.lm_head_loss, h, W, t, gl, 30.0)
    rl, rdh, rdW = head_run(reference.lm_head_loss, h, W, t, gl, 30.0)
    el, edh, edW = head_run(exact_head, h.to(F64), W.bfloat16().to(F64), t, gl.to(F64), 30.0)
    assert_error_within("loss", loss, rl, el)
    assert_error_within("dh", dh, rdh, edh)
    assert_error_within("dE", dW, rdW, edW)


@pytest.mark.gpu
def test_gpu_fused_head_peak_memory_below_one_logit_buffer():
    N, d, V = 65536, 512, 8192
    h = torch.randn(N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = (torch.randn(V, d, device="cuda") * 0.05).requires_grad_(True)
    t = torch.randint(0, V, (N,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    K.lm_head_loss(h, W, t, 30.0).mean().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < N * V * 2 / 2, f"peak {peak / 2**20:.0f} MiB vs full bf16 logits {N * V * 2 / 2**20:.0f} MiB"


# ---- benchmark definitions ---------------------------------------------------------------------------------------

def test_bench_cases_smoke_run_and_agree():
    from pgolf.bench.ops import softcap_ce as bench

    smoke = bench.cases(True, "cpu")
    assert {c.mode for c in smoke} == {"fwd", "fwd+bwd"} and all(c.baseline == "eager" for c in smoke)
    for case in smoke:
        outs = {name: fn() for name, fn in case.build().items()}
        expected = {"triton", "eager"} | ({"triton_unfused"} if case.name.startswith("lm_head_loss") else set())
        assert set(outs) == expected
        for name, out in outs.items():
            a = out if isinstance(out, tuple) else (out,)
            b = outs["eager"] if isinstance(outs["eager"], tuple) else (outs["eager"],)
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{case.name} {n}: {m}")
    full = bench.cases(False, "cuda")  # definitions only (build() would allocate on the GPU)
    assert {c.params["N"] for c in full} == {2048, 16384, 98304}
    assert all(c.baseline == "compiled" and c.params["dtype"] == "bfloat16" for c in full)
    assert len({c.name for c in full}) == len(full) == 12
    assert all(c.flops for c in full if c.name.startswith("lm_head_loss"))
    assert all(c.bytes_moved for c in full if c.name.startswith("softcap_ce"))
