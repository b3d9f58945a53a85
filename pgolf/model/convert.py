"""Bring checkpoints of the record scripts into pgolf's GPT: :func:`load_checkpoint`, and a CLI.

A record's ``final_model.pt`` is a plain ``state_dict()``. :func:`load_checkpoint` reads it with
``torch.load(weights_only=True)`` (no code from the file runs), strips ``torch.compile``/DDP prefixes,
recognizes the family from the keys (or takes the record by name, :mod:`pgolf.model.records`), reads the
shapes, takes what weights cannot show from the record's run settings, the environment (the scripts' own
variable names) and explicit overrides, renames and unbanks the tensors into pgolf's names, refuses any element
pgolf's GPT does not model by name, and loads strictly. Converted models carry the record's own RoPE numerics
(``rope_tables``) so they give the record's logits.

    python -m pgolf.model.convert final_model.pt --out converted.pt --record pr1855

writes a pgolf checkpoint (``{'model', 'config', 'source'}``) that ``python -m pgolf.quant --checkpoint`` turns
into an artifact for ``python -m pgolf.eval`` (``--ttt ...``) and ``pgolf-pack``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import Tensor

from pgolf.model.config import ROPE_TABLES, GPTConfig
from pgolf.model.gpt import GPT
from pgolf.model.records import (BANKED, EARLY_BANKED, EARLY_PER_LAYER, PER_LAYER, RECORDS, Record, get_record,
                                 records_of)


class UnsupportedElementError(ValueError):
    """The checkpoint (or its run settings) uses an element pgolf's GPT does not model; the message names it."""


class AmbiguousRecordError(ValueError):
    """The state dict fits records that ran with different settings; pass ``record=`` or set the variable."""


class Converted(NamedTuple):
    config: GPTConfig
    state_dict: dict[str, Tensor]   # pgolf names, fp32
    family: str                     # 'pgolf', PER_LAYER or BANKED
    record: Record | None           # the named or recognized record (None: a pgolf checkpoint, or unnamed)


class Loaded(NamedTuple):
    model: GPT                      # eval mode, looping on when the layout has loops
    config: GPTConfig
    family: str
    record: Record | None


def load_checkpoint(path: str | os.PathLike, record: str | None = None, *,
                    env: Mapping[str, str] | None = None, **overrides: Any) -> Loaded:
    """A ready model from a record ``final_model.pt`` (or a pgolf checkpoint), with its config and origin.

    ``record``: a name from :data:`pgolf.model.records.RECORDS` (default: recognized from the keys).
    ``env`` (default ``os.environ``): the record scripts' variables; ``overrides``: GPTConfig fields.
    """
    state = _read_state(Path(path))
    if "model" in state and "config" in state:
        if record is not None or overrides:
            raise ValueError(f"{path} is a pgolf checkpoint; it takes no record name or overrides")
        c = Converted(GPTConfig.from_dict(state["config"]), state["model"], "pgolf", None)
    else:
        c = convert_state_dict(state, record, env=env, **overrides)
    model = GPT(c.config)
    model.load_state_dict(c.state_dict, strict=True)
    model.looping_active = c.config.has_recurrence
    return Loaded(model.eval(), c.config, c.family, c.record)


def convert_state_dict(state: Mapping[str, Tensor], record: str | None = None, *,
                       env: Mapping[str, str] | None = None, **overrides: Any) -> Converted:
    """A record state dict in pgolf's terms; settings: script defaults < record's run < ``env`` < ``overrides``."""
    family = identify({_strip(k): v for k, v in state.items()})
    env = dict(os.environ if env is None else env)
    rec = _choose_record(family, record, env, state)
    settings = {**(rec.run_env if rec else {}), **env}
    if family in (EARLY_PER_LAYER, EARLY_BANKED):
        from pgolf.model.convert_founding import convert_founding_state_dict

        config, sd = convert_founding_state_dict(_fp32_stripped(state), rec, settings, read_env=_read_env, **overrides)
        _check_skips(config, sd, "RECUR_LAYERS / the run's layout")
        check_state_dict(config, sd)
        return Converted(config, sd, family, rec)
    convert = convert_r3_state_dict if family == PER_LAYER else convert_banked_state_dict
    config, sd = convert(state, settings, **overrides)
    return Converted(config, sd, family, rec)


