"""Fused softcapped cross-entropy, and the tied LM head fused with it.

``softcap_ce(z, y, cap)``: per-token ``CE(cap·tanh(z/cap), y)`` with fp32 math inside, z in fp32/fp16/bf16,
fp32 losses out.
- Forward kernel: each program streams BLOCK_R rows (1 on GPU by default) in BLOCK_V chunks: softcap, online
  log-sum-exp (the running max starts at −cap, the softcap's lower bound) and the target logit; writes ``loss`` (N,)
  and the row stats (N, 2) = (m, log Σ exp(s − m)): lse = m + log Σ kept in two parts, more accurate than a
  rounded lse (its rounding at the scale of cap would show in the loss and in exp(s − lse)).
- Backward kernel: recomputes the softcap per chunk and writes
  ``dz = g · (exp(s − lse) − 1[col = y]) · (1 − tanh²(z/cap))`` in z's dtype.
- Saved for backward: z (the input) and the stats (8 bytes per row); never an fp32 or softcapped copy of z.
- tanh: there is no tl.tanh on every Triton version, so it is built from exp: ``tanh(a) = (1−e)/(1+e)``,
  ``e = exp(−2|a|)``, with an odd Taylor polynomial below |a| = 0.3 (no cancellation), and
  ``1 − tanh² = 4e/(1+e)²`` (no cancellation near saturation).
- Targets < 0 (e.g. F.cross_entropy's ignore_index −100) or ≥ V give loss 0 and zero gradient.

``lm_head_loss(h, E, y, cap)``: ``softcap_ce(h Eᵀ, y, cap)`` with the N×V logits never in memory at once
(``PGOLF_CE_FUSED_HEAD=1``, the default). Rows are processed in chunks of ``chunk_rows(V)`` rows
(``CHUNK_ELEMS`` = 2²⁶ logits per chunk by default, e.g. 8192 rows at V = 8192; env ``PGOLF_CE_CHUNK_ELEMS``):
- forward, per chunk: ``z_c = h_c Eᵀ`` (cuBLAS, into one reused buffer) → CE forward kernel (loss, stats);
- backward, per chunk: recompute ``z_c`` → CE backward kernel *in place* (z_c becomes dz_c) →
  ``dh_c = dz_c E`` and ``dE += dz_cᵀ h_c`` (fp32 accumulator);
- saved for backward: h, E, y and the (N, 2) fp32 stats only. Cost: one extra N×V×d GEMM (the recompute) for
  ~N×V fewer bytes of activation memory (at N = 98,304, V = 8192: the 1.6 GB bf16 logits plus their gradient).
With ``PGOLF_CE_FUSED_HEAD=0`` it is ``F.linear`` followed by the softcap_ce kernel (z kept for backward).

Launch configs (BLOCK_R, BLOCK_V, warps): the kernels ``softcap_ce.fwd`` and ``softcap_ce.bwd`` of
:mod:`pgolf.kernels.launch` (keys: vocabulary size, dtype).

Both are ``torch.library.custom_op``s (``pgolf::softcap_ce_fwd/_bwd``, ``pgolf::lm_head_loss_fwd/_bwd``) with
fake implementations, wrapped in autograd.Functions, so they trace under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from pgolf import kernels
from pgolf.kernels import launcher, reference

# kernel helpers shared with the MLP (``from pgolf.kernels import mlp`` gives the dispatch function)
_m = importlib.import_module("pgolf.kernels.mlp")
round_for_bf16, rne_bf16 = _m.round_for_bf16, _m.rne_bf16
SUPPORTED_DTYPES = _m.SUPPORTED_DTYPES
new_output = launcher.new_output

FUSED_HEAD = launcher.env_flag("PGOLF_CE_FUSED_HEAD", True)
CHUNK_ELEMS = int(os.environ.get("PGOLF_CE_CHUNK_ELEMS", str(1 << 26)))


def chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per fused-head chunk: at most CHUNK_ELEMS logits (at least one row)."""
    return max(1, min(n_rows, CHUNK_ELEMS // max(1, vocab)))


# ---------------------------------------------------------------------------------------------------------
# Kernels

@triton.jit
def _softcap_fwd(z, cap, inv_cap):
    """(s, ds/dz) for s = cap·tanh(z/cap), fp32."""
    u = z * inv_cap
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    q = 1.0 / (1.0 + e)
    a2 = a * a
    # tanh(a) = a − a³/3 + 2a⁵/15 − 17a⁷/315 + 62a⁹/2835 (truncation < 1e-8 relative for a < 0.3)
    t_small = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * (
        -0.05396825396825397 + a2 * 0.021869488536155203))))
    t = tl.where(a < 0.3, t_small, (1.0 - e) * q)
    s = cap * tl.where(u < 0.0, -t, t)
    return s, 4.0 * e * q * q


