"""Loaders against independent reference computations of the record semantics (slices of the full stream)."""

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf.data.loaders import (DocumentPackedLoader, PackedBatch, SequentialLoader, ShuffledLoader,
                                cu_seqlens_from_tokens)
from pgolf.data.shards import find_shards, load_tokens, write_shard


def _shards(tmp_path, parts, split="train"):
    for i, p in enumerate(parts):
        write_shard(tmp_path / f"fineweb_{split}_{i:06d}.bin", p)
    return find_shards(tmp_path, split)


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---- SequentialLoader ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 3])
def test_sequential_matches_stream_slices(tmp_path, world_size):
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 60000, n) for n in (50, 0, 23, 71)]
    files = _shards(tmp_path, parts)
    stream = np.concatenate(parts)
    local, seq = 12, 4
    loaders = [SequentialLoader(files, rank=r, world_size=world_size) for r in range(world_size)]
    span = local + 1
    for call in range(9):  # several wraparounds: 9 * 3 * 13 > 144 tokens
        for r, ld in enumerate(loaders):
            x, y = ld.next_batch(local, seq)
            start = call * world_size * span + r * span
            ref = stream[np.arange(start, start + span) % len(stream)]
            assert x.dtype == torch.int64 and x.shape == (local // seq, seq) and y.shape == x.shape
            assert x.flatten().tolist() == ref[:-1].tolist()
            assert y.flatten().tolist() == ref[1:].tolist()


def test_sequential_rewind(tmp_path):
    rng = np.random.default_rng(2)
    files = _shards(tmp_path, [rng.integers(0, 1000, 40), rng.integers(0, 1000, 33)])
    ld = SequentialLoader(files, rank=1, world_size=2)
    for _ in range(3):
        ld.next_batch(8, 4)
    state = _roundtrip(ld.state_dict())
    first = [ld.next_batch(8, 4) for _ in range(5)]
    ld.load_state_dict(state)
    again = [ld.next_batch(8, 4) for _ in range(5)]
    for (a, b), (c, d) in zip(first, again):
        assert torch.equal(a, c) and torch.equal(b, d)
    with pytest.raises(ValueError, match="kind"):
        ld.load_state_dict({**state, "kind": "packed"})


def test_sequential_argument_errors(tmp_path):
    files = _shards(tmp_path, [np.arange(100)])
    with pytest.raises(ValueError, match="multiple of seq_len"):
        SequentialLoader(files).next_batch(10, 4)
    with pytest.raises(ValueError, match="rank"):
        SequentialLoader(files, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no shard files"):
        SequentialLoader([])


# ---- ShuffledLoader --------------------------------------------------------------------------------------------

def _coded_shards(tmp_path, lengths):
    """Shard s holds s*1000 + position, so every window names its shard and start."""
    return _shards(tmp_path, [s * 1000 + np.arange(n) for s, n in enumerate(lengths)])


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 3), (2, 3)])
def test_shuffled_epoch_covers_each_window_once(tmp_path, rank, world_size):
    seq = 8
    lengths = [203, 9, 150, 64, 95, 41, 17]
    files = _coded_shards(tmp_path, lengths)
    owned = list(range(rank, len(lengths), world_size))
    ld = ShuffledLoader(files, seq, rank=rank, world_size=world_size, seed=5)
    for epoch in range(2):
        # the reshuffle happens lazily at the first draw of a new pass, so draw one sequence first
        x0, y0 = ld.next_batch(1)
        x, y = ld.next_batch(sum(ld.windows_left()))
        x, y = torch.cat([x0, x]), torch.cat([y0, y])
        total = x.shape[0]
        assert x.shape == (total, seq) and x.dtype == torch.int64
        starts: dict[int, list[int]] = {}
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            shard, start = divmod(row_x[0], 1000)
            assert shard in owned
            assert row_x == [shard * 1000 + start + i for i in range(seq)]
            assert row_y == [v + 1 for v in row_x]
            starts.setdefault(shard, []).append(start)
        for shard in owned:
            n = lengths[shard]
            got = sorted(starts.get(shard, []))
            if n < seq + 1:
                assert not got
                continue
            phase = got[0]
            assert 0 <= phase <= min(seq - 1, n - seq - 1)
            assert got == [phase + k * seq for k in range((n - 1 - phase) // seq)]
        assert sum(ld.windows_left()) == 0
    assert ld.epoch == 1


def test_shuffled_draws_shards_in_proportion_to_windows_left(tmp_path):
    seq = 4
    files = _coded_shards(tmp_path, [31 * seq, 11 * seq])  # exactly 30 and 10 windows whatever the phase
    firsts = []
    for seed in range(400):
        ld = ShuffledLoader(files, seq, seed=seed)
        assert ld.windows_left() == [30, 10]
        x, _ = ld.next_batch(1)
        firsts.append(int(x[0, 0]) // 1000 == 0)
    p = np.mean(firsts)
    assert abs(p - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 400)


def test_shuffled_rewind_and_seeds(tmp_path):
    files = _coded_shards(tmp_path, [120, 77, 99])
    ld = ShuffledLoader(files, 6, seed=3)
    ld.next_batch(20)
    state = _roundtrip(ld.state_dict())
    first = [ld.next_batch(7) for _ in range(6)]  # crosses an epoch boundary (about 48 windows per epoch)
    ld.load_state_dict(state)
    again = [ld.next_batch(7) for _ in range(6)]
    for (a, b), (c, d) in zip(first, again):
        assert torch.equal(a, c) and torch.equal(b, d)
    other = ShuffledLoader(files, 6, seed=4).next_batch(20)[0]
    same = ShuffledLoader(files, 6, seed=3).next_batch(20)[0]
    fresh = ShuffledLoader(files, 6, seed=3)
    assert torch.equal(same, fresh.next_batch(20)[0]) and not torch.equal(same, other)


def test_shuffled_errors(tmp_path):
    files = _coded_shards(tmp_path, [100, 100])
    with pytest.raises(ValueError) as e:
        ShuffledLoader(files, 8, rank=0, world_size=3)
    assert "2 shards" in str(e.value) and "3 ranks" in str(e.value)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        ShuffledLoader(files, 100)


# ---- DocumentPackedLoader --------------------------------------------------------------------------------------

def _ref_cu(x, bos, max_seqlen, multiple):
    """Reference boundaries by a plain scan of the row (max_seqlen None: documents are not split)."""
    cu, seg_start = [0], 0
    for p in range(1, len(x)):
        if x[p] == bos or p - seg_start == max_seqlen:
            cu.append(p)
            seg_start = p
    cu.append(len(x))
    while len(cu) % multiple:
        cu.append(len(x))
    return cu


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=120), st.none() | st.integers(1, 20), st.integers(1, 8))
def test_cu_seqlens_matches_scan(row, max_seqlen, multiple):
    cu = cu_seqlens_from_tokens(torch.tensor(row), 1, max_seqlen, multiple)
    assert cu.dtype == torch.int32
    assert cu.tolist() == _ref_cu(row, 1, max_seqlen, multiple)


def test_cu_seqlens_errors():
    with pytest.raises(ValueError, match="empty"):
        cu_seqlens_from_tokens(torch.zeros(0, dtype=torch.int64), 1, 8, 4)
    with pytest.raises(ValueError, match="1-D"):
        cu_seqlens_from_tokens(torch.ones(2, 3, dtype=torch.int64), 1, 8, 4)


def _docs_stream(rng, n_docs, max_len):
    docs = [np.concatenate([[1], rng.integers(2, 500, int(rng.integers(1, max_len)))]) for _ in range(n_docs)]
    return np.concatenate(docs)


@pytest.mark.parametrize("world_size", [1, 2])
def test_packed_matches_stream_from_first_bos(tmp_path, world_size):
    rng = np.random.default_rng(7)
    junk = rng.integers(2, 500, 9)  # a partial document before the first BOS is skipped
    stream = np.concatenate([junk, _docs_stream(rng, 40, 60)])
    cuts = [0, 5, 300, 301, len(stream)]  # the first shard holds no BOS at all
    files = _shards(tmp_path, [stream[a:b] for a, b in zip(cuts[:-1], cuts[1:])])
    first_bos = int(np.flatnonzero(stream == 1)[0])
    order = np.concatenate([np.arange(first_bos, len(stream)), np.arange(len(stream))])  # one pass, then wrap
    local, max_seqlen, multiple = 96, 16, 8
    span = local + 1
    loaders = [DocumentPackedLoader(files, rank=r, world_size=world_size, max_seqlen=max_seqlen,
                                    cu_multiple=multiple) for r in range(world_size)]
    for call in range(8):
        for r, ld in enumerate(loaders):
            b = ld.next_batch(local)
            assert isinstance(b, PackedBatch) and b.max_seqlen == max_seqlen
            start = call * world_size * span + r * span
            ref = stream[order[start:start + span]]
            assert b.x.shape == (1, local) and b.y.shape == (1, local) and b.x.dtype == torch.int64
            assert b.x[0].tolist() == ref[:-1].tolist() and b.y[0].tolist() == ref[1:].tolist()
            # document starts only: the model cuts attention at max_seqlen itself (token shifts run on)
            assert b.cu_seqlens.tolist() == _ref_cu(ref[:-1].tolist(), 1, None, multiple)


def test_packed_rewind_and_no_bos(tmp_path):
    rng = np.random.default_rng(8)
    files = _shards(tmp_path, [_docs_stream(rng, 30, 50)])
    ld = DocumentPackedLoader(files, max_seqlen=32, cu_multiple=4)
    ld.next_batch(50)
    state = _roundtrip(ld.state_dict())
    first = [ld.next_batch(50) for _ in range(40)]
    ld.load_state_dict(state)
    for a in first:
        b = ld.next_batch(50)
        assert torch.equal(a.x, b.x) and torch.equal(a.cu_seqlens, b.cu_seqlens)
    (tmp_path / "nobos").mkdir()
    nobos = _shards(tmp_path / "nobos", [np.full(20, 5)])
    with pytest.raises(ValueError, match="no BOS"):
        DocumentPackedLoader(nobos)


def test_loaders_on_real_shard(shared_data):
    files = find_shards(shared_data / "shards" / "fineweb10B_sp1024", "train")
    tokens = load_tokens(files)
    x, y = SequentialLoader(files).next_batch(4096, 1024)
    assert torch.equal(x.flatten(), tokens[:4096]) and torch.equal(y.flatten(), tokens[1:4097])
    b = DocumentPackedLoader(files, max_seqlen=2048).next_batch(8192)
    bos = (tokens[:8192] == 1).nonzero().flatten().tolist()
    cu = b.cu_seqlens.tolist()
    assert cu == _ref_cu(tokens[:8192].tolist(), 1, None, 64) and set(bos) <= set(cu)
    xs, ys = ShuffledLoader(files, 1024).next_batch(8)
    assert torch.equal(xs[:, 1:], ys[:, :-1])
