"""Triton batched Newton-Schulz (pgolf.kernels.newton_schulz) against the reference and float64.

CPU: the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) in fp32/fp16 (and
bf16 through the interpreter's fp32 upcast). bf16 at the record bank shapes is @pytest.mark.gpu. The float64
expectations (the plain iteration, and the scalar polynomial applied to the singular values) are written out here.
"""

from __future__ import annotations

import functools
import importlib
import os

import pytest
import torch

import pgolf.kernels
from pgolf.kernels import launcher, reference
from pgolf.train.muon import CLASSIC_COEFFS, POLAR_EXPRESS_COEFFS

ns = importlib.import_module("pgolf.kernels.newton_schulz")
GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
COEFFS = {"classic": CLASSIC_COEFFS, "polar_express": POLAR_EXPRESS_COEFFS}
# σ_out range the 5-step polynomial gives for normalized σ_in in [0.01, 1] (float64 scan of the scalar map)
BAND = {"classic": (0.6818, 1.1344), "polar_express": (0.8588, 1.1412)}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_g(shape, seed: int, dtype=torch.float32, device=DEV) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def scalar_map(s: torch.Tensor, coeffs, steps: int = 5) -> torch.Tensor:
    for k in range(steps):
        a, b, c = coeffs[min(k, len(coeffs) - 1)]
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def ns_iter64(G: torch.Tensor, coeffs, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The plain iteration in float64, per matrix, on the wide orientation. G: (m, n) or (B, m, n)."""
    X = G.double()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    for k in range(steps):
        a, b, c = coeffs[min(k, len(coeffs) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


@functools.lru_cache(maxsize=None)
def kernel_result(shape: tuple, name: str, dtype=torch.float32, seed: int = 0):
    """(G, kernel output) for one case, shared by the tests below (the interpreter is slow)."""
    G = make_g(shape, seed=hash((shape, seed)) % 1000)
    return G, ns.newton_schulz(G.to(dtype), COEFFS[name], 5, 1e-7, dtype)


# (m, n, batch): batch None is a plain (m, n) matrix; the 100x129 bank is kept at 2 to bound interpreter time
CASES = [(37, 64, None), (37, 64, 3), (64, 37, None), (64, 37, 3), (100, 129, None), (100, 129, 2)]


def _shape(m, n, b):
    return (m, n) if b is None else (b, m, n)


@pytest.mark.parametrize("name", list(COEFFS))
@pytest.mark.parametrize("m,n,b", CASES)
def test_matches_reference_fp32(m, n, b, name):
    G, Y = kernel_result(_shape(m, n, b), name)
    ref = reference.newton_schulz(G, COEFFS[name], 5, 1e-7, torch.float32)
    assert Y.shape == G.shape and Y.dtype == torch.float32
    torch.testing.assert_close(Y, ref, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(Y.double(), ns_iter64(G, COEFFS[name]), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", list(COEFFS))
@pytest.mark.parametrize("m,n,b", [c for c in CASES if c[2] is not None])
def test_singular_values_follow_the_polynomial(m, n, b, name):
    """Each output σ is p(σ_in/‖G‖_F) (p = the 5-step scalar polynomial), so they lie in p's band near 1."""
    G, Y = kernel_result(_shape(m, n, b), name)
    s_out = torch.linalg.svdvals(Y.double())
    s_in = torch.linalg.svdvals(G.double()) / G.double().norm(dim=(-2, -1))[:, None]
    assert s_in.min() >= 0.01  # inside the scanned range of BAND
    want = scalar_map(s_in, COEFFS[name]).sort(dim=-1).values
    torch.testing.assert_close(s_out.sort(dim=-1).values, want, rtol=0, atol=5e-5)
    lo, hi = BAND[name]
    assert s_out.min() >= lo - 1e-4 and s_out.max() <= hi + 1e-4


@pytest.mark.parametrize("name", list(COEFFS))
@pytest.mark.parametrize("shape", [(2, 37, 64), (64, 37)])
def test_fp16_error_comparable_to_reference(shape, name):
    G = make_g(shape, seed=5)
    Y = ns.newton_schulz(G, COEFFS[name], 5, 1e-7, torch.float16)
    assert Y.dtype == torch.float16 and torch.isfinite(Y).all()
    truth = ns_iter64(G, COEFFS[name])
    err_k = (Y.double() - truth).abs().max().item()
    err_r = (reference.newton_schulz(G, COEFFS[name], 5, 1e-7, torch.float16).double() - truth).abs().max().item()
    assert err_k <= 1.5 * err_r + 1e-4


def test_bf16_through_the_interpreter_upcast():
    G = make_g((2, 37, 64), seed=6)
    Y = ns.newton_schulz(G, POLAR_EXPRESS_COEFFS, 5, 1e-7, torch.bfloat16)
    assert Y.dtype == torch.bfloat16
    truth = ns_iter64(G, POLAR_EXPRESS_COEFFS)
    err_k = (Y.double() - truth).abs().max().item()
    err_r = (reference.newton_schulz(G, POLAR_EXPRESS_COEFFS, 5, 1e-7, torch.bfloat16).double() - truth).abs().max()
    assert err_k <= 1.5 * err_r.item() + 1e-3


def test_nan_poisoned_buffers_are_fully_written(monkeypatch):
    """Output, ping-pong, Gram/polynomial and partial-sum buffers start as NaN: every tile (incl. mirrored ones)
    must be written. Small tiles give several triangle rows (p=50 → 4 tile rows, 10 lower tiles); odd and even
    step counts start the ping-pong in either buffer."""
    monkeypatch.setattr(launcher, "POISON", True)
    cfg = dict(norm=dict(BLOCK_M=32, BLOCK_N=32), sym=dict(BLOCK=16, BK=64), update=dict(BM=16, BN=64, BK=64))
    for shape, steps in [((2, 50, 100), 1), ((100, 50), 2)]:
        G = make_g(shape, seed=7)
        Y = ns.launch(G, CLASSIC_COEFFS, steps, 1e-7, torch.float32, config=cfg)
        assert torch.isfinite(Y).all()
        torch.testing.assert_close(Y, reference.newton_schulz(G, CLASSIC_COEFFS, steps, 1e-7, torch.float32),
                                   rtol=1e-4, atol=2e-5)


def test_strided_input_views():
    """Non-contiguous G: a transposed view (so tall/wide flip relative to memory) and a sliced batch."""
    base = make_g((3, 64, 80), seed=8)
    for G in (base[:, 3:40, :].mT, base[::2, :, 5:42]):
        assert not G.is_contiguous()
        Y = ns.newton_schulz(G, CLASSIC_COEFFS, 5, 1e-7, torch.float32)
        torch.testing.assert_close(Y, reference.newton_schulz(G.contiguous(), CLASSIC_COEFFS, 5, 1e-7,
                                                              torch.float32), rtol=1e-4, atol=2e-5)


def test_zero_steps_is_the_normalization_and_zero_matrix_is_finite():
    G = make_g((2, 37, 64), seed=9)
    Y = ns.newton_schulz(G, CLASSIC_COEFFS, 0, 1e-7, torch.float32)
    torch.testing.assert_close(Y, G / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7))
    Z = ns.newton_schulz(torch.zeros(37, 64, device=DEV), CLASSIC_COEFFS, 2, 1e-7, torch.float32)
    assert torch.equal(Z, torch.zeros_like(Z))


