"""The trainer: record-stack training under a wall-clock cap, then the saved weights, GPTQ calibration, the final
evals and the quantized artifact (written, reloaded from the file alone and evaluated), in phases you can read one
by one:

1. :func:`setup`: every setting checked (:func:`pgolf.train.config.validate`), the inputs read and checked
   (tokenizer, validation tokens against the vocab, training shards found), the run folder claimed (an existing
   one is refused unless ``force``) and its log opened. Nothing is written before all of this passed.
2. :func:`train_loop`: one process per device (``torchrun --nproc_per_node=N``; NCCL on GPU, gloo on CPU). Each step
   reads ``train_batch_tokens / world_size`` tokens per rank in ``grad_accum`` micro-batches, all-reduces the
   gradients in one flat buffer, clips, steps Muon and AdamW and updates the EMA (and the SWA sum). The stop
   decision, the loop switch (by fraction, or at a step), late QAT and the LR schedule read one elapsed-time
   fraction agreed by an all-reduce(MAX). Validation time is excluded from the clock; a non-finite loss stops the
   run naming the step and the last good values. At the end the SWA mean, else the EMA, replaces the weights, and
   late QAT goes off (unless ``late_qat_in_eval``).
3. :func:`save_trained`: the final weights go to ``final_model.pt`` and ``summary.json`` says "trained, evals
   pending" before anything else can fail; from here on a failure or Ctrl-C is recorded in the summary and the log
   with the commands that finish the run from the checkpoint.
4. :func:`calibrate`: GPTQ Hessians on training batches (or on sequences the model generates); their time is
   training time (the loop stopped at cap − gptq_reserve_seconds; a loud warning if the sum passes the cap).
5. :func:`final_evals`: the pre-quant model on the validation set (``final ...`` lines).
6. :func:`write_artifact`: rank 0 quantizes and writes ``final_model.pgq`` atomically (its header records the
   tokenizer's fingerprint and the model config; the summary its size and SHA-256); every rank rebuilds the model
   from that file and evaluates it; the size table and ``bytes_total`` follow, and a total over 16,000,000 bytes
   raises :class:`pgolf.quant.size.OverBudgetError` (after the summary is written) naming the knob.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from pgolf import kernels
from pgolf.data.loaders import DocumentPackedLoader, SequentialLoader, ShuffledLoader
from pgolf.data.shards import find_shards, load_validation_tokens
from pgolf.data.tokenizer import Tokenizer
from pgolf.errors import ConfigError, OutputExistsError, UserError
from pgolf.eval import evaluate, evaluate_sliding
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.train.config import TrainConfig, check_paths, setting_name, validate
from pgolf.train.ema import EMA
from pgolf.train.optim import build_optimizers
from pgolf.train.qat import qat_targets
from pgolf.train.schedule import WallClock, lr_multiplier, lr_multiplier_iters, muon_momentum
from pgolf.train.swa import SWA
from pgolf.utils import atomic_torch_save, atomic_write_json

CHECKPOINT = "final_model.pt"


class TrainingDiverged(UserError, RuntimeError):
    """Raised when the training loss stops being finite."""


@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class Run:
    """What every phase reads: settings, process, run folder, log, checked inputs, and the summary so far."""

    cfg: TrainConfig
    model_cfg: GPTConfig
    ctx: Context
    run_id: str
    run_dir: Path
    log: "Logger"
    tokenizer: dict[str, Any]
    tables: Any
    train_files: list[Path]
    val_tokens: torch.Tensor
    phase: str = "setup"
    summary: dict[str, Any] = field(default_factory=dict)
    measured_code_bytes: int | None = None
    code_digest: str | None = None

    @property
    def autocast_dtype(self):
        return torch.bfloat16 if self.ctx.device.type == "cuda" else None


@dataclass
class Trained:
    """The loop's outcome: the model (EMA weights, looping on) and its numbers."""

    model: GPT
    steps: int = 0
    tokens: int = 0
    train_ms: float = 0.0
    loop_on_step: int | None = None
    qat_on_step: int | None = None
    swa: SWA | None = None
    peak_mem_mib: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def train(cfg: TrainConfig, model_cfg: GPTConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``model_cfg`` with ``cfg``; returns the run summary (also written to ``<run_dir>/summary.json``)."""
    run = setup(cfg, model_cfg, log)
    try:
        trained = train_loop(run)
        save_trained(run, trained)
        hessians, n_cal, calib_s = calibrate(run, trained)
        evals = final_evals(run, trained.model)
        art, over_budget = write_artifact(run, trained.model, hessians, n_cal, calib_s)
        summary = finish(run, evals, art)
    except BaseException as e:
        record_failure(run, e)
        raise
    finally:
        run.log.close()
    if over_budget is not None and cfg.budget_check == "error":
        raise over_budget
    summary["model_obj"] = trained.model
    return summary


# ---- 1. setup and validation ------------------------------------------------------------------------------------

def setup(cfg: TrainConfig, model_cfg: GPTConfig, sink: Callable[[str], None] | None = None) -> Run:
    """Check every setting and input, then claim the run folder and open its log (nothing is written before)."""
    validate(cfg, model_cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    check_paths(cfg)
    ctx = setup_distributed(cfg.device)
    run_id = cfg.run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    run_dir = Path(cfg.run_dir or Path("runs") / run_id)
    check_run_dir(run_dir, cfg)  # every rank, before any rank writes
    torch.manual_seed(cfg.seed)
    tok = Tokenizer(cfg.tokenizer_path)
    tok.check_vocab(model_cfg.vocab_size)
    train_files, val_files = find_shards(cfg.data_path, "train"), find_shards(cfg.data_path, "val")
    val_tokens = load_validation_tokens(val_files, cfg.eval_seq_len, model_cfg.vocab_size)
    if cfg.val_max_tokens and val_tokens.numel() - 1 > cfg.val_max_tokens:
        val_tokens = val_tokens[: cfg.val_max_tokens // cfg.eval_seq_len * cfg.eval_seq_len + 1]
    tables = tok.validation_tables(model_cfg.vocab_size, val_files, val_tokens.numel())
    if ctx.world_size > 1:
        dist.barrier()
    if ctx.main:
        claim_run_dir(run_dir, cfg)
    logger = Logger(run_dir / "train.log" if ctx.main else None, sink, ctx.main)
    return Run(cfg, model_cfg, ctx, run_id, run_dir, logger, tok.fingerprint(), tables, train_files, val_tokens)


def run_outputs(cfg: TrainConfig) -> tuple[str, ...]:
    """The files a run writes into its folder."""
    return ("train.log", "summary.json", CHECKPOINT, cfg.artifact_name)


def check_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """OutputExistsError when ``run_dir`` holds anything, unless ``cfg.force``; never writes."""
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputExistsError(f"--run-dir {run_dir} is a file; choose a folder path")
    if cfg.force or not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    held = [n for n in run_outputs(cfg) if (run_dir / n).exists()]
    what = f"a run ({', '.join(held)})" if held else "files"
    raise OutputExistsError(f"--run-dir {run_dir} already holds {what}; nothing was changed. Choose a new --run-dir "
                            f"or --run-id (RUN_DIR / RUN_ID), or pass --force to replace the run's outputs")


def claim_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """Create the run folder; with ``force``, remove the outputs of the run it held (other files stay)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in run_outputs(cfg):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()


def setup_distributed(device: str = "auto") -> Context:
    """Init the process group from torchrun's variables (NCCL on CUDA, gloo on CPU); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting_name('device')} cuda was asked for but torch sees no CUDA device")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Context(rank, world, local_rank, dev)


# ---- 2. the training loop ---------------------------------------------------------------------------------------

def train_loop(run: Run) -> Trained:
    """Warm up (compile), then train until ``iterations`` or the wall-clock cap; EMA weights applied at the end."""
    cfg, ctx, model_cfg = run.cfg, run.ctx, run.model_cfg
    run.phase = "train"
    model = GPT(model_cfg).to(ctx.device)
    opt = build_optimizers(model.optimizer_groups(cfg.muon_aux_matrices), matrix_lr=cfg.matrix_lr,
                           muon_momentum=cfg.muon_momentum, muon_wd=cfg.muon_wd, row_normalize=cfg.muon_row_normalize,
                           ns_steps=cfg.ns_steps, ns_coefficients=cfg.ns_coefficients, tok_lr=cfg.tok_lr,
                           tok_wd=cfg.tok_wd, scalar_lr=cfg.scalar_lr, scalar_wd=cfg.scalar_wd, betas=tuple(cfg.betas),
                           eps=cfg.adam_eps, row_orientation=cfg.muon_row_orientation)
    micro_step, next_micro, use_compile = _step_functions(run, model)
    run.log(f"run_id:{run.run_id} preset:{cfg.preset} params:{model.num_params()} world_size:{ctx.world_size} "
            f"grad_accum:{cfg.grad_accum(ctx.world_size)} device:{ctx.device} compile:{use_compile} "
            f"train_files:{len(run.train_files)} val_tokens:{run.val_tokens.numel() - 1} "
            f"val_bytes_from:{run.tables.source}")
    run.log("config: " + json.dumps({"train": cfg.to_dict(), "model": model_cfg.to_dict()}, sort_keys=True),
            console=False)
    if ctx.device.type == "cuda":
        for line in model.kernel_fallbacks():
            run.log(f"kernels: {line}")
    if cfg.warmup_steps > 0:
        compile_warmup(cfg, model, opt, micro_step, _local_tokens(run), cfg.grad_accum(ctx.world_size), ctx, run.log)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    clock = WallClock(cfg.max_wallclock_seconds, cfg.gptq_reserve_seconds,
                      sync=torch.cuda.synchronize if ctx.device.type == "cuda" else None)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t = Trained(model, swa=SWA(cfg.swa_every, cfg.swa_threshold, cfg.swa_source) if cfg.swa_every else None)
    agreed_frac = 0.0  # the elapsed-time fraction all ranks agreed on after the previous step
    last_good: dict[str, Any] = {}
    clock.start()
    while t.steps < cfg.iterations:
        mult = _schedule(run, t, opt, agreed_frac, clock)
        train_loss = _one_step(run, model, opt, ema, micro_step, next_micro)
        t.steps += 1
        t.tokens += cfg.train_batch_tokens
        if t.swa is not None and t.swa.due(t.steps, mult):
            t.swa.add(t.steps, model, ema)
        agreed_frac, stop, bad = _agree(run, clock, train_loss)
        if bad:
            raise TrainingDiverged(f"training loss became non-finite at step {t.steps} (lr multiplier {mult:.4f}); "
                                   f"last good values: {last_good or 'none (first step)'}. Lower the learning rates "
                                   f"or check the data")
        last_good = _log_step(run, t, train_loss, clock, stop)
        if cfg.val_loss_every and t.steps % cfg.val_loss_every == 0 and not stop:
            with clock.paused():
                r = _evaluate(run, model, sliding=False)
            run.log(f"step:{t.steps}/{cfg.iterations} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f} "
                    f"train_time:{clock.elapsed_ms:.0f}ms")
        if stop:
            run.log(f"stopping_early: wallclock_cap train_time:{clock.elapsed_ms:.0f}ms "
                    f"step:{t.steps}/{cfg.iterations}")
            break
    t.train_ms = clock.elapsed_ms
    if ctx.device.type == "cuda":
        t.peak_mem_mib = torch.cuda.max_memory_allocated(ctx.device) // 2**20
        run.log(f"peak memory allocated: {t.peak_mem_mib} MiB")
    _final_weights(run, t, ema)
    if not cfg.late_qat_in_eval:
        model.set_fake_quant(None)  # calibration and every eval see the real weights
    if model_cfg.has_recurrence:
        model.looping_active = True  # looping stays on for calibration and every eval
    return t


def _final_weights(run: Run, t: Trained, ema) -> None:
    """The SWA mean when SWA took snapshots, else the EMA weights, replace the trained weights (logged)."""
    if t.swa is not None and t.swa.count:
        t.swa.copy_to(t.model)
        run.log(f"swa: applied the mean of {t.swa.count} {t.swa.source} snapshots (every {t.swa.every} steps from "
                f"step {t.swa.first_step}){'; EMA not applied' if ema is not None else ''}")
        return
    if t.swa is not None:
        run.log(f"swa: no snapshot (the LR multiplier never fell below {t.swa.threshold:g} on a multiple of "
                f"{t.swa.every}); {'EMA weights' if ema is not None else 'final weights'} kept")
    if ema is not None:
        ema.copy_to(t.model)


def _local_tokens(run: Run) -> int:
    return run.cfg.train_batch_tokens // (run.ctx.world_size * run.cfg.grad_accum(run.ctx.world_size))


def _step_functions(run: Run, model: GPT):
    """(micro_step(x, y, cu, max_seqlen) -> loss, next_micro() -> batch on the device, compiled?)."""
    cfg, ctx = run.cfg, run.ctx
    grad_accum, local_tokens = cfg.grad_accum(ctx.world_size), _local_tokens(run)
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and ctx.device.type == "cuda")
    if use_compile:
        kernels.preload(ctx.device.type)  # a lazy import inside the traced dispatch cannot be traced
    step_model = torch.compile(model, dynamic=False, fullgraph=True) if use_compile else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" else contextlib.nullcontext()
    loader = make_loader(cfg, run.train_files, ctx, run.model_cfg.bos_id, vocab_size=run.model_cfg.vocab_size)

    def micro_step(x, y, cu, max_seqlen):
        with amp:
            loss = step_model(x, y, cu_seqlens=cu, max_seqlen=max_seqlen)
        (loss / grad_accum).backward()
        return loss.detach()

    def next_micro():
        if cfg.loader == "packed":
            b = loader.next_batch(local_tokens)
            return (b.x.to(ctx.device), b.y.to(ctx.device), b.cu_seqlens.to(ctx.device), b.max_seqlen)
        if cfg.loader == "shuffled":
            x, y = loader.next_batch(local_tokens // cfg.train_seq_len)
        else:
            x, y = loader.next_batch(local_tokens, cfg.train_seq_len)
        return x.to(ctx.device), y.to(ctx.device), None, None

    return micro_step, next_micro, use_compile


def _schedule(run: Run, t: Trained, opt, agreed_frac: float, clock: WallClock) -> float:
    """Switch the loop on (at its fraction or step), set this step's LR multiplier and Muon momentum, and switch
    late QAT on once the multiplier is below its threshold; returns the multiplier."""
    cfg, model, mc = run.cfg, t.model, run.model_cfg
    frac = agreed_frac if cfg.max_wallclock_seconds else t.steps / max(1, cfg.iterations)
    due = t.steps >= mc.loop_activate_step if mc.loop_activate_step >= 0 else frac >= mc.loop_activate_frac
    if mc.has_recurrence and not model.looping_active and due:
        model.looping_active = True
        t.loop_on_step = t.steps
        run.log(f"step:{t.steps} looping:on frac:{frac:.3f}")
    if cfg.warmdown_frac > 0:
        mult = lr_multiplier(frac, cfg.warmdown_frac, cfg.min_lr)
    elif cfg.warmdown_iters > 0:
        elapsed = agreed_frac * clock.budget_ms if clock.budget_ms else clock.elapsed_ms  # same on every rank
        mult = lr_multiplier_iters(t.steps, elapsed, clock.budget_ms, cfg.warmdown_iters, cfg.iterations)
    else:
        mult = 1.0
    if cfg.late_qat_threshold > 0 and t.qat_on_step is None and mult < cfg.late_qat_threshold:
        _late_qat_on(run, t, mult)
    opt.set_lr_multiplier(mult)
    opt.set_muon_momentum(muon_momentum(t.steps, cfg.muon_momentum_start, cfg.muon_momentum,
                                        cfg.muon_momentum_warmup_steps))
    return mult


def _late_qat_on(run: Run, t: Trained, mult: float) -> None:
    cfg = run.cfg
    targets = qat_targets(t.model, cfg.late_qat_scope, passthrough_max=cfg.quant_passthrough_max,
                          attn_bits=cfg.quant_attn_bits, mlp_bits=cfg.quant_mlp_bits)
    t.model.set_fake_quant(targets, floor=cfg.late_qat_scale_floor, in_eval=cfg.late_qat_in_eval)
    t.qat_on_step = t.steps
    run.log(f"step:{t.steps} late_qat:on lr_mult:{mult:.4f} layers:{len(targets)} scope:{cfg.late_qat_scope}"
            f"{' (stays on in eval)' if cfg.late_qat_in_eval else ''}")


def _one_step(run: Run, model: GPT, opt, ema, micro_step, next_micro) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro-batches; returns this rank's mean loss (a 0-d tensor)."""
    grad_accum = run.cfg.grad_accum(run.ctx.world_size)
    loss_sum = torch.zeros((), device=run.ctx.device)
    for _ in range(grad_accum):
        loss_sum += micro_step(*next_micro())
    allreduce_grads(model, run.ctx)
    if run.cfg.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.cfg.grad_clip_norm)
    opt.step()
    opt.zero_grad()
    if ema is not None:
        ema.update(model)
    return loss_sum / grad_accum


