"""The Triton attention (pgolf.kernels.xsa_attention) against the reference and float64.

CPU: the kernels run under the Triton interpreter (fp32 / fp16, head dims 16-32, odd lengths, packed documents,
GQA ratios 1, 2, 3, 4, XSA on/off). Every output and intermediate buffer is filled with NaN before the launches,
so an unwritten tile fails. Error rule (flash-attention's): the kernel's max error against float64 must be at most
2× the reference's own max error at the same dtype, plus a small epsilon.
GPU (``@pytest.mark.gpu``): bf16, head dim 64, the record's 8/4 heads and packed 2048-capped documents.
"""

from __future__ import annotations

import math

import pytest
import torch

from pgolf import kernels
from pgolf.kernels import launcher, reference
from pgolf.kernels import xsa_attention as xa

F64 = torch.float64
# epsilon of the error rule, relative to max(1, max |float64 value|)
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launcher, "POISON", True)


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def padded_cu(lengths, pad: int = 3, device="cpu") -> torch.Tensor:
    """int32 cu_seqlens of documents with these lengths, padded by repeating the total ``pad`` times."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu + [cu[-1]] * pad, dtype=torch.int32, device=device)


def make_inputs(B, T, Hq, Hkv, D, seed, device="cpu"):
    g = gen(seed, device)
    q = torch.randn(B, T, Hq, D, generator=g, dtype=F64, device=device) * 1.5
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=F64, device=device) * 1.5
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=F64, device=device)
    dy = torch.randn(B, T, Hq, D, generator=g, dtype=F64, device=device)
    return q, k, v, dy


def run(fn, inputs, dtype, **kw):
    """(y, dq, dk, dv) as float64 after running ``fn`` on the inputs cast to ``dtype``."""
    q, k, v, dy = inputs
    qs, ks, vs = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    y = fn(qs, ks, vs, **kw)
    y.backward(dy.to(dtype))
    return [t.detach().to(F64) for t in (y, qs.grad, ks.grad, vs.grad)]


def check_against_float64(inputs, dtype, **kw):
    got = run(xa.attention, inputs, dtype, **kw)
    ref = run(reference.attention, inputs, dtype, **kw)
    exact = run(reference.attention, inputs, F64, **kw)
    for name, a, b, x in zip(("y", "dq", "dk", "dv"), got, ref, exact):
        assert torch.isfinite(a).all(), f"{name}: non-finite values (unwritten tile?)"
        err, ref_err = (a - x).abs().max().item(), (b - x).abs().max().item()
        tol = 2 * ref_err + ATOL[dtype] * max(1.0, x.abs().max().item())
        assert err <= tol, f"{name}: kernel error {err:.3g} > {tol:.3g} (reference {dtype} error {ref_err:.3g})"


# (B, T, Hq, Hkv, D, xsa, document lengths or None, dtype)
CASES = [
    pytest.param(1, 129, 4, 2, 32, True, [1, 5, 40, 3, 60, 20], torch.float32, id="docs-g2-xsa-f32"),
    pytest.param(1, 129, 4, 2, 32, True, [1, 5, 40, 3, 60, 20], torch.float16, id="docs-g2-xsa-f16"),
    pytest.param(2, 37, 4, 2, 16, True, None, torch.float32, id="dense-g2-xsa-f32"),
    pytest.param(2, 37, 4, 2, 16, True, None, torch.float16, id="dense-g2-xsa-f16"),
    pytest.param(1, 129, 2, 2, 16, False, [64, 1, 64], torch.float32, id="docs-g1-noxsa-f32"),
    pytest.param(1, 70, 8, 2, 16, True, [30, 1, 39], torch.float16, id="docs-g4-xsa-f16"),
    pytest.param(2, 37, 4, 1, 32, False, None, torch.float32, id="dense-g4-noxsa-f32"),
    pytest.param(1, 64, 6, 2, 16, True, None, torch.float32, id="dense-g3-xsa-f32"),
    pytest.param(1, 67, 4, 2, 16, True, [2, 5, 1, 4, 3, 5, 5, 2, 1, 4, 5, 3, 2, 5, 4, 3, 5, 3, 5], torch.float32,
                 id="short-docs-g2-xsa-f32"),
    pytest.param(1, 1, 2, 1, 16, True, [1], torch.float32, id="T1-xsa-f32"),
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,xsa,lengths,dtype", CASES)
def test_matches_float64(B, T, Hq, Hkv, D, xsa, lengths, dtype):
    cu = padded_cu(lengths) if lengths is not None else None
    assert lengths is None or sum(lengths) == T
    inputs = make_inputs(B, T, Hq, Hkv, D, seed=T * 31 + Hq * 7 + Hkv)
    check_against_float64(inputs, dtype, xsa=xsa, cu_seqlens=cu, max_seqlen=T)


@pytest.mark.parametrize("cfg", [dict(BLOCK_M=16, BLOCK_N=32), dict(BLOCK_M=64, BLOCK_N=16)],
                         ids=["m16-n32", "m64-n16"])
def test_other_tile_shapes(monkeypatch, cfg):
    """Query tiles narrower and wider than key tiles (different mask-free ranges and document splits)."""
    for kernel in (xa.FWD, xa.BWD_DKDV, xa.BWD_DQ):
        monkeypatch.setattr(kernel, "interpret", cfg)
    inputs = make_inputs(1, 101, 4, 2, 16, seed=5)
    check_against_float64(inputs, torch.float32, xsa=True, cu_seqlens=padded_cu([3, 50, 1, 47]), max_seqlen=64)


def test_lse_and_xsa_coefficient_saved():
    """The op's extra outputs: base-2 log-sum-exp of the scaled scores, and c = <y, v̂> before the projection."""
    B, T, Hq, Hkv, D = 1, 29, 4, 2, 16
    q, k, v, _ = make_inputs(B, T, Hq, Hkv, D, seed=3)
    cu = padded_cu([10, 19])
    y, lse, xc = torch.ops.pgolf.xsa_attention_fwd(q.float(), k.float(), v.float(), cu, True)
    doc = torch.tensor([0] * 10 + [1] * 19)
    i = torch.arange(T)
    allowed = (i[None, :] <= i[:, None]) & (doc[:, None] == doc[None, :])
    kr, vr = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, kr) / math.sqrt(D)
    s = s.masked_fill(~allowed, float("-inf"))
    want_lse = torch.logsumexp(s, dim=-1).transpose(1, 2) / math.log(2.0)  # (B, T, Hq), base 2
    torch.testing.assert_close(lse.to(F64), want_lse, rtol=0, atol=1e-5)
    y_pre = torch.einsum("bhts,bshd->bthd", torch.softmax(s, -1), vr)
    vhat = vr / vr.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(xc.to(F64), (y_pre * vhat).sum(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.to(F64), y_pre - (y_pre * vhat).sum(-1, keepdim=True) * vhat, rtol=0, atol=1e-5)


def test_xsa_closed_form_backward():
    """The backward's XSA formulas (as the kernel computes them), checked against autograd in float64."""
    g = gen(11)
    B, T, Hq, Hkv, D = 2, 5, 6, 2, 8
    y = torch.randn(B, T, Hq, D, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=F64, requires_grad=True)
    dyp = torch.randn(B, T, Hq, D, generator=g, dtype=F64)
    reference.xsa_project(y, v).backward(dyp)
    G = Hq // Hkv
    n = v.detach().norm(dim=-1, keepdim=True)
    vhat = (v.detach() / n).repeat_interleave(G, dim=2)
    yd = y.detach()
    c = (yd * vhat).sum(-1, keepdim=True)
    p = (dyp * vhat).sum(-1, keepdim=True)
    dy = dyp - p * vhat                                        # dy = dy' − (dy'·v̂) v̂
    dvhat = -(c * dyp + p * yd)                                # dv̂ = −[(y·v̂) dy' + (dy'·v̂) y]
    dvhat = dvhat.reshape(B, T, Hkv, G, D).sum(3)              # summed over the group's query heads
    vh = v.detach() / n
    dv = (dvhat - (dvhat * vh).sum(-1, keepdim=True) * vh) / n  # through v̂ = v/‖v‖
    torch.testing.assert_close(dy, y.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dv, v.grad, rtol=1e-12, atol=1e-12)


def test_poison_catches_an_unwritten_tile(monkeypatch):
    """Sanity check of the harness: drop the last query tile of the forward grid and the NaN must show."""
    real = xa.FWD.launch

    def short_grid(cfg, grid, *args):
        return real(cfg, lambda c: (grid(c)[0] - 1, *grid(c)[1:]), *args)

    monkeypatch.setattr(xa.FWD, "launch", short_grid)
    q, k, v, _ = make_inputs(1, 37, 4, 2, 16, seed=1)
    y = xa.attention(q.float(), k.float(), v.float(), xsa=True)
    assert torch.isnan(y[0, -1]).all() and torch.isfinite(y[0, 0]).all()


def test_doc_bounds_match_segments():
    lengths = [1, 7, 1, 20, 3]
    T = sum(lengths)
    ds, de = xa.doc_bounds(padded_cu(lengths, pad=5), T, torch.device("cpu"))
    doc, pos, lens = reference.segment_ids(padded_cu(lengths, pad=5), T)
    t = torch.arange(T)
    assert ds.dtype == torch.int32 and de.dtype == torch.int32
    assert torch.equal(ds.long(), t - pos)
    assert torch.equal(de.long(), t - pos + lens[doc])


def test_rejects_bad_shapes():
    q = torch.randn(1, 8, 4, 16)
    k = torch.randn(1, 8, 3, 16)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        xa.attention(q, k, k)
    with pytest.raises(ValueError, match="head dim"):
        xa.attention(torch.randn(1, 8, 4, 24), torch.randn(1, 8, 2, 24), torch.randn(1, 8, 2, 24))
    with pytest.raises(ValueError, match="batch size 1"):
        xa.attention(torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16),
                     cu_seqlens=padded_cu([8]))


