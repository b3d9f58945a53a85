"""The int6 weight layouts shared by the artifact (:mod:`pgolf.quant`) and the int6 matmul kernel.

Values are signed integers in [-31, 31] (SDClip with Q = 31), one row per output feature, with one fp16
scale per row. Two containers:

- **int8**: ``q`` is an (N, K) int8 tensor, one value per byte (the records' storage).
- **packed**: 4 values in 3 bytes. Each value is biased to 6 unsigned bits (u = v + 32, so u ∈ [1, 63]); the
  row is zero-padded (v = 0) to a multiple of 4; group g holds u0..u3 = row[4g..4g+3] as the 24-bit word
  ``w = u0 | u1 << 6 | u2 << 12 | u3 << 18``, stored little-endian as bytes ``w & 255, (w >> 8) & 255, w >> 16``.
  ``q`` is an (N, 3·ceil(K/4)) uint8 tensor; ``K`` (in_features) must be given to unpack.

Dequantization is deterministic: ``(q.float() * s.float()).to(dtype)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

BIAS = 32


def pack_int6(q: Tensor) -> Tensor:
    """(N, K) integer tensor with values in [-32, 31] → (N, 3·ceil(K/4)) uint8, the packed layout."""
    if q.ndim != 2:
        raise ValueError(f"pack_int6 expects a 2-D (rows, cols) tensor, got shape {tuple(q.shape)}")
    lo, hi = int(q.min()) if q.numel() else 0, int(q.max()) if q.numel() else 0
    if lo < -BIAS or hi > BIAS - 1:
        raise ValueError(f"int6 values must lie in [-32, 31]; found range [{lo}, {hi}]")
    N, K = q.shape
    pad = (-K) % 4
    u = (torch.nn.functional.pad(q.to(torch.int32), (0, pad)) + BIAS).view(N, -1, 4)
    w = u[..., 0] | (u[..., 1] << 6) | (u[..., 2] << 12) | (u[..., 3] << 18)
    out = torch.stack((w & 255, (w >> 8) & 255, (w >> 16) & 255), dim=-1)
    return out.reshape(N, -1).to(torch.uint8)


def unpack_int6(packed: Tensor, in_features: int) -> Tensor:
    """(N, 3·ceil(K/4)) uint8 → (N, K) int8 values in [-32, 31] (inverse of :func:`pack_int6`)."""
    N, nbytes = packed.shape
    if nbytes != 3 * ((in_features + 3) // 4):
        raise ValueError(f"packed int6 rows have {nbytes} bytes but in_features={in_features} needs "
                         f"{3 * ((in_features + 3) // 4)}")
    b = packed.to(torch.int32).view(N, -1, 3)
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    u = torch.stack([(w >> s) & 63 for s in (0, 6, 12, 18)], dim=-1).reshape(N, -1)[:, :in_features]
    return (u - BIAS).to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, *, in_features: int | None = None, packed: bool = False,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, K) weights in ``dtype`` from int8 or packed int6 values and (N,) scales: fp32 multiply, then cast."""
    values = unpack_int6(q, in_features) if packed else q
    return (values.float() * scale.float().view(-1, 1)).to(dtype)