@triton.jit
def _ce_fwd_kernel(z_ptr, t_ptr, loss_ptr, stats_ptr, N, V, stride_zm, cap, inv_cap,
                   BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < N
    z_rows = z_ptr + rows * stride_zm
    cols = tl.arange(0, BLOCK_V)
    m = tl.zeros((BLOCK_R,), dtype=tl.float32) - cap  # running max; every softcapped logit is ≥ −cap
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)  # running Σ exp(s − m)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        ok = r_ok[:, None] & (c < V)[None, :]
        z = tl.load(z_rows[:, None] + c[None, :], mask=ok, other=0.0).to(tl.float32)
        s, _ = _softcap_fwd(z, cap, inv_cap)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
    # lse = m + log(acc), kept as its two parts: (m − s) is exact-ish and log(acc) ≤ log V is small, so neither
    # the loss nor the backward's exp(s − lse) pays the rounding of lse at the scale of cap.
    lsum = tl.log(tl.where(r_ok, acc, 1.0))  # padded rows: acc = 0
    tgt = tl.load(t_ptr + rows, mask=r_ok, other=-1).to(tl.int64)
    valid = (tgt >= 0) & (tgt < V)
    zt = tl.load(z_rows + tl.where(valid, tgt, 0), mask=r_ok, other=0.0).to(tl.float32)
    st, _ = _softcap_fwd(zt, cap, inv_cap)
    tl.store(stats_ptr + rows * 2, m, mask=r_ok)
    tl.store(stats_ptr + rows * 2 + 1, lsum, mask=r_ok)
    tl.store(loss_ptr + rows, tl.where(valid, (m - st) + lsum, 0.0), mask=r_ok)


