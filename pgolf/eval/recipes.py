"""The founding submissions' legal eval pipelines, as ``python -m pgolf.eval --recipe NAME`` settings.

Each recipe is a TTT mode and the :class:`~pgolf.eval.ttt.TTTSettings` that reproduce what that submission's code
does at eval time (read from its code: ``../shared/docs/seed-systems.md``), restricted to what is legal: every token
scored before any update that could use it, which pgolf's ledger checks. Where a submission's claimed score came
from an illegal step (pre-quantization TTT on the validation tokens), the recipe runs its legal part and says so;
the illegal step runs only in study mode (``--study prequant-ttt``). A recipe sets the settings; ``--ttt-set``
can still change any of them. The window and stride come from the artifact, as for every eval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    name: str
    mode: str                       # run_ttt's mode
    settings: dict[str, Any]        # TTTSettings overrides
    what: str                       # the pipeline in one line
    record: str                     # what the submission's own score came from
    needs_train_tokens: bool = False  # the n-gram cache is pre-filled from training tokens
    notes: tuple[str, ...] = field(default_factory=tuple)


RECIPES = {r.name: r for r in (
    Recipe("pr490", "chunk",
           dict(optimizer="adamw", lr=1e-4, adam_betas=(0.9, 0.999), weight_decay=0.0, chunk_tokens=131_072, epochs=3,
                params=("blocks.9.*", "blocks.10.*", "*scale*", "tok_emb.*"), weights_dtype="bf16",
                micro_batch_seqs=2),
           "score-first chunk TTT: AdamW 1e-4, 131,072-token chunks, 3 epochs, cosine over chunks, blocks 9-10 + "
           "every *scale* + the embedding trainable, bf16 weights",
           "1.0891 from pre-eval AdamW TTT on all validation tokens (illegal, withdrawn); the head code's legal TTT "
           "has no log",
           notes=("the root script's variant (cosine floor 0.1, temperature 0.98): --ttt-set lr_floor=0.1 "
                  "--ttt-set temperature=0.98",)),
    Recipe("pr1148", "chunk",
           dict(optimizer="muon", lr=0.002, ns_steps=3, chunk_tokens=32_768, epochs=3, entropy_epochs=True,
                entropy_high=2.1, entropy_low=1.75, entropy_guard_s=0.85 * 570, micro_batch_seqs=2),
           "score-first chunk TTT with Muon-NS updates (3 NS steps, no momentum), lr 0.002 cosine, 32,768-token chunks, "
           "3 epochs +-1 from the chunk's scored NLL (2.1 / 1.75 nats), no extra epoch after 484.5 s",
           "1.1179, 3-seed mean of this legal TTT"),
    Recipe("pr1406", "chunk", dict(epochs=0),
           "sliding-window eval (stride from the artifact) through the ledger; no adaptation",
           "1.0887 from an artifact fine-tuned on the validation tokens for 10 epochs first (illegal, C3): run it in "
           "study mode (--study prequant-ttt)",
           notes=("its discriminative per-block LR as a legal chunk TTT: --recipe pr1148 --ttt-set optimizer=adamw "
                  "--ttt-set block_lr=[0.3,1.0]",)),
    Recipe("pr1499", "lora_sliding",
           dict(slide_lora_rank=8, slide_lora_sites=("q", "v"), slide_lora_lr=3e-4, slide_lora_reset=8,
                slide_temperature=0.98, ngram=True, ngram_orders=(2, 3, 4, 5, 6, 7),
                ngram_prefill_tokens=2_000_000),
           "LoRA sliding TTT (rank 8 on q, v; one AdamW step per 32 scored windows; reset every 8 batches; temperature "
           "0.98 after the first update) with the n-gram cache (orders 2-7, pre-filled from 2 M training tokens) in "
           "its normalized form",
           "1.4794 from a standard eval on 1xH100; the head's default eval (n-gram with an unnormalized weight) fails "
           "condition 2: its weighting runs only with --ttt-set study=true --ttt-set ngram_weighting=record",
           needs_train_tokens=True),
    Recipe("pr1550", "chunk", dict(epochs=0),
           "sliding-window eval (stride from the artifact) through the ledger; no adaptation",
           "1.05869 after 6 epochs of compiled pre-quant AdamW TTT on the validation tokens (illegal, C3; the PR "
           "says so): run it in study mode (--study prequant-ttt)",
           notes=("its compiled adaptation step is TTTSettings.compile (chunk mode), e.g. --recipe pr1148 "
                  "--ttt-set compile=true",)),
)}


def get(name: str) -> Recipe:
    """The recipe ``name``; ValueError naming the known ones."""
    if name not in RECIPES:
        raise ValueError(f"--recipe {name!r} is not known; choose one of {', '.join(RECIPES)} (or list)")
    return RECIPES[name]


def describe() -> str:
    """The recipes, one paragraph each (``--recipe list``)."""
    lines = []
    for r in RECIPES.values():
        lines += [f"{r.name}  (--ttt {r.mode})", f"  runs:   {r.what}", f"  record: {r.record}"]
        lines += [f"  also:   {n}" for n in r.notes]
        if r.needs_train_tokens:
            lines.append("  needs:  training shards beside the validation shards (--data), for the n-gram pre-fill")
        lines.append("")
    return "\n".join(lines).rstrip()
