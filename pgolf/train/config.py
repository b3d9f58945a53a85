"""Training configuration: a dataclass, the record scripts' environment variable names, CLI flags and the checks.

Precedence: dataclass defaults < preset < environment variables (the record scripts' names, e.g.
``TRAIN_BATCH_TOKENS``, ``QK_GAIN_INIT``) < command-line flags (``--train-batch-tokens``, ``--qk-gain-init``).
Model fields (:class:`pgolf.model.GPTConfig`) and training fields share one flat namespace.

Every setting is checked here, before any work: :func:`resolve` names the flag or variable a value could not be
read from, and :func:`validate` checks every field's range or allowed values (:data:`LOWER_BOUNDS`,
:data:`UNIT_RANGES`, :data:`CHOICES`, ...) and the settings that must agree with each other (the batch split, the
eval stride, the calibration tokens, the device), raising :class:`pgolf.errors.ConfigError` with the flag and the
variable by name. Nothing unknown or malformed falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from pgolf.errors import ConfigError
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
    force: bool = False             # replace an existing run dir's outputs (else it is refused)
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
    muon_row_orientation: str = "stored"  # MuonEq-R rows of the stored matrix, or of its wide orientation (#1550)
    muon_aux_matrices: bool = False     # head-gate matrices and the BigramHash projection in Muon (#490, #1499)
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
    swa_every: int = 0                  # SWA: a snapshot every N steps while the LR multiplier is below swa_threshold
    swa_threshold: float = 0.5          # (0 = off); at the end their uniform mean replaces the weights (EMA unused)
    swa_source: str = "weights"         # what is averaged: the live weights, or the EMA weights at each snapshot
    late_qat_threshold: float = 0.0     # late QAT: fake-quantize from the step the LR multiplier drops below this
    late_qat_scope: str = "matrices"    # matrices: every Linear the artifact quantizes; aux: bigram/VE projections
    late_qat_scale_floor: bool = False  # the fake-quant scale is at least 1/Q (the 2026-03 records' CastedLinear)
    late_qat_in_eval: bool = False      # keep it on outside training mode too (#1499's code; calibration and evals)
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
    gptq_act_order: str = "descending"  # column order: by descending / ascending diag(H) (#1499), or none (#490)
    gptq_inverse: str = "cholesky"      # error feedback through chol_upper(H⁻¹), or H⁻¹ itself (#490, #1499)
    gptq_calibration: str = "train"     # Hessian inputs: training batches, or sequences the model generates (#1550)
    gptq_generate_temperature: float = 0.8  # sampling temperature of generated calibration sequences
    quant_matrix_scales: str = "sdclip"  # scale rule of attention/MLP (and other Hessian) matrices: SCALE_RULES
    quant_embed_scales: str = "sdclip"  # scale rule of the tied embedding
    quant_embed_gptq: bool = True       # GPTQ the embedding on the head's Hessian (else round to nearest)
    quant_table_bits: int = 0           # BigramHash / value-embedding tables: bit width (0 = the embedding's)
    quant_table_scales: str = "embed"   # and scale rule ('embed' = the embedding's)
    quant_fp16_keep: str = ""           # comma-separated name substrings kept fp16 (#1499: tok_emb,blocks.9.attn.c_k)
    quant_prune_frac: float = 0.0       # magnitude pruning before GPTQ: zero this fraction of each large 2-D tensor
    quant_target_bytes: int = 0         # selective ±1 pruning until artifact + code fit this many bytes (0 = off)
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
    # the founding systems' own names where they mean the same thing
    "SWA_EVERY": "swa_every", "LATE_QAT_THRESHOLD": "late_qat_threshold", "RECUR_START_STEP": "loop_activate_step",
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


# ---- the checks: one rule table per kind of constraint (flags and variables are named from the field) ----------

LOWER_BOUNDS = {  # inclusive
    "seed": 0, "iterations": 0, "train_seq_len": 1, "train_batch_tokens": 1, "grad_accum_base": 1,
    "max_wallclock_seconds": 0, "gptq_reserve_seconds": 0, "warmdown_iters": 0, "matrix_lr": 0,
    "muon_momentum_warmup_steps": 0, "muon_wd": 0, "ns_steps": 1, "tok_lr": 0, "tok_wd": 0, "scalar_lr": 0,
    "scalar_wd": 0, "grad_clip_norm": 0, "warmup_steps": 0, "eval_seq_len": 1, "eval_stride": 0,
    "eval_batch_seqs": 1, "val_loss_every": 0, "val_max_tokens": 0, "train_log_every": 0,
    "quant_passthrough_max": 0, "gptq_calibration_batches": 1, "gptq_calibration_tokens": 0, "gptq_block_size": 1,
    "lqer_rank": 0, "lqer_top": 0, "code_bytes": 0, "swa_every": 0, "quant_target_bytes": 0, "loop_activate_step": -1,
    "vocab_size": 2, "num_layers": 1, "model_dim": 1, "num_heads": 1, "num_kv_heads": 1, "mlp_hidden": 1,
    "rope_dims": 0, "rope_train_seq_len": 0, "xsa_last_n": 0, "num_loops": 0, "loop_start": 0, "loop_end": 0,
    "parallel_start": 0, "smear_width": 1, "attn_gate_width": 1, "bigram_buckets": 0, "bigram_dim": 1,
    "value_embed_dim": 0, "bos_id": 0, "tied_embed_init_std": 0, "bigram_init_std": 0,
}
POSITIVE = ("adam_eps", "gptq_damp", "rope_base", "logit_softcap", "quant_attn_k", "quant_mlp_k", "quant_embed_k",
            "gptq_generate_temperature")
UNIT_RANGES = {  # (low, high, high included)
    "warmdown_frac": (0.0, 1.0, True), "min_lr": (0.0, 1.0, True), "loop_activate_frac": (0.0, 1.0, True),
    "muon_momentum": (0.0, 1.0, False), "muon_momentum_start": (0.0, 1.0, False), "ema_decay": (0.0, 1.0, False),
    "swa_threshold": (0.0, 1.0, True), "late_qat_threshold": (0.0, 1.0, True), "quant_prune_frac": (0.0, 1.0, False),
}
BIT_WIDTHS = {"quant_attn_bits": (2, 8), "quant_mlp_bits": (2, 8), "quant_embed_bits": (2, 8)}
SCALE_RULES = ("sdclip", "sdclip_floor", "absmax", "absmax_floor", "percentile", "percentile_search")
CHOICES = {
    "loader": ("sequential", "shuffled", "packed"), "compile": ("auto", "on", "off"), "device": ("auto", "cpu", "cuda"),
    "quant_method": ("gptq", "rtn", "none"), "artifact_layout": ("int8", "packed6"), "budget_check": ("error", "warn"),
    "ns_coefficients": ("classic", "polar_express"), "muon_row_orientation": ("stored", "wide"),
    "swa_source": ("weights", "ema"), "late_qat_scope": ("matrices", "aux"),
    "gptq_act_order": ("descending", "ascending", "none"), "gptq_inverse": ("cholesky", "plain"),
    "gptq_calibration": ("train", "generated"), "quant_matrix_scales": SCALE_RULES, "quant_embed_scales": SCALE_RULES,
    "quant_table_scales": ("embed",) + SCALE_RULES,
}


def resolve(preset: str, env: Mapping[str, str] | None = None,
            flags: Mapping[str, Any] | None = None) -> tuple[TrainConfig, GPTConfig]:
    """(TrainConfig, GPTConfig) from a preset name, environment variables and parsed flag values.

    Raises ConfigError naming the flag or the variable of a value that cannot be read or breaks a rule.
    """
    env = os.environ if env is None else env
    flags = dict(flags or {})
    p = _preset(flags.pop("preset", None) or env.get("PRESET") or preset)
    values: dict[str, Any] = {**p.train, "preset": p.name}
    model_values: dict[str, Any] = {}
    for var, name in ENV_NAMES.items():
        if env.get(var, "") != "":
            (model_values if name in _MODEL_FIELDS else values)[name] = _parse(name, env[var], source=var)
    for name, v in flags.items():
        if v is None:
            continue
        if name not in _MODEL_FIELDS and name not in _TRAIN_FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        (model_values if name in _MODEL_FIELDS else values)[name] = v
    mlp_mult = _mlp_mult(env)
    if mlp_mult is not None and "mlp_hidden" not in model_values:
        model_values["mlp_hidden"] = int(mlp_mult * model_values.get("model_dim", p.model.model_dim))
    check_values({**values, **model_values})
    train = TrainConfig(**values)
    _rope_follows_train_seq_len(p.model, train, model_values, env, p.rope_follows_train_seq_len)
    return train, _model_config(p.model, model_values)


def validate(cfg: TrainConfig, model_cfg: GPTConfig, world_size: int | None = None) -> None:
    """Check every setting (each field's rule, then the ones that must agree); ConfigError names the flag.

    ``world_size``: check that the batch splits into that many ranks (None: not checked). Needs no data.
    """
    check_values({**cfg.to_dict(), **model_cfg.to_dict()})
    if cfg.eval_stride > cfg.eval_seq_len:
        raise ConfigError(f"{setting_name('eval_stride')} {cfg.eval_stride} is longer than the window "
                          f"{setting_name('eval_seq_len')} {cfg.eval_seq_len}; use a stride of at most the window "
                          f"(or 0 for no sliding eval)")
    if 0 < cfg.val_max_tokens < cfg.eval_seq_len:
        raise ConfigError(f"{setting_name('val_max_tokens')} {cfg.val_max_tokens} is less than one evaluation "
                          f"window ({setting_name('eval_seq_len')} {cfg.eval_seq_len}); use 0 (all) or at least "
                          f"{cfg.eval_seq_len}")
    if cfg.max_wallclock_seconds and cfg.gptq_reserve_seconds >= cfg.max_wallclock_seconds:
        raise ConfigError(f"{setting_name('gptq_reserve_seconds')} {cfg.gptq_reserve_seconds:g} leaves no training "
                          f"time under {setting_name('max_wallclock_seconds')} {cfg.max_wallclock_seconds:g}")
    if cfg.quant_method == "gptq" and 0 < cfg.gptq_calibration_tokens < cfg.train_seq_len:
        raise ConfigError(f"{setting_name('gptq_calibration_tokens')} {cfg.gptq_calibration_tokens} is shorter "
                          f"than one sequence ({setting_name('train_seq_len')} {cfg.train_seq_len}); use 0 "
                          f"(train_batch_tokens / world size) or at least {cfg.train_seq_len}")
    if cfg.lqer_rank and not cfg.lqer_top:
        raise ConfigError(f"{setting_name('lqer_rank')} {cfg.lqer_rank} corrects no tensor with "
                          f"{setting_name('lqer_top')} 0; set lqer_top >= 1, or lqer_rank 0 for no LQER")
    _check_training_elements(cfg)
    if any(not 0 <= i < model_cfg.num_layers for i in model_cfg.value_embed_layers):
        raise ConfigError(f"{setting_name('value_embed_layers')} {list(model_cfg.value_embed_layers)} must be "
                          f"layers in 0..{model_cfg.num_layers - 1}")
    if world_size is not None:
        _check_batch_split(cfg, world_size)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{setting_name('device')} cuda was asked for but torch sees no CUDA device "
                              f"(torch {torch.__version__}); use --device cpu or auto")


def _check_training_elements(cfg: TrainConfig) -> None:
    """The SWA, late-QAT and quantization settings that need another one to mean anything."""
    if cfg.swa_source == "ema" and cfg.swa_every and not cfg.ema_decay:
        raise ConfigError(f"{setting_name('swa_source')} ema averages EMA weights, but {setting_name('ema_decay')} "
                          f"is 0 (no EMA); use swa_source weights or an EMA decay")
    if cfg.swa_every and not cfg.swa_threshold:
        raise ConfigError(f"{setting_name('swa_every')} {cfg.swa_every} never takes a snapshot with "
                          f"{setting_name('swa_threshold')} 0 (the LR multiplier is never below 0)")
    if cfg.late_qat_in_eval and not cfg.late_qat_threshold:
        raise ConfigError(f"{setting_name('late_qat_in_eval')} keeps late QAT on in eval, but late QAT is off "
                          f"({setting_name('late_qat_threshold')} 0)")
    if cfg.quant_method == "none" and (cfg.quant_target_bytes or cfg.quant_prune_frac):
        raise ConfigError(f"{setting_name('quant_target_bytes')} / {setting_name('quant_prune_frac')} prune the "
                          f"artifact, but {setting_name('quant_method')} is none (no artifact)")
    if cfg.quant_table_bits and not 2 <= cfg.quant_table_bits <= 8:
        raise ConfigError(f"{setting_name('quant_table_bits')} must be 0 (the embedding's) or a bit width in 2..8, "
                          f"got {cfg.quant_table_bits}")
    if cfg.quant_method == "rtn" and cfg.gptq_calibration == "generated":
        raise ConfigError(f"{setting_name('gptq_calibration')} generated feeds GPTQ, but "
                          f"{setting_name('quant_method')} is rtn (no calibration)")


def check_values(values: Mapping[str, Any]) -> None:
    """Each value's type and its rule (bounds, range, bit width, allowed values); ConfigError names the flag."""
    for name, v in values.items():
        f = _MODEL_FIELDS.get(name) or _TRAIN_FIELDS.get(name)
        if f is None:
            raise ConfigError(f"unknown setting {name!r}")
        _check_type(name, str(f.type), v)
        _check_rule(name, v)
    from pgolf.model.config import CHOICES as MODEL_CHOICES

    for name, allowed in MODEL_CHOICES.items():
        if name in values and values[name] not in allowed:
            raise ConfigError(_one_of(name, values[name], allowed))


def check_paths(cfg: TrainConfig, need: tuple[str, ...] = ("data_path", "tokenizer_path", "run_dir")) -> None:
    """The input paths exist (data folder, tokenizer file) and the run folder can be written; named errors."""
    from pgolf.errors import InputError, MissingInputError
    from pgolf.utils import check_writable

    if "data_path" in need:
        if not cfg.data_path:
            raise ConfigError("no training data: pass --data-path DIR (or DATA_PATH=DIR) with fineweb_train_*.bin "
                              "and fineweb_val_*.bin shards; `python -m pgolf.data.synthetic` builds a small corpus")
        if not os.path.isdir(cfg.data_path):
            what = "is a file, not a folder" if os.path.exists(cfg.data_path) else "does not exist"
            raise MissingInputError(f"{setting_name('data_path')} {cfg.data_path} {what}; pass the folder with "
                                    f"the fineweb_train_*.bin / fineweb_val_*.bin shards")
    if "tokenizer_path" in need:
        if not cfg.tokenizer_path:
            raise ConfigError("no tokenizer: pass --tokenizer-path MODEL (or TOKENIZER_PATH); val_bpb needs its "
                              "byte tables")
        if os.path.isdir(cfg.tokenizer_path):
            raise InputError(f"{setting_name('tokenizer_path')} {cfg.tokenizer_path} is a folder; pass the "
                             f"SentencePiece .model file")
    if "run_dir" in need and cfg.run_dir:
        check_writable(cfg.run_dir, "--run-dir")


def setting_name(name: str) -> str:
    """How a user sets field ``name``: ``--eval-stride (EVAL_STRIDE)``, or just the flag."""
    var = _ENV_OF.get(name)
    return "--" + name.replace("_", "-") + (f" ({var})" if var else "")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` flag per TrainConfig and GPTConfig field (default None = not given; a boolean flag alone
    means true)."""
    for f in list(fields(TrainConfig)) + list(fields(GPTConfig)):
        flag = "--" + f.name.replace("_", "-")
        switch = dict(nargs="?", const="1") if str(f.type) == "bool" else {}  # --force alone means --force 1
        parser.add_argument(flag, dest=f.name, default=None, type=_flag_type(f.name), **switch,
                            help=f"({'model' if f.name in _MODEL_FIELDS else 'train'}) default from the preset")


def _flag_type(name: str):
    def parse(text: str) -> Any:
        try:
            return _read(name, text)
        except ValueError as e:  # argparse names the flag itself
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name  # argparse's fallback message names the type by this
    return parse


def _parse(name: str, text: str, source: str | None = None) -> Any:
    """The typed value of field ``name`` from ``text``; ConfigError names ``source`` (a flag or a variable)."""
    try:
        return _read(name, text)
    except ValueError as e:
        raise ConfigError(f"{source or setting_name(name)}: {e}") from None


def _read(name: str, text: str) -> Any:
    """The typed value of field ``name`` from ``text``; ValueError saying what was expected."""
    f = _MODEL_FIELDS.get(name) or _TRAIN_FIELDS[name]
    t = str(f.type)
    try:
        if t == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if t.startswith("tuple"):
            parts = [p for p in text.replace(",", " ").split() if p]
            return tuple(int(p) if "int" in t else float(p) for p in parts)
        if t == "int":
            return int(float(text)) if float(text).is_integer() else int(text)
        if t == "float":
            return float(text)
        return text
    except ValueError:
        kind = {"bool": "a boolean (1/0, true/false, on/off)", "int": "an integer", "float": "a number"}.get(
            t, "numbers separated by commas" if t.startswith("tuple") else t)
        raise ValueError(f"cannot read {text!r} as {kind}") from None


def _check_type(name: str, t: str, v: Any) -> None:
    ok = {"bool": isinstance(v, bool), "str": isinstance(v, str),
          "int": isinstance(v, int) and not isinstance(v, bool),
          "float": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}.get(t)
    if t.startswith("tuple"):
        item = int if "int" in t else (int, float)
        ok = isinstance(v, (tuple, list)) and all(isinstance(x, item) and not isinstance(x, bool) for x in v)
        if ok and t == "tuple[float, float]" and len(v) != 2:
            raise ConfigError(f"{setting_name(name)} takes two numbers (e.g. 0.9,0.95), got {len(v)}: "
                              f"{','.join(map(str, v))}")
    if not ok:
        raise ConfigError(f"{setting_name(name)}: {v!r} is not a valid {t}" + (" (finite)" if t == "float" else ""))


def _check_rule(name: str, v: Any) -> None:
    if name in LOWER_BOUNDS and v < LOWER_BOUNDS[name]:
        raise ConfigError(f"{setting_name(name)} must be >= {LOWER_BOUNDS[name]}, got {v}")
    if name in POSITIVE and not v > 0:
        raise ConfigError(f"{setting_name(name)} must be positive, got {v}")
    if name in UNIT_RANGES:
        lo, hi, closed = UNIT_RANGES[name]
        if not (lo <= v <= hi if closed else lo <= v < hi):
            raise ConfigError(f"{setting_name(name)} must be in [{lo:g}, {hi:g}{']' if closed else ')'}, got {v}")
    if name in BIT_WIDTHS and not BIT_WIDTHS[name][0] <= v <= BIT_WIDTHS[name][1]:
        raise ConfigError(f"{setting_name(name)} must be a bit width in {BIT_WIDTHS[name][0]}..{BIT_WIDTHS[name][1]}, "
                          f"got {v}")
    if name in CHOICES and v not in CHOICES[name]:
        raise ConfigError(_one_of(name, v, CHOICES[name]))
    if name == "betas" and not all(0 <= b < 1 for b in v):
        raise ConfigError(f"{setting_name(name)} must be two numbers in [0, 1), got {list(v)}")
    if name in ("run_id", "artifact_name") and (os.sep in v or v in (".", "..")):
        raise ConfigError(f"{setting_name(name)} must be a plain name without '{os.sep}', got {v!r}")
    if name == "artifact_name" and not v:
        raise ConfigError(f"{setting_name(name)} must not be empty")


def _one_of(name: str, v: Any, allowed) -> str:
    return f"{setting_name(name)} must be one of {', '.join(map(str, allowed))}; got {v!r}"


def _check_batch_split(cfg: TrainConfig, world_size: int) -> None:
    grad_accum = cfg.grad_accum(world_size)
    local = cfg.train_batch_tokens // (world_size * grad_accum)
    uneven = cfg.train_batch_tokens % (world_size * grad_accum) or (
        cfg.loader != "packed" and local % cfg.train_seq_len)  # only packed batches may hold a partial row
    if local < cfg.train_seq_len or uneven:
        raise ConfigError(f"{setting_name('train_batch_tokens')} {cfg.train_batch_tokens} must split evenly into "
                          f"{world_size} ranks x {grad_accum} micro-batches of at least "
                          f"{setting_name('train_seq_len')} {cfg.train_seq_len} tokens"
                          + ("" if cfg.loader == "packed" else " (whole sequences for this loader)"))


def _preset(name: str):
    try:
        return get_preset(name)
    except ValueError as e:
        raise ConfigError(f"--preset (PRESET): {e}") from None


def _mlp_mult(env: Mapping[str, str]) -> float | None:
    text = env.get("MLP_MULT", "")
    if not text:
        return None
    try:
        mult = float(text)
    except ValueError:
        raise ConfigError(f"MLP_MULT: cannot read {text!r} as a number (the MLP hidden size is MLP_MULT x "
                          f"MODEL_DIM)") from None
    if not (math.isfinite(mult) and mult > 0):
        raise ConfigError(f"MLP_MULT must be a positive number, got {text!r}")
    return mult


def _model_config(base: GPTConfig, model_values: dict[str, Any]) -> GPTConfig:
    try:
        return base.replace(**model_values)
    except ValueError as e:
        named = ", ".join(setting_name(n) for n in sorted(model_values)) or "the preset"
        raise ConfigError(f"{e} (model settings given: {named})") from None


def _rope_follows_train_seq_len(preset_model: GPTConfig, train: TrainConfig, model_values: dict[str, Any],
                                env: Mapping[str, str], follows: bool = True) -> None:
    """The records scale RoPE by TRAIN_SEQ_LEN: their ROPE_TRAIN_SEQ_LEN is read but never used.

    So a preset with the NTK rescale on (rope_train_seq_len > 0) takes the run's train_seq_len unless
    ``--rope-train-seq-len`` says otherwise; a ROPE_TRAIN_SEQ_LEN other than TRAIN_SEQ_LEN, which a record would
    ignore, is an error rather than a silent no-op. The founding presets (``follows`` False) keep their scripts'
    hard-coded length (1024).
    """
    if "rope_train_seq_len" not in model_values and preset_model.rope_train_seq_len and follows:
        model_values["rope_train_seq_len"] = train.train_seq_len
    ignored = env.get("ROPE_TRAIN_SEQ_LEN", "")
    if ignored and _parse("rope_train_seq_len", ignored, source="ROPE_TRAIN_SEQ_LEN") != train.train_seq_len:
        raise ConfigError(f"ROPE_TRAIN_SEQ_LEN={ignored} is read but never used by the record scripts (their RoPE "
                          f"scaling length is TRAIN_SEQ_LEN) and pgolf ignores it too; unset it, or use "
                          f"--rope-train-seq-len for pgolf's own scaling length")


_ENV_OF = {name: var for var, name in ENV_NAMES.items()}
