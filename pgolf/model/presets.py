"""Named configurations: the records' architectures and their training hyperparameters, and a CPU model.

A preset pairs a :class:`GPTConfig` with the training settings of its record (plain field names of
:class:`pgolf.train.config.TrainConfig`, kept here as a dict so the model package does not import training).

- ``baseline``: the naive baseline (R0, 2026-03-17), 17,059,912 parameters.
- ``pr1493``: the 2026-04-09 record (R3: 3-layer recurrence, GPT-J parallel residuals, QK-gain 5.25), 35,944,536.
- ``sota``: the 2026-04-27 record's architecture (R6) on sp8192 without CaseOps, 35,945,671.
- ``tiny``: the sota architecture scaled down for CPU runs on the synthetic corpus (vocab 512).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pgolf.model.config import GPTConfig


@dataclass(frozen=True)
class Preset:
    name: str
    model: GPTConfig
    train: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    expected_params: int | None = None


_RECORD_TRAIN = dict(  # R3-R6 common settings (reference-stack 3.1-3.5)
    train_seq_len=2048, train_batch_tokens=786_432, max_wallclock_seconds=600.0, tok_lr=0.03, tok_wd=0.085,
    scalar_lr=0.02, scalar_wd=0.02, betas=(0.9, 0.95), adam_eps=1e-8, grad_clip_norm=0.3, muon_row_normalize=True,
    muon_momentum_start=0.92, muon_momentum_warmup_steps=1500, muon_wd=0.095, ema_decay=0.9965,
    eval_seq_len=2048, eval_stride=64, warmup_steps=20,
)

# Quantization (reference-stack 4.4/4.5): bit width and SDClip k per group, calibration batches, LQER.
_R3_QUANT = dict(  # R2-R4: int6 k=12.85 matrices, int8 k=20 embedding, 64 calibration batches, no gate, no LQER
    quant_attn_bits=6, quant_attn_k=12.85, quant_mlp_bits=6, quant_mlp_k=12.85, quant_embed_bits=8,
    quant_embed_k=20.0, gptq_calibration_batches=64, lqer_rank=0)
_R6_QUANT = dict(  # R6: attn int6 k=13, MLP int6 k=11.5, embedding int7 k=14, int8 gates, 16 batches, LQER r4 top-3
    quant_attn_bits=6, quant_attn_k=13.0, quant_mlp_bits=6, quant_mlp_k=11.5, quant_embed_bits=7,
    quant_embed_k=14.0, quant_gate_int8=True, gptq_calibration_batches=16, lqer_rank=4, lqer_top=3)
_TINY_QUANT = dict(  # CPU: the R2-R4 widths; a lower passthrough threshold so the 128-dim matrices are quantized
    quant_attn_bits=6, quant_attn_k=12.85, quant_mlp_bits=6, quant_mlp_k=12.85, quant_embed_bits=8,
    quant_embed_k=20.0, quant_passthrough_max=4096, gptq_calibration_batches=4, lqer_rank=0)

PRESETS: dict[str, Preset] = {}


def _add(p: Preset) -> None:
    PRESETS[p.name] = p


_add(Preset(
    "baseline",
    GPTConfig(vocab_size=1024, num_layers=9, mlp_hidden=1024, mlp_negative_slope=0.0, rope_dims=0,
              qk_gain_init=1.5, xsa_last_n=0, ln_scale=False, skip_gates=False, num_loops=0,
              parallel_residual="none", smear_gate="none", attn_gate="none", init="baseline"),
    dict(train_seq_len=1024, train_batch_tokens=524_288, max_wallclock_seconds=600.0, matrix_lr=0.04,
         muon_momentum=0.95, muon_momentum_start=0.85, muon_momentum_warmup_steps=500, muon_wd=0.0,
         muon_row_normalize=False, ns_coefficients="classic", tok_lr=0.05, tok_wd=0.0, scalar_lr=0.04,
         scalar_wd=0.0, betas=(0.9, 0.95), adam_eps=1e-8, grad_clip_norm=0.0, warmdown_iters=1200,
         warmdown_frac=0.0, ema_decay=0.0, loader="sequential", eval_seq_len=1024, eval_stride=0, warmup_steps=20),
    "R0 naive baseline: 9L/512d ReLU² sp1024", 17_059_912))

_add(Preset(
    "pr1493",
    GPTConfig(vocab_size=8192, qk_gain_init=5.25, rope_train_seq_len=2048, parallel_residual="gptj",
              parallel_start=7, smear_gate="none", attn_gate="none"),
    dict(_RECORD_TRAIN, matrix_lr=0.022, muon_momentum=0.99, ns_coefficients="classic", warmdown_frac=0.72,
         min_lr=0.0, loader="shuffled", gptq_reserve_seconds=12.0, **_R3_QUANT),
    "R3 2026-04-09: loop L3-5 x3, GPT-J parallel residuals, QK-gain 5.25, sp8192", 35_944_536))

_add(Preset(
    "sota",
    GPTConfig(vocab_size=8192),
    dict(_RECORD_TRAIN, matrix_lr=0.026, muon_momentum=0.97, ns_coefficients="polar_express", warmdown_frac=0.85,
         min_lr=0.10, betas=(0.9, 0.99), loader="packed", gptq_reserve_seconds=8.0, **_R6_QUANT),
    "R6 2026-04-27 architecture on sp8192 (no CaseOps): two-lane parallel, SparseAttnGate, BOS-safe SmearGate",
    35_945_671))

_add(Preset(
    "tiny",
    GPTConfig(vocab_size=512, num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, mlp_hidden=512,
              xsa_last_n=4, num_loops=1, loop_start=1, loop_end=2, parallel_start=3, qk_gain_init=4.0,
              tied_embed_init_std=0.02),
    dict(train_seq_len=256, train_batch_tokens=4096, max_wallclock_seconds=120.0, matrix_lr=0.04,
         muon_momentum=0.95, muon_momentum_start=0.85, muon_momentum_warmup_steps=100, muon_wd=0.0,
         muon_row_normalize=True, ns_coefficients="polar_express", tok_lr=0.06, tok_wd=0.0, scalar_lr=0.04,
         scalar_wd=0.0, betas=(0.9, 0.95), adam_eps=1e-8, grad_clip_norm=1.0, warmdown_frac=0.5, min_lr=0.05,
         ema_decay=0.99, loader="packed", eval_seq_len=256, eval_stride=0, warmup_steps=0, grad_accum_base=1,
         gptq_reserve_seconds=5.0, **_TINY_QUANT),
    "CPU model: the sota architecture at 4 layers x 128 dims, vocab 512 (synthetic corpus)", None))


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a clear error lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
