"""Turn raw documents into challenge-format token shards: ``python -m pgolf.data.prepare``.

Each document becomes ``[BOS] + encode(text)`` (no EOS). The first ``num_val_docs`` documents form the
validation split, the rest the training split; each split's stream is cut into shards of ``shard_tokens``
tokens (the last one short) named ``fineweb_{val,train}_{idx:06d}.bin``, and a ``prepare_summary.json``
records files, token and document counts and the tokenizer's fingerprint. :func:`train_tokenizer` trains a
SentencePiece BPE model with the challenge's settings (deterministic: one thread, input order kept).

The output folder is built in a temp folder beside it and renamed into place only when every shard is written, so a
failure (a bad input line, a full disk, Ctrl-C) leaves the old folder as it was and never a mix of old and new
shards; an existing output folder (or ``--tokenizer-out`` model) is refused unless ``--force``. Every argument and
the input file are checked before any work, and every error names the flag or the file (no traceback).

Input files (:func:`read_documents`):
- ``.jsonl``: one JSON object per line with the text under ``text_key`` (default "text"); blank lines are
  skipped; a bad line is an error naming the file and the line number.
- ``.txt``: documents separated by one or more blank (whitespace-only) lines; a document's lines are joined
  with "\\n".

Example::

    python -m pgolf.data.prepare --input docs.jsonl --out data/mine --train-tokenizer --vocab-size 1024 \\
        --num-val-docs 1000
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pgolf.data.shards import ShardError, write_shard
from pgolf.data.tokenizer import Tokenizer
from pgolf.errors import ConfigError, InputError, MissingInputError, run_cli
from pgolf.utils import atomic_write_bytes, atomic_write_json, atomic_write_text, refuse_existing, staged_dir

MAX_VOCAB = 65536
ENCODE_BATCH = 256
INPUT_TYPES = (".jsonl", ".txt")


def read_documents(path: str | os.PathLike, text_key: str = "text") -> Iterator[str]:
    """Yield the documents of a ``.jsonl`` or ``.txt`` file (see the module docstring for the formats)."""
    path = check_input(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); each line "
                                     f"must be one JSON object like {{\"{text_key}\": \"...\"}}") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                    raise InputError(f"{path}:{lineno}: expected a JSON object with a string under "
                                     f"{text_key!r}; set --text-key to the key that holds the text")
                yield obj[text_key]
    elif suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            lines: list[str] = []
            for line in f:
                if line.strip():
                    lines.append(line.rstrip("\r\n"))
                elif lines:
                    yield "\n".join(lines)
                    lines = []
            if lines:
                yield "\n".join(lines)


def check_input(path: str | os.PathLike) -> Path:
    """``path`` as a Path after checking it is an existing .jsonl or .txt file (named errors)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"--input {path} {'is a folder' if path.is_dir() else 'does not exist'}; pass a "
                                f".jsonl or .txt file of documents")
    if path.suffix.lower() not in INPUT_TYPES:
        raise InputError(f"--input {path}: unsupported input type {path.suffix.lower()!r}; use .jsonl (one JSON "
                         f"object per line) or .txt (documents separated by blank lines)")
    return path


