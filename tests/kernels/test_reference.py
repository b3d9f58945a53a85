"""pgolf.kernels.reference and the op dispatch, checked against direct float64 implementations of the spec.

Every expected value here is computed from the formula (reference-stack 2.4-2.5, 2.9, 3.2) written out in the
test, never with the package's own helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

from pgolf import kernels
from pgolf.kernels import reference

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- direct implementations ----------------------------------------------------------------------------------

def naive_attention(q, k, v, *, xsa=False, doc=None):
    """Softmax attention with an explicit causal mask (and a block-diagonal one when doc ids are given).

    q: (B,T,Hq,D); k, v: (B,T,Hkv,D). Query head h uses kv head h // (Hq/Hkv) (kv repeated, grouped).
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    rep = Hq // Hkv
    kr = k.repeat_interleave(rep, dim=2)
    vr = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, kr) / math.sqrt(D)
    i = torch.arange(T)
    allowed = i[None, :] <= i[:, None]  # (t, s): s <= t
    if doc is not None:
        allowed = allowed & (doc[:, None] == doc[None, :])
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    y = torch.einsum("bhts,bshd->bthd", p, vr)
    if xsa:
        vhat = vr / vr.norm(dim=-1, keepdim=True)
        y = y - (y * vhat).sum(-1, keepdim=True) * vhat
    return y


def rand_qkv(B, T, Hq, Hkv, D, seed, requires_grad=False):
    g = gen(seed)
    q = torch.randn(B, T, Hq, D, generator=g, dtype=F64) * 1.5
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=F64) * 1.5
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=F64)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


# ---- attention ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("xsa", [False, True])
def test_attention_matches_naive(Hq, Hkv, T, xsa):
    q, k, v = rand_qkv(2, T, Hq, Hkv, 8, seed=T * 10 + Hq + Hkv)
    y = reference.attention(q, k, v, xsa=xsa)
    assert y.shape == q.shape and y.dtype == F64
    torch.testing.assert_close(y, naive_attention(q, k, v, xsa=xsa), rtol=1e-12, atol=1e-12)


def test_attention_is_causal_and_gqa_grouping_matters():
    q, k, v = rand_qkv(1, 12, 4, 2, 8, seed=1)
    y = reference.attention(q, k, v)
    # a non-causal or wrongly grouped version must differ (the comparison above can fail)
    wrong_group = naive_attention(q, k[:, :, [1, 0]], v[:, :, [1, 0]])
    assert (y - wrong_group).abs().max() > 1e-2
    k2, v2 = k.clone(), v.clone()
    k2[:, 7:] += 1.0
    v2[:, 7:] -= 2.0
    y2 = reference.attention(q, k2, v2)
    torch.testing.assert_close(y2[:, :7], y[:, :7], rtol=0, atol=1e-13)
    assert (y2[:, 7:] - y[:, 7:]).abs().max() > 1e-2