def test_dispatch_registration():
    assert kernels.TRITON_MODULES["attention"] == xa.__name__
    with kernels.use_backend("triton", op="attention"):
        name, fn = kernels.implementation("attention", "cpu")
    assert name == "triton" and fn is xa.attention
    with kernels.use_backend("auto"):
        assert kernels.implementation("attention", "cpu")[0] == "reference"  # CPU default stays the reference


def test_custom_ops_opcheck():
    q, k, v, dy = (t.float() for t in make_inputs(1, 20, 4, 2, 16, seed=2))
    cu = padded_cu([7, 13])
    torch.library.opcheck(torch.ops.pgolf.xsa_attention_fwd, (q.requires_grad_(), k.requires_grad_(),
                                                              v.requires_grad_(), cu, True))
    y, lse, xc = torch.ops.pgolf.xsa_attention_fwd(q.detach(), k.detach(), v.detach(), cu, True)
    torch.library.opcheck(torch.ops.pgolf.xsa_attention_bwd, (dy, q.detach(), k.detach(), v.detach(), y, lse, xc,
                                                              cu, True))


def test_torch_compile_fullgraph_through_dispatch():
    """torch.compile(fullgraph=True) traces model-like code calling the op (aot_eager: fwd and bwd graphs)."""
    q, k, v, dy = (t.float() for t in make_inputs(1, 40, 4, 2, 16, seed=4))
    cu = padded_cu([13, 27])
    gain = torch.tensor([1.0, 2.0, 0.5, 1.5])

    def f(q, k, v, cu):
        with kernels.use_backend("triton", op="attention"):
            y = kernels.attention(q * gain[:, None], k, v, xsa=True, cu_seqlens=cu, max_seqlen=40)
        return (y * dy).sum()

    results = []
    for fn in (torch.compile(f, backend="aot_eager", fullgraph=True), f):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        loss = fn(*leaves, cu)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_autocast_casts_inputs_like_sdpa():
    """Under autocast the op runs in the autocast dtype (as SDPA does on the reference path)."""
    q, k, v, _ = (t.float() for t in make_inputs(1, 20, 4, 2, 16, seed=6))
    with torch.autocast("cpu", dtype=torch.float16):
        y = xa.attention(q, k, v, xsa=True)
    assert y.dtype == torch.float16
    want = reference.attention(q.half(), k.half(), v.half(), xsa=True)
    torch.testing.assert_close(y, want, rtol=0, atol=5e-3)