def _agree(run: Run, clock: WallClock, train_loss: torch.Tensor) -> tuple[float, bool, bool]:
    """One small collective per step: (elapsed fraction, stop, non-finite loss), MAX over ranks."""
    dev = run.ctx.device
    local_stop = float(run.cfg.max_wallclock_seconds > 0 and clock.elapsed_ms >= clock.budget_ms)
    flags = torch.stack([torch.tensor(clock.frac, device=dev), torch.tensor(local_stop, device=dev),
                         (~torch.isfinite(train_loss)).float()])
    if run.ctx.world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return float(flags[0]), bool(flags[1] > 0), bool(flags[2] > 0)


def _log_step(run: Run, t: Trained, train_loss: torch.Tensor, clock: WallClock, stop: bool) -> dict[str, Any]:
    """The step's line (first 10 steps, every ``train_log_every``, the last); returns the last good values."""
    cfg, ctx = run.cfg, run.ctx
    loss_val = float(train_loss)
    good = dict(step=t.steps, train_loss=round(loss_val, 6), train_time_ms=round(clock.elapsed_ms, 1))
    if t.steps <= 10 or t.steps % max(1, cfg.train_log_every) == 0 or stop or t.steps == cfg.iterations:
        if ctx.world_size > 1:  # log the global mean loss, not rank 0's share
            dist.all_reduce(train_loss)
            loss_val = float(train_loss) / ctx.world_size
            good["train_loss"] = round(loss_val, 6)
        ms = clock.elapsed_ms
        run.log(f"step:{t.steps}/{cfg.iterations} train_loss:{loss_val:.4f} train_time:{ms:.0f}ms "
                f"step_avg:{ms / t.steps:.2f}ms tok/s:{t.tokens / max(ms, 1e-9) * 1000:.0f}")
        t.history.append(dict(good))
    return good


