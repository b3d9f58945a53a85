"""GPTQ, SDClip and LQER against their formulas and against round-to-nearest on real-shaped layers."""

from __future__ import annotations

import pytest
import torch

from pgolf.quant.gptq import (dequantize, gptq_quantize, hessian_error, qmax, quantize_rtn, sdclip_scales)
from pgolf.quant.lqer import lqer_delta, lqer_factors


def correlated_hessian(K: int, n: int = 2048, seed: int = 0, dead: int = 0) -> torch.Tensor:
    """A realistic input Hessian: activations with a decaying spectrum, correlated channels, uneven scales,
    a few outlier channels, averaged like the calibration (XᵀX / n)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, K, generator=g)
    mix = torch.randn(K, K, generator=g) / K ** 0.5
    spectrum = torch.linspace(1.0, 0.02, K) ** 2
    X = (Z * spectrum.sqrt()) @ (torch.eye(K) + mix)
    X = X * torch.exp(0.5 * torch.randn(K, generator=g))  # per-channel scale
    X[:, :4] *= 8.0  # outlier channels
    if dead:
        X[:, -dead:] = 0.0
    return X.t() @ X / n


def weights(N: int, K: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * 0.02 * torch.exp(0.3 * torch.randn(N, 1, generator=g))


@pytest.mark.parametrize("bits,k", [(6, 12.85), (7, 15.0), (8, 20.0)])
def test_sdclip_scales_are_k_std_over_Q_in_fp16(bits, k):
    W = weights(64, 256)
    W[3] = 0.25  # a constant row: std 0 → falls back to absmax/Q
    W[5] = 0.0  # an all-zero row → 1
    s = sdclip_scales(W, bits, k)
    Q = 2 ** (bits - 1) - 1
    assert s.dtype == torch.float16 and s.shape == (64,)
    expect = (k * W.float().std(dim=1) / Q).to(torch.float16)
    keep = torch.ones(64, dtype=torch.bool)
    keep[[3, 5]] = False
    assert torch.equal(s[keep], expect[keep])
    assert s[3] == torch.tensor(0.25 / Q).half() and s[5] == 1.0
    assert qmax(6) == 31 and qmax(7) == 63 and qmax(8) == 127


def test_rtn_is_clamped_round_of_w_over_s_and_dequant_is_fp32_multiply():
    W = weights(32, 128) * 5
    s = sdclip_scales(W, 6, 2.0)  # small k: values beyond 2 std clip
    q = quantize_rtn(W, s, 6)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 31
    assert torch.equal(q, torch.clamp(torch.round(W / s.float()[:, None]), -31, 31).to(torch.int8))
    assert torch.equal(dequantize(q, s, torch.bfloat16), (q.float() * s.float()[:, None]).to(torch.bfloat16))


@pytest.mark.parametrize("N,K", [(512, 512), (2048, 512)])
def test_gptq_beats_round_to_nearest_on_real_shaped_layers(N, K):
    H = correlated_hessian(K, n=1024)
    W = weights(N, K)
    for bits, k in ((6, 12.85), (8, 20.0)):
        q, s = gptq_quantize(W, H, bits, k)
        assert q.dtype == torch.int8 and int(q.abs().max()) <= qmax(bits)
        assert torch.equal(s, sdclip_scales(W, bits, k))  # same scales as RTN: only the rounding differs
        err_gptq = hessian_error(W, dequantize(q, s), H)
        err_rtn = hessian_error(W, dequantize(quantize_rtn(W, s, bits), s), H)
        assert err_gptq < 0.8 * err_rtn, (N, K, bits, err_gptq, err_rtn)


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest():
    """With H diagonal, H⁻¹'s Cholesky factor is diagonal: no error is propagated, so GPTQ rounds to nearest."""
    W = weights(16, 64)
    H = torch.diag(torch.rand(64) + 0.5)
    q, s = gptq_quantize(W, H, 6, 12.85, block_size=8)
    assert torch.equal(q, quantize_rtn(W, s, 6))


def _reference_gptq(W, H, bits, s, damp=0.01):
    """Column-by-column GPTQ without blocks, in float64, written from the description (act-order, damping)."""
    W = W.double().clone()
    H = H.double().clone()
    Q = qmax(bits)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    W, H = W[:, perm], H[perm][:, perm]
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    sd = s.double()
    q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        q[:, j] = torch.clamp(torch.round(W[:, j] / sd), -Q, Q)
        err = (W[:, j] - q[:, j] * sd) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return q[:, torch.argsort(perm)]


def test_blocked_gptq_matches_the_column_by_column_algorithm_and_handles_dead_columns():
    H = correlated_hessian(96, n=512, seed=3, dead=5)
    W = weights(24, 96, seed=4)
    q, s = gptq_quantize(W, H, 6, 12.85, block_size=16)
    ref = _reference_gptq(W, H, 6, s)
    assert (q.double() == ref).float().mean() > 0.99  # fp32 vs fp64 may flip a rare rounding tie
    assert torch.equal(q[:, -5:], torch.zeros_like(q[:, -5:]))  # dead columns are zeroed
    q2, s2 = gptq_quantize(W, H, 6, 12.85, block_size=16)
    assert torch.equal(q, q2) and torch.equal(s, s2)  # deterministic
    q3, _ = gptq_quantize(W, H, 6, 12.85, block_size=128)
    assert (q3 == q).float().mean() > 0.99  # blocking changes only the order of the same updates


def test_lqer_factors_follow_the_spec_and_reduce_the_error():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(128, 4, generator=g) @ torch.randn(4, 256, generator=g) * 0.01 + 0.001 * torch.randn(128, 256,
                                                                                                         generator=g)
    f = lqer_factors(E, 4)
    assert f["b_mode"] == "group64" and f["a_q"].shape == (128, 4) and f["b_q"].shape == (4, 256)
    assert int(f["a_q"].min()) >= -2 and int(f["a_q"].max()) <= 1
    assert int(f["b_q"].min()) >= -8 and int(f["b_q"].max()) <= 7
    assert f["a_scale"].dtype == torch.float16 and f["b_scale"].shape == (4 * 256 // 64,)
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    A, B = U[:, :4] * S[:4], Vh[:4]
    assert f["a_scale"] == (A.abs().max() / 1.5).half()
    assert torch.equal(f["b_scale"], (B.reshape(-1, 64).abs().amax(1) / 7.5).half())
    assert torch.linalg.norm(E - lqer_delta(f)) < 0.7 * torch.linalg.norm(E)
    odd = lqer_factors(torch.randn(10, 30, generator=g), 4)  # 4·30 is not a multiple of 64: per-row int4
    assert odd["b_mode"] == "row" and odd["b_scale"].shape == (4,) and int(odd["b_q"].abs().max()) <= 7
