"""Checkpoints of the founding systems (PRs #490, #1148, #1406, #1499, #1550) in pgolf's GPT.

Their scripts save a plain ``state_dict()`` of their own ``GPT``: per-layer ``CastedLinear`` weights (#490, #1499)
or the four banks (#1148, #1406, #1550), a ``smear.gate`` SmearGate, a BigramHash, value embeddings
(``ve_shared``, ``ve_layer_scales.{i}``), #490's ``attn_gate`` and ``vr_lambda``, #1499's ``v_lambda`` and
``hidden_gain``, #1550's ``lane_merge``. :func:`convert_founding_state_dict` starts from the record's pgolf preset
(its model is the record's), reads every size from the tensors and the elements from the keys, takes what weights
cannot show from the record's run and the scripts' own variable names, renames and unbanks, and refuses what pgolf
does not model by name. The tables are the records' RoPE numerics: NTK-rescaled fp32 above their hard-coded 1024
(#1499: none), from the bf16-cast ``inv_freq`` buffer of their compiled runs below (``r3_compiled``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import Tensor
import torch

from pgolf.model.config import GPTConfig
from pgolf.model.records import EARLY_BANKED, Record

# Elements the scripts can switch on that pgolf's GPT does not model: (key fragment, why).
REFUSED_KEYS = (("lm_head.weight", "an untied lm_head (TIE_EMBEDDINGS=0)"),
                ("mtp_heads.", "multi-token-prediction heads (MTP_NUM_HEADS > 0)"),
                ("dtg_gate", "the dynamic token gate (DTG_ENABLED=1)"),
                ("vrl_alpha", "the sigmoid-gated value residual (VALUE_RESIDUAL=1 in #1406/#1550)"))
REFUSED_ENV = (("TRIGRAM", "1", "TrigramHash (TRIGRAM=1)"), ("SIGMOID_SKIPS", "1", "sigmoid skips (SIGMOID_SKIPS=1)"))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _flag(text: str) -> bool:
    return bool(int(text))


COMMON_ENV: dict[str, tuple[str, Callable[[str], Any]]] = dict(
    ROPE_DIMS=("rope_dims", int), ROPE_BASE=("rope_base", float), LOGIT_SOFTCAP=("logit_softcap", float),
    QK_GAIN_INIT=("qk_gain_init", float))
RECORD_ENV: dict[str, dict[str, tuple[str, Callable[[str], Any]]]] = {
    "pr490": dict(XSA_LAST_N=("xsa_last_n", int), LN_SCALE=("ln_scale", _flag)),
    "pr1148": dict(XSA_LAST_N=("xsa_last_n", int), LN_SCALE=("ln_scale", _flag), VE_LAYERS=("value_embed_layers", _ints)),
    "pr1406": dict(XSA_LAST_N=("xsa_last_n", int), LN_SCALE=("ln_scale", _flag), VE_LAYERS=("value_embed_layers", _ints)),
    "pr1499": dict(XSA_LAYERS=("xsa_last_n", int), DEPTH_RECUR_START_STEP=("loop_activate_step", int)),
    "pr1550": dict(XSA_LAST_N=("xsa_last_n", int), LN_SCALE=("ln_scale", _flag), VE_LAYERS=("value_embed_layers", _ints),
                   RECUR_START_STEP=("loop_activate_step", int)),
}


def convert_founding_state_dict(sd: dict[str, Tensor], rec: Record, env: Mapping[str, str], *,
                                read_env: Callable, **overrides: Any) -> tuple[GPTConfig, dict[str, Tensor]]:
    """(config, pgolf state dict) of a founding record's prefix-stripped fp32 state dict ``sd``."""
    from pgolf.model.convert import UnsupportedElementError, _unbank
    from pgolf.model.presets import get_preset

    for fragment, what in REFUSED_KEYS:
        if any(fragment in k for k in sd):
            raise UnsupportedElementError(f"this {rec.name} checkpoint has {fragment!r} tensors: {what}, which "
                                          f"pgolf's GPT does not model")
    for var, value, what in REFUSED_ENV:
        if env.get(var) == value:
            raise UnsupportedElementError(f"{var}={value} selects {what}, which pgolf's GPT does not model")
    if rec.family == EARLY_BANKED:
        sd = _unbank(sd)
    cfg: dict[str, Any] = {**get_preset(rec.preset).model.to_dict(), **_shapes(sd, rec),
                           **read_env(env, {**COMMON_ENV, **RECORD_ENV[rec.name]}), **_layouts(env, rec),
                           "rope_tables": "r3_compiled"}
    cfg.update(overrides)
    return GPTConfig.from_dict(cfg), _pgolf_names(sd, rec)