# ---- 3. save the trained weights before anything else can fail --------------------------------------------------

def save_trained(run: Run, t: Trained) -> None:
    """Summary "trained, evals pending" first (small), then the checkpoint (rank 0); both atomic."""
    run.phase = "save"
    run.summary = _base_summary(run, t)
    run.summary.update(status="trained", pending=["gptq_calibration", "final_evals", "artifact"])
    if not run.ctx.main:
        return
    atomic_write_json(run.run_dir / "summary.json", run.summary)
    if run.cfg.save_checkpoint:
        atomic_torch_save({"model": t.model.state_dict(), "config": run.model_cfg.to_dict(),
                           "tokenizer": run.tokenizer, "train": run.cfg.to_dict()}, run.run_dir / CHECKPOINT)
        run.summary["checkpoint"] = str(run.run_dir / CHECKPOINT)
        atomic_write_json(run.run_dir / "summary.json", run.summary)
        run.log(f"saved the trained weights: {run.run_dir / CHECKPOINT} (evals and artifact pending)")


def _base_summary(run: Run, t: Trained) -> dict[str, Any]:
    cfg, ctx = run.cfg, run.ctx
    return dict(run_id=run.run_id, preset=cfg.preset, params=t.model.num_params(), world_size=ctx.world_size,
                steps=t.steps, train_time_ms=round(t.train_ms, 1), train_loop_ms=round(t.train_ms, 1),
                calibration_s=0.0, over_cap=False, step_avg_ms=round(t.train_ms / max(t.steps, 1), 3),
                tokens=t.tokens, tokens_per_s=round(t.tokens / max(t.train_ms, 1e-9) * 1000, 1),
                loop_on_step=t.loop_on_step, late_qat_on_step=t.qat_on_step,
                swa_snapshots=t.swa.count if t.swa is not None else None, peak_mem_mib=t.peak_mem_mib, eval_time_s=None, val_loss=None,
                val_bpb=None, val=None, sliding=None, artifact=None, history=t.history, device=str(ctx.device),
                torch=torch.__version__, tokenizer=run.tokenizer, val_bytes_from=run.tables.source,
                config=cfg.to_dict(), model=run.model_cfg.to_dict())


