"""Full-Hessian GPTQ with SDClip scales (reference-stack 4.4), plain round-to-nearest, and the error measures.

For a weight ``W`` (rows × cols, one row per output feature) and the Hessian ``H = Σ XᵀX / n_cal`` of its input:

- **SDClip** scale per row: ``s = k · std(W_row) / Q`` with ``Q = 2^(b−1) − 1`` (31 int6, 63 int7, 127 int8), rounded
  to fp16. ``std`` is torch's default (Bessel-corrected). A row with ``s = 0`` (constant row) falls back to
  ``absmax/Q`` and then to 1, so every scale is positive.
- **GPTQ**: dead columns (``H_jj = 0``) get ``H_jj = 1`` and ``W_:,j = 0``; damping ``λ = damp · mean(diag H)`` on the
  diagonal; act-order (columns by descending ``diag H``; ascending as PR #1499, or none as #490); ``U =
  chol_upper(H⁻¹)`` (or ``U = H⁻¹`` itself, ``inverse='plain'``, as #490 and #1499 do); columns in blocks of 128, each
  column rounded ``q = clamp(round(w/s), −Q, Q)`` and its error ``(w − q·s)/U_jj`` pushed onto the remaining columns
  of the block through row j of U, and the block's errors onto all later columns at the end of the block.
- Values come back as int8 tensors clamped to ±Q and fp16 scales; ``dequantize`` multiplies in fp32 then casts.

Everything runs in fp32 on the tensors' device. Quantizing the same inputs on the same device gives the same values.
"""

from __future__ import annotations

import torch
from torch import Tensor


def qmax(bits: int) -> int:
    """Largest magnitude of a symmetric signed ``bits``-bit value: 2^(bits−1) − 1."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bit width must be between 2 and 8, got {bits}")
    return 2 ** (bits - 1) - 1


def sdclip_scales(W: Tensor, bits: int, k: float) -> Tensor:
    """Per-row SDClip scales ``k · std(row) / Q`` as fp16 (N,) for a 2-D ``W`` (N, K); non-positive falls back."""
    if W.ndim != 2:
        raise ValueError(f"SDClip needs a 2-D weight, got shape {tuple(W.shape)}")
    if k <= 0:
        raise ValueError(f"SDClip k must be positive, got {k}")
    Q = qmax(bits)
    W = W.float()
    s = (k * W.std(dim=1) / Q).to(torch.float16)
    bad = ~(s.float() > 0)  # zero (constant row, or underflow) or nan (one column)
    if bool(bad.any()):
        fallback = (W.abs().amax(dim=1) / Q).to(torch.float16)
        fallback = torch.where(fallback.float() > 0, fallback, torch.ones_like(fallback))
        s = torch.where(bad, fallback, s)
    return s


def absmax_scales(W: Tensor, bits: int = 8) -> Tensor:
    """Per-row ``absmax / Q`` scales as fp16 (rows that are all zero get 1)."""
    Q = qmax(bits)
    s = (W.float().abs().amax(dim=1) / Q).to(torch.float16)
    return torch.where(s.float() > 0, s, torch.ones_like(s))


def quantize_rtn(W: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Round-to-nearest ``clamp(round(W/s), −Q, Q)`` per row, as int8 (N, K)."""
    Q = qmax(bits)
    s = scale.float().view(-1, 1)
    return torch.clamp(torch.round(W.float() / s), -Q, Q).to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(q · s)`` in fp32, then cast to ``dtype``; q (N, K) int, scale (N,)."""
    return (q.float() * scale.float().view(-1, 1)).to(dtype)


@torch.no_grad()
def gptq_quantize(W: Tensor, H: Tensor, bits: int, k: float, *, block_size: int = 128, damp: float = 0.01,
                  act_order: bool | str = True, scale: Tensor | None = None,
                  inverse: str = "cholesky") -> tuple[Tensor, Tensor]:
    """GPTQ of ``W`` (N, K) under the input Hessian ``H`` (K, K): returns (int8 values (N, K), fp16 scales (N,)).

    ``scale`` overrides the SDClip scales (same shape and meaning). The scales come from the original rows.
    ``act_order``: 'descending' (or True), 'ascending', 'none' (or False). ``inverse``: 'cholesky' or 'plain'.
    """
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"GPTQ needs W (N, K) and H (K, K); got W {tuple(W.shape)} and H {tuple(H.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    Q = qmax(bits)
    s16 = sdclip_scales(W, bits, k) if scale is None else scale.to(torch.float16)
    s = s16.float().to(W.device)
    W = W.detach().float().clone()
    H = H.detach().float().to(W.device).clone()
    N, K = W.shape
    dead = torch.diagonal(H) == 0
    if bool(dead.any()):
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    order = {True: "descending", False: "none"}.get(act_order, act_order)
    if order not in ("descending", "ascending", "none") or inverse not in ("cholesky", "plain"):
        raise ValueError(f"act_order must be descending/ascending/none and inverse cholesky/plain, got "
                         f"{act_order!r} and {inverse!r}")
    perm = None
    if order != "none":
        perm = torch.argsort(torch.diagonal(H), descending=order == "descending", stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv = _upper_inverse_cholesky(H, damp, plain=inverse == "plain")
    # Work on the transpose (K, N): column j of W is the contiguous row j of Wt.
    Wt = W.t().contiguous()
    qt = torch.zeros(K, N, dtype=torch.float32, device=W.device)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = Wt[i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = Hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            w = W1[j]
            qj = torch.clamp(torch.round(w / s), -Q, Q)
            qt[i1 + j] = qj
            err = (w - qj * s) / U1[j, j]
            W1[j:].addr_(U1[j, j:], err, alpha=-1.0)  # rank-1 update of the block's remaining columns
            E1[j] = err
        if i2 < K:
            Wt[i2:] -= Hinv[i1:i2, i2:].t() @ E1
    q = qt.t()
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q.to(torch.int8), s16


def _upper_inverse_cholesky(H: Tensor, damp: float, plain: bool = False) -> Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H) (``plain``: (H + λI)⁻¹ itself); λ grows ×10
    if H is not positive definite."""
    lam = damp * float(torch.diagonal(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            if plain:
                return Hinv
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        lam = lam * 10 if lam > 0 else 1e-6
    raise RuntimeError(f"GPTQ: the Hessian ({H.shape[0]}x{H.shape[0]}) stays singular even with damping {lam:.3g}")


def hessian_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """Output error ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` (in float64): what GPTQ minimizes."""
    D = (W.double() - W_hat.double())
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D))


__all__ = ["qmax", "sdclip_scales", "absmax_scales", "quantize_rtn", "dequantize", "gptq_quantize", "hessian_error"]
