"""The training loop: record-stack training under a wall-clock cap, then EMA, GPTQ calibration, final eval, the
quantized artifact (written, reloaded from the file alone and evaluated), the size table and a JSON summary.

One process per device (``torchrun --nproc_per_node=N`` for several; NCCL on GPU, gloo on CPU). Each step
reads ``train_batch_tokens / world_size`` tokens per rank in ``grad_accum`` micro-batches, all-reduces the
gradients (average) in one flat buffer, clips the global norm, steps Muon (matrices, NS work split across
ranks) and AdamW (embeddings, scalars), and updates the EMA. The stop decision, the loop switch and the LR
schedule all read one elapsed-time fraction agreed by an all-reduce(MAX), so every rank acts identically.
Validation time is excluded from the training clock. A non-finite loss stops the run with a clear message.

After the loop (:mod:`pgolf.quant`): the Hessians are collected on training batches and their time is added to the
reported train time (the loop stops at cap − gptq_reserve_seconds; a loud warning if the sum passes the cap); the
pre-quant model is evaluated (``final ...`` lines); rank 0 quantizes and writes ``<run_dir>/final_model.pgq``
atomically; every rank rebuilds the model from that file and evaluates it (``final_quant_roundtrip ...``); the
size table and ``bytes_total`` (model + the pgolf-pack bundle's code bytes) are logged, and a total over
16,000,000 bytes raises :class:`pgolf.quant.size.OverBudgetError` (after the summary is written) naming the knob.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from pgolf import kernels
from pgolf.data.loaders import DocumentPackedLoader, SequentialLoader, ShuffledLoader
from pgolf.data.shards import find_shards, load_validation_tokens
from pgolf.data.tokenizer import Tokenizer
from pgolf.eval import evaluate, evaluate_sliding
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.train.config import TrainConfig
from pgolf.train.ema import EMA
from pgolf.train.optim import build_optimizers
from pgolf.train.schedule import WallClock, lr_multiplier, lr_multiplier_iters, muon_momentum
from pgolf.utils import atomic_torch_save, atomic_write_json


class TrainingDiverged(RuntimeError):
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


def train(cfg: TrainConfig, model_cfg: GPTConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``model_cfg`` with ``cfg``; returns the run summary (also written to ``<run_dir>/summary.json``)."""
    ctx = setup_distributed(cfg.device)
    run_id = cfg.run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    run_dir = Path(cfg.run_dir or Path("runs") / run_id)
    logger = Logger(run_dir / "train.log" if ctx.main else None, log, ctx.main)
    try:
        return _train(cfg, model_cfg, ctx, run_id, run_dir, logger)
    finally:
        logger.close()