# ---- 4. GPTQ calibration: training data, training time ----------------------------------------------------------

def calibrate(run: Run, t: Trained) -> tuple[dict | None, int, float]:
    """(Hessians, n_cal, seconds) from training batches (None, 0, 0 unless GPTQ); logs the train time with it."""
    cfg, ctx = run.cfg, run.ctx
    run.phase = "gptq_calibration"
    hessians, n_cal, calib_s = None, 0, 0.0
    if cfg.quant_method == "gptq":
        from pgolf.quant.calibrate import timed_calibration

        batches, what, gen_s = _calibration_inputs(run, t)
        hessians, n_cal, calib_s = timed_calibration(t.model, batches, device=ctx.device,
                                                     autocast_dtype=run.autocast_dtype)
        calib_s += gen_s
        run.log(f"gptq_calibration: {len(hessians)} hessians from {what} per rank in {calib_s:.2f}s "
                f"(reserve {cfg.gptq_reserve_seconds:.1f}s); train_time with calibration: "
                f"{t.train_ms + 1000 * calib_s:.0f}ms")
    total_ms = t.train_ms + 1000 * calib_s
    over_cap = bool(cfg.max_wallclock_seconds and total_ms > 1000 * cfg.max_wallclock_seconds)
    run.summary.update(train_time_ms=round(total_ms, 1), calibration_s=round(calib_s, 3), over_cap=over_cap)
    if over_cap:
        run.log("!" * 100)
        run.log(f"WARNING: training + GPTQ calibration took {total_ms / 1000:.2f}s, over the "
                f"{cfg.max_wallclock_seconds:.0f}s cap by {total_ms / 1000 - cfg.max_wallclock_seconds:.2f}s: raise "
                f"gptq_reserve_seconds (now {cfg.gptq_reserve_seconds:g}) to at least {calib_s + 1:.0f} or use fewer "
                f"gptq_calibration_batches (now {cfg.gptq_calibration_batches}). This run is NOT compliant.")
        run.log("!" * 100)
    return hessians, n_cal, calib_s


