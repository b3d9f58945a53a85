"""``pgolf-pack RUN_DIR --out FOLDER``: a submission folder in the challenge's records layout from a finished run.

The folder (name it like ``records/track_10min_16mb/<date>_<name>``) gets:

- ``train_gpt.py``: the self-contained, compressed program (:mod:`pgolf.quant.bundle`) holding only what the run's
  configuration reaches; it needs only torch, triton, numpy, sentencepiece and brotli, reads ``DATA_PATH`` /
  ``TOKENIZER_PATH`` / ``SEED`` / ... from the environment, and reproduces the run's training, quantization and
  evaluation. Its size is ``bytes_code``; the README's code table says what each packed module costs.
- ``train_gpt_readable.py``: the same program uncompressed, for reading (not counted);
- the run's artifact (``final_model.pgq``), its log (``train_seed<seed>.log``) and ``summary.json``;
- ``submission.json`` (name, author, github_id, blurb, date, val_loss, val_bpb, bytes_total, bytes_model,
  bytes_code, ...) and ``README.md`` with the results table.

A study folder (``python -m pgolf.eval --study ... --study-out``: an illegal variant measured openly) packs only as a
non-record submission: ``submission.json`` says ``"track": "non-record"`` with the study and the condition it
fails, and the README's first lines say so.

What is packed is checked first: the run must be complete (or a study), and its artifact is the file inside RUN_DIR (never a
path stored in the summary), whose size and SHA-256 must equal the ones the run recorded when it wrote and scored
it, and whose header's tokenizer fingerprint and model config must equal the run's; anything else (a copied run
folder without its artifact, a re-quantized artifact) is refused by name. The folder is built in a temp folder
beside FOLDER and renamed into place at the end; an existing FOLDER is refused unless ``--force``, and FOLDER may
not be, contain or lie inside RUN_DIR.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from pgolf.errors import ConfigError, InputError, MismatchError, MissingInputError, run_cli
from pgolf.quant.size import BUDGET_BYTES, OverBudgetError

SUMMARY_KEYS = ("preset", "params", "steps", "train_time_ms", "val_bpb", "config", "model", "artifact")


def pack(run_dir: str | Path, out: str | Path, *, name: str | None = None, author: str = "<your name>",
         github_id: str = "<your github id>", blurb: str | None = None, force: bool = False,
         allow_over_budget: bool = False) -> dict[str, Any]:
    """Check the run and write the submission folder ``out``; returns the submission.json dict.

    ``force``: replace an existing ``out``; ``allow_over_budget``: pack even over 16,000,000 bytes.
    """
    from pgolf.quant.bundle import build_train_gpt, code_size_table, format_code_table, sources_digest
    from pgolf.quant.size import artifact_size_table, format_size_table
    from pgolf.utils import refuse_existing, staged_dir

    run_dir, out = Path(run_dir), Path(out)
    check_out(run_dir, out)
    refuse_existing(out, force=force, what="submission folder")
    s, summary_bytes = read_run_summary(run_dir)
    art = s["artifact"]
    art_path, blob = verified_artifact(run_dir, s)
    wrapped, readable = build_train_gpt(s["config"], s["model"])
    bytes_code = len(wrapped.encode("utf-8"))
    total = len(blob) + bytes_code
    if total > BUDGET_BYTES and not allow_over_budget:
        raise OverBudgetError(f"the submission would be {total:,} bytes (model {len(blob):,} + code {bytes_code:,}), "
                          f"{total - BUDGET_BYTES:,} over {BUDGET_BYTES:,}; re-quantize with a larger k or fewer "
                          f"bits (see the run's size table), or pass --allow-over-budget")
    digest = sources_digest()
    sub = _submission(s, art, name, author, github_id, blurb, len(blob), bytes_code, digest)
    if s.get("status") == "study":
        sub.update(_non_record(s["study"]))
    notes = _notes(art, digest, bytes_code)
    table = format_size_table(artifact_size_table(blob), bytes_code)
    code_table = format_code_table(code_size_table(s["config"], s["model"]))
    log = run_dir / "train.log"
    with staged_dir(out, force=force, what="submission folder") as tmp:
        (tmp / "train_gpt.py").write_text(wrapped, encoding="utf-8")
        (tmp / "train_gpt_readable.py").write_text(readable, encoding="utf-8")
        (tmp / art_path.name).write_bytes(blob)
        if log.is_file():
            (tmp / f"train_seed{sub['seed']}.log").write_bytes(log.read_bytes())
        (tmp / "summary.json").write_bytes(summary_bytes)
        (tmp / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_readme(sub, s, art, table, code_table, art_path.name, notes), encoding="utf-8")
    return sub


def check_out(run_dir: Path, out: Path) -> None:
    """ConfigError when ``out`` is ``run_dir``, lies inside it or contains it (packing would mix or replace it)."""
    r, o = run_dir.resolve(), out.resolve()
    if o == r or r in o.parents or o in r.parents:
        raise ConfigError(f"--out {out} overlaps the run folder {run_dir} (it is the same folder, inside it or "
                          f"holds it); choose a separate folder, e.g. records/track_10min_16mb/<date>_<name>")


def read_run_summary(run_dir: Path) -> tuple[dict[str, Any], bytes]:
    """(summary dict, its bytes) of a complete run; named errors for a missing, corrupt or unfinished summary."""
    path = run_dir / "summary.json"
    if not path.is_file():
        raise MissingInputError(f"{path} not found: RUN_DIR must be a finished pgolf run (runs/<run_id>)")
    raw = path.read_bytes()
    try:
        s = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); the run's summary is corrupt") from None
    if not isinstance(s, dict) or any(k not in s for k in SUMMARY_KEYS):
        missing = [k for k in SUMMARY_KEYS if not isinstance(s, dict) or k not in s]
        raise InputError(f"{path} is not a pgolf run summary (missing {', '.join(missing)})")
    status = s.get("status", "complete")
    if status == "study" and not isinstance(s.get("study"), dict):
        raise InputError(f"{path} says status 'study' but holds no study section; it was not written by "
                         f"python -m pgolf.eval --study-out")
    if status not in ("complete", "study"):
        hint = " ".join(s.get("resume") or [])
        raise InputError(f"the run in {run_dir} is not complete (status {status!r}"
                         f"{', failed in ' + str(s.get('failed_phase')) if s.get('failed_phase') else ''}); "
                         f"nothing to pack yet" + (f". {hint}" if hint else ""))
    if not s["artifact"]:
        raise InputError(f"the run in {run_dir} wrote no artifact (quant_method was 'none'); nothing to pack")
    return s, raw


def verified_artifact(run_dir: Path, s: dict[str, Any]) -> tuple[Path, bytes]:
    """(path, bytes) of the artifact inside ``run_dir``, checked against what the run recorded: size, SHA-256,
    tokenizer fingerprint and model config. MismatchError (or a missing-file error) otherwise."""
    from pgolf.quant.artifact import decode, check_model_config

    art = s["artifact"]
    path = run_dir / (art.get("file") or Path(str(art.get("path"))).name)
    if not path.is_file():
        raise MissingInputError(f"the run's artifact {path} is missing; pgolf-pack packs only the artifact inside "
                                f"the run folder (never one elsewhere), so copy the run folder whole")
    if "sha256" not in art or "bytes_model" not in art:
        raise InputError(f"{run_dir / 'summary.json'} records no size and SHA-256 of the artifact (written by an "
                         f"older pgolf), so {path} cannot be verified; re-run the training")
    blob = path.read_bytes()
    if len(blob) != art["bytes_model"] or hashlib.sha256(blob).hexdigest() != art["sha256"]:
        raise MismatchError(f"{path} is not the artifact this run wrote and scored ({len(blob):,} bytes, sha256 "
                            f"{hashlib.sha256(blob).hexdigest()[:16]}... against {art['bytes_model']:,} bytes, "
                            f"{art['sha256'][:16]}... in summary.json): it was replaced or re-quantized, so the "
                            f"run's score is not its score. Restore the run's artifact, or re-run the training")
    qm = decode(blob, source=str(path))
    if qm.tokenizer != s.get("tokenizer"):
        mine, theirs = (qm.tokenizer or {}).get("file"), (s.get("tokenizer") or {}).get("file")
        raise MismatchError(f"{path} records another tokenizer than the run's summary ({mine} against {theirs})")
    check_model_config(qm, s["model"], source=str(path), against=f"{run_dir / 'summary.json'}")
    return path, blob


def _submission(s: dict, art: dict, name, author, github_id, blurb, bytes_model: int, bytes_code: int,
                digest: str) -> dict[str, Any]:
    sliding = art.get("sliding") or {}
    return {
        "name": name or f"pgolf_{s['preset']}", "author": author, "github_id": github_id,
        "blurb": blurb or f"pgolf {s['preset']} preset: {s['params']:,} params, GPTQ + SDClip artifact "
                          f"({art.get('layout', 'int8')} layout, brotli-11), {s['steps']} steps",
        "date": time.strftime("%Y-%m-%d"), "val_loss": art["val_loss"], "val_bpb": art["val_bpb"],
        "val_bpb_sliding": sliding.get("val_bpb"), "pre_quant_val_bpb": s["val_bpb"],
        "bytes_total": bytes_model + bytes_code, "bytes_model": bytes_model, "bytes_code": bytes_code,
        "steps": s["steps"], "train_time_s": round(s["train_time_ms"] / 1000, 3),
        "calibration_s": s.get("calibration_s"), "seed": s["config"].get("seed"), "world_size": s.get("world_size"),
        "device": s.get("device"), "torch": s.get("torch"), "preset": s["preset"], "params": s["params"],
        "run_id": s.get("run_id"), "pgolf_sources_sha256": digest,
    }


def _non_record(study: dict[str, Any]) -> dict[str, Any]:
    """The submission.json fields of a study: never a record."""
    failed = ", ".join(study.get("conditions_failed") or [])
    return {"track": "non-record", "record": False, "study": study,
            "name_note": f"NON-RECORD STUDY: {study.get('kind')} (fails condition {failed}); gain over the legal score "
                         f"{study.get('gain_bpb', 0.0):+.6f} bpb"}


def _notes(art: dict, digest: str, bytes_code: int) -> list[str]:
    notes = []
    if art.get("code_digest") and art["code_digest"] != digest:
        notes.append("the pgolf sources changed since this run was trained: train_gpt.py embeds the current "
                     "sources, so its results may differ from the run's")
    if art.get("bytes_code") and art["bytes_code"] != bytes_code:
        notes.append(f"the run counted {art['bytes_code']:,} code bytes; the packed train_gpt.py has {bytes_code:,}")
    return notes


def _readme(sub: dict, s: dict, art: dict, table: str, code_table: str, art_name: str, notes: list[str]) -> str:
    def f(v, spec=".4f"):
        return "–" if v is None else format(v, spec)

    rows = [
        ("val_bpb (artifact, plain eval)", f(sub["val_bpb"], ".8f")),
        ("val_bpb (artifact, sliding eval)", f(sub["val_bpb_sliding"], ".8f")),
        ("val_bpb before quantization", f(sub["pre_quant_val_bpb"], ".8f")),
        ("val_loss (artifact, nats/token)", f(sub["val_loss"], ".8f")),
        ("steps", f"{s['steps']:,}"),
        ("train time incl. GPTQ calibration (s)", f(s["train_time_ms"] / 1000, ".1f")),
        ("GPTQ calibration (s)", f(s.get("calibration_s"), ".2f")),
        ("artifact eval time (s)", f(art.get("eval_time_s"), ".1f")),
        ("bytes_model", f"{sub['bytes_model']:,}"),
        ("bytes_code (train_gpt.py)", f"{sub['bytes_code']:,}"),
        ("**bytes_total**", f"**{sub['bytes_total']:,}** of {BUDGET_BYTES:,}"),
        ("parameters", f"{s['params']:,}"),
        ("seed / world size / device", f"{sub['seed']} / {sub['world_size']} / {sub['device']}"),
        ("torch", str(sub["torch"])),
    ]
    lines = [f"# {sub['name']}", ""]
    if sub.get("track") == "non-record":
        lines += [f"**{sub['name_note']}.** An illegal variant measured for study (python -m pgolf.eval --study); "
                  f"not a record submission.", ""]
    lines += [sub["blurb"], "", "| | |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    st = art.get("settings", {})
    lines += ["", "## Quantization", "",
              f"GPTQ (act-order, blocks of {st.get('block_size')}, damping {st.get('damp')}) with SDClip scales "
              f"k·std(row)/Q on {art.get('n_cal')} calibration batches of training data; "
              f"attn int{st.get('attn_bits')} "
              f"k={st.get('attn_k')}, MLP int{st.get('mlp_bits')} k={st.get('mlp_k')}, embedding "
              f"int{st.get('embed_bits')} k={st.get('embed_k')}, LQER rank {st.get('lqer_rank')}; "
              f"tensors of at most {st.get('passthrough_max'):,} elements fp16. Artifact `{art_name}` "
              f"(pgolf artifact format, layout {art.get('layout')}):", "", "```", table, "```", "",
              "## Code", "",
              "`train_gpt.py` holds only the pgolf code this configuration reaches (settings it fixed decided at pack "
              "time), minified and compressed; what each packed module costs, in bytes of the file:", "",
              "```", code_table, "```", "",
              "## Reproduce", "", "```bash",
              "DATA_PATH=data/datasets/fineweb10B_sp8192 TOKENIZER_PATH=data/tokenizers/fineweb_8192_bpe.model \\",
              "  torchrun --standalone --nproc_per_node=8 train_gpt.py", "```", "",
              "`train_gpt.py` embeds the pgolf modules it needs (compressed) and needs only torch, triton, numpy, "
              "sentencepiece and brotli. `SEED`, `RUN_ID`, `RUN_DIR` and the record scripts' other variables "
              "override the packed configuration; `train_gpt_readable.py` is the same program uncompressed.", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pgolf-pack", description="Write a challenge submission folder from a run.")
    ap.add_argument("run_dir", help="a finished run's folder (runs/<run_id>, with summary.json and the artifact)")
    ap.add_argument("--out", required=True, help="the submission folder, e.g. records/track_10min_16mb/<date>_<name>")
    ap.add_argument("--name", default=None)
    ap.add_argument("--author", default="<your name>")
    ap.add_argument("--github-id", default="<your github id>")
    ap.add_argument("--blurb", default=None)
    ap.add_argument("--force", action="store_true", help="replace an existing --out folder")
    ap.add_argument("--allow-over-budget", action="store_true", help="pack even over the 16,000,000-byte budget")
    args = ap.parse_args(argv)
    return run_cli("pgolf-pack", lambda: _pack(args))


def _pack(args: argparse.Namespace) -> int:
    sub = pack(args.run_dir, args.out, name=args.name, author=args.author, github_id=args.github_id,
               blurb=args.blurb, force=args.force, allow_over_budget=args.allow_over_budget)
    readme = (Path(args.out) / "README.md").read_text(encoding="utf-8")
    print(readme.split("## Code", 1)[1].split("```")[1].strip("\n"))
    print(f"packed {args.run_dir} -> {args.out}: val_bpb {sub['val_bpb']:.6f}, bytes_total {sub['bytes_total']:,} "
          f"(model {sub['bytes_model']:,} + code {sub['bytes_code']:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