def test_xsa_removes_own_value_direction():
    q, k, v = rand_qkv(1, 9, 4, 2, 8, seed=2)
    y = reference.attention(q, k, v, xsa=True)
    vhat = v / v.norm(dim=-1, keepdim=True)
    for h in range(4):
        dots = (y[:, :, h] * vhat[:, :, h // 2]).sum(-1)
        torch.testing.assert_close(dots, torch.zeros_like(dots), rtol=0, atol=1e-12)
    # XSA actually changes something (the no-XSA output has a component along v̂)
    assert (y - reference.attention(q, k, v)).abs().max() > 1e-2


DOC_LENGTHS = [5, 1, 12, 19]  # 37 tokens, a length-1 document included


def packed_cu(lengths, pad_to):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    cu += [cu[-1]] * (pad_to - len(cu))
    return torch.tensor(cu, dtype=torch.int32)


@pytest.mark.parametrize("xsa", [False, True])
def test_attention_cu_seqlens_is_document_isolated(xsa):
    T = sum(DOC_LENGTHS)
    q, k, v = rand_qkv(1, T, 4, 2, 8, seed=3)
    cu = packed_cu(DOC_LENGTHS, pad_to=8)  # padded with repeated totals
    y = reference.attention(q, k, v, xsa=xsa, cu_seqlens=cu, max_seqlen=max(DOC_LENGTHS))
    # each document run on its own
    start = 0
    for n in DOC_LENGTHS:
        sl = slice(start, start + n)
        alone = naive_attention(q[:, sl], k[:, sl], v[:, sl], xsa=xsa)
        torch.testing.assert_close(y[:, sl], alone, rtol=1e-12, atol=1e-12)
        start += n
    # and the explicit block-diagonal causal mask
    doc = torch.repeat_interleave(torch.arange(len(DOC_LENGTHS)), torch.tensor(DOC_LENGTHS))
    torch.testing.assert_close(y, naive_attention(q, k, v, xsa=xsa, doc=doc), rtol=1e-12, atol=1e-12)
    # without cu_seqlens the later documents see the earlier ones (so the check above can fail)
    assert (reference.attention(q, k, v, xsa=xsa)[:, 6:] - y[:, 6:]).abs().max() > 1e-2


def test_attention_cu_seqlens_perturbing_one_doc_leaves_others():
    T = sum(DOC_LENGTHS)
    q, k, v = rand_qkv(1, T, 4, 2, 8, seed=4)
    cu = packed_cu(DOC_LENGTHS, pad_to=6)
    y = reference.attention(q, k, v, cu_seqlens=cu)
    k2, v2 = k.clone(), v.clone()
    k2[:, 6:18] += 3.0  # document 2 (positions 6..17)
    v2[:, 6:18] *= -1.0
    y2 = reference.attention(q, k2, v2, cu_seqlens=cu)
    torch.testing.assert_close(y2[:, :6], y[:, :6], rtol=0, atol=1e-13)
    torch.testing.assert_close(y2[:, 18:], y[:, 18:], rtol=0, atol=1e-13)
    assert (y2[:, 6:18] - y[:, 6:18]).abs().max() > 1e-2


def test_attention_cu_seqlens_errors():
    q, k, v = rand_qkv(1, 10, 2, 1, 4, seed=5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        reference.attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))  # ends short
    with pytest.raises(ValueError, match="cu_seqlens"):
        reference.attention(q, k, v, cu_seqlens=torch.tensor([2, 10], dtype=torch.int32))  # does not start at 0
    q2, k2, v2 = rand_qkv(2, 10, 2, 1, 4, seed=6)
    with pytest.raises(ValueError, match="batch size 1"):
        reference.attention(q2, k2, v2, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))


