"""LQER (reference-stack 4.5): a quantized low-rank correction of the largest quantization errors.

For the ``top`` GPTQ tensors with the largest ``‖W − Ŵ‖_F``: truncated SVD of the error ``E = U S Vᵀ``, ``A = U_r S_r``
(rows × r) and ``B = V_rᵀ`` (r × cols), then

- A as int2 (values in [−2, 1]) with one fp16 scale ``max|A| / 1.5``;
- B as int4 (values in [−8, 7]) in groups of 64 consecutive (row-major flattened) elements, scale ``max|group| / 7.5``
  (fp16); when B's size is not a multiple of 64, the fallback is symmetric int4 per row (``max|row| / 7``, [−7, 7]).

The dequantized weight is ``Ŵ + Â B̂``, all in fp32 (then cast).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

A_LEVELS = (-2, 1)
B_LEVELS = (-8, 7)


def lqer_factors(E: Tensor, rank: int, group: int = 64) -> dict[str, Any]:
    """Quantized rank-``rank`` factors of the error ``E`` (N, K): dict with a_q, a_scale, b_q, b_scale, b_mode."""
    E = E.detach().float()
    N, K = E.shape
    r = max(1, min(rank, N, K))
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    A = U[:, :r] * S[:r]
    B = Vh[:r]
    a_scale = (A.abs().max() / 1.5).to(torch.float16).reshape(1)
    if not float(a_scale) > 0:
        a_scale = torch.ones(1, dtype=torch.float16)
    a_q = torch.clamp(torch.round(A / a_scale.float()), *A_LEVELS).to(torch.int8)
    if B.numel() % group == 0:
        g = B.reshape(-1, group)
        b_scale = (g.abs().amax(dim=1) / 7.5).to(torch.float16)
        b_scale = torch.where(b_scale.float() > 0, b_scale, torch.ones_like(b_scale))
        b_q = torch.clamp(torch.round(g / b_scale.float().unsqueeze(1)), *B_LEVELS).to(torch.int8).reshape(r, K)
        mode = f"group{group}"
    else:
        b_scale = (B.abs().amax(dim=1) / 7).to(torch.float16)
        b_scale = torch.where(b_scale.float() > 0, b_scale, torch.ones_like(b_scale))
        b_q = torch.clamp(torch.round(B / b_scale.float().unsqueeze(1)), -7, 7).to(torch.int8)
        mode = "row"
    return dict(rank=r, a_q=a_q, a_scale=a_scale, b_q=b_q, b_scale=b_scale, b_mode=mode)


def lqer_delta(f: dict[str, Any]) -> Tensor:
    """``Â B̂`` (N, K) in fp32 from the quantized factors."""
    A = f["a_q"].float() * f["a_scale"].float()
    r, K = f["b_q"].shape
    if f["b_mode"] == "row":
        B = f["b_q"].float() * f["b_scale"].float().unsqueeze(1)
    else:
        group = int(f["b_mode"][len("group"):])
        B = (f["b_q"].float().reshape(-1, group) * f["b_scale"].float().unsqueeze(1)).reshape(r, K)
    return A @ B


__all__ = ["lqer_factors", "lqer_delta"]