def _calibration_inputs(run: Run, t: Trained):
    """(calibration batches, what they are, seconds spent making them): training batches, or sequences the model
    generates itself (PR #1550; the same seed on every rank, as the record)."""
    from pgolf.quant.calibrate import calibration_batches, generated_batches

    cfg, ctx = run.cfg, run.ctx
    if cfg.gptq_calibration == "generated":
        sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        seqs = generated_batches(t.model, cfg.gptq_calibration_batches, cfg.train_seq_len,
                                 temperature=cfg.gptq_generate_temperature, seed=cfg.seed, device=ctx.device,
                                 autocast_dtype=run.autocast_dtype)
        sync()
        return seqs, (f"{len(seqs)} generated sequences x {cfg.train_seq_len} tokens (temperature "
                      f"{cfg.gptq_generate_temperature:g})"), time.perf_counter() - t0
    cal_tokens = cfg.gptq_calibration_tokens or cfg.train_batch_tokens // ctx.world_size
    batches = calibration_batches(run.train_files, cfg.train_seq_len, cal_tokens, cfg.gptq_calibration_batches,
                                  rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed,
                                  vocab_size=run.model_cfg.vocab_size)
    return batches, (f"{cfg.gptq_calibration_batches} batches x "
                     f"{cal_tokens // cfg.train_seq_len * cfg.train_seq_len} training tokens"), 0.0


# ---- 5. the post-training evals ---------------------------------------------------------------------------------

def final_evals(run: Run, model: GPT) -> dict[str, Any]:
    """The pre-quant model's plain (and, with ``eval_stride``, sliding) val_bpb; recorded in the summary."""
    run.phase = "final_evals"
    t0 = time.perf_counter()
    final = _evaluate(run, model, sliding=False)
    run.log(f"final val_loss:{final.val_loss:.4f} val_bpb:{final.val_bpb:.4f} eval_time:{final.seconds * 1000:.0f}ms")
    sliding = None
    if run.cfg.eval_stride:
        sliding = _evaluate(run, model, sliding=True)
        run.log(f"final_sliding val_loss:{sliding.val_loss:.4f} val_bpb:{sliding.val_bpb:.4f} "
                f"eval_time:{sliding.seconds * 1000:.0f}ms")
    evals = dict(eval_time_s=round(time.perf_counter() - t0, 3), val_loss=final.val_loss, val_bpb=final.val_bpb,
                 val=final.to_dict(), sliding=sliding.to_dict() if sliding else None)
    run.summary.update(evals)
    return evals


