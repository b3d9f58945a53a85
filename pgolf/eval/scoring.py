"""Window scoring, the core of every eval: only the positions that are scored pay for the head.

A batch of windows ``(batch, width)`` runs the model's trunk once (:meth:`GPT.trunk`); the rows whose targets are
scored are gathered, and only those rows go through the final norm, the tied head and the softcapped CE
(:meth:`GPT.rows_nll`, the fused CE kernel on GPU). Every one of those ops is row-wise, so the per-token NLL is
the one ``model.loss(x, y, reduction='none')`` gives at the same position. In sliding eval at window 2048 /
stride 64 a window scores 64 of its 2048 positions: the head runs one row per scored token instead of 32.

Fixed shapes: every batch is ``(batch, width)`` (the last one padded with unscored dummy windows) and gathers
``K`` rows per window: ``K = width`` for a batch holding a window scored from its first position (the plan's
first window), else the plan's largest scored span (the stride). A compiled scorer therefore sees at most two
shapes, and ``cuda_graphs`` replays each as a CUDA graph. :meth:`WindowScorer.warmup` compiles both on random
tokens, outside any timed region (the records warm up the same way).

Forward only: scoring runs under ``torch.no_grad`` in eval mode, so nothing is saved for a backward and the
attention kernel takes its forward-only variant (no log-sum-exp or XSA state written).

A model without ``trunk``/``rows_nll`` (any module with ``loss(x, y, reduction='none')``) is scored through its
``loss`` on every position, which is also what ``gather=False`` does (the previous path, kept for comparison).
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Callable

import torch
from torch import Tensor, nn

from pgolf.data.tokenizer import ByteTables, count_bytes

# cu_seqlens of a doc-isolated batch is padded (by repeating its total) to a multiple of this length, so that a
# compiled model sees only a few distinct shapes.
CU_SEQLENS_MULTIPLE = 64
COMPILE_BACKEND = "inductor"


class WindowScorer:
    """Scores windows of a token stream: Σ nll (float64), Σ bytes and the scored count (int64), on the device.

    ``tables``: the tokenizer's byte tables on the model's device. ``width``: tokens per window; ``batch``: windows
    per forward. ``doc_isolated``: the batch is one ``(1, batch·width)`` row with ``cu_seqlens`` at every window
    start and BOS. ``compile``: ``torch.compile`` the batch function (fixed shapes); ``cuda_graphs``: compile it
    with CUDA graphs (``mode='reduce-overhead'``; CUDA only). ``mixer``: e.g. :class:`pgolf.eval.ngram.NGramMixer`,
    whose ``mix(nll, tokens, targets)`` turns the model's NLL of the scored targets into the final score (it only
    reads; learning is the caller's, after scoring). ``trunk``: the function computing the trunk, default
    ``model.trunk`` (e.g. a LoRA-adapted trunk).
    """

    def __init__(self, model: nn.Module, tables: ByteTables, *, width: int, batch: int, doc_isolated: bool = False,
                 bos_id: int = 1, autocast_dtype: torch.dtype | None = None, gather: bool = True,
                 compile: bool = False, cuda_graphs: bool = False, device: torch.device | None = None,
                 mixer=None, trunk: Callable[[Tensor], Tensor] | None = None):
        if width < 1 or batch < 1:
            raise ValueError(f"need width >= 1 and batch >= 1, got width={width}, batch={batch}")
        self.model, self.tables = model, tables
        self.width, self.batch = width, batch
        self.doc_isolated, self.bos_id, self.autocast_dtype = doc_isolated, bos_id, autocast_dtype
        self.gather = gather and (hasattr(model, "trunk") or trunk is not None) and hasattr(model, "rows_nll")
        self.device = device if device is not None else model_device(model)
        self.mixer = mixer
        self.trunk = trunk if trunk is not None else getattr(model, "trunk", None)
        self.fn: Callable[..., tuple[Tensor, Tensor]] = self._batch_rows
        if cuda_graphs or compile:
            if cuda_graphs and self.device.type != "cuda":
                raise ValueError("cuda_graphs needs the model on a CUDA device (--cuda-graphs: run on a GPU)")
            self.fn = torch.compile(self._batch_rows, dynamic=False, fullgraph=True, backend=COMPILE_BACKEND,
                                    mode="reduce-overhead" if cuda_graphs else None)

    def score(self, tokens: Tensor, starts: Tensor, lengths: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sums over the windows: window i feeds ``tokens[starts[i] : starts[i] + lengths[i]]`` and scores its
        positions ``offsets[i] .. lengths[i] - 1``. tokens: (N + 1,) int64 on the device; the plan: (n,) int64 on
        the CPU (the row count of each batch is chosen there, without a device sync)."""
        sums = [torch.zeros((), dtype=torch.float64, device=self.device),
                torch.zeros((), dtype=torch.int64, device=self.device),
                torch.zeros((), dtype=torch.int64, device=self.device)]
        n = starts.numel()
        if n == 0:
            return tuple(sums)
        self.tables.check_stream(tokens.numel())
        span = lengths - offsets
        rows_cap = gathered_rows(lengths, offsets, self.width)
        for b0 in range(0, n, self.batch):
            s, ln, off = _pad_batch(starts[b0:b0 + self.batch], lengths[b0:b0 + self.batch],
                                    offsets[b0:b0 + self.batch], self.batch, self.width)
            k = self.width if not self.gather or int(span[b0:b0 + self.batch].max()) > rows_cap else rows_cap
            s_dev = s.to(self.device)
            x, y, pos, scored, tpos = self._inputs(tokens, s_dev, ln.to(self.device), off.to(self.device), k)
            with torch.no_grad():
                nll, nbytes = self.fn(x, y, pos, scored, tpos)
                if self.mixer is not None:
                    nll = nll.clone()
                    nll[scored] = self.mixer.mix(nll[scored], tokens, (s_dev[:, None] + pos)[scored])
            sums[0] += nll.sum()
            sums[1] += nbytes.sum()
            sums[2] += scored.sum()
        return tuple(sums)

    def warmup(self, vocab_size: int, rows: int, seed: int = 0) -> float:
        """Run both batch shapes :meth:`score` uses (``rows`` = :func:`gathered_rows` of the plan) on random tokens,
        never validation data: compiles, tunes launch configs, records CUDA graphs. Returns the seconds taken."""
        t0 = time.perf_counter()
        g = torch.Generator(device="cpu").manual_seed(seed)
        tokens = torch.randint(0, vocab_size, (self.width * 2 + 1,), generator=g).to(self.device)
        for k in sorted({self.width, rows}) if self.gather else [self.width]:
            s = torch.zeros(self.batch, dtype=torch.int64)
            ln = torch.full_like(s, self.width)
            off = torch.full_like(s, self.width - k)
            x, y, pos, scored, _ = self._inputs(tokens, s.to(self.device), ln.to(self.device), off.to(self.device), k)
            tpos = torch.zeros_like(pos)  # random tokens have no place in a byte sidecar
            with torch.no_grad():
                for _ in range(3):  # CUDA-graph trees record on the second call and replay from the third
                    self.fn(x, y, pos, scored, tpos)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _inputs(self, tokens: Tensor, s: Tensor, ln: Tensor, off: Tensor, k: int):
        """x, y (batch, width); the gathered positions pos (batch, k), which of them are scored, and their targets'
        positions in ``tokens`` (batch, k) (for a byte sidecar)."""
        ar = torch.arange(self.width, device=self.device)
        last = tokens.numel() - 2  # highest index an input token may have (its target is tokens[last + 1])
        valid = ar[None, :] < ln[:, None]
        idx = torch.where(valid, s[:, None] + ar[None, :], 0).clamp_(max=last)
        x = torch.where(valid, tokens[idx], 0)
        y = torch.where(valid, tokens[idx + 1], 0)
        pos = (ln - k).clamp(min=0)[:, None] + torch.arange(k, device=self.device)[None, :]
        scored = (pos >= off[:, None]) & (pos < ln[:, None])
        pos = pos.clamp_(max=self.width - 1)
        return x, y, pos, scored, idx.gather(1, pos) + 1

    def _batch_rows(self, x: Tensor, y: Tensor, pos: Tensor, scored: Tensor, tpos: Tensor) -> tuple[Tensor, Tensor]:
        """(nll float64, bytes) (batch, k) of the gathered positions of one batch, zero where not scored: the trunk
        on every position, the head on ``pos`` only. tpos: the targets' stream positions (for a byte sidecar)."""
        B, T = x.shape
        xg, yg = x.gather(1, pos), y.gather(1, pos)
        with autocast_for(self.device, self.autocast_dtype):
            kw = {}
            if self.doc_isolated:
                kw = dict(cu_seqlens=window_cu_seqlens(x.reshape(-1), T, self.bos_id), max_seqlen=T)
            inputs, targets = (x.reshape(1, -1), y.reshape(1, -1)) if self.doc_isolated else (x, y)
            if self.gather:
                h = self.trunk(inputs, **kw).reshape(B, T, -1)
                rows = h.gather(1, pos[..., None].expand(-1, -1, h.size(-1)))
                nll = self.model.rows_nll(rows.reshape(-1, rows.size(-1)), yg.reshape(-1)).view(pos.shape)
            else:
                nll = self.model.loss(inputs, targets, reduction="none", **kw).reshape(B, T).gather(1, pos)
        nll = torch.where(scored, nll.to(torch.float64), 0.0)
        nbytes = torch.where(scored, count_bytes(xg, yg, self.tables, tpos), 0)
        return nll, nbytes