def _shapes(sd: Mapping[str, Tensor], rec: Record) -> dict[str, Any]:
    """GPTConfig fields read from the tensors: sizes, and the elements present."""
    from pgolf.model.convert import _num_blocks, _require

    _require(sd, ("tok_emb.weight", "skip_weights", "smear.gate", "blocks.0.attn.q_gain", "blocks.0.attn.c_k.weight",
                  "blocks.0.mlp.fc.weight"), f"{rec.name} record")
    vocab, dim = sd["tok_emb.weight"].shape
    heads = sd["blocks.0.attn.q_gain"].numel()
    out: dict[str, Any] = dict(
        vocab_size=vocab, model_dim=dim, num_layers=_num_blocks(sd), num_heads=heads,
        num_kv_heads=sd["blocks.0.attn.c_k.weight"].shape[0] // (dim // heads), mlp_hidden=sd["blocks.0.mlp.fc.weight"].shape[0],
        attn_gate="gated_bias" if "blocks.0.attn.attn_gate.weight" in sd else "none",
        value_residual="softmax" if "blocks.1.attn.v_lambda" in sd else "linear" if "blocks.1.attn.vr_lambda" in sd
        else "none",
        mlp_hidden_gain="blocks.0.mlp.hidden_gain" in sd, smear_gate="vector",
        bigram_buckets=sd["bigram.embed.weight"].shape[0] if "bigram.embed.weight" in sd else 0,
        value_embed_dim=sd["ve_shared.embed.weight"].shape[1] if "ve_shared.embed.weight" in sd else 0)
    if "bigram.embed.weight" in sd:
        out["bigram_dim"] = sd["bigram.embed.weight"].shape[1]
    if rec.family == EARLY_BANKED:
        out["parallel_residual"] = "mlp_lane" if "lane_merge" in sd else "none"
    return out


def _layouts(env: Mapping[str, str], rec: Record) -> dict[str, Any]:
    """Layouts set by several variables at once, or by an empty one: #1406's appended RECUR_LAYERS ("" = none; its
    forward ignores RECUR_ENABLED), #1499's depth recurrence and parallel start, #1550's loop and lanes (its
    RECUR_LAYERS is a contiguous segment looped in place)."""
    out: dict[str, Any] = {}
    if rec.name == "pr1406" and env.get("RECUR_LAYERS") is not None:
        out["recur_layers"] = _ints(env["RECUR_LAYERS"])
    if rec.name == "pr1499":
        if any(env.get(v, "") for v in ("DEPTH_RECUR_START", "DEPTH_RECUR_END", "DEPTH_RECUR_COUNT")):
            lo, hi = int(env.get("DEPTH_RECUR_START", 3)), int(env.get("DEPTH_RECUR_END", 5))
            count = int(env.get("DEPTH_RECUR_COUNT", 2))
            out["recur_layers"] = tuple(range(lo, hi + 1)) * max(count - 1, 0) if lo >= 0 else ()
        if env.get("PARALLEL_RESIDUAL_START", ""):
            start = int(env["PARALLEL_RESIDUAL_START"])
            out.update(parallel_residual="gptj" if start >= 0 else "none", parallel_start=max(start, 0))
    if rec.name == "pr1550":
        if env.get("RECUR_LAYERS") is not None:
            seg = _ints(env["RECUR_LAYERS"])
            if seg and list(seg) != list(range(seg[0], seg[-1] + 1)):
                from pgolf.model.convert import UnsupportedElementError

                raise UnsupportedElementError(f"RECUR_LAYERS={env['RECUR_LAYERS']}: pgolf loops a contiguous segment")
            out.update(num_loops=1 if seg else 0, loop_start=seg[0] if seg else 0, loop_end=seg[-1] if seg else 0)
        if env.get("PARALLEL_START_LAYER", ""):
            out["parallel_start"] = max(int(env["PARALLEL_START_LAYER"]), 0)
    return out


def _pgolf_names(sd: dict[str, Tensor], rec: Record) -> dict[str, Tensor]:
    """The scripts' names → pgolf's (value-embedding layer scales stacked into one vector)."""
    from pgolf.model.convert import UnsupportedElementError

    if rec.family == EARLY_BANKED and "blocks.0.attn.vr_lambda" in sd:
        raise UnsupportedElementError("VALUE_RESIDUAL=1 in the banked scripts gives block 0 an unused vr_lambda; "
                                      "pgolf's value residual has none there")
    out, scales = {}, {}
    for key, value in sd.items():
        if key.startswith("ve_layer_scales."):
            scales[int(key.rsplit(".", 1)[1])] = value.reshape(())
            continue
        for old, new in (("smear.gate", "smear_gate"), (".attn.attn_gate.weight", ".attn.gate_w"),
                         (".attn.attn_gate.bias", ".attn.gate_b"), (".attn.v_lambda", ".attn.vr_lambda"),
                         ("ve_shared.", "ve.")):
            key = key.replace(old, new)
        out[key] = value
    if scales:
        out["ve.layer_scales"] = torch.stack([scales[i] for i in sorted(scales)])
    return out
