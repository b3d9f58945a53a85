"""Token shards in the challenge's binary format: read, write, find and load them.

A shard is a 1024-byte header of 256 little-endian int32 ``[MAGIC, VERSION, N, 0, ...]`` followed by N
little-endian uint16 tokens, so its size is exactly ``1024 + 2 N`` bytes. :func:`read_shard` checks all of
that (and, given the vocab size, that every id is below it: the loaders and the validation loader check each
shard as they first read it) and raises :class:`ShardError` naming the file, the position and the fix. Helpers:
:func:`write_shard` (atomic), :func:`shard_num_tokens` (header only), :func:`find_shards` (``fineweb_{split}_*.bin``
without the ``_bytes_`` sidecars), :func:`load_tokens` and :func:`load_validation_tokens` (int64 torch tensors, the
latter truncated to a whole number of sequences + 1), and :func:`load_byte_sidecar` (the per-token byte counts
of a CaseOps-style validation set, checked against its shards).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from pgolf.errors import InputError, MissingInputError
from pgolf.utils import atomic_write_bytes

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = 1024
MAX_TOKEN = 65535
MAX_TOKENS_PER_SHARD = 2**31 - 1

PathLike = str | os.PathLike


class ShardError(InputError):
    """A shard file (or the tokens meant for one) is malformed; the message names the file and the fix."""


def write_shard(path: PathLike, tokens) -> Path:
    """Write ``tokens`` (any 1-D integer array-like, values in [0, 65535]) as a shard at ``path``, atomically.

    Returns the path. Raises ShardError for a non-1-D or non-integer input or an out-of-range value.
    """
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.size == 0:
        arr = arr.reshape(-1).astype(np.int64)
    if arr.ndim != 1:
        raise ShardError(f"{path}: tokens must be a 1-D array, got shape {arr.shape}; flatten them first")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ShardError(f"{path}: tokens must be integers, got dtype {arr.dtype}; convert the token ids to ints")
    n = int(arr.shape[0])
    if n > MAX_TOKENS_PER_SHARD:
        raise ShardError(f"{path}: {n} tokens do not fit one shard (max {MAX_TOKENS_PER_SHARD}); cut them into "
                         f"several shards")
    if n:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > MAX_TOKEN:
            bad = int(np.flatnonzero((arr < 0) | (arr > MAX_TOKEN))[0])
            raise ShardError(f"{path}: token {int(arr[bad])} at position {bad} is outside [0, {MAX_TOKEN}]; "
                             f"shards store uint16 ids, so the vocab must be at most 65536")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, n
    return atomic_write_bytes(path, header.tobytes() + arr.astype("<u2").tobytes())


def _checked_num_tokens(path: Path) -> int:
    """Validate the header and exact file size of ``path``; return N. Raises MissingInputError / ShardError."""
    if not path.is_file():
        raise MissingInputError(f"shard {path} does not exist (or is not a file); check the data path")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header; the file is "
                         f"truncated or not a shard, re-download or re-export it")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, n = int(header[0]), int(header[1]), int(header[2])
    if magic != MAGIC:
        raise ShardError(f"{path}: bad magic {magic} (expected {MAGIC}); this is not a token shard in the "
                         f"challenge format")
    if version != VERSION:
        raise ShardError(f"{path}: unsupported shard version {version} (expected {VERSION}); re-export it with "
                         f"this version of pgolf.data.prepare")
    if n < 0:
        raise ShardError(f"{path}: negative token count {n} in the header; the file is corrupt, re-export it")
    expected = HEADER_BYTES + 2 * n
    if size < expected:
        raise ShardError(f"{path}: truncated: the header says {n} tokens ({expected} bytes) but the file has only "
                         f"{size} bytes; re-download or re-export it")
    if size > expected:
        raise ShardError(f"{path}: trailing bytes: the header says {n} tokens ({expected} bytes) but the file has "
                         f"{size} bytes ({size - expected} extra); the file is corrupt, re-export it")
    return n


def shard_num_tokens(path: PathLike) -> int:
    """Number of tokens N of the shard at ``path`` (header and exact size validated; no token is read)."""
    return _checked_num_tokens(Path(path))


def read_shard(path: PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Tokens of the shard at ``path`` as a read-only uint16 array of shape (N,) (memory-mapped).

    With ``vocab_size`` every id must be < vocab_size, else ShardError naming the id, its position and the vocab.
    """
    path = Path(path)
    n = _checked_num_tokens(path)
    if n == 0:
        tokens = np.zeros(0, dtype=np.uint16)
        tokens.flags.writeable = False
    else:
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
    if vocab_size is not None and n:
        if int(vocab_size) <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if int(tokens.max()) >= vocab_size:
            pos = int(np.argmax(tokens >= vocab_size))
            raise ShardError(f"{path}: token id {int(tokens[pos])} at position {pos} is >= the vocab size "
                             f"{vocab_size}; the shard was made with a different (larger) tokenizer, use the "
                             f"matching tokenizer and model vocab or re-export the data")
    return tokens