def _sparse_tensor(path, numel: int, dtype) -> torch.Tensor:
    """A file-backed tensor of ``numel`` elements that is only virtual memory (sparse file, shared mmap)."""
    with open(path, "wb") as f:
        f.truncate(numel * torch.empty((), dtype=dtype).element_size())
    if os.stat(path).st_blocks * 512 > 1 << 24:
        pytest.skip("filesystem without sparse files")
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype)


@pytest.mark.skipif(GPU, reason="the CPU int64 probe; the GPU has test_gpu_int64_batch_offsets")
def test_int64_offsets_with_a_huge_batch_stride(tmp_path):
    """G = 3 matrices 2^30+64 elements apart (an int32-sized stride): matrix 2 starts past 2^31 elements, so an
    int32 offset wraps. The view starts 2^31 elements into a sparse storage, so a wrapped offset reads zeros there
    (a wrong result) rather than faulting."""
    m, n, stride, base = 37, 64, 2 ** 30 + 64, 2 ** 31
    G0 = make_g((3, m, n), seed=10, dtype=torch.float16, device="cpu")
    G = _sparse_tensor(tmp_path / "g.bin", base + 2 * stride + m * n, torch.float16).as_strided(
        (3, m, n), (stride, n, 1), base)
    G.copy_(G0)
    assert 2 * stride >= 2 ** 31
    Y = ns.newton_schulz(G, CLASSIC_COEFFS, 5, 1e-7, torch.float32)
    torch.testing.assert_close(Y, reference.newton_schulz(G0, CLASSIC_COEFFS, 5, 1e-7, torch.float32),
                               rtol=1e-4, atol=2e-5)


