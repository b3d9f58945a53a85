"""``python -m pgolf.eval --artifact FILE --data DIR --tokenizer MODEL``: val_bpb of an artifact, from the file alone.

The model is rebuilt from the artifact (:func:`pgolf.quant.artifact.build_model`: no code from the file runs) and
scored on the validation shards (``fineweb_val_*.bin`` in DIR) exactly as the trainer does, printing the
challenge's lines::

    final_quant_roundtrip val_loss:2.0727 val_bpb:1.2244 eval_time:1420ms
    final_quant_roundtrip_exact val_loss:2.07269931 val_bpb:1.22436570
    final_quant_sliding_window val_loss:... val_bpb:... eval_time:...ms        (with --sliding)
    final_quant_sliding_window_exact val_loss:... val_bpb:...

``--int6-matmul`` swaps the int6 Linear layers for ``pgolf.kernels.int6_matmul.Int6Linear`` (weights stay int6 in
memory; the product runs through the kernel dispatch). The window length and stride default to the values the
training run stored in the artifact (else 2048 and 64).
"""

from __future__ import annotations

import argparse
import sys
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
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return p


def evaluate_artifact(artifact: str, data: str, tokenizer: str, *, sliding: bool = False, stride: int | None = None,
                      seq_len: int | None = None, batch_seqs: int = 32, val_max_tokens: int = 0,
                      int6_matmul: bool = False, device: str = "auto") -> dict[str, Any]:
    """{'plain': EvalResult, 'sliding': EvalResult | None, 'model': the rebuilt model, 'qm': QuantizedModel}."""
    import torch

    from pgolf.data.shards import find_shards, load_validation_tokens
    from pgolf.data.tokenizer import Tokenizer
    from pgolf.eval import evaluate, evaluate_sliding
    from pgolf.quant.artifact import build_model, load_artifact

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
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
    amp = torch.bfloat16 if dev.type == "cuda" else None
    plain = evaluate(model, val, tables, seq_len=seq_len, batch_seqs=batch_seqs, autocast_dtype=amp)
    slide = None
    if sliding:
        slide = evaluate_sliding(model, val, tables, window=seq_len, stride=stride, batch_windows=batch_seqs,
                                 autocast_dtype=amp)
    return {"plain": plain, "sliding": slide, "model": model, "qm": qm}


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

    try:
        r = evaluate_artifact(args.artifact, args.data, args.tokenizer, sliding=args.sliding, stride=args.stride,
                              seq_len=args.seq_len, batch_seqs=args.batch_seqs, val_max_tokens=args.val_max_tokens,
                              int6_matmul=args.int6_matmul, device=args.device)
    except (ArtifactError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"pgolf.eval: error: {e}", file=sys.stderr)
        return 1
    import os

    print(f"artifact:{args.artifact} bytes:{os.path.getsize(args.artifact)} tensors:{len(r['qm'].tensors)} "
          f"layout:{r['qm'].layout}{' int6_matmul:on' if args.int6_matmul else ''}")
    for line in result_lines(r):
        print(line)
    return 0


__all__ = ["build_parser", "evaluate_artifact", "result_lines", "main"]