def train_tokenizer(docs: Iterable[str], vocab_size: int, model_prefix: str | os.PathLike,
                    max_sentences: int = 1_000_000) -> Path:
    """Train a SentencePiece BPE tokenizer on ``docs`` with the challenge's settings; return ``prefix.model``.

    Settings: bpe, byte_fallback, split_digits, nmt_nfkc, no dummy prefix, character_coverage 0.999, ids
    pad 0 / bos 1 / eos 2 / unk 3, soft vocab limit; deterministic (1 thread, no shuffling, first
    ``max_sentences`` docs) and quiet. SentencePiece skips documents longer than its default
    max_sentence_length (4192 bytes), as the challenge's trainer did. Writes ``.model`` and ``.vocab`` atomically.
    """
    import sentencepiece as spm

    if not 0 < vocab_size <= MAX_VOCAB:
        raise ConfigError(f"--vocab-size must be in [1, {MAX_VOCAB}] (shards store uint16 ids), got {vocab_size}")
    prefix = Path(model_prefix)
    buf = io.BytesIO()
    texts = (d for d in docs if d)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=texts, model_writer=buf, model_type="bpe", vocab_size=int(vocab_size),
            byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
            character_coverage=0.999, pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
            num_threads=1, shuffle_input_sentence=False, input_sentence_size=int(max_sentences),
            minloglevel=2)
    except RuntimeError as e:
        raise InputError(f"SentencePiece training for {prefix}.model failed: {e}") from None
    model_path = atomic_write_bytes(prefix.with_name(prefix.name + ".model"), buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    atomic_write_text(prefix.with_name(prefix.name + ".vocab"), vocab)
    return model_path


class _SplitWriter:
    """Accumulates one split's token stream and writes full shards of ``shard_tokens`` as they fill up."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.chunks: list[np.ndarray] = []
        self.buffered = 0
        self.files: list[Path] = []
        self.num_tokens = 0
        self.num_docs = 0
        self.num_bytes = 0

    def add(self, tokens: np.ndarray, raw_bytes: int) -> None:
        self.chunks.append(tokens)
        self.buffered += len(tokens)
        self.num_tokens += len(tokens)
        self.num_docs += 1
        self.num_bytes += raw_bytes
        if self.buffered >= self.shard_tokens:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.chunks:
            return
        stream = np.concatenate(self.chunks)
        start = 0
        while len(stream) - start >= self.shard_tokens or (final and start < len(stream)):
            piece = stream[start:start + self.shard_tokens]
            name = f"fineweb_{self.split}_{len(self.files):06d}.bin"
            self.files.append(write_shard(self.out_dir / name, piece))
            start += len(piece)
        rest = stream[start:]
        self.chunks = [rest] if len(rest) else []
        self.buffered = len(rest)

    def close(self) -> dict:
        self._flush(final=True)
        return {"files": [p.name for p in self.files], "num_tokens": self.num_tokens, "num_docs": self.num_docs,
                "num_raw_bytes": self.num_bytes}


def prepare(docs: Iterable[str], out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike,
            num_val_docs: int, shard_tokens: int = 100_000_000, *, force: bool = False) -> dict:
    """Tokenize ``docs`` into val/train shards in ``out_dir``; return (and write) the summary dict.

    Docs 0..num_val_docs-1 go to ``fineweb_val_*.bin``, the rest to ``fineweb_train_*.bin``; each doc is
    [BOS] + encode(text), streams are cut every ``shard_tokens`` tokens. The folder is built beside ``out_dir`` and
    renamed into place at the end; an existing ``out_dir`` is refused unless ``force`` (then replaced whole).
    Summary: {"tokenizer", "tokenizer_fingerprint", "vocab_size", "bos_id", "shard_tokens", "val": {...},
    "train": {...}} where each split has "files", "num_tokens", "num_docs", "num_raw_bytes" (UTF-8 bytes of the
    raw text).
    """
    tok = checked_tokenizer(tokenizer_path, num_val_docs, shard_tokens)
    with staged_dir(out_dir, force=force, what="prepared data folder") as tmp:
        return write_shards(docs, tmp, tok, num_val_docs, shard_tokens)


def checked_tokenizer(tokenizer_path: str | os.PathLike, num_val_docs: int, shard_tokens: int) -> Tokenizer:
    """The tokenizer, after checking it and the split settings can make shards (named errors)."""
    if num_val_docs < 0:
        raise ConfigError(f"--num-val-docs must be >= 0, got {num_val_docs}")
    if shard_tokens <= 0:
        raise ConfigError(f"--shard-tokens must be positive, got {shard_tokens}")
    tok = Tokenizer(tokenizer_path)
    if tok.vocab_size > MAX_VOCAB:
        raise ShardError(f"tokenizer {tok.path} has vocab {tok.vocab_size} > {MAX_VOCAB}; shards store uint16 ids, "
                         f"use a tokenizer with at most {MAX_VOCAB} pieces")
    if tok.bos_id < 0:
        raise InputError(f"tokenizer {tok.path} has no BOS id; train it with bos_id=1 (train_tokenizer does)")
    return tok


def write_shards(docs: Iterable[str], out: Path, tok: Tokenizer, num_val_docs: int, shard_tokens: int,
                 tokenizer_name: str | None = None) -> dict:
    """Write the shards and ``prepare_summary.json`` into the (fresh) folder ``out``; return the summary."""
    writers = {"val": _SplitWriter(out, "val", shard_tokens), "train": _SplitWriter(out, "train", shard_tokens)}
    it = iter(docs)
    index = 0
    while True:
        batch = list(itertools.islice(it, ENCODE_BATCH))
        if not batch:
            break
        for j, text in enumerate(batch):
            if not isinstance(text, str):
                raise InputError(f"document {index + j} is {type(text).__name__}, not str")
        for text, ids in zip(batch, tok.encode_batch(batch)):
            arr = np.empty(len(ids) + 1, dtype=np.uint16)
            arr[0] = tok.bos_id
            arr[1:] = ids
            writers["val" if index < num_val_docs else "train"].add(arr, len(text.encode("utf-8")))
            index += 1
    if index <= num_val_docs:
        raise InputError(f"only {index} documents but --num-val-docs {num_val_docs} leaves none for training; "
                         f"lower --num-val-docs or supply more documents")
    summary = {"tokenizer": tokenizer_name or str(tok.path), "tokenizer_fingerprint": tok.fingerprint(),
               "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "shard_tokens": int(shard_tokens)}
    for split, w in writers.items():
        summary[split] = w.close()
    atomic_write_json(out / "prepare_summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see ``--help``); prints the summary as JSON. Returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m pgolf.data.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help=".jsonl (one JSON object per line) or .txt (blank-line separated)")
    ap.add_argument("--out", required=True, help="output directory for the shards (refused if it exists)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer", help="an existing SentencePiece .model")
    src.add_argument("--train-tokenizer", action="store_true", help="train one on the training documents")
    ap.add_argument("--vocab-size", type=int, help="vocab of the trained tokenizer (with --train-tokenizer)")
    ap.add_argument("--tokenizer-out", help="model prefix for the trained tokenizer (default OUT/fineweb_{V}_bpe)")
    ap.add_argument("--max-sentences", type=int, default=1_000_000, help="docs used to train the tokenizer")
    ap.add_argument("--num-val-docs", type=int, default=50_000, help="first N documents form the val split")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    ap.add_argument("--text-key", default="text", help="JSON key of the text in .jsonl input")
    ap.add_argument("--force", action="store_true", help="replace an existing --out folder (and --tokenizer-out)")
    args = ap.parse_args(argv)
    if args.train_tokenizer and not args.vocab_size:
        ap.error("--train-tokenizer needs --vocab-size")
    if not args.train_tokenizer and (args.vocab_size or args.tokenizer_out):
        ap.error("--vocab-size / --tokenizer-out only apply with --train-tokenizer")
    return run_cli("pgolf.data.prepare", lambda: _prepare(args))


def _prepare(args: argparse.Namespace) -> int:
    check_input(args.input)
    if args.max_sentences < 1:
        raise ConfigError(f"--max-sentences must be >= 1, got {args.max_sentences}")
    if args.train_tokenizer and not 0 < args.vocab_size <= MAX_VOCAB:
        raise ConfigError(f"--vocab-size must be in [1, {MAX_VOCAB}] (shards store uint16 ids), got {args.vocab_size}")
    out = Path(args.out)
    refuse_existing(out, force=args.force, what="prepared data folder")
    if args.tokenizer_out:
        for ext in (".model", ".vocab"):
            refuse_existing(args.tokenizer_out + ext, force=args.force, what="tokenizer", flag="--tokenizer-out")
    if args.tokenizer:
        checked_tokenizer(args.tokenizer, args.num_val_docs, args.shard_tokens)
    with staged_dir(out, force=args.force, what="prepared data folder") as tmp:
        tokenizer, name = args.tokenizer, None
        if args.train_tokenizer:
            own = Path(args.tokenizer_out) if args.tokenizer_out else tmp / f"fineweb_{args.vocab_size}_bpe"
            train_docs = itertools.islice(read_documents(args.input, args.text_key), args.num_val_docs, None)
            tokenizer = train_tokenizer(train_docs, args.vocab_size, own, max_sentences=args.max_sentences)
            name = str(Path(args.tokenizer_out + ".model") if args.tokenizer_out else out / tokenizer.name)
        tok = checked_tokenizer(tokenizer, args.num_val_docs, args.shard_tokens)
        summary = write_shards(read_documents(args.input, args.text_key), tmp, tok, args.num_val_docs,
                               args.shard_tokens, tokenizer_name=name)
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
