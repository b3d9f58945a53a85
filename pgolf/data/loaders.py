"""Training data loaders of the record stack (all return CPU int64 tensors; the trainer moves them to the GPU).

- :class:`SequentialLoader` (R0/R1): one token stream over the shards with wraparound; each step takes
  ``world_size * (local_tokens + 1)`` contiguous tokens and rank r keeps the r-th slice.
- :class:`ShuffledLoader` (R2/R3, GPTQ calibration): rank r owns shards r, r+W, ...; each shard gets a random
  phase and a random order of its (seq_len+1)-token windows, and every sequence draws its shard with probability
  proportional to the windows that shard has left; all shards are reshuffled when every window is used.
- :class:`DocumentPackedLoader` (R4-R6): the sequential stream starting at the first BOS, one packed row per
  rank with ``cu_seqlens`` at document starts (padded to a multiple of ``cu_multiple`` entries). Long documents
  are not split here: the model cuts attention every ``max_seqlen`` tokens itself, so that its token shifts
  (SmearGate, BigramHash) can follow the document across the cut as the records' do.
  :func:`cu_seqlens_from_tokens` is the shared helper.

Given ``vocab_size``, every loader checks each shard's token ids against it when it first reads the shard (a
:class:`pgolf.data.shards.ShardError` naming the file and the position, instead of an index error on the device).
Every loader has ``state_dict()`` / ``load_state_dict(d)`` (plain ints, lists and tensors, safe for
``torch.load(weights_only=True)``) so a trainer can rewind it. Helpers: ``_TokenStream`` (the wraparound
stream with lazy per-shard memory maps).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from pgolf.data.shards import read_shard, shard_num_tokens
from pgolf.errors import InputError

PathLike = str | os.PathLike


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def _file_list(files: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    out = [Path(f) for f in files]
    if not out:
        raise ValueError("no shard files were given; use pgolf.data.shards.find_shards(data_path, 'train')")
    return out


def _check_kind(d: dict, kind: str) -> None:
    if d.get("kind") != kind:
        raise ValueError(f"state dict is for a {d.get('kind')!r} loader, not {kind!r}; load it into the same "
                         f"kind of loader that saved it")


class _TokenStream:
    """Endless stream over ``files`` in the given order (wraparound), reading one shard at a time via memmap."""

    def __init__(self, files: list[Path], vocab_size: int | None = None):
        self.files = files
        self.vocab_size = vocab_size
        self.lengths = [shard_num_tokens(f) for f in files]
        if sum(self.lengths) == 0:
            raise InputError(f"all {len(files)} shards are empty (first: {files[0]}); nothing to stream")
        self.file_idx = 0
        self.pos = 0
        self._cache: tuple[int, np.ndarray] | None = None

    def _tokens(self, idx: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != idx:
            self._cache = (idx, read_shard(self.files[idx], self.vocab_size))
        return self._cache[1]

    def _walk(self, n: int, out: np.ndarray | None) -> None:
        done = 0
        while done < n:
            avail = self.lengths[self.file_idx] - self.pos
            if avail <= 0:
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.pos = 0
                continue
            k = min(n - done, avail)
            if out is not None:
                out[done:done + k] = self._tokens(self.file_idx)[self.pos:self.pos + k]
            self.pos += k
            done += k

    def take(self, n: int) -> Tensor:
        """The next n tokens as int64 (n,)."""
        out = torch.empty(n, dtype=torch.int64)
        self._walk(n, out.numpy())
        return out

    def skip(self, n: int) -> None:
        """Advance by n tokens without reading them."""
        self._walk(n, None)

    def seek_first(self, token_id: int) -> None:
        """Move to the first occurrence of ``token_id`` in the stream (from the very start)."""
        for idx, f in enumerate(self.files):
            if self.lengths[idx] == 0:
                continue
            hits = np.flatnonzero(self._tokens(idx) == token_id)
            if hits.size:
                self.file_idx, self.pos = idx, int(hits[0])
                return
        raise InputError(f"no BOS token (id {token_id}) in any of the {len(self.files)} shards (first: "
                         f"{self.files[0]}); document packing needs BOS-separated documents, check bos_id")

    def state(self) -> dict:
        return {"file_idx": self.file_idx, "pos": self.pos, "num_files": len(self.files)}

    def load(self, d: dict) -> None:
        if int(d["num_files"]) != len(self.files):
            raise ValueError(f"state dict was saved with {d['num_files']} shards but this loader has "
                             f"{len(self.files)}; rewind with the same shard list")
        idx, pos = int(d["file_idx"]), int(d["pos"])
        if not (0 <= idx < len(self.files) and 0 <= pos <= self.lengths[idx]):
            raise ValueError(f"state dict position (file {idx}, token {pos}) is outside the shards")
        self.file_idx, self.pos = idx, pos


class SequentialLoader:
    """R0 loader: one stream over ``files`` in the given order (pass ``find_shards`` output for sorted order).

    ``next_batch(local_tokens, seq_len)`` takes ``world_size * (local_tokens + 1)`` contiguous tokens; rank r keeps
    slice ``[r*(local+1), (r+1)*(local+1))`` and returns x = slice[:-1], y = slice[1:], each int64
    (local_tokens // seq_len, seq_len). local_tokens must be a multiple of seq_len.
    """

    def __init__(self, files: PathLike | Sequence[PathLike], rank: int = 0, world_size: int = 1, *,
                 vocab_size: int | None = None):
        _check_rank(rank, world_size)
        self.rank, self.world_size = rank, world_size
        self.stream = _TokenStream(_file_list(files), vocab_size)

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        """(x, y), each int64 (local_tokens // seq_len, seq_len)."""
        if seq_len <= 0 or local_tokens <= 0 or local_tokens % seq_len:
            raise ValueError(f"local_tokens ({local_tokens}) must be a positive multiple of seq_len ({seq_len})")
        span = local_tokens + 1
        self.stream.skip(self.rank * span)
        chunk = self.stream.take(span)
        self.stream.skip((self.world_size - 1 - self.rank) * span)
        return chunk[:-1].reshape(-1, seq_len), chunk[1:].reshape(-1, seq_len)

    def state_dict(self) -> dict:
        """Stream position: {'kind', 'file_idx', 'pos', 'num_files'}."""
        return {"kind": "sequential", **self.stream.state()}

    def load_state_dict(self, d: dict) -> None:
        """Rewind to a position saved by :meth:`state_dict`."""
        _check_kind(d, "sequential")
        self.stream.load(d)


class ShuffledLoader:
    """R2/R3 loader: random (seq_len+1)-token windows from the shards this rank owns (files[rank::world_size]).

    Per shard: phase ~ U[0, min(seq_len-1, n-seq_len-1)] (so at least one window fits), windows start at
    phase + k*seq_len for k < (n-1-phase)//seq_len, in a random order. Each sequence picks a shard with
    probability proportional to its windows left (an integer draw, so exact); when no window is left all
    shards are reshuffled. RNG: ``np.random.Generator(np.random.PCG64(seed * 1000003 + rank))`` (seed 0 gives
    the record's PCG64(rank)). ``next_batch(num_seqs)`` -> (x, y), each int64 (num_seqs, seq_len).
    """

    def __init__(self, files: PathLike | Sequence[PathLike], seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, *, vocab_size: int | None = None):
        _check_rank(rank, world_size)
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        all_files = _file_list(files)
        if world_size > len(all_files):
            raise InputError(f"{len(all_files)} shards cannot feed {world_size} ranks: rank r owns shards r, r+W, "
                             f"..., so rank {len(all_files)} and above would own none; use at least {world_size} "
                             f"shards (cut them smaller with prepare --shard-tokens) or fewer ranks")
        self.files = all_files[rank::world_size]
        self.seq_len, self.rank, self.world_size, self.seed = seq_len, rank, world_size, seed
        self.vocab_size = vocab_size
        self.lengths = [shard_num_tokens(f) for f in self.files]
        if all(n < seq_len + 1 for n in self.lengths):
            raise InputError(f"rank {rank}'s {len(self.files)} shards (first: {self.files[0]}) all hold fewer than "
                             f"seq_len + 1 = {seq_len + 1} tokens; use a shorter seq_len or bigger shards")
        self.rng = np.random.Generator(np.random.PCG64(seed * 1000003 + rank))
        self._maps: dict[int, np.ndarray] = {}
        self.orders: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(self.files)
        self.used = [0] * len(self.files)
        self.epoch = 0
        self._reshuffle()

    def _reshuffle(self) -> None:
        for i, n in enumerate(self.lengths):
            if n < self.seq_len + 1:
                self.orders[i], self.used[i] = np.zeros(0, dtype=np.int64), 0
                continue
            max_phase = min(self.seq_len - 1, n - self.seq_len - 1)
            phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
            count = (n - 1 - phase) // self.seq_len
            self.orders[i] = phase + self.rng.permutation(count).astype(np.int64) * self.seq_len
            self.used[i] = 0

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self._maps[i] = read_shard(self.files[i], self.vocab_size)
        return self._maps[i]

    def windows_left(self) -> list[int]:
        """Unused windows per owned shard in the current pass."""
        return [len(o) - u for o, u in zip(self.orders, self.used)]

    def next_batch(self, num_seqs: int) -> tuple[Tensor, Tensor]:
        """(x, y), each int64 (num_seqs, seq_len); row b is window w with x = w[:-1], y = w[1:]."""
        if num_seqs <= 0:
            raise ValueError(f"num_seqs must be positive, got {num_seqs}")
        buf = np.empty((num_seqs, self.seq_len + 1), dtype=np.int64)
        left = np.array(self.windows_left(), dtype=np.int64)
        for b in range(num_seqs):
            total = int(left.sum())
            if total == 0:
                self._reshuffle()
                self.epoch += 1
                left = np.array(self.windows_left(), dtype=np.int64)
                total = int(left.sum())
            k = int(self.rng.integers(total))
            i = int(np.searchsorted(np.cumsum(left), k, side="right"))
            start = int(self.orders[i][self.used[i]])
            self.used[i] += 1
            left[i] -= 1
            buf[b] = self._shard(i)[start:start + self.seq_len + 1]
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def state_dict(self) -> dict:
        """RNG state, per-shard window orders (int64 tensors) and how many of each are used."""
        return {"kind": "shuffled", "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "seq_len": self.seq_len, "epoch": self.epoch, "rng": self.rng.bit_generator.state,
                "orders": [torch.from_numpy(o.copy()) for o in self.orders], "used": list(self.used)}

    def load_state_dict(self, d: dict) -> None:
        """Rewind to a state saved by :meth:`state_dict` (same files, seq_len, rank and world size)."""
        _check_kind(d, "shuffled")
        for key in ("rank", "world_size", "seq_len"):
            if int(d[key]) != getattr(self, key):
                raise ValueError(f"state dict has {key}={d[key]} but this loader has {getattr(self, key)}")
        if len(d["orders"]) != len(self.files):
            raise ValueError(f"state dict has {len(d['orders'])} shards but this rank owns {len(self.files)}")
        self.rng.bit_generator.state = d["rng"]
        self.orders = [np.asarray(torch.as_tensor(o).numpy(), dtype=np.int64).copy() for o in d["orders"]]
        self.used = [int(u) for u in d["used"]]
        self.epoch = int(d["epoch"])


class PackedBatch(NamedTuple):
    """One packed row: x, y int64 (1, T); cu_seqlens int32 (K,) with K % cu_multiple == 0; max_seqlen int."""

    x: Tensor
    y: Tensor
    cu_seqlens: Tensor
    max_seqlen: int


def cu_seqlens_from_tokens(x_1d: Tensor, bos_id: int, max_seqlen: int | None, multiple: int) -> Tensor:
    """Document boundaries of a packed row x_1d (T,) as int32 (K,).

    [0] + positions p > 0 where x_1d[p] == bos_id + [T]; with ``max_seqlen`` (None: no split) segments longer
    than it are split every max_seqlen tokens from their start, as the records' loaders do; the result is
    padded by repeating T up to a multiple of ``multiple``.
    """
    if x_1d.dim() != 1:
        raise ValueError(f"x_1d must be 1-D, got shape {tuple(x_1d.shape)}")
    if (max_seqlen is not None and max_seqlen < 1) or multiple < 1:
        raise ValueError(f"max_seqlen ({max_seqlen}) and multiple ({multiple}) must be >= 1")
    t = int(x_1d.numel())
    if t == 0:
        raise ValueError("cannot build cu_seqlens for an empty row")
    x = x_1d.detach().to("cpu")
    bos = torch.nonzero(x == bos_id).flatten()
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), bos[bos > 0], torch.tensor([t])])
    lens = bounds[1:] - bounds[:-1]
    max_seqlen = max_seqlen or t
    pieces = (lens + max_seqlen - 1) // max_seqlen
    first = torch.cumsum(pieces, 0) - pieces
    k = torch.arange(int(pieces.sum()))
    starts = torch.repeat_interleave(bounds[:-1], pieces) + (k - torch.repeat_interleave(first, pieces)) * max_seqlen
    n = int(starts.numel()) + 1
    padded = -(-n // multiple) * multiple
    cu = torch.cat([starts, torch.full((padded - n + 1,), t, dtype=torch.int64)])
    return cu.to(torch.int32)


class DocumentPackedLoader:
    """R4-R6 loader: the sequential stream over all shards (wraparound) starting at the first BOS.

    Each step takes ``world_size * (local_tokens + 1)`` tokens; rank r keeps the r-th slice of local_tokens + 1
    and returns a :class:`PackedBatch` with x = slice[:-1], y = slice[1:] (each (1, local_tokens)) and
    cu_seqlens at the document starts (:func:`cu_seqlens_from_tokens`, unsplit); ``max_seqlen`` is the
    configured bound at which the model cuts attention inside a document (constant, so attention kernels
    compile once). On wraparound the stream restarts at shard 0, token 0.
    """

    def __init__(self, files: PathLike | Sequence[PathLike], rank: int = 0, world_size: int = 1,
                 max_seqlen: int = 2048, bos_id: int = 1, cu_multiple: int = 64, *,
                 vocab_size: int | None = None):
        _check_rank(rank, world_size)
        if max_seqlen < 1 or cu_multiple < 1:
            raise ValueError(f"max_seqlen ({max_seqlen}) and cu_multiple ({cu_multiple}) must be >= 1")
        self.rank, self.world_size = rank, world_size
        self.max_seqlen, self.bos_id, self.cu_multiple = max_seqlen, bos_id, cu_multiple
        self.stream = _TokenStream(_file_list(files), vocab_size)
        self.stream.seek_first(bos_id)

    def next_batch(self, local_tokens: int) -> PackedBatch:
        """PackedBatch(x (1, T), y (1, T), cu_seqlens int32 (K,), max_seqlen) with T = local_tokens."""
        if local_tokens <= 0:
            raise ValueError(f"local_tokens must be positive, got {local_tokens}")
        span = local_tokens + 1
        self.stream.skip(self.rank * span)
        chunk = self.stream.take(span)
        self.stream.skip((self.world_size - 1 - self.rank) * span)
        x, y = chunk[:-1], chunk[1:]
        cu = cu_seqlens_from_tokens(x, self.bos_id, None, self.cu_multiple)
        return PackedBatch(x.unsqueeze(0), y.unsqueeze(0), cu, self.max_seqlen)

    def state_dict(self) -> dict:
        """Stream position: {'kind', 'file_idx', 'pos', 'num_files'}."""
        return {"kind": "packed", **self.stream.state()}

    def load_state_dict(self, d: dict) -> None:
        """Rewind to a position saved by :meth:`state_dict`."""
        _check_kind(d, "packed")
        self.stream.load(d)
