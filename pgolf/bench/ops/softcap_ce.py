"""Benchmark cases for the softcapped cross-entropy and the fused LM head (pgolf.kernels.softcap_ce).

Two ops, each in modes 'fwd' (no grad, as in eval) and 'fwd+bwd' (loss and the input gradients for the
per-token upstream gradient of a mean):
- ``softcap_ce``: z (N, V) pre-softcap logits → per-token loss. 'triton' (the CE kernels), 'eager'
  (reference.softcap_ce), 'compiled' (torch.compile of it; the baseline). bytes_moved counts the minimum traffic
  over the logits: one read forward, plus a read and a write backward.
- ``lm_head_loss``: h (N, d), tied E (V, d) fp32 (as in the model) → per-token loss. 'triton' (fused head: row
  chunks, logits never all in memory), 'triton_unfused' (matmul + CE kernel), 'eager', 'compiled' (baseline).
  flops count the head GEMMs (2NVd forward, 6NVd forward+backward); the fused head's recompute is not counted.
Full size: bf16 on CUDA, V = 8192, d = 512, N = 2,048 / 16,384 / 98,304 tokens per GPU.
``smoke``: tiny fp32 shapes for CPU (Triton under TRITON_INTERPRET=1, no 'compiled').
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from pgolf.bench.core import Case
from pgolf.bench.ops import standard_impls, triton_module
from pgolf.kernels import reference

CAP = 30.0
FULL = dict(N=(98304, 16384, 2048), V=8192, d=512)  # the record (98,304 tokens per GPU) first
SMOKE = dict(N=(32,), V=97, d=16)


def _ce_impls(device: torch.device) -> dict[str, Callable]:
    return standard_impls("softcap_ce", "softcap_ce", reference.softcap_ce, device)


def _head_impls(device: torch.device) -> dict[str, Callable]:
    impls: dict[str, Callable] = {}
    mod = triton_module("softcap_ce", device)
    if mod is not None:
        impls["triton"] = lambda h, w, t, cap: mod.LMHeadLossFunction.apply(h, w, t, cap)

        def unfused(h, w, t, cap):
            return mod.softcap_ce(F.linear(h, w.to(h.dtype)), t, cap)
        impls["triton_unfused"] = unfused
    impls["eager"] = reference.lm_head_loss
    if device.type == "cuda":
        impls["compiled"] = torch.compile(reference.lm_head_loss, dynamic=False)
    return impls


def _build_ce(N: int, V: int, dtype: torch.dtype, device: torch.device, mode: str) -> dict[str, Callable[[], Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    z = (torch.randn(N, V, device=device, generator=g) * 10).to(dtype)
    t = torch.randint(0, V, (N,), device=device, generator=g)
    gl = torch.full((N,), 1.0 / N, device=device)
    out: dict[str, Callable[[], Any]] = {}
    for name, fn in _ce_impls(device).items():
        if mode == "fwd":
            def run(fn=fn):
                with torch.no_grad():
                    return fn(z, t, CAP)
        else:
            zl = z.detach().clone().requires_grad_(True)

            def run(fn=fn, zl=zl):
                return torch.autograd.grad(fn(zl, t, CAP), zl, gl)
        out[name] = run
    return out


def _build_head(N: int, V: int, d: int, dtype: torch.dtype, device: torch.device,
                mode: str) -> dict[str, Callable[[], Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, d, device=device, generator=g).to(dtype)
    W = torch.randn(V, d, device=device, generator=g) * 0.05  # the tied embedding stays fp32
    t = torch.randint(0, V, (N,), device=device, generator=g)
    gl = torch.full((N,), 1.0 / N, device=device)
    out: dict[str, Callable[[], Any]] = {}
    for name, fn in _head_impls(device).items():
        if mode == "fwd":
            def run(fn=fn):
                with torch.no_grad():
                    return fn(h, W, t, CAP)
        else:
            leaves = [h.detach().clone().requires_grad_(True), W.detach().clone().requires_grad_(True)]

            def run(fn=fn, leaves=leaves):
                return torch.autograd.grad(fn(leaves[0], leaves[1], t, CAP), leaves, gl)
        out[name] = run
    return out


def cases(smoke: bool, device) -> list[Case]:
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" and not smoke else torch.float32
    es = torch.finfo(dtype).bits // 8
    shape = SMOKE if smoke else FULL
    V, d = shape["V"], shape["d"]
    baseline = "compiled" if device.type == "cuda" else "eager"
    dt = str(dtype).removeprefix("torch.")
    out = []
    for N in shape["N"]:
        for mode in ("fwd", "fwd+bwd"):
            out.append(Case(
                op="softcap_ce", name=f"softcap_ce {mode} N={N} V={V}", mode=mode,
                build=lambda N=N, mode=mode: _build_ce(N, V, dtype, device, mode), baseline=baseline,
                params=dict(N=N, V=V, dtype=dt, cap=CAP),
                bytes_moved=float(N * V * es * (1 if mode == "fwd" else 3)),
            ))
    for N in shape["N"]:
        for mode in ("fwd", "fwd+bwd"):
            out.append(Case(
                op="softcap_ce", name=f"lm_head_loss {mode} N={N} V={V} d={d}", mode=mode,
                build=lambda N=N, mode=mode: _build_head(N, V, d, dtype, device, mode), baseline=baseline,
                params=dict(N=N, V=V, d=d, dtype=dt, cap=CAP, fused_head=True),
                flops=float(2 * N * V * d * (1 if mode == "fwd" else 3)),
            ))
    return out
