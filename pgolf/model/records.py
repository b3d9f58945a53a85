"""The record runs whose checkpoints pgolf loads, and what each run set that a checkpoint cannot show.

A record script's ``final_model.pt`` holds weights only. The loop layout, the gate scale, the RoPE settings
and a few switches live in the script's defaults and the run's environment variables, so each record here
carries the model-relevant part of its run command (from its README and the ``Hyperparameters`` block of its
logs). :mod:`pgolf.model.convert` reads these, then the caller's environment, then explicit overrides.

Four families: ``per_layer`` (the 2026-04-09 record, PR #1493: one ``CastedLinear`` per matrix), ``banked`` (the
2026-04-27 lineage: ``qo_bank``, ``kv_bank``, ``mlp_up_bank``, ``mlp_down_bank``), and the founding systems' two:
``early_per_layer`` (PRs #490 and #1499) and ``early_banked`` (#1148, #1406, #1550), told apart from the later
ones by their ``smear.gate`` SmearGate. Each founding record names its pgolf preset (``preset``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

PER_LAYER, BANKED = "per_layer", "banked"
EARLY_PER_LAYER, EARLY_BANKED = "early_per_layer", "early_banked"


@dataclass(frozen=True)
class Record:
    """One record run: where it lives, its family, and the model-relevant environment of its run."""

    name: str                       # the PR, e.g. 'pr1855'
    folder: str                     # under records/track_10min_16mb/ (main branch, or the PR head)
    family: str                     # PER_LAYER or BANKED
    val_bpb: float                  # the submission's claimed score
    params: int                     # model_params of its logs
    run_env: Mapping[str, str] = field(default_factory=dict)
    caseops: bool = False           # CaseOps tokenizer: ids 0-7 reserved, val bytes from fineweb_val_bytes_*.bin
    aliases: tuple[str, ...] = ()
    preset: str | None = None       # the pgolf preset of the same model (the founding systems)


_LINEAGE = dict(SMEAR_GATE_ENABLED="1", SPARSE_ATTN_GATE_ENABLED="1", CASEOPS_ENABLED="1")

RECORDS: dict[str, Record] = {r.name: r for r in (
    Record("pr1493", "2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT", PER_LAYER, 1.0810, 35_944_536,
           dict(QK_GAIN_INIT="5.25"), aliases=("r3", "2026-04-09")),
    Record("pr1851", "2026-04-27_SmearGateBOSFix_PR1787Base_LQERAsym_PhasedTTT", BANKED, 1.06128, 35_945_671,
           dict(_LINEAGE, SPARSE_ATTN_GATE_SCALE="1.0"), caseops=True),
    Record("pr1855", "2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611", BANKED, 1.06108, 35_945_671,
           dict(_LINEAGE, SPARSE_ATTN_GATE_SCALE="0.5"), caseops=True, aliases=("r6", "2026-04-27")),
    Record("pr1868", "2026-04-29_SmearGateBOSFix_3Seed_1.06141", BANKED, 1.06145, 35_945_671,
           dict(_LINEAGE, SPARSE_ATTN_GATE_SCALE="1.0"), caseops=True, aliases=("2026-04-29",)),
    Record("pr1945", "2026-04-30_V19_PR1908_AsymLogit_WD2", BANKED, 1.05877, 35_945_673,
           dict(_LINEAGE, SPARSE_ATTN_GATE_SCALE="0.5", ASYM_LOGIT_RESCALE="1", QK_GAIN_INIT="5.25",
                EVAL_SEQ_LEN="2816"), caseops=True),
    Record("pr1953", "2026-04-30_LongCtx_NoQV_QK525_on_1945_1.0586", BANKED, 1.05855, 35_945_673,
           dict(_LINEAGE, SPARSE_ATTN_GATE_SCALE="0.5", ASYM_LOGIT_RESCALE="1", QK_GAIN_INIT="5.25",
                EVAL_SEQ_LEN="2560"), caseops=True),
    Record("pr2014", "2026-04-30_SP8192_CaseOps_Progressive3k_ShortDocTTT", BANKED, 1.05759, 35_945_673,
           dict(_LINEAGE, SPARSE_ATTN_GATE_SCALE="0.5", ASYM_LOGIT_RESCALE="1", QK_GAIN_INIT="5.25",
                TRAIN_SEQ_LEN="3072", ROPE_TRAIN_SEQ_LEN="3072", EVAL_SEQ_LEN="3072"), caseops=True),
    Record("pr2135", "2026-05-01_SP8192_PR2130Base_Calib32", BANKED, 1.05651, 35_945_673,
           dict(_LINEAGE, SPARSE_ATTN_GATE_SCALE="0.5", ASYM_LOGIT_RESCALE="1", SMEAR_GATE_BOS_FIX="0",
                EVAL_SEQ_LEN="2560"), caseops=True),
    # the founding systems (PR heads); their claimed scores and what produced them: pgolf.model.presets' notes
    Record("pr490", "2026-03-23_11L_VR_GA_AdamWTTT_1.0891", EARLY_PER_LAYER, 1.0891, 27_137_221, {},
           aliases=("2026-03-23",), preset="pr490"),
    Record("pr1148", "2026-03-28_MuonTTT_EntropyAdaptive_11L_8xH100", EARLY_BANKED, 1.1179, 26_928_220,
           dict(BIGRAM_VOCAB_SIZE="1536", XSA_LAST_N="4", ROPE_DIMS="16", LN_SCALE="1", VE_LAYERS="9,10"),
           aliases=("2026-03-28",), preset="pr1148"),
    Record("pr1406", "2026-04-06_DepthRecurrence_PreQuantTTT_11L_8xH100", EARLY_BANKED, 1.0887, 26_928_220,
           dict(BIGRAM_VOCAB_SIZE="1536", XSA_LAST_N="4", ROPE_DIMS="16", LN_SCALE="1", VE_LAYERS="9,10",
                RECUR_LAYERS="4,5", QK_GAIN_INIT="5.0"), aliases=("2026-04-06",), preset="pr1406"),
    Record("pr1499", "2026-04-09_SP8192_DepthRecur_ParResid", EARLY_PER_LAYER, 1.4794, 37_338_221, {},
           preset="pr1499"),
    Record("pr1550", "2026-04-11_SP8192_PreQuantTTT_CompiledTTT", EARLY_BANKED, 1.05869, 36_311_132,
           dict(VOCAB_SIZE="8192", BIGRAM_VOCAB_SIZE="0", VE_DIM="44"), aliases=("2026-04-11",), preset="pr1550"),
)}


class UnknownRecordError(ValueError):
    """A record name that is not in :data:`RECORDS`."""


def get_record(name: str) -> Record:
    """The record called ``name`` (its PR, an alias, or its folder name); the error lists the known ones."""
    key = name.strip().lower()
    for r in RECORDS.values():
        if key in (r.name, r.folder.lower(), *r.aliases):
            return r
    known = ", ".join(f"{r.name} ({r.folder})" for r in RECORDS.values())
    raise UnknownRecordError(f"unknown record {name!r}; known records: {known}")


def records_of(family: str) -> list[Record]:
    """The records of one family, in the order of :data:`RECORDS`."""
    return [r for r in RECORDS.values() if r.family == family]
