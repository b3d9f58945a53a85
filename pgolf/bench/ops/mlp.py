"""Benchmark cases for the fused LeakyReLU(0.5)² MLP (pgolf.kernels.mlp).

Implementations: 'triton' (the fused kernel), 'eager' (pgolf.kernels.reference.mlp) and 'compiled'
(``torch.compile`` of the reference; the baseline). Modes: 'fwd' (no grad, as in eval) and 'fwd+bwd'
(forward plus the gradients of x, W1 and W2 for a fixed upstream gradient).
Full size: the record shapes, bf16 on CUDA: d = 512, hidden = 2048, M = 2,048 / 16,384 / 98,304 tokens per GPU.
``smoke``: one tiny fp32 shape that runs on CPU in seconds (Triton under TRITON_INTERPRET=1, no 'compiled').
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from pgolf.bench.core import Case
from pgolf.bench.ops import standard_impls
from pgolf.kernels import reference

FULL_SHAPES = [(98304, 512, 2048), (16384, 512, 2048), (2048, 512, 2048)]  # (M, d, hidden), the record first
SMOKE_SHAPES = [(32, 16, 40)]
SLOPE = 0.5


def _impls(device: torch.device) -> dict[str, Callable]:
    return standard_impls("mlp", "mlp", reference.mlp, device)


def _build(M: int, d: int, H: int, dtype: torch.dtype, device: torch.device, mode: str) -> dict[str, Callable[[], Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, d, device=device, generator=g).to(dtype)
    w1 = (torch.randn(H, d, device=device, generator=g) * d ** -0.5).to(dtype)
    w2 = (torch.randn(d, H, device=device, generator=g) * H ** -0.5).to(dtype)
    gy = torch.randn(M, d, device=device, generator=g).to(dtype)
    out: dict[str, Callable[[], Any]] = {}
    for name, fn in _impls(device).items():
        if mode == "fwd":
            def run(fn=fn):
                with torch.no_grad():
                    return fn(x, w1, w2, SLOPE)
        else:
            leaves = [t.detach().clone().requires_grad_(True) for t in (x, w1, w2)]

            def run(fn=fn, leaves=leaves):
                y = fn(*leaves, SLOPE)
                return torch.autograd.grad(y, leaves, gy)
        out[name] = run
    return out


def cases(smoke: bool, device) -> list[Case]:
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" and not smoke else torch.float32
    shapes = SMOKE_SHAPES if smoke else FULL_SHAPES
    baseline = "compiled" if device.type == "cuda" else "eager"
    out = []
    for M, d, H in shapes:
        for mode in ("fwd+bwd", "fwd"):
            gemm = 2 * M * d * H
            out.append(Case(
                op="mlp", name=f"mlp {mode} M={M} d={d} H={H}", mode=mode,
                build=lambda M=M, d=d, H=H, mode=mode: _build(M, d, H, dtype, device, mode),
                baseline=baseline,
                params=dict(M=M, d=d, hidden=H, dtype=str(dtype).removeprefix("torch."), negative_slope=SLOPE),
                flops=float(2 * gemm if mode == "fwd" else 6 * gemm),
            ))
    return out