def identify(sd: Mapping[str, Any]) -> str:
    """The family of a prefix-stripped record state dict: PER_LAYER (2026-04-09), BANKED (2026-04-27 lineage), or
    the founding systems' EARLY_PER_LAYER (#490, #1499) and EARLY_BANKED (#1148, #1406, #1550): ``smear.gate``."""
    early = "smear.gate" in sd
    if "qo_bank" in sd:
        return EARLY_BANKED if early else BANKED
    if "blocks.0.attn.c_q.weight" in sd:
        return EARLY_PER_LAYER if early else PER_LAYER
    raise ValueError(f"not a checkpoint of a supported record (no 'qo_bank' and no 'blocks.0.attn.c_q.weight'; "
                     f"{len(sd)} keys, e.g. {sorted(sd)[:5]}); supported: "
                     + ", ".join(f"{r.name} ({r.folder})" for r in RECORDS.values()))


# ---- 2026-04-09 record (PR #1493): per-layer CastedLinear weights under pgolf's own names ----------------------

# The script's defaults for what shapes cannot tell. Its Rotary scales by TRAIN_SEQ_LEN (ROPE_TRAIN_SEQ_LEN is
# read but never used) and runs on a bf16-cast buffer; the tables are those of its torch.compile'd run.
R3_DEFAULTS = dict(num_loops=2, loop_start=3, loop_end=5, parallel_start=7, xsa_last_n=11, rope_dims=16,
                   rope_base=10000.0, rope_train_seq_len=2048, logit_softcap=30.0, ln_scale=True,
                   mlp_negative_slope=0.5, rope_tables="r3_compiled")
R3_ENV = dict(NUM_LOOPS=("num_loops", int), LOOP_START=("loop_start", int), LOOP_END=("loop_end", int),
              PARALLEL_RESIDUAL_START=("parallel_start", int), XSA_LAST_N=("xsa_last_n", int),
              ROPE_DIMS=("rope_dims", int), ROPE_BASE=("rope_base", float),
              TRAIN_SEQ_LEN=("rope_train_seq_len", int), LOGIT_SOFTCAP=("logit_softcap", float),
              LN_SCALE=("ln_scale", lambda s: bool(int(s))))


def convert_r3_state_dict(state: Mapping[str, Tensor], env: Mapping[str, str] | None = None,
                          **overrides: Any) -> tuple[GPTConfig, dict[str, Tensor]]:
    """(config, state dict for :class:`GPT`) from a 2026-04-09 record state dict; tensors become fp32 copies.

    ``env`` (default ``os.environ``) is read for the script's variable names; ``overrides`` win over both.
    """
    sd = _fp32_stripped(state)
    _require(sd, ("tok_emb.weight", "skip_weights", "blocks.0.attn.c_q.weight", "blocks.0.attn.c_k.weight",
                  "blocks.0.mlp.fc.weight", "blocks.0.attn.q_gain"), "2026-04-09 record")
    _refuse_keys(sd, {"lm_head.weight": "an untied lm_head (TIE_EMBEDDINGS=0); pgolf ties the head",
                      "embed_proj.weight": "EMBEDDING_DIM != MODEL_DIM (embed_proj/head_proj)"})
    dim = sd["tok_emb.weight"].shape[1]
    num_heads = sd["blocks.0.attn.q_gain"].numel()
    cfg: dict[str, Any] = dict(R3_DEFAULTS, **_read_env(os.environ if env is None else env, R3_ENV))
    cfg.update(vocab_size=sd["tok_emb.weight"].shape[0], model_dim=dim, num_layers=_num_blocks(sd),
               num_heads=num_heads, num_kv_heads=sd["blocks.0.attn.c_k.weight"].shape[0] // (dim // num_heads),
               mlp_hidden=sd["blocks.0.mlp.fc.weight"].shape[0], qk_gain_init=float(sd["blocks.0.attn.q_gain"].mean()),
               skip_gates="skip_gates" in sd, parallel_residual="gptj" if cfg["parallel_start"] >= 0 else "none",
               smear_gate="none", attn_gate="none", init="record")
    config = GPTConfig(**{**cfg, **overrides})
    _check_skips(config, sd, "NUM_LOOPS, LOOP_START, LOOP_END")
    check_state_dict(config, sd)
    return config, sd


