"""A tiny model trained a few steps with the Triton attention (interpreter on CPU) matches the reference path.

Same initial weights, same packed batches (cu_seqlens, padded), plain SGD so small kernel-vs-reference differences
stay small: per-step losses and first-step gradients must agree. GPU variant: bf16 autocast and
``torch.compile(fullgraph=True)`` with the Triton backend against the eager reference path.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pgolf import kernels
from pgolf.kernels import launcher
from pgolf.model import GPT, GPTConfig

BOS = 1
V = 97
CFG = GPTConfig(vocab_size=V, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, mlp_hidden=128, rope_dims=8,
                qk_gain_init=4.0, xsa_last_n=2, num_loops=1, loop_start=1, loop_end=1, parallel_residual="two_lane",
                parallel_start=2, smear_gate="bos", attn_gate="sparse", bos_id=BOS)


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_model(seed=0) -> GPT:
    """The config's model with every matrix random (the record init zeroes the output projections, which would
    leave attention without a gradient on the first step)."""
    torch.manual_seed(seed)
    m = GPT(CFG)
    g = gen(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim >= 2 and "resid_mix" not in name and "skip" not in name and "lane" not in name:
                fan_in = p.shape[1] if "emb" not in name else 1
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    m.looping_active = True
    return m


def packed_batch(seed: int, lengths=(23, 1, 40, 16), pad_to=8, device="cpu"):
    g = gen(seed)
    T = sum(lengths)
    x = torch.randint(2, V, (1, T), generator=g)
    y = torch.randint(2, V, (1, T), generator=g)
    cu = [0]
    for n in lengths:
        x[0, cu[-1]] = BOS
        cu.append(cu[-1] + n)
    cu += [cu[-1]] * (pad_to - len(cu))
    return x.to(device), y.to(device), torch.tensor(cu, dtype=torch.int32, device=device), max(lengths)


def train(model, backend, steps, *, device="cpu", autocast=None, compile=False, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, first_grads = [], None
    fn = torch.compile(model.loss, fullgraph=True) if compile else model.loss
    for step in range(steps):
        x, y, cu, max_len = packed_batch(100 + step, device=device)
        with kernels.use_backend(backend, op="attention"):
            with torch.autocast(device_type=device, dtype=autocast, enabled=autocast is not None):
                loss = fn(x, y, cu_seqlens=cu, max_seqlen=max_len)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    return losses, first_grads


def test_training_steps_match_reference(monkeypatch):
    from pgolf.kernels import xsa_attention as xa

    # wider interpreter tiles than the kernel tests use (those cover the tiling); this test is about the model
    big = dict(BLOCK_M=64, BLOCK_N=32)
    for kernel, cfg in ((xa.FWD, big), (xa.BWD_DKDV, big), (xa.BWD_DQ, big), (xa.BWD_PRE, dict(BLOCK_T=64))):
        monkeypatch.setattr(kernel, "interpret", cfg)
    monkeypatch.setattr(launcher, "POISON", True)
    ref_model = make_model()
    tri_model = copy.deepcopy(ref_model)
    ref_losses, ref_grads = train(ref_model, "reference", 3)
    tri_losses, tri_grads = train(tri_model, "triton", 3)
    assert all(math.isfinite(v) for v in tri_losses)
    assert tri_losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)
    assert ref_losses[-1] < ref_losses[0]
    assert tri_grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(tri_grads[name], g, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # the attention input projections did receive (non-trivial) gradients through the kernel's backward
    assert tri_grads["blocks.0.attn.c_q.weight"].abs().max() > 1e-4
    for (name, p), q in zip(tri_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
def test_gpu_compiled_bf16_training_matches_reference():
    ref_model = make_model().cuda()
    tri_model = copy.deepcopy(ref_model)
    ref_losses, _ = train(ref_model, "reference", 4, device="cuda", autocast=torch.bfloat16)
    tri_losses, _ = train(tri_model, "triton", 4, device="cuda", autocast=torch.bfloat16, compile=True)
    assert all(math.isfinite(v) for v in tri_losses)
    assert tri_losses == pytest.approx(ref_losses, rel=2e-2)
