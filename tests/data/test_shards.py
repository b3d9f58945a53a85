"""Shard format: exact bytes on disk, round trips, every validation error, discovery and loading."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf.data.shards import (HEADER_BYTES, MAGIC, VERSION, ShardError, find_shards, load_byte_sidecar,
                               load_tokens, load_validation_tokens, read_shard, shard_num_tokens, write_shard)


def _raw_shard(tokens, magic=MAGIC, version=VERSION, n=None) -> bytes:
    """An independent encoder of the format with struct (not numpy)."""
    n = len(tokens) if n is None else n
    header = struct.pack("<256i", magic, version, n, *([0] * 253))
    return header + struct.pack(f"<{len(tokens)}H", *tokens)


def test_write_matches_independent_encoding(tmp_path):
    toks = [1, 0, 65535, 7, 300, 1]
    write_shard(tmp_path / "a.bin", np.array(toks, dtype=np.int64))
    assert (tmp_path / "a.bin").read_bytes() == _raw_shard(toks)
    assert len(_raw_shard(toks)) == HEADER_BYTES + 2 * len(toks)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 65535), max_size=300))
def test_round_trip(tmp_path_factory, toks):
    path = tmp_path_factory.mktemp("rt") / "s.bin"
    write_shard(path, toks)
    got = read_shard(path)
    assert got.dtype == np.uint16 and got.shape == (len(toks),)
    assert got.tolist() == toks
    assert shard_num_tokens(path) == len(toks)


def test_reads_independently_written_file(tmp_path):
    toks = list(range(1000, 1100))
    (tmp_path / "x.bin").write_bytes(_raw_shard(toks))
    assert read_shard(tmp_path / "x.bin").tolist() == toks


@pytest.mark.parametrize("bad", [[-1], [65536], [3, 70000]])
def test_write_rejects_out_of_range(tmp_path, bad):
    with pytest.raises(ShardError, match="outside"):
        write_shard(tmp_path / "b.bin", bad)
    assert not (tmp_path / "b.bin").exists()


def test_write_rejects_bad_shapes_and_dtypes(tmp_path):
    with pytest.raises(ShardError, match="1-D"):
        write_shard(tmp_path / "c.bin", np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ShardError, match="integers"):
        write_shard(tmp_path / "c.bin", [1.5, 2.0])
    write_shard(tmp_path / "c.bin", torch.tensor([5, 6]))  # tensors are array-likes too
    assert read_shard(tmp_path / "c.bin").tolist() == [5, 6]


def test_truncated_and_trailing_are_distinguished(tmp_path):
    raw = _raw_shard(list(range(10)))
    (tmp_path / "short.bin").write_bytes(raw[:-2])
    (tmp_path / "long.bin").write_bytes(raw + b"\x00")
    with pytest.raises(ShardError, match="truncated") as e:
        read_shard(tmp_path / "short.bin")
    assert "short.bin" in str(e.value)
    with pytest.raises(ShardError, match="trailing bytes") as e:
        shard_num_tokens(tmp_path / "long.bin")
    assert "long.bin" in str(e.value)


def test_header_errors(tmp_path):
    (tmp_path / "tiny.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ShardError, match="header"):
        read_shard(tmp_path / "tiny.bin")
    (tmp_path / "magic.bin").write_bytes(_raw_shard([1, 2], magic=123))
    with pytest.raises(ShardError, match="magic"):
        read_shard(tmp_path / "magic.bin")
    (tmp_path / "ver.bin").write_bytes(_raw_shard([1, 2], version=2))
    with pytest.raises(ShardError, match="version"):
        read_shard(tmp_path / "ver.bin")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        read_shard(tmp_path / "missing.bin")


def test_vocab_check_names_file_id_position_and_vocab(tmp_path):
    toks = [1, 5, 9, 1023, 1024, 2000, 3]
    write_shard(tmp_path / "v.bin", toks)
    assert read_shard(tmp_path / "v.bin", vocab_size=2001).tolist() == toks
    with pytest.raises(ShardError) as e:
        read_shard(tmp_path / "v.bin", vocab_size=1024)
    msg = str(e.value)
    first_bad = next(i for i, t in enumerate(toks) if t >= 1024)
    assert "v.bin" in msg and f"token id {toks[first_bad]}" in msg and f"position {first_bad}" in msg
    assert "1024" in msg


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "e.bin", [])
    assert read_shard(tmp_path / "e.bin", vocab_size=10).shape == (0,)
    assert shard_num_tokens(tmp_path / "e.bin") == 0


def test_find_shards_sorted_and_without_sidecars(tmp_path):
    for name in ["fineweb_val_000001.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin",
                 "fineweb_train_000000.bin", "fineweb_val_000002.txt"]:
        write_shard(tmp_path / name, [1])
    assert [p.name for p in find_shards(tmp_path, "val")] == ["fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert [p.name for p in find_shards(tmp_path, "val_bytes")] == ["fineweb_val_bytes_000000.bin"]
    with pytest.raises(FileNotFoundError) as e:
        find_shards(tmp_path, "test")
    assert str(tmp_path) in str(e.value) and "fineweb_test_*.bin" in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope"):
        find_shards(tmp_path / "nope", "val")


def test_load_tokens_concatenates_in_order(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 65536, n) for n in (5, 0, 17)]
    files = [write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", p) for i, p in enumerate(parts)]
    got = load_tokens(files)
    assert got.dtype == torch.int64
    assert got.tolist() == np.concatenate(parts).tolist()
    with pytest.raises(ShardError, match="vocab"):
        load_tokens(files, vocab_size=int(np.concatenate(parts).max()))


@pytest.mark.parametrize("n,seq", [(11, 5), (10, 5), (12, 5), (6, 5), (100, 7)])
def test_load_validation_tokens_truncation(tmp_path, n, seq):
    toks = np.arange(n) % 997
    path = write_shard(tmp_path / "fineweb_val_000000.bin", toks)
    got = load_validation_tokens([path], seq)
    num_seqs = max(k for k in range(n + 1) if k * seq + 1 <= n)  # the largest whole number of sequences
    assert got.dtype == torch.int64 and got.tolist() == toks[:num_seqs * seq + 1].tolist()


def test_load_validation_tokens_too_short(tmp_path):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3, 4, 5])
    with pytest.raises(ShardError, match="fewer than seq_len"):
        load_validation_tokens([path], 5)


def test_real_shards_are_valid(shared_data: Path):
    for variant, vocab in (("fineweb10B_sp1024", 1024), ("fineweb10B_sp8192", 8192)):
        d = shared_data / "shards" / variant
        for split in ("val", "train"):
            (f,) = find_shards(d, split)
            toks = read_shard(f, vocab_size=vocab)
            assert toks.shape[0] == (f.stat().st_size - HEADER_BYTES) // 2 == shard_num_tokens(f)
            assert toks[0] == 1  # every exported split starts with a document's BOS


def _val_pair(folder: Path, k: int, tokens, counts=None) -> None:
    write_shard(folder / f"fineweb_val_{k:06d}.bin", tokens)
    if counts is not None:
        write_shard(folder / f"fineweb_val_bytes_{k:06d}.bin", counts)


def test_byte_sidecar_pairs_with_the_shards_and_is_cut_to_the_tokens_in_use(tmp_path):
    _val_pair(tmp_path, 0, [1, 5, 6, 7], [0, 3, 1, 4])
    _val_pair(tmp_path, 1, [1, 9, 9], [0, 2, 7])
    files = find_shards(tmp_path, "val")
    assert load_byte_sidecar(files, 7).tolist() == [0, 3, 1, 4, 0, 2, 7]
    side = load_byte_sidecar(files, 5)
    assert side.dtype == torch.int32 and side.tolist() == [0, 3, 1, 4, 0]


def test_no_byte_sidecar_is_none(tmp_path):
    _val_pair(tmp_path, 0, [1, 5, 6, 7])
    assert load_byte_sidecar(find_shards(tmp_path, "val"), 4) is None


@pytest.mark.parametrize("case,needle", [
    ("missing", "not fineweb_val_bytes_000001.bin"),
    ("short", "has 2 entries but fineweb_val_000001.bin has 3 tokens"),
    ("extra", "fineweb_val_bytes_000007.bin has no validation shard"),
])
def test_byte_sidecar_that_does_not_pair_is_refused_by_name(tmp_path, case, needle):
    _val_pair(tmp_path, 0, [1, 5, 6, 7], [0, 3, 1, 4])
    _val_pair(tmp_path, 1, [1, 9, 9], None if case == "missing" else [0, 2] if case == "short" else [0, 2, 7])
    if case == "extra":
        write_shard(tmp_path / "fineweb_val_bytes_000007.bin", [1])
    with pytest.raises(ShardError, match=needle):
        load_byte_sidecar(find_shards(tmp_path, "val"), 7)
