"""``python -m pgolf.train`` / ``pgolf-train``: train a preset on challenge-format shards.

Examples::

    python -m pgolf.train --preset tiny --data-path data/synthetic/shards --tokenizer-path data/synthetic/tokenizer.model
    DATA_PATH=... TOKENIZER_PATH=... torchrun --nproc_per_node=8 -m pgolf.train --preset sota
    python -m pgolf.train --preset pr1493 --print-params

Every setting is checked before any work; a bad one, a missing input or an existing run folder (``--force``
replaces its outputs) is reported by name without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from pgolf.errors import run_cli
from pgolf.train.config import add_flags, resolve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgolf-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--print-params", action="store_true", help="print the model's parameter count and exit")
    add_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("pgolf-train", lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    flags = {k: v for k, v in vars(args).items() if k != "print_params"}
    cfg, model_cfg = resolve(flags.get("preset") or "sota", flags=flags)
    if args.print_params:
        print_params(cfg.preset, model_cfg, aux_to_muon=cfg.muon_aux_matrices)
        return 0
    from pgolf.train.trainer import train
    from pgolf.utils import distributed_session

    with distributed_session():  # under torchrun: every rank leaves together, then the group is closed
        summary = train(cfg, model_cfg)
    art = summary.get("artifact") or {}
    scored = f" artifact_val_bpb:{art['val_bpb']:.6f} bytes_total:{art.get('bytes_total', 0)}" if art else ""
    print(f"val_bpb:{summary['val_bpb']:.6f}{scored} steps:{summary['steps']} "
          f"train_time:{summary['train_time_ms']:.0f}ms")
    return 0


def print_params(preset: str, model_cfg, aux_to_muon: bool = False) -> None:
    """Exact parameter count, per optimizer group, of the model (built on the meta device: no memory)."""
    import torch

    from pgolf.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(model_cfg)
    groups = {k: sum(p.numel() for _, p in v) for k, v in model.optimizer_groups(aux_to_muon).items()}
    print(f"preset:{preset} params:{model.num_params()} "
          + " ".join(f"{k}:{v}" for k, v in groups.items()))


if __name__ == "__main__":
    sys.exit(main())
