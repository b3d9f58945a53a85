"""int6 dequant-matmul benchmark cases: ``y = x · (q ⊙ s)ᵀ`` from the artifact's int6 weights (bf16 x, CUDA).

Shapes (``smoke=False``): M ∈ {1, 16, 128, 4096, 98304} × K = 512 × N ∈ {512, 2048, 8192} (M = 1..16: decode-like
and TTT chunks; 4096 and 98304: sliding-window eval batches), plus the weight-dominated N = K = 4096 layer at
M ∈ {1, 16}. Implementations:

- ``triton_int8``: :mod:`pgolf.kernels.int6_matmul` on the int8 container (1 byte per weight);
- ``triton_packed``: the same kernel on the packed layout (3 bytes per 4 weights), the candidate;
- ``cublas_bf16``: ``F.linear`` with a weight dequantized to bf16 once, outside the timing (the baseline: what
  evaluating the dequantized model costs today);
- ``dequant_cublas``: dequantize the int8 container to bf16, then ``F.linear``, every call (the naive on-the-fly
  alternative, = :func:`pgolf.kernels.reference.int6_matmul`).

FLOPs: 2·M·N·K. ``bytes_moved`` is set for the weight-dominated cases (M ≤ 16): the packed weight bytes
(N·3·ceil(K/4)) + fp16 scales + x + y, the minimum traffic of the packed path, so ``gbps`` reads as effective
bandwidth of every implementation against that same byte count (H200 HBM peak ≈ 4.8 TB/s).
``smoke=True``: tiny fp32 shapes for CPU (the Triton implementations only under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from pgolf.bench.core import Case
from pgolf.bench.ops import triton_module
from pgolf.kernels import reference
from pgolf.kernels.int6_pack import dequantize, pack_int6

M_VALUES = (1, 16, 128, 4096, 98304)
N_VALUES = (512, 2048, 8192)
K_MODEL = 512
WEIGHT_DOMINATED = dict(N=4096, K=4096, M=(1, 16))
SMALL_M = 16  # cases at or below report bytes_moved / GB/s


def packed_bytes(N: int, K: int) -> int:
    return N * 3 * ((K + 3) // 4)


def min_bytes(M: int, N: int, K: int, x_bytes: int) -> int:
    """Packed weight + fp16 scales + x read + y written."""
    return packed_bytes(N, K) + 2 * N + M * K * x_bytes + M * N * x_bytes


def _build(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
           params: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randint(-31, 32, (N, K), generator=g, device=device, dtype=torch.int8)
    scale = (torch.rand(N, generator=g, device=device) * 0.02 + 0.001).to(torch.float16)
    qp = pack_int6(q)
    x = torch.randn(M, K, generator=g, device=device, dtype=torch.float32).to(dtype)
    w = dequantize(q, scale, dtype=dtype)  # pre-dequantized weight of the baseline
    impls: dict[str, Callable[[], Any]] = {}
    im = triton_module("int6_matmul", device)
    if im is not None:
        impls["triton_int8"] = lambda: im.int6_matmul(x, q, scale, in_features=K, packed=False)
        impls["triton_packed"] = lambda: im.int6_matmul(x, qp, scale, in_features=K, packed=True)
    impls["cublas_bf16"] = lambda: F.linear(x, w)
    impls["dequant_cublas"] = lambda: reference.int6_matmul(x, q, scale, in_features=K, packed=False)

    # one correctness number per build: max |triton − cublas_bf16| relative to max |y|
    if "triton_packed" in impls:
        with torch.no_grad():
            want = impls["cublas_bf16"]().float()
            denom = float(want.abs().max()) + 1e-12
            for name in ("triton_int8", "triton_packed"):
                params[f"rel_err_{name}"] = float((impls[name]().float() - want).abs().max()) / denom
    return impls


def cases(smoke: bool, device) -> list[Case]:
    device = torch.device(device)
    if smoke:
        dtype = torch.float32
        shapes = [(M, 48, 64) for M in (1, 5, 70)]  # both paths: M ≤ 64 split-K/GEMV, M > 64 tiled
        small_m = 5
    else:
        dtype = torch.bfloat16
        shapes = [(M, N, K_MODEL) for N in N_VALUES for M in M_VALUES]
        shapes += [(M, WEIGHT_DOMINATED["N"], WEIGHT_DOMINATED["K"]) for M in WEIGHT_DOMINATED["M"]]
        small_m = SMALL_M
    x_bytes = torch.empty((), dtype=dtype).element_size()
    out: list[Case] = []
    for M, N, K in shapes:
        weight_bound = M <= small_m
        params: dict[str, Any] = dict(M=M, N=N, K=K, dtype=str(dtype), packed_weight_bytes=packed_bytes(N, K),
                                      path="small-M split-K" if M <= 64 else "tiled GEMM")
        if weight_bound:
            params["note"] = "gbps = packed weight + scales + x + y bytes / time, for every implementation"
        out.append(Case(
            op="int6_matmul", name=f"int6_matmul fwd M={M} N={N} K={K}", mode="fwd",
            build=lambda M=M, N=N, K=K, params=params: _build(M, N, K, dtype, device, params),
            baseline="cublas_bf16", params=params, flops=2.0 * M * N * K,
            bytes_moved=float(min_bytes(M, N, K, x_bytes)) if weight_bound else None,
            candidate="triton_packed"))
    return out
