"""Flash-style causal GQA attention with a fused XSA epilogue and document isolation, forward and backward.

Computes the same thing as :func:`pgolf.kernels.reference.attention`: q (B, T, Hq, D), k/v (B, T, Hkv, D) →
y (B, T, Hq, D), softmax scale 1/sqrt(D), causal, GQA (Hq % Hkv == 0), optional XSA
(``y ← y − ⟨y, v̂⟩ v̂`` with v̂ the token's own normalized value of its KV group) and, with ``cu_seqlens``
(B = 1, int32, padded by repeating the total), attention that never crosses a document start.

Design
------
* **GQA packing.** A program owns one KV head and a tile of ``TOK = BLOCK_M // G`` tokens (G = Hq/Hkv). Its
  BLOCK_M rows are the pairs (token, query head of the group), head fastest, which in the (B, T, Hq, D) layout
  is one contiguous run of G·D elements per token. Every K/V tile is loaded once for the whole group.
* **Forward.** Online softmax (base-2 exponent, fp32 running max / sum / accumulator) over key tiles of
  BLOCK_N; no T×T matrix. The per-row log-sum-exp (base 2, fp32, (B, T, Hq)) is saved for the backward. The
  XSA epilogue projects the normalized output and also saves c = ⟨y, v̂⟩ (fp32, (B, T, Hq)) so the backward can
  rebuild the pre-projection output exactly as y = y' + c v̂ without storing it.
* **Masks and document starts.** The wrapper turns ``cu_seqlens`` into two int32 arrays per token: the start
  of its document and the end (next start). Documents are intervals, so query t may see key s iff
  ``doc_start[t] <= s <= t`` (equivalently ``s <= t < doc_end[s]``). A query tile loops over key tiles from
  the tile holding ``doc_start`` of its first token (tiles before it are skipped entirely) up to its last
  token. The key range splits into [masked | mask-free | masked]: the mask-free middle holds the key tiles
  that lie after the last row's document start and before the first row's position, and runs without
  any mask arithmetic. Tiles that span several documents, and documents shorter than a tile, fall into the
  masked parts. The dK/dV kernel does the mirror image over query tiles (from the key tile's own position to
  the end of its last key's document).
* **Backward.** Three launches, no atomics, deterministic:
  1. ``_attn_bwd_pre`` per (token tile, KV head): loops over the group's G heads; XSA backward in closed form
     (dy = dy' − ⟨dy', v̂⟩ v̂; the v-gradient through v̂: dv̂ = −Σ_h [c_h dy'_h + ⟨dy'_h, v̂⟩ y_h],
     dv_xsa = (dv̂ − ⟨dv̂, v̂⟩ v̂)/‖v‖, summed over the group's heads in registers) and delta = ⟨dy, y⟩.
  2. ``_attn_bwd_dkdv`` per (key tile, KV head): loops over query tiles whose rows cover all G heads of the
     group, recomputing Pᵀ from the saved log-sum-exp, so dK/dV of a KV head are summed over its query heads
     without races; adds dv_xsa at the end.
  3. ``_attn_bwd_dq`` per (query tile, KV head), like the forward.
* **Launch configs.** The kernels ``attention.fwd``, ``.pre``, ``.dkdv`` and ``.dq`` of :mod:`pgolf.kernels.launch`
  (keys: power-of-two bucket of T, D, G, dtype, XSA, documents).
* **Integration.** ``torch.library.custom_op`` ops ``pgolf::xsa_attention_fwd`` / ``pgolf::xsa_attention_bwd``
  with fake implementations and autograd, so ``torch.compile(fullgraph=True)`` traces the call as one node. When no
  gradient can flow (grad mode off, or no input requires grad: eval and TTT scoring) ``pgolf::xsa_attention_infer``
  runs the forward kernel with ``STATS=False``: it neither allocates nor writes the log-sum-exp and XSA coefficient.

Interpreter notes: bf16 ``tl.dot`` is wrong under the interpreter, so CPU tests use fp32/fp16 (fp32 dots
use ``input_precision="ieee"`` everywhere so fp32 results are true fp32).
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from pgolf.kernels import launcher, tuning

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)

# ----------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, tq, ds_row, start, end, qk_scale,
               T, D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_DOCS: tl.constexpr,
               PREC: tl.constexpr):
    offs_d = tl.arange(0, D)
    for n in range(start, end, BLOCK_N):
        s = n + tl.arange(0, BLOCK_N)
        s_ok = s < T
        s64 = s.to(tl.int64)
        kT = tl.load(k_base + s64[None, :] * stride_kt + offs_d[:, None], mask=s_ok[None, :], other=0.0)
        qk = tl.dot(q, kT, input_precision=PREC) * qk_scale
        if MASKED:
            allowed = s[None, :] <= tq[:, None]
            if HAS_DOCS:
                allowed = allowed & (s[None, :] >= ds_row[:, None])
            qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + s64[:, None] * stride_vt + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, XC, DS,
              sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h,
              T, Hq, Hkv, qk_scale,
              D: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_DOCS: tl.constexpr, XSA: tl.constexpr, PREC: tl.constexpr, STATS: tl.constexpr):
    TOK: tl.constexpr = BLOCK_M // G
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    kvh = (pid_bh % Hkv).to(tl.int64)
    t0 = pid_m * TOK
    r = tl.arange(0, BLOCK_M)
    tq = t0 + r // G
    hq = kvh * G + r % G
    row_ok = (r < TOK * G) & (tq < T)
    offs_d = tl.arange(0, D)
    tq64 = tq.to(tl.int64)
    q = tl.load(Q + b * sq_b + tq64[:, None] * sq_t + hq[:, None] * sq_h + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    t_last = tl.minimum(t0 + TOK, T) - 1
    if HAS_DOCS:
        ds_first = tl.load(DS + t0)
        ds_last = tl.load(DS + t_last)
        ds_row = tl.load(DS + tq, mask=row_ok, other=0)
    else:
        ds_first = 0
        ds_last = 0
        ds_row = tq
    lo = (ds_first // BLOCK_N) * BLOCK_N
    hi = t_last + 1
    mid_end = ((t0 + 1) // BLOCK_N) * BLOCK_N
    mid_start = tl.minimum(((ds_last + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, mid_end)
    k_base = K + b * sk_b + kvh * sk_h
    v_base = V + b * sv_b + kvh * sv_h

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sk_t, sv_t, tq, ds_row, lo, mid_start, qk_scale,
                               T, D, BLOCK_N, True, HAS_DOCS, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sk_t, sv_t, tq, ds_row, mid_start, mid_end,
                               qk_scale, T, D, BLOCK_N, False, HAS_DOCS, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sk_t, sv_t, tq, ds_row, mid_end, hi, qk_scale,
                               T, D, BLOCK_N, True, HAS_DOCS, PREC)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    row_off = (b * T + tq64) * Hq + hq
    if XSA:
        vs = tl.load(v_base + tq64[:, None] * sv_t + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(vs * vs, 1)), 1e-12)
        vhat = vs * inv[:, None]
        c = tl.sum(acc * vhat, 1)
        acc = acc - c[:, None] * vhat
        if STATS:
            tl.store(XC + row_off, c, mask=row_ok)
    if STATS:  # only the backward reads them: the forward-only variant skips both stores
        tl.store(LSE + row_off, m_i + tl.log2(l_safe), mask=row_ok)
    tl.store(O + b * so_b + tq64[:, None] * so_t + hq[:, None] * so_h + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attn_bwd_pre(O, DO, V, XC, DELTA, DOP, DVX,
                  so_b, so_t, so_h, sdo_b, sdo_t, sdo_h, sv_b, sv_t, sv_h,
                  T, Hq, Hkv,
                  D: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr, XSA: tl.constexpr):
    """delta = ⟨dy, y⟩ per row; with XSA also dy = projected dy' (into DOP, (B,T,Hq,D) contiguous) and the
    XSA part of dv (into DVX, fp32 (B,T,Hkv,D) contiguous)."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    kvh = (pid_bh % Hkv).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = t < T
    t64 = t.to(tl.int64)
    offs_d = tl.arange(0, D)
    if XSA:
        vs = tl.load(V + b * sv_b + t64[:, None] * sv_t + kvh * sv_h + offs_d[None, :], mask=ok[:, None],
                     other=0.0).to(tl.float32)
        nrm = tl.sqrt(tl.sum(vs * vs, 1))
        inv = 1.0 / tl.maximum(nrm, 1e-12)
        vhat = vs * inv[:, None]
        dvh = tl.zeros([BLOCK_T, D], tl.float32)
    for j in tl.static_range(G):
        h = kvh * G + j
        o = tl.load(O + b * so_b + t64[:, None] * so_t + h * so_h + offs_d[None, :], mask=ok[:, None],
                    other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdo_b + t64[:, None] * sdo_t + h * sdo_h + offs_d[None, :], mask=ok[:, None],
                     other=0.0).to(tl.float32)
        row_off = (b * T + t64) * Hq + h
        if XSA:
            c = tl.load(XC + row_off, mask=ok, other=0.0)
            p = tl.sum(do * vhat, 1)
            dop = do - p[:, None] * vhat
            y = o + c[:, None] * vhat
            tl.store(DELTA + row_off, tl.sum(dop * y, 1), mask=ok)
            dvh -= c[:, None] * do + p[:, None] * y
            tl.store(DOP + row_off[:, None] * D + offs_d[None, :], dop.to(DOP.dtype.element_ty), mask=ok[:, None])
        else:
            tl.store(DELTA + row_off, tl.sum(do * o, 1), mask=ok)
    if XSA:
        proj = tl.sum(dvh * vhat, 1)
        dvx = tl.where((nrm >= 1e-12)[:, None], dvh - proj[:, None] * vhat, dvh) * inv[:, None]
        tl.store(DVX + ((b * T + t64) * Hkv + kvh)[:, None] * D + offs_d[None, :], dvx, mask=ok[:, None])


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_t, sq_h, sdo_t, sdo_h, kvh, s, de_k,
                start, end, qk_scale, T, Hq,
                D: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                HAS_DOCS: tl.constexpr, PREC: tl.constexpr):
    TOK: tl.constexpr = BLOCK_M // G
    r = tl.arange(0, BLOCK_M)
    hq = kvh * G + r % G
    offs_d = tl.arange(0, D)
    for t0 in range(start, end, TOK):
        tq = t0 + r // G
        row_ok = (r < TOK * G) & (tq < T)
        tq64 = tq.to(tl.int64)
        q = tl.load(q_base + tq64[:, None] * sq_t + hq[:, None] * sq_h + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0)
        do = tl.load(do_base + tq64[:, None] * sdo_t + hq[:, None] * sdo_h + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        row_off = tq64 * Hq + hq
        lse = tl.load(lse_base + row_off, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + row_off, mask=row_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        pT = tl.exp2(qkT - lse[None, :])
        if MASKED:
            allowed = (tq[None, :] >= s[:, None]) & row_ok[None, :]
            if HAS_DOCS:
                allowed = allowed & (tq[None, :] < de_k[:, None])
            pT = tl.where(allowed, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DVX, DK, DV, DE,
                   sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
                   sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
                   T, Hq, Hkv, qk_scale, sm_scale,
                   D: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_DOCS: tl.constexpr, XSA: tl.constexpr, PREC: tl.constexpr):
    TOK: tl.constexpr = BLOCK_M // G
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    kvh = (pid_bh % Hkv).to(tl.int64)
    n0 = pid_n * BLOCK_N
    s = n0 + tl.arange(0, BLOCK_N)
    s_ok = s < T
    s64 = s.to(tl.int64)
    offs_d = tl.arange(0, D)
    k = tl.load(K + b * sk_b + s64[:, None] * sk_t + kvh * sk_h + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    v = tl.load(V + b * sv_b + s64[:, None] * sv_t + kvh * sv_h + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    s_last = tl.minimum(n0 + BLOCK_N, T) - 1
    if HAS_DOCS:
        de_first = tl.load(DE + n0)
        de_last = tl.load(DE + s_last)
        de_k = tl.load(DE + s, mask=s_ok, other=0)
    else:
        de_first = T
        de_last = T
        de_k = s
    q_lo = (n0 // TOK) * TOK
    mid_end = (de_first // TOK) * TOK
    mid_start = tl.minimum(((s_last + TOK - 1) // TOK) * TOK, mid_end)

    q_base = Q + b * sq_b
    do_base = DO + b * sdo_b
    lse_base = LSE + b * T * Hq
    delta_base = DELTA + b * T * Hq
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_t, sq_h, sdo_t, sdo_h, kvh, s,
                         de_k, q_lo, mid_start, qk_scale, T, Hq, D, G, BLOCK_M, True, HAS_DOCS, PREC)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_t, sq_h, sdo_t, sdo_h, kvh, s,
                         de_k, mid_start, mid_end, qk_scale, T, Hq, D, G, BLOCK_M, False, HAS_DOCS, PREC)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_t, sq_h, sdo_t, sdo_h, kvh, s,
                         de_k, mid_end, de_last, qk_scale, T, Hq, D, G, BLOCK_M, True, HAS_DOCS, PREC)
    dk = dk * sm_scale
    if XSA:
        dv += tl.load(DVX + ((b * T + s64) * Hkv + kvh)[:, None] * D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    tl.store(DK + b * sdk_b + s64[:, None] * sdk_t + kvh * sdk_h + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=s_ok[:, None])
    tl.store(DV + b * sdv_b + s64[:, None] * sdv_t + kvh * sdv_h + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=s_ok[:, None])


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, tq, ds_row, start, end, qk_scale, T,
              D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_DOCS: tl.constexpr,
              PREC: tl.constexpr):
    offs_d = tl.arange(0, D)
    for n in range(start, end, BLOCK_N):
        s = n + tl.arange(0, BLOCK_N)
        s_ok = s < T
        s64 = s.to(tl.int64)
        kT = tl.load(k_base + s64[None, :] * stride_kt + offs_d[:, None], mask=s_ok[None, :], other=0.0)
        vT = tl.load(v_base + s64[None, :] * stride_vt + offs_d[:, None], mask=s_ok[None, :], other=0.0)
        qk = tl.dot(q, kT, input_precision=PREC) * qk_scale
        p = tl.exp2(qk - lse[:, None])
        if MASKED:
            allowed = s[None, :] <= tq[:, None]
            if HAS_DOCS:
                allowed = allowed & (s[None, :] >= ds_row[:, None])
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, DS,
                 sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h, sdq_b, sdq_t, sdq_h,
                 T, Hq, Hkv, qk_scale, sm_scale,
                 D: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_DOCS: tl.constexpr, PREC: tl.constexpr):
    TOK: tl.constexpr = BLOCK_M // G
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    kvh = (pid_bh % Hkv).to(tl.int64)
    t0 = pid_m * TOK
    r = tl.arange(0, BLOCK_M)
    tq = t0 + r // G
    hq = kvh * G + r % G
    row_ok = (r < TOK * G) & (tq < T)
    offs_d = tl.arange(0, D)
    tq64 = tq.to(tl.int64)
    q = tl.load(Q + b * sq_b + tq64[:, None] * sq_t + hq[:, None] * sq_h + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdo_b + tq64[:, None] * sdo_t + hq[:, None] * sdo_h + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    row_off = (b * T + tq64) * Hq + hq
    lse = tl.load(LSE + row_off, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_off, mask=row_ok, other=0.0)
    t_last = tl.minimum(t0 + TOK, T) - 1
    if HAS_DOCS:
        ds_first = tl.load(DS + t0)
        ds_last = tl.load(DS + t_last)
        ds_row = tl.load(DS + tq, mask=row_ok, other=0)
    else:
        ds_first = 0
        ds_last = 0
        ds_row = tq
    lo = (ds_first // BLOCK_N) * BLOCK_N
    hi = t_last + 1
    mid_end = ((t0 + 1) // BLOCK_N) * BLOCK_N
    mid_start = tl.minimum(((ds_last + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, mid_end)
    k_base = K + b * sk_b + kvh * sk_h
    v_base = V + b * sv_b + kvh * sv_h
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, sk_t, sv_t, tq, ds_row, lo, mid_start, qk_scale, T,
                   D, BLOCK_N, True, HAS_DOCS, PREC)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, sk_t, sv_t, tq, ds_row, mid_start, mid_end, qk_scale, T,
                   D, BLOCK_N, False, HAS_DOCS, PREC)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, sk_t, sv_t, tq, ds_row, mid_end, hi, qk_scale, T,
                   D, BLOCK_N, True, HAS_DOCS, PREC)
    dq = dq * sm_scale
    tl.store(DQ + b * sdq_b + tq64[:, None] * sdq_t + hq[:, None] * sdq_h + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------------------
# launch configurations

# Launch configs (pgolf.kernels.launcher), keys: T bucketed to a power of two, head dim, GQA group, dtype, XSA,
# documents. A config is (BLOCK_M rows = tokens·G, BLOCK_N keys, num_warps, num_stages); "pre" tiles BLOCK_T
# tokens. The first of each list is the default; fp32 (ieee dots on CUDA cores) needs smaller tiles per warp to
# stay within 255 registers.
def _configs(tiles: list[tuple[int, int, int, int]]) -> list[dict]:
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in tiles]


_HALF_CONFIGS = {
    "fwd": _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                     (64, 128, 4, 3)]),
    "dkdv": _configs([(64, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 3)]),
    "dq": _configs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]),
    "pre": [dict(BLOCK_T=64, num_warps=4, num_stages=1)],
}
_FP32_CONFIGS = {
    "fwd": _configs([(64, 32, 8, 2), (32, 32, 4, 2)]),
    "dkdv": _configs([(32, 32, 8, 2), (16, 32, 4, 2)]),
    "dq": _configs([(64, 32, 8, 2), (32, 32, 4, 2)]),
    "pre": [dict(BLOCK_T=32, num_warps=4, num_stages=1)],
}
# Under the interpreter: small tiles, so tests of a few dozen tokens cross several.
_INTERPRET = {"fwd": dict(BLOCK_M=32, BLOCK_N=16), "dkdv": dict(BLOCK_M=32, BLOCK_N=16),
              "dq": dict(BLOCK_M=32, BLOCK_N=16), "pre": dict(BLOCK_T=32)}


def _declare(name: str, fn) -> launcher.Kernel:
    return launcher.Kernel("attention", name, fn, launcher.by_dtype(_HALF_CONFIGS[name], _FP32_CONFIGS[name]),
                           _INTERPRET[name])


FWD = _declare("fwd", _attn_fwd)
BWD_PRE = _declare("pre", _attn_bwd_pre)
BWD_DKDV = _declare("dkdv", _attn_bwd_dkdv)
BWD_DQ = _declare("dq", _attn_bwd_dq)


# ----------------------------------------------------------------------------------------------------------------
# host side


def _config_key(T: int, D: int, G: int, dtype: torch.dtype, xsa: bool, docs: bool) -> dict:
    return dict(t=tuning.pow2_bucket(T), d=D, g=G, dtype=launcher.dtype_name(dtype), xsa=int(xsa), docs=int(docs))


def doc_bounds(cu_seqlens: Tensor, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per token: (start of its document, end of its document), int32 (T,), from padded cu_seqlens.

    Computed with searchsorted (no host sync). Each token is kept inside [start, end) ∋ t even for malformed
    cu_seqlens, so every query sees at least itself.
    """
    cu = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
    pos = torch.arange(T, device=device, dtype=torch.int32)
    idx = torch.searchsorted(cu, pos, right=True)
    start = cu[(idx - 1).clamp(min=0)]
    end = cu[idx.clamp(max=cu.numel() - 1)]
    return torch.minimum(start, pos).contiguous(), torch.maximum(end, pos + 1).contiguous()


def _check(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor]) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B,T,Hq,D) and k, v (B,T,Hkv,D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, T, Hq, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D or Hq % k.shape[2]:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k/v {tuple(k.shape)} (need Hq % Hkv == 0)")
    if Hq // k.shape[2] > 16:
        raise ValueError(f"GQA ratio {Hq // k.shape[2]} > 16 is not supported (query tiles pack the group's heads)")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported by the Triton attention (use one of {SUPPORTED_HEAD_DIMS})")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {q.dtype}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"packed attention (cu_seqlens given) needs batch size 1, got q of shape {tuple(q.shape)}")


def _last_contig(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], xsa: bool,
             stats: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(y, lse, xsa coefficient); with ``stats=False`` (forward only) lse and the coefficient are empty and the kernel
    does not write them."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    out = launcher.new_output((B, T, Hq, D), q.dtype, q.device)
    lse = launcher.new_output((B, T, Hq) if stats else (0,), torch.float32, q.device)
    xc = launcher.new_output((B, T, Hq) if xsa and stats else (0,), torch.float32, q.device)
    if T == 0 or B == 0:
        return out, lse, xc
    has_docs = cu_seqlens is not None
    ds = doc_bounds(cu_seqlens, T, q.device)[0] if has_docs else out
    sm_scale = 1.0 / math.sqrt(D)
    args = (q, k, v, out, lse if stats else out, xc if stats and xsa else out, ds, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            T, Hq, Hkv, sm_scale * LOG2E)
    meta = dict(D=D, G=G, HAS_DOCS=has_docs, XSA=xsa, PREC=_prec(q.dtype), STATS=stats)
    FWD.run(lambda c: (triton.cdiv(T, c["BLOCK_M"] // G), B * Hkv), args, meta,
            key=_config_key(T, D, G, q.dtype, xsa, has_docs), device=q.device)
    return out, lse, xc


def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, xc: Tensor,
              cu_seqlens: Optional[Tensor], xsa: bool) -> tuple[Tensor, Tensor, Tensor]:
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    q, k, v, out = _last_contig(q), _last_contig(k), _last_contig(v), _last_contig(out)
    dout = _last_contig(dout.to(q.dtype))
    dev = q.device
    dq = launcher.new_output((B, T, Hq, D), q.dtype, dev)
    dk = launcher.new_output((B, T, Hkv, D), k.dtype, dev)
    dv = launcher.new_output((B, T, Hkv, D), v.dtype, dev)
    if T == 0 or B == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    has_docs = cu_seqlens is not None
    ds, de = doc_bounds(cu_seqlens, T, dev) if has_docs else (lse, lse)
    delta = launcher.new_output((B, T, Hq), torch.float32, dev)
    if xsa:
        dop = launcher.new_output((B, T, Hq, D), q.dtype, dev)
        dvx = launcher.new_output((B, T, Hkv, D), torch.float32, dev)
    else:
        dop, dvx = dout, delta
    key = _config_key(T, D, G, q.dtype, xsa, has_docs)
    BWD_PRE.run(lambda c: (triton.cdiv(T, c["BLOCK_T"]), B * Hkv),
                (out, dout, v, xc, delta, dop, dvx, *out.stride()[:3], *dout.stride()[:3], *v.stride()[:3], T, Hq, Hkv),
                dict(D=D, G=G, XSA=xsa), key=key, device=dev)
    sm_scale = 1.0 / math.sqrt(D)
    prec = _prec(q.dtype)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dop.stride()[:3])
    BWD_DKDV.run(lambda c: (triton.cdiv(T, c["BLOCK_N"]), B * Hkv),
                 (q, k, v, dop, lse, delta, dvx, dk, dv, de, *common, *dk.stride()[:3], *dv.stride()[:3],
                  T, Hq, Hkv, sm_scale * LOG2E, sm_scale),
                 dict(D=D, G=G, HAS_DOCS=has_docs, XSA=xsa, PREC=prec), key=key, device=dev)
    BWD_DQ.run(lambda c: (triton.cdiv(T, c["BLOCK_M"] // G), B * Hkv),
               (q, k, v, dop, lse, delta, dq, ds, *common, *dq.stride()[:3], T, Hq, Hkv, sm_scale * LOG2E, sm_scale),
               dict(D=D, G=G, HAS_DOCS=has_docs, PREC=prec), key=key, device=dev)
    return dq, dk, dv


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------------------------
# custom ops (torch.compile sees one opaque node per direction)


@torch.library.custom_op("pgolf::xsa_attention_fwd", mutates_args=())
def xsa_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], xsa: bool
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """(y, lse (B,T,Hq) fp32 base-2, xsa coefficient (B,T,Hq) fp32 or empty)."""
    return _forward(q, k, v, cu_seqlens, xsa)


@xsa_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, xsa):
    B, T, Hq, D = q.shape
    return (q.new_empty((B, T, Hq, D)), q.new_empty((B, T, Hq), dtype=torch.float32),
            q.new_empty((B, T, Hq) if xsa else (0,), dtype=torch.float32))


@torch.library.custom_op("pgolf::xsa_attention_bwd", mutates_args=())
def xsa_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, xc: Tensor,
                      cu_seqlens: Optional[Tensor], xsa: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of :func:`xsa_attention_fwd`'s first output."""
    return _backward(dout, q, k, v, out, lse, xc, cu_seqlens, xsa)


@xsa_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, xc, cu_seqlens, xsa):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("pgolf::xsa_attention_infer", mutates_args=())
def xsa_attention_infer(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], xsa: bool) -> Tensor:
    """Forward only (no autograd): y alone; the kernel skips the log-sum-exp and XSA stores the backward needs."""
    return _forward(q, k, v, cu_seqlens, xsa, stats=False)[0]


@xsa_attention_infer.register_fake
def _(q, k, v, cu_seqlens, xsa):
    return q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, xsa = inputs
    out, lse, xc = output
    ctx.xsa = xsa
    ctx.mark_non_differentiable(lse, xc)
    ctx.save_for_backward(q, k, v, out, lse, xc, cu_seqlens)


def _autograd_backward(ctx, dout, dlse, dxc):
    q, k, v, out, lse, xc, cu_seqlens = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.pgolf.xsa_attention_bwd(dout, q, k, v, out, lse, xc, cu_seqlens, ctx.xsa)
    return dq, dk, dv, None, None


xsa_attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, *, xsa: bool = False, cu_seqlens: Optional[Tensor] = None,
              max_seqlen: Optional[int] = None) -> Tensor:
    """Triton implementation of :func:`pgolf.kernels.reference.attention` (same signature and semantics).

    ``max_seqlen`` is accepted for interface parity and not needed: document bounds come from cu_seqlens.
    Under autocast q, k, v are cast to the autocast dtype (as SDPA is on the reference path); otherwise k and v
    are cast to q's dtype if they differ.
    """
    _check(q, k, v, cu_seqlens)
    if torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    if v.dtype != q.dtype:
        v = v.to(q.dtype)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return torch.ops.pgolf.xsa_attention_fwd(q, k, v, cu_seqlens, bool(xsa))[0]
    return torch.ops.pgolf.xsa_attention_infer(q, k, v, cu_seqlens, bool(xsa))


def _register() -> None:
    from pgolf import kernels

    kernels.register("attention", "triton", attention)


_register()

