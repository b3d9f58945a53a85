"""``pgolf-bench step``: one full training step of a preset, kernels on vs the compiled reference, and what that
means for the 600 s training budget on 8 GPUs.

The step is the trainer's (:mod:`pgolf.train.trainer`) on one device: bf16 autocast forward + backward of
``model(x, y, cu_seqlens=...)`` (fp32 master weights), global-norm clip, Muon (batched Newton-Schulz through
``pgolf.kernels.newton_schulz``), fused AdamW, zero_grad, EMA update, LR/momentum schedule. The batch is what one
of 8 ranks sees: ``train_batch_tokens / 8`` tokens with grad_accum 1 (98,304 for ``sota``), random tokens split
into ``train_seq_len`` documents (cu_seqlens, as the packed loader) or rows; data loading is not timed.

Variants, each a fresh model with the same seed, timed in the same process:

- ``auto``: ``use_backend("auto")`` — Triton kernels where an op has one on this device (``PGOLF_KERNELS=auto``);
- ``reference``: ``use_backend("reference")`` — the pure-PyTorch ops;

both ``torch.compile(model, dynamic=False, fullgraph=True)`` as the trainer does on CUDA (``--compile``). Each
variant runs with depth recurrence off and on (the trainer switches it on at ``loop_activate_frac`` of the wall
clock). Per mode: ``warmup`` untimed steps (the first one compiles), then ``steps`` timed steps, CUDA events at the
phase boundaries and one synchronize per step (the trainer syncs every step to read the loss).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pgolf.bench.env import reset_device
from pgolf.bench.history import metric

CHALLENGE_SECONDS = 600.0
WORLD = 8
# Bus bandwidth of NCCL ring collectives between 8 H100 SXM GPUs over NVLink 4 (450 GB/s per direction per GPU);
# nccl-tests report about 350-480 GB/s busbw for large all-reduces. The lower end, for ~100 MB messages.
DEFAULT_LINK_GBPS = 350.0
DEFAULT_LATENCY_US = 20.0   # fixed cost per collective launch + sync
PHASES = ("fwd_bwd", "clip", "muon", "adam", "ema_sched")
RECORD_R6 = dict(steps=4945, ms_per_step=121.3, gpus="8xH100 80GB SXM", source="reference-stack section 7, R6 s42")


@dataclass
class StepSetup:
    preset: str
    model_cfg: Any
    train_cfg: Any
    tokens: int          # tokens per step on this device (= per rank)
    seq_len: int         # document / row length
    packed: bool
    smoke: bool

    def describe(self) -> str:
        c, t = self.model_cfg, self.train_cfg
        enc, dec = c.layer_plan(looping=True)
        loop = (f"loop L{c.loop_start}-{c.loop_end} x{c.num_loops + 1} ({len(enc) + len(dec)} virtual layers when on, "
                f"on at {c.loop_activate_frac:.0%} of the wall clock)" if c.num_loops else
                "appended recurrence" if c.has_recurrence else "no depth recurrence")
        share = self.tokens == t.train_batch_tokens // WORLD
        layout = (f"{self.tokens // self.seq_len} documents of {self.seq_len} tokens packed in one row (cu_seqlens)"
                  if self.packed else f"{self.tokens // self.seq_len} rows of {self.seq_len}")
        return (f"preset {self.preset}: {c.num_layers} layers, d={c.model_dim}, {c.num_heads}/{c.num_kv_heads} heads, "
                f"MLP {c.mlp_hidden}, vocab {c.vocab_size}, {loop}, parallel residuals {c.parallel_residual}, "
                f"XSA last {c.xsa_last_n}\n"
                f"batch: {self.tokens:,} tokens per GPU "
                + (f"= train_batch_tokens {t.train_batch_tokens:,} / {WORLD} ranks" if share else
                   f"(shrunk; one rank's share would be {t.train_batch_tokens // WORLD:,} = train_batch_tokens / {WORLD})")
                + f", grad_accum 1; {layout}\n"
                f"optimizer: Muon ({t.ns_coefficients} NS{t.ns_steps}, lr {t.matrix_lr}) + AdamW, grad clip "
                f"{t.grad_clip_norm}, EMA {t.ema_decay}; bf16 autocast on CUDA, fp32 master weights")


def build_setup(preset: str = "sota", *, smoke: bool = False, tokens: int | None = None,
                seq_len: int | None = None) -> StepSetup:
    from pgolf.train.config import resolve

    train_cfg, model_cfg = resolve(preset, env={}, flags={})
    local = train_cfg.train_batch_tokens // WORLD
    s = seq_len or train_cfg.train_seq_len
    if smoke:
        s = min(s, 256)
        local = min(local, 2 * s)
    n = tokens or local
    n = max(s, n // s * s)  # whole documents
    return StepSetup(preset, model_cfg, train_cfg, n, s, train_cfg.loader == "packed", smoke)


# ------------------------------------------------------------------------------------------------------------
# analytic counts

def matmul_params(model_cfg, looping: bool) -> int:
    """Weights multiplied per token in one forward: every block matrix once per virtual layer, plus the head."""
    c = model_cfg
    d, hd = c.model_dim, c.mlp_hidden
    per_layer = d * d + 2 * d * c.kv_dim + d * d + 2 * d * hd  # c_q, c_k, c_v, proj, fc, mlp.proj
    enc, dec = c.layer_plan(looping)
    return per_layer * (len(enc) + len(dec)) + c.vocab_size * d


def flops_per_step(model_cfg, tokens: int, seq_len: int, looping: bool) -> float:
    """Training FLOPs of one step: 6·T·P_mm + 6·T·S·d·L_virtual (causal attention; backward = 2× forward).

    Forward per token: 2·P_mm for the matmuls; per layer, QKᵀ and PV over an average causal context of S/2 keys
    cost 2·(2·d·S/2) = 2·d·S (d = heads × head_dim = model_dim).
    """
    enc, dec = model_cfg.layer_plan(looping)
    L = len(enc) + len(dec)
    return 6.0 * tokens * matmul_params(model_cfg, looping) + 6.0 * tokens * seq_len * model_cfg.model_dim * L


def muon_buckets(model) -> list[tuple[tuple[int, int], int]]:
    """[((rows, cols), count)] of the Muon parameters grouped by shape, as Muon batches them."""
    shapes: dict[tuple[int, int], int] = {}
    for _, p in model.optimizer_groups()["muon"]:
        shapes[tuple(p.shape)] = shapes.get(tuple(p.shape), 0) + 1
    return sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1])


# ------------------------------------------------------------------------------------------------------------
# timing

class _Marks:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def durations_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def _batches(setup: StepSetup, vocab: int, device: torch.device, n: int = 2) -> list[tuple]:
    g = torch.Generator().manual_seed(1234)
    out = []
    T, S = setup.tokens, setup.seq_len
    for _ in range(n):
        ids = torch.randint(0, vocab, (1, T + 1), generator=g)
        x, y = ids[:, :-1], ids[:, 1:]
        if setup.packed:
            cu = torch.arange(0, T + 1, S, dtype=torch.int32)
            if cu[-1] != T:
                cu = torch.cat([cu, torch.tensor([T], dtype=torch.int32)])
            if cu.numel() % 64:  # the packed loader pads cu_seqlens to a multiple of 64 (few compiled shapes)
                cu = torch.cat([cu, torch.full((64 - cu.numel() % 64,), T, dtype=torch.int32)])
            out.append((x.to(device), y.to(device), cu.to(device), S))
        else:
            out.append((x.reshape(-1, S).to(device), y.reshape(-1, S).to(device), None, None))
    return out


def time_variant(setup: StepSetup, variant: str, device: torch.device, *, steps: int, warmup: int,
                 compile_model: bool, log: Callable[[str], None] = print, out: dict[str, Any] | None = None,
                 on_mode: Callable[[], None] | None = None, loops: tuple[bool, ...] = (False, True)) -> dict[str, Any]:
    """Time ``steps`` training steps under backend ``variant`` ('auto' | 'reference'), loop off then on (of
    ``loops``; a preset without depth recurrence has only 'off').

    Results go into ``out`` (a new dict by default) as they come; ``on_mode()`` is called after each loop mode.
    """
    from pgolf import kernels
    from pgolf.model.gpt import GPT
    from pgolf.train.ema import EMA
    from pgolf.train.optim import build_optimizers
    from pgolf.train.schedule import lr_multiplier, muon_momentum

    t, c = setup.train_cfg, setup.model_cfg
    out = {} if out is None else out
    out.update(variant=variant, compiled=compile_model, modes={}, error=None)
    reset_device(device)
    with kernels.use_backend(variant):
        out["ops"] = {op: _resolved(kernels, op, device) for op in kernels.OPS}
        torch.manual_seed(t.seed)
        model = GPT(c).to(device)
        opt = build_optimizers(model.optimizer_groups(), matrix_lr=t.matrix_lr, muon_momentum=t.muon_momentum,
                               muon_wd=t.muon_wd, row_normalize=t.muon_row_normalize, ns_steps=t.ns_steps,
                               ns_coefficients=t.ns_coefficients, tok_lr=t.tok_lr, tok_wd=t.tok_wd,
                               scalar_lr=t.scalar_lr, scalar_wd=t.scalar_wd, betas=tuple(t.betas), eps=t.adam_eps)
        ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
        step_model = torch.compile(model, dynamic=False, fullgraph=True) if compile_model else model
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        batches = _batches(setup, c.vocab_size, device)
        params = list(model.parameters())
        out["grad_bytes"] = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        out["muon_buckets"] = [[list(s), n] for s, n in muon_buckets(model)]
        counter = [0]

        def one_step(marks: _Marks | None) -> torch.Tensor:
            k = counter[0]
            counter[0] += 1
            if marks:
                marks.mark()
            opt.set_lr_multiplier(lr_multiplier(0.5, t.warmdown_frac, t.min_lr) if t.warmdown_frac > 0 else 1.0)
            opt.set_muon_momentum(muon_momentum(k, t.muon_momentum_start, t.muon_momentum,
                                                t.muon_momentum_warmup_steps))
            x, y, cu, ms = batches[k % len(batches)]
            with amp:
                loss = step_model(x, y, cu_seqlens=cu, max_seqlen=ms)
            loss.backward()
            if marks:
                marks.mark()
            if t.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip_norm)
            if marks:
                marks.mark()
            if opt.muon is not None:
                opt.muon.step()
            if marks:
                marks.mark()
            if opt.adam is not None:
                opt.adam.step()
            if marks:
                marks.mark()
            opt.zero_grad()
            if ema is not None:
                ema.update(model)
            if marks:
                marks.mark()
            return loss.detach()

        modes = [m for m in loops if c.has_recurrence or not m]
        for looping in modes:
            name = "loop_on" if looping else "loop_off"
            model.looping_active = looping
            res: dict[str, Any] = dict(looping=looping, error=None)
            out["modes"][name] = res
            try:
                tw = time.perf_counter()
                for i in range(max(1, warmup)):
                    loss = one_step(None)
                    if i == 0:
                        float(loss)
                        res["first_step_s"] = round(time.perf_counter() - tw, 3)
                float(loss)
                res["warmup_s"] = round(time.perf_counter() - tw, 3)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                walls, totals, phases = [], [], {p: [] for p in PHASES}
                losses = []
                for _ in range(steps):
                    marks = _Marks(device)
                    t0 = time.perf_counter()
                    loss = one_step(marks)
                    losses.append(float(loss))  # the trainer reads the loss every step (one sync)
                    walls.append((time.perf_counter() - t0) * 1e3)
                    d = marks.durations_ms()
                    for p, v in zip(PHASES, d):
                        phases[p].append(v)
                    totals.append(sum(d))
                res.update(_summarize(walls, totals, phases, setup, c, looping))
                res["loss_last"] = losses[-1]
                res["finite"] = all(math.isfinite(v) for v in losses)
                if device.type == "cuda":
                    res["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                    res["reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
                log(f"[step] {variant} {name}: {res['ms_per_step']:.2f} ms/step "
                    f"({res['tokens_per_s']:,.0f} tok/s), first step {res['first_step_s']:.1f}s")
            except Exception as e:  # noqa: BLE001 - report and go on with the other mode / variant
                res["error"] = f"{type(e).__name__}: {e}"[:800]
                log(f"[step] {variant} {name}: FAILED {res['error']}")
            if on_mode is not None:
                on_mode()
        model.looping_active = False
    del model, opt, ema, step_model, batches
    reset_device(device)
    return out


def _resolved(kernels, op: str, device: torch.device) -> str:
    try:
        return kernels.implementation(op, device.type)[0]
    except Exception as e:  # noqa: BLE001
        return f"unavailable ({e})"[:200]


def _summarize(walls: list[float], totals: list[float], phases: dict[str, list[float]], setup: StepSetup, c,
               looping: bool) -> dict:
    """ms_per_step: median wall time of a step up to reading its loss (what the trainer's clock sees);
    device_ms: median of the same span on the device timeline (CUDA events); phases_ms: median per phase."""
    med = statistics.median(walls)
    flops = flops_per_step(c, setup.tokens, setup.seq_len, looping)
    return dict(steps=len(walls), ms_per_step=med, ms_mean=statistics.fmean(walls), ms_min=min(walls),
                ms_max=max(walls), device_ms=statistics.median(totals), tokens_per_s=setup.tokens / med * 1e3,
                phases_ms={p: statistics.median(v) for p, v in phases.items()},
                flops_per_step=flops, tflops=flops / med / 1e9)


# ------------------------------------------------------------------------------------------------------------
# projection to the challenge

PROJECTION_FORMULA = """\
t8(mode)  = t1 - t_muon*(1 - f_ns) + (1 - overlap)*(t_ar + t_ag) + n_coll*latency
  t1      = measured single-GPU step (median), same per-GPU batch as one of 8 ranks
  t_muon  = measured Muon step; f_ns = share of the Newton-Schulz work one rank keeps when each same-shape
            bucket of n matrices is split into shards of ceil(n/W) (work of an m x k matrix ~ m*k*min(m,k))
  t_ar    = 2*(W-1)/W * grad_bytes / B       ring all-reduce of the flat gradient buffer (the trainer's dtype)
  t_ag    = sum over buckets (W-1)/W * W*ceil(n/W)*m*k*2 / B   ring all-gather of the bf16 Muon updates
  n_coll  = 1 all-reduce + one all-gather per bucket + 1 flag all-reduce(MAX) per step
steps     = f*T / t8(loop off) + (1 - f)*T / t8(loop on),  T = 600 s - GPTQ reserve, f = loop_activate_frac
            (the trainer switches the loop on at that fraction of the wall clock; without loops: T / t8)"""


def project(variant_result: dict[str, Any], setup: StepSetup, *, world: int = WORLD,
            link_gbps: float = DEFAULT_LINK_GBPS, latency_us: float = DEFAULT_LATENCY_US,
            overlap: float = 0.0, seconds: float = CHALLENGE_SECONDS) -> dict[str, Any] | None:
    """Steps that fit in the training budget on ``world`` GPUs of this kind (see ``PROJECTION_FORMULA``)."""
    modes = variant_result.get("modes", {})
    if not modes or any(m.get("error") or "ms_per_step" not in m for m in modes.values()):
        return None
    B = link_gbps * 1e9
    grad_bytes = variant_result["grad_bytes"]
    buckets = variant_result["muon_buckets"]
    t_ar = 2 * (world - 1) / world * grad_bytes / B * 1e3
    ag_bytes = sum(world * -(-n // world) * r * k * 2 for (r, k), n in buckets)
    t_ag = (world - 1) / world * ag_bytes / B * 1e3
    work = sum(n * r * k * min(r, k) for (r, k), n in buckets)
    f_ns = (sum(-(-n // world) * r * k * min(r, k) for (r, k), n in buckets) / work) if work else 1.0
    n_coll = 2 + len(buckets)
    comm = (1 - overlap) * (t_ar + t_ag) + n_coll * latency_us / 1e3
    reserve = float(setup.train_cfg.gptq_reserve_seconds)
    T = seconds - reserve
    per_mode = {}
    for name, m in modes.items():
        t_muon = m["phases_ms"]["muon"]
        t8 = m["ms_per_step"] - t_muon * (1 - f_ns) + comm
        per_mode[name] = dict(t1_ms=m["ms_per_step"], t_muon_ms=t_muon, t8_ms=t8,
                              tokens_per_s_8gpu=setup.tokens * world / t8 * 1e3)
    c = setup.model_cfg
    if "loop_on" in per_mode:
        f = float(c.loop_activate_frac)
        s_off = f * T / (per_mode["loop_off"]["t8_ms"] / 1e3)
        s_on = (1 - f) * T / (per_mode["loop_on"]["t8_ms"] / 1e3)
    else:
        f, s_off, s_on = 1.0, T / (per_mode["loop_off"]["t8_ms"] / 1e3), 0.0
    steps = s_off + s_on
    partial = c.has_recurrence and "loop_on" not in per_mode  # loop on not timed: the steps are an upper bound
    return dict(world=world, partial=partial, link_gbps=link_gbps, latency_us=latency_us, overlap=overlap, budget_s=seconds,
                reserve_s=reserve, train_s=T, loop_frac=f, grad_bytes=grad_bytes, allgather_bytes=ag_bytes,
                t_allreduce_ms=t_ar, t_allgather_ms=t_ag, f_ns=f_ns, n_collectives=n_coll, comm_ms=comm,
                modes=per_mode, steps_loop_off=s_off, steps_loop_on=s_on, steps=steps,
                avg_ms_per_step=T * 1e3 / steps, tokens=steps * setup.tokens * world,
                batch_tokens=setup.tokens * world, formula=PROJECTION_FORMULA)


# ------------------------------------------------------------------------------------------------------------

def run_step(preset: str = "sota", *, smoke: bool = False, device: torch.device, steps: int | None = None,
             warmup: int | None = None, variants: tuple[str, ...] = ("auto", "reference"), compile_mode: str = "auto",
             tokens: int | None = None, link_gbps: float = DEFAULT_LINK_GBPS, latency_us: float = DEFAULT_LATENCY_US,
             overlap: float = 0.0, log: Callable[[str], None] = print,
             on_progress: Callable[[dict[str, Any]], None] | None = None,
             loops: tuple[bool, ...] = (False, True)) -> dict[str, Any]:
    """The whole step benchmark: setup, measured peak, every variant, projections (``loops``: which depth-recurrence
    modes to time, off and on by default; the projection needs both)."""
    from pgolf.bench.env import measure_matmul_peak

    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    setup = build_setup(preset, smoke=smoke, tokens=tokens)
    steps = steps if steps is not None else (3 if smoke else 30)
    warmup = warmup if warmup is not None else (1 if smoke else 5)
    compile_model = compile_mode == "on" or (compile_mode == "auto" and device.type == "cuda")
    from pgolf.model.gpt import GPT

    with torch.device("meta"):
        n_params = GPT(setup.model_cfg).num_params()
    log(setup.describe())
    log(f"params: {n_params:,}  compile: {compile_model}  steps: {steps} timed + {warmup} warm-up per loop mode")
    peak = measure_matmul_peak(device, smoke=smoke)
    log(f"measured matmul peak: {peak['tflops']:.1f} TFLOP/s ({peak['dtype']}, n={peak['n']}, {peak['method']})")
    result: dict[str, Any] = dict(preset=preset, smoke=smoke, params=n_params, tokens_per_step=setup.tokens,
                                  seq_len=setup.seq_len, packed=setup.packed, model_description=setup.describe(),
                                  model=setup.model_cfg.to_dict(), compile=compile_model, steps=steps,
                                  warmup=warmup, peak=peak, variants={}, projection={}, seconds=None)
    for v in variants:
        log(f"[step] variant {v} ...")
        vr: dict[str, Any] = {}
        result["variants"][v] = vr

        def update(vr=vr, v=v) -> None:
            for m in vr.get("modes", {}).values():
                if "tflops" in m:
                    m["mfu"] = m["tflops"] / peak["tflops"]
            result["projection"][v] = project(vr, setup, link_gbps=link_gbps, latency_us=latency_us,
                                              overlap=overlap)
            if on_progress is not None:
                on_progress(result)

        try:
            time_variant(setup, v, device, steps=steps, warmup=warmup, compile_model=compile_model, log=log, out=vr,
                         on_mode=update, loops=loops)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory building the model: report, go on
            vr["error"] = f"{type(e).__name__}: {e}"[:800]
            vr.setdefault("modes", {})
            log(f"[step] variant {v} FAILED: {vr['error']}")
            reset_device(device)
        update()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def metrics(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    p = result["preset"]
    out: dict[str, dict[str, Any]] = {f"step/{p}/measured_peak_tflops": metric(result["peak"]["tflops"], "TFLOP/s", None)}
    for v, vr in result["variants"].items():
        for name, m in vr["modes"].items():
            if m.get("error") or "ms_per_step" not in m:
                continue
            k = f"step/{p}/{v}/{name}"
            out[f"{k}/ms_per_step"] = metric(m["ms_per_step"], "ms", "lower")
            out[f"{k}/tokens_per_s"] = metric(m["tokens_per_s"], "tok/s", "higher")
            out[f"{k}/mfu"] = metric(m.get("mfu"), "fraction", None)
            if m.get("peak_mib") is not None:
                out[f"{k}/peak_mib"] = metric(m["peak_mib"], "MiB", "lower")
            out[f"{k}/first_step_s"] = metric(m.get("first_step_s"), "s", None)
        pr = result["projection"].get(v)
        if pr:
            out[f"step/{p}/{v}/projected_steps_600s"] = metric(pr["steps"], "steps", "higher")
    ref, auto = result["variants"].get("reference"), result["variants"].get("auto")
    if ref and auto:
        for name in auto["modes"]:
            a, r = auto["modes"][name].get("ms_per_step"), ref["modes"].get(name, {}).get("ms_per_step")
            if a and r:
                out[f"step/{p}/speedup_auto_vs_reference/{name}"] = metric(r / a, "x", None)
    return out


def format_report(result: dict[str, Any]) -> str:
    lines = []
    head = ("variant", "loop", "ms/step", "tok/s", "TFLOP/s", "MFU", "peak MiB", "fwd+bwd", "muon", "adam", "1st step s")
    rows = [head]
    for v, vr in result["variants"].items():
        for name, m in vr["modes"].items():
            if m.get("error") or "ms_per_step" not in m:
                rows.append((v, name.replace("loop_", ""), "error", "", "", "", "", "", "", "", ""))
                continue
            ph = m["phases_ms"]
            rows.append((v, name.replace("loop_", ""), f"{m['ms_per_step']:.2f}", f"{m['tokens_per_s']:,.0f}",
                         _num(m['tflops']), f"{m['mfu'] * 100:.1f}%",
                         f"{m['peak_mib']:,.0f}" if m.get("peak_mib") is not None else "-",
                         f"{ph['fwd_bwd']:.2f}", f"{ph['muon']:.2f}", f"{ph['adam']:.2f}",
                         f"{m.get('first_step_s', 0):.1f}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    for j, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    pk = result["peak"]
    lines.append(f"MFU = (6*T*P_mm + 6*T*S*d*L_virtual) / step time / measured {pk['dtype']} matmul peak "
                 f"{_num(pk['tflops'])} TFLOP/s")
    for v, vr in result["variants"].items():
        if vr.get("error"):
            lines.append(f"{v}: FAILED {vr['error']}")
        lines.append(f"{v}: ops " + ", ".join(f"{op}={b}" for op, b in vr.get("ops", {}).items()))
        for name, m in vr["modes"].items():
            if m.get("error"):
                lines.append(f"{v} {name}: {m['error']}")
    lines.append("")
    any_proj = next((pr for pr in result["projection"].values() if pr), None)
    if any_proj:
        lines.append(f"Projection to the challenge: {any_proj['world']} GPUs of this kind, {any_proj['budget_s']:.0f} s "
                     f"cap - {any_proj['reserve_s']:.0f} s GPTQ reserve = T {any_proj['train_s']:.0f} s; "
                     f"B = {any_proj['link_gbps']:.0f} GB/s, latency {any_proj['latency_us']:.0f} us, "
                     f"overlap {any_proj['overlap']:.0%}")
        lines.append(PROJECTION_FORMULA)
        lines.append(f"grad_bytes {any_proj['grad_bytes'] / 1e6:.1f} MB -> t_ar {any_proj['t_allreduce_ms']:.2f} ms; "
                     f"all-gather {any_proj['allgather_bytes'] / 1e6:.1f} MB -> t_ag {any_proj['t_allgather_ms']:.2f} ms; "
                     f"f_ns {any_proj['f_ns']:.3f}; comm per step {any_proj['comm_ms']:.2f} ms")
        for v, pr in result["projection"].items():
            if not pr:
                lines.append(f"{v}: no projection (a mode failed)")
                continue
            per = "  ".join(f"{k.replace('loop_', 'loop ')}: t8 {m['t8_ms']:.2f} ms" for k, m in pr["modes"].items())
            lines.append(f"{v}: {per}  -> {pr['steps']:,.0f} steps in {pr['train_s']:.0f} s "
                         f"({pr['steps_loop_off']:,.0f} loop off + {pr['steps_loop_on']:,.0f} loop on), "
                         f"avg {pr['avg_ms_per_step']:.1f} ms/step, {pr['tokens'] / 1e9:.2f} B tokens"
                         f"{' (loop on not timed: an upper bound)' if pr.get('partial') else ''}")
        if result["preset"] == "sota":
            r6 = RECORD_R6
            lines.append(f"record for comparison: R6 took {r6['steps']:,} steps at {r6['ms_per_step']} ms/step on "
                         f"{r6['gpus']} ({r6['source']})")
    if result.get("smoke"):
        lines.append("[smoke run: tiny shapes; the numbers prove the harness, not the speed]")
    return "\n".join(lines)


def _num(x: float) -> str:
    """1234.5 → '1234', 12.34 → '12.3', 0.01234 → '0.0123'."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"
