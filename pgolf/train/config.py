"""Training configuration: a dataclass, the record scripts' environment variable names, and CLI flags.

Precedence: dataclass defaults < preset < environment variables (the record scripts' names, e.g.
``TRAIN_BATCH_TOKENS``, ``QK_GAIN_INIT``) < command-line flags (``--train-batch-tokens``, ``--qk-gain-init``).
Model fields (:class:`pgolf.model.GPTConfig`) and training fields share one flat namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from pgolf.model.config import GPTConfig
from pgolf.model.presets import get_preset


@dataclass
class TrainConfig:
    """Everything the trainer needs besides the model architecture."""

    preset: str = "sota"
    data_path: str = ""             # folder with fineweb_train_*.bin and fineweb_val_*.bin
    tokenizer_path: str = ""        # SentencePiece model (byte tables for val_bpb)
    run_dir: str = ""               # default runs/<run_id>
    run_id: str = ""
    seed: int = 1337
    iterations: int = 20000
    train_seq_len: int = 2048
    train_batch_tokens: int = 786_432   # global tokens per optimizer step
    grad_accum_base: int = 8            # grad_accum = max(1, grad_accum_base // world_size), as the records
    max_wallclock_seconds: float = 600.0  # 0 = no cap (then schedules follow iterations)
    gptq_reserve_seconds: float = 0.0   # kept free at the end of the cap for GPTQ calibration
    loader: str = "packed"              # sequential | shuffled | packed
    warmdown_frac: float = 0.72
    warmdown_iters: int = 0             # R0/R1 iteration warmdown (used when warmdown_frac is 0)
    min_lr: float = 0.0
    matrix_lr: float = 0.022
    muon_momentum: float = 0.97
    muon_momentum_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_wd: float = 0.095
    muon_row_normalize: bool = True
    ns_steps: int = 5
    ns_coefficients: str = "polar_express"
    tok_lr: float = 0.03
    tok_wd: float = 0.085
    scalar_lr: float = 0.02
    scalar_wd: float = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3         # 0 = off
    ema_decay: float = 0.9965           # 0 = off
    warmup_steps: int = 20              # compile warm-up steps on synthetic tokens (state restored after)
    compile: str = "auto"               # auto (CUDA only) | on | off
    device: str = "auto"                # auto | cpu | cuda
    eval_seq_len: int = 2048
    eval_stride: int = 64               # sliding-window stride at the end (0 = no sliding eval)
    eval_batch_seqs: int = 32
    eval_doc_isolated: bool = False     # attention never crosses a BOS in evaluation windows (R6's diagnostic eval)
    val_loss_every: int = 0             # periodic validation (0 = only at the end)
    val_max_tokens: int = 0             # cap the validation tokens (0 = the whole split)
    train_log_every: int = 100
    save_checkpoint: bool = True
    # quantization and the artifact (reference-stack 4.4-4.5; pgolf.quant). Defaults: the 2026-04-27 record (R6)
    quant_method: str = "gptq"          # gptq | rtn (round-to-nearest, no calibration) | none (no artifact)
    quant_attn_bits: int = 6            # attention matrices: bit width and SDClip k (scale = k·std(row)/Q)
    quant_attn_k: float = 13.0
    quant_mlp_bits: int = 6             # MLP matrices
    quant_mlp_k: float = 11.5
    quant_embed_bits: int = 7           # tied embedding
    quant_embed_k: float = 14.0
    quant_gate_int8: bool = True        # attention head-gate weights as int8 per row (absmax/127)
    quant_passthrough_max: int = 65_536  # tensors with at most this many elements stay fp16
    gptq_calibration_batches: int = 16  # calibration batches per rank (training data; counted as training time)
    gptq_calibration_tokens: int = 0    # tokens per calibration batch per rank (0 = train_batch_tokens / world_size)
    gptq_block_size: int = 128
    gptq_damp: float = 0.01
    lqer_rank: int = 0                  # LQER low-rank correction rank (0 = off; R6: 4)
    lqer_top: int = 3                   # tensors corrected (largest quantization error)
    artifact_layout: str = "int8"       # int8 (one byte per value, measured smaller) | packed6 (int6 as 4-in-3)
    artifact_name: str = "final_model.pgq"
    code_bytes: int = 0                 # counted code bytes (0 = measure the pgolf-pack bundle of this config)
    budget_check: str = "error"         # error | warn: what an artifact + code over 16,000,000 bytes does

    def grad_accum(self, world_size: int) -> int:
        return max(1, self.grad_accum_base // world_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# Record-script environment variable → field name (train or model).
ENV_NAMES = {
    "DATA_PATH": "data_path", "TOKENIZER_PATH": "tokenizer_path", "RUN_ID": "run_id", "SEED": "seed",
    "ITERATIONS": "iterations", "TRAIN_SEQ_LEN": "train_seq_len", "TRAIN_BATCH_TOKENS": "train_batch_tokens",
    "MAX_WALLCLOCK_SECONDS": "max_wallclock_seconds", "GPTQ_RESERVE_SECONDS": "gptq_reserve_seconds",
    "WARMDOWN_FRAC": "warmdown_frac", "WARMDOWN_ITERS": "warmdown_iters", "MIN_LR": "min_lr",
    "MATRIX_LR": "matrix_lr", "MUON_MOMENTUM": "muon_momentum", "MUON_MOMENTUM_WARMUP_START": "muon_momentum_start",
    "MUON_MOMENTUM_WARMUP_STEPS": "muon_momentum_warmup_steps", "MUON_WD": "muon_wd",
    "MUON_ROW_NORMALIZE": "muon_row_normalize", "MUON_BACKEND_STEPS": "ns_steps", "TIED_EMBED_LR": "tok_lr",
    "EMBED_WD": "tok_wd", "SCALAR_LR": "scalar_lr", "ADAM_WD": "scalar_wd", "ADAM_EPS": "adam_eps",
    "GRAD_CLIP_NORM": "grad_clip_norm", "EMA_DECAY": "ema_decay", "WARMUP_STEPS": "warmup_steps",
    "EVAL_SEQ_LEN": "eval_seq_len", "EVAL_STRIDE": "eval_stride", "VAL_LOSS_EVERY": "val_loss_every",
    "TRAIN_LOG_EVERY": "train_log_every",
    # quantization (pgolf's names)
    "QUANT_METHOD": "quant_method", "QUANT_ATTN_BITS": "quant_attn_bits", "QUANT_ATTN_K": "quant_attn_k",
    "QUANT_MLP_BITS": "quant_mlp_bits", "QUANT_MLP_K": "quant_mlp_k", "QUANT_EMBED_BITS": "quant_embed_bits",
    "QUANT_EMBED_K": "quant_embed_k", "GPTQ_CALIBRATION_BATCHES": "gptq_calibration_batches",
    "GPTQ_CALIBRATION_TOKENS": "gptq_calibration_tokens", "LQER_RANK": "lqer_rank", "LQER_TOP": "lqer_top",
    "ARTIFACT_LAYOUT": "artifact_layout", "CODE_BYTES": "code_bytes",
    # model
    "VOCAB_SIZE": "vocab_size", "NUM_LAYERS": "num_layers", "MODEL_DIM": "model_dim", "NUM_HEADS": "num_heads",
    "NUM_KV_HEADS": "num_kv_heads", "LOGIT_SOFTCAP": "logit_softcap", "ROPE_BASE": "rope_base",
    "ROPE_DIMS": "rope_dims", "LN_SCALE": "ln_scale",
    "QK_GAIN_INIT": "qk_gain_init", "XSA_LAST_N": "xsa_last_n", "SKIP_GATES_ENABLED": "skip_gates",
    "NUM_LOOPS": "num_loops", "LOOP_START": "loop_start", "LOOP_END": "loop_end",
    "ENABLE_LOOPING_AT": "loop_activate_frac", "PARALLEL_RESIDUAL_START": "parallel_start",
    "TIED_EMBED_INIT_STD": "tied_embed_init_std", "LEAKY_RELU_SLOPE": "mlp_negative_slope",
}
DERIVED_ENV = {"MLP_MULT"}  # hidden = MLP_MULT * MODEL_DIM, resolved after the dims are known

_MODEL_FIELDS = {f.name: f for f in fields(GPTConfig)}
_TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig)}
assert not set(_MODEL_FIELDS) & set(_TRAIN_FIELDS), "model and train field names must not collide"


def resolve(preset: str, env: Mapping[str, str] | None = None,
            flags: Mapping[str, Any] | None = None) -> tuple[TrainConfig, GPTConfig]:
    """(TrainConfig, GPTConfig) from a preset name, environment variables and parsed flag values."""
    env = os.environ if env is None else env
    flags = dict(flags or {})
    p = get_preset(flags.pop("preset", None) or env.get("PRESET") or preset)
    values: dict[str, Any] = {**p.train, "preset": p.name}
    model_values: dict[str, Any] = {}
    for var, name in ENV_NAMES.items():
        if var in env and env[var] != "":
            (model_values if name in _MODEL_FIELDS else values)[name] = _parse(name, env[var])
    mlp_mult = float(env["MLP_MULT"]) if env.get("MLP_MULT") else None
    for name, v in flags.items():
        if v is None:
            continue
        if name not in _MODEL_FIELDS and name not in _TRAIN_FIELDS:
            raise ValueError(f"unknown setting {name!r}")
        (model_values if name in _MODEL_FIELDS else values)[name] = v
    if mlp_mult is not None and "mlp_hidden" not in model_values:
        model_values["mlp_hidden"] = int(mlp_mult * model_values.get("model_dim", p.model.model_dim))
    train = TrainConfig(**values)
    _rope_follows_train_seq_len(p.model, train, model_values, env)
    return train, p.model.replace(**model_values)


def _rope_follows_train_seq_len(preset_model: GPTConfig, train: TrainConfig, model_values: dict[str, Any],
                                env: Mapping[str, str]) -> None:
    """The records scale RoPE by TRAIN_SEQ_LEN: their ROPE_TRAIN_SEQ_LEN is read but never used.

    So a preset with the NTK rescale on (rope_train_seq_len > 0) takes the run's train_seq_len unless
    ``--rope-train-seq-len`` says otherwise; a ROPE_TRAIN_SEQ_LEN other than TRAIN_SEQ_LEN, which a record would
    ignore, is an error rather than a silent no-op.
    """
    if "rope_train_seq_len" not in model_values and preset_model.rope_train_seq_len:
        model_values["rope_train_seq_len"] = train.train_seq_len
    ignored = env.get("ROPE_TRAIN_SEQ_LEN", "")
    if ignored and int(float(ignored)) != train.train_seq_len:
        raise ValueError(f"ROPE_TRAIN_SEQ_LEN={ignored} is read but never used by the record scripts (their RoPE "
                         f"scaling length is TRAIN_SEQ_LEN) and pgolf ignores it too; unset it, or use "
                         f"--rope-train-seq-len for pgolf's own scaling length")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` flag per TrainConfig and GPTConfig field (default None = not given)."""
    for f in list(fields(TrainConfig)) + list(fields(GPTConfig)):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f.name, default=None, type=lambda s, n=f.name: _parse(n, s),
                            help=f"({'model' if f.name in _MODEL_FIELDS else 'train'}) default from the preset")


def _parse(name: str, text: str) -> Any:
    f = _MODEL_FIELDS.get(name) or _TRAIN_FIELDS[name]
    t = str(f.type)
    try:
        if "bool" in t:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if "tuple" in t:
            parts = [p for p in text.replace(",", " ").split() if p]
            return tuple(int(p) if "int" in t else float(p) for p in parts)
        if t.startswith("int") or t == "<class 'int'>":
            return int(float(text)) if float(text).is_integer() else int(text)
        if t.startswith("float") or t == "<class 'float'>":
            return float(text)
        return text
    except ValueError:
        raise ValueError(f"cannot read {text!r} as the value of {name} ({t})") from None
