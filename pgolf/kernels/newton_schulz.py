"""Batched Newton-Schulz orthogonalization (Muon's inner loop) as Triton kernels.

Same contract as :func:`pgolf.kernels.reference.newton_schulz`: ``G`` is (m, n) or (B, m, n); every matrix is
Frobenius-normalized (``X = G/(‖G‖_F + eps)`` in ``dtype``), tall matrices are iterated in their wide
orientation, and step k applies ``A = X Xᵀ; X ← a_k X + (b_k A + c_k A²) X`` with ``(a_k, b_k, c_k) =
coefficients[min(k, len - 1)]`` (classic quintic or Polar Express). The result has G's shape, in ``dtype``.

Kernels (all batched over B with ``program_id(1)``; every launch covers the whole same-shape bank):

1. ``_ns_sumsq_kernel`` + ``_ns_scale_kernel``: per-matrix Frobenius norm as deterministic per-tile partial
   sums (no atomics), then ``X = G·1/(‖G‖+eps)`` written into the working buffer in ``dtype``.
2. ``_ns_gram_kernel``: ``A = X Xᵀ`` (p×p, p = min(m, n)). Only the lower-triangular tiles (j ≤ i) are
   computed: one program per tile, the linear program id decoded to (i, j) in-kernel; each program stores its
   tile and the transposed mirror, so the symmetric product costs ~half the FLOPs.
3. ``_ns_poly_kernel``: ``Bm = b·A + c·A²``; A² is symmetric too, so again lower tiles only plus mirror, with
   the ``b·A`` term added in the epilogue (one extra tile load).
4. ``_ns_update_kernel``: ``X' = a·X + Bm·X`` as a tiled GEMM with the ``a·X`` term in the epilogue, written to
   a ping-pong buffer (an in-place update would race with other tiles reading X).

Tall matrices (m > n) are never transposed in memory: the working buffers keep G's (m, n) layout and the
kernels index the wide view through swapped strides, so the result needs no transpose either. All address
arithmetic is int64 (indices cast before multiplying by strides), checked in the tests by inputs whose
element offsets exceed 2³¹ (strided views of a sparse memory-mapped file).

Dot operands are the working dtype (bf16 on CUDA) with fp32 accumulation; fp32 uses ``input_precision="ieee"``
to match the fp32 reference. Under ``TRITON_INTERPRET=1`` bf16 tiles are upcast to fp32 before ``tl.dot``
(the interpreter's bf16 dot is wrong). Launch configs: the kernels ``newton_schulz.norm_sumsq``, ``.norm_scale``,
``.gram``, ``.poly`` and ``.update`` of :mod:`pgolf.kernels.launch` (keys: p, q, bucketed B, dtype).

No autograd: Newton-Schulz is an optimizer step (Muon runs it under ``no_grad``); a ``G`` that requires grad
with grad mode on raises. Registered as the custom op ``pgolf::newton_schulz`` (with a fake), so
``torch.compile(fullgraph=True)`` traces through it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

import pgolf.kernels
from pgolf.kernels import launcher, tuning


# ------------------------------------------------------------------------------------------------------------
# kernels. Every address is ptr + (batch index).to(int64)·stride_b + (row index).to(int64)·stride_r + ...; the
# helpers are written inline because each nested @triton.jit call costs milliseconds under the interpreter.

@triton.jit
def _ns_sumsq_kernel(g_ptr, x_ptr, part_ptr, M, N, stride_gb, stride_gm, stride_gn, P,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """part[b, t] = Σ over tile t of G[b].to(dtype)² (fp32). x_ptr only supplies the working dtype."""
    t = tl.program_id(0)
    b = tl.program_id(1)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    rows = (t // n_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (t % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    g_ptrs = (g_ptr + b.to(tl.int64) * stride_gb + rows[:, None].to(tl.int64) * stride_gm
              + cols[None, :].to(tl.int64) * stride_gn)
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(part_ptr + b.to(tl.int64) * P + t, tl.sum(tl.sum(g * g, axis=1), axis=0))


@triton.jit
def _ns_scale_kernel(g_ptr, part_ptr, x_ptr, M, N, stride_gb, stride_gm, stride_gn, stride_xb, stride_xm,
                     stride_xn, P, eps, P_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """X[b] = G[b].to(dtype) / (sqrt(Σ part[b, :]) + eps), stored in dtype."""
    t = tl.program_id(0)
    b = tl.program_id(1)
    pidx = tl.arange(0, P_POW2)
    part = tl.load(part_ptr + b.to(tl.int64) * P + pidx, mask=pidx < P, other=0.0)
    inv = 1.0 / (tl.sqrt(tl.sum(part, axis=0)) + eps)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    rows = (t // n_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (t % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    r64 = rows[:, None].to(tl.int64)
    c64 = cols[None, :].to(tl.int64)
    g = tl.load(g_ptr + b.to(tl.int64) * stride_gb + r64 * stride_gm + c64 * stride_gn, mask=mask, other=0.0)
    x = g.to(x_ptr.dtype.element_ty).to(tl.float32) * inv
    tl.store(x_ptr + b.to(tl.int64) * stride_xb + r64 * stride_xm + c64 * stride_xn, x.to(x_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _ns_gram_kernel(x_ptr, a_ptr, P_, Q_, stride_xb, stride_xr, stride_xc, stride_ab, stride_ar, stride_ac,
                    BLOCK: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """A[b] = X[b] X[b]ᵀ for the wide view X[b]: (P_, Q_) (strides r, c); lower tiles + mirror."""
    # lower-triangular tile t = i(i+1)/2 + j, j <= i (float sqrt, then fix a possible off-by-one)
    t = tl.program_id(0)
    i = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where((i + 1) * (i + 2) // 2 <= t, i + 1, i)
    i = tl.where(i * (i + 1) // 2 > t, i - 1, i)
    j = t - i * (i + 1) // 2
    b = tl.program_id(1)
    rows_i = i * BLOCK + tl.arange(0, BLOCK)
    rows_j = j * BLOCK + tl.arange(0, BLOCK)
    mask_i = rows_i < P_
    mask_j = rows_j < P_
    xb = x_ptr + b.to(tl.int64) * stride_xb
    lhs_rows = xb + rows_i[:, None].to(tl.int64) * stride_xr  # (BLOCK, 1)
    rhs_rows = xb + rows_j[None, :].to(tl.int64) * stride_xr  # (1, BLOCK): X[j-block, :]ᵀ by indexing
    kr = tl.arange(0, BK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, Q_, BK):
        ks = k0 + kr
        koff = ks.to(tl.int64) * stride_xc
        lhs = tl.load(lhs_rows + koff[None, :], mask=mask_i[:, None] & (ks[None, :] < Q_), other=0.0)
        rhs = tl.load(rhs_rows + koff[:, None], mask=(ks[:, None] < Q_) & mask_j[None, :], other=0.0)
        if UPCAST:
            lhs = lhs.to(tl.float32)
            rhs = rhs.to(tl.float32)
        if IEEE:
            acc = tl.dot(lhs, rhs, acc, input_precision="ieee")
        else:
            acc = tl.dot(lhs, rhs, acc)
    out = acc.to(a_ptr.dtype.element_ty)
    ab = a_ptr + b.to(tl.int64) * stride_ab
    ri = rows_i[:, None].to(tl.int64)
    rj = rows_j[None, :].to(tl.int64)
    mask = mask_i[:, None] & mask_j[None, :]
    tl.store(ab + ri * stride_ar + rj * stride_ac, out, mask=mask)
    if i != j:  # the mirrored tile A[j, i] = A[i, j]ᵀ, stored through transposed strides
        tl.store(ab + ri * stride_ac + rj * stride_ar, out, mask=mask)


@triton.jit
def _ns_poly_kernel(a_ptr, m_ptr, P_, stride_ab, stride_ar, stride_ac, stride_mb, stride_mr, stride_mc,
                    coef_b, coef_c, BLOCK: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                    IEEE: tl.constexpr):
    """Bm[b] = coef_b·A[b] + coef_c·A[b]² for symmetric A (P_×P_); lower tiles + mirror."""
    # lower-triangular tile t = i(i+1)/2 + j, j <= i (float sqrt, then fix a possible off-by-one)
    t = tl.program_id(0)
    i = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where((i + 1) * (i + 2) // 2 <= t, i + 1, i)
    i = tl.where(i * (i + 1) // 2 > t, i - 1, i)
    j = t - i * (i + 1) // 2
    b = tl.program_id(1)
    rows_i = i * BLOCK + tl.arange(0, BLOCK)
    rows_j = j * BLOCK + tl.arange(0, BLOCK)
    mask_i = rows_i < P_
    mask_j = rows_j < P_
    ab = a_ptr + b.to(tl.int64) * stride_ab
    lhs_rows = ab + rows_i[:, None].to(tl.int64) * stride_ar
    rhs_cols = ab + rows_j[None, :].to(tl.int64) * stride_ac
    kr = tl.arange(0, BK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, P_, BK):
        ks = k0 + kr
        lhs = tl.load(lhs_rows + ks[None, :].to(tl.int64) * stride_ac, mask=mask_i[:, None] & (ks[None, :] < P_),
                      other=0.0)
        rhs = tl.load(rhs_cols + ks[:, None].to(tl.int64) * stride_ar, mask=(ks[:, None] < P_) & mask_j[None, :],
                      other=0.0)
        if UPCAST:
            lhs = lhs.to(tl.float32)
            rhs = rhs.to(tl.float32)
        if IEEE:
            acc = tl.dot(lhs, rhs, acc, input_precision="ieee")
        else:
            acc = tl.dot(lhs, rhs, acc)
    ri = rows_i[:, None].to(tl.int64)
    rj = rows_j[None, :].to(tl.int64)
    mask = mask_i[:, None] & mask_j[None, :]
    a_ij = tl.load(ab + ri * stride_ar + rj * stride_ac, mask=mask, other=0.0).to(tl.float32)
    out = (coef_c * acc + coef_b * a_ij).to(m_ptr.dtype.element_ty)  # epilogue: + b·A
    mb = m_ptr + b.to(tl.int64) * stride_mb
    tl.store(mb + ri * stride_mr + rj * stride_mc, out, mask=mask)
    if i != j:  # mirrored tile
        tl.store(mb + ri * stride_mc + rj * stride_mr, out, mask=mask)


@triton.jit
def _ns_update_kernel(m_ptr, x_ptr, y_ptr, P_, Q_, stride_mb, stride_mr, stride_mc, stride_xb, stride_xr,
                      stride_xc, stride_yb, stride_yr, stride_yc, coef_a, BM: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Y[b] = coef_a·X[b] + Bm[b]·X[b]; X, Y: wide views (P_, Q_), Bm: (P_, P_)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    n_tiles_q = tl.cdiv(Q_, BN)
    rows = (pid // n_tiles_q) * BM + tl.arange(0, BM)
    cols = (pid % n_tiles_q) * BN + tl.arange(0, BN)
    mask_r = rows < P_
    mask_c = cols < Q_
    mb = m_ptr + b.to(tl.int64) * stride_mb
    xb = x_ptr + b.to(tl.int64) * stride_xb
    lhs_rows = mb + rows[:, None].to(tl.int64) * stride_mr
    rhs_cols = xb + cols[None, :].to(tl.int64) * stride_xc
    kr = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, P_, BK):
        ks = k0 + kr
        lhs = tl.load(lhs_rows + ks[None, :].to(tl.int64) * stride_mc, mask=mask_r[:, None] & (ks[None, :] < P_),
                      other=0.0)
        rhs = tl.load(rhs_cols + ks[:, None].to(tl.int64) * stride_xr, mask=(ks[:, None] < P_) & mask_c[None, :],
                      other=0.0)
        if UPCAST:
            lhs = lhs.to(tl.float32)
            rhs = rhs.to(tl.float32)
        if IEEE:
            acc = tl.dot(lhs, rhs, acc, input_precision="ieee")
        else:
            acc = tl.dot(lhs, rhs, acc)
    mask = mask_r[:, None] & mask_c[None, :]
    r64 = rows[:, None].to(tl.int64)
    c64 = cols[None, :].to(tl.int64)
    x_ij = tl.load(xb + r64 * stride_xr + c64 * stride_xc, mask=mask, other=0.0).to(tl.float32)
    out = coef_a * x_ij + acc  # epilogue: + a·X
    y_ptrs = y_ptr + b.to(tl.int64) * stride_yb + r64 * stride_yr + c64 * stride_yc
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------------
# launch configs (pgolf.kernels.launch), keys: p, q of the wide view, power-of-two bucket of the batch, dtype

def _cfg(num_warps: int, num_stages: int, **tiles) -> dict:
    return dict(tiles, num_warps=num_warps, num_stages=num_stages)


# The first of each list is the default; fp32 (ieee dots on CUDA cores) needs smaller tiles per warp.
SYM_CONFIGS = dict(half=[_cfg(8, 3, BLOCK=128, BK=64), _cfg(4, 3, BLOCK=64, BK=64), _cfg(4, 4, BLOCK=64, BK=32),
                         _cfg(8, 4, BLOCK=128, BK=32)],
                   float32=[_cfg(8, 3, BLOCK=64, BK=32), _cfg(4, 3, BLOCK=32, BK=32)])
UPDATE_CONFIGS = dict(half=[_cfg(8, 3, BM=128, BN=128, BK=64), _cfg(4, 3, BM=64, BN=64, BK=64),
                            _cfg(4, 4, BM=64, BN=128, BK=64), _cfg(8, 4, BM=128, BN=64, BK=32),
                            _cfg(8, 3, BM=128, BN=256, BK=32)],
                      float32=[_cfg(4, 3, BM=64, BN=64, BK=32), _cfg(4, 3, BM=32, BN=64, BK=32)])
NORM = _cfg(4, 3, BLOCK_M=64, BLOCK_N=128)  # the sum of squares and the scale share one tiling
# Interpreter: small tiles keep the numpy emulation fast.
_INTERPRET = {"norm": dict(BLOCK_M=64, BLOCK_N=64), "sym": dict(BLOCK=64, BK=64), "update": dict(BM=64, BN=64, BK=64)}

NORM_SUMSQ = launcher.Kernel("newton_schulz", "norm_sumsq", _ns_sumsq_kernel, [NORM], _INTERPRET["norm"])
NORM_SCALE = launcher.Kernel("newton_schulz", "norm_scale", _ns_scale_kernel, [NORM], _INTERPRET["norm"])
GRAM = launcher.Kernel("newton_schulz", "gram", _ns_gram_kernel, launcher.by_dtype(**SYM_CONFIGS), _INTERPRET["sym"])
POLY = launcher.Kernel("newton_schulz", "poly", _ns_poly_kernel, launcher.by_dtype(**SYM_CONFIGS), _INTERPRET["sym"])
UPDATE = launcher.Kernel("newton_schulz", "update", _ns_update_kernel, launcher.by_dtype(**UPDATE_CONFIGS),
                         _INTERPRET["update"])


# ------------------------------------------------------------------------------------------------------------
# launcher

def _check(G: Tensor, coefficients, steps: int, dtype: torch.dtype) -> None:
    if G.dim() not in (2, 3):
        raise ValueError(f"newton_schulz expects G of shape (m, n) or (B, m, n), got {tuple(G.shape)}")
    if not (G.is_floating_point() and dtype in (torch.float32, torch.float16, torch.bfloat16)):
        raise TypeError(f"newton_schulz needs a floating G and dtype in fp32/fp16/bf16; got {G.dtype} → {dtype}")
    launcher.require_device(G, "newton_schulz")
    if int(steps) < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if len(coefficients) == 0:
        raise ValueError("newton_schulz needs at least one (a, b, c) coefficient triple")


def launch(G: Tensor, coefficients: Sequence[Sequence[float]], steps: int = 5, eps: float = 1e-7,
           dtype: torch.dtype = torch.bfloat16, *, config: dict | None = None) -> Tensor:
    """Run the kernels directly (no custom op). ``config`` ({'norm'|'sym'|'update': {...}}) overrides tiles."""
    coeffs = [tuple(float(v) for v in t) for t in coefficients]
    if any(len(t) != 3 for t in coeffs):
        raise ValueError(f"coefficients must be (a, b, c) triples, got {coefficients!r}")
    _check(G, coeffs, steps, dtype)
    config = config or {}
    G3 = G.unsqueeze(0) if G.dim() == 2 else G
    B, m, n = G3.shape
    dev = G.device
    out = launcher.new_output((B, m, n), dtype, dev)
    if B * m * n == 0:
        return out.view(G.shape)
    tall = m > n
    p, q = (n, m) if tall else (m, n)

    def wide(t: Tensor) -> tuple[int, int, int]:  # (batch, row, col) strides of the (p, q) wide view
        s = t.stride()
        return (s[0], s[2], s[1]) if tall else (s[0], s[1], s[2])

    upcast = launcher.upcast_dots(dtype)
    ieee = dtype == torch.float32
    steps = int(steps)
    bufs = [out, launcher.new_output((B, m, n), dtype, dev) if steps > 0 else out]
    cur = steps % 2  # the last step lands in bufs[0] = out
    key = dict(p=p, q=q, b=tuning.pow2_bucket(B), dtype=launcher.dtype_name(dtype))

    # 1. Frobenius normalization into bufs[cur]: per-tile partial sums, then the scale (one tiling for both)
    ncfg = config.get("norm") or NORM_SUMSQ.pick(key, dev)
    n_tiles = triton.cdiv(m, ncfg["BLOCK_M"]) * triton.cdiv(n, ncfg["BLOCK_N"])
    part = launcher.new_output((B, n_tiles), torch.float32, dev)
    NORM_SUMSQ.run(lambda c: (n_tiles, B), (G3, bufs[cur], part, m, n, *G3.stride(), n_tiles), key=key, device=dev,
                   config=ncfg)
    NORM_SCALE.run(lambda c: (n_tiles, B), (G3, part, bufs[cur], m, n, *G3.stride(), *bufs[cur].stride(), n_tiles,
                                            float(eps)),
                   dict(P_POW2=triton.next_power_of_2(n_tiles)), key=key, device=dev, config=ncfg)
    if steps == 0:
        return out.view(G.shape)

    A = launcher.new_output((B, p, p), dtype, dev)
    Bm = launcher.new_output((B, p, p), dtype, dev)

    def sym_grid(meta):
        t = triton.cdiv(p, meta["BLOCK"])
        return (t * (t + 1) // 2, B)

    def upd_grid(meta):
        return (triton.cdiv(p, meta["BM"]) * triton.cdiv(q, meta["BN"]), B)

    consts = dict(UPCAST=upcast, IEEE=ieee)
    sym_cfg, upd_cfg = config.get("sym"), config.get("update")
    for k in range(steps):
        a, b, c = coeffs[min(k, len(coeffs) - 1)]
        X, Y = bufs[cur], bufs[1 - cur]
        # A = X Xᵀ;  Bm = b·A + c·A²;  Y = a·X + Bm·X
        GRAM.run(sym_grid, (X, A, p, q, *wide(X), *A.stride()), consts, key=key, device=dev, config=sym_cfg)
        POLY.run(sym_grid, (A, Bm, p, *A.stride(), *Bm.stride(), float(b), float(c)), consts, key=key, device=dev,
                 config=sym_cfg)
        UPDATE.run(upd_grid, (Bm, X, Y, p, q, *Bm.stride(), *wide(X), *wide(Y), float(a)), consts, key=key,
                   device=dev, config=upd_cfg)
        cur = 1 - cur
    assert cur == 0
    return out.view(G.shape)


# ------------------------------------------------------------------------------------------------------------
# custom op + dispatch registration

@torch.library.custom_op("pgolf::newton_schulz", mutates_args=())
def newton_schulz_op(G: Tensor, coefficients: list[float], steps: int, eps: float, dtype: torch.dtype) -> Tensor:
    """Custom-op form: ``coefficients`` is the flattened list of (a, b, c) triples."""
    if len(coefficients) % 3:
        raise ValueError(f"flattened coefficients must hold whole (a, b, c) triples, got {len(coefficients)} values")
    triples = [tuple(coefficients[i:i + 3]) for i in range(0, len(coefficients), 3)]
    return launch(G, triples, steps, eps, dtype)


@newton_schulz_op.register_fake
def _newton_schulz_fake(G: Tensor, coefficients: list[float], steps: int, eps: float, dtype: torch.dtype) -> Tensor:
    return G.new_empty(G.shape, dtype=dtype)


def newton_schulz(G: Tensor, coefficients: Sequence[Sequence[float]], steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Triton Newton-Schulz; same signature and result contract as the reference. No autograd."""
    if G.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("the Triton newton_schulz has no autograd (it is an optimizer step): call it under "
                           "torch.no_grad() or on a detached tensor")
    flat = []
    for triple in coefficients:
        if len(triple) != 3:
            raise ValueError(f"coefficients must be (a, b, c) triples, got {coefficients!r}")
        flat.extend(float(v) for v in triple)
    return torch.ops.pgolf.newton_schulz(G, flat, int(steps), float(eps), dtype)


pgolf.kernels.register("newton_schulz", "triton", newton_schulz)