def _train(cfg: TrainConfig, model_cfg: GPTConfig, ctx: Context, run_id: str, run_dir: Path,
           logger: "Logger") -> dict[str, Any]:
    log = logger
    torch.manual_seed(cfg.seed)
    if not cfg.data_path:
        raise ValueError("no training data: pass --data-path DIR (or DATA_PATH=DIR) with fineweb_train_*.bin and "
                         "fineweb_val_*.bin shards; `python -m pgolf.data.synthetic` builds a small corpus")
    if not cfg.tokenizer_path:
        raise ValueError("no tokenizer: pass --tokenizer-path MODEL (or TOKENIZER_PATH); val_bpb needs its byte tables")
    check_quant_settings(cfg)  # fail before training, not after it
    tok = Tokenizer(cfg.tokenizer_path)
    tok.check_vocab(model_cfg.vocab_size)
    tables = tok.byte_tables(model_cfg.vocab_size)
    train_files = find_shards(cfg.data_path, "train")
    val_tokens = load_validation_tokens(find_shards(cfg.data_path, "val"), cfg.eval_seq_len, model_cfg.vocab_size)
    if cfg.val_max_tokens and val_tokens.numel() - 1 > cfg.val_max_tokens:
        keep = max(cfg.eval_seq_len, cfg.val_max_tokens // cfg.eval_seq_len * cfg.eval_seq_len)
        val_tokens = val_tokens[: keep + 1]

    grad_accum = cfg.grad_accum(ctx.world_size)
    local_tokens = cfg.train_batch_tokens // (ctx.world_size * grad_accum)
    uneven = cfg.train_batch_tokens % (ctx.world_size * grad_accum) or (
        cfg.loader != "packed" and local_tokens % cfg.train_seq_len)  # only packed batches may hold a partial row
    if local_tokens < cfg.train_seq_len or uneven:
        raise ValueError(f"train_batch_tokens={cfg.train_batch_tokens} must split evenly into {ctx.world_size} ranks x "
                         f"{grad_accum} micro-batches of at least train_seq_len={cfg.train_seq_len} tokens"
                         + ("" if cfg.loader == "packed" else " (whole sequences for this loader)"))
    loader = make_loader(cfg, train_files, ctx, model_cfg.bos_id)

    model = GPT(model_cfg).to(ctx.device)
    n_params = model.num_params()
    opt = build_optimizers(model.optimizer_groups(), matrix_lr=cfg.matrix_lr, muon_momentum=cfg.muon_momentum,
                           muon_wd=cfg.muon_wd, row_normalize=cfg.muon_row_normalize, ns_steps=cfg.ns_steps,
                           ns_coefficients=cfg.ns_coefficients, tok_lr=cfg.tok_lr, tok_wd=cfg.tok_wd,
                           scalar_lr=cfg.scalar_lr, scalar_wd=cfg.scalar_wd, betas=tuple(cfg.betas), eps=cfg.adam_eps)
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and ctx.device.type == "cuda")
    if use_compile:
        kernels.preload(ctx.device.type)  # a lazy import inside the traced dispatch cannot be traced
    step_model = torch.compile(model, dynamic=False, fullgraph=True) if use_compile else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" else contextlib.nullcontext()

    log(f"run_id:{run_id} preset:{cfg.preset} params:{n_params} world_size:{ctx.world_size} grad_accum:{grad_accum} "
        f"device:{ctx.device} compile:{use_compile} train_files:{len(train_files)} val_tokens:{val_tokens.numel() - 1}")
    log("config: " + json.dumps({"train": cfg.to_dict(), "model": model_cfg.to_dict()}, sort_keys=True), console=False)

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

    if cfg.warmup_steps > 0:
        compile_warmup(cfg, model, opt, micro_step, local_tokens, grad_accum, ctx, log)

    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    clock = WallClock(cfg.max_wallclock_seconds, cfg.gptq_reserve_seconds,
                      sync=torch.cuda.synchronize if ctx.device.type == "cuda" else None)
    history: list[dict[str, Any]] = []
    tokens_seen = 0
    step = 0
    last_good: dict[str, Any] = {}
    loop_on_step = None
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    agreed_frac = 0.0  # the elapsed-time fraction all ranks agreed on after the previous step
    clock.start()
    while step < cfg.iterations:
        frac = agreed_frac if cfg.max_wallclock_seconds else step / max(1, cfg.iterations)
        if model_cfg.num_loops and not model.looping_active and frac >= model_cfg.loop_activate_frac:
            model.looping_active = True
            loop_on_step = step
            log(f"step:{step} looping:on frac:{frac:.3f}")
        if cfg.warmdown_frac > 0:
            mult = lr_multiplier(frac, cfg.warmdown_frac, cfg.min_lr)
        elif cfg.warmdown_iters > 0:
            elapsed = agreed_frac * clock.budget_ms if clock.budget_ms else clock.elapsed_ms  # same on every rank
            mult = lr_multiplier_iters(step, elapsed, cfg.max_wallclock_seconds * 1000 or None,
                                       cfg.warmdown_iters, cfg.iterations)
        else:
            mult = 1.0
        opt.set_lr_multiplier(mult)
        opt.set_muon_momentum(muon_momentum(step, cfg.muon_momentum_start, cfg.muon_momentum,
                                            cfg.muon_momentum_warmup_steps))
        loss_sum = torch.zeros((), device=ctx.device)
        for _ in range(grad_accum):
            loss_sum += micro_step(*next_micro())
        allreduce_grads(model, ctx)
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
        opt.step()
        opt.zero_grad()
        if ema is not None:
            ema.update(model)
        step += 1
        tokens_seen += cfg.train_batch_tokens
        train_loss = loss_sum / grad_accum
        # one small collective per step: [elapsed fraction, stop flag, non-finite flag], MAX over ranks
        local_stop = float(cfg.max_wallclock_seconds > 0 and clock.elapsed_ms >= clock.budget_ms)
        flags = torch.stack([torch.tensor(clock.frac, device=ctx.device), torch.tensor(local_stop, device=ctx.device),
                             (~torch.isfinite(train_loss)).float()])
        if ctx.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        agreed_frac = float(flags[0])  # loop switch and LR schedule read this, so every rank acts alike
        if flags[2] > 0:
            raise TrainingDiverged(f"training loss became non-finite at step {step} (lr multiplier {mult:.4f}); "
                                   f"last good values: {last_good or 'none (first step)'}. Lower the learning rates "
                                   f"or check the data")
        loss_val = float(train_loss)
        last_good = dict(step=step, train_loss=round(loss_val, 6), train_time_ms=round(clock.elapsed_ms, 1))
        if step <= 10 or step % max(1, cfg.train_log_every) == 0 or flags[1] > 0 or step == cfg.iterations:
            if ctx.world_size > 1:  # log the global mean loss, not rank 0's share
                dist.all_reduce(train_loss)
                loss_val = float(train_loss) / ctx.world_size
                last_good["train_loss"] = round(loss_val, 6)
            ms = clock.elapsed_ms
            log(f"step:{step}/{cfg.iterations} train_loss:{loss_val:.4f} train_time:{ms:.0f}ms "
                f"step_avg:{ms / step:.2f}ms tok/s:{tokens_seen / max(ms, 1e-9) * 1000:.0f}")
            history.append(dict(last_good))
        if cfg.val_loss_every and step % cfg.val_loss_every == 0 and flags[1] == 0:
            with clock.paused():
                r = evaluate(model, val_tokens, tables, seq_len=cfg.eval_seq_len, batch_seqs=cfg.eval_batch_seqs,
                             doc_isolated=cfg.eval_doc_isolated,
                             autocast_dtype=torch.bfloat16 if ctx.device.type == "cuda" else None)
            log(f"step:{step}/{cfg.iterations} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f} "
                f"train_time:{clock.elapsed_ms:.0f}ms")
        if flags[1] > 0:
            log(f"stopping_early: wallclock_cap train_time:{clock.elapsed_ms:.0f}ms step:{step}/{cfg.iterations}")
            break
    train_ms = clock.elapsed_ms
    peak_mem = torch.cuda.max_memory_allocated(ctx.device) // 2**20 if ctx.device.type == "cuda" else None
    if peak_mem is not None:
        log(f"peak memory allocated: {peak_mem} MiB")

    if ema is not None:
        ema.copy_to(model)
    if model_cfg.num_loops:
        model.looping_active = True  # looping stays on for calibration and every eval
    autocast_dtype = torch.bfloat16 if ctx.device.type == "cuda" else None

    # GPTQ calibration reads training data, so its time counts as training time (reference-stack 5.6): the loop
    # stopped at cap - gptq_reserve_seconds and the calibration must fit in the reserve.
    quantize = cfg.quant_method != "none"
    hessians, n_cal, calib_s = None, 0, 0.0
    if cfg.quant_method == "gptq":
        from pgolf.quant.calibrate import calibration_batches, timed_calibration

        cal_tokens = cfg.gptq_calibration_tokens or cfg.train_batch_tokens // ctx.world_size
        batches = calibration_batches(train_files, cfg.train_seq_len, cal_tokens, cfg.gptq_calibration_batches,
                                      rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed)
        hessians, n_cal, calib_s = timed_calibration(model, batches, device=ctx.device,
                                                     autocast_dtype=autocast_dtype)
        log(f"gptq_calibration: {len(hessians)} hessians from {cfg.gptq_calibration_batches} batches x "
            f"{cal_tokens // cfg.train_seq_len * cfg.train_seq_len} training tokens per rank in {calib_s:.2f}s "
            f"(reserve {cfg.gptq_reserve_seconds:.1f}s); train_time with calibration: "
            f"{train_ms + 1000 * calib_s:.0f}ms")
    total_train_ms = train_ms + 1000 * calib_s
    over_cap = bool(cfg.max_wallclock_seconds and total_train_ms > 1000 * cfg.max_wallclock_seconds)
    if over_cap:
        log("!" * 100)
        log(f"WARNING: training + GPTQ calibration took {total_train_ms / 1000:.2f}s, over the "
            f"{cfg.max_wallclock_seconds:.0f}s cap by {total_train_ms / 1000 - cfg.max_wallclock_seconds:.2f}s: "
            f"raise gptq_reserve_seconds (now {cfg.gptq_reserve_seconds:g}) to at least {calib_s + 1:.0f} or use "
            f"fewer gptq_calibration_batches (now {cfg.gptq_calibration_batches}). This run is NOT compliant.")
        log("!" * 100)

    t0 = time.perf_counter()
    final = evaluate(model, val_tokens, tables, seq_len=cfg.eval_seq_len, batch_seqs=cfg.eval_batch_seqs,
                     doc_isolated=cfg.eval_doc_isolated, autocast_dtype=autocast_dtype)
    log(f"final val_loss:{final.val_loss:.4f} val_bpb:{final.val_bpb:.4f} eval_time:{final.seconds * 1000:.0f}ms")
    sliding = None
    if cfg.eval_stride:
        sliding = evaluate_sliding(model, val_tokens, tables, window=cfg.eval_seq_len, stride=cfg.eval_stride,
                                   batch_windows=cfg.eval_batch_seqs,
                                   doc_isolated=cfg.eval_doc_isolated, autocast_dtype=autocast_dtype)
        log(f"final_sliding val_loss:{sliding.val_loss:.4f} val_bpb:{sliding.val_bpb:.4f} "
            f"eval_time:{sliding.seconds * 1000:.0f}ms")
    eval_seconds = time.perf_counter() - t0

    art = None
    over_budget: Exception | None = None
    if quantize:
        art, over_budget = _write_and_eval_artifact(cfg, model_cfg, model, hessians, n_cal, calib_s, ctx, run_dir,
                                                    val_tokens, tables, autocast_dtype, log)

    summary = dict(run_id=run_id, preset=cfg.preset, params=n_params, world_size=ctx.world_size, steps=step,
                   train_time_ms=round(total_train_ms, 1), train_loop_ms=round(train_ms, 1),
                   calibration_s=round(calib_s, 3), over_cap=over_cap, step_avg_ms=round(train_ms / max(step, 1), 3),
                   tokens=tokens_seen, tokens_per_s=round(tokens_seen / max(train_ms, 1e-9) * 1000, 1),
                   loop_on_step=loop_on_step, peak_mem_mib=peak_mem, eval_time_s=round(eval_seconds, 3),
                   val_loss=final.val_loss, val_bpb=final.val_bpb, val=final.to_dict(),
                   sliding=sliding.to_dict() if sliding else None, artifact=art, history=history,
                   device=str(ctx.device), torch=torch.__version__, config=cfg.to_dict(), model=model_cfg.to_dict())
    if ctx.main:
        if cfg.save_checkpoint:
            atomic_torch_save({"model": model.state_dict(), "config": model_cfg.to_dict()}, run_dir / "final_model.pt")
            summary["checkpoint"] = str(run_dir / "final_model.pt")
        atomic_write_json(run_dir / "summary.json", summary)
    if over_budget is not None and cfg.budget_check == "error":
        raise over_budget
    summary["model_obj"] = model
    return summary