def _evaluate(run: Run, model: torch.nn.Module, *, sliding: bool):
    cfg = run.cfg
    if sliding:
        return evaluate_sliding(model, run.val_tokens, run.tables, window=cfg.eval_seq_len, stride=cfg.eval_stride,
                                batch_windows=cfg.eval_batch_seqs, doc_isolated=cfg.eval_doc_isolated,
                                autocast_dtype=run.autocast_dtype)
    return evaluate(model, run.val_tokens, run.tables, seq_len=cfg.eval_seq_len, batch_seqs=cfg.eval_batch_seqs,
                    doc_isolated=cfg.eval_doc_isolated, autocast_dtype=run.autocast_dtype)


# ---- 6. the artifact --------------------------------------------------------------------------------------------

def write_artifact(run: Run, model: GPT, hessians, n_cal: int,
                   calib_s: float) -> tuple[dict[str, Any] | None, Exception | None]:
    """Quantize and write the artifact (rank 0), rebuild the model from the file on every rank and evaluate it;
    the size table and the budget. Returns (the summary's artifact entry, the over-budget error or None)."""
    cfg = run.cfg
    run.phase = "artifact"
    if cfg.quant_method == "none":
        return None, None
    from pgolf.quant.artifact import build_model
    from pgolf.quant.quantize import QuantSettings

    path = run.run_dir / cfg.artifact_name
    if run.ctx.main:
        _quantize_and_save(run, model, hessians, n_cal, path)
    if run.ctx.world_size > 1:
        dist.barrier()
    t0 = time.perf_counter()
    qmodel = build_model(path, device=run.ctx.device)
    load_s = time.perf_counter() - t0
    rt = _evaluate(run, qmodel, sliding=False)
    run.log(f"final_quant_roundtrip val_loss:{rt.val_loss:.4f} val_bpb:{rt.val_bpb:.4f} "
            f"eval_time:{rt.seconds * 1000:.0f}ms")
    run.log(f"final_quant_roundtrip_exact val_loss:{rt.val_loss:.8f} val_bpb:{rt.val_bpb:.8f}")
    rt_sliding = None
    if cfg.eval_stride:
        rt_sliding = _evaluate(run, qmodel, sliding=True)
        run.log(f"final_quant_sliding_window val_loss:{rt_sliding.val_loss:.4f} val_bpb:{rt_sliding.val_bpb:.4f} "
                f"eval_time:{rt_sliding.seconds * 1000:.0f}ms")
        run.log(f"final_quant_sliding_window_exact val_loss:{rt_sliding.val_loss:.8f} "
                f"val_bpb:{rt_sliding.val_bpb:.8f}")
    del qmodel
    art: dict[str, Any] = dict(path=str(path), file=path.name, layout=cfg.artifact_layout,
                               settings=QuantSettings.from_train_config(cfg).to_dict(), n_cal=n_cal,
                               load_s=round(load_s, 3), val_loss=rt.val_loss, val_bpb=rt.val_bpb, val=rt.to_dict(),
                               sliding=rt_sliding.to_dict() if rt_sliding else None, tokenizer=run.tokenizer,
                               eval_time_s=round(rt.seconds + (rt_sliding.seconds if rt_sliding else 0.0), 3))
    over = _size_and_budget(run, path, art) if run.ctx.main else None
    return art, over


def _quantize_and_save(run: Run, model: GPT, hessians, n_cal: int, path: Path) -> None:
    from pgolf.quant.artifact import save_artifact
    from pgolf.quant.quantize import QuantSettings, quantize_for_artifact

    cfg, t0 = run.cfg, time.perf_counter()
    meta: dict[str, Any] = {"n_cal": n_cal, "eval_seq_len": cfg.eval_seq_len, "eval_stride": cfg.eval_stride}
    if cfg.late_qat_threshold:
        meta["late_qat"] = {"threshold": cfg.late_qat_threshold, "scope": cfg.late_qat_scope,
                            "floor": cfg.late_qat_scale_floor, "in_eval": cfg.late_qat_in_eval}
    if cfg.late_qat_in_eval and model.fake_quant_targets():
        meta["fake_quant_in_eval"] = {"targets": model.fake_quant_targets(), "floor": cfg.late_qat_scale_floor}
    qm = quantize_for_artifact(model.state_dict(), hessians, QuantSettings.from_train_config(cfg),
                               code_bytes=_code_bytes(run) if cfg.quant_target_bytes else 0,
                               model_config=run.model_cfg.to_dict(), layout=cfg.artifact_layout, meta=meta,
                               log=run.log)
    qm.tokenizer = run.tokenizer
    nbytes = save_artifact(path, qm)
    run.log(f"artifact: {path} {nbytes:,} bytes (layout {cfg.artifact_layout}) written in "
            f"{time.perf_counter() - t0:.1f}s")