# ---- 2026-04-27 lineage (PR #1855 and descendants): banked matrices ----------------------------------------------

BANKED_DEFAULTS = dict(num_loops=2, loop_start=3, loop_end=5, parallel_start=8, xsa_last_n=11, rope_dims=16,
                       rope_base=10000.0, rope_train_seq_len=0, logit_softcap=30.0, ln_scale=True,
                       mlp_negative_slope=0.5, attn_gate_kappa=1.0, rope_tables="bf16_freq")
BANKED_ENV = dict(NUM_LOOPS=("num_loops", int), LOOP_START=("loop_start", int), LOOP_END=("loop_end", int),
                  PARALLEL_START_LAYER=("parallel_start", int), XSA_LAST_N=("xsa_last_n", int),
                  ROPE_DIMS=("rope_dims", int), ROPE_BASE=("rope_base", float),
                  LOGIT_SOFTCAP=("logit_softcap", float), LN_SCALE=("ln_scale", lambda s: bool(int(s))),
                  SPARSE_ATTN_GATE_SCALE=("attn_gate_kappa", float))
# Settings of the lineage's scripts that select behaviour pgolf's GPT does not have: (variable, refused if, why).
BANKED_REFUSED: tuple[tuple[str, Callable[[str], bool], str], ...] = (
    ("PARALLEL_FINAL_LANE", lambda v: v.lower() != "mean", "a final hidden from one lane (pgolf averages both)"),
    ("ROPE_YARN", lambda v: v != "0", "RoPE rescaled by the packed row length (ROPE_YARN=1)"),
    ("SMEAR_GATE_BOS_FIX", lambda v: v == "0", "a SmearGate that also smears across BOS (SMEAR_GATE_BOS_FIX=0)"),
    ("TIE_EMBEDDINGS", lambda v: v == "0", "an untied lm_head (TIE_EMBEDDINGS=0)"),
)
_LINEAGE_NAMES = (("parallel_resid_lambdas", "lane_resid"), ("parallel_post_lambdas", "lane_mix"),
                  (".attn.attn_gate_w", ".attn.gate_w"), (".attn.attn_gate_proj.weight", ".attn.gate_w"))


def convert_banked_state_dict(state: Mapping[str, Tensor], env: Mapping[str, str] | None = None,
                              **overrides: Any) -> tuple[GPTConfig, dict[str, Tensor]]:
    """(config, state dict for :class:`GPT`) from a 2026-04-27-lineage state dict; tensors become fp32 copies.

    Banks become per-layer matrices; ``env`` (default ``os.environ``) gives what shapes cannot; the asymmetric
    softcap pair of #1945 and later loads only while both halves are equal (then it is one plain softcap).
    """
    env = os.environ if env is None else env
    sd = _fp32_stripped(state)
    _require(sd, ("tok_emb.weight", "qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank", "skip_weights",
                  "blocks.0.attn.q_gain"), "2026-04-27-lineage record")
    _refuse_keys(sd, {"lm_head.weight": "an untied lm_head (TIE_EMBEDDINGS=0); pgolf ties the head"})
    _refuse_settings(env, sd)
    cfg: dict[str, Any] = dict(BANKED_DEFAULTS, **_read_env(env, BANKED_ENV), **_banked_shapes(sd, env))
    sd = _pgolf_names(_unbank(sd))
    _fold_asym_softcap(sd, cfg)
    if cfg["parallel_start"] <= 0:  # the script runs no lanes then; its lane scalars stay unused
        cfg["parallel_residual"] = "none"
        for name in ("lane_resid", "lane_mix"):
            sd.pop(name, None)
    config = GPTConfig(**{**cfg, **overrides})
    _check_skips(config, sd, "NUM_LOOPS, LOOP_START, LOOP_END")
    _check_lanes(config)
    check_state_dict(config, sd)
    return config, sd


