"""``pgolf-bench eval``: what the evaluation of one model costs, projected to the full validation set on 8 GPUs
against the 600 s eval budget.

Measured on this device, each on a slice of the validation stream (real shards when found, random tokens
otherwise — timing does not depend on the token values):

- **artifact round trip**: quantize the weights (RTN with the record's bit widths: GPTQ needs training data
  for its Hessians, and calibration belongs to the training budget), encode the artifact
  (:mod:`pgolf.quant.artifact`), decode it and rebuild the model on the device; the rebuilt model is the one
  evaluated next. When :mod:`pgolf.quant` is missing or fails, a stand-in with the naive baseline's scheme
  (per-row int8 + fp16 scales + brotli-11, :mod:`pgolf.quant.size`) is timed instead and labelled as such. Every
  rank loads the artifact itself, so this time is not divided by the GPU count.
- **plain eval** (non-overlapping ``eval_seq_len`` windows) and **sliding-window eval** (window ``eval_seq_len``,
  stride ``eval_stride``, 32 windows per forward) with :mod:`pgolf.eval`, eager model, bf16 autocast on CUDA,
  the kernels of ``PGOLF_KERNELS`` (default auto). Windows split evenly over ranks, so the projection is
  ``ceil(ceil(windows_full / W) / batch) × measured seconds per batch``.
- **test-time training**: :func:`pgolf.eval.ttt.run_ttt` in ``chunk`` mode (R3 recipe: score-first chunks of
  32,768 tokens, 3 SGD epochs on each chunk but the last) on a slice of at least two chunks, 2 sequences per
  micro-batch (a rank's share at W = 8); projected as scoring windows / W plus training chunks / W plus a ring
  all-reduce of the fp32 gradients per SGD step. Without :mod:`pgolf.eval.ttt` the cost is modelled from one
  timed SGD step on 2 sequences instead (labelled ``modelled``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pgolf.bench.history import metric

EVAL_BUDGET_S = 600.0
WORLD = 8
FULL_VAL_TOKENS = {8192: 40_540_160, 1024: 62_021_632}  # reference-stack 1.3 (sp8192: R2-R4; sp1024: R1 on)
DEFAULT_FULL_TOKENS = 40_540_160
TTT_CHUNK_TOKENS = 32_768
TTT_EPOCHS = 3
TTT_SEQS_PER_CHUNK = 16
RECORD_R3 = dict(roundtrip_s=25.5, sliding_s=121.0, ttt_s=366.5, total_s=513.0, source="reference-stack 5.3, R3")

def find_val_data(vocab_size: int, data_path: str | None = None,
                  tokenizer_path: str | None = None) -> tuple[str, str] | None:
    """(shard dir, tokenizer model) for the validation split: the given ones, else the shared sp8192/sp1024 data."""
    if data_path:
        return data_path, tokenizer_path or ""
    from pgolf.bench.env import REPO_ROOT

    shared = Path(os.environ.get("PGOLF_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    name = {8192: "fineweb10B_sp8192", 1024: "fineweb10B_sp1024"}.get(vocab_size)
    tok = {8192: "fineweb_8192_bpe.model", 1024: "fineweb_1024_bpe.model"}.get(vocab_size)
    if name and (shared / "shards" / name).is_dir() and (shared / "tokenizers" / tok).exists():
        return str(shared / "shards" / name), str(shared / "tokenizers" / tok)
    return None


def load_tokens(vocab_size: int, n_targets: int, seq_len: int, *, data_path: str | None = None,
                tokenizer_path: str | None = None, bos_id: int = 1, log: Callable[[str], None] = print):
    """(tokens (n+1,), byte tables, description). Real validation tokens when available, else random ones."""
    from pgolf.data.tokenizer import ByteTables

    found = find_val_data(vocab_size, data_path, tokenizer_path)
    if found:
        try:
            from pgolf.data.shards import find_shards, load_validation_tokens
            from pgolf.data.tokenizer import Tokenizer

            toks = load_validation_tokens(find_shards(found[0], "val"), seq_len, vocab_size)
            tables = Tokenizer(found[1]).byte_tables(vocab_size) if found[1] else None
            if tables is not None and toks.numel() - 1 >= seq_len:
                n = min(n_targets, toks.numel() - 1)
                return toks[: n + 1], tables, f"validation shards in {found[0]} ({n:,} of {toks.numel() - 1:,} tokens)"
        except Exception as e:  # noqa: BLE001 - fall back to synthetic tokens
            log(f"[eval] could not use {found[0]}: {type(e).__name__}: {e}; using random tokens")
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, vocab_size, (n_targets + 1,), generator=g)
    toks[:: max(1, seq_len // 2)] = bos_id  # some document boundaries
    base = torch.full((vocab_size,), 4, dtype=torch.int16)
    boundary = torch.zeros(vocab_size, dtype=torch.bool)
    boundary[bos_id] = True
    base[bos_id] = 0
    tables = ByteTables(base, torch.zeros(vocab_size, dtype=torch.bool), boundary)
    return toks, tables, f"random tokens ({n_targets:,}; 4 bytes per token; no validation shards found)"


# ------------------------------------------------------------------------------------------------------------

def _standin_pack(state: dict[str, torch.Tensor]) -> bytes:
    import brotli

    chunks = []
    for name in sorted(state):
        t = state[name].detach().float().cpu()
        if t.ndim == 2 and t.numel() > 65_536:
            scale = (t.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
            q = torch.clamp(torch.round(t / scale), -127, 127).to(torch.int8)
            chunks += [q.numpy().tobytes(), scale.half().numpy().tobytes()]
        else:
            chunks.append(t.half().numpy().tobytes())
    return brotli.compress(b"".join(chunks), quality=11)


def _standin_unpack(blob: bytes, like: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    import brotli
    import numpy as np

    raw = brotli.decompress(blob)
    out, pos = {}, 0
    for name in sorted(like):
        ref = like[name]
        if ref.ndim == 2 and ref.numel() > 65_536:
            n, rows = ref.numel(), ref.shape[0]
            q = torch.from_numpy(np.frombuffer(raw, dtype=np.int8, count=n, offset=pos).copy()).view(ref.shape)
            pos += n
            s = torch.from_numpy(np.frombuffer(raw, dtype=np.float16, count=rows, offset=pos).copy()).view(rows, 1)
            pos += 2 * rows
            out[name] = (q.to(device).float() * s.to(device).float()).to(ref.dtype)
        else:
            n = ref.numel()
            t = torch.from_numpy(np.frombuffer(raw, dtype=np.float16, count=n, offset=pos).copy()).view(ref.shape)
            pos += 2 * n
            out[name] = t.to(device).to(ref.dtype)
    if pos != len(raw):
        raise ValueError(f"stand-in artifact: {len(raw) - pos} bytes left over")
    return out


def roundtrip(model: torch.nn.Module, device: torch.device, train_cfg: Any = None) -> tuple[dict[str, Any],
                                                                                         torch.nn.Module]:
    """Quantize + encode the weights, decode + rebuild on ``device``; (timings and bytes, the rebuilt model).

    Quantization uses the preset's settings (``train_cfg``'s ``quant_*``, its artifact layout) with RTN instead of
    GPTQ; the record defaults when ``train_cfg`` is None."""
    import dataclasses

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    try:
        from pgolf.quant.artifact import build_model, decode, encode
        from pgolf.quant.quantize import QuantSettings, quantize_state

        try:
            settings = dataclasses.replace(QuantSettings.from_train_config(train_cfg), method="rtn")
            layout = getattr(train_cfg, "artifact_layout", None) or "int8"
        except Exception:  # noqa: BLE001 - no train config / older config: the record defaults
            settings, layout = QuantSettings(method="rtn"), "int8"
        t0 = time.perf_counter()
        qm = quantize_state(state, None, settings, model_config=model.config.to_dict(), layout=layout)
        t1 = time.perf_counter()
        blob = encode(qm)
        t2 = time.perf_counter()
        rebuilt = build_model(decode(blob), device=device)
        sync()
        t3 = time.perf_counter()
        return dict(kind=f"pgolf.quant artifact (RTN at the preset's bit widths, layout {layout}, brotli-11 streams)",
                    bytes=len(blob),
                    quantize_s=t1 - t0, pack_s=t2 - t1, unpack_s=t3 - t2, seconds=t3 - t1), rebuilt
    except Exception as e:  # noqa: BLE001 - the quant package is optional here; fall back and say so
        why = f"{type(e).__name__}: {e}"[:200]
    t0 = time.perf_counter()
    blob = _standin_pack(state)
    t1 = time.perf_counter()
    model.load_state_dict(_standin_unpack(blob, state, device), strict=True)
    sync()
    t2 = time.perf_counter()
    return dict(kind=f"stand-in: per-row int8 + fp16 scales + brotli-11 (pgolf.quant artifact unavailable: {why})",
                bytes=len(blob), quantize_s=None, pack_s=t1 - t0, unpack_s=t2 - t1, seconds=t2 - t0), model


def load_artifact(path: str, device: torch.device):
    """(model, description) from ``path``: a pgolf artifact (``PGOLFART``, rebuilt by
    :func:`pgolf.quant.artifact.build_model`) or the trainer's checkpoint ({'model': state, 'config': GPTConfig
    dict}, read with ``weights_only=True``)."""
    from pgolf.model.config import GPTConfig
    from pgolf.model.gpt import GPT

    with open(path, "rb") as f:
        magic = f.read(8)
    if magic == b"PGOLFART":
        from pgolf.quant.artifact import build_model

        return build_model(path, device=device), f"artifact {path} ({os.path.getsize(path):,} bytes)"
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(ck, dict) and "model" in ck and "config" in ck):
        raise ValueError(f"{path} is neither a pgolf artifact nor a pgolf checkpoint ({{'model', 'config'}})")
    model = GPT(GPTConfig.from_dict(ck["config"]))
    model.load_state_dict(ck["model"], strict=True)
    return model.to(device), f"checkpoint {path}"


# ------------------------------------------------------------------------------------------------------------

def _sgd_step_ms(model, tokens: torch.Tensor, seq_len: int, device: torch.device, reps: int, warmup: int) -> float:
    """Median ms of one TTT SGD step on 2 sequences of ``seq_len`` (fwd + bwd + clip 1.0 + SGD momentum 0.9)."""
    import statistics

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-9, momentum=0.9)  # lr ~ 0: timing only, weights stay put
    n = 2 * seq_len
    x = tokens[:n].view(2, seq_len).to(device)
    y = tokens[1:n + 1].view(2, seq_len).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    model.train()
    times = []
    for i in range(warmup + reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with amp:
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    model.eval()
    return statistics.median(times)


def run_eval(*, preset: str | None = "sota", artifact: str | None = None, smoke: bool = False,
             device: torch.device, n_tokens: int | None = None, full_tokens: int | None = None,
             data_path: str | None = None, tokenizer_path: str | None = None, do_roundtrip: bool = True,
             do_ttt: bool = True, world: int = WORLD, link_gbps: float | None = None, cuda_graphs: bool = False,
             log: Callable[[str], None] = print,
             on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """FLOPs per scored token, plain and sliding eval (fast path, the full-head path, and with ``cuda_graphs`` the
    compiled CUDA-graph scorer), then TTT, then the artifact round trip (slowest and least sure last, so a run cut
    short keeps the rest); ``on_progress(result)`` after each part."""
    from pgolf.bench.step import DEFAULT_LINK_GBPS
    from pgolf.eval import evaluate, evaluate_sliding
    from pgolf.model.gpt import GPT
    from pgolf.train.config import resolve

    t_start = time.perf_counter()
    link_gbps = link_gbps or DEFAULT_LINK_GBPS
    train_cfg, model_cfg = resolve(preset or "sota", env={}, flags={})
    if artifact:
        model, source = load_artifact(artifact, device)
        model_cfg = model.config
    else:
        torch.manual_seed(0)
        model = GPT(model_cfg).to(device)
        source = f"preset {preset} (random init: timing does not depend on the weights)"
    if model_cfg.has_recurrence:
        model.looping_active = True  # every eval runs with the recurrence on
    model.eval()
    window = train_cfg.eval_seq_len
    stride = train_cfg.eval_stride or 64
    batch = train_cfg.eval_batch_seqs
    if smoke:
        window, stride, batch = min(window, 128), min(stride, 32), min(batch, 4)
    n_tokens = n_tokens or (1024 if smoke else 65_536)
    n_tokens = max(n_tokens, window + stride)
    full = full_tokens or FULL_VAL_TOKENS.get(model_cfg.vocab_size, DEFAULT_FULL_TOKENS)
    tokens, tables, data_desc = load_tokens(model_cfg.vocab_size, n_tokens, window, data_path=data_path,
                                            tokenizer_path=tokenizer_path, bos_id=model_cfg.bos_id, log=log)
    n_tokens = tokens.numel() - 1
    autocast = torch.bfloat16 if device.type == "cuda" else None
    from pgolf import kernels

    result: dict[str, Any] = dict(source=source, preset=preset, smoke=smoke, data=data_desc, slice_tokens=n_tokens,
                                  full_tokens=full, full_tokens_note=(
                                      "sp8192 validation set, 40,540,160 scored tokens (reference-stack 1.3)"
                                      if full == 40_540_160 else f"{full:,} tokens (assumed)"),
                                  window=window, stride=stride, batch=batch, world=world,
                                  ops={op: _resolved(kernels, op, device) for op in kernels.OPS})
    log(f"[eval] model: {source}; data: {data_desc}; window {window} stride {stride} batch {batch}")

    def progress() -> None:
        if on_progress is not None:
            on_progress(result)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        r = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return r, time.perf_counter() - t0

    from pgolf.bench.evalflops import flops_per_scored_token

    # at the preset's own eval settings even in a smoke run: counting is cheap and exact on any device
    result["flops"] = flops_per_scored_token(model, tables, window=train_cfg.eval_seq_len,
                                             stride=train_cfg.eval_stride or 64, device=device)
    f = result["flops"]
    log(f"[eval] FLOPs per scored token: trunk {f['trunk'] / 1e9:.3f} G, head {f['head'] / 1e6:.2f} M "
        f"(full-head path {f['head_full'] / 1e6:.2f} M: {f['head_rows_per_scored_token_full']:.0f} rows per scored "
        f"token); total {f['saving']:.1%} lower")
    progress()

    with torch.no_grad():
        # warm-up: one batch of each shape (first-call costs, autotuning)
        evaluate(model, tokens[: window * batch + 1] if n_tokens >= window * batch else tokens[: window + 1], tables,
                 seq_len=window, batch_seqs=batch, rank=0, world_size=1, autocast_dtype=autocast)
        evaluate_sliding(model, tokens[: window + stride * batch + 1], tables, window=window, stride=stride,
                         batch_windows=batch, rank=0, world_size=1, autocast_dtype=autocast)
        plain, plain_s = timed(lambda: evaluate(model, tokens, tables, seq_len=window, batch_seqs=batch, rank=0,
                                                world_size=1, autocast_dtype=autocast))
        slide, slide_s = timed(lambda: evaluate_sliding(model, tokens, tables, window=window, stride=stride,
                                                        batch_windows=batch, rank=0, world_size=1,
                                                        autocast_dtype=autocast))
    plain_batches = math.ceil(plain.windows / batch)
    slide_batches = math.ceil(slide.windows / batch)
    full_plain_windows = full // window
    full_slide_windows = _count_windows(full, window, stride)
    per_rank_plain = math.ceil(math.ceil(full_plain_windows / world) / batch)
    per_rank_slide = math.ceil(math.ceil(full_slide_windows / world) / batch)
    result["plain"] = dict(seconds=plain_s, windows=plain.windows, batches=plain_batches, tokens=plain.tokens,
                           val_bpb=plain.val_bpb, s_per_batch=plain_s / plain_batches,
                           tokens_per_s=plain.tokens / plain_s, full_windows=full_plain_windows,
                           batches_per_rank=per_rank_plain, projected_s=per_rank_plain * plain_s / plain_batches)
    result["sliding"] = dict(seconds=slide_s, windows=slide.windows, batches=slide_batches, tokens=slide.tokens,
                             val_bpb=slide.val_bpb, s_per_batch=slide_s / slide_batches,
                             tokens_per_s=slide.tokens / slide_s, full_windows=full_slide_windows,
                             batches_per_rank=per_rank_slide, projected_s=per_rank_slide * slide_s / slide_batches)
    log(f"[eval] plain: {plain_s:.2f}s for {plain.windows} windows -> {result['plain']['projected_s']:.1f}s projected; "
        f"sliding: {slide_s:.2f}s for {slide.windows} windows -> {result['sliding']['projected_s']:.1f}s projected")
    _project(result)
    progress()
    variants = {"sliding_full_head": dict(scored_rows_only=False)}
    if cuda_graphs and device.type == "cuda":
        variants["sliding_cuda_graphs"] = dict(cuda_graphs=True)
    for name, kw in variants.items():
        try:
            with torch.no_grad():
                r, secs = timed(lambda: evaluate_sliding(model, tokens, tables, window=window, stride=stride,
                                                         batch_windows=batch, rank=0, world_size=1,
                                                         autocast_dtype=autocast, **kw))
            secs -= r.warmup_s  # compile/capture happened on random tokens before the clock (as the records)
            result[name] = dict(seconds=secs, warmup_s=r.warmup_s, tokens=r.tokens, val_bpb=r.val_bpb,
                                tokens_per_s=r.tokens / secs, projected_s=per_rank_slide * secs / slide_batches,
                                speedup_vs_it=secs / slide_s if name == "sliding_full_head" else slide_s / secs)
            log(f"[eval] {name}: {secs:.2f}s ({r.tokens / secs:,.0f} tok/s) -> {result[name]['projected_s']:.1f}s "
                f"projected; val_bpb {r.val_bpb:.6f} (fast path {slide.val_bpb:.6f})")
        except Exception as e:  # noqa: BLE001 - a comparison that fails does not lose the rest
            result[name] = dict(error=f"{type(e).__name__}: {e}"[:500])
            log(f"[eval] {name} failed: {result[name]['error']}")
        progress()

    if do_ttt:
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        t_ar = 2 * (world - 1) / world * grad_bytes / (link_gbps * 1e9) * 1e3
        chunk = 256 if smoke else TTT_CHUNK_TOKENS
        full_chunks = math.ceil(full / chunk)
        try:
            result["ttt"] = _measured_ttt(model, tokens, tables, window=window, stride=stride, batch=batch,
                                          chunk=chunk, autocast=autocast, world=world, t_ar=t_ar,
                                          full_chunks=full_chunks, full_windows=full_slide_windows)
        except Exception as e:  # noqa: BLE001 - fall back to the model of the cost
            why = f"{type(e).__name__}: {e}"[:300]
            log(f"[eval] TTT via pgolf.eval.ttt unavailable ({why}); modelling it from one SGD step")
            try:
                ms = _sgd_step_ms(model, tokens, window, device, reps=2 if smoke else 5, warmup=1 if smoke else 2)
                steps = (full_chunks - 1) * TTT_EPOCHS  # per rank: 16 seqs per chunk / 8 ranks = 2 per step
                train = steps * (ms + t_ar) / 1e3
                result["ttt"] = dict(kind=f"modelled (R3 chunked SGD; pgolf.eval.ttt unavailable: {why})",
                                     sgd_step_ms=ms, allreduce_ms=t_ar, full_chunks=full_chunks, epochs=TTT_EPOCHS,
                                     steps_per_rank=steps, train_projected_s=train,
                                     score_projected_s=result["sliding"]["projected_s"],
                                     projected_s=train + result["sliding"]["projected_s"])
            except Exception as e2:  # noqa: BLE001
                result["ttt"] = dict(error=f"{type(e2).__name__}: {e2}"[:500])
        t = result["ttt"]
        if "projected_s" in t:
            log(f"[eval] TTT: {t['kind']}; projected {t['projected_s']:.1f}s "
                f"(scoring {t['score_projected_s']:.1f}s + training {t['train_projected_s']:.1f}s)")
        else:
            log(f"[eval] TTT failed: {t.get('error')}")

        _project(result)
        progress()
        try:
            result["ngram"] = measured_ngram(tokens, device, full=full, world=world, data_path=data_path,
                                             vocab_size=model_cfg.vocab_size, window=window, stride=stride,
                                             batch=batch, chunk=chunk)
            g = result["ngram"]
            log(f"[eval] n-gram mixture (orders 2-7, normalized): {g['tokens_per_s']:,.0f} scored tokens/s here -> "
                f"{g['projected_s']:.1f}s projected on {world} GPUs (+ prefill {g['prefill_s']:.1f}s); not in the total")
        except Exception as e:  # noqa: BLE001
            result["ngram"] = dict(error=f"{type(e).__name__}: {e}"[:500])
            log(f"[eval] n-gram mixture failed: {result['ngram']['error']}")
        progress()

    if do_roundtrip:
        try:
            rt, _ = roundtrip(model, device, train_cfg)
            result["roundtrip"] = rt
            log(f"[eval] round trip: {rt['seconds']:.2f}s ({rt['bytes']:,} bytes; {rt['kind']})")
        except Exception as e:  # noqa: BLE001
            result["roundtrip"] = dict(error=f"{type(e).__name__}: {e}"[:500])
            log(f"[eval] round trip failed: {result['roundtrip']['error']}")
        _project(result)
        progress()

    _project(result)
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    return result


def _project(result: dict[str, Any]) -> None:
    """result['projection']: the parts measured so far against the 600 s eval budget."""
    rt = result.get("roundtrip", {})
    parts = dict(roundtrip=rt.get("seconds"), plain=result["plain"]["projected_s"],
                 sliding=result["sliding"]["projected_s"], ttt=result.get("ttt", {}).get("projected_s"))
    total = sum(v for v in parts.values() if v is not None)
    result["projection"] = dict(parts=parts, total_s=total, budget_s=EVAL_BUDGET_S, headroom_s=EVAL_BUDGET_S - total,
                                fits=total <= EVAL_BUDGET_S,
                                formula=("total = round trip (every rank, not divided) + plain + sliding + TTT (as R3 runs all of "
                                         "them); plain/sliding = ceil(ceil(windows_full / W) / batch) x s per batch; "
                                         "TTT = its scoring (windows_full / W x s per window) + training "
                                         "((chunks_full - 1) / W x s per trained chunk) + (chunks_full - 1) x epochs x "
                                         "ring all-reduce of the fp32 grads"))


def _measured_ttt(model, tokens, tables, *, window: int, stride: int, batch: int, chunk: int, autocast,
                  world: int, t_ar: float, full_chunks: int, full_windows: int) -> dict[str, Any]:
    """Chunk-mode TTT with :func:`pgolf.eval.ttt.run_ttt` on ``tokens`` (>= 2 chunks), projected to the full set."""
    from pgolf.eval.ttt import TTTSettings, run_ttt

    n = tokens.numel() - 1
    if n < 2 * chunk:
        raise ValueError(f"the slice has {n} tokens, fewer than two TTT chunks of {chunk}")
    n = n // chunk * chunk
    settings = TTTSettings(window=window, stride=stride, batch_windows=batch, autocast_dtype=autocast,
                           chunk_tokens=chunk, epochs=TTT_EPOCHS, seq_len=window, micro_batch_seqs=2, probes=False)
    res = run_ttt(model, tokens[: n + 1], tables, mode="chunk", settings=settings, rank=0, world_size=1, log=None)
    score_s, train_s = res.timings.get("score_s", 0.0), res.timings.get("adapt_s", 0.0)
    slice_windows = _count_windows(n, window, stride)
    trained = max(1, (res.n_chunks or 2) - 1)
    score_proj = score_s / slice_windows * math.ceil(full_windows / world)
    train_proj = train_s / trained * (full_chunks - 1) / world + (full_chunks - 1) * TTT_EPOCHS * t_ar / 1e3
    return dict(kind="measured: pgolf.eval.ttt.run_ttt chunk mode (R3 recipe)", slice_tokens=n,
                slice_chunks=res.n_chunks, seconds=res.seconds, score_s=score_s, train_s=train_s,
                adapt_steps=res.adapt_steps, val_bpb=res.val_bpb, chunk_tokens=chunk, epochs=TTT_EPOCHS,
                full_chunks=full_chunks, allreduce_ms=t_ar, score_projected_s=score_proj,
                train_projected_s=train_proj, projected_s=score_proj + train_proj,
                note="training projected as measured seconds per trained chunk (16 sequences in micro-batches of 2 "
                     "on one GPU) / W: each of W ranks trains 2 sequences per step")


def measured_ngram(tokens: torch.Tensor, device: torch.device, *, full: int, world: int, vocab_size: int,
                   window: int, stride: int, batch: int, chunk: int, data_path: str | None = None,
                   prefill_tokens: int = 2_000_000) -> dict[str, Any]:
    """The n-gram mixture's own cost, as the chunk mode runs it: pre-fill from up to ``prefill_tokens`` training
    tokens (the shared shards when found, else random tokens), then per batch of sliding windows mix the scored
    targets (the model's NLL stands in: the mixture's cost does not depend on it), and learn each chunk after it.
    Projected to ``full`` targets split over ``world`` ranks, each mixing and learning its own share (the default,
    as #1499)."""
    from pgolf.eval.ngram import NGramCache, NGramMixer

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    train = _train_tokens(vocab_size, prefill_tokens, data_path)
    cache = NGramCache(device=device)
    t0 = time.perf_counter()
    cache.prefill(train.to(device))
    sync()
    prefill_s = time.perf_counter() - t0
    mixer = NGramMixer(cache)
    toks = tokens.to(device)
    n = toks.numel() - 1
    per_batch = batch * stride
    mix_s = learn_s = 0.0
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        t1 = time.perf_counter()
        for b in range(lo, hi, per_batch):
            t = torch.arange(b, min(b + per_batch, hi), device=device)
            mixer.mix(torch.full((t.numel(),), 3.0, dtype=torch.float64, device=device), toks, t)
        sync()
        t2 = time.perf_counter()
        mixer.update(toks, lo, hi)
        sync()
        learn_s += time.perf_counter() - t2
        mix_s += t2 - t1
    projected = (mix_s + learn_s) / n * math.ceil(full / world)
    return dict(kind="normalized mixture, orders 2-7, pre-filled from training tokens", slice_tokens=n,
                prefill_tokens=train.numel() - 1, prefill_s=prefill_s, mix_s=mix_s, learn_s=learn_s,
                tokens_per_s=n / max(mix_s + learn_s, 1e-9), projected_s=projected + prefill_s, world=world,
                note="each rank mixes and learns its own scored share; the learning of a rank's shard of a chunk "
                     "is timed here on whole chunks, so the projection is conservative")


def _train_tokens(vocab_size: int, n: int, data_path: str | None) -> torch.Tensor:
    """Up to n + 1 training tokens from the shards beside the validation data (or the shared data), else random."""
    found = find_val_data(vocab_size, data_path, None)
    if found:
        try:
            from pgolf.data.shards import find_shards, load_tokens as load_shards

            toks = load_shards(find_shards(found[0], "train"), vocab_size)
            if toks.numel() > 1:
                return toks[: n + 1]
        except Exception:  # noqa: BLE001 - fall back to random tokens
            pass
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab_size, (min(n, 1 << 20) + 1,), generator=g)


