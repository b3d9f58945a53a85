"""``python -m pgolf.quant``: quantize a checkpoint into an artifact (again), e.g. with another k after an
over-budget run, and compare the value layouts.

    python -m pgolf.quant --checkpoint runs/<id>/final_model.pt --preset sota --data-path DIR \\
        --out new.pgq [--quant-mlp-k 12.0 ...] [--compare-layouts] [--tokenizer-path MODEL] [--force]

The Hessians come from ``gptq_calibration_batches`` batches of the TRAINING shards in DIR (this is calibration: on
the challenge machine it counts as training time, so do it inside the run; this tool is for experiments). Every
quantization flag of ``pgolf-train`` applies (``--quant-attn-k``, ``--quant-embed-bits``, ``--lqer-rank``, ...).
``--compare-layouts`` prints the artifact size under each value layout (int8 containers vs packed int6).
With ``--tokenizer-path`` the artifact is also evaluated (plain val_bpb).

Every setting and input is checked before any work: the checkpoint must be a pgolf ``final_model.pt``, an existing
``--out`` is refused unless ``--force`` (a run's own artifact replaced this way no longer matches its summary, so
``pgolf-pack`` refuses it), and the artifact records the tokenizer fingerprint the checkpoint carries (a
``--tokenizer-path`` must match it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from pgolf.errors import InputError, MissingInputError, run_cli

PROG = "python -m pgolf.quant"


def build_parser() -> argparse.ArgumentParser:
    from pgolf.train.config import add_flags

    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--checkpoint", required=True, help="final_model.pt of a run ({'model': state, 'config': ...})")
    ap.add_argument("--out", required=True, help="artifact file to write (refused if it exists, unless --force)")
    ap.add_argument("--compare-layouts", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    add_flags(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: _quantize(args))


def _quantize(args: argparse.Namespace) -> int:
    import torch

    from pgolf.data.shards import find_shards
    from pgolf.quant.artifact import LAYOUTS, encode, save_artifact
    from pgolf.quant.calibrate import calibration_batches, generated_batches, timed_calibration
    from pgolf.quant.quantize import QuantSettings, quantize_for_artifact
    from pgolf.quant.size import artifact_size_table, format_size_table

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, model, tokenizer = checked_inputs(args)
    dev = next(model.parameters()).device
    hess, n_cal = None, 0
    amp = torch.bfloat16 if dev.type == "cuda" else None
    if cfg.quant_method == "gptq" and cfg.gptq_calibration == "generated":
        batches = generated_batches(model, cfg.gptq_calibration_batches, cfg.train_seq_len,
                                    temperature=cfg.gptq_generate_temperature, seed=cfg.seed, device=dev,
                                    autocast_dtype=amp)
    elif cfg.quant_method == "gptq":
        tokens = cfg.gptq_calibration_tokens or cfg.train_batch_tokens
        batches = calibration_batches(find_shards(cfg.data_path, "train"), cfg.train_seq_len, tokens,
                                      cfg.gptq_calibration_batches, seed=cfg.seed,
                                      vocab_size=model.config.vocab_size)
    if cfg.quant_method == "gptq":
        hess, n_cal, secs = timed_calibration(model, batches, device=dev, autocast_dtype=amp)
        print(f"calibration: {len(hess)} hessians from {n_cal} batches in {secs:.1f}s")
    t0 = time.perf_counter()
    code_bytes = 0
    if cfg.quant_target_bytes:
        from pgolf.quant.bundle import measure_code_bytes

        code_bytes = cfg.code_bytes or measure_code_bytes(cfg, model.config)
    qm = quantize_for_artifact(model.state_dict(), hess, QuantSettings.from_train_config(cfg), code_bytes=code_bytes,
                               model_config=model.config.to_dict(), layout=cfg.artifact_layout,
                               meta={"n_cal": n_cal, "eval_seq_len": cfg.eval_seq_len, "eval_stride": cfg.eval_stride},
                               log=print)
    qm.tokenizer = tokenizer
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
    return 0


def checked_inputs(args: argparse.Namespace):
    """(TrainConfig, the checkpoint's model on its device, tokenizer fingerprint or None) after checking every
    setting, the output and the inputs; nothing is computed before this passes."""
    import torch

    from pgolf.data.tokenizer import Tokenizer
    from pgolf.model.config import GPTConfig
    from pgolf.model.gpt import GPT
    from pgolf.train.config import check_paths, resolve, validate
    from pgolf.utils import check_output

    flags = {k: v for k, v in vars(args).items() if k not in ("checkpoint", "out", "compare_layouts", "threads")}
    cfg, _ = resolve(flags.get("preset") or "sota", flags=flags)
    out = Path(args.out)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; pass the artifact file to write (e.g. {out / 'final_model.pgq'})")
    check_output(out, force=cfg.force, what="artifact", flag="--out")
    ck = load_checkpoint(args.checkpoint)
    try:
        model_cfg = GPTConfig.from_dict(ck["config"])
    except (TypeError, ValueError) as e:
        raise InputError(f"--checkpoint {args.checkpoint}: its model config is not usable ({e})") from None
    validate(cfg, model_cfg)
    if cfg.quant_method == "gptq" and cfg.gptq_calibration == "train":
        check_paths(cfg, need=("data_path",))
    fingerprint = ck.get("tokenizer")
    if cfg.tokenizer_path:
        tok = Tokenizer(cfg.tokenizer_path)
        tok.check_vocab(model_cfg.vocab_size)
        if fingerprint is not None:
            tok.check_fingerprint(fingerprint, source=f"--checkpoint {args.checkpoint}")
        fingerprint = tok.fingerprint()
    elif fingerprint is None:
        print(f"warning: {args.checkpoint} records no tokenizer fingerprint and no --tokenizer-path was given, so the "
              f"artifact will not record one (pass --tokenizer-path to record it)", file=sys.stderr)
    dev = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    model = GPT(model_cfg).to(dev)
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, TypeError) as e:
        raise InputError(f"--checkpoint {args.checkpoint}: its weights do not fit its model config "
                         f"({str(e).splitlines()[0]})") from None
    return cfg, model, fingerprint


def load_checkpoint(path: str) -> dict[str, Any]:
    """A pgolf checkpoint ({'model': state dict, 'config': model config, ...}); named errors for anything else."""
    import torch

    p = Path(path)
    if p.is_dir():
        raise InputError(f"--checkpoint {p} is a folder; pass the final_model.pt file inside it")
    if not p.is_file():
        raise MissingInputError(f"--checkpoint {p} does not exist; pass a run's final_model.pt")
    with open(p, "rb") as f:
        head = f.read(8)
    if head == b"PGOLFART":
        raise InputError(f"--checkpoint {p} is a pgolf artifact (.pgq), not a checkpoint; quantize the run's "
                         f"final_model.pt (the artifact is already quantized; score it with python -m pgolf.eval)")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise InputError(f"--checkpoint {p} is not a readable torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); is it truncated? pass a run's final_model.pt") from None
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        keys = sorted(ck)[:6] if isinstance(ck, dict) else type(ck).__name__
        raise InputError(f"--checkpoint {p} is not a pgolf checkpoint (expected keys 'model' and 'config', got "
                         f"{keys}); a record's checkpoint converts with python -m pgolf.model.convert")
    return ck


__all__ = ["main", "checked_inputs", "load_checkpoint"]