def check_state_dict(config: GPTConfig, sd: Mapping[str, Tensor]) -> None:
    """Refuse tensors ``GPT(config)`` lacks by name; one error for every missing or mis-shaped tensor."""
    with torch.device("meta"):
        ref = GPT(config).state_dict()
    unexpected = sorted(set(sd) - set(ref))
    if unexpected:
        raise UnsupportedElementError(f"the checkpoint has elements pgolf's GPT does not model: {unexpected}")
    missing = sorted(set(ref) - set(sd))
    shapes = [f"{k}: {tuple(sd[k].shape)} != {tuple(ref[k].shape)}" for k in ref if k in sd and sd[k].shape != ref[k].shape]
    if missing or shapes:
        raise ValueError("state dict does not match the model: "
                         + "; ".join(f"{what} {items}" for what, items in (("missing", missing), ("shape", shapes))
                                     if items))


# ---- CLI ----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``python -m pgolf.model.convert CKPT --out OUT.pt [--record NAME] [--env NAME=VALUE] [--force]``."""
    from pgolf.utils import atomic_torch_save

    args = _parser().parse_args(argv)
    try:
        if args.list_records or not args.checkpoint:
            print("\n".join(_record_lines()))
            return 0
        out = Path(args.out or "")
        if not args.out:
            raise ValueError("--out is required: the pgolf checkpoint to write")
        if out.exists() and not args.force:
            raise FileExistsError(f"{out} exists; pass --force to overwrite it")
        overrides = {"rope_tables": args.rope_tables} if args.rope_tables else {}
        loaded = load_checkpoint(args.checkpoint, args.record, env={**os.environ, **_pairs(args.env)}, **overrides)
        source = {"file": str(args.checkpoint), "family": loaded.family,
                  "record": loaded.record.name if loaded.record else None}
        atomic_torch_save({"model": loaded.model.state_dict(), "config": loaded.config.to_dict(),
                           "source": source}, out)
        print(f"wrote {out}: {source['record'] or source['family']} -> pgolf GPT, "
              f"{loaded.model.num_params():,} parameters, rope_tables={loaded.config.rope_tables}")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"python -m pgolf.model.convert: error: {e}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pgolf.model.convert",
                                 description="Convert a record checkpoint into a pgolf checkpoint.")
    ap.add_argument("checkpoint", nargs="?", help="the record's final_model.pt (a state dict)")
    ap.add_argument("--out", help="pgolf checkpoint to write ({'model', 'config', 'source'})")
    ap.add_argument("--record", help="record name (see --list-records); default: recognized from the keys")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="a variable of the record's run command, over the environment (repeatable)")
    ap.add_argument("--rope-tables", choices=ROPE_TABLES, help="override the record's RoPE numerics")
    ap.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    ap.add_argument("--list-records", action="store_true", help="list the records this converter knows")
    return ap


def _record_lines() -> list[str]:
    return [f"{r.name:7s} {r.family:9s} val_bpb {r.val_bpb:.5f}  {r.params:,} params  {r.folder}"
            for r in RECORDS.values()]


def _pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--env takes NAME=VALUE, got {item!r}")
        out[name] = value
    return out


# ---- helpers --------------------------------------------------------------------------------------------------------

def _read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{path} is not a loadable state dict ({type(e).__name__}: {e})") from e
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _choose_record(family: str, name: str | None, env: Mapping[str, str],
                   state: Mapping[str, Any] | None = None) -> Record | None:
    """The named record (checked against the family), the family's only record, a founding record its keys show,
    or None when settings decide."""
    if name is not None:
        rec = get_record(name)
        if rec.family != family:
            raise ValueError(f"record {rec.name} saves {rec.family} weights but this state dict has {family} ones")
        return rec
    candidates = records_of(family)
    if len(candidates) == 1:
        return candidates[0]
    if family in (EARLY_PER_LAYER, EARLY_BANKED):
        return _founding_record(family, {_strip(k) for k in (state or {})})
    if "SPARSE_ATTN_GATE_SCALE" not in env:
        runs = ", ".join(f"{r.name} {r.run_env.get('SPARSE_ATTN_GATE_SCALE', '1.0')}" for r in candidates)
        raise AmbiguousRecordError("a banked 2026-04-27-lineage state dict does not say which run it is from, and "
                                   f"the runs used different SPARSE_ATTN_GATE_SCALE ({runs}); pass record=NAME "
                                   "(--record) or set SPARSE_ATTN_GATE_SCALE as the run did")
    return None