@triton.jit
def _ce_bwd_kernel(z_ptr, t_ptr, stats_ptr, g_ptr, dz_ptr, N, V, stride_zm, stride_dm, stride_g, cap, inv_cap,
                   BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, RNE_BF16: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < N
    z_rows = z_ptr + rows * stride_zm
    dz_rows = dz_ptr + rows * stride_dm
    cols = tl.arange(0, BLOCK_V)
    tgt = tl.load(t_ptr + rows, mask=r_ok, other=-1).to(tl.int64)
    valid = (tgt >= 0) & (tgt < V)
    g = tl.where(valid, tl.load(g_ptr + rows * stride_g, mask=r_ok, other=0.0).to(tl.float32), 0.0)
    m = tl.load(stats_ptr + rows * 2, mask=r_ok, other=0.0)
    lsum = tl.load(stats_ptr + rows * 2 + 1, mask=r_ok, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        ok = r_ok[:, None] & (c < V)[None, :]
        z = tl.load(z_rows[:, None] + c[None, :], mask=ok, other=0.0).to(tl.float32)
        s, dsdz = _softcap_fwd(z, cap, inv_cap)
        p = tl.exp((s - m[:, None]) - lsum[:, None])
        dz = g[:, None] * (p - tl.where(c[None, :] == tgt[:, None], 1.0, 0.0)) * dsdz
        tl.store(dz_rows[:, None] + c[None, :], round_for_bf16(dz, RNE_BF16).to(dz_ptr.dtype.element_ty), mask=ok)


# Launch configs (pgolf.kernels.launch), keys: vocabulary size and dtype.
_CANDIDATES = [dict(BLOCK_R=r, BLOCK_V=b, num_warps=w, num_stages=3)
               for r, b, w in ((1, 1024, 4), (1, 2048, 4), (1, 2048, 8), (1, 4096, 8), (1, 4096, 16), (2, 2048, 8),
                               (4, 1024, 8))]
# Interpreter: 16 rows x 32 columns per step (few programs: the interpreter's cost is per op, not per element),
# so small test vocabularies (97, 129) still take several masked chunks per row.
_INTERPRET = dict(BLOCK_R=16, BLOCK_V=32, num_warps=4, num_stages=1)


def _default(key: dict) -> dict:
    b = min(4096, triton.next_power_of_2(key["v"]))
    return dict(BLOCK_R=1, BLOCK_V=b, num_warps=8 if b >= 2048 else 4, num_stages=3)


CE_FWD = launcher.Kernel("softcap_ce", "fwd", _ce_fwd_kernel, _CANDIDATES, _INTERPRET, _default)
CE_BWD = launcher.Kernel("softcap_ce", "bwd", _ce_bwd_kernel, _CANDIDATES, _INTERPRET, _default)


def _check(z: Tensor, targets: Tensor) -> None:
    launcher.require_device(z, "CE kernels")
    if z.ndim != 2 or targets.shape != z.shape[:1]:
        raise ValueError(f"softcap_ce expects z (N, V) and targets (N,), got {tuple(z.shape)} and "
                         f"{tuple(targets.shape)}")
    if z.stride(1) != 1:
        raise ValueError("softcap_ce needs z with a unit stride along the vocabulary")


def ce_forward_into(z: Tensor, targets: Tensor, cap: float, loss: Tensor, stats: Tensor) -> None:
    """Run the forward kernel on z (N, V) (rows may be strided), writing loss (N,) and stats (N, 2)."""
    N, V = z.shape
    if N == 0:
        return
    args = (z, targets, loss, stats, N, V, z.stride(0), float(cap), 1.0 / float(cap))
    CE_FWD.run(lambda c: (triton.cdiv(N, c["BLOCK_R"]),), args, key=dict(v=V, dtype=launcher.dtype_name(z.dtype)),
               device=z.device)


def ce_backward_into(z: Tensor, targets: Tensor, stats: Tensor, g: Tensor, cap: float, dz: Tensor) -> None:
    """Run the backward kernel: dz (N, V) from z, the row stats and the per-row upstream gradient g (N,).
    dz may alias z (then it is overwritten in place)."""
    N, V = z.shape
    if N == 0:
        return
    def args(out: Tensor) -> tuple:
        return (z, targets, stats, g, out, N, V, z.stride(0), out.stride(0), g.stride(0), float(cap), 1.0 / float(cap))

    # tuning times launches into a scratch buffer: dz may alias z, and a second launch would read dz as z
    CE_BWD.run(lambda c: (triton.cdiv(N, c["BLOCK_R"]),), args(dz), dict(RNE_BF16=rne_bf16(dz.dtype)),
               key=dict(v=V, dtype=launcher.dtype_name(z.dtype)), device=z.device,
               bench_args=lambda: args(torch.empty_like(z)))


def softcap_ce_forward(z: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """z (N, V), targets (N,) → (loss (N,) fp32, stats (N, 2) fp32: row max m and log Σ exp(s − m))."""
    _check(z, targets)
    N = z.shape[0]
    loss = new_output((N,), torch.float32, z.device)
    stats = new_output((N, 2), torch.float32, z.device)
    ce_forward_into(z, targets, cap, loss, stats)
    return loss, stats


def softcap_ce_backward(z: Tensor, targets: Tensor, stats: Tensor, g: Tensor, cap: float) -> Tensor:
    """dz (N, V) in z's dtype for the upstream per-row gradient g (N,)."""
    _check(z, targets)
    dz = new_output(z.shape, z.dtype, z.device)
    ce_backward_into(z, targets, stats, g, cap, dz)
    return dz


# ---------------------------------------------------------------------------------------------------------
# Fused head: chunked over rows; the logits of one chunk live in one reused buffer.

_MM_F32_OUT: bool | None = None  # whether torch.mm(..., out_dtype=torch.float32) works (CUDA, torch ≥ 2.8)


def _accumulate_weight_grad(dW: Tensor, dz: Tensor, h: Tensor) -> None:
    """dW (V, d) fp32 += dzᵀ h with fp32 accumulation across chunks.

    fp32: addmm_. CUDA half types: a GEMM with fp32 output (``torch.mm(..., out_dtype=torch.float32)``), or, where
    that overload is missing, the half-precision product added in fp32. Elsewhere (CPU tests): an fp32 GEMM.
    """
    global _MM_F32_OUT
    if dz.dtype == torch.float32:
        dW.addmm_(dz.t(), h)
        return
    if not dz.is_cuda:
        dW.addmm_(dz.t().float(), h.float())
        return
    if _MM_F32_OUT is not False:
        try:
            dW.add_(torch.mm(dz.t(), h, out_dtype=torch.float32))
            _MM_F32_OUT = True
            return
        except (TypeError, RuntimeError):
            _MM_F32_OUT = False
    dW.add_(torch.mm(dz.t(), h))


def lm_head_loss_forward(h: Tensor, weight: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """h (N, d), weight (V, d), targets (N,) → (loss (N,), stats (N, 2)) fp32; logits made chunk by chunk."""
    N = h.shape[0]
    V = weight.shape[0]
    w = weight.to(h.dtype)
    loss = new_output((N,), torch.float32, h.device)
    stats = new_output((N, 2), torch.float32, h.device)
    if N == 0:
        return loss, stats
    C = chunk_rows(N, V)
    buf = torch.empty((C, V), dtype=h.dtype, device=h.device)
    for r0 in range(0, N, C):
        r1 = min(N, r0 + C)
        z = buf[: r1 - r0]
        torch.mm(h[r0:r1], w.t(), out=z)
        _check(z, targets[r0:r1])
        ce_forward_into(z, targets[r0:r1], cap, loss[r0:r1], stats[r0:r1])
    return loss, stats


def lm_head_loss_backward(h: Tensor, weight: Tensor, targets: Tensor, stats: Tensor, g: Tensor,
                          cap: float) -> tuple[Tensor, Tensor]:
    """(dh (N, d) in h's dtype, dweight (V, d) in weight's dtype), recomputing each chunk's logits."""
    N, d = h.shape
    V = weight.shape[0]
    w = weight.to(h.dtype)
    dh = new_output((N, d), h.dtype, h.device)
    dW = torch.zeros((V, d), dtype=torch.float32, device=h.device)
    if N:
        C = chunk_rows(N, V)
        buf = torch.empty((C, V), dtype=h.dtype, device=h.device)
        for r0 in range(0, N, C):
            r1 = min(N, r0 + C)
            z = buf[: r1 - r0]
            torch.mm(h[r0:r1], w.t(), out=z)
            ce_backward_into(z, targets[r0:r1], stats[r0:r1], g[r0:r1], cap, z)  # z becomes dz
            torch.mm(z, w, out=dh[r0:r1])
            _accumulate_weight_grad(dW, z, h[r0:r1])
    return dh, dW.to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------
# Custom ops + autograd

@torch.library.custom_op("pgolf::softcap_ce_fwd", mutates_args=())
def _softcap_ce_fwd_op(z: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    return softcap_ce_forward(z, targets, cap)


@_softcap_ce_fwd_op.register_fake
def _(z: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    N = z.shape[0]
    return z.new_empty((N,), dtype=torch.float32), z.new_empty((N, 2), dtype=torch.float32)


@torch.library.custom_op("pgolf::softcap_ce_bwd", mutates_args=())
def _softcap_ce_bwd_op(z: Tensor, targets: Tensor, stats: Tensor, g: Tensor, cap: float) -> Tensor:
    return softcap_ce_backward(z, targets, stats, g, cap)


@_softcap_ce_bwd_op.register_fake
def _(z: Tensor, targets: Tensor, stats: Tensor, g: Tensor, cap: float) -> Tensor:
    return torch.empty_like(z)


@torch.library.custom_op("pgolf::lm_head_loss_fwd", mutates_args=())
def _lm_head_loss_fwd_op(h: Tensor, weight: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    return lm_head_loss_forward(h, weight, targets, cap)


@_lm_head_loss_fwd_op.register_fake
def _(h: Tensor, weight: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    N = h.shape[0]
    return h.new_empty((N,), dtype=torch.float32), h.new_empty((N, 2), dtype=torch.float32)


@torch.library.custom_op("pgolf::lm_head_loss_bwd", mutates_args=())
def _lm_head_loss_bwd_op(h: Tensor, weight: Tensor, targets: Tensor, stats: Tensor, g: Tensor,
                         cap: float) -> tuple[Tensor, Tensor]:
    return lm_head_loss_backward(h, weight, targets, stats, g, cap)


@_lm_head_loss_bwd_op.register_fake
def _(h: Tensor, weight: Tensor, targets: Tensor, stats: Tensor, g: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(h), torch.empty_like(weight)


class SoftcapCEFunction(torch.autograd.Function):
    """Per-row softcapped CE; saves z, targets and stats."""

    @staticmethod
    def forward(ctx, z: Tensor, targets: Tensor, cap: float) -> Tensor:
        loss, stats = torch.ops.pgolf.softcap_ce_fwd(z, targets, cap)
        ctx.save_for_backward(z, targets, stats)
        ctx.cap = cap
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):
        z, targets, stats = ctx.saved_tensors
        dz = torch.ops.pgolf.softcap_ce_bwd(z, targets, stats, g.contiguous(), ctx.cap) \
            if ctx.needs_input_grad[0] else None
        return dz, None, None


class LMHeadLossFunction(torch.autograd.Function):
    """Tied head + softcapped CE, chunked over rows; saves h, weight, targets and stats."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, cap: float) -> Tensor:
        loss, stats = torch.ops.pgolf.lm_head_loss_fwd(h, weight, targets, cap)
        ctx.save_for_backward(h, weight, targets, stats)
        ctx.cap = cap
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):
        h, weight, targets, stats = ctx.saved_tensors
        dh, dW = torch.ops.pgolf.lm_head_loss_bwd(h, weight, targets, stats, g.contiguous(), ctx.cap)
        return (dh if ctx.needs_input_grad[0] else None), (dW if ctx.needs_input_grad[1] else None), None, None


def _compute_dtype(t: Tensor) -> Tensor:
    if torch.is_autocast_enabled(t.device.type) and t.dtype in SUPPORTED_DTYPES:
        return t.to(torch.get_autocast_dtype(t.device.type))
    return t


def softcap_ce(z: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Triton implementation of :func:`pgolf.kernels.reference.softcap_ce`: (N, V), (N,) → (N,) fp32."""
    if z.dtype not in SUPPORTED_DTYPES:
        return reference.softcap_ce(z, targets, cap)
    if z.stride(-1) != 1:
        z = z.contiguous()
    return SoftcapCEFunction.apply(z, targets.contiguous(), float(cap))


def lm_head_loss(h: Tensor, weight: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Triton implementation of :func:`pgolf.kernels.reference.lm_head_loss`: (N, d), (V, d), (N,) → (N,) fp32.

    Fused head (chunked, logits never all in memory) unless ``FUSED_HEAD`` is off (``PGOLF_CE_FUSED_HEAD=0``).
    """
    h = _compute_dtype(h)
    if h.dtype not in SUPPORTED_DTYPES:
        return reference.lm_head_loss(h, weight, targets, cap)
    if not FUSED_HEAD:
        return softcap_ce(F.linear(h, weight.to(h.dtype)), targets, cap)
    return LMHeadLossFunction.apply(h.contiguous(), weight, targets.contiguous(), float(cap))


kernels.register("softcap_ce", "triton", softcap_ce)
kernels.register("lm_head_loss", "triton", lm_head_loss)
