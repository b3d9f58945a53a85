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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pgolf.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True, help="the artifact file (final_model.pgq)")
    p.add_argument("--data", required=True, help="folder with fineweb_val_*.bin shards")
    p.add_argument("--tokenizer", required=True, help="SentencePiece model (byte tables for val_bpb)")
    p.add_argument("--sliding", action="store_true", help="also run the sliding-window eval")
    p.add_argument("--stride", type=int, default=None, help="sliding stride (default: the run's, else 64)")
    p.add_argument("--seq-len", type=int, default=None, help="eval window (default: the run's, else 2048)")
    p.add_argument("--batch-seqs", type=int, default=32)
    p.add_argument("--val-max-tokens", type=int, default=0, help="cap the validation tokens (0 = all)")
    p.add_argument("--int6-matmul", action="store_true", help="run int6 layers through Int6Linear")
    p.add_argument("--doc-isolated", action="store_true", help="attention never crosses a BOS inside a window")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--ttt", choices=("chunk", "lora", "phased"), help="legal score-first test-time training, then "
                   "the compliance report")
    p.add_argument("--ttt-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TTT setting (pgolf.eval.ttt.TTTSettings), e.g. --ttt-set epochs=1; repeatable")
    p.add_argument("--ttt-budget", type=float, default=0.0, metavar="SECONDS",
                   help="chunk mode: size epochs/chunk to this whole-eval time from a warm-up on random tokens")
    p.add_argument("--summary", help="the training run's summary.json for the report's train time and code bytes "
                   "(default: summary.json beside the artifact, when present)")
    return p