def _founding_record(family: str, keys: set[str]) -> Record:
    """#1499 (hidden_gain) or #490; #1550 (lane_merge) or else #1148 / #1406, which only the run can tell apart."""
    if family == EARLY_PER_LAYER:
        return get_record("pr1499" if "blocks.0.mlp.hidden_gain" in keys else "pr490")
    if "lane_merge" in keys:
        return get_record("pr1550")
    raise AmbiguousRecordError("a banked 2026-03/04 state dict without lanes is PR #1148's or #1406's (the same "
                               "tensors; #1406 runs blocks 4,5 again after the last one): pass record='pr1148' or "
                               "'pr1406' (--record)")


def _strip(key: str) -> str:
    """Drop every torch.compile (``_orig_mod.``) and DDP (``module.``) wrapper prefix, in any nesting order."""
    while True:
        for prefix in ("_orig_mod.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            return key


def _fp32_stripped(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    bad = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if bad:
        raise ValueError(f"not a state dict of tensors: {bad[:5]} are not tensors")
    return {_strip(k): v.detach().to(torch.float32).clone() for k, v in state.items()}


def _require(sd: Mapping[str, Tensor], keys: tuple[str, ...], what: str) -> None:
    for key in keys:
        if key not in sd:
            raise ValueError(f"not a {what} state dict: key {key!r} is missing "
                             f"(found {len(sd)} keys, e.g. {sorted(sd)[:5]})")


def _refuse_keys(sd: Mapping[str, Tensor], elements: Mapping[str, str]) -> None:
    for key, what in elements.items():
        if key in sd:
            raise UnsupportedElementError(f"this checkpoint has {key!r}: {what}")


def _refuse_settings(env: Mapping[str, str], sd: Mapping[str, Tensor]) -> None:
    for var, refused, what in BANKED_REFUSED:
        if var in env and refused(env[var]):
            raise UnsupportedElementError(f"{var}={env[var]} selects {what}, which pgolf's GPT does not model")
    if "blocks.0.attn.attn_gate_proj.weight" in sd and env.get("ATTN_OUT_GATE_SRC", "proj") != "proj":
        raise UnsupportedElementError(f"ATTN_OUT_GATE_SRC={env['ATTN_OUT_GATE_SRC']}: an attention output gate "
                                      "read from q; pgolf's attn_out gate reads the block input")


def _read_env(env: Mapping[str, str], table: Mapping[str, tuple[str, Callable[[str], Any]]]) -> dict[str, Any]:
    out = {}
    for var, (name, parse) in table.items():
        if env.get(var, "") != "":
            try:
                out[name] = parse(env[var])
            except ValueError:
                raise ValueError(f"cannot read {var}={env[var]!r} ({name})") from None
    return out


def _num_blocks(sd: Mapping[str, Tensor]) -> int:
    return 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))


def _banked_shapes(sd: Mapping[str, Tensor], env: Mapping[str, str]) -> dict[str, Any]:
    """GPTConfig fields read from the tensors of a banked state dict (dims, gates, smear)."""
    vocab, dim = sd["tok_emb.weight"].shape
    num_heads = sd["blocks.0.attn.q_gain"].numel()
    cfg: dict[str, Any] = dict(
        vocab_size=vocab, model_dim=dim, num_layers=sd["qo_bank"].shape[0] // 2, num_heads=num_heads,
        num_kv_heads=sd["kv_bank"].shape[1] // (dim // num_heads), mlp_hidden=sd["mlp_up_bank"].shape[1],
        qk_gain_init=float(sd["blocks.0.attn.q_gain"].mean()), skip_gates="skip_gates" in sd,
        parallel_residual="two_lane", smear_gate="none", attn_gate="none", init="record")
    if "smear_gate.weight" in sd:
        cfg.update(smear_gate="bos", smear_width=sd["smear_gate.weight"].shape[-1])
    if "blocks.0.attn.attn_gate_proj.weight" in sd:
        cfg.update(attn_gate="attn_out", attn_gate_width=sd["blocks.0.attn.attn_gate_proj.weight"].shape[1])
    elif "blocks.0.attn.attn_gate_w" in sd:
        width = sd["blocks.0.attn.attn_gate_w"].shape[1]
        dense = env.get("GATED_ATTN_ENABLED") == "1" or (env.get("SPARSE_ATTN_GATE_ENABLED") != "1" and width == dim)
        cfg.update(attn_gate="gated") if dense else cfg.update(attn_gate="sparse", attn_gate_width=width)
    return cfg


