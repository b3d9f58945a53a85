"""Attention benchmark cases: the Triton flash-style kernel vs SDPA + the PyTorch XSA op (and FlashAttention
when installed).

Record shapes (``smoke=False``): 98,304 tokens per GPU, 8 query / 4 KV heads, head dim 64, bf16, XSA on, as
- ``packed``: documents of FineWeb-like lengths (log-normal, median ~500 tokens, split at 2,048) with cu_seqlens;
- ``dense``: 48 uniform 2,048-token sequences;
- ``sliding-eval`` (forward only): 32 sliding windows of 2,048 flattened into one row, split at every window
  start and at document starts, the way the doc-isolated eval calls the model.

Implementations: ``triton`` (:mod:`pgolf.kernels.xsa_attention`), ``sdpa_xsa`` (the baseline: the reference path,
i.e. SDPA, flash backend where it accepts the call, with packed documents scattered into a right-padded batch,
then :func:`pgolf.kernels.reference.xsa_project`), and ``flash_attn`` when ``flash_attn_interface`` (FA3) or
``flash_attn`` (FA2) imports (varlen for packed rows, + the same XSA op).
FLOPs count causal work only: forward 4·Σ L²/2·Hq·D over documents (sequences), backward 2.5× that.
``smoke=True``: tiny fp32 shapes for CPU (the Triton implementation is included there only under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Callable

import torch

from pgolf.bench.core import Case
from pgolf.bench.ops import triton_module
from pgolf.kernels import reference

RECORD = dict(tokens=98_304, heads=8, kv_heads=4, head_dim=64, max_doc=2048)
SLIDING = dict(windows=32, width=2048)


def doc_lengths(total: int, *, seed: int = 0, median: float = 500.0, sigma: float = 1.1,
                max_len: int = 2048) -> list[int]:
    """Document lengths summing to ``total``: log-normal draws (fixed seed), each split into pieces of at most
    ``max_len`` (as the packed loader splits long documents); the last one is cut to fit."""
    rng = random.Random(seed)
    out: list[int] = []
    left = total
    while left > 0:
        n = max(1, int(round(rng.lognormvariate(math.log(median), sigma))))
        while n > 0 and left > 0:
            piece = min(n, max_len, left)
            out.append(piece)
            n -= piece
            left -= piece
    return out


def split_at_windows(lengths: list[int], width: int) -> list[int]:
    """Cut a sequence of segment lengths additionally at every multiple of ``width``."""
    out, pos = [], 0
    for n in lengths:
        while n > 0:
            piece = min(n, width - pos % width)
            out.append(piece)
            n -= piece
            pos += piece
    return out


def causal_flops(lengths: list[int], heads: int, head_dim: int) -> float:
    """Forward FLOPs of causal attention over independent sequences: 4 · Σ L²/2 · H · D."""
    return 4.0 * sum(n * n / 2 for n in lengths) * heads * head_dim


def _cu(lengths: list[int], device, pad_to: int = 64) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    padded = -(-len(cu) // pad_to) * pad_to
    return torch.tensor(cu + [cu[-1]] * (padded - len(cu)), dtype=torch.int32, device=device)


def _flash_attn():
    """(varlen_fn, dense_fn) from FA3 or FA2, or None."""
    for mod in ("flash_attn_interface", "flash_attn"):
        try:
            m = __import__(mod)
            return m.flash_attn_varlen_func, m.flash_attn_func
        except (ImportError, AttributeError):
            continue
    return None


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _sdpa_context(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _impls(B: int, T: int, lengths: list[int] | None, heads: int, kv_heads: int, head_dim: int,
           dtype: torch.dtype, device: torch.device, backward: bool) -> dict[str, Callable[[], Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, T, heads, head_dim, generator=g, device=device, dtype=dtype)
    k = torch.randn(B, T, kv_heads, head_dim, generator=g, device=device, dtype=dtype)
    v = torch.randn(B, T, kv_heads, head_dim, generator=g, device=device, dtype=dtype)
    dy = torch.randn(B, T, heads, head_dim, generator=g, device=device, dtype=dtype)
    cu = _cu(lengths, device) if lengths is not None else None
    if backward:
        for t in (q, k, v):
            t.requires_grad_(True)

    def wrap(f: Callable[[], torch.Tensor]) -> Callable[[], Any]:
        if backward:
            return lambda: torch.autograd.grad(f(), (q, k, v), dy)
        def fwd():
            with torch.no_grad():
                return f()
        return fwd

    impls: dict[str, Callable[[], Any]] = {}
    xsa_attention = triton_module("xsa_attention", device)
    if xsa_attention is not None:
        impls["triton"] = wrap(lambda: xsa_attention.attention(q, k, v, xsa=True, cu_seqlens=cu, max_seqlen=2048))

    def sdpa_xsa():
        with _sdpa_context(device):
            return reference.attention(q, k, v, xsa=True, cu_seqlens=cu)

    impls["sdpa_xsa"] = wrap(sdpa_xsa)
    fa = _flash_attn() if device.type == "cuda" else None
    if fa is not None:
        varlen, dense = fa
        if lengths is not None:
            cu_plain = _cu(lengths, device, pad_to=1)
            max_len = max(lengths)

            def fa_call():
                y = _first(varlen(q[0], k[0], v[0], cu_plain, cu_plain, max_len, max_len, causal=True))
                return reference.xsa_project(y.unsqueeze(0), v)
        else:
            def fa_call():
                return reference.xsa_project(_first(dense(q, k, v, causal=True)), v)
        impls["flash_attn"] = wrap(fa_call)
    return impls


def cases(smoke: bool, device) -> list[Case]:
    device = torch.device(device)
    if smoke:
        shape = dict(heads=2, kv_heads=1, head_dim=16)
        dtype = torch.float32
        T = 96
        packed = doc_lengths(T, seed=0, median=20.0, max_len=64)
        dense_B, dense_T = 1, 64
        sl_lengths = split_at_windows(doc_lengths(2 * 64, seed=1, median=20.0), 64)
    else:
        shape = dict(heads=RECORD["heads"], kv_heads=RECORD["kv_heads"], head_dim=RECORD["head_dim"])
        dtype = torch.bfloat16
        T = RECORD["tokens"]
        packed = doc_lengths(T, seed=0, max_len=RECORD["max_doc"])
        dense_B, dense_T = T // RECORD["max_doc"], RECORD["max_doc"]
        width = SLIDING["width"]
        sl_lengths = split_at_windows(doc_lengths(SLIDING["windows"] * width, seed=1), width)
    H, D = shape["heads"], shape["head_dim"]
    layouts = [
        ("packed", 1, T, packed, packed),
        ("dense", dense_B, dense_T, None, [dense_T] * dense_B),
    ]
    out: list[Case] = []
    for layout, B, TT, lengths, seqs in layouts:
        fwd_flops = causal_flops(seqs, H, D)
        for mode, backward, flops in (("fwd", False, fwd_flops), ("fwd+bwd", True, 3.5 * fwd_flops)):
            params = dict(layout=layout, B=B, T=TT, docs=len(seqs), mean_doc=sum(seqs) / len(seqs), dtype=str(dtype),
                          xsa=True, **shape)
            out.append(Case(
                op="attention", name=f"attention {mode} {layout} B={B} T={TT}", mode=mode,
                build=lambda B=B, TT=TT, lengths=lengths, backward=backward: _impls(
                    B, TT, lengths, shape["heads"], shape["kv_heads"], D, dtype, device, backward),
                baseline="sdpa_xsa", params=params, flops=flops))
    TT = sum(sl_lengths)
    out.append(Case(
        op="attention", name=f"attention fwd sliding-eval windows T={TT}", mode="fwd",
        build=lambda: _impls(1, TT, sl_lengths, shape["heads"], shape["kv_heads"], D, dtype, device, False),
        baseline="sdpa_xsa", flops=causal_flops(sl_lengths, H, D),
        params=dict(layout="sliding-eval", T=TT, tokens=TT, segments=len(sl_lengths), dtype=str(dtype), xsa=True,
                    note="tokens/s = tokens / (ms / 1e3)", **shape)))
    return out
