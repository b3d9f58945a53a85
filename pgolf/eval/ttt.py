"""Legal score-first test-time training (reference-stack 5.3-5.6), every step checked by a :class:`Ledger`.

Entry point: :func:`run_ttt` ``(model, val_tokens, tables, *, mode='chunk'|'lora'|'phased', settings, ledger,
rank, world_size, log) -> TTTResult``. The model is adapted IN PLACE (chunk and phased modes change its weights).

- ``chunk`` (R1/R3): the stream is cut into chunks of ``chunk_tokens`` targets; every sliding window (``window``,
  ``stride`` exactly as :func:`pgolf.eval.evaluate_sliding`) belongs to the chunk holding its first scored target.
  Chunk c: (a) its windows are scored under no-grad (windows split contiguously across ranks); (b) unless c is the
  last chunk, the model trains on the chunk's contiguous ``seq_len`` sequences (split across ranks) for ``epochs``
  SGD steps (momentum 0.9, one optimizer for the whole run, ``lr_c = lr·½(1+cos(π c/(C−1)))``, gradients averaged
  across ranks then clipped to ``grad_clip``; all parameters or those matching ``params`` patterns).
- ``lora`` (R4): documents are the spans between BOS tokens (target d's range is ``[start_d, start_{d+1})``: its
  inputs are the document itself, its last target is the next document's BOS). Documents go in validation order,
  ``lora_batch_docs`` per batch, each with fresh batched LoRA adapters (A from one seeded U(±1/√in) draw shared
  by every document, B = 0, output × α/r) on Q, K, V, O, the MLP of every virtual layer slot and on the LM head.
  Each document is read in chunks of ``lora_chunk`` targets; chunk i is scored from one forward over the last
  ≤ ``lora_window`` tokens of the document ending at the chunk's end, then, if the document has later chunks, one
  AdamW step on the sum over documents of each document's mean chunk loss. No state crosses documents: adapters
  and optimizer state are per-row, the initial A is the same for every document, the base model is frozen.
  The LoRA path is the model's OWN forward with the adapters attached by module hooks (``c_q``/``c_k``/``c_v``
  outputs, the attention output, the MLP output), so every gate and smear of the model is necessarily there.
- ``phased`` (R5/R6): ``lora`` plus, when the number of fully scored documents crosses each of the ``phases``
  cumulative boundaries ⌊P·k/phases⌋ of ``phase_prefix_docs`` = P, global SGD on the base weights over the
  concatenated tokens of the first ``boundary`` documents (all scored: documents go in order), chunks of
  ``phase_chunk_tokens``, ``phase_epochs``, document-isolated attention, cosine LR over chunks, last chunk skipped.

Distributed: chunk mode splits windows and sequences contiguously across ranks; lora/phased hand batch j to rank
``j mod W`` in lock-step rounds. A process group is required when world_size > 1 (gradients are all-reduced).
"""

from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf import kernels
from pgolf.data.tokenizer import ByteTables, bits_per_byte, count_bytes
from pgolf.eval.bpb import _eval_mode, _rank_slice, _resolve_rank
from pgolf.eval.scoring import WindowScorer, autocast_for, model_device, window_cu_seqlens
from pgolf.model.gpt import rms_norm
from pgolf.eval.ledger import ComplianceViolation, Ledger, LedgerSummary, set_active_ledger, strip_validation
from pgolf.eval.sliding import _plan_tensors

MODES = ("chunk", "lora", "phased", "lora_sliding")
OPTIMIZERS = ("sgd", "adamw", "muon")
LORA_SITES = ("q", "k", "v", "o", "mlp", "head")


