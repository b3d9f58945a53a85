"""int6 weight-only matmul ``y = x · (q ⊙ s)ᵀ`` with the weight decoded in registers, never materialized.

Layouts are the artifact's, defined in :mod:`pgolf.kernels.int6_pack`: ``q`` is an (N, K) int8 container or the
packed (N, 3·ceil(K/4)) uint8 form (4 values in 3 bytes); ``scale`` is (N,) fp16, one per output row.

One Triton kernel, ``_int6_mm_kernel``, serves both paths:

- main loop: an x tile (BM, BK) in x's dtype and a weight tile decoded to (BK, BN) in the same dtype: int8 values
  are converted directly; packed rows load the three byte planes of BK/4 groups (BN, BK/4 each), rebuild the four
  6-bit fields with shifts and masks, interleave them back to K order and subtract the bias 32. The decoded
  integers in [-32, 31] are exact in fp16/bf16, so ``tl.dot`` sees exactly ``q``; fp32 accumulation.
- the per-row scale is applied in the epilogue (``y[:, n] = s[n] · Σ_k x[:, k] q[n, k]``), which is exact
  algebra and avoids one multiply per weight element. Against the reference (which rounds ``q·s`` to x's dtype
  before its GEMM) this differs only by that rounding: identical math for fp32, within the dtype's tolerance for
  fp16/bf16.
- **small M** (M ≤ 64: decode, TTT chunks): GEMV-like tiles, BM = max(16, next_pow2(M)) rows of x against a
  narrow BN slice of the weight, with **split-K** across programs so that enough programs stream the weight
  bytes (the only large operand) at full bandwidth; fp32 partials go to a (SPLIT_K, M, N) workspace and
  ``_int6_splitk_reduce_kernel`` sums them, applies the scale and casts. SPLIT_K = 1 writes y directly.
- **large M** (sliding eval, M ≥ 4096, K = 512): a tiled GEMM (BM, BN up to 128/256) with grouped tile order
  (GROUP_M) for L2 reuse of x rows, no split.

All addresses use int64 (indices cast before multiplying by strides); x and q may be strided views. Under
``TRITON_INTERPRET=1`` bf16 tiles are upcast to fp32 before ``tl.dot`` (the interpreter's bf16 dot is wrong).
Launch configs: the kernels ``int6_matmul.large``, ``.small`` and ``.splitk_reduce`` of
:mod:`pgolf.kernels.launcher` (keys: bucketed M, N, K, weight layout, dtype).

**Inference only**: there is no autograd; an ``x`` that requires grad (with grad mode on) raises. The op is the
custom op ``pgolf::int6_matmul`` with a fake, so ``torch.compile(fullgraph=True)`` traces it.
:class:`Int6Linear` wraps it as an ``nn.Module`` for swapping a model's Linear layers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

import pgolf.kernels
from pgolf.kernels import launcher, tuning
from pgolf.kernels.int6_pack import dequantize

SMALL_M = 64
"""M at or below which the split-K GEMV-style path is used."""


# ------------------------------------------------------------------------------------------------------------
# kernels (helpers are written inline: each nested @triton.jit call costs milliseconds under the interpreter)

@triton.jit
def _int6_mm_kernel(x_ptr, q_ptr, s_ptr, y_ptr, ws_ptr, M, N, K, stride_xm, stride_xk, stride_qn, stride_qk,
                    stride_ym, stride_yn, stride_ws, PACKED: tl.constexpr, SPLIT_K: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """y[m, n] = s[n]·Σ_k x[m, k] q[n, k] over this program's K range (split pid_k of SPLIT_K)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    # grouped tile order: GROUP_M row tiles share the same weight column tiles while they are in L2
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mask_m = rm < M
    mask_n = rn < N
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm  # (BM, 1)
    q_rows = q_ptr + rn[:, None].to(tl.int64) * stride_qn  # (BN, 1): packed rows, decoded as (BN, BK)
    q_cols = q_ptr + rn[None, :].to(tl.int64) * stride_qn  # (1, BN): int8 rows, loaded as (BK, BN)
    kr = tl.arange(0, BK)
    gr = tl.arange(0, BK // 4)

    k_chunk = tl.cdiv(tl.cdiv(K, BK), SPLIT_K) * BK
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(K, k_lo + k_chunk)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        ks = k0 + kr
        mask_k = ks < K
        xt = tl.load(x_rows + ks[None, :].to(tl.int64) * stride_xk, mask=mask_m[:, None] & mask_k[None, :],
                     other=0.0)
        if PACKED:
            # group g = k0/4 + gr holds k = 4g..4g+3 in bytes 3g, 3g+1, 3g+2 (little-endian 24-bit word)
            gs = k0 // 4 + gr
            gmask = mask_n[:, None] & (gs[None, :] * 4 < K)
            byte0 = q_rows + (gs[None, :] * 3).to(tl.int64) * stride_qk  # (BN, BK/4)
            b0 = tl.load(byte0, mask=gmask, other=0).to(tl.int32)
            b1 = tl.load(byte0 + stride_qk, mask=gmask, other=0).to(tl.int32)
            b2 = tl.load(byte0 + 2 * stride_qk, mask=gmask, other=0).to(tl.int32)
            u0 = b0 & 63
            u1 = (b0 >> 6) | ((b1 & 15) << 2)
            u2 = (b1 >> 4) | ((b2 & 3) << 4)
            u3 = b2 >> 2
            # interleave(interleave(u0, u2), interleave(u1, u3)) puts u0, u1, u2, u3 of each group in K order
            w = tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3)) - 32  # (BN, BK)
            w = tl.where(mask_k[None, :], w, 0)
            wt = tl.trans(w)  # (BK, BN)
        else:
            wt = tl.load(q_cols + ks[:, None].to(tl.int64) * stride_qk,
                         mask=mask_k[:, None] & mask_n[None, :], other=0)  # (BK, BN)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        else:
            wt = wt.to(xt.dtype)
        if IEEE:
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc)

    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        s = tl.load(s_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        y = acc * s[None, :]
        y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :].to(tl.int64) * stride_yn
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        ws_ptrs = ws_ptr + pid_k.to(tl.int64) * stride_ws + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(ws_ptrs, acc, mask=mask)