def _count_windows(n: int, window: int, stride: int) -> int:
    m = n - window + stride
    return max(1, -(-m // stride)) if m > 0 else 1


def _resolved(kernels, op: str, device: torch.device) -> str:
    try:
        return kernels.implementation(op, device.type)[0]
    except Exception as e:  # noqa: BLE001
        return f"unavailable ({e})"[:200]


def metrics(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    k = f"eval/{result.get('preset') or 'artifact'}"
    out = {
        f"{k}/plain/s_per_batch": metric(result["plain"]["s_per_batch"], "s", "lower"),
        f"{k}/sliding/s_per_batch": metric(result["sliding"]["s_per_batch"], "s", "lower"),
        f"{k}/sliding/projected_s": metric(result["sliding"]["projected_s"], "s", "lower"),
        f"{k}/projected_total_s": metric(result["projection"]["total_s"], "s", "lower"),
    }
    fl = result.get("flops") or {}
    if fl:
        out[f"{k}/flops_per_scored_token"] = metric(fl["total"], "FLOP", None)
        out[f"{k}/head_flops_per_scored_token"] = metric(fl["head"], "FLOP", None)
    for name in ("sliding_full_head", "sliding_cuda_graphs"):
        v = result.get(name) or {}
        if v.get("projected_s") is not None:
            out[f"{k}/{name}/projected_s"] = metric(v["projected_s"], "s", "lower")
    rt = result.get("roundtrip") or {}
    if rt.get("seconds") is not None:
        out[f"{k}/roundtrip_s"] = metric(rt["seconds"], "s", "lower", threshold=0.15)  # brotli on a shared CPU
        out[f"{k}/artifact_bytes"] = metric(rt["bytes"], "B", None)
    ng = result.get("ngram") or {}
    if ng.get("projected_s") is not None:
        out[f"{k}/ngram/projected_s"] = metric(ng["projected_s"], "s", "lower")
    ttt = result.get("ttt") or {}
    if ttt.get("projected_s") is not None:
        out[f"{k}/ttt/projected_s"] = metric(ttt["projected_s"], "s", "lower")
    if ttt.get("train_s") is not None:
        out[f"{k}/ttt/train_s_per_chunk"] = metric(ttt["train_s"] / max(1, (ttt.get("slice_chunks") or 2) - 1),
                                                   "s", "lower")
    if ttt.get("sgd_step_ms") is not None:
        out[f"{k}/ttt/sgd_step_ms"] = metric(ttt["sgd_step_ms"], "ms", "lower")
    return out


def format_report(result: dict[str, Any]) -> str:
    p = result["projection"]
    W = result["world"]
    lines = [f"model: {result['source']}", f"data: {result['data']}",
             f"full set: {result['full_tokens_note']}; {W} GPUs; window {result['window']}, stride {result['stride']}, "
             f"{result['batch']} windows per forward",
             "ops: " + ", ".join(f"{k}={v}" for k, v in result["ops"].items()), ""]
    head = ("part", "measured", "on", "projected (s)", "note")
    rows = [head]
    rt = result.get("roundtrip")
    if rt:
        rows.append(("artifact round trip", f"{rt['seconds']:.2f} s" if "seconds" in rt else "error", "whole model",
                     f"{rt['seconds']:.1f}" if "seconds" in rt else "-",
                     f"{rt.get('bytes', 0):,} B; {rt.get('kind', rt.get('error', ''))}"))
    for name in ("plain", "sliding"):
        r = result[name]
        rows.append((f"{name} eval", f"{r['seconds']:.2f} s", f"{r['windows']:,} windows",
                     f"{r['projected_s']:.1f}", f"{r['full_windows']:,} windows, {r['batches_per_rank']:,} batches/rank"
                     f", {r['tokens_per_s']:,.0f} tok/s"))
    for name, label in (("sliding_full_head", "sliding, full head"), ("sliding_cuda_graphs", "sliding, CUDA graphs")):
        r = result.get(name)
        if r:
            rows.append((label, f"{r['seconds']:.2f} s" if "seconds" in r else "error", "same windows",
                         f"{r['projected_s']:.1f}" if "projected_s" in r else "-",
                         (f"{r['tokens_per_s']:,.0f} tok/s; {r['speedup_vs_it']:.2f}x "
                          + ("slower than the fast path (not in the total)" if name == "sliding_full_head"
                             else "the fast path's speed (not in the total)")) if "seconds" in r else r["error"]))
    t = result.get("ttt")
    if t:
        if "projected_s" in t and "train_s" in t:
            rows.append(("TTT (score + train)", f"{t['seconds']:.2f} s", f"{t['slice_chunks']} chunks",
                         f"{t['projected_s']:.1f}", f"scoring {t['score_projected_s']:.1f} s + training "
                         f"{t['train_projected_s']:.1f} s ({t['full_chunks']:,} chunks); {t['kind']}"))
        elif "projected_s" in t:
            rows.append(("TTT (score + train)", f"{t['sgd_step_ms']:.2f} ms/step", "2 seqs",
                         f"{t['projected_s']:.1f}", f"{t['steps_per_rank']:,} steps/rank; {t['kind']}"))
        else:
            rows.append(("TTT", "error", "", "-", t.get("error", "")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    for j, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) if i in (0, 4) else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    ng = result.get("ngram")
    if ng and "projected_s" in ng:
        lines.append(f"n-gram mixture ({ng['kind']}): {ng['tokens_per_s']:,.0f} scored tokens/s here, pre-fill of "
                     f"{ng['prefill_tokens']:,} tokens {ng['prefill_s']:.1f} s; projected {ng['projected_s']:.1f} s on "
                     f"{ng['world']} GPUs for the full set (on top of sliding/TTT scoring; not in the total)")
    fl = result.get("flops")
    if fl:
        lines.append(f"FLOPs per scored token (window {fl['window']}, stride {fl['stride']}; {fl['counted_with']}): "
                     f"trunk {fl['trunk'] / 1e9:.3f} G + head {fl['head'] / 1e6:.2f} M (1 row) = "
                     f"{fl['total'] / 1e9:.3f} G; the full-head path's head {fl['head_full'] / 1e6:.2f} M "
                     f"({fl['head_rows_per_scored_token_full']:.0f} rows) = {fl['total_full'] / 1e9:.3f} G: "
                     f"{fl['saving']:.1%} fewer FLOPs, head share {fl['head_share']:.2%} (was {fl['head_share_full']:.2%})")
    lines.append(f"total projected eval time: {p['total_s']:.1f} s of {p['budget_s']:.0f} s "
                 f"({'fits' if p['fits'] else 'OVER BUDGET'}, headroom {p['headroom_s']:.1f} s)")
    lines.append(p["formula"])
    r3 = RECORD_R3
    lines.append(f"record for comparison: R3 round trip {r3['roundtrip_s']} s + sliding {r3['sliding_s']:.0f} s + "
                 f"TTT {r3['ttt_s']} s = {r3['total_s']:.0f} s on 8xH100 ({r3['source']})")
    if result.get("smoke"):
        lines.append("[smoke run: tiny shapes; the numbers prove the harness, not the speed]")
    return "\n".join(lines)