@dataclass
class TTTSettings:
    """All TTT knobs (record defaults). ``TTTSettings.from_dict`` / ``replace`` for CLI overrides."""

    # scoring windows (chunk mode; exactly evaluate_sliding's plan)
    window: int = 2048
    stride: int = 64
    batch_windows: int = 32
    doc_isolated: bool = False
    autocast_dtype: Any = None  # None | torch.bfloat16 | 'bf16' | 'fp16'
    # chunk mode
    chunk_tokens: int = 32_768
    epochs: int = 3
    lr: float = 0.005
    optimizer: str = "sgd"  # 'sgd' (momentum) | 'adamw' (#490) | 'muon' (#1148: NS-orthogonalized grads, no momentum)
    momentum: float = 0.9
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    ns_steps: int = 3  # muon: Newton-Schulz steps (classic coefficients)
    lr_floor: float = 0.0  # cosine over chunks floored at this fraction of lr (#490's root script: 0.1)
    block_lr: tuple[float, float] | None = None  # (first, last) LR multipliers over blocks, e.g. #1406's (0.3, 1.0)
    entropy_epochs: bool = False  # #1148: epochs ± 1 from the chunk's mean NLL of its scored tokens
    entropy_high: float = 2.1  # nats: above, epochs + 1
    entropy_low: float = 1.75  # nats: below, max(epochs − 1, 1)
    entropy_guard_s: float = 0.0  # after this many seconds of TTT no extra epoch (#1148: 0.85 × 570); 0 = off
    grad_clip: float = 1.0
    seq_len: int = 2048
    micro_batch_seqs: int = 0  # sequences per forward when training (0: all of a rank's share at once)
    params: tuple[str, ...] = ()  # fnmatch patterns of trainable parameter names; () = all parameters
    train_doc_isolated: bool = False
    # lora / phased
    lora_rank: int = 96
    lora_alpha: float = 144.0
    lora_chunk: int = 48
    lora_window: int = 2048
    lora_lr: float = 1e-4
    lora_beta1: float = 0.0
    lora_beta2: float = 0.999
    lora_eps: float = 1e-10
    lora_wd: float = 0.5
    lora_batch_docs: int = 64
    lora_sites: tuple[str, ...] = LORA_SITES
    phase_prefix_docs: int = 2500
    phases: int = 3
    phase_lr: float = 0.001
    phase_momentum: float = 0.9
    phase_chunk_tokens: int = 32_768
    phase_seq_len: int = 2048
    phase_epochs: int = 1
    # lora_sliding (#1499): one adapter over the sliding windows, an AdamW step per scored batch, reset periodically
    slide_lora_rank: int = 8
    slide_lora_sites: tuple[str, ...] = ("q", "v")
    slide_lora_lr: float = 3e-4
    slide_lora_init_std: float = 0.01  # A ~ N(0, std²), B = 0, no α/r scale
    slide_lora_reset: int = 8  # batches between resets of the adapter and its optimizer
    # n-gram cache mixture (#1499, normalized): the chunk mode scores through it and learns each scored chunk
    ngram: bool = False
    ngram_orders: tuple[int, ...] = (2, 3, 4, 5, 6, 7)
    ngram_alpha: float = 0.3  # α_max
    ngram_kappa: float = 4.0  # the context count at which α = α_max / 2
    ngram_min_count: int = 1
    ngram_weighting: str = "normalized"  # 'record': #1499's token-dependent α (not a distribution): study only
    ngram_prefill_tokens: int = 2_000_000  # of the training tokens given to run_ttt (#1499: the first 2 M)
    ngram_shared: bool = False  # every rank learns every chunk (one cache); default: each its own share (#1499)
    study: bool = False  # allow the illegal variants (for study: the compliance report says FAIL)
    temperature: float = 1.0  # divides the softcapped logits in scoring and training (#490: 0.98)
    weights_dtype: str | None = None  # 'bf16': adapt and score a bf16 copy of the weights (#490's eval model)
    slide_temperature: float = 1.0  # lora_sliding: after the adapter's first update since a reset (#1499: 0.98)
    # misc
    compile: bool = False  # torch.compile the chunk-mode adaptation step (fixed shapes), warmed up on random tokens
    seed: int = 0
    probes: bool = True  # normalization + causality probes (their time counts as eval time)
    probe_tokens: int = 128
    bos_id: int | None = None  # default: model.config.bos_id, else 1

    def replace(self, **kw: Any) -> "TTTSettings":
        d = asdict(self)
        d.update(kw)
        return TTTSettings.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TTTSettings":
        from pgolf.utils import check_fields

        check_fields(cls, d, "TTT settings")
        d = dict(d)
        for k in ("params", "lora_sites", "ngram_orders", "slide_lora_sites"):
            if k in d and d[k] is not None:
                d[k] = (d[k],) if isinstance(d[k], str) else tuple(d[k])
        for k in ("adam_betas", "block_lr"):
            if k in d and d[k] is not None:
                d[k] = tuple(float(v) for v in d[k])
        s = cls(**d)
        s.validate()
        return s

    def validate(self) -> None:
        problems = []
        for name in ("window", "stride", "batch_windows", "chunk_tokens", "seq_len", "lora_rank", "lora_chunk",
                     "lora_window", "lora_batch_docs", "phase_chunk_tokens", "phase_seq_len", "phases"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.stride > self.window:
            problems.append("stride must be <= window")
        if self.epochs < 0 or self.phase_epochs < 0 or self.phase_prefix_docs < 0:
            problems.append("epochs, phase_epochs and phase_prefix_docs must be >= 0")
        if self.epochs > 0 and self.chunk_tokens < self.seq_len:
            problems.append(f"chunk_tokens {self.chunk_tokens} < seq_len {self.seq_len}: no chunk holds a training "
                            f"sequence (use epochs=0 for no training)")
        if self.phase_chunk_tokens < self.phase_seq_len:
            problems.append(f"phase_chunk_tokens {self.phase_chunk_tokens} < phase_seq_len {self.phase_seq_len}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} not in {OPTIMIZERS}")
        if not 0.0 <= self.lr_floor <= 1.0:
            problems.append(f"lr_floor must be in [0, 1], got {self.lr_floor}")
        if self.block_lr is not None and (len(self.block_lr) != 2 or min(self.block_lr) < 0):
            problems.append(f"block_lr must be two multipliers >= 0 (first block, last block), got {self.block_lr}")
        if self.entropy_low > self.entropy_high:
            problems.append(f"entropy_low {self.entropy_low} > entropy_high {self.entropy_high}")
        if self.ns_steps < 1:
            problems.append("ns_steps must be >= 1")
        if self.ngram_weighting == "record" and not self.study:
            problems.append("ngram_weighting='record' (#1499's alpha from the scored token's own NLL) is not a "
                            "normalized distribution (condition 2): it runs only with study=True")
        if self.ngram and (not self.ngram_orders or min(self.ngram_orders) < 2):
            problems.append(f"ngram_orders must all be >= 2, got {self.ngram_orders}")
        if self.temperature <= 0 or self.slide_temperature <= 0:
            problems.append("temperature and slide_temperature must be > 0")
        if self.weights_dtype not in (None, "bf16", "fp32"):
            problems.append(f"weights_dtype must be None, 'bf16' or 'fp32', got {self.weights_dtype!r}")
        if self.slide_lora_rank < 1 or self.slide_lora_reset < 1:
            problems.append("slide_lora_rank and slide_lora_reset must be >= 1")
        bad_sites = sorted((set(self.lora_sites) | set(self.slide_lora_sites)) - set(LORA_SITES))
        if bad_sites:
            problems.append(f"lora_sites {bad_sites} not in {LORA_SITES}")
        if problems:
            raise ValueError("invalid TTTSettings: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["autocast_dtype"] = None if self.autocast_dtype is None else str(self.autocast_dtype)
        return d


@dataclass
class TTTResult:
    """Outcome of :func:`run_ttt` (sums all-reduced over ranks)."""

    mode: str
    val_loss: float
    val_bpb: float
    tokens: int
    bytes: int
    nll_sum: float
    seconds: float  # wall time of run_ttt (scoring + adaptation + probes + ledger)
    timings: dict[str, float]
    adapt_steps: int
    ledger: LedgerSummary
    probes: dict[str, Any]
    settings: dict[str, Any]
    rank: int
    world_size: int
    n_chunks: int | None = None
    n_docs: int | None = None
    doc_nll: Tensor | None = field(default=None, repr=False)  # lora/phased: per-document nll (this rank's docs)

    @property
    def ledger_overhead_fraction(self) -> float:
        return self.ledger.overhead_seconds / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("doc_nll", "ledger")}
        d["ledger"] = self.ledger.to_dict()
        d["ledger_overhead_fraction"] = self.ledger_overhead_fraction
        return d


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _autocast_dtype(x: Any) -> torch.dtype | None:
    if x is None or isinstance(x, torch.dtype):
        return x
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "torch.bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "torch.float16": torch.float16, "none": None}
    try:
        return names[str(x).lower()]
    except KeyError:
        raise ValueError(f"autocast_dtype must be None, 'bf16' or 'fp16', got {x!r}") from None


def _dist_running(world_size: int) -> bool:
    if world_size == 1:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"TTT with world_size={world_size} needs a running torch.distributed process group "
                           f"(gradients and the ledger are all-reduced)")
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} differs from the process group's {dist.get_world_size()}")
    return True


def _allreduce_grads_avg(params: Sequence[nn.Parameter], world_size: int) -> None:
    """Average gradients across ranks in one flat buffer (missing grads count as zeros)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world_size == 1 or not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    off = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[off: off + n].view_as(p))
        off += n


def select_params(model: nn.Module, patterns: Sequence[str] = ()) -> list[tuple[str, nn.Parameter]]:
    """Named parameters matching any fnmatch pattern (all when ``patterns`` is empty). Raises if none match."""
    named = list(model.named_parameters())
    if not patterns:
        return named
    out = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    if not out:
        raise ValueError(f"no parameter matches {list(patterns)}; names look like {[n for n, _ in named[:4]]}")
    return out


class _TrainableOnly:
    """Context: only ``params`` require grad; the previous flags are restored on exit."""

    def __init__(self, model: nn.Module, params: Iterable[nn.Parameter]):
        self.model, self.keep = model, {id(p) for p in params}

    def __enter__(self):
        self.prev = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.prev:
            p.requires_grad_(id(p) in self.keep)
        return self

    def __exit__(self, *exc):
        for p, flag in self.prev:
            p.requires_grad_(flag)
        return False


class _NoStep:
    """An optimizer stand-in for warm-ups: gradients are computed, nothing is updated."""

    param_groups: list = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


def _ngram_mixer(s: "TTTSettings", ledger: Ledger, device: torch.device, prefill: Tensor | None):
    """The n-gram mixture of the settings, pre-filled from the first ``ngram_prefill_tokens`` of ``prefill`` (training
    tokens: the guard refuses validation data)."""
    from pgolf.compliance_guard import assert_not_validation
    from pgolf.eval.ngram import NGramCache, NGramMixer

    cache = NGramCache(s.ngram_orders, device)
    if prefill is not None and s.ngram_prefill_tokens > 0:
        assert_not_validation(prefill, context="ngram_prefill")
        cache.prefill(strip_validation(prefill)[: s.ngram_prefill_tokens + 1])
    return NGramMixer(cache, alpha=s.ngram_alpha, kappa=s.ngram_kappa, min_count=s.ngram_min_count,
                      weighting=s.ngram_weighting, ledger=ledger)


def _compiled(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` under ``torch.compile`` (fixed shapes, one graph), with the eval scorer's backend."""
    from pgolf.eval import scoring

    return torch.compile(fn, dynamic=False, fullgraph=True, backend=scoring.COMPILE_BACKEND)


def cosine_lr(lr0: float, c: int, n_chunks: int, floor: float = 0.0) -> float:
    """lr_c = lr0 · max(½(1 + cos(π c / (C − 1))), floor) (lr0 when C == 1)."""
    if n_chunks <= 1:
        return lr0
    return lr0 * max(0.5 * (1.0 + math.cos(math.pi * c / (n_chunks - 1))), floor)


