"""Muon with the Triton Newton-Schulz (selected through the dispatch) matches Muon on the reference path.

CPU: the kernels run under the Triton interpreter (tests/conftest.py), fp32 Newton-Schulz. Small odd shapes,
several same-shape matrices per bucket (batched NS), tall and wide, a few steps.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import pgolf.kernels
from pgolf.train.muon import Muon, orthogonality_error

SHAPES = [(37, 24), (37, 24), (24, 40), (24, 40), (24, 40), (16, 16)]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_muon(backend: str, coeffs: str, steps: int = 2, **opts):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]
    opt = Muon(params, lr=0.02, momentum=0.9, weight_decay=0.01, ns_coefficients=coeffs, **opts)
    with pgolf.kernels.use_backend(backend, op="newton_schulz"):
        for step_grads in grads:
            for p, gr in zip(params, step_grads):
                p.grad = gr.clone()
            opt.step()
    return [p.detach().clone() for p in params], [opt.state[p]["momentum_buffer"].clone() for p in params]


@pytest.mark.parametrize("coeffs,opts", [("classic", dict(nesterov=True, row_normalize=False)),
                                         ("polar_express", dict(nesterov=True, row_normalize=True))])
def test_muon_steps_match_reference_path(coeffs, opts):
    w_ref, b_ref = run_muon("reference", coeffs, **opts)
    w_tri, b_tri = run_muon("triton", coeffs, **opts)
    for a, b in zip(b_tri, b_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(w_tri, w_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


def test_triton_ns_is_what_muon_used():
    """The Triton implementation is the one the dispatch hands Muon, and its update is near-orthogonal."""
    ns = importlib.import_module("pgolf.kernels.newton_schulz")
    calls = []

    def spy(G, coefficients, steps=5, eps=1e-7, dtype=torch.float32):
        out = ns.newton_schulz(G, coefficients, steps, eps, dtype)
        calls.append((tuple(G.shape), out))
        return out

    saved = pgolf.kernels._IMPLS["newton_schulz"]["triton"]
    pgolf.kernels.register("newton_schulz", "triton", spy)
    try:
        run_muon("triton", "polar_express", steps=1)
    finally:
        pgolf.kernels.register("newton_schulz", "triton", saved)
    assert sorted(s for s, _ in calls) == [(1, 16, 16), (2, 37, 24), (3, 24, 40)]  # one batched call per shape
    for _, out in calls:
        assert orthogonality_error(out) < 0.2
