"""Bring checkpoints of the record scripts into pgolf's GPT.

The 2026-04-09 record script (R3, ``train_gpt.py`` of
``records/track_10min_16mb/2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT``) saves
``base_model.state_dict()`` with per-layer ``CastedLinear`` weights. pgolf keeps the same parameter names, so
conversion is: strip wrapper prefixes (``_orig_mod.`` from torch.compile, ``module.`` from DDP), infer the
architecture from the tensor shapes, take what a state dict cannot show (loop layout, parallel start, XSA
depth, RoPE dims) from the script's defaults or the same environment variables the script reads, and load
strictly. Files are read with ``torch.load(weights_only=True)``: no code from a checkpoint is executed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT

# The R3 script's hyperparameter defaults (its Hyperparameters class) for what shapes cannot tell.
R3_DEFAULTS = dict(num_loops=2, loop_start=3, loop_end=5, parallel_start=7, xsa_last_n=11, rope_dims=16,
                   rope_base=10000.0, rope_train_seq_len=2048, logit_softcap=30.0, ln_scale=True,
                   mlp_negative_slope=0.5)
# Environment variables of the record script that override those defaults.
R3_ENV = dict(NUM_LOOPS=("num_loops", int), LOOP_START=("loop_start", int), LOOP_END=("loop_end", int),
              PARALLEL_RESIDUAL_START=("parallel_start", int), XSA_LAST_N=("xsa_last_n", int),
              ROPE_DIMS=("rope_dims", int), ROPE_BASE=("rope_base", float),
              ROPE_TRAIN_SEQ_LEN=("rope_train_seq_len", int), LOGIT_SOFTCAP=("logit_softcap", float),
              LN_SCALE=("ln_scale", lambda s: bool(int(s))), LEAKY_RELU_SLOPE=("mlp_negative_slope", float))


def convert_r3_state_dict(state: Mapping[str, Tensor], env: Mapping[str, str] | None = None,
                          **overrides: Any) -> tuple[GPTConfig, dict[str, Tensor]]:
    """(config, state dict for :class:`GPT`) from a 2026-04-09 record state dict.

    ``env`` (default ``os.environ``) is read for the record script's variable names; ``overrides`` are
    GPTConfig fields that win over both. Tensors are returned as fp32 copies.
    """
    sd = {_strip(k): v.detach().to(torch.float32).clone() for k, v in state.items()}
    for key in ("tok_emb.weight", "skip_weights", "blocks.0.attn.c_q.weight", "blocks.0.attn.c_k.weight",
                "blocks.0.mlp.fc.weight", "blocks.0.attn.q_gain"):
        if key not in sd:
            raise ValueError(f"not a 2026-04-09 record state dict: key {key!r} is missing "
                             f"(found {len(sd)} keys, e.g. {sorted(sd)[:5]})")
    if "lm_head.weight" in sd:
        raise ValueError("this checkpoint has an untied lm_head; pgolf's GPT ties the head to the embedding")
    if "embed_proj.weight" in sd:
        raise ValueError("this checkpoint uses EMBEDDING_DIM != MODEL_DIM (embed_proj); pgolf does not model that")
    vocab, dim = sd["tok_emb.weight"].shape
    num_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    num_heads = sd["blocks.0.attn.q_gain"].numel()
    kv_dim = sd["blocks.0.attn.c_k.weight"].shape[0]
    cfg: dict[str, Any] = dict(R3_DEFAULTS)
    cfg.update(vocab_size=vocab, model_dim=dim, num_layers=num_layers, num_heads=num_heads,
               num_kv_heads=kv_dim // (dim // num_heads), mlp_hidden=sd["blocks.0.mlp.fc.weight"].shape[0],
               qk_gain_init=float(sd["blocks.0.attn.q_gain"].mean()), skip_gates="skip_gates" in sd,
               parallel_residual="gptj", smear_gate="none", attn_gate="none", init="record")
    env = os.environ if env is None else env
    for var, (field, parse) in R3_ENV.items():
        if var in env:
            cfg[field] = parse(env[var])
    if cfg["parallel_start"] < 0:
        cfg["parallel_residual"] = "none"
    cfg.update(overrides)
    config = GPTConfig(**cfg)
    if config.num_skips != sd["skip_weights"].shape[0]:
        raise ValueError(f"the checkpoint has {sd['skip_weights'].shape[0]} skip weights but the layout "
                         f"(NUM_LOOPS={config.num_loops}, LOOP_START={config.loop_start}, LOOP_END={config.loop_end}) "
                         f"needs {config.num_skips}; set those variables to the values the run used")
    check_state_dict(config, sd)
    return config, sd


def load_r3_checkpoint(path: str | os.PathLike, **overrides: Any) -> GPT:
    """A ready :class:`GPT` (looping on, eval mode) from a record ``final_model.pt``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{path} is not a loadable state dict ({type(e).__name__}: {e})") from e
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    config, sd = convert_r3_state_dict(state, **overrides)
    model = GPT(config)
    model.load_state_dict(sd, strict=True)
    model.looping_active = config.num_loops > 0
    return model.eval()


def check_state_dict(config: GPTConfig, sd: Mapping[str, Tensor]) -> None:
    """Raise one error listing every missing, unexpected or mis-shaped tensor versus ``GPT(config)``."""
    with torch.device("meta"):
        ref = GPT(config).state_dict()
    missing = sorted(set(ref) - set(sd))
    unexpected = sorted(set(sd) - set(ref))
    shapes = [f"{k}: {tuple(sd[k].shape)} != {tuple(ref[k].shape)}" for k in ref if k in sd and sd[k].shape != ref[k].shape]
    if missing or unexpected or shapes:
        raise ValueError("state dict does not match the model: "
                         + "; ".join(f"{what} {items}" for what, items in
                                     (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items))


def _strip(key: str) -> str:
    """Drop every torch.compile (``_orig_mod.``) and DDP (``module.``) wrapper prefix, in any nesting order."""
    while True:
        for prefix in ("_orig_mod.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            return key
