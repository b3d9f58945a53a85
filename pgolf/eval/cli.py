"""``python -m pgolf.eval --artifact FILE --data DIR --tokenizer MODEL``: val_bpb of an artifact, from the file alone.

The model is rebuilt from the artifact (:func:`pgolf.quant.artifact.build_model`: no code from the file runs) and
scored on the validation shards (``fineweb_val_*.bin`` in DIR) exactly as the trainer does, printing the
challenge's lines::

    final_quant_roundtrip val_loss:2.0727 val_bpb:1.2244 eval_time:1420ms
    final_quant_roundtrip_exact val_loss:2.07269931 val_bpb:1.22436570
    final_quant_sliding_window val_loss:... val_bpb:... eval_time:...ms        (with --sliding)
    final_quant_sliding_window_exact val_loss:... val_bpb:...

``--ttt chunk|lora|phased`` then runs legal score-first test-time training on the rebuilt model (every token
scored before any update that reads it, enforced by :class:`pgolf.eval.ledger.Ledger`) and prints the compliance
report; the exit status is 3 when the report does not pass.

``--int6-matmul`` swaps the int6 Linear layers for ``pgolf.kernels.int6_matmul.Int6Linear`` (weights stay int6 in
memory; the product runs through the kernel dispatch). The window length and stride default to the values the
training run stored in the artifact (else 2048 and 64).

Everything is checked before any scoring: every flag (a zero or negative window, stride, batch or token cap, a
``--ttt-set`` key or value of the wrong type, ``--stride`` or ``--ttt-budget`` where they would be ignored), the
inputs (the artifact's format and checksum, the validation shards against the vocab) and the tokenizer against the
fingerprint the artifact records: a different tokenizer, even with the same vocab size, is refused by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pgolf.errors import ConfigError, InputError, MissingInputError, run_cli

PROG = "pgolf.eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pgolf.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", help="the artifact file (final_model.pgq); required")
    p.add_argument("--data", help="folder with fineweb_val_*.bin shards (and fineweb_train_*.bin for the n-gram "
                   "pre-fill); required")
    p.add_argument("--tokenizer", help="SentencePiece model (byte tables for val_bpb); required")
    p.add_argument("--sliding", action="store_true", help="also run the sliding-window eval")
    p.add_argument("--stride", type=_at_least(1), default=None, help="sliding stride (default: the run's, else 64)")
    p.add_argument("--seq-len", type=_at_least(1), default=None, help="eval window (default: the run's, else 2048)")
    p.add_argument("--batch-seqs", type=_at_least(1, also=("auto",)), default=32,
                   help="windows per forward (default 32); 'auto': the largest batch that fits in GPU memory")
    p.add_argument("--cuda-graphs", action="store_true", help="compile the scoring forward and replay it as CUDA "
                   "graphs (CUDA only); the compile and capture run on random tokens outside the timed region")
    p.add_argument("--val-max-tokens", type=_at_least(0), default=0, help="cap the validation tokens (0 = all)")
    p.add_argument("--int6-matmul", action="store_true", help="run int6 layers through Int6Linear")
    p.add_argument("--doc-isolated", action="store_true", help="attention never crosses a BOS inside a window")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--ttt", choices=("chunk", "lora", "phased", "lora_sliding"), help="legal score-first "
                   "test-time training, then the compliance report")
    p.add_argument("--recipe", metavar="NAME", help="a founding submission's legal eval pipeline (sets --ttt and its "
                   "TTT settings; --ttt-set still overrides): pr490, pr1148, pr1406, pr1499, pr1550; 'list' describes "
                   "them")
    p.add_argument("--ttt-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TTT setting (pgolf.eval.ttt.TTTSettings), e.g. --ttt-set epochs=1; repeatable")
    p.add_argument("--ttt-budget", type=float, default=0.0, metavar="SECONDS",
                   help="chunk mode: size epochs/chunk to this whole-eval time from a warm-up on random tokens")
    p.add_argument("--study", choices=("prequant-ttt",), help="measure an ILLEGAL variant for study (never a record): "
                   "pre-quantization TTT on the validation tokens of --checkpoint, re-quantized as the artifact, "
                   "scored against the artifact's legal score; the report fails condition 3")
    p.add_argument("--checkpoint", help="--study prequant-ttt: the run's pre-quantization final_model.pt")
    p.add_argument("--study-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a study setting (pgolf.eval.study.PrequantSettings, e.g. epochs=6); a --recipe of pr1406, "
                   "pr1499 or pr1550 sets that record's own")
    p.add_argument("--study-out", metavar="DIR", help="write the study's artifact and a summary.json marking it a "
                   "study (pgolf-pack packs it only as a non-record submission); refused if DIR exists unless --force")
    p.add_argument("--force", action="store_true", help="replace an existing --study-out folder")
    p.add_argument("--summary", help="the training run's summary.json for the report's train time and code bytes "
                   "(default: summary.json beside the artifact, when present)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: _score(args))


def _score(args: argparse.Namespace) -> int:
    from pgolf.compliance_guard import ComplianceViolation

    if args.recipe == "list":
        from pgolf.eval.recipes import describe

        print(describe())
        return 0
    if args.study:
        return _study(args)
    t_start = time.perf_counter()
    overrides = _check_flags(args)
    opened = open_artifact(args.artifact, args.data, args.tokenizer, stride=args.stride, seq_len=args.seq_len,
                           batch_seqs=args.batch_seqs, val_max_tokens=args.val_max_tokens, device=args.device)
    if args.sliding or args.ttt:
        check_stride(opened)
    if args.ttt:
        ttt_settings(opened, overrides)  # checked before any scoring
        read_summary(args.summary or Path(args.artifact).with_name("summary.json"), required=bool(args.summary))
    r = score_artifact(opened, sliding=args.sliding, batch_seqs=args.batch_seqs, int6_matmul=args.int6_matmul,
                       doc_isolated=args.doc_isolated, cuda_graphs=args.cuda_graphs)
    print(f"artifact:{args.artifact} bytes:{os.path.getsize(args.artifact)} tensors:{len(r['qm'].tensors)} "
          f"layout:{r['qm'].layout}{' int6_matmul:on' if args.int6_matmul else ''} "
          f"val_bytes_from:{r['tables'].source}")
    for line in result_lines(r):
        print(line)
    if not args.ttt:
        return 0
    try:
        res, report = ttt_with_report(r, args.ttt, args.artifact, t_start, overrides=overrides,
                                      budget=args.ttt_budget, summary=args.summary)
    except ComplianceViolation as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(f"final_ttt_{args.ttt} val_loss:{res.val_loss:.4f} val_bpb:{res.val_bpb:.4f} "
          f"eval_time:{res.seconds * 1000:.0f}ms")
    print(f"final_ttt_{args.ttt}_exact val_loss:{res.val_loss:.8f} val_bpb:{res.val_bpb:.8f}")
    print(report.render())
    return 0 if report.ok else 3


def _study(args: argparse.Namespace) -> int:
    """--study prequant-ttt: the legal score of the artifact, then the illegal variant's, and the gain; the study
    ledger records the violations and the report fails condition 3."""
    from pgolf.eval import ComplianceReport, Ledger, run_ttt
    from pgolf.eval.study import prequant_ttt, requantize
    from pgolf.quant.artifact import build_model

    settings, out = _check_study_flags(args)
    opened = open_artifact(args.artifact, args.data, args.tokenizer, stride=args.stride, seq_len=args.seq_len,
                           val_max_tokens=args.val_max_tokens, device=args.device)
    check_stride(opened)
    model = _checkpoint_model(args.checkpoint, opened)
    val, tables, dev = opened["val"], opened["tables"], opened["device"]
    ttt = ttt_settings(opened, {"epochs": 0, "probes": True})  # scoring only: sliding windows through the ledger
    legal = run_ttt(build_model(opened["qm"], device=dev), val, tables, mode="chunk", settings=ttt, log=None)
    print(f"legal: the artifact, sliding windows: val_loss:{legal.val_loss:.8f} val_bpb:{legal.val_bpb:.8f}")
    ledger = Ledger(val.numel() - 1, study=True)
    amp = torch_dtype(ttt.autocast_dtype)
    adapted = prequant_ttt(model, val, settings, ledger, seq_len=opened["seq_len"], autocast_dtype=amp)
    qm, how = requantize(model, opened["qm"], data=opened["data"], seq_len=opened["seq_len"],
                         n_batches=settings.calibration_batches, log=lambda m: None)
    study = run_ttt(build_model(qm, device=dev), val, tables, mode="chunk", settings=ttt, ledger=ledger, log=None)
    gain = legal.val_bpb - study.val_bpb
    print(f"study: pre-quant TTT ({settings.epochs} epochs on every validation token, re-quantized: {how}): "
          f"val_loss:{study.val_loss:.8f} val_bpb:{study.val_bpb:.8f}")
    print(f"gain of the illegal variant over the legal score: {gain:+.6f} bpb ({legal.val_loss - study.val_loss:+.6f}"
          f" nats)")
    report = ComplianceReport.build(study, artifact_bytes=None, code_bytes=None)
    print(report.render())
    if out is not None:
        _write_study(out, qm, args, legal, study, adapted, how, settings)
        print(f"study written to {out} (pgolf-pack packs it only as a non-record submission)")
    print("STUDY RUN: an illegal variant measured for study; it is not a legal submission")
    return 0


def _check_study_flags(args: argparse.Namespace):
    """(PrequantSettings, --study-out path or None); ConfigError for anything missing or conflicting."""
    from pgolf.eval.study import RECORD_STUDIES, PrequantSettings

    for flag in ("artifact", "data", "tokenizer", "checkpoint"):
        if not getattr(args, flag):
            raise ConfigError(f"--study {args.study} needs --{flag}")
    if args.ttt or args.ttt_set or args.sliding:
        raise ConfigError("--study runs its own scoring (sliding windows, legal and study); drop --ttt/--ttt-set/"
                          "--sliding")
    if args.recipe and args.recipe not in RECORD_STUDIES:
        raise ConfigError(f"--recipe {args.recipe} has no pre-quant TTT to study; choose one of "
                          f"{', '.join(RECORD_STUDIES)}")
    try:
        settings = PrequantSettings.from_dict({**RECORD_STUDIES.get(args.recipe, {}), **parse_sets(args.study_set)})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--study-set: {e}") from None
    out = None
    if args.study_out:
        from pgolf.utils import check_output

        out = Path(args.study_out)
        check_output(out, force=args.force, what="study folder", flag="--study-out")
    return settings, out


def _checkpoint_model(path: str, opened: dict[str, Any]):
    """The pre-quantization model of ``path``; InputError unless its config is the artifact's."""
    from pgolf.model.config import GPTConfig
    from pgolf.model.gpt import GPT
    from pgolf.quant.cli import load_checkpoint

    ck = load_checkpoint(path)
    cfg = dict(ck["config"])
    if GPTConfig.from_dict(cfg).to_dict() != GPTConfig.from_dict(dict(opened["qm"].config)).to_dict():
        raise InputError(f"--checkpoint {path} holds another model than --artifact {opened.get('artifact')}: the "
                         f"study compares the two, so pass the run's own final_model.pt")
    model = GPT(GPTConfig.from_dict(cfg))
    model.load_state_dict(ck["model"], strict=True)
    model.looping_active = model.config.has_recurrence  # as the artifact's model is scored
    return model.to(opened["device"])


