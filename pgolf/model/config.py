"""The model's configuration: one dataclass covering every element of the record stack.

Defaults describe the current record architecture (2026-04-27, "sota"); presets in
:mod:`pgolf.model.presets` set the older records and the CPU ``tiny`` model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

PARALLEL_MODES = ("none", "gptj", "two_lane", "mlp_lane")
SMEAR_MODES = ("none", "bos", "vector")
ATTN_GATES = ("none", "sparse", "attn_out", "gated", "gated_bias")
INITS = ("record", "baseline")
# v of layers > 0 mixed with layer 0's v: 'linear' λ0·v0 + λ1·v (PR #490), 'softmax' s0·v + s1·v0, s = softmax(λ) (#1499)
VALUE_RESIDUALS = ("none", "linear", "softmax")
# 'projection': y − ⟨y, v̂⟩v̂ (the kernels' XSA); 'diagonal': y − a_ii·v_i, the token's own weighted value (#1499)
XSA_MODES = ("projection", "diagonal")
# where token shifts (SmearGate, BigramHash) restart: 'document' at BOS and sequence starts (pgolf); 'row' only at
# sequence starts, where the vector SmearGate mixes in zeros, as the 2026-03/04 records (#490 ... #1550) do
TOKEN_SHIFTS = ("document", "row")
SKIP_LAYOUTS = ("virtual", "physical")  # U-Net skips sized from the looped layout, or from the physical layers (#1550)
AUX_PROJ_INITS = ("zeros", "orthogonal", "orthogonal_scaled")  # BigramHash / value-embedding projections
# How the RoPE cos/sin tables are computed (see pgolf.model.gpt.rope_tables): 'exact' (fp32, pgolf's default),
# or reproducing a record: 'bf16_freq' (2026-04-27 lineage), 'r3_compiled' / 'r3_eager' (2026-04-09).
ROPE_TABLES = ("exact", "bf16_freq", "r3_compiled", "r3_eager")


@dataclass(frozen=True)
class GPTConfig:
    """Architecture of :class:`pgolf.model.gpt.GPT` (reference-stack section 2)."""

    vocab_size: int = 8192
    num_layers: int = 11            # physical layers
    model_dim: int = 512
    num_heads: int = 8              # query heads
    num_kv_heads: int = 4           # GQA key/value heads
    mlp_hidden: int = 2048
    mlp_negative_slope: float = 0.5  # LeakyReLU slope before the square; 0 gives ReLU²
    logit_softcap: float = 30.0
    rope_dims: int = 16             # rotated dims per head (NeoX halves); 0 = the whole head
    rope_base: float = 10000.0
    rope_train_seq_len: int = 0     # NTK base rescale when the sequence is longer than this; 0 = off
    rope_tables: str = "exact"      # one of ROPE_TABLES: exact fp32 tables, or a record's own numerics
    qk_gain_init: float = 5.0
    xsa_last_n: int = 11            # XSA on the last n physical layers (every virtual pass of them)
    ln_scale: bool = True           # 1/sqrt(l+1) on each block's normalized inputs (physical l)
    skip_gates: bool = True         # sigmoid-gated U-Net skips (else additive)
    num_loops: int = 2              # depth recurrence: segment [loop_start, loop_end] runs num_loops+1 times
    loop_start: int = 3
    loop_end: int = 5
    loop_activate_frac: float = 0.35  # training fraction at which the loop switches on
    loop_activate_step: int = -1    # or this step (>= 0: the step decides, not the fraction)
    recur_layers: tuple[int, ...] = ()  # appended recurrence: these layers run again after the last one (looping)
    skip_layout: str = "virtual"    # one of SKIP_LAYOUTS
    parallel_residual: str = "two_lane"
    parallel_start: int = 8         # first physical layer with parallel residuals
    lane_resid_init: float = 1.1
    smear_gate: str = "bos"         # 'bos': R6 gate on raw embeddings; 'vector': R1's per-channel form
    smear_width: int = 12
    smear_init: float = 0.0         # initial logit of the vector SmearGate (#1499: -1.5)
    token_shift: str = "document"   # one of TOKEN_SHIFTS
    attn_gate: str = "sparse"
    attn_gate_width: int = 12
    attn_gate_kappa: float = 0.5
    value_residual: str = "none"    # one of VALUE_RESIDUALS
    xsa_mode: str = "projection"    # one of XSA_MODES
    mlp_hidden_gain: bool = False   # a learned gain per MLP hidden unit after the activation (#1499)
    bigram_buckets: int = 0         # BigramHash table rows (0 = off)
    bigram_dim: int = 128
    bigram_init_std: float = 0.0    # BigramHash table init (0 = zeros; #1499: 0.02)
    aux_proj_init: str = "zeros"    # one of AUX_PROJ_INITS (orthogonal only where both dims >= 64, as the records)
    value_embed_dim: int = 0        # value-embedding width (0 = off)
    value_embed_layers: tuple[int, ...] = ()
    tied_embed_init_std: float = 0.005
    init: str = "record"            # 'record': orthogonal/zeros (2.11); 'baseline': torch default Linear init
    bos_id: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.model_dim % self.num_heads:
            problems.append(f"model_dim {self.model_dim} is not divisible by num_heads {self.num_heads}")
        elif self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        elif self.rope_dims % 2 or self.rope_dims > self.head_dim:
            problems.append(f"rope_dims {self.rope_dims} must be even and at most head_dim {self.head_dim}")
        if self.num_loops and not (0 <= self.loop_start <= self.loop_end < self.num_layers):
            problems.append(f"loop segment [{self.loop_start}, {self.loop_end}] is outside 0..{self.num_layers - 1}")
        if any(not 0 <= i < self.num_layers for i in self.recur_layers):
            problems.append(f"recur_layers {list(self.recur_layers)} must be layers in 0..{self.num_layers - 1}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.logit_softcap <= 0:
            problems.append(f"logit_softcap must be positive, got {self.logit_softcap}")
        if self.vocab_size > 65536:
            problems.append(f"vocab_size {self.vocab_size} does not fit the uint16 shard format")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def has_recurrence(self) -> bool:
        """Whether any layer runs more than once when looping is on (in-place loop or appended recurrence)."""
        return self.num_loops > 0 or bool(self.recur_layers)

    def layer_plan(self, looping: bool) -> tuple[list[int], list[int]]:
        """(encoder, decoder) physical layer indices of the virtual layer sequence, looped or not.

        Looping repeats [loop_start, loop_end] in place (the U-Net halves split the longer sequence) and appends
        ``recur_layers`` after the decoder, past the last skip."""
        enc, dec = self._unet_plan(looping)
        return enc, dec + (list(self.recur_layers) if looping else [])

    def _unet_plan(self, looping: bool) -> tuple[list[int], list[int]]:
        if looping and self.num_loops > 0:
            seq = list(range(self.loop_start))
            seq += list(range(self.loop_start, self.loop_end + 1)) * (self.num_loops + 1)
            seq += list(range(self.loop_end + 1, self.num_layers))
        else:
            seq = list(range(self.num_layers))
        n_enc = len(seq) // 2
        return seq[:n_enc], seq[n_enc:]

    @property
    def num_skips(self) -> int:
        """U-Net skip parameters: sized for the looped layout when looping exists ('virtual'), or from the physical
        layers ('physical', PR #1550: the last decoder passes of a looped run then get no skip)."""
        enc, dec = self._unet_plan(looping=self.num_loops > 0 and self.skip_layout == "virtual")
        return min(len(enc), len(dec))

    def replace(self, **changes: Any) -> "GPTConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["value_embed_layers"] = list(self.value_embed_layers)
        d["recur_layers"] = list(self.recur_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        for name in ("value_embed_layers", "recur_layers"):
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)


CHOICES = {"parallel_residual": PARALLEL_MODES, "smear_gate": SMEAR_MODES, "attn_gate": ATTN_GATES, "init": INITS,
           "rope_tables": ROPE_TABLES, "value_residual": VALUE_RESIDUALS, "xsa_mode": XSA_MODES,
           "token_shift": TOKEN_SHIFTS, "skip_layout": SKIP_LAYOUTS, "aux_proj_init": AUX_PROJ_INITS}
"""Each string field of :class:`GPTConfig` with a fixed set of values, and that set."""