def fit_batch(model: nn.Module, width: int, *, doc_isolated: bool = False, autocast_dtype: torch.dtype | None = None,
              vocab_size: int, cap: int = 512, fraction: float = 0.8, default: int = 32) -> int:
    """The largest windows-per-forward (a multiple of 8, at most ``cap``) whose forward fits in ``fraction`` of the
    free GPU memory. Memory grows linearly in the batch: the peaks of forwards at 8 and 16 random-token windows
    (every row through the head, the larger shape) give the fixed and the per-window parts. Not on CUDA:
    ``default``."""
    device = model_device(model)
    if device.type != "cuda":
        return default
    free_before = torch.cuda.mem_get_info(device)[0]
    tables = ByteTables(torch.zeros(vocab_size, dtype=torch.int16), torch.zeros(vocab_size, dtype=torch.bool),
                        torch.zeros(vocab_size, dtype=torch.bool)).to(device)
    peaks = []
    for b in (8, 16):
        scorer = WindowScorer(model, tables, width=width, batch=b, doc_isolated=doc_isolated,
                              autocast_dtype=autocast_dtype, device=device)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        tokens = torch.randint(0, vocab_size, (width + 1,), device=device)
        x, y, pos, scored = scorer._inputs(tokens, torch.zeros(b, dtype=torch.int64, device=device),
                                           torch.full((b,), width, device=device), torch.zeros(b, dtype=torch.int64,
                                                                                               device=device), width)
        with torch.no_grad():
            scorer.fn(x, y, pos, scored)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_window = max(1, (peaks[1] - peaks[0]) // 8)
    fixed = max(0, peaks[0] - 8 * per_window)
    fits = int((fraction * free_before - fixed) // per_window)
    return max(8, min(cap, fits // 8 * 8))


def gathered_rows(lengths: Tensor, offsets: Tensor, width: int) -> int:
    """Rows a batch gathers when none of its windows is scored from its start: the largest scored span of those
    windows (the stride in sliding eval), or ``width`` when every window is scored from its start (plain eval)."""
    later = (lengths - offsets)[offsets > 0]
    return int(later.max()) if later.numel() else width


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def window_cu_seqlens(x_flat: Tensor, width: int, bos_id: int | None, multiple: int = CU_SEQLENS_MULTIPLE) -> Tensor:
    """cu_seqlens (int32) of a flattened batch of windows of ``width`` tokens each.

    Segment starts are every window start (multiples of ``width``) and every position holding ``bos_id``; the
    result ends with the total length and is padded to a multiple of ``multiple`` entries by repeating the total.
    The number of entries is fixed by the batch shape (every position could start a segment), so the function
    traces under ``torch.compile`` without a data-dependent shape.
    """
    total = x_flat.numel()
    if total % width:
        raise ValueError(f"flattened length {total} is not a multiple of the window width {width}")
    pos = torch.arange(total, device=x_flat.device)
    is_start = pos % width == 0
    if bos_id is not None:
        is_start |= x_flat == bos_id
    n = -(-(total + 1) // multiple) * multiple
    slot = torch.where(is_start, torch.cumsum(is_start, 0) - 1, n)
    cu = torch.full((n + 1,), total, dtype=torch.int32, device=x_flat.device)
    cu = cu.scatter(0, slot, pos.to(torch.int32))[:n]
    used = int(is_start.sum()) + 1 if not torch.compiler.is_compiling() else n
    return cu[: -(-used // multiple) * multiple]


def eval_copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """The model with its weights cast to ``dtype`` once (eval only; the caller's model is not changed): under
    autocast every forward would cast the fp32 weights again. None, fp32 or a CPU model: the model itself."""
    if dtype is None or dtype == torch.float32 or model_device(model).type != "cuda":
        return model
    return copy.deepcopy(model).to(dtype)


def _pad_batch(s: Tensor, ln: Tensor, off: Tensor, batch: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Fill a short last batch with dummy windows (start 0, nothing scored) so every forward has one shape."""
    fill = batch - s.numel()
    if fill <= 0:
        return s, ln, off
    return (torch.cat([s, s.new_zeros(fill)]), torch.cat([ln, ln.new_full((fill,), width)]),
            torch.cat([off, off.new_full((fill,), width)]))


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
