"""Entry point of the self-contained ``train_gpt.py`` that ``pgolf-pack`` writes (see :mod:`pgolf.quant.bundle`).

``main(preset, overrides, script)`` rebuilds the packed run's configuration: the preset, then the run's
``overrides`` (the fields where the run differed from its preset), then the record scripts' environment variables
(``DATA_PATH``, ``TOKENIZER_PATH``, ``SEED``, ``RUN_ID``, ``ITERATIONS``, ``MAX_WALLCLOCK_SECONDS``, ...; see
:data:`pgolf.train.config.ENV_NAMES`) and ``RUN_DIR``, and trains, quantizes and evaluates exactly as ``pgolf`` does.
The counted code size is the size of ``script`` (the wrapped file itself).
"""

from __future__ import annotations

import os
from typing import Any, Mapping


def submission_config(preset: str, overrides: Mapping[str, Any], env: Mapping[str, str]):
    """(TrainConfig, GPTConfig): preset < overrides < environment variables (named in any error)."""
    from pgolf.model.presets import get_preset
    from pgolf.train.config import ENV_NAMES, _mlp_mult, _parse, resolve

    flags = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    for var, name in ENV_NAMES.items():
        if env.get(var, "") != "":
            flags[name] = _parse(name, env[var], source=var)
    mult = _mlp_mult(env)
    if mult is not None:
        flags["mlp_hidden"] = int(mult * flags.get("model_dim", get_preset(preset).model.model_dim))
    if env.get("RUN_DIR"):
        flags["run_dir"] = env["RUN_DIR"]
    return resolve(preset, env={}, flags=flags)


def main(preset: str, overrides: Mapping[str, Any], script: str | None = None, code_bytes: int = 0) -> int:
    """Train, quantize and evaluate the packed run; ``code_bytes`` (or else the size of ``script``) is counted."""
    from pgolf.errors import run_cli

    return run_cli("train_gpt.py", lambda: _run(preset, overrides, script, code_bytes))


def _run(preset: str, overrides: Mapping[str, Any], script: str | None, code_bytes: int) -> int:
    from dataclasses import replace

    from pgolf.train.trainer import train

    cfg, model_cfg = submission_config(preset, overrides, os.environ)
    if not cfg.code_bytes:
        if code_bytes:
            cfg = replace(cfg, code_bytes=int(code_bytes))
        elif script and os.path.isfile(script):
            cfg = replace(cfg, code_bytes=os.path.getsize(script))
    s = train(cfg, model_cfg)
    art = s.get("artifact") or {}
    if art:
        print(f"val_bpb:{art['val_bpb']:.8f} pre_quant_val_bpb:{s['val_bpb']:.8f} steps:{s['steps']} "
              f"train_time:{s['train_time_ms']:.0f}ms bytes_total:{art.get('bytes_total', 0)}")
    else:
        print(f"val_bpb:{s['val_bpb']:.8f} steps:{s['steps']} train_time:{s['train_time_ms']:.0f}ms")
    return 0


__all__ = ["main", "submission_config"]
