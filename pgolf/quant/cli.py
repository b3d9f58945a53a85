"""``python -m pgolf.quant``: quantize a checkpoint into an artifact (again), e.g. with another k after an
over-budget run, and compare the value layouts.

    python -m pgolf.quant --checkpoint runs/<id>/final_model.pt --preset sota --data-path DIR \\
        --out runs/<id>/final_model.pgq [--quant-mlp-k 12.0 ...] [--compare-layouts] [--tokenizer-path MODEL]

The Hessians come from ``gptq_calibration_batches`` batches of the TRAINING shards in DIR (this is calibration: on
the challenge machine it counts as training time, so do it inside the run; this tool is for experiments). Every
quantization flag of ``pgolf-train`` applies (``--quant-attn-k``, ``--quant-embed-bits``, ``--lqer-rank``, ...).
``--compare-layouts`` prints the artifact size under each value layout (int8 containers vs packed int6).
With ``--tokenizer-path`` the artifact is also evaluated (plain val_bpb).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from pgolf.train.config import add_flags, resolve

    ap = argparse.ArgumentParser(prog="python -m pgolf.quant", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--checkpoint", required=True, help="final_model.pt of a run ({'model': state, 'config': ...})")
    ap.add_argument("--out", required=True, help="artifact file to write")
    ap.add_argument("--compare-layouts", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    add_flags(ap)
    args = ap.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("checkpoint", "out", "compare_layouts", "threads")}
    import torch

    from pgolf.data.shards import find_shards
    from pgolf.model.config import GPTConfig
    from pgolf.model.gpt import GPT
    from pgolf.quant.artifact import LAYOUTS, encode, save_artifact
    from pgolf.quant.calibrate import calibration_batches, timed_calibration
    from pgolf.quant.quantize import QuantSettings, quantize_state
    from pgolf.quant.size import artifact_size_table, format_size_table

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg, _ = resolve(flags.get("preset") or "sota", flags=flags)
        ck = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model_cfg = GPTConfig.from_dict(ck["config"])
        dev = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
        model = GPT(model_cfg).to(dev)
        model.load_state_dict(ck["model"])
        settings = QuantSettings.from_train_config(cfg)
        hess, n_cal, secs = None, 0, 0.0
        if cfg.quant_method == "gptq":
            if not cfg.data_path:
                raise ValueError("GPTQ calibration needs --data-path (training shards); or use --quant-method rtn")
            tokens = cfg.gptq_calibration_tokens or cfg.train_batch_tokens
            batches = calibration_batches(find_shards(cfg.data_path, "train"), cfg.train_seq_len, tokens,
                                          cfg.gptq_calibration_batches, seed=cfg.seed)
            hess, n_cal, secs = timed_calibration(model, batches, device=dev,
                                                  autocast_dtype=torch.bfloat16 if dev.type == "cuda" else None)
            print(f"calibration: {len(hess)} hessians from {n_cal} batches in {secs:.1f}s")
        t0 = time.perf_counter()
        qm = quantize_state(model.state_dict(), hess, settings, model_config=model_cfg.to_dict(),
                            layout=cfg.artifact_layout,
                            meta={"n_cal": n_cal, "eval_seq_len": cfg.eval_seq_len, "eval_stride": cfg.eval_stride},
                            log=print)
        if args.compare_layouts:
            for layout in LAYOUTS:
                print(f"layout {layout}: {len(encode(qm, layout=layout)):,} bytes")
        n = save_artifact(args.out, qm)
        print(f"artifact: {args.out} {n:,} bytes (layout {cfg.artifact_layout}) in {time.perf_counter() - t0:.1f}s")
        print(format_size_table(artifact_size_table(args.out)))
        if cfg.tokenizer_path:
            from pgolf.eval.cli import evaluate_artifact, result_lines

            r = evaluate_artifact(args.out, cfg.data_path, cfg.tokenizer_path, seq_len=cfg.eval_seq_len,
                                  batch_seqs=cfg.eval_batch_seqs, val_max_tokens=cfg.val_max_tokens)
            print("\n".join(result_lines(r)))
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"python -m pgolf.quant: error: {e}", file=sys.stderr)
        return 1
    return 0


__all__ = ["main"]
