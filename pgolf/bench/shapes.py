"""The record shapes of every op, as calls of the op's own launcher: what ``pgolf-bench compile`` compiles and
``pgolf-bench tune`` tunes.

The record stack on 8 GPUs (reference-stack): sp8192, 11 layers × 512, 8 query / 4 KV heads of 64, MLP 4×;
training 98,304 tokens per GPU (packed documents, or 48 rows of 2,048), sliding eval 32 windows of 2,048 (or one
document-isolated row of 65,536), Muon's banks, the artifact's int6 layers at decode, TTT and eval sizes.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

TRAIN_TOKENS = 98_304
EVAL_TOKENS = 32 * 2048
D_MODEL, HIDDEN, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 512, 2048, 8192, 8, 4, 64


class Tensors:
    """Inputs for the record calls: untouched CPU memory when compiling, random CUDA tensors when tuning."""

    def __init__(self, device: torch.device):
        self.device = device
        self.real = device.type == "cuda"

    def randn(self, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        if not self.real:
            return torch.empty(shape, dtype=dtype)
        return (torch.randn(shape, device=self.device) * scale).to(dtype)

    def randint(self, lo: int, hi: int, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        if not self.real:
            return torch.empty(shape, dtype=dtype)
        return torch.randint(lo, hi, shape, device=self.device, dtype=dtype)

    def int6(self, N: int, K: int, packed: bool) -> torch.Tensor:
        from pgolf.kernels.int6_pack import pack_int6

        if not self.real:
            return torch.empty((N, 3 * ((K + 3) // 4)) if packed else (N, K), dtype=torch.uint8 if packed else torch.int8)
        q = self.randint(-31, 32, N, K, dtype=torch.int8)
        return pack_int6(q) if packed else q

    def cu_seqlens(self, total: int) -> torch.Tensor:
        from pgolf.bench.ops.attention import _cu, doc_lengths

        return _cu(doc_lengths(total, seed=0), self.device)


def record_calls(op: str, dtype: torch.dtype, t: Tensors) -> Iterator[tuple[str, Callable[[], None]]]:
    """(label, call) for each record-shape use of ``op`` in ``dtype``; a call runs the op's launcher once."""
    yield from {"mlp": _mlp_calls, "softcap_ce": _ce_calls, "attention": _attention_calls,
                "newton_schulz": _ns_calls, "int6_matmul": _int6_calls}[op](dtype, t)


def _module(name: str):
    import importlib

    return importlib.import_module(f"pgolf.kernels.{name}")


def _mlp_calls(dt, t: Tensors):
    m = _module("mlp")
    for phase, M, backward in (("train", TRAIN_TOKENS, True), ("eval", EVAL_TOKENS, False)):
        def call(M=M, backward=backward):
            post, bits = m.mlp_up_forward(t.randn(M, D_MODEL, dtype=dt), t.randn(HIDDEN, D_MODEL, dtype=dt, scale=0.04),
                                          0.5)
            if backward:
                m.mlp_up_backward(t.randn(M, D_MODEL, dtype=dt), t.randn(D_MODEL, HIDDEN, dtype=dt, scale=0.02), post,
                                  bits, 0.5)
        yield f"{phase} fwd{'+bwd' if backward else ''} M={M} d={D_MODEL} H={HIDDEN}", call


def _ce_calls(dt, t: Tensors):
    ce = _module("softcap_ce")
    rows = ce.chunk_rows(TRAIN_TOKENS, VOCAB)  # the fused head's chunk: what the kernels see in training

    def call(N=rows):
        z, y = t.randn(N, VOCAB, dtype=dt, scale=10.0), t.randint(0, VOCAB, N)
        _, stats = ce.softcap_ce_forward(z, y, 30.0)
        ce.softcap_ce_backward(z, y, stats, t.randn(N, dtype=torch.float32), 30.0)
    yield f"train fused-head chunk N={rows} V={VOCAB}", call
    yield f"eval N={EVAL_TOKENS} V={VOCAB}", lambda: ce.softcap_ce_forward(
        t.randn(EVAL_TOKENS, VOCAB, dtype=dt, scale=10.0), t.randint(0, VOCAB, EVAL_TOKENS), 30.0)


def _attention_calls(dt, t: Tensors):
    xa = _module("xsa_attention")

    def run(B, T, packed, backward):
        q = t.randn(B, T, HEADS, HEAD_DIM, dtype=dt)
        k, v = (t.randn(B, T, KV_HEADS, HEAD_DIM, dtype=dt) for _ in range(2))
        cu = t.cu_seqlens(T) if packed else None
        out, lse, xc = xa._forward(q, k, v, cu, True, stats=backward)  # eval runs the forward-only variant
        if backward:
            xa._backward(t.randn(B, T, HEADS, HEAD_DIM, dtype=dt), q, k, v, out, lse, xc, cu, True)
    yield f"train packed docs T={TRAIN_TOKENS}", lambda: run(1, TRAIN_TOKENS, True, True)
    yield f"train dense B={TRAIN_TOKENS // 2048} T=2048", lambda: run(TRAIN_TOKENS // 2048, 2048, False, True)
    yield "eval sliding B=32 T=2048", lambda: run(32, 2048, False, False)
    yield f"eval doc-isolated T={EVAL_TOKENS}", lambda: run(1, EVAL_TOKENS, True, False)


def _ns_calls(dt, t: Tensors):
    from pgolf.bench.ops.newton_schulz import BANKS, shard
    from pgolf.train.muon import POLAR_EXPRESS_COEFFS

    ns = _module("newton_schulz")
    for label, banks in (("all banks", BANKS), ("8-rank shard", shard(BANKS))):
        for name, (B, m, n) in banks.items():
            # Muon hands NS its fp32 update; the working dtype is the one under test
            yield f"{label} {name} ({B},{m},{n})", lambda B=B, m=m, n=n: ns.launch(
                t.randn(B, m, n, dtype=torch.float32), POLAR_EXPRESS_COEFFS, 5, 1e-7, dt)


def _int6_calls(dt, t: Tensors):
    im = _module("int6_matmul")
    layers = {"qo": (512, 512), "kv": (256, 512), "up": (2048, 512), "down": (512, 2048), "head": (VOCAB, 512)}
    for M in (1, 16, EVAL_TOKENS):
        for packed in (True, False):
            for name, (N, K) in layers.items():
                yield f"M={M} {name} N={N} K={K} {'packed' if packed else 'int8'}", \
                    lambda M=M, N=N, K=K, packed=packed: im.launch(
                        t.randn(M, K, dtype=dt), t.int6(N, K, packed), t.randn(N, dtype=torch.float16, scale=0.01),
                        in_features=K, packed=packed)
