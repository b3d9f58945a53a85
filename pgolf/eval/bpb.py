"""Plain validation eval (non-overlapping windows) and the window-scoring core shared with sliding eval.

Both evals score a set of windows over the flattened validation stream ``val_tokens`` (1-D, N + 1 tokens for N
targets). Window ``w`` covers targets ``[start, end)``: the model sees ``x = tokens[start:end]`` and predicts
``y = tokens[start + 1:end + 1]``, and only the positions ``start + offset .. end - 1`` are scored. For every scored
pair ``(x[t], y[t])`` the nll (nats) and the counted bytes (:func:`pgolf.data.tokenizer.count_bytes`) are summed in
float64; ``val_bpb = Σ nll / (ln 2 · Σ bytes)``.

Windows are split contiguously across ranks (rank ``r`` of ``W`` takes windows ``[n·r//W, n·(r+1)//W)``) and the
three sums are all-reduced (SUM) when a process group is running. With ``doc_isolated`` the windows of a batch are
flattened into one ``(1, B·T)`` row and ``cu_seqlens`` marks every window start and every BOS position, so attention
never crosses a window or a document. The windows are scored by :class:`pgolf.eval.scoring.WindowScorer`: trunk on
every position, head and loss on the scored rows only, forward only.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf.data.tokenizer import ByteTables, bits_per_byte
from pgolf.eval.scoring import WindowScorer, eval_copy, model_device


@dataclass
class EvalResult:
    """Outcome of one eval. Sums are over this rank only when ``reduced`` is False and ``world_size`` > 1."""

    val_loss: float  # nats per scored token
    val_bpb: float
    tokens: int  # scored targets
    bytes: int  # counted bytes of the scored targets
    nll_sum: float  # Σ nll in nats (float64)
    seconds: float
    mode: str  # 'plain' | 'sliding'
    seq_len: int  # window length (eval_seq_len)
    stride: int | None  # sliding stride; None for plain eval
    batch: int  # windows per forward
    doc_isolated: bool
    windows: int  # windows in the whole plan (all ranks)
    rank: int
    world_size: int
    reduced: bool  # sums were all-reduced across ranks (or world_size == 1)
    scored_rows_only: bool = True  # the head ran on the scored rows only (False: on every position)
    warmup_s: float = 0.0  # compile/capture warm-up on random tokens, before the timed region (not in seconds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# helpers shared by plain and sliding eval


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    running = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if running else 0
    if world_size is None:
        world_size = dist.get_world_size() if running else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def _rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous share of ``n`` items for ``rank``."""
    return n * rank // world_size, n * (rank + 1) // world_size


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad; the previous training mode is restored afterwards.

    ``torch.no_grad`` rather than ``inference_mode``: tensors a model caches during eval (e.g. rotary tables) would
    otherwise become inference tensors and break a later training step.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _score_plan(model: nn.Module, tokens: Tensor, tables: ByteTables, starts: Tensor, lengths: Tensor,
                offsets: Tensor, *, width: int, batch: int, doc_isolated: bool, bos_id: int,
                autocast_dtype: torch.dtype | None, gather: bool, compile: bool, cuda_graphs: bool,
                vocab_size: int | None) -> tuple[tuple[Tensor, Tensor, Tensor], float, bool]:
    """(sums, warm-up seconds, whether only scored rows went through the head) of a window plan (CPU int64 tensors) with one :class:`WindowScorer`; weights are
    cast to the autocast dtype once. A compiled scorer is warmed up on random tokens first."""
    scorer_model = eval_copy(model, autocast_dtype)
    scorer = WindowScorer(scorer_model, tables, width=width, batch=batch, doc_isolated=doc_isolated, bos_id=bos_id,
                          autocast_dtype=autocast_dtype, gather=gather, compile=compile, cuda_graphs=cuda_graphs,
                          device=tokens.device)
    warm = 0.0
    with _eval_mode(scorer_model):
        if (compile or cuda_graphs) and starts.numel():
            from pgolf.eval.scoring import gathered_rows

            warm = scorer.warmup(vocab_size or int(tokens.max()) + 1, gathered_rows(lengths, offsets, width))
        return scorer.score(tokens, starts, lengths, offsets), warm, scorer.gather


