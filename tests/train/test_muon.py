"""Newton-Schulz, Muon (single process and 2-rank gloo) and build_optimizers, checked against float64 formulas."""

from __future__ import annotations

import copy
import math
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pgolf.kernels
from pgolf.train.muon import (CLASSIC_COEFFS, POLAR_EXPRESS_COEFFS, Muon, ns_coefficients, orthogonality_error,
                              shape_scale)
from pgolf.train.optim import Optimizers, build_optimizers
from pgolf.utils import distributed_session

NAMES = ("classic", "polar_express")


# ----------------------------------------------------------------------------------------------------------
# float64 references, written independently of pgolf.kernels

def scalar_map(s: torch.Tensor, coeffs, steps: int = 5) -> torch.Tensor:
    """What NS does to each singular value s of the Frobenius-normalized input: s ← a s + b s³ + c s⁵."""
    for k in range(steps):
        a, b, c = coeffs[min(k, len(coeffs) - 1)]
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def ns_svd64(G: torch.Tensor, coeffs, steps: int = 5) -> torch.Tensor:
    """NS in exact arithmetic via the SVD: U diag(p(σ/‖G‖_F)) Vᵀ, float64. G: (m, n)."""
    G = G.double()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    return U @ torch.diag(scalar_map(S / G.norm(), coeffs, steps)) @ Vh


def ns_iter64(G: torch.Tensor, coeffs, steps: int = 5) -> torch.Tensor:
    """NS by the plain iteration in float64 on the wide orientation. G: (m, n)."""
    X = G.double() / (G.double().norm() + 1e-7)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for k in range(steps):
        a, b, c = coeffs[min(k, len(coeffs) - 1)]
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def muon_reference(W0s, grads_per_step, *, lr, mu, wd, nesterov, row_normalize, coeffs):
    """Direct float64 Muon: returns the final weights and momentum buffers."""
    Ws = [w.double().clone() for w in W0s]
    bufs = [torch.zeros_like(w) for w in Ws]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            g = g.double()
            bufs[i] = mu * bufs[i] + g
            u = g + mu * bufs[i] if nesterov else bufs[i].clone()
            if row_normalize:
                u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-7)
            rows, cols = u.shape
            Ws[i] = Ws[i] * (1 - lr * wd) - lr * math.sqrt(max(1.0, rows / cols)) * ns_iter64(u, coeffs)
    return Ws, bufs


class NSSpy:
    """Wraps pgolf.kernels.newton_schulz, recording (input, output) of each call."""

    def __init__(self, monkeypatch):
        self.real = pgolf.kernels.newton_schulz
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        monkeypatch.setattr(pgolf.kernels, "newton_schulz", self)

    def __call__(self, G, coefficients, steps=5, eps=1e-7, dtype=None):
        out = self.real(G, coefficients, steps=steps, eps=eps, dtype=dtype)
        self.calls.append((G.detach().clone(), out.detach().clone()))
        return out


def seeded(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# Newton-Schulz through the dispatch point

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(37, 64), (64, 37), (129, 50), (3, 40, 24)])
def test_ns_singular_values_in_float64_band(name, shape):
    coeffs = ns_coefficients(name)
    G = seeded(shape, 1)
    X = pgolf.kernels.newton_schulz(G, coeffs)
    assert X.shape == G.shape and X.dtype == torch.float32
    s_out = torch.linalg.svdvals(X.double())
    s_in = torch.linalg.svdvals(G.double()) / G.double().norm(dim=(-2, -1)).unsqueeze(-1)
    # The exact per-singular-value prediction of the iteration ...
    pred = scalar_map(s_in, coeffs)
    assert torch.allclose(s_out.sort(dim=-1).values, pred.sort(dim=-1).values, atol=5e-5)
    # ... and the band the composed polynomial maps [smallest input σ, 1] into (dense float64 grid).
    grid = torch.linspace(float(s_in.min()), 1.0, 200_001, dtype=torch.float64)
    img = scalar_map(grid, coeffs)
    lo, hi = float(img.min()), float(img.max())
    assert lo - 5e-5 <= float(s_out.min()) and float(s_out.max()) <= hi + 5e-5
    # The known bands: classic quintic about [0.68, 1.13], Polar Express about 1 ± 0.141.
    if name == "classic":
        assert 0.67 < lo < 0.69 and 1.12 < hi < 1.14
    else:
        assert 0.85 < lo < 0.87 and 1.13 < hi < 1.15
    assert orthogonality_error(X) <= max(1 - lo, hi - 1) + 5e-5