def _size_and_budget(run: Run, path: Path, art: dict[str, Any]) -> Exception | None:
    """Record the artifact's size and SHA-256, log the size table and check the 16,000,000-byte budget."""
    from pgolf.quant.artifact import read_header
    from pgolf.quant.size import (BUDGET_BYTES, OverBudgetError, artifact_size_table, check_budget,
                                  format_size_table, knob_groups)

    blob = path.read_bytes()
    rows = artifact_size_table(blob)
    code_bytes = _code_bytes(run)
    if run.code_digest:
        art["code_digest"] = run.code_digest
    run.log("size table:\n" + format_size_table(rows, code_bytes))
    art.update(bytes_model=len(blob), sha256=hashlib.sha256(blob).hexdigest(), bytes_code=code_bytes,
               bytes_total=len(blob) + code_bytes, budget=BUDGET_BYTES,
               table=[dict(group=r.group, tensors=r.tensors, params=r.params, bytes=r.bytes,
                           bits_per_weight=round(r.bits_per_weight, 4) if r.params else None) for r in rows])
    over = None
    try:
        art["headroom"] = check_budget(len(blob), code_bytes, knob_groups(read_header(blob)[0]["tensors"]))
    except OverBudgetError as e:
        over = e
        art["headroom"] = BUDGET_BYTES - len(blob) - code_bytes
        run.log("!" * 100)
        run.log(f"ERROR: {e}")
        run.log("!" * 100)
    run.log(f"bytes_total:{art['bytes_total']} bytes_model:{len(blob)} bytes_code:{code_bytes}")
    return over


def _code_bytes(run: Run) -> int:
    """The counted code bytes: ``code_bytes`` when set, else the pgolf-pack bundle of this configuration (measured
    once per run)."""
    if run.cfg.code_bytes:
        return run.cfg.code_bytes
    if run.measured_code_bytes is None:
        try:
            from pgolf.quant.bundle import measure_code_bytes, sources_digest

            run.measured_code_bytes = measure_code_bytes(run.cfg, run.model_cfg)
            run.code_digest = sources_digest()
        except Exception as e:  # never lose a finished run over the code-size estimate
            run.log(f"WARNING: could not measure the code bytes of the pgolf-pack bundle ({type(e).__name__}: {e}); "
                    f"counting 0")
            run.measured_code_bytes = 0
    return run.measured_code_bytes


# ---- the end: complete, or failed with what is kept and how to finish ----------------------------------------

def finish(run: Run, evals: dict[str, Any], art: dict[str, Any] | None) -> dict[str, Any]:
    """The complete summary, written (rank 0) and returned."""
    run.phase = "done"
    run.summary.update(evals, artifact=art, status="complete", pending=[])
    if run.ctx.main:
        atomic_write_json(run.run_dir / "summary.json", run.summary)
    return dict(run.summary)


def record_failure(run: Run, e: BaseException) -> None:
    """Log the failure (traceback too unless a user error) and mark the summary; never masks ``e``."""
    interrupted = isinstance(e, KeyboardInterrupt)
    what = "interrupted (Ctrl-C)" if interrupted else f"{type(e).__name__}: {e}"
    run.log(f"FAILED in phase {run.phase}: {what}")
    if not interrupted and not isinstance(e, UserError):
        run.log("".join(traceback.format_exception(e)).rstrip(), console=False)
    if not run.summary:  # the loop never finished: nothing was trained
        run.summary = dict(run_id=run.run_id, preset=run.cfg.preset, config=run.cfg.to_dict(),
                           model=run.model_cfg.to_dict(), tokenizer=run.tokenizer)
    hint = resume_commands(run)
    run.summary.update(status="interrupted" if interrupted else "failed", failed_phase=run.phase, error=what,
                       resume=hint)
    for line in hint:
        run.log(line)
    if run.ctx.main and run.phase != "done":
        try:
            atomic_write_json(run.run_dir / "summary.json", run.summary)
        except OSError as err:  # a full disk: the log line above says what happened
            run.log(f"could not update {run.run_dir / 'summary.json'}: {err}")


def resume_commands(run: Run) -> list[str]:
    """What is kept and the commands that finish the run from the saved checkpoint (empty before the save)."""
    ckpt = run.summary.get("checkpoint")
    if not ckpt:
        return [] if run.phase in ("setup", "train") else [
            "the trained weights were not saved (save_checkpoint is off, or the save itself failed)"]
    cfg = run.cfg
    art = run.run_dir / cfg.artifact_name
    quant = (f"python -m pgolf.quant --checkpoint {ckpt} --preset {cfg.preset} --data-path {cfg.data_path} "
             f"--tokenizer-path {cfg.tokenizer_path} --out {art} --force" + "".join(
                 f" {setting_name(k).split()[0]} {_flag_value(v)}" for k, v in _quant_differences(cfg).items()))
    score = (f"python -m pgolf.eval --artifact {art} --data {cfg.data_path} --tokenizer {cfg.tokenizer_path} "
             f"--seq-len {cfg.eval_seq_len}" + (f" --sliding --stride {cfg.eval_stride}" if cfg.eval_stride else ""))
    return [f"the trained weights are saved in {ckpt}; to finish the run:", f"  {quant}", f"  {score}"]