def find_shards(data_path: PathLike, split: str) -> list[Path]:
    """Sorted ``fineweb_{split}_*.bin`` files in directory ``data_path``, without ``fineweb_{split}_bytes_*``.

    Raises MissingInputError naming the directory and the pattern when the folder is missing or nothing matches.
    """
    data_path = Path(data_path)
    pattern = f"fineweb_{split}_*.bin"
    if data_path.exists() and not data_path.is_dir():
        raise InputError(f"data path {data_path} is a file; pass the folder that holds the {pattern} shards")
    if not data_path.is_dir():
        raise MissingInputError(f"data directory {data_path} does not exist; expected shards named {pattern} in it "
                                f"(run `python -m pgolf.data.prepare` or build the synthetic corpus)")
    sidecar = f"fineweb_{split}_bytes_"
    files = sorted(p for p in data_path.glob(pattern) if p.is_file() and not p.name.startswith(sidecar))
    if not files:
        raise MissingInputError(f"no shards matching {pattern} in {data_path}; check the directory and split name "
                                f"(run `python -m pgolf.data.prepare` to make them)")
    return files


def _as_file_list(files: PathLike | Iterable[PathLike]) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    out = [Path(f) for f in files]
    if not out:
        raise ValueError("no shard files were given; use find_shards(data_path, split) to list them")
    return out


def load_tokens(files: PathLike | Sequence[PathLike], vocab_size: int | None = None) -> torch.Tensor:
    """Concatenated tokens of ``files`` (in the given order) as an int64 tensor of shape (sum N,)."""
    paths = _as_file_list(files)
    arrays = [read_shard(p, vocab_size) for p in paths]
    out = torch.empty(sum(int(a.shape[0]) for a in arrays), dtype=torch.int64)
    view = out.numpy()
    pos = 0
    for a in arrays:
        view[pos:pos + a.shape[0]] = a
        pos += a.shape[0]
    return out


def load_validation_tokens(files: PathLike | Sequence[PathLike], seq_len: int,
                           vocab_size: int | None = None) -> torch.Tensor:
    """Validation tokens, int64 of shape (floor((n-1)/seq_len)*seq_len + 1,): whole sequences plus one target.

    Raises ShardError when the files hold fewer than seq_len + 1 tokens.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    paths = _as_file_list(files)
    tokens = load_tokens(paths, vocab_size)
    n = int(tokens.numel())
    if n < seq_len + 1:
        raise ShardError(f"validation shards {[str(p) for p in paths]} hold {n} tokens, fewer than seq_len + 1 = "
                         f"{seq_len + 1}; use a shorter seq_len or more validation data")
    usable = ((n - 1) // seq_len) * seq_len
    return tokens[:usable + 1]


def load_byte_sidecar(val_files: Sequence[PathLike], n_tokens: int) -> torch.Tensor | None:
    """Bytes of each validation token from the ``fineweb_val_bytes_*.bin`` sidecar, int32 of shape (n_tokens,), or
    None when the folder of ``val_files`` holds no sidecar.

    A tokenizer that rewrites the text before encoding (the CaseOps records' case-control symbols) cannot count
    the original bytes from its pieces, so its data ships, beside each ``fineweb_val_<k>.bin``, a
    ``fineweb_val_bytes_<k>.bin`` shard holding the original UTF-8 byte count of every token (the target at stream
    position j counts ``sidecar[j]`` bytes). The sidecar must pair with the shards one to one, each file as long as
    its shard; anything else is a ShardError naming the file, since scoring against a misaligned sidecar would
    give a wrong val_bpb without any sign of it. ``n_tokens``: the validation tokens in use (a prefix of the
    shards' concatenation).
    """
    paths = _as_file_list(val_files)
    folder = paths[0].parent
    present = sorted(p for p in folder.glob("fineweb_val_bytes_*.bin") if p.is_file())
    if not present:
        return None
    pairs = [(p, p.with_name(p.name.replace("fineweb_val_", "fineweb_val_bytes_", 1))) for p in paths]
    unpaired = sorted(set(present) - {s for _, s in pairs})
    if unpaired:
        raise ShardError(f"byte sidecar {unpaired[0]} has no validation shard of the same number in {folder}; the "
                         f"sidecar files must be exactly fineweb_val_bytes_<k>.bin for each fineweb_val_<k>.bin")
    for shard, side in pairs:
        if not side.is_file():
            raise ShardError(f"{folder} holds byte sidecar files but not {side.name} for {shard.name}; copy the "
                             f"whole sidecar (fineweb_val_bytes_*.bin) or remove it to count bytes from the tokenizer")
        n_shard, n_side = shard_num_tokens(shard), shard_num_tokens(side)
        if n_shard != n_side:
            raise ShardError(f"byte sidecar {side} has {n_side:,} entries but {shard.name} has {n_shard:,} tokens; "
                             f"the sidecar belongs to other shards, re-export both together")
    counts = load_tokens([s for _, s in pairs])
    if counts.numel() < n_tokens:
        raise ValueError(f"n_tokens {n_tokens} exceeds the {counts.numel()} tokens of the validation shards")
    return counts[:n_tokens].to(torch.int32)
