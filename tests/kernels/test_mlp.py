"""The fused LeakyReLU(s)² MLP kernel (pgolf.kernels.mlp) against the reference and a float64 computation.

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), with fp32, fp16 and bf16
inputs (bf16 dot operands are upcast there). Outputs are NaN-poisoned before every launch, so a tile the kernel
fails to write shows up as NaN. Error rule for every output and gradient: the kernel's max-abs error against a
float64 computation on the same (rounded) inputs must be at most 2× the PyTorch reference's error at the same
dtype, plus a few unit roundoffs of the output's scale (EPS_UNITS).
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

K = importlib.import_module("pgolf.kernels.mlp")



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launcher, "POISON", True)



def make_inputs(M: int, d: int, H: int, dtype: torch.dtype, seed: int, lead: tuple[int, ...] = ()):
    g = gen(seed)
    x = torch.randn(*lead, M, d, generator=g).to(dtype)
    w1 = (torch.randn(H, d, generator=g) / math.sqrt(d)).to(dtype)
    w2 = (torch.randn(d, H, generator=g) / math.sqrt(H)).to(dtype)
    gy = torch.randn(*lead, M, d, generator=g).to(dtype)
    return x, w1, w2, gy


def run(fn, x, w1, w2, gy, slope):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w1, w2)]
    y = fn(*leaves, slope)
    grads = torch.autograd.grad(y, leaves, gy.to(y.dtype))
    return (y.detach(), *grads)


# ---- forward and every gradient ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("slope", [0.5, 0.0])
@pytest.mark.parametrize("M,d,H,lead", [(37, 48, 100, ()), (19, 16, 129, (2,))], ids=["37x48x100", "2x19x16x129"])
def test_forward_and_grads_vs_float64(dtype, slope, M, d, H, lead):
    x, w1, w2, gy = make_inputs(M, d, H, dtype, seed=M + H + int(slope * 10), lead=lead)
    got = run(K.mlp, x, w1, w2, gy, slope)
    ref = run(reference.mlp, x, w1, w2, gy, slope)
    exact = run(reference.mlp, x.to(F64), w1.to(F64), w2.to(F64), gy, slope)
    for name, a, r, e in zip(("y", "dx", "dW1", "dW2"), got, ref, exact):
        assert a.dtype == dtype
        assert_error_within(name, a, r, e)


def test_negative_slope_is_relu_like_the_reference():
    x, w1, w2, gy = make_inputs(37, 48, 100, torch.float32, seed=3)
    got = run(K.mlp, x, w1, w2, gy, -0.3)
    ref = run(reference.mlp, x, w1, w2, gy, -0.3)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_other_slope_and_derivative_formula():
    """φ'(p) = 2p (p > 0), 2s²p (p ≤ 0): checked on a single hidden unit against the closed form."""
    s = 0.25
    x = torch.tensor([[1.5], [-2.0], [0.75]])
    w1 = torch.ones(1, 1)
    w2 = torch.ones(1, 1)
    xl = x.clone().requires_grad_(True)
    y = K.mlp(xl, w1, w2, s)
    (dx,) = torch.autograd.grad(y.sum(), xl)
    p = x[:, 0]
    torch.testing.assert_close(y[:, 0], torch.where(p > 0, p * p, s * s * p * p))
    torch.testing.assert_close(dx[:, 0], torch.where(p > 0, 2 * p, 2 * s * s * p))


