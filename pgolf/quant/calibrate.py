"""GPTQ calibration: input Hessians ``H = Σ XᵀX / n_cal`` of every Linear layer and of the tied embedding.

Forward hooks on every :class:`torch.nn.Linear` of the model add ``XᵀX`` (fp32) of the layer's input for each
calibration batch; a looped (shared) layer is called several times per forward and every call adds into the same H.
The MLPs are switched to their unfused path during calibration (``mlp.fused = False``) so the down-projection's hook
sees the hidden activation. The tied embedding's Hessian comes from the final norm's output (the LM-head input,
``model.hidden(x)``). Batches must be TRAINING data (reference-stack 5.6): :func:`calibration_batches` draws them
from the training shards with :class:`pgolf.data.loaders.ShuffledLoader`, and every batch passes the compliance
guard :func:`pgolf.compliance_guard.assert_not_validation` (context ``gptq_calibration``; the guard lives below
both :mod:`pgolf.quant` and :mod:`pgolf.eval`, so quantization never imports the evaluation package). With a process
group running, the Hessians are averaged across ranks (each rank reads its own batches).

:func:`generated_batches` is PR #1550's other source: sequences the trained model samples itself (a random first
token, then softmax(logits / temperature) draws, in batches of 8), so no data is read at all.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf.compliance_guard import assert_not_validation

EMBED_KEY = "tok_emb.weight"


def calibration_batches(train_files: Sequence, seq_len: int, tokens_per_batch: int, n_batches: int, *,
                        rank: int = 0, world_size: int = 1, seed: int = 0,
                        vocab_size: int | None = None) -> Iterator[Tensor]:
    """``n_batches`` int64 (B, seq_len) input batches of training windows for this rank (B = tokens // seq_len).

    Rank r reads its own shards (files[r::W]) when there are enough, else all shards with a rank-specific seed.
    With ``vocab_size`` every shard's ids are checked against it as the shard is first read.
    """
    from pgolf.data.loaders import ShuffledLoader

    if tokens_per_batch < seq_len:
        raise ValueError(f"calibration batch of {tokens_per_batch} tokens is shorter than one sequence ({seq_len})")
    files = list(train_files)
    if world_size <= len(files):
        loader = ShuffledLoader(files, seq_len, rank=rank, world_size=world_size, seed=seed, vocab_size=vocab_size)
    else:
        loader = ShuffledLoader(files, seq_len, seed=seed * 131 + rank, vocab_size=vocab_size)
    for _ in range(n_batches):
        yield loader.next_batch(tokens_per_batch // seq_len)[0]


@torch.no_grad()
def generated_batches(model: nn.Module, n_seqs: int, seq_len: int, *, temperature: float = 0.8,
                      batch_size: int = 8, seed: int = 0, device: torch.device | None = None,
                      autocast_dtype: torch.dtype | None = None) -> list[Tensor]:
    """``n_seqs`` int64 (1, seq_len) sequences sampled from ``model`` (eval mode, looping as it is now).

    Each batch of ``batch_size`` starts from uniformly random tokens and grows by one token per forward (the
    records' way: no KV cache), sampling from softmax(logits[:, -1] / temperature) with a generator seeded by
    ``seed``."""
    if not temperature > 0:
        raise ValueError(f"generation temperature must be positive, got {temperature}")
    device = device or next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    try:
        for start in range(0, n_seqs, batch_size):
            ids = torch.randint(0, vocab, (min(batch_size, n_seqs - start), 1), generator=gen, device=device)
            for _ in range(seq_len - 1):
                ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
                with ctx:
                    logits = model.forward_logits(ids)[:, -1].float()
                nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen)
                ids = torch.cat((ids, nxt), dim=1)
            out.extend(row.unsqueeze(0) for row in ids)
    finally:
        model.train(was_training)
    return out


@contextlib.contextmanager
def _unfused_mlps(model: nn.Module) -> Iterator[None]:
    saved = [(m, m.fused) for m in model.modules() if hasattr(m, "fused")]
    for m, _ in saved:
        m.fused = False
    try:
        yield
    finally:
        for m, f in saved:
            m.fused = f


@torch.no_grad()
def collect_hessians(model: nn.Module, batches: Iterable[Tensor], *, device: torch.device | None = None,
                     autocast_dtype: torch.dtype | None = None, looping: bool | None = None,
                     reduce: bool = True) -> tuple[dict[str, Tensor], int]:
    """({weight name: H (K, K) fp32}, n_cal) over ``batches`` of input ids; H = Σ XᵀX / n_cal.

    Keys are parameter names (``blocks.0.attn.c_q.weight`` ...; ``tok_emb.weight`` from the final-norm output).
    ``looping`` sets ``model.looping_active`` for the passes (None: on when the model has loops).
    """
    device = device or next(model.parameters()).device
    hess: dict[str, Tensor] = {}
    handles = []
    last: list = [None, None]  # (input tensor, its XᵀX): Q, K and V read the same input, computed once

    def make_hook(key: str):
        def hook(mod, inputs, output):
            x = inputs[0]
            if last[0] is not x:
                xf = x.detach().reshape(-1, x.shape[-1]).float()
                last[0], last[1] = x, xf.t() @ xf
            h = hess.get(key)
            if h is None:
                hess[key] = last[1].clone()
            else:
                h += last[1]
        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(make_hook(f"{name}.weight")))
    was_training = model.training
    prev_loop = getattr(model, "looping_active", None)
    if looping is None:
        looping = bool(getattr(getattr(model, "config", None), "has_recurrence", False))
    n_cal = 0
    model.eval()
    try:
        if prev_loop is not None:
            model.looping_active = looping
        with _unfused_mlps(model):
            for i, x in enumerate(batches):
                assert_not_validation(x, context="gptq_calibration", step=i)
                x = x.to(device=device, dtype=torch.int64)
                ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
                with ctx:
                    h = model.hidden(x)
                h = h.reshape(-1, h.shape[-1]).float()
                e = hess.get(EMBED_KEY)
                if e is None:
                    e = hess[EMBED_KEY] = torch.zeros(h.shape[1], h.shape[1], dtype=torch.float32, device=h.device)
                e.addmm_(h.t(), h)
                n_cal += 1
    finally:
        last[0] = last[1] = None
        for hd in handles:
            hd.remove()
        model.train(was_training)
        if prev_loop is not None:
            model.looping_active = prev_loop
    if n_cal == 0:
        raise ValueError("GPTQ calibration got no batches")
    world = dist.get_world_size() if (reduce and dist.is_available() and dist.is_initialized()) else 1
    for key in sorted(hess):
        h = hess[key]
        if world > 1:
            dist.all_reduce(h)
        h /= n_cal * world
    return hess, n_cal * world


def timed_calibration(model: nn.Module, batches: Iterable[Tensor], **kw) -> tuple[dict[str, Tensor], int, float]:
    """:func:`collect_hessians` plus its wall time in seconds (device synchronized)."""
    dev = kw.get("device") or next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    hess, n = collect_hessians(model, batches, **kw)
    sync()
    return hess, n, time.perf_counter() - t0


__all__ = ["EMBED_KEY", "calibration_batches", "collect_hessians", "generated_batches", "timed_calibration"]