# ---- GPU ----------------------------------------------------------------------------------------------------------

def record_doc_lengths(total: int, seed: int) -> list[int]:
    from pgolf.bench.ops.attention import doc_lengths

    return doc_lengths(total, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("xsa", [True, False])
@pytest.mark.parametrize("layout", ["packed", "dense"])
def test_gpu_bf16_record_heads(layout, xsa):
    dev = "cuda"
    if layout == "packed":
        B, T = 1, 8192
        cu = padded_cu(record_doc_lengths(T, seed=0), pad=7, device=dev)
    else:
        B, T, cu = 2, 2048, None
    inputs = make_inputs(B, T, 8, 4, 64, seed=7, device=dev)
    check_against_float64(inputs, torch.bfloat16, xsa=xsa, cu_seqlens=cu, max_seqlen=2048)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_head_dims_and_dtypes(D, dtype):
    inputs = make_inputs(1, 777, 8, 2, D, seed=D, device="cuda")
    cu = padded_cu([100, 1, 300, 17, 359], device="cuda")
    check_against_float64(inputs, dtype, xsa=True, cu_seqlens=cu, max_seqlen=512)


@pytest.mark.gpu
def test_gpu_deterministic_gradients():
    q, k, v, dy = (t.to(torch.bfloat16) for t in make_inputs(1, 4096, 8, 4, 64, seed=9, device="cuda"))
    cu = padded_cu(record_doc_lengths(4096, seed=1), device="cuda")
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        xa.attention(*leaves, xsa=True, cu_seqlens=cu).backward(dy)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_full_record_batch():
    """98,304 packed tokens, 8/4 heads, D=64, bf16: runs forward+backward, matches an fp32 reference."""
    T = 98_304
    q, k, v, dy = (t.float() for t in make_inputs(1, T, 8, 4, 64, seed=10, device="cuda"))
    cu = padded_cu(record_doc_lengths(T, seed=2), pad=11, device="cuda")
    leaves = [t.to(torch.bfloat16).requires_grad_(True) for t in (q, k, v)]
    y = xa.attention(*leaves, xsa=True, cu_seqlens=cu, max_seqlen=2048)
    y.backward(dy.to(torch.bfloat16))
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    y_ref = reference.attention(*ref_leaves, xsa=True, cu_seqlens=cu)
    y_ref.backward(dy)
    for a, b in zip([y] + [t.grad for t in leaves], [y_ref] + [t.grad for t in ref_leaves]):
        assert torch.isfinite(a).all()
        err = (a.float() - b).abs().max().item()
        assert err <= 0.05 * max(1.0, b.abs().max().item()), err


@pytest.mark.gpu
def test_gpu_compile_inductor_fullgraph():
    q, k, v, dy = (t.to(torch.bfloat16) for t in make_inputs(1, 2048, 8, 4, 64, seed=12, device="cuda"))
    cu = padded_cu([700, 1, 1347], device="cuda")

    def f(q, k, v):
        return (xa.attention(q * 2, k, v, xsa=True, cu_seqlens=cu, max_seqlen=2048).float() * dy.float()).sum()

    results = []
    for fn in (torch.compile(f, fullgraph=True), f):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        fn(*leaves).backward()
        results.append([t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_forward_only_variant_writes_no_backward_state(monkeypatch):
    """Without a gradient to compute, attention runs the kernel with STATS=False: the same y, and no log-sum-exp or
    XSA coefficient allocated or written (they exist only for the backward)."""
    q, k, v, _ = make_inputs(1, 37, 4, 2, 16, seed=9)
    q, k, v = q.float(), k.float(), v.float()
    cu = padded_cu([10, 27])
    y_full, lse, xc = torch.ops.pgolf.xsa_attention_fwd(q, k, v, cu, True)
    y, lse0, xc0 = xa._forward(q, k, v, cu, True, stats=False)
    assert lse.numel() > 0 and lse0.numel() == 0 and xc0.numel() == 0
    assert torch.equal(y, y_full)
    seen = []
    real = xa._forward
    monkeypatch.setattr(xa, "_forward", lambda *a, stats=True: seen.append(stats) or real(*a, stats=stats))
    with kernels.use_backend("triton", op="attention"):
        with torch.no_grad():
            kernels.attention(q, k, v, xsa=True, cu_seqlens=cu)
        kernels.attention(q, k, v, xsa=True, cu_seqlens=cu)  # nothing requires grad: still forward-only
        leaf = q.clone().requires_grad_(True)
        kernels.attention(leaf, k, v, xsa=True, cu_seqlens=cu).sum().backward()
    assert seen == [False, False, True] and leaf.grad is not None
