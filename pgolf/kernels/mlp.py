"""Fused LeakyReLU(s)² MLP: ``y = φ(x W1ᵀ) W2ᵀ`` with ``φ(p) = LeakyReLU_s(p)²`` (s ≤ 0 gives ReLU²).

Forward
    One Triton GEMM computes ``pre = x W1ᵀ`` tile by tile; its epilogue applies φ in fp32 and writes only
    ``post = φ(pre)`` (compute dtype) and a 1-bit sign mask ``pre > 0`` packed 8 columns per byte
    (uint8, (M, ceil(H/8))). ``pre`` itself is never written. The down-projection ``y = post W2ᵀ`` is cuBLAS.

Backward
    ``φ'(p) = 2p`` for p > 0 and ``2s²p`` for p ≤ 0. With ``|LeakyReLU_s(p)| = sqrt(post)`` it is rebuilt from the
    saved tensors as ``φ'(p) = 2·sqrt(post)`` (bit set) or ``−2s·sqrt(post)`` (bit clear), so no ``pre`` is needed.
    sqrt halves the relative rounding error of the stored ``post`` (bf16: 2⁻¹⁰ relative on |leaky(p)|), which
    is more accurate than keeping ``pre`` in bf16 (2⁻⁹).
    - ``dW2 = dyᵀ post`` (cuBLAS),
    - ``dpre = (dy W2) ⊙ φ'(pre)``: a second Triton GEMM with that product in its epilogue (reads post + mask),
    - ``dW1 = dpreᵀ x`` and ``dx = dpre W1`` (cuBLAS).

Saved for backward: x, W1, W2 (inputs, alive anyway) plus ``post`` (M×H compute dtype) and the mask
(M×ceil(H/8) bytes): one M×H buffer + 1/16 of one in bf16, against the records' two (pre and post).

torch.compile: both launches are ``torch.library.custom_op`` (``pgolf::mlp_up_fwd``, ``pgolf::mlp_up_bwd``)
with fake implementations; the autograd.Function around them traces under ``fullgraph=True``.

Launch configs: the kernels ``mlp.up_fwd`` and ``mlp.up_bwd`` of :mod:`pgolf.kernels.launch` (keys: M bucketed to
a power of two, N, K, dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pgolf import kernels
from pgolf.kernels import launcher, reference, tuning

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ---------------------------------------------------------------------------------------------------------
# Helpers shared with pgolf.kernels.softcap_ce.

def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: full fp32 unless PyTorch itself allows TF32 for fp32 matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def effective_slope(negative_slope: float) -> float:
    """The reference applies LeakyReLU only for a positive slope and ReLU otherwise."""
    s = float(negative_slope)
    return s if s > 0 else 0.0


@triton.jit
def round_for_bf16(x, RNE_BF16: tl.constexpr):
    """fp32 ``x`` ready to be cast for storing. The interpreter truncates fp32 → bf16 (the GPU rounds to nearest
    even), so with ``RNE_BF16`` (interpreter + bf16 output) x is first rounded to bf16 precision on its bits,
    which makes the truncating cast exact. A no-op otherwise."""
    if RNE_BF16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x


def rne_bf16(dtype: torch.dtype) -> bool:
    """Whether kernels storing ``dtype`` need :func:`round_for_bf16` (interpreter, bf16)."""
    return launcher.INTERPRET and dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------
# The kernel: C = A·B (fp32 accumulate) with the activation (FORWARD) or its derivative (backward) epilogue.

@triton.jit
def _mlp_gemm_kernel(a_ptr, b_ptr, out_ptr, post_ptr, bits_ptr, M, N, K,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_pm, stride_sm,
                     slope,
                     FORWARD: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, RNE_BF16: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped tile order: GROUP_M row-tiles share each column band of B while it is in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows

    rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    rn = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # bf16 tl.dot is wrong under the interpreter: multiply in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk

    tile_ok = m_ok[:, None] & n_ok[None, :]
    if FORWARD:
        # acc = pre. post = leaky(pre)², sign bits packed little-endian, 8 columns per byte.
        pos = acc > 0.0
        act = tl.where(pos, acc, acc * slope)
        post = act * act
        post = round_for_bf16(post, RNE_BF16).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], post, mask=tile_ok)
        bits = tl.reshape(pos.to(tl.int32), (BM, BN // 8, 8))
        packed = tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2)
        rb = pid_n.to(tl.int64) * (BN // 8) + tl.arange(0, BN // 8)
        b_ok = m_ok[:, None] & (rb < (N + 7) // 8)[None, :]
        tl.store(bits_ptr + rm[:, None] * stride_sm + rb[None, :], packed.to(tl.uint8), mask=b_ok)
    else:
        # acc = dy·W2. dpre = acc · φ'(pre), φ'(pre) = 2·sqrt(post) if pre > 0 else −2·slope·sqrt(post).
        post = tl.load(post_ptr + rm[:, None] * stride_pm + rn[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        byte = tl.load(bits_ptr + rm[:, None] * stride_sm + (rn // 8)[None, :], mask=tile_ok, other=0).to(tl.int32)
        pos = ((byte >> (rn % 8).to(tl.int32)[None, :]) & 1) != 0
        dpre = acc * tl.sqrt(post) * tl.where(pos, 2.0, -2.0 * slope)
        dpre = round_for_bf16(dpre, RNE_BF16).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], dpre, mask=tile_ok)


# Launch configs (pgolf.kernels.launcher), keys: power-of-two bucket of M (the shape class), N, K, dtype. The first
# of each list is the default; fp32 (ieee dots on CUDA cores) needs smaller tiles per warp.
_HALF = [
    dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BM=64, BN=128, BK=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BM=128, BN=64, BK=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BM=64, BN=64, BK=64, GROUP_M=8, num_warps=4, num_stages=3),
]
_FP32 = [dict(BM=64, BN=128, BK=32, GROUP_M=8, num_warps=4, num_stages=3),
         dict(BM=64, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=3)]
# Interpreter: small tiles so the tiny test shapes span several tiles in every direction.
_INTERPRET = dict(BM=16, BN=32, BK=16, GROUP_M=2, num_warps=4, num_stages=1)

UP_FWD = launcher.Kernel("mlp", "up_fwd", _mlp_gemm_kernel, launcher.by_dtype(_HALF, _FP32), _INTERPRET)
UP_BWD = launcher.Kernel("mlp", "up_bwd", _mlp_gemm_kernel, launcher.by_dtype(_HALF, _FP32), _INTERPRET)


def _launch_gemm(a: Tensor, b_ptr_t: Tensor, b_strides: tuple[int, int], out: Tensor, post: Tensor, bits: Tensor,
                 N: int, slope: float, forward: bool) -> None:
    M, K = a.shape
    if M == 0 or N == 0:
        return
    key = dict(m=tuning.pow2_bucket(M, lo=16, hi=1 << 17), n=N, k=K, dtype=launcher.dtype_name(a.dtype))
    args = (a, b_ptr_t, out, post, bits, M, N, K, a.stride(0), a.stride(1), b_strides[0], b_strides[1],
            out.stride(0), post.stride(0), bits.stride(0), slope)
    consts = dict(FORWARD=forward, UPCAST=launcher.upcast_dots(a.dtype), DOT_PREC=dot_precision(a.dtype),
                  RNE_BF16=rne_bf16(out.dtype))
    kernel = UP_FWD if forward else UP_BWD
    kernel.run(lambda c: (triton.cdiv(M, c["BM"]) * triton.cdiv(N, c["BN"]),), args, consts, key=key,
               device=a.device)


def mlp_up_forward(x: Tensor, w1: Tensor, negative_slope: float) -> tuple[Tensor, Tensor]:
    """x: (M, d), w1: (H, d) → (post (M, H) in x.dtype, sign bits (M, ceil(H/8)) uint8)."""
    launcher.require_device(x, "MLP kernels")
    M, _ = x.shape
    H = w1.shape[0]
    post = launcher.new_output((M, H), x.dtype, x.device)
    bits = launcher.new_output((M, (H + 7) // 8), torch.uint8, x.device)
    # B[k, n] = W1[n, k]
    _launch_gemm(x, w1, (w1.stride(1), w1.stride(0)), post, post, bits, H, effective_slope(negative_slope), True)
    return post, bits


def mlp_up_backward(dy: Tensor, w2: Tensor, post: Tensor, bits: Tensor, negative_slope: float) -> Tensor:
    """dy: (M, d), w2: (d, H), post (M, H), bits (M, ceil(H/8)) → dpre (M, H) in dy.dtype."""
    launcher.require_device(dy, "MLP kernels")
    M = dy.shape[0]
    H = w2.shape[1]
    dpre = launcher.new_output((M, H), dy.dtype, dy.device)
    # B[k, n] = W2[k, n]
    _launch_gemm(dy, w2, (w2.stride(0), w2.stride(1)), dpre, post, bits, H, effective_slope(negative_slope), False)
    return dpre


# ---------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and autograd.

@torch.library.custom_op("pgolf::mlp_up_fwd", mutates_args=())
def _mlp_up_fwd_op(x: Tensor, w1: Tensor, negative_slope: float) -> tuple[Tensor, Tensor]:
    return mlp_up_forward(x, w1, negative_slope)


@_mlp_up_fwd_op.register_fake
def _(x: Tensor, w1: Tensor, negative_slope: float) -> tuple[Tensor, Tensor]:
    M, H = x.shape[0], w1.shape[0]
    return x.new_empty((M, H)), x.new_empty((M, (H + 7) // 8), dtype=torch.uint8)


@torch.library.custom_op("pgolf::mlp_up_bwd", mutates_args=())
def _mlp_up_bwd_op(dy: Tensor, w2: Tensor, post: Tensor, bits: Tensor, negative_slope: float) -> Tensor:
    return mlp_up_backward(dy, w2, post, bits, negative_slope)


@_mlp_up_bwd_op.register_fake
def _(dy: Tensor, w2: Tensor, post: Tensor, bits: Tensor, negative_slope: float) -> Tensor:
    return dy.new_empty((dy.shape[0], w2.shape[1]))


class FusedMLPFunction(torch.autograd.Function):
    """y = φ(x W1ᵀ) W2ᵀ on 2-D x; saves x, W1, W2, post and the sign bits."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor, negative_slope: float) -> Tensor:
        post, bits = torch.ops.pgolf.mlp_up_fwd(x, w1, negative_slope)
        y = torch.mm(post, w2.t())
        ctx.save_for_backward(x, w1, w2, post, bits)
        ctx.negative_slope = negative_slope
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w1, w2, post, bits = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw1 = dw2 = None
        if ctx.needs_input_grad[2]:
            dw2 = torch.mm(dy.t(), post)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dpre = torch.ops.pgolf.mlp_up_bwd(dy, w2, post, bits, ctx.negative_slope)
            if ctx.needs_input_grad[0]:
                dx = torch.mm(dpre, w1)
            if ctx.needs_input_grad[1]:
                dw1 = torch.mm(dpre.t(), x)
        return dx, dw1, dw2, None


def mlp(x: Tensor, w1: Tensor, w2: Tensor, negative_slope: float = 0.5) -> Tensor:
    """Triton implementation of :func:`pgolf.kernels.reference.mlp` (same signature and semantics).

    Weights are cast to the compute dtype (x's, or the autocast dtype) like the reference; dtypes other than
    fp32/fp16/bf16 fall back to the reference.
    """
    if torch.is_autocast_enabled(x.device.type) and x.dtype in SUPPORTED_DTYPES:
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if x.dtype not in SUPPORTED_DTYPES:
        return reference.mlp(x, w1, w2, negative_slope)
    dt = x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = FusedMLPFunction.apply(x2, w1.to(dt), w2.to(dt), float(negative_slope))
    return y.reshape(*lead, w2.shape[0])


kernels.register("mlp", "triton", mlp)