def make_optimizer(model: nn.Module, named: Sequence[tuple[str, nn.Parameter]], s: "TTTSettings"
                   ) -> torch.optim.Optimizer:
    """The chunk-mode optimizer over ``named`` parameters: SGD with momentum, AdamW, or Muon-NS; with ``block_lr``
    one parameter group per block (every parameter of block i scaled by first + (last − first)·i/(n − 1)), else one
    group. Each group's ``lr_scale`` multiplies the step's learning rate."""
    groups: dict[float, list[nn.Parameter]] = {}
    n_blocks = len(getattr(model, "blocks", ()))
    for name, p in named:
        groups.setdefault(block_scale(name, n_blocks, s.block_lr), []).append(p)
    param_groups = [{"params": ps, "lr_scale": k} for k, ps in groups.items()]
    if s.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=s.lr, betas=s.adam_betas, weight_decay=s.weight_decay)
    if s.optimizer == "muon":
        return MuonNS(param_groups, lr=s.lr, steps=s.ns_steps)
    return torch.optim.SGD(param_groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def block_scale(name: str, n_blocks: int, block_lr: tuple[float, float] | None) -> float:
    """LR multiplier of parameter ``name``: its block's place between block_lr's ends, 1.0 outside blocks."""
    if block_lr is None or not name.startswith("blocks.") or n_blocks < 1:
        return 1.0
    i = int(name.split(".")[1])
    first, last = block_lr
    return first + (last - first) * (i / (n_blocks - 1) if n_blocks > 1 else 1.0)


class MuonNS(torch.optim.Optimizer):
    """#1148's TTT update: each matrix gradient orthogonalized by ``steps`` Newton-Schulz steps (classic
    coefficients, Frobenius-normalized, through :func:`pgolf.kernels.newton_schulz`), vectors raw; ``p −= lr·g``.
    No momentum, no weight decay, no shape scale."""

    def __init__(self, params, lr: float, steps: int = 3):
        super().__init__(params, dict(lr=lr, steps=steps))

    @torch.no_grad()
    def step(self, closure=None):
        from pgolf import kernels
        from pgolf.train.muon import CLASSIC_COEFFS

        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.ndim >= 2:
                    g = kernels.newton_schulz(g.reshape(g.shape[0], -1), CLASSIC_COEFFS, group["steps"]).view_as(p)
                p.add_(g.to(p.dtype), alpha=-group["lr"])


def _sgd_step(model: nn.Module, params: list[nn.Parameter], opt: torch.optim.Optimizer, tokens: Tensor,
              seq_starts: Sequence[int], seq_len: int, *, lr: float, clip: float, world_size: int,
              micro: int, doc_isolated: bool, bos_id: int, autocast_dtype,
              loss_fn: Callable[..., Tensor] | None = None) -> float:
    """One optimizer step on this rank's sequences ``tokens[s : s+L]`` → ``tokens[s+1 : s+L+1]`` (gradients
    averaged across ranks, clipped). ``loss_fn``: ``model.loss`` or a compiled form of it. Returns this rank's mean
    loss (nan for an empty share)."""
    loss_fn = loss_fn or model.loss
    device = tokens.device
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    opt.zero_grad(set_to_none=True)
    n = len(seq_starts)
    loss_sum = 0.0
    ar = torch.arange(seq_len, device=device)
    micro = micro or max(n, 1)
    model.train()
    for b0 in range(0, n, micro):
        s = torch.as_tensor(list(seq_starts[b0:b0 + micro]), device=device, dtype=torch.int64)
        idx = s[:, None] + ar[None, :]
        x, y = tokens[idx], tokens[idx + 1]
        with autocast_for(device, autocast_dtype):
            if doc_isolated:
                xf = x.reshape(1, -1)
                cu = window_cu_seqlens(xf[0], seq_len, bos_id)
                loss = loss_fn(xf, y.reshape(1, -1), cu_seqlens=cu, max_seqlen=seq_len, reduction="sum")
            else:
                loss = loss_fn(x, y, reduction="sum")
        (loss.float() / (n * seq_len)).backward()
        loss_sum += float(loss.detach())
    _allreduce_grads_avg(params, world_size)
    if clip and clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return loss_sum / (n * seq_len) if n else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# chunked score-first TTT


class ChunkTTT:
    """Score-first chunked TTT. :meth:`run` is ``for c: score_chunk(c); train_chunk(c) (not the last)``; with
    ``ngram`` the chunk's windows are scored through the n-gram mixture, and the cache learns the targets this rank
    scored in the chunk (``ngram_shared``: the whole chunk, every rank) before the next chunk is scored.

    :meth:`score_chunk` and :meth:`train_chunk` report to the ledger, so any other order of calls (training before
    scoring, several epochs over the stream first, scoring twice) raises :class:`ComplianceViolation`.
    """

    def __init__(self, model: nn.Module, tokens: Tensor, tables: ByteTables, settings: TTTSettings, ledger: Ledger,
                 *, rank: int, world_size: int, log: Callable[[str], None] = print, prefill: Tensor | None = None):
        self.model, self.s, self.ledger, self.log = model, settings, ledger, log
        self.rank, self.world_size = rank, world_size
        self.device = tokens.device
        self.tokens = tokens
        self.tables = tables.to(self.device)
        self.N = tokens.numel() - 1
        self.bos_id = settings.bos_id
        self.amp = _autocast_dtype(settings.autocast_dtype)
        starts, ends, offsets = _plan_tensors(self.N, settings.window, settings.stride)
        self.starts, self.ends, self.offsets = starts, ends, offsets
        self.first = starts + offsets  # first scored target of each window (cpu int64)
        S = settings.chunk_tokens
        self.n_chunks = max(1, -(-self.N // S))
        chunk_of = self.first // S
        self.bounds = torch.searchsorted(chunk_of, torch.arange(self.n_chunks + 1)).tolist()
        self.width = min(settings.window, self.N)
        self.scorer = WindowScorer(model, self.tables, width=self.width, batch=settings.batch_windows,
                                   doc_isolated=settings.doc_isolated, bos_id=self.bos_id, autocast_dtype=self.amp,
                                   device=self.device)
        self.mixer = _ngram_mixer(settings, ledger, self.device, prefill) if settings.ngram else None
        self.scorer.mixer = self.mixer
        named = select_params(model, settings.params)
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.opt = make_optimizer(model, named, settings)  # one optimizer for the whole pass, as the records
        self.loss_fn = _compiled(model.loss) if settings.compile else model.loss
        self.sums = [torch.zeros((), dtype=torch.float64, device=self.device),
                     torch.zeros((), dtype=torch.int64, device=self.device),
                     torch.zeros((), dtype=torch.int64, device=self.device)]
        self.timings = {"score_s": 0.0, "adapt_s": 0.0}
        self.steps = 0
        self.chunk_sums = (torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64))
        self.epoch_plan: list[int] = []  # epochs trained per chunk (entropy-adaptive or fixed)
        self.t_run = time.perf_counter()

    def warmup(self) -> float:
        """Compile the adaptation step on random tokens (forward + backward, no optimizer step, gradients dropped);
        seconds. Never reads validation data: the records' compile warm-up, outside the timed region."""
        t0 = time.perf_counter()
        s = self.s
        vocab = int(getattr(getattr(self.model, "config", None), "vocab_size", int(self.tokens.max()) + 1))
        g = torch.Generator().manual_seed(s.seed)
        n = s.micro_batch_seqs or max(1, len(self.chunk_sequences(0)) // self.world_size)
        fake = torch.randint(0, vocab, (n * s.seq_len + 1,), generator=g).to(self.device)
        with _TrainableOnly(self.model, self.params):
            self.model.train()
            for _ in range(2):
                _sgd_step(self.model, self.params, _NoStep(), fake, [j * s.seq_len for j in range(n)], s.seq_len,
                          lr=0.0, clip=0.0, world_size=1, micro=s.micro_batch_seqs, doc_isolated=s.train_doc_isolated,
                          bos_id=self.bos_id, autocast_dtype=self.amp, loss_fn=self.loss_fn)
        for p in self.params:
            p.grad = None
        return time.perf_counter() - t0

    def chunk_targets(self, c: int) -> tuple[int, int]:
        """Targets ``[lo, hi)`` the windows of chunk ``c`` score (all ranks)."""
        w0, w1 = self.bounds[c], self.bounds[c + 1]
        if w1 <= w0:
            return 0, 0
        return int(self.first[w0]), int(self.ends[w1 - 1])

    def score_chunk(self, c: int) -> None:
        t0 = time.perf_counter()
        w0, w1 = self.bounds[c], self.bounds[c + 1]
        lo, hi = _rank_slice(w1 - w0, self.rank, self.world_size)
        lo, hi = w0 + lo, w0 + hi
        if hi > lo:
            t_lo, t_hi = int(self.first[lo]), int(self.ends[hi - 1])
            # the ledger first: a rescoring raises before the forward runs
            self.ledger.score(t_lo, t_hi, label=f"chunk_score:{c}")
            with _eval_mode(self.model):
                nll, nbytes, cnt = self.scorer.score(self.tokens, self.starts[lo:hi],
                                                     (self.ends - self.starts)[lo:hi], self.offsets[lo:hi])
            if int(cnt) != t_hi - t_lo:
                raise ComplianceViolation("scoring_mismatch", f"chunk {c} scored {int(cnt)} targets but its windows "
                                          f"cover {t_hi - t_lo}", position=t_lo, step=self.ledger.event)
            self.sums[0] += nll
            self.sums[1] += nbytes
            self.sums[2] += cnt
            self.chunk_sums = (nll.detach(), cnt.detach())
            self.own_targets = (t_lo, t_hi)
        else:
            self.chunk_sums = (torch.zeros((), dtype=torch.float64, device=self.device),
                               torch.zeros((), dtype=torch.int64, device=self.device))
            self.own_targets = (0, 0)
        if self.world_size > 1 and w1 > w0:
            self.ledger.sync(*self.chunk_targets(c))
        self.timings["score_s"] += time.perf_counter() - t0

    def chunk_sequences(self, c: int, seq_len: int | None = None) -> list[int]:
        """Start token positions of chunk ``c``'s contiguous training sequences (all ranks)."""
        L = seq_len or self.s.seq_len
        S = self.s.chunk_tokens
        c0, c1 = c * S, min((c + 1) * S, self.N)
        return [c0 + j * L for j in range(max(0, c1 - c0) // L)]

    def chunk_epochs(self, c: int) -> int:
        """Epochs for chunk ``c``: ``epochs``, or with ``entropy_epochs`` one more when the chunk's mean NLL (of its
        scored targets, all ranks) is above ``entropy_high`` and one fewer (at least 1) below ``entropy_low``;
        past ``entropy_guard_s`` of TTT never more than ``epochs``. The ledger checks the chunk was scored first."""
        s = self.s
        if not s.entropy_epochs:
            return s.epochs
        lo, hi = self.chunk_targets(c)
        if hi > lo:
            self.ledger.assert_scored(lo, hi, label=f"entropy_epochs:chunk={c}")
        sums = torch.stack([self.chunk_sums[0].to(torch.float64), self.chunk_sums[1].to(torch.float64)])
        if self.world_size > 1:  # the same decision on every rank
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        nll, n = sums.tolist()
        mean = nll / n if n else 0.0
        epochs = s.epochs + 1 if mean > s.entropy_high else max(s.epochs - 1, 1) if mean < s.entropy_low else s.epochs
        if s.entropy_guard_s and time.perf_counter() - self.t_run > s.entropy_guard_s:
            epochs = min(epochs, s.epochs)
        return epochs

    def train_chunk(self, c: int, *, epochs: int | None = None) -> None:
        t0 = time.perf_counter()
        s = self.s
        seqs = self.chunk_sequences(c)
        epochs = self.chunk_epochs(c) if epochs is None else epochs
        self.epoch_plan.append(epochs)
        lr = cosine_lr(s.lr, c, self.n_chunks, s.lr_floor)
        if not seqs or epochs <= 0:
            return
        lo, hi = _rank_slice(len(seqs), self.rank, self.world_size)
        mine = seqs[lo:hi]
        ranges = [(seqs[0], seqs[-1] + s.seq_len)]  # every rank's update reads every rank's sequences
        with _TrainableOnly(self.model, self.params):
            for e in range(epochs):
                self.ledger.adapt(ranges, label=f"chunk_{s.optimizer}:chunk={c} epoch={e}", collective=True)
                _sgd_step(self.model, self.params, self.opt, self.tokens, mine, s.seq_len, lr=lr, clip=s.grad_clip,
                          world_size=self.world_size, micro=s.micro_batch_seqs, doc_isolated=s.train_doc_isolated,
                          bos_id=self.bos_id, autocast_dtype=self.amp, loss_fn=self.loss_fn)
                self.steps += 1
        self.timings["adapt_s"] += time.perf_counter() - t0

    def run(self, after_first_chunk: Callable[[], None] | None = None) -> None:
        """Score chunk c, then train on it (not the last). ``after_first_chunk`` runs once chunk 0 is scored and
        before any training (the normalization/causality probe of the un-adapted model)."""
        self.t_run = time.perf_counter()
        for c in range(self.n_chunks):
            self.score_chunk(c)
            if c == 0 and after_first_chunk is not None:
                after_first_chunk()
            if c < self.n_chunks - 1:
                self.train_chunk(c)
                if self.mixer is not None and self.s.ngram_shared:
                    self.mixer.update(self.tokens, *self.chunk_targets(c), collective=self.world_size > 1)
                elif self.mixer is not None:
                    self.mixer.update(self.tokens, *self.own_targets)


# ----------------------------------------------------------------------------------------------------------------
# batched per-document LoRA


def virtual_slots(model: nn.Module) -> list[int]:
    """Physical layer index of each virtual layer slot, in call order (looping as the model has it now)."""
    enc, dec = model.config.layer_plan(model.looping_active)
    return list(enc) + list(dec)


class DocLoRA(nn.Module):
    """Batched LoRA adapters for ``n`` documents: for each virtual slot and site (q, k, v, o, mlp) and for the head,
    ``A (n, r, in)`` and ``B (n, out, r)``; ``delta(u) = (u Aᵀ) Bᵀ · α/r``. ``a_init`` maps a key to the shared
    initial A (1, r, in); B starts at zero."""

    def __init__(self, model: nn.Module, n: int, rank: int, alpha: float, sites: Sequence[str],
                 a_init: dict[str, Tensor]):
        super().__init__()
        c = model.config
        self.scale = alpha / rank
        self.sites = tuple(sites)
        self.slots = virtual_slots(model)
        dims = {"q": (c.model_dim, c.model_dim), "k": (c.model_dim, c.kv_dim), "v": (c.model_dim, c.kv_dim),
                "o": (c.model_dim, c.model_dim), "mlp": (c.model_dim, c.model_dim),
                "head": (c.model_dim, c.vocab_size)}
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for key in self.keys():
            site = key.split("_")[-1]
            din, dout = dims[site]
            a0 = a_init[key]
            self.A[key] = nn.Parameter(a0.expand(n, rank, din).clone())
            self.B[key] = nn.Parameter(torch.zeros(n, dout, rank, device=a0.device, dtype=a0.dtype))
        self.rows: Tensor | None = None  # active document rows of the current forward

    def keys(self) -> list[str]:
        """Parameter keys: ``s{slot}_{site}`` per virtual slot and site, then ``head``."""
        out = [f"s{v}_{site}" for v in range(len(self.slots)) for site in self.sites if site != "head"]
        if "head" in self.sites:
            out.append("head")
        return out

    @staticmethod
    def initial_a(model: nn.Module, rank: int, sites: Sequence[str], generator: torch.Generator,
                  device) -> dict[str, Tensor]:
        """A ~ U(±1/√in), one draw per key (shared by every document: their starts are identical)."""
        c = model.config
        out = {}
        n_slots = len(virtual_slots(model))
        keys = [f"s{v}_{site}" for v in range(n_slots) for site in sites if site != "head"]
        if "head" in sites:
            keys.append("head")
        for key in keys:
            din = c.model_dim
            bound = 1.0 / math.sqrt(din)
            a = (torch.rand(1, rank, din, generator=generator, dtype=torch.float32) * 2 - 1) * bound
            out[key] = a.to(device)
        return out

    def delta(self, key: str, u: Tensor) -> Tensor:
        A, B = self.A[key], self.B[key]
        if self.rows is not None:
            A, B = A[self.rows], B[self.rows]
        A, B = A.to(u.dtype), B.to(u.dtype)
        return torch.matmul(torch.matmul(u, A.transpose(1, 2)), B.transpose(1, 2)) * self.scale


class LoRAHooks:
    """Attach a :class:`DocLoRA` to the model's own modules: ``c_q``/``c_k``/``c_v`` outputs get
    ``+delta(u)``, the attention module's output ``+delta_o(u)`` (u = the block's normalized attention input, in
    parallel with the whole attention) and the MLP's output ``+delta_mlp(u_mlp)``. Virtual slots are told apart
    by counting each layer's attention calls within one forward; :meth:`forward_nll` checks the counts."""

    def __init__(self, model: nn.Module, lora: DocLoRA):
        self.model, self.lora = model, lora
        self.slots = lora.slots
        occ: dict[int, int] = {}
        self.slot_of: dict[tuple[int, int], int] = {}
        for v, i in enumerate(self.slots):
            self.slot_of[(i, occ.get(i, 0))] = v
            occ[i] = occ.get(i, 0) + 1
        self.expected = occ
        self.handles: list = []
        self.attn_calls: dict[int, int] = {}
        self.mlp_calls: dict[int, int] = {}
        self.current: dict[int, int] = {}

    def __enter__(self) -> "LoRAHooks":
        sites = set(self.lora.sites)
        for i in sorted(self.expected):
            blk = self.model.blocks[i]
            self.handles.append(blk.attn.register_forward_pre_hook(self._attn_pre(i)))
            for site, mod in (("q", blk.attn.c_q), ("k", blk.attn.c_k), ("v", blk.attn.c_v)):
                if site in sites:
                    self.handles.append(mod.register_forward_hook(self._linear_post(i, site)))
            if "o" in sites:
                self.handles.append(blk.attn.register_forward_hook(self._site_post(i, "o")))
            self.handles.append(blk.mlp.register_forward_hook(self._mlp_post(i, "mlp" in sites)))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return False

    def _attn_pre(self, i: int):
        def hook(mod, args):
            k = self.attn_calls.get(i, 0)
            self.attn_calls[i] = k + 1
            self.current[i] = self.slot_of[(i, k)]
        return hook

    def _linear_post(self, i: int, site: str):
        def hook(mod, args, out):
            return out + self.lora.delta(f"s{self.current[i]}_{site}", args[0])
        return hook

    def _site_post(self, i: int, site: str):
        def hook(mod, args, out):
            return out + self.lora.delta(f"s{self.current[i]}_{site}", args[0])
        return hook

    def _mlp_post(self, i: int, active: bool):
        def hook(mod, args, out):
            self.mlp_calls[i] = self.mlp_calls.get(i, 0) + 1
            if not active:
                return None
            return out + self.lora.delta(f"s{self.current[i]}_mlp", args[0])
        return hook

    def hidden(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        """The model's final hidden states with the adapters of ``rows`` (one per batch row) attached."""
        return rms_norm(self.trunk(x, rows))

    def trunk(self, x: Tensor, rows: Tensor | None = None, **kw) -> Tensor:
        """The model's trunk (before the final norm) with the adapters of ``rows`` attached. x: (B, T) → (B, T, d);
        ``kw``: the model's packing arguments (cu_seqlens, max_seqlen)."""
        self.attn_calls.clear()
        self.mlp_calls.clear()
        self.lora.rows = rows
        h = self.model.trunk(x, **kw)
        if self.attn_calls != self.expected or self.mlp_calls != self.expected:
            raise RuntimeError(f"LoRA hooks saw attention calls {self.attn_calls} and MLP calls {self.mlp_calls} "
                               f"per layer, expected {self.expected} (the model's layer plan changed?)")
        return h

    def rows_nll(self, x: Tensor, y: Tensor, pos: Tensor, rows: Tensor | None = None) -> Tensor:
        """Per-token nll (B, K) fp32 at window positions ``pos`` (B, K) of the adapted model: the trunk runs on every
        position, the final norm, the head (+ head LoRA) and the CE on the gathered rows only. Equals
        ``forward_nll(x, y, rows).gather(1, pos)``."""
        h = self.trunk(x, rows)
        hg = rms_norm(h.gather(1, pos[..., None].expand(-1, -1, h.size(-1))))
        return self._ce(self.logits_pre_softcap(hg), y.gather(1, pos)).view(pos.shape)

    def _ce(self, z: Tensor, y: Tensor) -> Tensor:
        """Softcapped CE per row of z (M, V) at the model's temperature (the cap and z divided by it)."""
        t, cap = getattr(self.model, "temperature", 1.0), self.model.config.logit_softcap
        return kernels.softcap_ce(z if t == 1.0 else z / t, y.reshape(-1), cap / t)

    def logits_pre_softcap(self, h: Tensor) -> Tensor:
        """z = h Eᵀ (+ head LoRA), flattened (B·T, V) exactly as the model's head computes it."""
        hf = h.reshape(-1, h.size(-1))
        z = F.linear(hf, self.model.tok_emb.weight.to(h.dtype))
        if "head" in self.lora.sites:
            z = z + self.lora.delta("head", h).reshape(z.shape)
        return z

    def forward_nll(self, x: Tensor, y: Tensor, rows: Tensor | None = None) -> Tensor:
        """Per-token nll (B, T) fp32 of the LoRA-adapted model; equals ``model.loss(x, y, reduction='none')``
        exactly when every B is zero."""
        h = self.hidden(x, rows)
        return self._ce(self.logits_pre_softcap(h), y).view_as(y)

    def forward_logits(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        """Softcapped logits (B, T, V) of the adapted model (the distribution that is scored)."""
        h = self.hidden(x, rows)
        z = self.logits_pre_softcap(h)
        return (kernels.softcap(z.float(), self.model.config.logit_softcap)
                / getattr(self.model, "temperature", 1.0)).view(*x.shape, -1)


def lora_token_nll(model: nn.Module, lora: DocLoRA, x: Tensor, y: Tensor, rows: Tensor | None = None) -> Tensor:
    """Convenience: per-token nll of ``model`` with ``lora`` attached (hooks added and removed around it)."""
    with LoRAHooks(model, lora) as hooks:
        return hooks.forward_nll(x, y, rows)


def document_spans(tokens: Tensor, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) int64 of the documents of a stream of N + 1 tokens: starts are 0 and every BOS position
    < N; document d's inputs are ``tokens[start:end]`` and its targets ``[start, end)``."""
    arr = strip_validation(tokens).detach().cpu().numpy()
    n = arr.size - 1
    bos = np.nonzero(arr[:n] == bos_id)[0]
    starts = np.unique(np.concatenate([[0], bos])).astype(np.int64)
    ends = np.append(starts[1:], n).astype(np.int64)
    return starts, ends


class DocLoRATTT:
    """Per-document LoRA TTT (``phased=False``) or phased TTT (``phased=True``); see the module docstring."""

    def __init__(self, model: nn.Module, tokens: Tensor, tables: ByteTables, settings: TTTSettings, ledger: Ledger,
                 *, rank: int, world_size: int, phased: bool, log: Callable[[str], None] = print):
        self.model, self.s, self.ledger, self.log = model, settings, ledger, log
        self.rank, self.world_size, self.phased = rank, world_size, phased
        self.device = tokens.device
        self.tokens = tokens
        self.tables = tables.to(self.device)
        self.tables.check_stream(tokens.numel())
        self.N = tokens.numel() - 1
        self.bos_id = settings.bos_id
        self.amp = _autocast_dtype(settings.autocast_dtype)
        self.doc_starts, self.doc_ends = document_spans(tokens, self.bos_id)
        self.n_docs = len(self.doc_starts)
        ledger.declare_known_inputs(self.doc_starts)
        B = settings.lora_batch_docs
        self.batches = [list(range(b, min(b + B, self.n_docs))) for b in range(0, self.n_docs, B)]
        gen = torch.Generator().manual_seed(settings.seed)
        self.a_init = DocLoRA.initial_a(model, settings.lora_rank, settings.lora_sites, gen, self.device)
        self.sums = [torch.zeros((), dtype=torch.float64, device=self.device),
                     torch.zeros((), dtype=torch.int64, device=self.device),
                     torch.zeros((), dtype=torch.int64, device=self.device)]
        self.doc_nll = torch.zeros(self.n_docs, dtype=torch.float64, device=self.device)
        self.timings = {"score_s": 0.0, "adapt_s": 0.0, "reset_s": 0.0, "phase_s": 0.0}
        self.steps = 0
        self.phase_steps = 0
        P = min(settings.phase_prefix_docs, self.n_docs)
        self.boundaries = sorted({P * k // settings.phases for k in range(1, settings.phases + 1)} - {0}) \
            if phased else []
        self.phases_done: list[dict[str, Any]] = []
        self.docs_scored = 0

    def new_lora(self, n: int) -> DocLoRA:
        s = self.s
        return DocLoRA(self.model, n, s.lora_rank, s.lora_alpha, s.lora_sites, self.a_init).to(self.device)

    def run_batch(self, docs: list[int]) -> None:
        """LoRA TTT over one batch of documents: fresh adapters and optimizer, chunk by chunk, score first. The
        head runs on each chunk's scored rows only (``lora_chunk`` per document), which is also all the loss reads."""
        t0 = time.perf_counter()
        s, dev = self.s, self.device
        K, W = s.lora_chunk, s.lora_window
        starts = self.doc_starts[docs]
        lens = self.doc_ends[docs] - starts
        n_chunks = -(-lens // K)
        lora = self.new_lora(len(docs))
        opt = torch.optim.AdamW(lora.parameters(), lr=s.lora_lr, betas=(s.lora_beta1, s.lora_beta2),
                                eps=s.lora_eps, weight_decay=s.lora_wd)
        self.timings["reset_s"] += time.perf_counter() - t0
        with _TrainableOnly(self.model, []), LoRAHooks(self.model, lora) as hooks:
            self.model.eval()
            for i in range(int(n_chunks.max()) if len(docs) else 0):
                t_score = time.perf_counter()
                act = np.nonzero(n_chunks > i)[0]
                c0 = i * K
                c1 = np.minimum((i + 1) * K, lens[act])
                ws = np.maximum(0, c1 - W)
                x, y, pos, scored_t, tpos = self._chunk_inputs(starts[act] + ws, c1 - ws, c0 - ws, K)
                learn = c1 < lens[act]
                rows = torch.from_numpy(act).to(dev)
                tgt_lo, tgt_hi = starts[act] + c0, starts[act] + c1
                self.ledger.score_many(np.stack([tgt_lo, tgt_hi], 1), label=f"lora_score:chunk={i}")
                with torch.set_grad_enabled(bool(learn.any())), autocast_for(dev, self.amp):
                    nll = hooks.rows_nll(x, y, pos, rows)
                nll_d = torch.where(scored_t, nll.detach().to(torch.float64), 0.0)
                self.sums[0] += nll_d.sum()
                nbytes = count_bytes(x.gather(1, pos), y.gather(1, pos), self.tables, tpos)
                self.sums[1] += torch.where(scored_t, nbytes, 0).sum()
                self.sums[2] += scored_t.sum()
                self.doc_nll.index_add_(0, torch.as_tensor([docs[j] for j in act], device=dev), nll_d.sum(1))
                t_adapt = time.perf_counter()
                self.timings["score_s"] += t_adapt - t_score
                if learn.any():
                    lr_rows = np.nonzero(learn)[0]
                    self.ledger.adapt(np.stack([(starts[act] + ws)[lr_rows], tgt_hi[lr_rows]], 1),
                                      label=f"lora_adamw:chunk={i}")
                    m = scored_t[torch.from_numpy(lr_rows).to(dev)]
                    per_doc = torch.where(m, nll[torch.from_numpy(lr_rows).to(dev)].float(), 0.0).sum(1) / m.sum(1)
                    per_doc.sum().backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    self.steps += 1
                self.timings["adapt_s"] += time.perf_counter() - t_adapt

    def _chunk_inputs(self, first: np.ndarray, length: np.ndarray, scored_from: np.ndarray, K: int):
        """x, y (n, T) for windows ``tokens[first_j : first_j + length_j]`` (zero-padded), the positions pos (n, K)
        of each window's last K rows, which of them are scored (from window offset ``scored_from_j`` on) and their
        targets' positions in the stream (n, K) when the tables count from a byte sidecar, else None."""
        x, y, _ = window_tokens(self.tokens, torch.from_numpy(first), torch.from_numpy(length))
        T = x.shape[1]
        pos = np.maximum(length - K, 0)[:, None] + np.arange(K)[None, :]
        scored = (pos >= scored_from[:, None]) & (pos < length[:, None])
        pos_t = torch.from_numpy(np.minimum(pos, T - 1)).to(self.device)
        tpos = None
        if self.tables.sidecar is not None:
            tpos = torch.from_numpy(first[:, None] + np.minimum(pos, length[:, None] - 1) + 1).to(self.device)
        return x, y, pos_t, torch.from_numpy(scored).to(self.device), tpos

    def global_sgd(self, n_prefix: int, phase: int) -> None:
        """Phase boundary: SGD on the base weights over the tokens of the first ``n_prefix`` documents."""
        t0 = time.perf_counter()
        s = self.s
        end = int(self.doc_ends[n_prefix - 1])
        self.ledger.sync(0, end)
        self.ledger.assert_scored(0, end, label=f"phase_sgd:phase={phase}")
        S, L = s.phase_chunk_tokens, s.phase_seq_len
        C = max(1, -(-end // S))
        params = [p for p in self.model.parameters()]
        opt = torch.optim.SGD(params, lr=s.phase_lr, momentum=s.phase_momentum)
        steps = 0
        with _TrainableOnly(self.model, params):
            for c in range(C - 1):  # the last chunk is skipped (the recipe)
                c0, c1 = c * S, min((c + 1) * S, end)
                seqs = [c0 + j * L for j in range((c1 - c0) // L)]
                if not seqs:
                    continue
                lo, hi = _rank_slice(len(seqs), self.rank, self.world_size)
                lr = cosine_lr(s.phase_lr, c, C)
                for e in range(s.phase_epochs):
                    self.ledger.adapt([(seqs[0], seqs[-1] + L)], label=f"phase_sgd:phase={phase} chunk={c} epoch={e}",
                                      collective=True)
                    _sgd_step(self.model, params, opt, self.tokens, seqs[lo:hi], L, lr=lr, clip=s.grad_clip,
                              world_size=self.world_size, micro=s.micro_batch_seqs, doc_isolated=True,
                              bos_id=self.bos_id, autocast_dtype=self.amp)
                    steps += 1
        for p in params:
            p.grad = None
        dt = time.perf_counter() - t0
        self.phase_steps += steps
        self.timings["phase_s"] += dt
        self.phases_done.append({"phase": phase, "docs": n_prefix, "tokens": end, "chunks": C, "steps": steps,
                                 "seconds": round(dt, 4)})
        self.log(f"ttt_phased: phase {phase} global SGD over {n_prefix} docs ({end} tokens), {steps} steps, "
                 f"{dt:.2f}s")

    def run(self) -> None:
        Wd = self.world_size
        pending = list(self.boundaries)
        phase = 0
        for r0 in range(0, len(self.batches), Wd):
            j = r0 + self.rank
            if j < len(self.batches):
                self.run_batch(self.batches[j])
            done_batches = min(r0 + Wd, len(self.batches))
            self.docs_scored = self.batches[done_batches - 1][-1] + 1
            while pending and pending[0] <= self.docs_scored:
                phase += 1
                self.global_sgd(pending.pop(0), phase)


def window_tokens(tokens: Tensor, first: Tensor, length: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x, y (n, T) of the windows ``tokens[first_j : first_j + length_j]`` → the next tokens, zero-padded to the
    longest (T), and which positions are real (n, T) bool; on ``tokens``' device. first, length: (n,) int64, CPU."""
    ar = torch.arange(int(length.max()))
    valid = ar[None, :] < length[:, None]
    idx = torch.where(valid, first[:, None] + ar[None, :], 0).to(tokens.device)
    valid = valid.to(tokens.device)
    return torch.where(valid, tokens[idx], 0), torch.where(valid, tokens[idx + 1], 0), valid


# ----------------------------------------------------------------------------------------------------------------
# LoRA sliding TTT with periodic reset (#1499)


class LoRASlidingTTT:
    """#1499's LoRA sliding TTT (with ``ngram``: its cache inside the loop, learning each batch once scored): the sliding windows (exactly :func:`pgolf.eval.evaluate_sliding`'s plan) go in batches
    of ``batch_windows``; each batch is scored with the current adapter (rank ``slide_lora_rank`` on the
    ``slide_lora_sites`` of every layer slot, A ~ N(0, std²), B = 0, no α/r scale; base model frozen), then one
    AdamW step on the mean loss over every position of those windows, all scored by then. The adapter and its
    optimizer start over every ``slide_lora_reset`` batches. Windows are split contiguously across ranks, each with
    its own adapter as the record; a window reaching back before its rank's first scored target is trained on
    from that target on only (it is scored whole), so every rank adapts on targets it scored itself."""

    def __init__(self, model: nn.Module, tokens: Tensor, tables: ByteTables, settings: TTTSettings, ledger: Ledger,
                 *, rank: int, world_size: int, log: Callable[[str], None] = print, prefill: Tensor | None = None):
        self.model, self.s, self.ledger, self.log = model, settings, ledger, log
        self.device, self.tokens = tokens.device, tokens
        self.mixer = _ngram_mixer(settings, ledger, self.device, prefill) if settings.ngram else None
        self.tables = tables.to(self.device)
        self.N = tokens.numel() - 1
        self.amp = _autocast_dtype(settings.autocast_dtype)
        starts, ends, offsets = _plan_tensors(self.N, settings.window, settings.stride)
        lo, hi = _rank_slice(starts.numel(), rank, world_size)
        self.starts, self.ends, self.offsets = starts[lo:hi], ends[lo:hi], offsets[lo:hi]
        self.first_own = int(self.starts[0] + self.offsets[0]) if hi > lo else 0
        self.width = min(settings.window, self.N)
        self.sums = [torch.zeros((), dtype=torch.float64, device=self.device),
                     torch.zeros((), dtype=torch.int64, device=self.device),
                     torch.zeros((), dtype=torch.int64, device=self.device)]
        self.timings = {"score_s": 0.0, "adapt_s": 0.0, "reset_s": 0.0}
        self.steps = 0

    def new_adapter(self) -> tuple[DocLoRA, torch.optim.Optimizer]:
        s = self.s
        g = torch.Generator().manual_seed(s.seed + self.steps)
        n_slots = len(virtual_slots(self.model))
        a_init = {f"s{v}_{site}": torch.randn(1, s.slide_lora_rank, self.model.config.model_dim, generator=g).mul_(
            s.slide_lora_init_std).to(self.device) for v in range(n_slots) for site in s.slide_lora_sites}
        lora = DocLoRA(self.model, 1, s.slide_lora_rank, float(s.slide_lora_rank), s.slide_lora_sites, a_init)
        lora = lora.to(self.device)
        return lora, torch.optim.AdamW(lora.parameters(), lr=s.slide_lora_lr, weight_decay=0.0)

    def run(self) -> None:
        s, n = self.s, self.starts.numel()
        lora, opt = None, None
        for j, b0 in enumerate(range(0, n, s.batch_windows)):
            if j % s.slide_lora_reset == 0:
                t0 = time.perf_counter()
                lora, opt = self.new_adapter()
                self.timings["reset_s"] += time.perf_counter() - t0
            sl = slice(b0, b0 + s.batch_windows)
            with _TrainableOnly(self.model, []), LoRAHooks(self.model, lora) as hooks:
                self.model.eval()
                # #1499 scores at its temperature once the adapter has learned since the reset
                self.model.temperature = s.slide_temperature if j % s.slide_lora_reset else s.temperature
                self.score_batch(hooks, sl)
                self.model.temperature = s.temperature
                self.adapt_batch(hooks, opt, sl)

    def score_batch(self, hooks: LoRAHooks, sl: slice) -> None:
        t0 = time.perf_counter()
        st, en, off = self.starts[sl], self.ends[sl], self.offsets[sl]
        self.ledger.score(int(st[0] + off[0]), int(en[-1]), label=f"slide_lora_score:window={int(st[0])}")
        scorer = WindowScorer(self.model, self.tables, width=self.width, batch=self.s.batch_windows,
                              doc_isolated=self.s.doc_isolated, bos_id=self.s.bos_id, autocast_dtype=self.amp,
                              device=self.device, trunk=hooks.trunk, mixer=self.mixer)
        with torch.no_grad():
            for acc, v in zip(self.sums, scorer.score(self.tokens, st, en - st, off)):
                acc += v
        if self.mixer is not None:  # the cache learns the batch's targets once they are scored (#1499)
            self.mixer.update(self.tokens, int(st[0] + off[0]), int(en[-1]))
        self.timings["score_s"] += time.perf_counter() - t0

    def adapt_batch(self, hooks: LoRAHooks, opt: torch.optim.Optimizer, sl: slice) -> None:
        """One AdamW step on the batch's windows (from the rank's first own target on)."""
        t0 = time.perf_counter()
        st = torch.clamp(self.starts[sl], min=self.first_own)
        en = self.ends[sl]
        keep = en > st
        st, en = st[keep], en[keep]
        if st.numel():
            self.ledger.adapt(np.stack([st.numpy(), en.numpy()], 1), label="slide_lora_adamw")
            x, y, valid = window_tokens(self.tokens, st, en - st)
            with autocast_for(self.device, self.amp):
                nll = hooks.forward_nll(x, y)
            (torch.where(valid, nll.float(), 0.0).sum() / valid.sum()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.steps += 1
        self.timings["adapt_s"] += time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------------
# entry point


def run_ttt(model: nn.Module, val_tokens: Tensor, tables: ByteTables, *, mode: str = "chunk",
            settings: TTTSettings | dict | None = None, ledger: Ledger | None = None, rank: int | None = None,
            world_size: int | None = None, log: Callable[[str], None] | None = print,
            prefill_tokens: Tensor | None = None) -> TTTResult:
    """Score the validation stream with legal score-first TTT and return the exact bpb and the ledger's evidence.

    ``val_tokens``: 1-D, N + 1 tokens (plain or :func:`pgolf.eval.ledger.mark_validation`-flagged). ``tables``: the
    tokenizer's :class:`ByteTables`. ``mode``: 'chunk' | 'lora' | 'phased'. ``settings``: :class:`TTTSettings` or a
    dict of overrides. ``ledger``: a :class:`Ledger` over N targets (made here when None; it becomes the active
    ledger while this runs). Adapts ``model`` in place. Raises :class:`ComplianceViolation` on any illegal use.
    ``prefill_tokens``: training tokens (1-D) for the n-gram cache (``settings.ngram``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    t_start = time.perf_counter()
    log = log or (lambda _m: None)
    if settings is None:
        settings = TTTSettings()
    elif isinstance(settings, dict):
        settings = TTTSettings.from_dict(settings)
    settings.validate()
    if settings.bos_id is None:
        settings = settings.replace(bos_id=int(getattr(getattr(model, "config", None), "bos_id", 1)))
    rank, world_size = _resolve_rank(rank, world_size)
    _dist_running(world_size)
    if settings.ngram and mode not in ("chunk", "lora_sliding"):
        raise ValueError(f"the n-gram mixture runs in the chunk and lora_sliding modes (scoring through it, learning "
                         f"what was scored); mode {mode!r} does not take it")
    if settings.compile and mode != "chunk":
        raise ValueError(f"TTT compile is for the chunk mode's fixed-shape adaptation step; mode {mode!r} runs "
                         f"per-document LoRA steps of varying shapes (drop compile)")
    device = model_device(model)
    warmup_s = 0.0
    tokens = torch.as_tensor(strip_validation(torch.as_tensor(val_tokens)))
    if tokens.dim() != 1 or tokens.numel() < 2:
        raise ValueError(f"val_tokens must be 1-D with at least 2 tokens, got shape {tuple(tokens.shape)}")
    tokens = tokens.to(device=device, dtype=torch.int64)
    N = tokens.numel() - 1
    if ledger is None:
        ledger = Ledger(N)
    elif ledger.n != N:
        raise ValueError(f"ledger covers {ledger.n} targets but the stream has {N}")
    set_active_ledger(ledger)
    was_training = model.training
    was_temperature = getattr(model, "temperature", 1.0)
    if settings.weights_dtype == "bf16":  # #490 adapts and scores a bf16 model (in place, as TTT adapts in place)
        model.to(torch.bfloat16)
    if settings.temperature != 1.0 or hasattr(model, "temperature"):
        model.temperature = settings.temperature
    try:
        if mode == "chunk":
            runner = ChunkTTT(model, tokens, tables, settings, ledger, rank=rank, world_size=world_size, log=log,
                              prefill=prefill_tokens)
            if settings.compile:  # compile warm-up on random tokens, outside the timed region
                warmup_s = runner.warmup()
                t_start += warmup_s
            probes_before: dict[str, Any] = {}
            if settings.probes:  # on already-scored positions, before any adaptation
                runner.run(lambda: probes_before.update(_probes(model, tokens, settings, None, "before",
                                                                 limit=runner.chunk_targets(0)[1],
                                                                 mixer=runner.mixer)))
            else:
                runner.run()
            n_chunks, n_docs, doc_nll = runner.n_chunks, None, None
        elif mode == "lora_sliding":
            runner = LoRASlidingTTT(model, tokens, tables, settings, ledger, rank=rank, world_size=world_size, log=log,
                                    prefill=prefill_tokens)
            probes_before = {}
            runner.run()
            n_chunks, n_docs, doc_nll = None, None, None
        else:
            runner = DocLoRATTT(model, tokens, tables, settings, ledger, rank=rank, world_size=world_size,
                                phased=mode == "phased", log=log)
            probes_before = {}
            runner.run()
            n_chunks, n_docs, doc_nll = None, runner.n_docs, runner.doc_nll
        t_probe = time.perf_counter()
        probes: dict[str, Any] = {}
        if settings.probes:
            lora_runner = runner if mode in ("lora", "phased") else None
            probes = _merge_probes(probes_before, _probes(model, tokens, settings, lora_runner, "after",
                                                          mixer=getattr(runner, "mixer", None)))
        probe_s = time.perf_counter() - t_probe
        sums = torch.stack([runner.sums[0], runner.sums[1].to(torch.float64), runner.sums[2].to(torch.float64)])
        if world_size > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        nll, nbytes, ntok = sums.tolist()
        nbytes, ntok = int(round(nbytes)), int(round(ntok))
        summary = ledger.summary(require_complete=True)
        steps = summary.adapt_steps
        if ntok != N or summary.tokens_scored != N:
            raise ComplianceViolation("scoring_mismatch", f"scored {ntok} targets (ledger: {summary.tokens_scored}) "
                                      f"of {N}", step=ledger.event)
    finally:
        set_active_ledger(None)
        model.train(was_training)
        if hasattr(model, "temperature"):
            model.temperature = was_temperature
    seconds = time.perf_counter() - t_start
    timings = {k: round(v, 4) for k, v in runner.timings.items()}
    timings["probe_s"] = round(probe_s, 4)
    timings["ledger_s"] = round(summary.overhead_seconds, 6)
    timings["warmup_s"] = round(warmup_s, 4)  # before the timed region: not in ``seconds``
    res = TTTResult(mode=mode, val_loss=nll / ntok, val_bpb=bits_per_byte(nll, nbytes), tokens=ntok, bytes=nbytes,
                    nll_sum=nll, seconds=seconds, timings=timings, adapt_steps=steps, ledger=summary, probes=probes,
                    settings=settings.to_dict(), rank=rank, world_size=world_size, n_chunks=n_chunks, n_docs=n_docs,
                    doc_nll=doc_nll)
    if mode == "phased":
        res.timings["phases"] = runner.phases_done  # type: ignore[assignment]
    if mode == "chunk":
        res.timings["epochs_per_chunk"] = runner.epoch_plan  # type: ignore[assignment]
    log(f"ttt_{mode} val_loss:{res.val_loss:.4f} val_bpb:{res.val_bpb:.4f} tokens:{ntok} adapt_steps:{steps} "
        f"eval_time:{seconds * 1000:.0f}ms ledger_overhead:{100 * res.ledger_overhead_fraction:.3f}%")
    log("ttt_timing " + " ".join(f"{k.removesuffix('_s')}:{v * 1000:.0f}ms" for k, v in timings.items()
                                 if isinstance(v, float) and v > 0))
    return res


def _probes(model: nn.Module, tokens: Tensor, s: TTTSettings, lora_runner: DocLoRATTT | None,
            when: str, limit: int | None = None, mixer=None) -> dict[str, Any]:
    """Normalization and causality probes on the first ``probe_tokens`` targets (already scored; at most
    ``limit``), of the scored distribution (the model's, or its n-gram mixture). Diagnostics only: nothing is
    scored or adapted."""
    from pgolf.eval.compliance import probe_causality, probe_normalization

    T = min(s.probe_tokens, tokens.numel() - 1, limit if limit is not None else tokens.numel())
    if T < 2:
        return {}
    x, y = tokens[None, :T], tokens[None, 1:T + 1]
    amp = _autocast_dtype(s.autocast_dtype)
    dev = tokens.device
    with _eval_mode(model), autocast_for(dev, amp):
        if lora_runner is None:
            logits_fn, nll_fn = _scored_fns(model, mixer)
            norm = probe_normalization(logits_fn, x, y, nll_fn=nll_fn)
            caus = probe_causality(nll_fn, x, y, vocab_size=norm["vocab"], seed=s.seed)
        else:
            lora = lora_runner.new_lora(1)
            g = torch.Generator().manual_seed(s.seed + 1)
            for p in lora.B.values():  # a non-zero adapter so the probe exercises the LoRA path
                p.copy_(0.02 * torch.randn(p.shape, generator=g).to(p))
            rows = torch.zeros(1, dtype=torch.long, device=dev)
            with LoRAHooks(model, lora) as h:
                norm = probe_normalization(lambda a: h.forward_logits(a, rows), x, y,
                                           nll_fn=lambda a, b: h.forward_nll(a, b, rows))
                caus = probe_causality(lambda a, b: h.forward_nll(a, b, rows), x, y,
                                       vocab_size=norm["vocab"], seed=s.seed)
    return {f"normalization_{when}": norm, f"causality_{when}": caus}


def _scored_fns(model: nn.Module, mixer) -> tuple[Callable, Callable]:
    """(logits_fn, nll_fn) of the scored distribution for the probes: x (1, T) → log-probs (1, T, V); (x, y) → nll
    (1, T). With an n-gram mixer the contexts come from the probe's own inputs, so the causality probe sees them."""
    if mixer is None:
        return (lambda a: model.forward_logits(a)), (lambda a, b: model.loss(a, b, reduction="none"))

    def stream(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return torch.cat([a[0], b[0, -1:]]), torch.arange(a.shape[1], device=a.device)

    def logits_fn(a: Tensor) -> Tensor:
        logp = torch.log_softmax(model.forward_logits(a).float()[0], dim=-1)
        toks, t = stream(a, a)  # only the contexts (inputs) are read
        return mixer.log_probs(logp, toks, t)[None]

    def nll_fn(a: Tensor, b: Tensor) -> Tensor:
        toks, t = stream(a, b)
        return mixer.mix(model.loss(a, b, reduction="none")[0].double(), toks, t, y=b[0])[None]

    return logits_fn, nll_fn


def _merge_probes(a: dict, b: dict) -> dict:
    out = dict(a)
    out.update(b)
    norms = [v for k, v in out.items() if k.startswith("normalization_")]
    caus = [v for k, v in out.items() if k.startswith("causality_")]
    if norms:
        out["normalization"] = {
            "positions": sum(n["positions"] for n in norms),
            "max_abs_logsumexp": max(n["max_abs_logsumexp"] for n in norms),
            "max_abs_nll_minus_logp": max(n["max_abs_nll_minus_logp"] for n in norms),
            "vocab": norms[0]["vocab"]}
    if caus:
        out["causality"] = {"positions": sum(c["positions"] for c in caus),
                            "max_abs_prefix_change": max(c["max_abs_prefix_change"] for c in caus),
                            "suffix_changed": all(c["suffix_changed"] for c in caus)}
    return out
