"""Tokenizer byte accounting and the exact bits-per-byte formula of the challenge.

For a scored pair (previous token p, target y) the counted bytes are
``base_bytes[y] + (has_space[y] and not is_boundary[p])``, and
``val_bpb = Σ nll / (ln 2 · Σ bytes)`` with both sums in float64.

Also: :class:`Tokenizer`, a thin SentencePiece wrapper with clear errors and a fingerprint (the SHA-256 of the model
file and its vocab size, recorded by the artifact and checked when the artifact is scored, so a different tokenizer
with the same vocab size cannot score it silently), :func:`build_byte_tables` (the per-token tables above from a
SentencePiece model) and :func:`normalize_text` (text after the tokenizer's normalizer, i.e. what the byte counts
measure).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from pgolf.errors import InputError, MismatchError, MissingInputError


@dataclass(frozen=True)
class ByteTables:
    """Per-token lookup tables over the vocab (all shape (V,)), and optionally the byte sidecar of the validation
    stream.

    base_bytes: int16 UTF-8 bytes of the piece without its leading '▁' (1 for byte pieces, 0 for control/unk/unused).
    has_space: bool, the piece starts with '▁'. is_boundary: bool, control/unknown/unused (BOS is a boundary).
    sidecar: int32 (N + 1,) bytes of each token of the validation stream (:func:`pgolf.data.shards.load_byte_sidecar`)
    or None. With a sidecar the tables are not used for counting: the target at stream position j counts
    ``sidecar[j]`` bytes, so counting needs the targets' positions.
    """

    base_bytes: Tensor
    has_space: Tensor
    is_boundary: Tensor
    sidecar: Tensor | None = None

    def to(self, device) -> "ByteTables":
        side = None if self.sidecar is None else self.sidecar.to(device)
        return ByteTables(self.base_bytes.to(device), self.has_space.to(device), self.is_boundary.to(device), side)

    def with_sidecar(self, sidecar: Tensor | None) -> "ByteTables":
        """These tables counting from ``sidecar`` (None: from the tables)."""
        return replace(self, sidecar=sidecar)

    @property
    def vocab_size(self) -> int:
        return int(self.base_bytes.numel())

    def check_stream(self, n_tokens: int) -> None:
        """ValueError unless a sidecar (if any) covers exactly the ``n_tokens`` of the stream being scored."""
        if self.sidecar is not None and self.sidecar.numel() != n_tokens:
            raise ValueError(f"the byte sidecar covers {self.sidecar.numel()} tokens but the scored stream has "
                             f"{n_tokens}: score the stream the sidecar was loaded for")

    @property
    def source(self) -> str:
        """Where the counted bytes come from, for logs and results: 'sidecar' or 'tokenizer'."""
        return "tokenizer" if self.sidecar is None else "sidecar"


def count_bytes(prev: Tensor, target: Tensor, tables: ByteTables, positions: Tensor | None = None) -> Tensor:
    """Counted bytes of each (prev, target) pair. prev, target: int tensors of one shape → int64 of that shape.

    positions: the targets' positions in the validation stream (same shape); needed, and only read, when the
    tables count from a byte sidecar.
    """
    t = tables.to(target.device)
    if t.sidecar is not None:
        if positions is None:
            raise ValueError("these byte tables count from a byte sidecar: pass the targets' stream positions")
        return t.sidecar[positions].to(torch.int64)
    extra = t.has_space[target] & ~t.is_boundary[prev]
    return t.base_bytes[target].to(torch.int64) + extra.to(torch.int64)


def bits_per_byte(nll_sum: float, byte_count: float) -> float:
    """val_bpb = Σ nll (nats) / (ln 2 · Σ bytes)."""
    if byte_count <= 0:
        raise ValueError("no bytes were scored; the evaluation set is empty or all targets are control tokens")
    return float(nll_sum) / (math.log(2.0) * float(byte_count))


SPACE_PIECE = "\u2581"  # '▁', SentencePiece's whitespace marker


def _processor(sp_or_tokenizer):
    return sp_or_tokenizer.sp if isinstance(sp_or_tokenizer, Tokenizer) else sp_or_tokenizer


def build_byte_tables(sp, vocab_size: int | None = None) -> ByteTables:
    """ByteTables of a ``sentencepiece.SentencePieceProcessor``; size max(sp vocab, vocab_size).

    Every id starts as a boundary with 0 bytes (so ids beyond the tokenizer's vocab are inert). Ids that are
    not control/unknown/unused are not boundaries; byte pieces count 1 byte; other pieces lose one leading
    '▁' (setting has_space) and count the UTF-8 bytes of the rest. Raises ValueError when '▁' is not a piece.
    """
    n_sp = int(sp.get_piece_size())
    size = max(n_sp, int(vocab_size or 0))
    space_id = sp.piece_to_id(SPACE_PIECE)
    if not (0 <= space_id < n_sp) or sp.id_to_piece(space_id) != SPACE_PIECE:
        raise ValueError(f"tokenizer has no '{SPACE_PIECE}' (U+2581) piece of its own, so spaces cannot be "
                         f"counted the way the challenge counts them; train it with the challenge settings "
                         f"(pgolf.data.prepare.train_tokenizer)")
    base = torch.zeros(size, dtype=torch.int16)
    has_space = torch.zeros(size, dtype=torch.bool)
    boundary = torch.ones(size, dtype=torch.bool)
    for i in range(n_sp):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_PIECE):
            has_space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTables(base, has_space, boundary)


def normalize_text(sp_or_tokenizer, text: str) -> str:
    """``text`` after the tokenizer's normalizer (NFKC, whitespace collapsing), with '▁' shown as ' '.

    Uses ``sp.normalize`` when the installed sentencepiece has it, else decode(encode(text)) (exact for
    byte-fallback models). Its UTF-8 length is what the byte tables count for the document.
    """
    sp = _processor(sp_or_tokenizer)
    if hasattr(sp, "normalize"):
        return sp.normalize(text).replace(SPACE_PIECE, " ")
    return sp.decode(sp.encode(text))


class Tokenizer:
    """A SentencePiece model loaded from ``model_path``: encode/decode, vocab checks and byte tables.

    Raises MissingInputError when the file is missing and InputError when it is not a SentencePiece model.
    """

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(model_path)
        if not self.path.is_file():
            what = "is a folder" if self.path.is_dir() else "does not exist"
            raise MissingInputError(f"tokenizer model {self.path} {what}; pass the .model file of a SentencePiece "
                                    f"tokenizer (e.g. data/tokenizers/fineweb_1024_bpe.model)")
        sp = spm.SentencePieceProcessor()
        try:
            ok = sp.Load(str(self.path))
        except (RuntimeError, OSError, UnicodeError) as e:
            raise InputError(f"{self.path} is not a SentencePiece model ({e}); pass a .model file, not the "
                             f".vocab listing or another file") from None
        if ok is False or sp.get_piece_size() <= 0:
            raise InputError(f"{self.path} could not be loaded as a SentencePiece model; pass a .model file")
        self.sp = sp

    @property
    def vocab_size(self) -> int:
        """Number of ids of the model."""
        return int(self.sp.get_piece_size())

    @property
    def bos_id(self) -> int:
        """Id of the BOS control token (1 for the challenge tokenizers; -1 when the model has none)."""
        return int(self.sp.bos_id())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text of ``texts``."""
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        """Text of the ids (a list, numpy array or 1-D tensor); control ids decode to nothing."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.sp.decode([int(i) for i in ids])

    def byte_tables(self, vocab_size: int | None = None) -> ByteTables:
        """:func:`build_byte_tables` of this model, sized max(vocab_size, model vocab)."""
        try:
            return build_byte_tables(self.sp, vocab_size)
        except ValueError as e:
            raise InputError(f"{self.path}: {e}") from None

    def validation_tables(self, vocab_size: int, val_files, n_tokens: int) -> ByteTables:
        """The byte tables for scoring ``n_tokens`` validation tokens read from ``val_files``: counting from the
        shards' byte sidecar when they have one (:func:`pgolf.data.shards.load_byte_sidecar`), else from the pieces.

        MissingInputError for a tokenizer that rewrites the text it encodes (pieces with private-use control
        symbols, as CaseOps' case markers) when there is no sidecar: its pieces do not spell the original bytes.
        """
        from pgolf.data.shards import load_byte_sidecar

        side = load_byte_sidecar(val_files, n_tokens)
        marked = self.control_symbol_pieces()
        if side is None and marked:
            folder = Path(list(val_files)[0]).parent
            raise MissingInputError(
                f"tokenizer {self.path} encodes rewritten text ({len(marked)} pieces hold private-use control "
                f"symbols, e.g. {self.sp.id_to_piece(marked[0])!r}: a CaseOps-style tokenizer), so its pieces do not "
                f"give the original bytes and val_bpb needs the byte sidecar; put fineweb_val_bytes_*.bin (one per "
                f"fineweb_val_*.bin) in {folder}")
        return self.byte_tables(vocab_size).with_sidecar(side)

    def control_symbol_pieces(self) -> list[int]:
        """Ids of the pieces holding a Unicode private-use character (U+E000-U+F8FF), the control symbols a
        text-rewriting tokenizer (CaseOps) inserts; empty for the challenge's tokenizers."""
        return [i for i in range(self.vocab_size)
                if any("\ue000" <= c <= "\uf8ff" for c in self.sp.id_to_piece(i))]

    def fingerprint(self) -> dict[str, Any]:
        """{'sha256': hex digest of the model file, 'vocab_size', 'file': its name}: what an artifact records."""
        return {"sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(), "vocab_size": self.vocab_size,
                "file": self.path.name}

    def check_fingerprint(self, expected: Mapping[str, Any], *, source: str) -> None:
        """Raise MismatchError unless this model is the one ``expected`` (a :meth:`fingerprint` that ``source``,
        e.g. an artifact, recorded) describes."""
        mine = self.fingerprint()
        if mine["sha256"] != expected.get("sha256") or mine["vocab_size"] != expected.get("vocab_size"):
            raise MismatchError(
                f"tokenizer mismatch: {source} was made with {expected.get('file', '?')} (vocab "
                f"{expected.get('vocab_size')}, sha256 {str(expected.get('sha256'))[:16]}...) but the tokenizer given "
                f"is {self.path} (vocab {mine['vocab_size']}, sha256 {mine['sha256'][:16]}...); its val_bpb would be "
                f"meaningless. Pass the tokenizer the data and the model were made with")

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise MismatchError unless the model's vocab equals this tokenizer's vocab."""
        if int(model_vocab_size) != self.vocab_size:
            raise MismatchError(f"tokenizer {self.path} has vocab {self.vocab_size} but the model expects "
                             f"{model_vocab_size}; use the tokenizer the data and model were made with "
                             f"(or set the model's vocab_size to {self.vocab_size})")

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