# ---- the forward epilogue's outputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("H", [100, 129, 8])
def test_post_and_sign_bits(H):
    x, w1, _, _ = make_inputs(37, 48, H, torch.float32, seed=H)
    post, bits = K.mlp_up_forward(x, w1, 0.5)
    pre = x.to(F64) @ w1.to(F64).t()
    assert bits.dtype == torch.uint8 and bits.shape == (37, (H + 7) // 8)
    want = torch.where(pre > 0, pre, 0.5 * pre) ** 2
    torch.testing.assert_close(post.to(F64), want, rtol=1e-5, atol=1e-6)
    unpacked = ((bits.to(torch.int64).unsqueeze(-1) >> torch.arange(8)) & 1).reshape(37, -1)
    sure = pre.abs() > 1e-4  # the sign of a near-zero pre may differ from fp32 rounding
    assert torch.equal((unpacked[:, :H] == 1)[sure], (pre > 0)[sure])
    assert not unpacked[:, H:].any(), "padding bits past the last hidden column must be 0"


def test_unwritten_tile_would_fail(monkeypatch):
    """A launch that skips tiles (grid too small) leaves NaNs, which the error check rejects."""
    x, w1, w2, gy = make_inputs(37, 48, 100, torch.float32, seed=1)
    real = K.UP_FWD.fn

    class _Short:
        def __getitem__(self, grid):
            return real[(grid[0] - 1,)]

    monkeypatch.setattr(K.UP_FWD, "fn", _Short())
    post, _ = K.mlp_up_forward(x, w1, 0.5)
    assert torch.isnan(post).any()
    with pytest.raises(AssertionError, match="non-finite"):
        assert_error_within("post", post, post.nan_to_num(), post.nan_to_num())


def test_empty_batch():
    x = torch.zeros(0, 48)
    w1 = torch.randn(100, 48)
    w2 = torch.randn(48, 100)
    assert K.mlp(x, w1, w2, 0.5).shape == (0, 48)


def test_float64_falls_back_to_reference():
    x, w1, w2, _ = make_inputs(5, 8, 12, F64, seed=0)
    torch.testing.assert_close(K.mlp(x, w1, w2, 0.5), reference.mlp(x, w1, w2, 0.5), rtol=0, atol=0)


def test_fp32_weights_with_fp16_activations_give_fp32_weight_grads():
    """The model keeps fp32 weights and casts them to the compute dtype, like the reference."""
    x, w1, w2, gy = make_inputs(37, 48, 100, torch.float16, seed=5)
    w1f, w2f = w1.float().requires_grad_(True), w2.float().requires_grad_(True)
    y = K.mlp(x, w1f, w2f, 0.5)
    assert y.dtype == torch.float16
    d1, d2 = torch.autograd.grad(y, (w1f, w2f), gy)
    assert d1.dtype == d2.dtype == torch.float32


def test_autocast_computes_in_the_autocast_dtype():
    x, w1, w2, gy = make_inputs(37, 48, 100, torch.float32, seed=17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(K.mlp, x, w1, w2, gy, 0.5)
        ref = run(reference.mlp, x, w1, w2, gy, 0.5)
    assert got[0].dtype == ref[0].dtype == torch.bfloat16
    assert [g.dtype for g in got[1:]] == [torch.float32] * 3  # gradients of the fp32 leaves
    xb, w1b, w2b = (t.bfloat16().to(F64) for t in (x, w1, w2))
    exact = run(reference.mlp, xb, w1b, w2b, gy, 0.5)
    assert_error_within("y", got[0], ref[0], exact[0])
    for name, a, r, e in zip(("dx", "dW1", "dW2"), got[1:], ref[1:], exact[1:]):
        assert_error_within(name, a.bfloat16(), r.bfloat16(), e)


# ---- dispatch, saved memory, torch.compile -----------------------------------------------------------------------

def test_dispatch_selects_the_kernel():
    x, w1, w2, _ = make_inputs(37, 48, 100, torch.float32, seed=7)
    with kernels.use_backend("triton", op="mlp"):
        name, fn = kernels.implementation("mlp", "cpu")
        y = kernels.mlp(x, w1, w2, 0.5)
    assert name == "triton"
    assert kernels.mlp is not K  # the dispatch function, not the module
    torch.testing.assert_close(y, K.mlp(x, w1, w2, 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_saves_one_hidden_buffer_plus_a_bit_mask(dtype):
    M, d, H = 37, 48, 100
    x, w1, w2, _ = make_inputs(M, d, H, dtype, seed=11)
    inputs = [t.requires_grad_(True) for t in (x, w1, w2)]
    got, shapes = saved_activation_bytes(lambda a, b, c: K.mlp(a, b, c, 0.5), inputs)
    es = torch.finfo(dtype).bits // 8
    assert got == M * H * es + M * math.ceil(H / 8), shapes
    ref, ref_shapes = saved_activation_bytes(lambda a, b, c: reference.mlp(a, b, c, 0.5), inputs)
    assert ref >= 2 * M * H * es, ref_shapes  # the reference (and the records) keep pre and post
    assert got <= ref / 2 + M * math.ceil(H / 8)


def test_compile_fullgraph_no_graph_breaks():
    x, w1, w2, gy = make_inputs(19, 16, 40, torch.float32, seed=13, lead=(2,))

    def f(x, w1, w2):
        return (kernels.mlp(x, w1, w2, 0.5) * gy).sum()

    leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2)]
    with kernels.use_backend("triton", op="mlp"):
        assert_fullgraph_matches_eager(f, leaves)


# ---- GPU (bf16, realistic shapes) --------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("M", [2048, 16384])
@pytest.mark.parametrize("slope", [0.5, 0.0])
def test_gpu_bf16_record_shapes(M, slope):
    d, H = 512, 2048
    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn(M, d, device="cuda", generator=g).bfloat16()
    w1 = (torch.randn(H, d, device="cuda", generator=g) / math.sqrt(d)).bfloat16()
    w2 = (torch.randn(d, H, device="cuda", generator=g) / math.sqrt(H)).bfloat16()
    gy = torch.randn(M, d, device="cuda", generator=g).bfloat16()
    got = run(K.mlp, x, w1, w2, gy, slope)
    ref = run(reference.mlp, x, w1, w2, gy, slope)
    exact = run(reference.mlp, x.to(F64), w1.to(F64), w2.to(F64), gy, slope)
    for name, a, r, e in zip(("y", "dx", "dW1", "dW2"), got, ref, exact):
        assert_error_within(name, a, r, e)


@pytest.mark.gpu
def test_gpu_saved_bytes_and_compile():
    M, d, H = 4096, 512, 2048
    x = torch.randn(M, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = torch.randn(H, d, device="cuda", requires_grad=True)
    w2 = torch.randn(d, H, device="cuda", requires_grad=True)
    got, _ = saved_activation_bytes(lambda a, b, c: K.mlp(a, b.bfloat16(), c.bfloat16(), 0.5), [x, w1, w2])
    # the bf16 weight copies are saved too (as by the reference); activations: post + bits
    assert got == M * H * 2 + M * H // 8 + 2 * H * d * 2
    with kernels.use_backend("triton", op="mlp"):
        f = torch.compile(lambda a, b, c: kernels.mlp(a, b, c, 0.5).float().square().sum(), fullgraph=True)
        f(x, w1, w2).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---- benchmark definitions ---------------------------------------------------------------------------------------

def test_bench_cases_smoke_run_and_agree():
    from pgolf.bench.ops import mlp as bench

    smoke = bench.cases(True, "cpu")
    assert {c.mode for c in smoke} == {"fwd", "fwd+bwd"} and all(c.flops and c.baseline == "eager" for c in smoke)
    for case in smoke:
        outs = {name: fn() for name, fn in case.build().items()}
        assert set(outs) == {"triton", "eager"}
        a, b = outs["triton"], outs["eager"]
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    full = bench.cases(False, "cuda")  # definitions only (build() would allocate on the GPU)
    assert {c.params["M"] for c in full} == {2048, 16384, 98304}
    assert all(c.baseline == "compiled" and c.params["dtype"] == "bfloat16" for c in full)
    assert len({c.name for c in full}) == len(full) == 6
