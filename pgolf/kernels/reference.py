"""Pure-PyTorch references for every op in :mod:`pgolf.kernels`.

These are the ground truth the Triton kernels are tested against and the path used on CPU. Each function
states its tensor shapes; all are differentiable with plain autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, *, xsa: bool = False, cu_seqlens: Tensor | None = None,
              max_seqlen: int | None = None) -> Tensor:
    """Causal GQA attention with optional exclusive self-attention (XSA) and document isolation.

    q: (B, T, Hq, D); k, v: (B, T, Hkv, D) with Hq % Hkv == 0. Softmax scale is 1/sqrt(D).
    cu_seqlens: optional int32 (n+1,) cumulative document starts of a packed batch (then B must be 1);
    trailing repeats of the total length (padding) are allowed. Attention never crosses a document start.
    Returns y: (B, T, Hq, D); with ``xsa`` the component of y along the token's own normalized value
    vector (of its KV group) is removed.
    """
    B, T, Hq, D = q.shape
    if cu_seqlens is None:
        y = _sdpa_causal(q, k, v)
    else:
        if B != 1:
            raise ValueError(f"packed attention (cu_seqlens given) needs batch size 1, got q of shape {tuple(q.shape)}")
        y = _varlen_attention(q, k, v, cu_seqlens, max_seqlen)
    if xsa:
        y = xsa_project(y, v)
    return y


def attention_xsa_diagonal(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None,
                           max_seqlen: int | None = None) -> Tensor:
    """PR #1499's "XSA": causal GQA attention minus each token's own attention-weighted value, y_i − a_ii·v_i.

    a_ii = softmax weight of key i for query i = exp(q_i·k_i/√D − lse_i). This removes the diagonal term of the
    attention sum; :func:`xsa_project` (the kernels' XSA) removes the component of y_i along v̂_i instead. Shapes,
    masking and ``cu_seqlens`` as :func:`attention`. Returns (B, T, Hq, D).
    """
    B, T, Hq, D = q.shape
    group = Hq // k.shape[2]
    kq, vq = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    y = attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    self_score = (q.float() * kq.float()).sum(-1) / math.sqrt(D)  # (B, T, Hq)
    a_ii = torch.exp(self_score - _attention_lse(q.float(), kq.float(), cu_seqlens, max_seqlen))
    return y - a_ii.to(y.dtype).unsqueeze(-1) * vq


def _attention_lse(q: Tensor, k: Tensor, cu_seqlens: Tensor | None, max_seqlen: int | None) -> Tensor:
    """log Σ_j exp(q_i·k_j/√D) over the keys query i attends to: (B, T, H). q, k: (B, T, H, D), same H."""
    B, T, H, D = q.shape
    if cu_seqlens is None:
        s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        return s.masked_fill(~causal, float("-inf")).logsumexp(-1).transpose(1, 2)
    doc, _, lengths = segment_ids(cu_seqlens.to(q.device), T)
    S = min(int(max_seqlen or int(lengths.max())), T)
    nb, pad = -(-T // S), -(-T // S) * S - T
    pos = torch.arange(nb * S, device=q.device)
    doc = torch.cat((doc, -1 - torch.arange(pad, device=q.device)))  # padding: ids of its own
    qb = F.pad(q[0], (0, 0, 0, 0, 0, pad)).view(nb, S, H, D)
    kb = F.pad(k[0], (0, 0, 0, 0, 0, pad)).view(nb, S, H, D)
    kb = torch.cat((torch.cat((torch.zeros_like(kb[:1]), kb[:-1])), kb), dim=1)  # each block sees the previous
    dq, gq = doc.view(nb, S), pos.view(nb, S)
    dk = torch.cat((torch.cat((torch.full_like(dq[:1], -10 ** 9), dq[:-1])), dq), dim=1)
    gk = torch.cat((gq - S, gq), dim=1)
    mask = (dq[:, :, None] == dk[:, None, :]) & (gk[:, None, :] <= gq[:, :, None])
    s = torch.einsum("nshd,nkhd->nhsk", qb, kb) / math.sqrt(D)
    lse = s.masked_fill(~mask[:, None], float("-inf")).logsumexp(-1)  # (nb, H, S)
    return lse.transpose(1, 2).reshape(1, nb * S, H)[:, :T]


def xsa_project(y: Tensor, v: Tensor) -> Tensor:
    """Exclusive self-attention step: y ← y − ⟨y, v̂⟩ v̂ per query head, v̂ = v/‖v‖ of the head's KV group.

    y: (B, T, Hq, D); v: (B, T, Hkv, D). Returns (B, T, Hq, D). GQA-aware: v is never repeated.
    """
    B, T, Hq, D = y.shape
    Hkv = v.shape[2]
    yg = y.reshape(B, T, Hkv, Hq // Hkv, D)
    vn = F.normalize(v, dim=-1).unsqueeze(-2)
    return (yg - (yg * vn).sum(dim=-1, keepdim=True) * vn).reshape(B, T, Hq, D)


def mlp(x: Tensor, w1: Tensor, w2: Tensor, negative_slope: float = 0.5) -> Tensor:
    """``LeakyReLU_s(x W1ᵀ)² W2ᵀ`` (s = 0 gives ReLU²). x: (..., d); w1: (hidden, d); w2: (d, hidden)."""
    pre = F.linear(x, w1.to(x.dtype))
    act = F.leaky_relu(pre, negative_slope) if negative_slope > 0 else F.relu(pre)
    return F.linear(act.square(), w2.to(x.dtype))


def softcap(z: Tensor, cap: float) -> Tensor:
    """Logit softcap ``cap · tanh(z / cap)``; any shape."""
    return cap * torch.tanh(z / cap)


def softcap_ce(z: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Per-token cross-entropy of softcapped logits, fp32 math. z: (N, V) pre-softcap; targets: (N,) → (N,) fp32."""
    return F.cross_entropy(softcap(z.float(), cap), targets, reduction="none")


def lm_head_loss(h: Tensor, weight: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Tied LM head + softcapped CE. h: (N, d); weight: (V, d); targets: (N,) → per-token loss (N,) fp32."""
    return softcap_ce(F.linear(h, weight.to(h.dtype)), targets, cap)


def newton_schulz(G: Tensor, coefficients: tuple[tuple[float, float, float], ...], steps: int = 5,
                  eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximate the orthogonal polar factor of each matrix by a quintic Newton-Schulz iteration.

    G: (m, n) or (B, m, n). X = G/(‖G‖_F + eps) per matrix (in ``dtype``); if m > n it works on the transpose
    so the Gram matrix is the small one. Step k uses coefficients[min(k, len-1)]: A = X Xᵀ,
    X ← a X + (b A + c A²) X. Returns X in ``dtype`` with G's shape.
    """
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    for i in range(steps):
        a, b, c = coefficients[min(i, len(coefficients) - 1)]
        A = X @ X.mT
        Bm = b * A + c * (A @ A)
        X = a * X + Bm @ X
    return X.mT if transposed else X


def int6_matmul(x: Tensor, q: Tensor, scale: Tensor, *, in_features: int, packed: bool) -> Tensor:
    """Dequantize-then-matmul: y = x · (q ⊙ s)ᵀ. x: (..., K); q: (N, K) int8 or packed (N, 3·ceil(K/4)) uint8;
    scale: (N,) fp16. Dequantization is the artifact's: fp32 multiply, then cast to x's dtype."""
    from pgolf.kernels.int6_pack import dequantize

    return F.linear(x, dequantize(q, scale, in_features=in_features, packed=packed, dtype=x.dtype))


# ---------------------------------------------------------------------------------------------------------
# helpers

def _sdpa_causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return y.transpose(1, 2)


def segment_ids(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor, Tensor]:
    """From cu_seqlens (padded, int) and the total length: (doc id per token (T,), position in doc (T,), lengths).

    Duplicate (padding) entries are dropped; cu_seqlens must start at 0 and end at ``total``.
    """
    cu = torch.unique_consecutive(cu_seqlens.to(torch.long))
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {total}; got {cu_seqlens.tolist()}")
    lengths = cu[1:] - cu[:-1]
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    pos = torch.arange(total, device=cu.device) - cu[:-1][doc]
    return doc, pos, lengths


def _varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int | None) -> Tensor:
    """Document-isolated causal attention with static shapes (so ``torch.compile(fullgraph=True)`` traces it).

    The packed row is cut into blocks of S = max_seqlen tokens. A document of at most S tokens spans at most
    two consecutive blocks, so each query block attends to keys of its own and the previous block under the
    mask "same document and not in the future". Cost: 2× dense attention over the row; no host sync when
    ``max_seqlen`` is given. Every document must be at most ``max_seqlen`` long (the loaders split longer ones).
    """
    B, T, Hq, D = q.shape
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    if max_seqlen is None or not torch.compiler.is_compiling():
        _, _, lengths = segment_ids(cu, T)  # validates cu_seqlens (eager only: it syncs with the host)
        longest = int(lengths.max())
        if max_seqlen is not None and longest > max_seqlen:
            raise ValueError(f"a document of {longest} tokens exceeds max_seqlen={max_seqlen}")
        max_seqlen = max_seqlen or longest
    S = min(int(max_seqlen), T)
    nb = -(-T // S)
    pad = nb * S - T
    pos = torch.arange(nb * S, device=q.device)
    doc = torch.searchsorted(cu, pos, right=True) - 1  # padded tail: its own id, isolated from real tokens
    doc = torch.where(pos < T, doc, cu.numel() + pos)

    def blocks(t: Tensor, with_prev: bool) -> Tensor:
        t = F.pad(t[0], (0, 0, 0, 0, 0, pad)).view(nb, S, t.shape[2], D)
        if with_prev:
            t = torch.cat((torch.cat((torch.zeros_like(t[:1]), t[:-1])), t), dim=1)  # (nb, 2S, H, D)
        return t.transpose(1, 2)

    dq, gq = doc.view(nb, S), pos.view(nb, S)
    dk = torch.cat((torch.cat((torch.full_like(dq[:1], -1), dq[:-1])), dq), dim=1)
    gk = torch.cat((gq - S, gq), dim=1)
    mask = (dq[:, :, None] == dk[:, None, :]) & (gk[:, None, :] <= gq[:, :, None])
    y = F.scaled_dot_product_attention(blocks(q, False), blocks(k, True), blocks(v, True), attn_mask=mask[:, None],
                                       enable_gqa=Hq != k.shape[2])
    return y.transpose(1, 2).reshape(1, nb * S, Hq, D)[:, :T]