@triton.jit
def _int6_splitk_reduce_kernel(ws_ptr, s_ptr, y_ptr, M, N, stride_ym, stride_yn, stride_ws, SPLIT_K: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = s[n]·Σ_split ws[split, m, n], cast to y's dtype."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    ws_ptrs = ws_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(SPLIT_K):
        acc += tl.load(ws_ptrs, mask=mask, other=0.0)
        ws_ptrs += stride_ws  # 64-bit pointer arithmetic
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :].to(tl.int64) * stride_yn
    tl.store(y_ptrs, (acc * s[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------------
# launch configs (pgolf.kernels.launcher), keys: bucketed M, N, K, weight layout, dtype

def _cfg(num_warps: int, num_stages: int, **tiles) -> dict:
    return dict(tiles, num_warps=num_warps, num_stages=num_stages)


# The first config of each list is the default. fp32 x (ieee dots on CUDA cores) needs narrower tiles per warp to
# stay within 255 registers.
LARGE_CONFIGS = {
    "half": [_cfg(8, 3, BM=128, BN=128, BK=64, GROUP_M=8), _cfg(4, 4, BM=128, BN=64, BK=64, GROUP_M=8),
             _cfg(4, 4, BM=64, BN=128, BK=64, GROUP_M=8), _cfg(8, 3, BM=128, BN=256, BK=64, GROUP_M=8),
             _cfg(4, 4, BM=64, BN=64, BK=64, GROUP_M=8)],
    "float32": [_cfg(8, 3, BM=64, BN=64, BK=32, GROUP_M=8), _cfg(4, 3, BM=64, BN=64, BK=16, GROUP_M=8)],
}
SMALL_CONFIGS = {  # BM comes from M (max(16, next_pow2(M))), SPLIT_K from _split_k
    "half": [_cfg(8, 4, BN=64, BK=128, GROUP_M=1), _cfg(4, 4, BN=32, BK=128, GROUP_M=1),
             _cfg(8, 3, BN=64, BK=256, GROUP_M=1), _cfg(8, 3, BN=128, BK=64, GROUP_M=1)],
    "float32": [_cfg(4, 3, BN=32, BK=64, GROUP_M=1), _cfg(8, 3, BN=64, BK=64, GROUP_M=1)],
}
REDUCE = _cfg(4, 1, BLOCK_M=16, BLOCK_N=128)


LARGE = launcher.Kernel("int6_matmul", "large", _int6_mm_kernel, launcher.by_dtype(**LARGE_CONFIGS),
                        dict(BM=32, BN=32, BK=32, GROUP_M=2))
SMALL = launcher.Kernel("int6_matmul", "small", _int6_mm_kernel, launcher.by_dtype(**SMALL_CONFIGS),
                        dict(BN=32, BK=64, GROUP_M=1))
SPLITK_REDUCE = launcher.Kernel("int6_matmul", "splitk_reduce", _int6_splitk_reduce_kernel, [REDUCE],
                                dict(BLOCK_M=16, BLOCK_N=128))


def _split_k(M: int, N: int, K: int, device: torch.device) -> int:
    """Split-K for the small-M path: enough programs (~2 per SM, nominal BN = 64) while each split keeps >= 256
    of K. A power of two."""
    if launcher.INTERPRET or not (device.type == "cuda" or launcher.compiling()):
        return 1
    programs_n = triton.cdiv(N, 64)
    want = triton.cdiv(2 * launcher.sm_count(device), programs_n)
    split = 1
    while split * 2 <= want and K // (split * 2) >= 256:
        split *= 2
    return split


# ------------------------------------------------------------------------------------------------------------
# launcher


def _check(x: Tensor, q: Tensor, scale: Tensor, in_features: int, packed: bool) -> int:
    """Validate shapes/dtypes; returns N."""
    K = int(in_features)
    if x.shape[-1] != K:
        raise ValueError(f"int6_matmul: x has {x.shape[-1]} features but in_features={K}")
    if not x.is_floating_point():
        raise TypeError(f"int6_matmul: x must be floating point, got {x.dtype}")
    if q.dim() != 2:
        raise ValueError(f"int6_matmul: q must be 2-D (N, K) or packed (N, 3*ceil(K/4)), got {tuple(q.shape)}")
    N = q.shape[0]
    if packed:
        want = 3 * ((K + 3) // 4)
        if q.dtype != torch.uint8 or q.shape[1] != want:
            raise ValueError(f"int6_matmul: packed q must be uint8 of shape ({N}, {want}) for in_features={K}, "
                             f"got {q.dtype} {tuple(q.shape)}")
    elif q.dtype != torch.int8 or q.shape[1] != K:
        raise ValueError(f"int6_matmul: int8-container q must be int8 of shape ({N}, {K}), got {q.dtype} "
                         f"{tuple(q.shape)}")
    if scale.shape != (N,):
        raise ValueError(f"int6_matmul: scale must have shape ({N},), got {tuple(scale.shape)}")
    if x.device != q.device or x.device != scale.device:
        raise ValueError(f"int6_matmul: x, q and scale must share a device ({x.device}, {q.device}, {scale.device})")
    launcher.require_device(x, "int6_matmul")
    return N


def launch(x: Tensor, q: Tensor, scale: Tensor, *, in_features: int, packed: bool,
           config: dict | None = None) -> Tensor:
    """Run the kernel directly (no custom op). ``config`` overrides the tile config; it may set SPLIT_K and
    BM (small path) and selects the small-M path when it has SPLIT_K, else the large-M path."""
    N = _check(x, q, scale, in_features, packed)
    K = int(in_features)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    scale = scale.contiguous()  # (N,) read with unit stride
    y = launcher.new_output((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return y.view(*lead, N)
    if K == 0:
        return y.zero_().view(*lead, N)
    small = M <= SMALL_M if config is None else "SPLIT_K" in config
    cfg = dict(config) if config is not None else None
    split = int(cfg.pop("SPLIT_K")) if cfg and "SPLIT_K" in cfg else _split_k(M, N, K, x.device)
    split = split if small else 1
    consts = dict(PACKED=bool(packed), UPCAST=launcher.upcast_dots(x.dtype), IEEE=x.dtype == torch.float32,
                  SPLIT_K=split, **(dict(BM=tuning.pow2_bucket(M, lo=16)) if small else {}))
    m_bucket = tuning.pow2_bucket(M, lo=16) if small else tuning.pow2_bucket(M, hi=1 << 16)
    key = dict(m=m_bucket, n=N, k=K, layout="packed" if packed else "int8", dtype=launcher.dtype_name(x.dtype))
    ws = launcher.new_output((split, M, N), torch.float32, x.device) if split > 1 else y
    args = (x2, q, scale, y, ws, M, N, K, *x2.stride(), *q.stride(), *y.stride(), M * N)
    (SMALL if small else LARGE).run(lambda c: (triton.cdiv(M, c["BM"]) * triton.cdiv(N, c["BN"]), split), args,
                                    consts, key=key, device=x.device, config=cfg)
    if split > 1:
        SPLITK_REDUCE.run(lambda c: (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(N, c["BLOCK_N"])),
                          (ws, scale, y, M, N, *y.stride(), M * N), dict(SPLIT_K=split), key=key, device=x.device)
    return y.view(*lead, N)


# ------------------------------------------------------------------------------------------------------------
# custom op + dispatch registration + module

@torch.library.custom_op("pgolf::int6_matmul", mutates_args=())
def int6_matmul_op(x: Tensor, q: Tensor, scale: Tensor, in_features: int, packed: bool) -> Tensor:
    """Custom-op form of :func:`int6_matmul` (inference only)."""
    return launch(x, q, scale, in_features=in_features, packed=packed)


@int6_matmul_op.register_fake
def _int6_matmul_fake(x: Tensor, q: Tensor, scale: Tensor, in_features: int, packed: bool) -> Tensor:
    return x.new_empty((*x.shape[:-1], q.shape[0]))


def int6_matmul(x: Tensor, q: Tensor, scale: Tensor, *, in_features: int, packed: bool) -> Tensor:
    """Triton ``y = x · (q ⊙ s)ᵀ``; same signature and result as the reference. Inference only (no autograd):
    raises if ``x`` requires grad while grad mode is on."""
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("the Triton int6_matmul is inference-only (no autograd): run it under torch.no_grad() "
                           "/ torch.inference_mode() or pass a detached x; use the reference backend to train")
    return torch.ops.pgolf.int6_matmul(x, q, scale, int(in_features), bool(packed))


class Int6Linear(torch.nn.Module):
    """A bias-free Linear whose weight is stored as int6 values + per-row fp16 scales (the artifact's layout).

    ``q``: (out_features, in_features) int8 or packed (out_features, 3·ceil(in_features/4)) uint8; ``scale``:
    (out_features,). Both are buffers (saved in the state dict). ``forward(x)`` is
    ``pgolf.kernels.int6_matmul`` (the backend follows the dispatch: Triton on CUDA, reference on CPU unless
    selected), equal to ``x @ dequantized_weight(x.dtype).T`` within the dtype's tolerance.
    """

    def __init__(self, q: Tensor, scale: Tensor, in_features: int, packed: bool):
        super().__init__()
        in_features, packed = int(in_features), bool(packed)
        want_cols = 3 * ((in_features + 3) // 4) if packed else in_features
        want_dtype = torch.uint8 if packed else torch.int8
        if q.dim() != 2 or q.shape[1] != want_cols or q.dtype != want_dtype:
            raise ValueError(f"Int6Linear: q must be {want_dtype} (out_features, {want_cols}) for in_features="
                             f"{in_features}, packed={packed}; got {q.dtype} {tuple(q.shape)}")
        if scale.shape != (q.shape[0],):
            raise ValueError(f"Int6Linear: scale must have shape ({q.shape[0]},), got {tuple(scale.shape)}")
        self.in_features = in_features
        self.out_features = q.shape[0]
        self.packed = packed
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scale", scale.contiguous())

    def forward(self, x: Tensor) -> Tensor:
        return pgolf.kernels.int6_matmul(x, self.q, self.scale, in_features=self.in_features, packed=self.packed)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (out_features, in_features) weight ``q·s`` in ``dtype`` (fp32 multiply, then cast)."""
        return dequantize(self.q, self.scale, in_features=self.in_features, packed=self.packed, dtype=dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.packed}"


pgolf.kernels.register("int6_matmul", "triton", int6_matmul)