def test_dispatch_custom_op_and_torch_compile_fullgraph():
    G = make_g((2, 37, 64), seed=11)
    with pgolf.kernels.use_backend("triton", op="newton_schulz"):
        assert pgolf.kernels.implementation("newton_schulz", G.device.type) == ("triton", ns.newton_schulz)
        Y = pgolf.kernels.newton_schulz(G, POLAR_EXPRESS_COEFFS, steps=5, dtype=torch.float32)
    torch.testing.assert_close(Y, reference.newton_schulz(G, POLAR_EXPRESS_COEFFS, 5, 1e-7, torch.float32),
                               rtol=1e-4, atol=2e-5)

    def f(g):
        return ns.newton_schulz(g * 1.0, POLAR_EXPRESS_COEFFS, 5, 1e-7, torch.float32).sum(dim=0)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(G), Y.sum(dim=0), rtol=1e-5, atol=1e-6)


def test_argument_errors():
    G = make_g((37, 64), seed=12)
    with pytest.raises(RuntimeError, match="no autograd"):
        ns.newton_schulz(G.clone().requires_grad_(True), CLASSIC_COEFFS, 5, 1e-7, torch.float32)
    with pytest.raises(ValueError, match="triples"):
        ns.newton_schulz(G, ((1.0, 2.0),), 5, 1e-7, torch.float32)
    with pytest.raises(ValueError, match="shape"):
        ns.newton_schulz(G[0], CLASSIC_COEFFS, 5, 1e-7, torch.float32)


# ---- GPU: bf16 at the record bank shapes, real int64 sizes ------------------------------------------------------

BANKS = [(22, 512, 512), (22, 256, 512), (11, 2048, 512), (11, 512, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(COEFFS))
@pytest.mark.parametrize("shape", BANKS)
def test_gpu_bf16_record_banks(shape, name):
    G = make_g(shape, seed=13)
    Y = ns.newton_schulz(G.bfloat16(), COEFFS[name], 5, 1e-7, torch.bfloat16)
    assert Y.shape == G.shape and Y.dtype == torch.bfloat16
    truth = ns_iter64(G.bfloat16(), COEFFS[name])
    ref = reference.newton_schulz(G.bfloat16(), COEFFS[name], 5, 1e-7, torch.bfloat16)
    err_k = (Y.double() - truth).abs().amax(dim=(-2, -1))
    err_r = (ref.double() - truth).abs().amax(dim=(-2, -1))
    assert (err_k <= 1.5 * err_r + 1e-3).all()
    s = torch.linalg.svdvals(Y.double())
    lo, hi = BAND[name]
    assert s.max() <= hi + 0.05  # bf16 rounding on top of the polynomial's band


@pytest.mark.gpu
def test_gpu_int64_batch_offsets():
    """B·m·n > 2^31 elements: the last matrices (offsets past int32) must match the reference."""
    B, m, n = 2 ** 31 // (512 * 512) + 4, 512, 512
    G = torch.randn(B, m, n, device="cuda", dtype=torch.bfloat16)
    Y = ns.newton_schulz(G, CLASSIC_COEFFS, 5, 1e-7, torch.bfloat16)
    tail = G[-3:]
    ref = reference.newton_schulz(tail, CLASSIC_COEFFS, 5, 1e-7, torch.bfloat16)
    truth = ns_iter64(tail, CLASSIC_COEFFS)
    err_k = (Y[-3:].double() - truth).abs().max().item()
    err_r = (ref.double() - truth).abs().max().item()
    assert err_k <= 1.5 * err_r + 1e-3