def _write_study(out: Path, qm, args, legal, study, adapted: dict, how: str, settings) -> None:
    """The study's artifact and the run's summary.json marked as a study, with the study artifact's size, SHA-256
    and scores (built in a temp folder, renamed into place): pgolf-pack packs it, as a non-record only."""
    import dataclasses
    import hashlib
    import json

    from pgolf.quant.artifact import save_artifact
    from pgolf.utils import staged_dir

    run = read_summary(args.summary or Path(args.artifact).with_name("summary.json"), required=True)
    with staged_dir(out, force=args.force, what="study folder", flag="--study-out") as tmp:
        nbytes = save_artifact(tmp / "final_model.pgq", qm)
        blob = (tmp / "final_model.pgq").read_bytes()
        art = dict(run.get("artifact") or {}, file="final_model.pgq", path=str(out / "final_model.pgq"),
                   bytes_model=nbytes, sha256=hashlib.sha256(blob).hexdigest(), val_bpb=study.val_bpb,
                   val_loss=study.val_loss, sliding=None, bytes_total=None, headroom=None)
        summary = dict(run, status="study", record=False, artifact=art,
                       study=dict(kind="prequant-ttt", conditions_failed=["3 (score before update)"],
                                  settings=dataclasses.asdict(settings), requantized=how, adaptation=adapted,
                                  legal_val_bpb=legal.val_bpb, study_val_bpb=study.val_bpb,
                                  gain_bpb=legal.val_bpb - study.val_bpb, source_artifact=str(args.artifact),
                                  checkpoint=str(args.checkpoint)))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _check_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The TTT overrides (a recipe's, then --ttt-set's); ConfigError for flags that are missing, would be ignored or
    conflict. A recipe sets ``args.ttt``."""
    for flag in ("artifact", "data", "tokenizer"):
        if not getattr(args, flag):
            raise ConfigError(f"--{flag} is required (python -m pgolf.eval --help)")
    if args.checkpoint or args.study_set or args.study_out:
        raise ConfigError("pre-quantization TTT on the validation tokens is illegal (condition 3: every token scored "
                          "before any update that used it); it runs only as a study: --study prequant-ttt "
                          "--checkpoint RUN/final_model.pt")
    recipe_settings: dict[str, Any] = {}
    if args.recipe:
        from pgolf.eval.recipes import get

        try:
            recipe = get(args.recipe)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if args.ttt and args.ttt != recipe.mode:
            raise ConfigError(f"--recipe {recipe.name} runs --ttt {recipe.mode}; drop --ttt {args.ttt}")
        args.ttt, recipe_settings = recipe.mode, dict(recipe.settings)
    if args.stride is not None and not (args.sliding or args.ttt):
        raise ConfigError("--stride only applies to --sliding and --ttt scoring; add one of them or drop --stride")
    if (args.ttt_set or args.ttt_budget) and not args.ttt:
        raise ConfigError("--ttt-set / --ttt-budget only apply with --ttt chunk|lora|phased")
    if args.ttt_budget and args.ttt != "chunk":
        raise ConfigError(f"--ttt-budget sizes the chunk mode only; --ttt {args.ttt} would ignore it")
    if args.ttt_budget < 0:
        raise ConfigError(f"--ttt-budget must be >= 0 seconds, got {args.ttt_budget}")
    if args.cuda_graphs and args.device == "cpu":
        raise ConfigError("--cuda-graphs replays CUDA graphs: drop it with --device cpu")
    if args.cuda_graphs:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--cuda-graphs needs a CUDA GPU and none is available here; drop --cuda-graphs")
    return {**recipe_settings, **parse_sets(args.ttt_set)}


def open_artifact(artifact: str, data: str, tokenizer: str, *, stride: int | None = None,
                  seq_len: int | None = None, batch_seqs: int | str = 32, val_max_tokens: int = 0,
                  device: str = "auto") -> dict[str, Any]:
    """Check every setting and input and read them: {'qm', 'val' (N+1,), 'tables', 'seq_len', 'stride', 'device'}.

    The artifact is read and verified, the tokenizer checked against its fingerprint and vocab, the validation
    tokens against the vocab. Nothing is scored here.
    """
    from pgolf.data.shards import find_shards, load_validation_tokens
    from pgolf.data.tokenizer import Tokenizer
    from pgolf.quant.artifact import check_tokenizer, load_artifact

    for flag, v, low in (("--stride", stride, 1), ("--seq-len", seq_len, 1),
                         ("--batch-seqs", None if batch_seqs == "auto" else batch_seqs, 1),
                         ("--val-max-tokens", val_max_tokens, 0)):
        if v is not None and v < low:
            raise ConfigError(f"{flag} must be >= {low}, got {v}")
    dev = _device(device)
    t0 = time.perf_counter()  # deserialization: read, verify, decompress, then (score_artifact) rebuild the model
    qm = load_artifact(artifact)
    seq_len = seq_len if seq_len is not None else int(qm.meta.get("eval_seq_len") or 2048)
    stride = stride if stride is not None else int(qm.meta.get("eval_stride") or 64)
    if 0 < val_max_tokens < seq_len:
        raise ConfigError(f"--val-max-tokens {val_max_tokens} is less than one window (--seq-len {seq_len}); use 0 "
                          f"(all) or at least {seq_len}")
    tok = Tokenizer(tokenizer)
    warning = check_tokenizer(qm, tok, source=f"artifact {artifact}")
    if warning:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    vocab = int(qm.config["vocab_size"])
    val_files = find_shards(data, "val")
    val = load_validation_tokens(val_files, seq_len, vocab)
    if val_max_tokens and val.numel() - 1 > val_max_tokens:
        val = val[: val_max_tokens // seq_len * seq_len + 1]
    tables = tok.validation_tables(vocab, val_files, val.numel())
    return {"qm": qm, "val": val, "tables": tables, "seq_len": seq_len, "stride": stride,
            "device": dev, "t0": t0, "data": data}


def check_stride(opened: dict[str, Any]) -> None:
    """ConfigError when the stride (given, or the run's) is longer than the window; for sliding and TTT scoring."""
    if opened["stride"] > opened["seq_len"]:
        raise ConfigError(f"the stride {opened['stride']} (--stride, else the run's) is longer than the window "
                          f"{opened['seq_len']} (--seq-len, else the run's); pass a --stride of at most the window")


def score_artifact(opened: dict[str, Any], *, sliding: bool = False, batch_seqs: int | str = 32,
                   int6_matmul: bool = False, doc_isolated: bool = False, cuda_graphs: bool = False) -> dict[str, Any]:
    """Rebuild the model of :func:`open_artifact`'s result and score it (plain, and sliding-window when asked);
    returns that dict plus 'plain', 'sliding' (EvalResult or None), 'model' and 'load_s'. ``batch_seqs='auto'``:
    the largest batch that fits (sliding; plain eval takes 32 then); ``cuda_graphs``: the scorer compiled and replayed
    as CUDA graphs, warmed up on random tokens before each eval's clock (``EvalResult.warmup_s``)."""
    import torch

    from pgolf.eval import evaluate, evaluate_sliding
    from pgolf.quant.artifact import build_model

    if sliding:
        check_stride(opened)
    r, dev = dict(opened), opened["device"]
    model = build_model(r["qm"], device=dev, int6_matmul=int6_matmul)
    load_s = time.perf_counter() - r.pop("t0")
    amp = torch.bfloat16 if dev.type == "cuda" else None
    plain = evaluate(model, r["val"], r["tables"], seq_len=r["seq_len"],
                     batch_seqs=32 if batch_seqs == "auto" else batch_seqs, doc_isolated=doc_isolated,
                     autocast_dtype=amp, cuda_graphs=cuda_graphs)
    slide = None
    if sliding:
        slide = evaluate_sliding(model, r["val"], r["tables"], window=r["seq_len"], stride=r["stride"],
                                 batch_windows=batch_seqs, doc_isolated=doc_isolated, autocast_dtype=amp,
                                 cuda_graphs=cuda_graphs)
    r.update(plain=plain, sliding=slide, model=model, load_s=load_s)
    return r


def evaluate_artifact(artifact: str, data: str, tokenizer: str, *, sliding: bool = False, stride: int | None = None,
                      seq_len: int | None = None, batch_seqs: int = 32, val_max_tokens: int = 0,
                      int6_matmul: bool = False, device: str = "auto", doc_isolated: bool = False) -> dict[str, Any]:
    """{'plain': EvalResult, 'sliding': EvalResult | None, 'model': the rebuilt model, 'qm': QuantizedModel, ...}:
    :func:`open_artifact` then :func:`score_artifact`."""
    opened = open_artifact(artifact, data, tokenizer, stride=stride, seq_len=seq_len, batch_seqs=batch_seqs,
                           val_max_tokens=val_max_tokens, device=device)
    return score_artifact(opened, sliding=sliding, batch_seqs=batch_seqs, int6_matmul=int6_matmul,
                          doc_isolated=doc_isolated)


def result_lines(r: dict[str, Any]) -> list[str]:
    """The challenge's ``final_quant_roundtrip`` (and ``final_quant_sliding_window``) lines of a scored result."""
    p = r["plain"]
    out = [f"final_quant_roundtrip val_loss:{p.val_loss:.4f} val_bpb:{p.val_bpb:.4f} "
           f"eval_time:{p.seconds * 1000:.0f}ms",
           f"final_quant_roundtrip_exact val_loss:{p.val_loss:.8f} val_bpb:{p.val_bpb:.8f}"]
    s = r["sliding"]
    if s is not None:
        out += [f"final_quant_sliding_window val_loss:{s.val_loss:.4f} val_bpb:{s.val_bpb:.4f} "
                f"eval_time:{s.seconds * 1000:.0f}ms",
                f"final_quant_sliding_window_exact val_loss:{s.val_loss:.8f} val_bpb:{s.val_bpb:.8f}"]
    return out


def ttt_with_report(r: dict[str, Any], mode: str, artifact: str | os.PathLike, t_start: float, *,
                    overrides: dict[str, Any] | None = None, budget: float = 0.0,
                    summary: str | os.PathLike | None = None, log=print):
    """Run score-first TTT on the model of :func:`evaluate_artifact`'s result ``r``; return (TTTResult, report).

    mode: 'chunk' | 'lora' | 'phased'; overrides: TTTSettings fields; budget: whole-eval seconds to size a chunk
    plan to (0 = as given). The warm-up (and the sizing) runs on random tokens only; eval time runs from
    ``t_start`` (taken before deserialization) to the end of TTT. Train time and code bytes come from the run's
    summary.json (default: beside the artifact) when found.
    """
    from pgolf.eval import ComplianceReport, measure_rates, plan_ttt, run_ttt

    model, val = r["model"], r["val"]
    settings = ttt_settings(r, overrides)
    run = read_summary(summary or Path(artifact).with_name("summary.json"), required=summary is not None)
    rates = measure_rates(model, seq_len=settings.seq_len, batch_seqs=2, vocab_size=int(r["qm"].config["vocab_size"]),
                          autocast_dtype=torch_dtype(settings.autocast_dtype))
    other = r["plain"].seconds + (r["sliding"].seconds if r["sliding"] is not None else 0.0)
    if budget and mode == "chunk":
        spent = time.perf_counter() - t_start
        plan = plan_ttt(budget - spent, rates, val.numel() - 1, window=settings.window, stride=settings.stride,
                        seq_len=settings.seq_len, chunk_tokens=(settings.chunk_tokens,), max_epochs=settings.epochs)
        settings = settings.replace(**plan.settings_overrides())
        log(f"ttt_plan: {plan.settings_overrides()} for {budget:.0f}s ({spent:.1f}s already spent)")
    prefill = train_tokens_for(r, settings)
    res = run_ttt(model, val, r["tables"], mode=mode, settings=settings, log=log, prefill_tokens=prefill)
    # compile/timing warm-ups ran on random tokens; like the records, they are outside the timed region
    warmups = rates.seconds + sum(e.warmup_s for e in (r["plain"], r["sliding"]) if e is not None) \
        + float(res.timings.get("warmup_s", 0.0))
    eval_seconds = time.perf_counter() - t_start - warmups
    art = run.get("artifact") or {}
    report = ComplianceReport.build(
        res, artifact_bytes=os.path.getsize(artifact), code_bytes=art.get("bytes_code"),
        train_seconds=run["train_time_ms"] / 1000 if "train_time_ms" in run else None,
        gptq_seconds=run.get("calibration_s"), gptq_in_train=True, deserialize_seconds=r["load_s"],
        warmup_seconds=warmups, other_eval_seconds=other, eval_seconds=eval_seconds, warmup_on_synthetic=True,
        warmup_outside_timer=True)
    return res, report


def train_tokens_for(r: dict[str, Any], settings) -> Any:
    """The training tokens the n-gram cache is pre-filled from: the first ``ngram_prefill_tokens`` of the
    ``fineweb_train_*.bin`` shards in --data (None without ``ngram`` or with a zero pre-fill); MissingInputError when
    there are none."""
    if not settings.ngram or settings.ngram_prefill_tokens <= 0:
        return None
    from pgolf.data.shards import find_shards, read_shard

    files = find_shards(r["data"], "train") if r.get("data") else []
    if not files:
        raise MissingInputError(f"the n-gram cache is pre-filled from training tokens, and --data {r.get('data')} has "
                                f"no fineweb_train_*.bin shards: add them, or --ttt-set ngram_prefill_tokens=0")
    import numpy as np
    import torch

    want, parts = settings.ngram_prefill_tokens + 1, []
    for f in files:
        parts.append(read_shard(f, int(r["qm"].config["vocab_size"]))[: want - sum(len(p) for p in parts)])
        if sum(len(p) for p in parts) >= want:
            break
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def ttt_settings(r: dict[str, Any], overrides: dict[str, Any] | None = None):
    """The TTTSettings for an opened artifact (its window and stride) with ``overrides``; ConfigError if invalid."""
    from pgolf.eval.ttt import TTTSettings

    cuda = r["device"].type == "cuda"
    try:
        return TTTSettings.from_dict({"window": r["seq_len"], "stride": r["stride"], "seq_len": r["seq_len"],
                                      "autocast_dtype": "bf16" if cuda else None, **(overrides or {})})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--ttt-set: {e}") from None


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["epochs=1", "params=blocks.*"]`` → {'epochs': 1, 'params': 'blocks.*'}: each key a TTTSettings field and
    each value of that field's type (JSON values where they parse); ConfigError names the bad item."""
    from pgolf.eval.ttt import TTTSettings

    defaults = {f.name: f.default for f in dataclasses.fields(TTTSettings)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--ttt-set takes KEY=VALUE, got {item!r}")
        if key not in defaults:
            raise ConfigError(f"--ttt-set {item}: unknown TTT settings [{key!r}]; known: {', '.join(sorted(defaults))}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[key] = _typed(key, value, defaults[key], item)
    return out


def _typed(key: str, value: Any, default: Any, item: str) -> Any:
    """``value`` checked against the type of the field's default (bool, int, float, tuple of names)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    else:
        ok = True  # None-defaulted fields (autocast_dtype, bos_id) are checked by TTTSettings itself
    if not ok:
        kind = type(default).__name__ if not isinstance(default, tuple) else "a name or a list of names"
        raise ConfigError(f"--ttt-set {item}: {key} takes {kind} (default {default!r}), got {value!r}")
    return value


def read_summary(path: str | os.PathLike, *, required: bool = False) -> dict[str, Any]:
    """The run's summary.json, or {} when there is none and it is not ``required`` (the report then marks train
    time 'not measured'); named errors for a missing required or an unreadable one."""
    p = Path(path)
    if not p.is_file():
        if required:
            raise MissingInputError(f"--summary {p} does not exist; pass the run's summary.json or leave it out")
        return {}
    try:
        s = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p} is not valid JSON ({e}); pass a run's summary.json (--summary) or move the corrupt "
                         f"one away") from None
    if not isinstance(s, dict):
        raise InputError(f"{p} is not a run summary (a JSON object)")
    return s


def torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, name)


def _device(name: str):
    import torch

    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _at_least(low: int, also: tuple[str, ...] = ()):
    def parse(text: str) -> int | str:
        if text in also:
            return text
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot read {text!r} as an integer"
                                             + "".join(f" or {a!r}" for a in also)) from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v

    parse.__name__ = f"integer >= {low}" + "".join(f" or {a!r}" for a in also)
    return parse


__all__ = ["build_parser", "open_artifact", "check_stride", "score_artifact", "evaluate_artifact", "result_lines",
           "main", "ttt_with_report", "ttt_settings", "parse_sets", "read_summary"]