def _finish(nll_sum: Tensor, byte_sum: Tensor, count: Tensor, *, reduce: bool, rank: int, world_size: int,
            t0: float, **settings: Any) -> EvalResult:
    """All-reduce the sums if asked (and world_size > 1), then build the result."""
    sums = torch.stack([nll_sum, byte_sum.to(torch.float64), count.to(torch.float64)])
    reduced = world_size == 1
    if reduce and world_size > 1:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"world_size={world_size} but no torch.distributed process group is running; "
                               f"pass reduce=False to get this rank's partial sums")
        if dist.get_world_size() != world_size:
            raise ValueError(f"world_size={world_size} differs from the process group's {dist.get_world_size()}")
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        reduced = True
    nll, nbytes, ntok = sums.tolist()  # host sync: all queued work is done before the clock is read
    nbytes, ntok = int(round(nbytes)), int(round(ntok))
    if reduced:
        bpb = bits_per_byte(nll, nbytes)
    else:  # a rank's share may be empty
        bpb = nll / (math.log(2.0) * nbytes) if nbytes > 0 else float("nan")
    return EvalResult(val_loss=nll / ntok if ntok > 0 else float("nan"), val_bpb=bpb, tokens=ntok, bytes=nbytes,
                      nll_sum=nll, seconds=time.perf_counter() - t0, rank=rank, world_size=world_size,
                      reduced=reduced, **settings)


def _prepare_tokens(val_tokens: Tensor, device: torch.device) -> Tensor:
    tokens = torch.as_tensor(val_tokens)
    if tokens.dim() != 1:
        raise ValueError(f"val_tokens must be 1-D, got shape {tuple(tokens.shape)}")
    return tokens.to(device=device, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------------
# plain eval


def evaluate(model: nn.Module, val_tokens: Tensor, tables: ByteTables, *, seq_len: int, batch_seqs: int = 8,
             doc_isolated: bool = False, bos_id: int = 1, rank: int | None = None, world_size: int | None = None,
             autocast_dtype: torch.dtype | None = None, reduce: bool = True, compile: bool = False,
             cuda_graphs: bool = False) -> EvalResult:
    """Plain eval over non-overlapping windows of ``seq_len`` targets.

    ``val_tokens`` holds ``k·seq_len + 1`` tokens (a longer tail that does not fill a window is dropped); window
    ``i`` is ``x = tokens[i·seq_len : (i+1)·seq_len]``, ``y`` the same shifted by one, and every target is scored
    with the context inside its window only. ``model.loss(x, y, reduction='none')`` must return the per-token nll in
    nats. ``reduce=False`` skips the all-reduce and returns this rank's partial sums (e.g. to split ranks by hand
    without a process group). ``compile`` / ``cuda_graphs``: see :class:`pgolf.eval.scoring.WindowScorer`; their
    warm-up on random tokens runs before the clock starts (``EvalResult.warmup_s``).
    """
    if seq_len < 1 or batch_seqs < 1:
        raise ValueError(f"need seq_len >= 1 and batch_seqs >= 1, got {seq_len}, {batch_seqs}")
    t0 = time.perf_counter()
    rank, world_size = _resolve_rank(rank, world_size)
    device = model_device(model)
    tokens = _prepare_tokens(val_tokens, device)
    n_windows = max(tokens.numel() - 1, 0) // seq_len
    if n_windows == 0:
        raise ValueError(f"val_tokens has {tokens.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    tables = tables.to(device)
    lo, hi = _rank_slice(n_windows, rank, world_size)
    starts = torch.arange(lo, hi, dtype=torch.int64) * seq_len
    lengths = torch.full_like(starts, seq_len)
    offsets = torch.zeros_like(starts)
    sums, warm, gathered = _score_plan(model, tokens, tables, starts, lengths, offsets, width=seq_len,
                                       batch=batch_seqs, doc_isolated=doc_isolated, bos_id=bos_id,
                                       autocast_dtype=autocast_dtype, gather=True, compile=compile,
                                       cuda_graphs=cuda_graphs, vocab_size=None)
    return _finish(*sums, reduce=reduce, rank=rank, world_size=world_size, t0=t0 + warm, mode="plain",
                   seq_len=seq_len, stride=None, batch=batch_seqs, doc_isolated=doc_isolated, windows=n_windows,
                   scored_rows_only=gathered, warmup_s=warm)