_QUANT_FIELDS = ("quant_method", "quant_attn_bits", "quant_attn_k", "quant_mlp_bits", "quant_mlp_k", "quant_embed_bits",
                 "quant_embed_k", "quant_gate_int8", "quant_passthrough_max", "gptq_calibration_batches",
                 "gptq_calibration_tokens", "gptq_block_size", "gptq_damp", "lqer_rank", "lqer_top", "artifact_layout",
                 "gptq_act_order", "gptq_inverse", "gptq_calibration", "gptq_generate_temperature",
                 "quant_matrix_scales", "quant_embed_scales", "quant_embed_gptq", "quant_table_bits",
                 "quant_table_scales", "quant_fp16_keep", "quant_prune_frac", "quant_target_bytes",
                 "train_seq_len", "train_batch_tokens", "eval_seq_len", "eval_stride", "val_max_tokens", "seed")


def _quant_differences(cfg: TrainConfig) -> dict[str, Any]:
    from pgolf.train.config import resolve

    base, _ = resolve(cfg.preset, env={}, flags={})
    return {k: getattr(cfg, k) for k in _QUANT_FIELDS if getattr(cfg, k) != getattr(base, k)}


def _flag_value(v: Any) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


# ---- helpers shared by the phases -------------------------------------------------------------------------------

def compile_warmup(cfg: TrainConfig, model: GPT, opt, micro_step, local_tokens: int, grad_accum: int,
                   ctx: Context, log) -> None:
    """Run ``warmup_steps`` steps on synthetic tokens (looping off, then on) and restore model and optimizer.

    Only random tokens are used, never validation data. This triggers torch.compile for both loop modes
    before the timed run, which then starts from the true initial state.
    """
    from pgolf.compliance_guard import assert_not_validation

    t0 = time.perf_counter()
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    modes = [False, True] if model.config.has_recurrence else [False]
    for looping in modes:
        model.looping_active = looping
        for _ in range(cfg.warmup_steps):
            for _ in range(grad_accum):
                x = torch.randint(0, model.config.vocab_size, (1, local_tokens + 1), generator=gen)
                assert_not_validation(x, context="compile_warmup")
                x, y = x[:, :-1].to(ctx.device), x[:, 1:].to(ctx.device)
                if cfg.loader == "packed":
                    cu = torch.arange(0, local_tokens + 1, cfg.train_seq_len, dtype=torch.int32)
                    cu = torch.cat([cu, torch.full((64 - cu.numel() % 64,), local_tokens, dtype=torch.int32)]) \
                        if cu.numel() % 64 else cu
                    micro_step(x, y, cu.to(ctx.device), cfg.train_seq_len)
                else:
                    micro_step(x.view(-1, cfg.train_seq_len), y.view(-1, cfg.train_seq_len), None, None)
            allreduce_grads(model, ctx)
            opt.step()
            opt.zero_grad()
    model.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    opt.zero_grad()
    model.looping_active = False
    log(f"compile_warmup: {cfg.warmup_steps} steps x {len(modes)} loop modes on synthetic tokens in "
        f"{time.perf_counter() - t0:.1f}s (state restored)")


def make_loader(cfg: TrainConfig, files, ctx: Context, bos_id: int, vocab_size: int | None = None):
    """The training loader named by ``cfg.loader`` for this rank (token ids checked against ``vocab_size``)."""
    if cfg.loader == "packed":
        return DocumentPackedLoader(files, rank=ctx.rank, world_size=ctx.world_size, max_seqlen=cfg.train_seq_len,
                                    bos_id=bos_id, vocab_size=vocab_size)
    if cfg.loader == "shuffled":
        return ShuffledLoader(files, cfg.train_seq_len, rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed,
                              vocab_size=vocab_size)
    if cfg.loader == "sequential":
        return SequentialLoader(files, rank=ctx.rank, world_size=ctx.world_size, vocab_size=vocab_size)
    raise ConfigError(f"{setting_name('loader')} must be 'sequential', 'shuffled' or 'packed', got {cfg.loader!r}")


def allreduce_grads(model: torch.nn.Module, ctx: Context) -> None:
    """Average gradients across ranks in one flat buffer (unused parameters contribute zeros)."""
    if ctx.world_size == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset: offset + n].view_as(p))
        offset += n


class Logger:
    """Prints (rank 0) and writes the run's log file (a fresh file: a run folder is never appended to)."""

    def __init__(self, path: Path | None, sink: Callable[[str], None] | None, main: bool):
        self.main = main
        self.sink = sink or (lambda s: print(s, flush=True))
        self.file = open(path, "w", encoding="utf-8") if path is not None else None

    def __call__(self, msg: str, console: bool = True) -> None:
        if not self.main:
            return
        if console:
            self.sink(msg)
        if self.file:
            try:
                self.file.write(msg + "\n")
                self.file.flush()
            except OSError:  # a full disk must not hide the error being reported
                pass

    def close(self) -> None:
        if self.file:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None


__all__ = ["train", "setup", "train_loop", "save_trained", "calibrate", "final_evals", "write_artifact", "finish",
           "record_failure", "resume_commands", "TrainingDiverged", "setup_distributed", "allreduce_grads",
           "make_loader", "check_run_dir"]
