"""The tiny GPT trained with the Triton MLP and fused-head CE kernels gives the reference path's losses.

On CPU the kernels run under the Triton interpreter (fp32). Two copies of one model train a few steps with the
project's optimizers (Muon + AdamW), one on the reference ops and one with ``use_backend("triton")`` for 'mlp'
and 'lm_head_loss' (attention stays on the reference); losses, eval losses and parameters must agree.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from pgolf import kernels
from pgolf.kernels import launcher
from pgolf.model import GPT, GPTConfig
from pgolf.train.optim import build_optimizers

CE = importlib.import_module("pgolf.kernels.softcap_ce")
MLP = importlib.import_module("pgolf.kernels.mlp")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**kw) -> GPTConfig:
    base = dict(vocab_size=97, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_hidden=100, rope_dims=8,
                xsa_last_n=1, num_loops=0, parallel_residual="none", smear_gate="none", attn_gate="none",
                init="baseline", logit_softcap=30.0, bos_id=1)
    base.update(kw)
    return GPTConfig(**base)


def optimizers(model: GPT):
    return build_optimizers(model.optimizer_groups(), matrix_lr=0.02, muon_momentum=0.95, muon_wd=0.0,
                            row_normalize=True, ns_steps=5, ns_coefficients="polar_express", tok_lr=0.05, tok_wd=0.0,
                            scalar_lr=0.02, scalar_wd=0.0, betas=(0.9, 0.95), eps=1e-8)


def batches(cfg: GPTConfig, n: int, B: int = 2, T: int = 19):
    """n copies of one random batch (a model can lower its loss on it within a few steps)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    for _ in range(n):
        yield ids[:, :-1], ids[:, 1:]


def train(model: GPT, cfg: GPTConfig, steps: int, triton: bool) -> list[float]:
    opt = optimizers(model)
    losses = []
    with kernels.use_backend("triton" if triton else "reference", op="mlp"), \
            kernels.use_backend("triton" if triton else "reference", op="lm_head_loss"):
        for x, y in batches(cfg, steps):
            loss = model.loss(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        with torch.no_grad():
            x, y = next(batches(cfg, 1))
            losses.append(model.loss(x, y).item())  # eval forward (no grad) on the trained weights
    return losses


@pytest.mark.parametrize("fused_head", [True, False], ids=["fused_head", "matmul_head"])
def test_training_matches_reference(fused_head, monkeypatch):
    monkeypatch.setattr(CE, "FUSED_HEAD", fused_head)
    monkeypatch.setattr(CE, "CHUNK_ELEMS", 16 * 97)  # 38 tokens per batch: three head chunks
    monkeypatch.setattr(launcher, "POISON", True)
    calls = {"mlp": 0, "mlp_bwd": 0, "head": 0, "head_bwd": 0}

    def counted(module, fn_name, key):
        fn = getattr(module, fn_name)

        def wrapper(*args):
            calls[key] += 1
            return fn(*args)
        monkeypatch.setattr(module, fn_name, wrapper)

    counted(MLP, "mlp_up_forward", "mlp")
    counted(MLP, "mlp_up_backward", "mlp_bwd")
    counted(CE, "lm_head_loss_forward" if fused_head else "softcap_ce_forward", "head")
    counted(CE, "lm_head_loss_backward" if fused_head else "softcap_ce_backward", "head_bwd")
    cfg = tiny_config()
    torch.manual_seed(0)
    ref_model = GPT(cfg)
    tri_model = copy.deepcopy(ref_model)
    ref = train(ref_model, cfg, steps=3, triton=False)
    assert not any(calls.values())
    got = train(tri_model, cfg, steps=3, triton=True)
    assert calls == {"mlp": 2 * 4, "mlp_bwd": 2 * 3, "head": 4, "head_bwd": 3}  # 2 layers; 3 steps + 1 eval
    assert ref[-2] < ref[0] - 0.1, f"training should lower the loss: {ref}"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=2e-5, atol=2e-5)
    for (name, p), q in zip(ref_model.named_parameters(), tri_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_gradients_match_reference():
    """Every parameter's gradient from one backward, kernels vs reference (MLP weights, tied embedding, the rest)."""
    cfg = tiny_config(mlp_negative_slope=0.5)
    torch.manual_seed(1)
    model = GPT(cfg)
    x, y = next(batches(cfg, 1))
    grads = {}
    for backend in ("reference", "triton"):
        model.zero_grad()
        with kernels.use_backend(backend, op="mlp"), kernels.use_backend(backend, op="lm_head_loss"):
            model.loss(x, y).backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["triton"].keys() == grads["reference"].keys()
    for name, g in grads["reference"].items():
        torch.testing.assert_close(grads["triton"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_model_traces_fullgraph_with_the_kernels():
    """The model's loss with the Triton MLP and head traces as one graph (no graph breaks in the dispatch/ops)."""
    cfg = tiny_config()
    torch.manual_seed(2)
    model = GPT(cfg)
    x, y = next(batches(cfg, 1))
    with kernels.use_backend("triton", op="mlp"), kernels.use_backend("triton", op="lm_head_loss"):
        explained = torch._dynamo.explain(model.loss)(x, y)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = [str(n.target) for g in explained.graphs for sub in g.children() for n in sub.graph.nodes
           if n.op == "call_function"]
    # one MLP per layer (forward and backward bodies of the autograd.Function) and one fused head
    assert ops.count("pgolf.mlp_up_fwd") == ops.count("pgolf.mlp_up_bwd") == cfg.num_layers
    assert ops.count("pgolf.lm_head_loss_fwd") == ops.count("pgolf.lm_head_loss_bwd") == 1
