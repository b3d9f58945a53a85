"""Newton-Schulz benchmark cases: Muon's orthogonalization of the whole record bank set in one optimizer step.

One :class:`~pgolf.bench.core.Case` = every bank of one Muon step, 5 NS steps each, in bf16 (CUDA):

- ``all banks``: the four record banks, qo (22, 512, 512), kv (22, 256, 512), up (11, 2048, 512) and
  down (11, 512, 2048) (single GPU, or what one rank would do without sharding);
- ``8-rank shard``: what one rank of an 8-GPU Parallel-Muon run orthogonalizes, ceil(B/8) matrices per bank:
  (3, 512, 512), (3, 256, 512), (2, 2048, 512), (2, 512, 2048);

each for the classic and the Polar Express coefficients. Implementations: ``triton``
(:mod:`pgolf.kernels.newton_schulz`), ``eager`` (:func:`pgolf.kernels.reference.newton_schulz`, batched bmm) and
``compiled`` (``torch.compile`` of that reference, ``dynamic=False``: one graph per bank shape), the
baseline.
FLOPs per matrix and step on the wide orientation p×q (p ≤ q): 4p²q + 2p³ (X Xᵀ, A², B·X; the Triton kernel
computes half of the two symmetric products but the count is the standard one).

Orthogonality: ``build()`` runs each implementation once and records in the case's ``params``, per
implementation, ``orth_err_<impl>`` = max over all matrices of max_i |σ_i − 1| (float64 SVD) and, for the
candidate, ``max_abs_diff_triton_vs_eager``; :func:`orthogonality_report` computes the same numbers on demand.
``smoke=True``: one case (Polar Express) on two tiny fp32 banks, for CPU (Triton only under
``TRITON_INTERPRET=1`` or on CUDA). Off CUDA, ``compiled`` uses the ``eager`` compile backend (graph capture
only), so smoke runs need no C++ toolchain.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from pgolf.bench.core import Case
from pgolf.bench.ops import triton_module
from pgolf.kernels import reference
from pgolf.train.muon import CLASSIC_COEFFS, POLAR_EXPRESS_COEFFS

BANKS = {"qo": (22, 512, 512), "kv": (22, 256, 512), "up": (11, 2048, 512), "down": (11, 512, 2048)}
WORLD = 8
NS_STEPS = 5
EPS = 1e-7
COEFFS = {"classic": CLASSIC_COEFFS, "polar_express": POLAR_EXPRESS_COEFFS}


def shard(banks: dict[str, tuple[int, int, int]], world: int = WORLD) -> dict[str, tuple[int, int, int]]:
    """The per-rank shard of each bank: ceil(B/world) matrices."""
    return {k: (-(-b // world), m, n) for k, (b, m, n) in banks.items()}


def ns_flops(banks: dict[str, tuple[int, int, int]], steps: int = NS_STEPS) -> float:
    """Σ over banks of B · steps · (4p²q + 2p³), p = min(m, n), q = max(m, n)."""
    total = 0.0
    for b, m, n in banks.values():
        p, q = min(m, n), max(m, n)
        total += b * steps * (4.0 * p * p * q + 2.0 * p ** 3)
    return total


def orthogonality_report(outputs: list[torch.Tensor]) -> float:
    """max over every matrix of every bank of max_i |σ_i − 1| (float64 singular values)."""
    worst = 0.0
    for Y in outputs:
        s = torch.linalg.svdvals(Y.detach().to(torch.float64))
        worst = max(worst, float((s - 1.0).abs().max()))
    return worst


def _build(banks: dict[str, tuple[int, int, int]], coeffs, dtype: torch.dtype, device: torch.device,
           params: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    # momentum-like inputs: one (B, m, n) stack per bank, already in the NS dtype (Muon's buffers are bf16)
    Gs = [torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype) for shape in banks.values()]
    impls: dict[str, Callable[[], Any]] = {}
    ns = triton_module("newton_schulz", device)
    if ns is not None:
        impls["triton"] = lambda: [ns.newton_schulz(G, coeffs, NS_STEPS, EPS, dtype) for G in Gs]
    impls["eager"] = lambda: [reference.newton_schulz(G, coeffs, NS_STEPS, EPS, dtype) for G in Gs]
    # CPU (smoke): the 'eager' compile backend, so the case runs in seconds without a C++ toolchain
    compiled_ns = torch.compile(reference.newton_schulz, dynamic=False,
                                backend="inductor" if device.type == "cuda" else "eager")
    impls["compiled"] = lambda: [compiled_ns(G, coeffs, NS_STEPS, EPS, dtype) for G in Gs]

    # correctness / quality numbers, once per build
    outs = {}
    with torch.no_grad():
        for name, fn in impls.items():
            outs[name] = fn()
            params[f"orth_err_{name}"] = round(orthogonality_report(outs[name]), 5)
    if "triton" in outs:
        params["max_abs_diff_triton_vs_eager"] = max(
            float((a.float() - b.float()).abs().max()) for a, b in zip(outs["triton"], outs["eager"]))
    del outs
    return impls


def cases(smoke: bool, device) -> list[Case]:
    device = torch.device(device)
    if smoke:  # one case: the interpreter runs ~17 launches per bank
        sets = {"smoke banks": {"wide": (2, 24, 40), "tall": (2, 40, 24)}}
        coeff_sets = {"polar_express": POLAR_EXPRESS_COEFFS}
        dtype = torch.float32
    else:
        sets = {"all banks": BANKS, f"{WORLD}-rank shard": shard(BANKS)}
        coeff_sets = COEFFS
        dtype = torch.bfloat16
    out: list[Case] = []
    for set_name, banks in sets.items():
        for coeff_name, coeffs in coeff_sets.items():
            params: dict[str, Any] = dict(banks={k: list(v) for k, v in banks.items()}, ns_steps=NS_STEPS,
                                          coefficients=coeff_name, dtype=str(dtype),
                                          matrices=sum(b for b, _, _ in banks.values()))
            out.append(Case(
                op="newton_schulz", name=f"newton_schulz step {set_name} {coeff_name}", mode="step",
                build=lambda banks=banks, coeffs=coeffs, params=params: _build(banks, coeffs, dtype, device, params),
                baseline="compiled", params=params, flops=ns_flops(banks)))
    return out
