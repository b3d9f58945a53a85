"""``pgolf-pack RUN_DIR --out FOLDER``: a submission folder in the challenge's records layout from a finished run.

The folder (name it like ``records/track_10min_16mb/<date>_<name>``) gets:

- ``train_gpt.py``: the self-contained, compressed program (:mod:`pgolf.quant.bundle`); it needs only torch,
  triton, numpy, sentencepiece and brotli, reads ``DATA_PATH`` / ``TOKENIZER_PATH`` / ``SEED`` / ... from the
  environment, and reproduces the run's training, quantization and evaluation. Its size is ``bytes_code``.
- ``train_gpt_readable.py``: the same program uncompressed, for reading (not counted);
- the run's artifact (``final_model.pgq``), its log (``train_seed<seed>.log``) and ``summary.json``;
- ``submission.json`` (name, author, github_id, blurb, date, val_loss, val_bpb, bytes_total, bytes_model,
  bytes_code, ...) and ``README.md`` with the results table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pgolf.quant.size import BUDGET_BYTES


def pack(run_dir: str | Path, out: str | Path, *, name: str | None = None, author: str = "<your name>",
         github_id: str = "<your github id>", blurb: str | None = None, force: bool = False) -> dict[str, Any]:
    """Write the submission folder; returns the submission.json dict."""
    from pgolf.quant.artifact import read_header
    from pgolf.quant.bundle import build_train_gpt, sources_digest
    from pgolf.quant.size import artifact_size_table, format_size_table
    from pgolf.utils import atomic_write_json, atomic_write_text

    run_dir, out = Path(run_dir), Path(out)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found: RUN_DIR must be a finished pgolf run (runs/<run_id>)")
    s = json.loads(summary_path.read_text(encoding="utf-8"))
    art = s.get("artifact")
    if not art:
        raise ValueError(f"the run in {run_dir} wrote no artifact (quant_method was 'none'); nothing to pack")
    art_path = Path(art["path"])
    if not art_path.is_file():
        art_path = run_dir / Path(art["path"]).name
    if not art_path.is_file():
        raise FileNotFoundError(f"the run's artifact {art['path']} is missing")
    blob = art_path.read_bytes()
    read_header(blob, source=str(art_path))  # checks magic, version, length and checksum
    wrapped, readable = build_train_gpt(s["config"], s["model"])
    bytes_code = len(wrapped.encode("utf-8"))
    bytes_model = len(blob)
    total = bytes_model + bytes_code
    if total > BUDGET_BYTES and not force:
        raise ValueError(f"the submission would be {total:,} bytes (model {bytes_model:,} + code {bytes_code:,}), "
                         f"{total - BUDGET_BYTES:,} over {BUDGET_BYTES:,}; re-quantize with a larger k or fewer "
                         f"bits (see the run's size table), or pass --force")
    digest = sources_digest()
    notes = []
    if art.get("code_digest") and art["code_digest"] != digest:
        notes.append("the pgolf sources changed since this run was trained: train_gpt.py embeds the current "
                     "sources, so its results may differ from the run's")
    if art.get("bytes_code") and art["bytes_code"] != bytes_code:
        notes.append(f"the run counted {art['bytes_code']:,} code bytes; the packed train_gpt.py has {bytes_code:,}")

    seed = s["config"].get("seed")
    date = time.strftime("%Y-%m-%d")
    name = name or f"pgolf_{s['preset']}"
    sliding = art.get("sliding") or {}
    sub = {
        "name": name, "author": author, "github_id": github_id,
        "blurb": blurb or f"pgolf {s['preset']} preset: {s['params']:,} params, GPTQ + SDClip artifact "
                          f"({art.get('layout', 'int8')} layout, brotli-11), {s['steps']} steps",
        "date": date, "val_loss": art["val_loss"], "val_bpb": art["val_bpb"],
        "val_bpb_sliding": sliding.get("val_bpb"), "pre_quant_val_bpb": s["val_bpb"],
        "bytes_total": total, "bytes_model": bytes_model, "bytes_code": bytes_code,
        "steps": s["steps"], "train_time_s": round(s["train_time_ms"] / 1000, 3),
        "calibration_s": s.get("calibration_s"), "seed": seed, "world_size": s.get("world_size"),
        "device": s.get("device"), "torch": s.get("torch"), "preset": s["preset"], "params": s["params"],
        "run_id": s.get("run_id"), "pgolf_sources_sha256": digest,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "train_gpt.py", wrapped)
    atomic_write_text(out / "train_gpt_readable.py", readable)
    shutil.copyfile(art_path, out / art_path.name)
    log = run_dir / "train.log"
    if log.is_file():
        shutil.copyfile(log, out / f"train_seed{seed}.log")
    shutil.copyfile(summary_path, out / "summary.json")
    atomic_write_json(out / "submission.json", sub)
    table = format_size_table(artifact_size_table(blob), bytes_code)
    atomic_write_text(out / "README.md", _readme(sub, s, art, table, art_path.name, notes))
    return sub


def _readme(sub: dict, s: dict, art: dict, table: str, art_name: str, notes: list[str]) -> str:
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
    lines = [f"# {sub['name']}", "", sub["blurb"], "", "| | |", "|---|---|"]
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
    ap.add_argument("--force", action="store_true", help="pack even when over the 16,000,000-byte budget")
    args = ap.parse_args(argv)
    try:
        sub = pack(args.run_dir, args.out, name=args.name, author=args.author, github_id=args.github_id,
                   blurb=args.blurb, force=args.force)
    except (ValueError, FileNotFoundError) as e:
        print(f"pgolf-pack: error: {e}", file=sys.stderr)
        return 1
    print(f"packed {args.run_dir} -> {args.out}: val_bpb {sub['val_bpb']:.6f}, bytes_total {sub['bytes_total']:,} "
          f"(model {sub['bytes_model']:,} + code {sub['bytes_code']:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