def _unbank(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """qo_bank [Q_0..Q_n-1, O_0..O_n-1], kv_bank [K.., V..], mlp_up_bank, mlp_down_bank → per-layer matrices."""
    n = sd["qo_bank"].shape[0] // 2
    names = {"qo_bank": ("attn.c_q.weight", "attn.proj.weight"), "kv_bank": ("attn.c_k.weight", "attn.c_v.weight"),
             "mlp_up_bank": ("mlp.fc.weight",), "mlp_down_bank": ("mlp.proj.weight",)}
    out = {k: v for k, v in sd.items() if k not in names}
    for bank, parts in names.items():
        for j, part in enumerate(parts):
            for i in range(n):
                out[f"blocks.{i}.{part}"] = sd[bank][j * n + i].clone()
    return out


def _pgolf_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The lineage's names and shapes for the lanes, gates and smear → pgolf's."""
    out = {}
    for key, value in sd.items():
        for old, new in _LINEAGE_NAMES:
            key = key.replace(old, new)
        out[key] = value
    if "smear_gate.weight" in out:  # CastedLinear(w, 1) and a (1,) lambda → a (w,) vector and a scalar
        out["smear_gate"] = out.pop("smear_gate.weight").reshape(-1)
        out["smear_lambda"] = out["smear_lambda"].reshape(())
    return out


def _fold_asym_softcap(sd: dict[str, Tensor], cfg: dict[str, Any]) -> None:
    """ASYM_LOGIT_RESCALE's softcap_pos/softcap_neg: one plain softcap while equal, refused once they differ."""
    if "softcap_pos" not in sd and "softcap_neg" not in sd:
        return
    pos, neg = sd.pop("softcap_pos", None), sd.pop("softcap_neg", None)
    if pos is None or neg is None or not torch.equal(pos, neg):
        raise UnsupportedElementError(
            f"asymmetric logit rescale (ASYM_LOGIT_RESCALE=1, PR #1923) with softcap_pos={_item(pos)} != "
            f"softcap_neg={_item(neg)}: pgolf has one softcap (only equal halves, as training leaves them, load)")
    cfg["logit_softcap"] = float(pos)


def _item(t: Tensor | None) -> str:
    return "missing" if t is None else f"{float(t):.9g}"


def _check_skips(config: GPTConfig, sd: Mapping[str, Tensor], variables: str) -> None:
    n = sd["skip_weights"].shape[0]
    if config.num_skips != n:
        raise ValueError(f"the checkpoint has {n} skip weights but the layout (NUM_LOOPS={config.num_loops}, "
                         f"LOOP_START={config.loop_start}, LOOP_END={config.loop_end}) needs {config.num_skips}; "
                         f"set {variables} to the values the run used")


def _check_lanes(config: GPTConfig) -> None:
    """The lineage's forward keeps using the pre-lane stream if a sequential layer follows a two-lane one."""
    if config.parallel_residual != "two_lane":
        return
    for looping in (False, True):
        dec = config.layer_plan(looping)[1]
        first = next((j for j, i in enumerate(dec) if i >= config.parallel_start), len(dec))
        late = [i for i in dec[first:] if i < config.parallel_start]
        if late:
            raise UnsupportedElementError(
                f"decoder layers {late} (< PARALLEL_START_LAYER={config.parallel_start}) run after two-lane "
                f"layers (looping={looping}); the record drops the lanes there, pgolf merges them")


if __name__ == "__main__":
    sys.exit(main())