@pytest.mark.parametrize("name", NAMES)
def test_polar_express_band_holds_down_to_1e_minus_3(name):
    """PE's guarantee covers normalized σ down to 1e-3; the classic quintic falls out of its band there."""
    img = scalar_map(torch.logspace(-3, 0, 100_001, dtype=torch.float64), ns_coefficients(name))
    if name == "polar_express":
        assert float((img - 1).abs().max()) < 0.142
    else:
        assert float(img.min()) < 0.5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(37, 64), (129, 50)])
def test_ns_matches_float64_polar_form(name, shape):
    coeffs = ns_coefficients(name)
    G = seeded(shape, 2)
    X = pgolf.kernels.newton_schulz(G, coeffs).double()
    assert torch.allclose(X, ns_svd64(G, coeffs), atol=2e-5)
    assert torch.allclose(X, ns_iter64(G, coeffs), atol=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_ns_transpose_and_batch(name):
    coeffs = ns_coefficients(name)
    G = seeded((3, 29, 53), 3)
    X = pgolf.kernels.newton_schulz(G, coeffs)
    Xt = pgolf.kernels.newton_schulz(G.mT.contiguous(), coeffs)
    assert torch.allclose(Xt, X.mT, atol=1e-6)
    for i in range(3):
        assert torch.allclose(pgolf.kernels.newton_schulz(G[i], coeffs), X[i], atol=1e-6)


def test_coefficient_tables():
    assert ns_coefficients("classic") == CLASSIC_COEFFS == ((3.4445, -4.7750, 2.0315),)
    assert ns_coefficients("polar_express") is POLAR_EXPRESS_COEFFS and len(POLAR_EXPRESS_COEFFS) == 5
    assert POLAR_EXPRESS_COEFFS[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)
    assert POLAR_EXPRESS_COEFFS[4] == (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)
    with pytest.raises(ValueError, match="polar_express"):
        ns_coefficients("quintic")


def test_orthogonality_error():
    Q, _ = torch.linalg.qr(seeded((20, 12), 4).double())
    assert orthogonality_error(Q) < 1e-12
    assert orthogonality_error(Q.T) < 1e-12
    assert abs(orthogonality_error(torch.stack([Q, 2 * Q])) - 1.0) < 1e-12
    D = torch.diag(torch.tensor([1.0, 0.5, 1.25]))
    assert abs(orthogonality_error(D) - 0.5) < 1e-7
    with pytest.raises(ValueError):
        orthogonality_error(torch.ones(3))


# ----------------------------------------------------------------------------------------------------------
# Muon, one process

def test_muon_one_step_update_is_near_orthogonal():
    W0 = seeded((24, 40), 5)
    W = torch.nn.Parameter(W0.clone())
    W.grad = seeded((24, 40), 6)
    lr = 0.03
    Muon([W], lr=lr).step()
    delta = (W0 - W.detach()) / lr  # shape factor 1 (wide)
    s = torch.linalg.svdvals(delta.double())
    assert 0.67 < float(s.min()) and float(s.max()) < 1.14
    # it is NS of the Nesterov input (1+μ)G, i.e. NS(G) by scale invariance
    assert torch.allclose(delta.double(), ns_iter64(W.grad, CLASSIC_COEFFS), atol=2e-5)


def test_muon_shape_factor_and_decoupled_wd_direct(monkeypatch):
    spy = NSSpy(monkeypatch)
    tall = torch.nn.Parameter(seeded((32, 8), 7))
    wide = torch.nn.Parameter(seeded((8, 32), 8))
    W0 = [tall.detach().clone(), wide.detach().clone()]
    tall.grad, wide.grad = seeded((32, 8), 9), seeded((8, 32), 10)
    lr, wd = 0.05, 0.2
    Muon([tall, wide], lr=lr, weight_decay=wd).step()
    assert shape_scale(32, 8) == 2.0 and shape_scale(8, 32) == 1.0 and shape_scale(2048, 512) == 2.0
    outs = {tuple(o.shape[-2:]): o[0] for _, o in spy.calls}
    assert torch.allclose(tall.detach(), W0[0] * (1 - lr * wd) - lr * 2.0 * outs[(32, 8)], atol=1e-6)
    assert torch.allclose(wide.detach(), W0[1] * (1 - lr * wd) - lr * 1.0 * outs[(8, 32)], atol=1e-6)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("row_normalize", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_muon_three_steps_match_float64_formula(nesterov, row_normalize, name):
    shapes = [(32, 8), (8, 32), (16, 16), (32, 8)]
    W0s = [seeded(s, 20 + i) for i, s in enumerate(shapes)]
    grads = [[seeded(s, 100 * t + i) for i, s in enumerate(shapes)] for t in range(3)]
    kw = dict(lr=0.05, wd=0.1, nesterov=nesterov, row_normalize=row_normalize)
    params = [torch.nn.Parameter(w.clone()) for w in W0s]
    opt = Muon(params, lr=kw["lr"], momentum=0.9, nesterov=nesterov, weight_decay=kw["wd"],
               row_normalize=row_normalize, ns_coefficients=name)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    ref_W, ref_B = muon_reference(W0s, grads, mu=0.9, coeffs=ns_coefficients(name), **kw)
    for p, rw, rb in zip(params, ref_W, ref_B):
        assert torch.allclose(p.detach().double(), rw, atol=2e-5)
        buf = opt.state[p]["momentum_buffer"]
        assert buf.dtype == torch.float32
        assert torch.allclose(buf.double(), rb, atol=1e-5)


def test_muon_nesterov_vs_plain_ns_inputs(monkeypatch):
    spy = NSSpy(monkeypatch)
    g1, g2 = seeded((12, 20), 30), seeded((12, 20), 31)
    mu = 0.8
    inputs = {}
    for nesterov in (True, False):
        spy.calls.clear()
        p = torch.nn.Parameter(torch.zeros(12, 20))
        opt = Muon([p], lr=0.1, momentum=mu, nesterov=nesterov)
        for g in (g1, g2):
            p.grad = g.clone()
            opt.step()
        inputs[nesterov] = [c[0][0] for c in spy.calls]
    b1, b2 = g1, mu * g1 + g2
    assert torch.allclose(inputs[False][0], b1) and torch.allclose(inputs[False][1], b2, atol=1e-6)
    assert torch.allclose(inputs[True][0], g1 + mu * b1, atol=1e-6)
    assert torch.allclose(inputs[True][1], g2 + mu * b2, atol=1e-6)


def test_muon_row_normalize_makes_ns_input_rows_unit(monkeypatch):
    spy = NSSpy(monkeypatch)
    p = torch.nn.Parameter(torch.zeros(10, 30))
    g = seeded((10, 30), 40) * torch.logspace(-3, 2, 10).unsqueeze(1)  # rows of very different norms
    for row_normalize in (True, False):
        p.grad = g.clone()
        Muon([p], lr=0.1, momentum=0.5, row_normalize=row_normalize).step()
        U = spy.calls[-1][0][0]
        norms = U.double().norm(dim=1)
        if row_normalize:
            assert torch.allclose(norms, torch.ones(10, dtype=torch.float64), atol=1e-6)
            assert torch.allclose(U, g / g.norm(dim=1, keepdim=True), atol=1e-6)
        else:
            assert torch.allclose(U, 1.5 * g, rtol=1e-6)


def test_muon_batches_by_shape_same_as_alone(monkeypatch):
    spy = NSSpy(monkeypatch)
    shapes = [(16, 8), (8, 24), (16, 8), (12, 12), (16, 8), (8, 24)]
    W0s = [seeded(s, 50 + i) for i, s in enumerate(shapes)]
    G = [[seeded(s, 60 + 10 * t + i) for i, s in enumerate(shapes)] for t in range(2)]

    def run(groups):
        params = [torch.nn.Parameter(w.clone()) for w in W0s]
        opts = [Muon([params[i] for i in idx], lr=0.04, weight_decay=0.1, row_normalize=True) for idx in groups]
        for gs in G:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            for o in opts:
                o.step()
        return [p.detach() for p in params]

    spy.calls.clear()
    together = run([range(len(shapes))])
    batch_sizes = sorted((tuple(i.shape[1:]), i.shape[0]) for i, _ in spy.calls)
    assert batch_sizes == sorted([((16, 8), 3), ((8, 24), 2), ((12, 12), 1)] * 2)  # one call per shape per step
    alone = run([[i] for i in range(len(shapes))])
    for a, b in zip(together, alone):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_muon_skips_params_without_grad():
    a, b = torch.nn.Parameter(seeded((6, 4), 70)), torch.nn.Parameter(seeded((6, 4), 71))
    b0 = b.detach().clone()
    a.grad = seeded((6, 4), 72)
    opt = Muon([a, b], lr=0.1, weight_decay=0.5)
    opt.step()
    assert torch.equal(b.detach(), b0) and len(opt.state[b]) == 0 and "momentum_buffer" in opt.state[a]


def test_muon_bf16_params_keep_dtype():
    p = torch.nn.Parameter(seeded((8, 16), 73).bfloat16())
    p.grad = seeded((8, 16), 74).bfloat16()
    opt = Muon([p], lr=0.1)
    opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
    assert torch.isfinite(p.float()).all()


def test_muon_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))], lr=0.1)
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(2, 3, 4))], lr=0.1)
    p = [torch.nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(ValueError, match="coefficient"):
        Muon(p, lr=0.1, ns_coefficients="nope")
    with pytest.raises(ValueError, match="momentum"):
        Muon(p, lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="ns_steps"):
        Muon(p, lr=0.1, ns_steps=0)


# ----------------------------------------------------------------------------------------------------------
# Muon across 2 gloo ranks

DIST_SHAPES = [(16, 8), (12, 12), (16, 8), (8, 24), (16, 8), (12, 12), (10, 6)]
DIST_GROUPS = [[0, 1, 2, 3], [4, 5, 6]]  # two param groups with different hyperparameters
NO_GRAD = 6  # never gets a gradient


def _dist_problem():
    params = [torch.nn.Parameter(seeded(s, 200 + i)) for i, s in enumerate(DIST_SHAPES)]
    opt = Muon([{"params": [params[i] for i in DIST_GROUPS[0]]},
                {"params": [params[i] for i in DIST_GROUPS[1]], "lr": 0.02, "row_normalize": True,
                 "ns_coefficients": "polar_express", "nesterov": False}],
               lr=0.05, momentum=0.9, weight_decay=0.1)
    return params, opt


def _dist_run(params, opt):
    for t in range(3):
        for i, (p, s) in enumerate(zip(params, DIST_SHAPES)):
            p.grad = None if i == NO_GRAD else seeded(s, 1000 * t + i)
        opt.step()


def _expected_owner(world):
    """param index → owning rank: contiguous ceil(n/W) shards per (param group, shape), in group order."""
    owner = {}
    for idx in DIST_GROUPS:
        by_shape: dict = {}
        for i in idx:
            if i != NO_GRAD:
                by_shape.setdefault(DIST_SHAPES[i], []).append(i)
        for members in by_shape.values():
            shard = -(-len(members) // world)
            for j, i in enumerate(members):
                owner[i] = j // shard
    return owner


def _dist_worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    with distributed_session():
        params, opt = _dist_problem()
        _dist_run(params, opt)
        torch.save({"params": [p.detach().clone() for p in params],
                    "bufs": {i: opt.state[p]["momentum_buffer"].clone() for i, p in enumerate(params)
                             if "momentum_buffer" in opt.state[p]}},
                   Path(outdir) / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_bounded(fn, args, nprocs, timeout_s):
    """Run fn(rank, *args) in nprocs spawned processes; fail (killing them) after timeout_s."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed test did not finish within {timeout_s} s")


def test_muon_distributed_gloo_matches_single_process():
    assert not dist.is_initialized()
    params, opt = _dist_problem()
    _dist_run(params, opt)
    world = 2
    with tempfile.TemporaryDirectory() as d:
        spawn_bounded(_dist_worker, (world, free_port(), d), world, timeout_s=120)
        results = [torch.load(Path(d) / f"rank{r}.pt") for r in range(world)]
    owner = _expected_owner(world)
    assert set(owner.values()) == {0, 1}  # both ranks own something
    for r, res in enumerate(results):
        for i, p in enumerate(params):
            assert torch.equal(res["params"][i], p.detach()), f"rank {r}: param {i} differs from 1-process run"
        assert set(res["bufs"]) == {i for i, o in owner.items() if o == r}, f"rank {r} holds foreign momentum"
        for i, b in res["bufs"].items():
            assert torch.equal(b, opt.state[params[i]]["momentum_buffer"])


# ----------------------------------------------------------------------------------------------------------
# build_optimizers / Optimizers

def _toy_groups():
    torch.manual_seed(0)
    m = torch.nn.ModuleDict({"emb": torch.nn.Embedding(20, 8), "w1": torch.nn.Linear(8, 32, bias=False),
                             "w2": torch.nn.Linear(32, 8, bias=False)})
    m.scale = torch.nn.Parameter(torch.ones(8))
    groups = {"muon": [("w1", m["w1"].weight), ("w2", m["w2"].weight)], "tok": [("emb", m["emb"].weight)],
              "scalar": [("scale", m.scale)]}
    return m, groups


OPT_KW = dict(matrix_lr=0.02, muon_momentum=0.95, muon_wd=0.085, row_normalize=True, ns_steps=5,
              ns_coefficients="polar_express", tok_lr=0.03, tok_wd=0.085, scalar_lr=0.02, scalar_wd=0.02,
              betas=(0.9, 0.99), eps=1e-8)


def _loss(m):
    x = m["emb"](torch.arange(20) % 20)
    return (m["w2"](torch.relu(m["w1"](x))) * m.scale).square().mean()


def test_build_optimizers_groups_and_schedule_hooks():
    m, groups = _toy_groups()
    opts = build_optimizers(groups, **OPT_KW)
    assert isinstance(opts.muon, Muon) and isinstance(opts.adam, torch.optim.AdamW) and len(list(opts)) == 2
    names = {g["name"]: g for g in opts.param_groups}
    assert set(names) == {"muon", "tok", "scalar"}
    assert [names[k]["base_lr"] for k in ("muon", "tok", "scalar")] == [0.02, 0.03, 0.02]
    assert names["tok"]["weight_decay"] == 0.085 and names["scalar"]["weight_decay"] == 0.02
    assert names["muon"]["weight_decay"] == 0.085 and names["muon"]["row_normalize"] is True
    assert opts.adam.defaults["betas"] == (0.9, 0.99) and not opts.adam.defaults.get("fused")
    opts.set_lr_multiplier(0.25)
    assert [names[k]["lr"] for k in ("muon", "tok", "scalar")] == [0.005, 0.0075, 0.005]
    opts.set_muon_momentum(0.93)
    assert names["muon"]["momentum"] == 0.93
    _loss(m).backward()
    before = [p.detach().clone() for p in m.parameters()]
    opts.step()
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, m.parameters()))
    opts.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_build_optimizers_skips_empty_and_rejects_bad_groups():
    m, groups = _toy_groups()
    only_adam = build_optimizers({"muon": [], "tok": groups["tok"]}, **OPT_KW)
    assert only_adam.muon is None and [g["name"] for g in only_adam.param_groups] == ["tok"]
    only_muon = build_optimizers({"muon": groups["muon"], "tok": [], "scalar": []}, **OPT_KW)
    assert only_muon.adam is None and len(only_muon) == 1
    with pytest.raises(ValueError, match="unknown"):
        build_optimizers({"embed": groups["tok"]}, **OPT_KW)
    with pytest.raises(ValueError, match="twice"):
        build_optimizers({"tok": groups["tok"], "scalar": groups["tok"]}, **OPT_KW)
    with pytest.raises(ValueError, match="2-D"):
        build_optimizers({"muon": groups["scalar"]}, **OPT_KW)


def test_optimizers_state_dict_restore_replays_identically():
    """The trainer's warm-up restore: snapshot, step, restore weights + state, step again → same trajectory."""
    m, groups = _toy_groups()
    opts = build_optimizers(groups, **OPT_KW)
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    s0 = copy.deepcopy(opts.state_dict())

    def train(n):
        for _ in range(n):
            opts.zero_grad()
            _loss(m).backward()
            opts.step()
        return {k: v.clone() for k, v in m.state_dict().items()}

    first = train(3)
    opts.set_lr_multiplier(0.1)
    m.load_state_dict(w0)
    opts.load_state_dict(s0)
    assert opts.param_groups[0]["lr"] == 0.02  # lr restored too
    second = train(3)
    for k in first:
        assert torch.equal(first[k], second[k]), k
    with pytest.raises(KeyError):
        build_optimizers({"tok": groups["tok"]}, **OPT_KW).load_state_dict(s0)
    assert isinstance(opts, Optimizers)