def check_quant_settings(cfg: TrainConfig) -> None:
    """ValueError naming the bad quantization setting (method, layout, budget check, bits and k per group)."""
    from pgolf.quant.artifact import LAYOUTS
    from pgolf.quant.quantize import QuantSettings

    if cfg.quant_method not in ("gptq", "rtn", "none"):
        raise ValueError(f"quant_method must be 'gptq', 'rtn' or 'none', got {cfg.quant_method!r}")
    if cfg.artifact_layout not in LAYOUTS:
        raise ValueError(f"artifact_layout must be one of {', '.join(LAYOUTS)}, got {cfg.artifact_layout!r}")
    if cfg.budget_check not in ("error", "warn"):
        raise ValueError(f"budget_check must be 'error' or 'warn', got {cfg.budget_check!r}")
    if cfg.quant_method == "gptq" and cfg.gptq_calibration_batches < 1:
        raise ValueError(f"gptq_calibration_batches must be at least 1, got {cfg.gptq_calibration_batches}")
    QuantSettings.from_train_config(cfg)  # bit widths 2..8, positive k


def _write_and_eval_artifact(cfg: TrainConfig, model_cfg: GPTConfig, model: GPT, hessians, n_cal: int,
                             calib_s: float, ctx: Context, run_dir: Path, val_tokens, tables,
                             autocast_dtype, log) -> tuple[dict[str, Any], Exception | None]:
    """Quantize (rank 0), write the artifact atomically, rebuild the model from the file on every rank and
    evaluate it; log the size table and check the budget. Returns (artifact summary, over-budget error or None)."""
    from pgolf.quant.artifact import build_model, read_header, save_artifact
    from pgolf.quant.quantize import QuantSettings, quantize_state
    from pgolf.quant.size import (BUDGET_BYTES, OverBudgetError, artifact_size_table, check_budget,
                                  format_size_table, knob_groups)

    path = run_dir / cfg.artifact_name
    settings = QuantSettings.from_train_config(cfg)
    if ctx.main:
        t0 = time.perf_counter()
        qm = quantize_state(model.state_dict(), hessians, settings, model_config=model_cfg.to_dict(),
                            layout=cfg.artifact_layout,
                            meta={"n_cal": n_cal, "eval_seq_len": cfg.eval_seq_len, "eval_stride": cfg.eval_stride},
                            log=log)
        nbytes = save_artifact(path, qm)
        log(f"artifact: {path} {nbytes:,} bytes (layout {cfg.artifact_layout}) written in "
            f"{time.perf_counter() - t0:.1f}s")
    if ctx.world_size > 1:
        dist.barrier()
    t0 = time.perf_counter()
    qmodel = build_model(path, device=ctx.device)
    load_s = time.perf_counter() - t0
    rt = evaluate(qmodel, val_tokens, tables, seq_len=cfg.eval_seq_len, batch_seqs=cfg.eval_batch_seqs,
                  doc_isolated=cfg.eval_doc_isolated, autocast_dtype=autocast_dtype)
    log(f"final_quant_roundtrip val_loss:{rt.val_loss:.4f} val_bpb:{rt.val_bpb:.4f} "
        f"eval_time:{rt.seconds * 1000:.0f}ms")
    log(f"final_quant_roundtrip_exact val_loss:{rt.val_loss:.8f} val_bpb:{rt.val_bpb:.8f}")
    rt_sliding = None
    if cfg.eval_stride:
        rt_sliding = evaluate_sliding(qmodel, val_tokens, tables, window=cfg.eval_seq_len, stride=cfg.eval_stride,
                                      batch_windows=cfg.eval_batch_seqs,
                                      doc_isolated=cfg.eval_doc_isolated, autocast_dtype=autocast_dtype)
        log(f"final_quant_sliding_window val_loss:{rt_sliding.val_loss:.4f} val_bpb:{rt_sliding.val_bpb:.4f} "
            f"eval_time:{rt_sliding.seconds * 1000:.0f}ms")
        log(f"final_quant_sliding_window_exact val_loss:{rt_sliding.val_loss:.8f} val_bpb:{rt_sliding.val_bpb:.8f}")
    del qmodel
    art: dict[str, Any] = dict(path=str(path), layout=cfg.artifact_layout, settings=settings.to_dict(), n_cal=n_cal,
                               load_s=round(load_s, 3), val_loss=rt.val_loss, val_bpb=rt.val_bpb, val=rt.to_dict(),
                               sliding=rt_sliding.to_dict() if rt_sliding else None,
                               eval_time_s=round(rt.seconds + (rt_sliding.seconds if rt_sliding else 0.0), 3))
    over: Exception | None = None
    if ctx.main:
        blob = path.read_bytes()
        rows = artifact_size_table(blob)
        code_bytes = cfg.code_bytes
        if code_bytes <= 0:
            try:
                from pgolf.quant.bundle import measure_code_bytes, sources_digest

                code_bytes = measure_code_bytes(cfg, model_cfg)
                art["code_digest"] = sources_digest()
            except Exception as e:  # never lose a finished run over the code-size estimate
                log(f"WARNING: could not measure the code bytes of the pgolf-pack bundle ({type(e).__name__}: {e}); "
                    f"counting 0")
                code_bytes = 0
        log("size table:\n" + format_size_table(rows, code_bytes))
        art.update(bytes_model=len(blob), bytes_code=code_bytes, bytes_total=len(blob) + code_bytes,
                   budget=BUDGET_BYTES, table=[dict(group=r.group, tensors=r.tensors, params=r.params, bytes=r.bytes,
                                                   bits_per_weight=round(r.bits_per_weight, 4) if r.params else None)
                                              for r in rows])
        try:
            art["headroom"] = check_budget(len(blob), code_bytes, knob_groups(read_header(blob)[0]["tensors"]))
        except OverBudgetError as e:
            over = e
            art["headroom"] = BUDGET_BYTES - len(blob) - code_bytes
            log("!" * 100)
            log(f"ERROR: {e}")
            log("!" * 100)
        log(f"bytes_total:{art['bytes_total']} bytes_model:{len(blob)} bytes_code:{code_bytes}")
    return art, over