def evaluate_artifact(artifact: str, data: str, tokenizer: str, *, sliding: bool = False, stride: int | None = None,
                      seq_len: int | None = None, batch_seqs: int = 32, val_max_tokens: int = 0,
                      int6_matmul: bool = False, device: str = "auto", doc_isolated: bool = False) -> dict[str, Any]:
    """{'plain': EvalResult, 'sliding': EvalResult | None, 'model': the rebuilt model, 'qm': QuantizedModel}."""
    import torch

    from pgolf.data.shards import find_shards, load_validation_tokens
    from pgolf.data.tokenizer import Tokenizer
    from pgolf.eval import evaluate, evaluate_sliding
    from pgolf.quant.artifact import build_model, load_artifact

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    t0 = time.perf_counter()  # deserialization: read, verify, decompress, then rebuild the model
    qm = load_artifact(artifact)
    seq_len = seq_len or int(qm.meta.get("eval_seq_len") or 2048)
    stride = stride or int(qm.meta.get("eval_stride") or 64)
    vocab = int(qm.config["vocab_size"])
    tok = Tokenizer(tokenizer)
    tok.check_vocab(vocab)
    tables = tok.byte_tables(vocab)
    val = load_validation_tokens(find_shards(data, "val"), seq_len, vocab)
    if val_max_tokens and val.numel() - 1 > val_max_tokens:
        keep = max(seq_len, val_max_tokens // seq_len * seq_len)
        val = val[: keep + 1]
    model = build_model(qm, device=dev, int6_matmul=int6_matmul)
    load_s = time.perf_counter() - t0
    amp = torch.bfloat16 if dev.type == "cuda" else None
    plain = evaluate(model, val, tables, seq_len=seq_len, batch_seqs=batch_seqs, doc_isolated=doc_isolated,
                     autocast_dtype=amp)
    slide = None
    if sliding:
        slide = evaluate_sliding(model, val, tables, window=seq_len, stride=stride, batch_windows=batch_seqs,
                                 doc_isolated=doc_isolated, autocast_dtype=amp)
    return {"plain": plain, "sliding": slide, "model": model, "qm": qm, "val": val, "tables": tables,
            "seq_len": seq_len, "stride": stride, "load_s": load_s, "device": dev}


def result_lines(r: dict[str, Any]) -> list[str]:
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pgolf.quant.artifact import ArtifactError

    t_start = time.perf_counter()
    try:
        r = evaluate_artifact(args.artifact, args.data, args.tokenizer, sliding=args.sliding, stride=args.stride,
                              seq_len=args.seq_len, batch_seqs=args.batch_seqs, val_max_tokens=args.val_max_tokens,
                              int6_matmul=args.int6_matmul, device=args.device, doc_isolated=args.doc_isolated)
    except (ArtifactError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"pgolf.eval: error: {e}", file=sys.stderr)
        return 1
    print(f"artifact:{args.artifact} bytes:{os.path.getsize(args.artifact)} tensors:{len(r['qm'].tensors)} "
          f"layout:{r['qm'].layout}{' int6_matmul:on' if args.int6_matmul else ''}")
    for line in result_lines(r):
        print(line)
    if args.ttt:
        from pgolf.eval import ComplianceViolation

        try:
            res, report = ttt_with_report(r, args.ttt, args.artifact, t_start, overrides=parse_sets(args.ttt_set),
                                          budget=args.ttt_budget, summary=args.summary)
        except (ValueError, ComplianceViolation) as e:
            print(f"pgolf.eval: error: {e}", file=sys.stderr)
            return 1
        print(f"final_ttt_{args.ttt} val_loss:{res.val_loss:.4f} val_bpb:{res.val_bpb:.4f} "
              f"eval_time:{res.seconds * 1000:.0f}ms")
        print(f"final_ttt_{args.ttt}_exact val_loss:{res.val_loss:.8f} val_bpb:{res.val_bpb:.8f}")
        print(report.render())
        return 0 if report.ok else 3
    return 0


def ttt_with_report(r: dict[str, Any], mode: str, artifact: str | os.PathLike, t_start: float, *,
                    overrides: dict[str, Any] | None = None, budget: float = 0.0,
                    summary: str | os.PathLike | None = None, log=print):
    """Run score-first TTT on the model of :func:`evaluate_artifact`'s result ``r``; return (TTTResult, report).

    mode: 'chunk' | 'lora' | 'phased'; overrides: TTTSettings fields; budget: whole-eval seconds to size a chunk
    plan to (0 = as given). The warm-up (and the sizing) runs on random tokens only; eval time runs from
    ``t_start`` (taken before deserialization) to the end of TTT. Train time and code bytes come from the run's
    summary.json (default: beside the artifact) when found.
    """
    from pgolf.eval import ComplianceReport, TTTSettings, measure_rates, plan_ttt, run_ttt

    model, val = r["model"], r["val"]
    cuda = r["device"].type == "cuda"
    settings = TTTSettings.from_dict({"window": r["seq_len"], "stride": r["stride"], "seq_len": r["seq_len"],
                                      "autocast_dtype": "bf16" if cuda else None, **(overrides or {})})
    rates = measure_rates(model, seq_len=settings.seq_len, batch_seqs=2, vocab_size=int(r["qm"].config["vocab_size"]),
                          autocast_dtype=torch_dtype(settings.autocast_dtype))
    other = r["plain"].seconds + (r["sliding"].seconds if r["sliding"] is not None else 0.0)
    if budget and mode == "chunk":
        spent = time.perf_counter() - t_start
        plan = plan_ttt(budget - spent, rates, val.numel() - 1, window=settings.window, stride=settings.stride,
                        seq_len=settings.seq_len, chunk_tokens=(settings.chunk_tokens,), max_epochs=settings.epochs)
        settings = settings.replace(**plan.settings_overrides())
        log(f"ttt_plan: {plan.settings_overrides()} for {budget:.0f}s ({spent:.1f}s already spent)")
    res = run_ttt(model, val, r["tables"], mode=mode, settings=settings, log=log)
    eval_seconds = time.perf_counter() - t_start
    run = read_summary(summary or Path(artifact).with_name("summary.json"))
    art = run.get("artifact") or {}
    report = ComplianceReport.build(
        res, artifact_bytes=os.path.getsize(artifact), code_bytes=art.get("bytes_code"),
        train_seconds=run["train_time_ms"] / 1000 if "train_time_ms" in run else None,
        gptq_seconds=run.get("calibration_s"), gptq_in_train=True, deserialize_seconds=r["load_s"],
        warmup_seconds=rates.seconds, other_eval_seconds=other, eval_seconds=eval_seconds, warmup_on_synthetic=True)
    return res, report


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["epochs=1", "params=blocks.*"]`` → {'epochs': 1, 'params': 'blocks.*'} (JSON values where they parse)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--ttt-set takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The run's summary.json, or {} when there is none (the report then marks train time 'not measured')."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, name)


__all__ = ["build_parser", "evaluate_artifact", "result_lines", "main", "ttt_with_report"]