@pytest.mark.parametrize("xsa", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_attention_gradients_match_naive(xsa, packed):
    T = 37 if packed else 13
    q, k, v = rand_qkv(1, T, 4, 2, 8, seed=7, requires_grad=True)
    w = torch.randn(1, T, 4, 8, generator=gen(8), dtype=F64)
    if packed:
        cu = packed_cu(DOC_LENGTHS, pad_to=7)
        doc = torch.repeat_interleave(torch.arange(len(DOC_LENGTHS)), torch.tensor(DOC_LENGTHS))
        y = reference.attention(q, k, v, xsa=xsa, cu_seqlens=cu)
    else:
        doc = None
        y = reference.attention(q, k, v, xsa=xsa)
    got = torch.autograd.grad((y * w).sum(), (q, k, v))
    want = torch.autograd.grad((naive_attention(q, k, v, xsa=xsa, doc=doc) * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_attention_gradcheck():
    q, k, v = rand_qkv(1, 5, 2, 1, 4, seed=9, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: reference.attention(a, b, c, xsa=True), (q, k, v))
    cu = torch.tensor([0, 2, 5, 5], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda a, b, c: reference.attention(a, b, c, xsa=True, cu_seqlens=cu), (q, k, v))


# ---- MLP ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slope", [0.5, 0.0, 0.1])
def test_mlp_matches_formula(slope):
    g = gen(10)
    x = torch.randn(3, 7, 16, generator=g, dtype=F64)
    w1 = torch.randn(40, 16, generator=g, dtype=F64) / 4
    w2 = torch.randn(16, 40, generator=g, dtype=F64) / 6
    pre = x @ w1.T
    act = torch.where(pre > 0, pre, slope * pre) ** 2
    want = act @ w2.T
    got = reference.mlp(x, w1, w2, slope)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if slope != 0.0:  # the negative side matters: ReLU² would differ
        relu2 = torch.clamp(pre, min=0) ** 2 @ w2.T
        assert (got - relu2).abs().max() > 1e-3


@pytest.mark.parametrize("slope,neg_factor", [(0.5, 0.5), (0.0, 0.0)])
def test_mlp_activation_derivative(slope, neg_factor):
    # with W1 = W2 = I the op is the activation itself: d/dp LeakyReLU_s(p)² = 2p (p>0), 2s²p (p<=0)
    p = torch.linspace(-3, 3, 41, dtype=F64).view(1, 41).repeat(41, 1)
    p = p + 0.013  # avoid p == 0 exactly
    p.requires_grad_(True)
    eye = torch.eye(41, dtype=F64)
    out = reference.mlp(p, eye, eye, slope)
    (grad,) = torch.autograd.grad(out.sum(), p)
    want = torch.where(p > 0, 2 * p, neg_factor * p).detach()
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


def test_mlp_weight_gradients_match_formula():
    g = gen(11)
    x = torch.randn(5, 8, generator=g, dtype=F64)
    w1 = (torch.randn(12, 8, generator=g, dtype=F64) / 3).requires_grad_(True)
    w2 = (torch.randn(8, 12, generator=g, dtype=F64) / 3).requires_grad_(True)
    up = torch.randn(5, 8, generator=g, dtype=F64)
    g1, g2 = torch.autograd.grad((reference.mlp(x, w1, w2, 0.5) * up).sum(), (w1, w2))
    pre = x @ w1.detach().T
    act = torch.where(pre > 0, pre, 0.5 * pre) ** 2
    dact = torch.where(pre > 0, 2 * pre, 0.5 * pre)
    dh = up @ w2.detach()
    torch.testing.assert_close(g2, up.T @ act, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, (dh * dact).T @ x, rtol=1e-12, atol=1e-12)


# ---- head + loss ----------------------------------------------------------------------------------------------

def direct_softcap_ce(z, targets, cap):
    z = z.to(F64)
    s = cap * torch.tanh(z / cap)
    lse = torch.log(torch.exp(s - s.max(-1, keepdim=True).values).sum(-1)) + s.max(-1).values
    return lse - s.gather(-1, targets[:, None]).squeeze(-1)


def test_softcap():
    z = torch.linspace(-200, 200, 101, dtype=F64)
    torch.testing.assert_close(kernels.softcap(z, 30.0), 30.0 * torch.tanh(z / 30.0), rtol=1e-14, atol=1e-14)
    assert kernels.softcap(z, 30.0).abs().max() < 30.0


@pytest.mark.parametrize("cap", [30.0, 5.0])
def test_softcap_ce_matches_direct(cap):
    g = gen(12)
    z = torch.randn(23, 97, generator=g, dtype=F64) * 25  # well into the cap's non-linear range
    t = torch.randint(0, 97, (23,), generator=g)
    got = reference.softcap_ce(z, t, cap)
    assert got.shape == (23,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), direct_softcap_ce(z, t, cap), rtol=2e-6, atol=2e-5)
    # without the cap it would differ a lot
    plain = torch.nn.functional.cross_entropy(z, t, reduction="none")
    assert (got.double() - plain).abs().max() > 1.0
    # bf16 input: still fp32 math on the rounded values
    zb = z.to(torch.bfloat16)
    torch.testing.assert_close(reference.softcap_ce(zb, t, cap).double(), direct_softcap_ce(zb.double(), t, cap),
                               rtol=2e-6, atol=2e-5)


def test_softcap_ce_gradient():
    g = gen(13)
    z = (torch.randn(6, 11, generator=g, dtype=torch.float32) * 40).requires_grad_(True)
    t = torch.randint(0, 11, (6,), generator=g)
    (gz,) = torch.autograd.grad(reference.softcap_ce(z, t, 30.0).sum(), z)
    zd = z.detach().double()
    s = 30 * torch.tanh(zd / 30)
    p = torch.softmax(s, -1)
    ds = p - torch.nn.functional.one_hot(t, 11).double()
    want = ds * (1 - torch.tanh(zd / 30) ** 2)
    torch.testing.assert_close(gz.double(), want, rtol=1e-5, atol=1e-6)


def test_lm_head_loss_matches_direct():
    g = gen(14)
    h = torch.randn(19, 16, generator=g, dtype=F64)
    w = torch.randn(64, 16, generator=g, dtype=F64) * 3
    t = torch.randint(0, 64, (19,), generator=g)
    got = reference.lm_head_loss(h, w, t, 30.0)
    assert got.dtype == torch.float32 and got.shape == (19,)
    torch.testing.assert_close(got.double(), direct_softcap_ce(h @ w.T, t, 30.0), rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(kernels.lm_head_loss(h, w, t, 30.0), got)
    torch.testing.assert_close(kernels.softcap_ce(h @ w.T, t, 30.0), got)


# ---- Newton-Schulz ---------------------------------------------------------------------------------------------

CLASSIC = ((3.4445, -4.7750, 2.0315),)


def direct_ns(G, coeffs, steps, eps=1e-7):
    """Quintic NS on the wide orientation (rows <= cols), in float64."""
    X = G.to(F64)
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.transpose(-2, -1)
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        A = X @ X.transpose(-2, -1)
        X = a * X + b * (A @ X) + c * (A @ A @ X)
    return X.transpose(-2, -1) if tall else X


@pytest.mark.parametrize("shape", [(8, 20), (20, 8), (3, 8, 20), (3, 20, 8), (12, 12)])
def test_newton_schulz_shapes_and_formula(shape):
    G = torch.randn(*shape, generator=gen(15), dtype=F64)
    coeffs = ((4.0, -5.0, 2.0), (3.4445, -4.7750, 2.0315), (2.0, -1.5, 0.5))
    got = reference.newton_schulz(G, coeffs, steps=5, dtype=F64)
    assert got.shape == G.shape and got.dtype == F64
    torch.testing.assert_close(got, direct_ns(G, coeffs, 5), rtol=1e-10, atol=1e-10)
    # transpose equivariance: NS(Gᵀ) = NS(G)ᵀ
    got_t = reference.newton_schulz(G.transpose(-2, -1), coeffs, steps=5, dtype=F64)
    torch.testing.assert_close(got_t, got.transpose(-2, -1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(6, 15), (15, 6), (2, 15, 6)])
def test_newton_schulz_converges_to_polar_factor(shape):
    # cubic NS (a, b, c) = (1.5, -0.5, 0) converges to U Vᵀ for a well-conditioned G
    g = gen(16)
    m, n = shape[-2:]
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*shape[:-2], m, k, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(*shape[:-2], n, k, generator=g, dtype=F64))
    s = torch.linspace(0.5, 1.0, k, dtype=F64)
    G = U @ torch.diag_embed(s.expand(*shape[:-2], k)) @ V.transpose(-2, -1)
    got = reference.newton_schulz(G, ((1.5, -0.5, 0.0),), steps=40, dtype=F64)
    torch.testing.assert_close(got, U @ V.transpose(-2, -1), rtol=1e-9, atol=1e-9)


def test_newton_schulz_dispatch_default_dtype_on_cpu():
    G = torch.randn(6, 10, generator=gen(17))
    out = kernels.newton_schulz(G, CLASSIC, steps=5)
    assert out.dtype == torch.float32 and out.shape == G.shape
    torch.testing.assert_close(out.double(), direct_ns(G, CLASSIC, 5), rtol=1e-4, atol=1e-5)
    assert kernels.newton_schulz(G, CLASSIC, steps=5, dtype=torch.bfloat16).dtype == torch.bfloat16


# ---- dispatch ---------------------------------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("PGOLF_KERNELS", raising=False)
    for op in kernels.OPS:
        monkeypatch.delenv(f"PGOLF_KERNELS_{op.upper()}", raising=False)
    return monkeypatch


def test_auto_backend_on_cpu_is_reference(clean_env):
    for op in kernels.OPS:
        name, fn = kernels.implementation(op, "cpu")
        assert name == "reference"
        assert fn is getattr(reference, op)


def test_use_backend_overrides_and_restores(clean_env):
    fake_calls = []

    def fake(x, w1, w2, s):
        fake_calls.append(s)
        return reference.mlp(x, w1, w2, s) * 0 + 7

    clean_env.setitem(kernels._IMPLS, "mlp", dict(kernels._IMPLS["mlp"]))
    kernels.register("mlp", "triton", fake)
    x = torch.randn(2, 4)
    w1, w2 = torch.randn(6, 4), torch.randn(4, 6)
    assert kernels.selected_backend("mlp") == "auto"
    assert kernels.implementation("mlp", "cpu")[0] == "reference"  # auto: Triton only on CUDA
    assert kernels.implementation("mlp", "cuda")[0] == "triton"
    with kernels.use_backend("triton"):
        assert (kernels.mlp(x, w1, w2, 0.5) == 7).all()
        with kernels.use_backend("reference", op="mlp"):  # per-op override wins over the global one
            torch.testing.assert_close(kernels.mlp(x, w1, w2, 0.5), reference.mlp(x, w1, w2, 0.5))
        assert (kernels.mlp(x, w1, w2, 0.5) == 7).all()
    torch.testing.assert_close(kernels.mlp(x, w1, w2, 0.5), reference.mlp(x, w1, w2, 0.5))
    assert fake_calls == [0.5, 0.5]
    # restored after an exception too
    with pytest.raises(KeyError):
        with kernels.use_backend("triton", op="mlp"):
            raise KeyError("boom")
    assert kernels.selected_backend("mlp") == "auto"


def test_use_backend_rejects_unknown():
    with pytest.raises(ValueError, match="backend must be one of"):
        with kernels.use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="unknown op"):
        kernels.register("not_an_op", "triton", lambda: None)


def test_env_validation_message(clean_env):
    clean_env.setenv("PGOLF_KERNELS", "fast")
    with pytest.raises(ValueError) as e:
        kernels.mlp(torch.randn(2, 4), torch.randn(6, 4), torch.randn(4, 6))
    msg = str(e.value)
    assert "'fast'" in msg and "PGOLF_KERNELS" in msg
    for b in ("auto", "reference", "triton"):
        assert b in msg
    clean_env.setenv("PGOLF_KERNELS", "reference")
    clean_env.setenv("PGOLF_KERNELS_ATTENTION", "tritonn")
    with pytest.raises(ValueError, match=r"PGOLF_KERNELS_ATTENTION='tritonn'"):
        kernels.selected_backend("attention")
    assert kernels.selected_backend("mlp") == "reference"
    # the per-op variable wins over the global one
    clean_env.setenv("PGOLF_KERNELS_ATTENTION", "reference")
    clean_env.setenv("PGOLF_KERNELS", "triton")
    assert kernels.selected_backend("attention") == "reference"
    assert kernels.selected_backend("mlp") == "triton"


def test_triton_for_op_without_triton_raises_clearly(clean_env):
    # make sure this op has no Triton implementation, whatever other modules registered
    clean_env.setitem(kernels._IMPLS, "softcap_ce", {"reference": reference.softcap_ce})
    clean_env.setitem(kernels.TRITON_MODULES, "softcap_ce", "pgolf.kernels._no_such_module")
    clean_env.setattr(kernels, "_IMPORT_ERRORS", {})
    z = torch.randn(3, 5)
    t = torch.tensor([0, 1, 2])
    with kernels.use_backend("triton", op="softcap_ce"):
        with pytest.raises(RuntimeError) as e:
            kernels.softcap_ce(z, t, 30.0)
    msg = str(e.value)
    assert "softcap_ce" in msg and "triton" in msg and "reference" in msg
    assert "PGOLF_KERNELS" in msg
    clean_env.setenv("PGOLF_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="no 'triton' implementation"):
        kernels.softcap_ce(z, t, 30.0)
    with pytest.raises(RuntimeError, match="no 'triton' implementation"):
        kernels.implementation("softcap_ce", "cuda")


def test_importing_an_op_module_keeps_the_dispatch_function_bound():
    """pgolf.kernels.mlp etc. are both op names and module names: the import must not rebind the op."""
    import importlib

    for op, module in (("mlp", "pgolf.kernels.mlp"), ("newton_schulz", "pgolf.kernels.newton_schulz"),
                       ("int6_matmul", "pgolf.kernels.int6_matmul"), ("softcap_ce", "pgolf.kernels.softcap_ce")):
        mod = importlib.import_module(module)
        assert callable(getattr(kernels, op)) and not isinstance(getattr(kernels, op), type(mod)), op
        assert getattr(kernels, op).__module__ == "pgolf.kernels", op