def compile_warmup(cfg: TrainConfig, model: GPT, opt, micro_step, local_tokens: int, grad_accum: int,
                   ctx: Context, log) -> None:
    """Run ``warmup_steps`` steps on synthetic tokens (looping off, then on) and restore model and optimizer.

    Only random tokens are used, never validation data. This triggers torch.compile for both loop modes
    before the timed run, which then starts from the true initial state.
    """
    from pgolf.eval.ledger import assert_not_validation

    t0 = time.perf_counter()
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    modes = [False, True] if model.config.num_loops else [False]
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


def make_loader(cfg: TrainConfig, files, ctx: Context, bos_id: int):
    """The training loader named by ``cfg.loader`` for this rank."""
    if cfg.loader == "packed":
        return DocumentPackedLoader(files, rank=ctx.rank, world_size=ctx.world_size, max_seqlen=cfg.train_seq_len,
                                    bos_id=bos_id)
    if cfg.loader == "shuffled":
        return ShuffledLoader(files, cfg.train_seq_len, rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed)
    if cfg.loader == "sequential":
        return SequentialLoader(files, rank=ctx.rank, world_size=ctx.world_size)
    raise ValueError(f"loader must be 'sequential', 'shuffled' or 'packed', got {cfg.loader!r}")


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


def setup_distributed(device: str = "auto") -> Context:
    """Init the process group from torchrun's variables (NCCL on CUDA, gloo on CPU); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Context(rank, world, local_rank, dev)


class Logger:
    """Prints (rank 0) and appends to the run's log file."""

    def __init__(self, path: Path | None, sink: Callable[[str], None] | None, main: bool):
        self.main = main
        self.sink = sink or (lambda s: print(s, flush=True))
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")

    def __call__(self, msg: str, console: bool = True) -> None:
        if not self.main:
            return
        if console:
            self.sink(msg)
        if self.file:
            self.file.write(msg + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


__all__ = ["train", "TrainingDiverged", "setup_distributed", "allreduce_grads", "make_loader"]
