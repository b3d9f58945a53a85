"""Synthetic source: exact entropy floor vs Monte Carlo, hand computations, and the corpus build."""

import json
import math
import time

import numpy as np
import pytest
import torch

from pgolf.data.shards import find_shards, read_shard
from pgolf.data.synthetic import MarkovSource, build_default_corpus
from pgolf.data.tokenizer import Tokenizer, count_bytes


@pytest.fixture(scope="module")
def source():
    return MarkovSource(seed=0)


def test_source_structure(source):
    assert len(set(source.words)) == len(source.words) == 64
    assert all(w.isalpha() and w.islower() and 2 <= len(w) <= 8 for w in source.words)
    nnz = (source.P > 0).sum(axis=1)
    assert nnz.min() >= 2 and nnz.max() <= 6
    assert np.allclose(source.P.sum(axis=1), 1) and np.isclose(source.start.sum(), 1)
    q = source.transition_matrix()
    assert np.allclose(q.sum(axis=1), 1)


def test_stationary_distribution(source):
    pi = source.stationary_distribution()
    q = source.transition_matrix()
    assert pi.sum() == pytest.approx(1.0, abs=1e-12) and (pi > 0).all()
    assert np.allclose(pi @ q, pi, atol=1e-14)
    # independent: the long-run average of the distribution started at BOS (Cesàro mean of powers)
    v = np.zeros(len(pi))
    v[0] = 1.0
    acc = np.zeros(len(pi))
    for _ in range(4000):
        acc += v
        v = v @ q
    assert np.allclose(acc / 4000, pi, atol=1e-3)
    # BOS is visited once per document: π_BOS = 1 / (1 + expected words per doc) = 1 / (1 + 1/p_end)
    assert pi[0] == pytest.approx(1 / (1 + 1 / source.p_end), rel=1e-10)


def test_entropy_rate_matches_monte_carlo(source):
    docs = source.sample_documents(6000, seed=123)
    bits, nbytes = source.oracle_bits(docs)
    assert nbytes == sum(len(d.encode()) for d in docs)
    mc = bits / nbytes
    assert mc == pytest.approx(source.entropy_rate_bpb(), rel=0.01)
    # the context-free floor from empirical symbol frequencies (each doc: its words and one BOS)
    counts = np.zeros(source.num_words + 1)
    for d in docs:
        for w in d.split(" "):
            counts[1 + source.index[w]] += 1
    counts[0] = len(docs)
    pi = source.stationary_distribution()
    emp_unigram = -(counts * np.log2(pi)).sum() / nbytes
    assert emp_unigram == pytest.approx(source.unigram_bpb(), rel=0.02)
    assert source.unigram_bpb() > 2 * source.entropy_rate_bpb()


def test_sampling_follows_the_chain(source):
    docs = source.sample_documents(3000, seed=9)
    assert docs == source.sample_documents(3000, seed=9) and docs != source.sample_documents(3000, seed=10)
    lens = np.array([len(d.split(" ")) for d in docs])
    assert lens.min() >= 1 and lens.mean() == pytest.approx(1 / source.p_end, rel=0.08)  # geometric lengths
    first = np.bincount([source.index[d.split(" ")[0]] for d in docs], minlength=source.num_words) / len(docs)
    assert np.abs(first - source.start).max() < 0.04
    pairs = np.zeros_like(source.P)
    for d in docs:
        ids = [source.index[w] for w in d.split(" ")]
        np.add.at(pairs, (ids[:-1], ids[1:]), 1)
    assert (pairs[source.P == 0] == 0).all()  # never an impossible transition
    busiest = int(pairs.sum(axis=1).argmax())
    assert np.abs(pairs[busiest] / pairs[busiest].sum() - source.P[busiest]).max() < 0.05


def test_oracle_bits_on_hand_chain():
    src = MarkovSource.from_tables(["a", "bb"], start=[0.25, 0.75], transitions=[[0, 1], [0.5, 0.5]], p_end=0.1)
    bits, nbytes = src.oracle_bits(["a bb bb", "bb a"])
    hand = (-math.log2(0.25) - math.log2(0.9) - math.log2(0.45) - math.log2(0.1)
            - math.log2(0.75) - math.log2(0.45) - math.log2(0.1))
    assert bits == pytest.approx(hand, rel=1e-12) and nbytes == 7 + 4
    assert src.oracle_bits(["a a"])[0] == math.inf
    with pytest.raises(ValueError, match="'c'"):
        src.oracle_bits(["a c"])
    # entropy rate by hand: π solves the 3-state chain BOS, a, bb
    q = np.array([[0, 0.25, 0.75], [0.1, 0, 0.9], [0.1, 0.45, 0.45]])
    w, v = np.linalg.eig(q.T)
    pi = np.real(v[:, np.argmin(abs(w - 1))])
    pi /= pi.sum()
    h = [-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)),
         -(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9)),
         -(0.1 * math.log2(0.1) + 2 * 0.45 * math.log2(0.45))]
    e_bytes = [0.25 * 1 + 0.75 * 2, 0.9 * 3, 0.45 * 2 + 0.45 * 3]
    assert src.entropy_rate_bpb() == pytest.approx(float(pi @ h) / float(pi @ e_bytes), rel=1e-12)
    h_pi = -(pi * np.log2(pi)).sum()
    assert src.unigram_bpb() == pytest.approx(h_pi / float(pi @ e_bytes), rel=1e-12)


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    t0 = time.perf_counter()
    meta = build_default_corpus(out)
    return out, meta, time.perf_counter() - t0


def test_default_corpus(default_corpus):
    out, meta, seconds = default_corpus
    assert seconds < 30
    assert 0.85e6 < meta["train_tokens"] < 1.15e6 and 50_000 < meta["val_tokens"] < 70_000
    src = MarkovSource(seed=0)
    assert meta["entropy_floor_bpb"] == src.entropy_rate_bpb() and meta["unigram_bpb"] == src.unigram_bpb()
    assert meta["val_oracle_bpb"] == pytest.approx(meta["entropy_floor_bpb"], rel=0.05)
    assert json.loads((out / "meta.json").read_text())["val_tokens"] == meta["val_tokens"]
    tok = Tokenizer(meta["tokenizer_path"])
    assert tok.vocab_size == meta["vocab_size"] <= 512
    docs = [json.loads(line)["text"] for line in (out / "docs.jsonl").read_text().splitlines()]
    assert len(docs) == meta["num_val_docs"] + meta["num_train_docs"]
    tables = tok.byte_tables()
    for split, split_docs in (("val", docs[:meta["num_val_docs"]]), ("train", docs[meta["num_val_docs"]:])):
        (f,) = find_shards(meta["shard_dir"], split)
        t = torch.from_numpy(read_shard(f, tok.vocab_size).astype(np.int64))
        assert int((t == tok.bos_id).sum()) == len(split_docs)
        counted = int(count_bytes(t[:-1], t[1:], tables).sum())
        assert counted == sum(len(d.encode("utf-8")) for d in split_docs)
        if split == "val":
            starts = (t == tok.bos_id).nonzero().flatten().tolist() + [len(t)]
            assert [tok.decode(t[a + 1:b]) for a, b in zip(starts[:-1], starts[1:])] == split_docs


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_idempotent(tmp_path):
    kw = dict(num_train_docs=1500, num_val_docs=100)
    a = build_default_corpus(tmp_path / "a", seed=3, **kw)
    b = build_default_corpus(tmp_path / "b", seed=3, **kw)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    shard_names = [k for k in fa if k.endswith(".bin")]
    assert len(shard_names) == 2 and all(fa[k] == fb[k] for k in shard_names)
    assert fa["docs.jsonl"] == fb["docs.jsonl"] and fa["tokenizer_512_bpe.model"] == fb["tokenizer_512_bpe.model"]
    assert {k: v for k, v in a.items() if not k.endswith(("_path", "_dir"))} == \
        {k: v for k, v in b.items() if not k.endswith(("_path", "_dir"))}
    c = build_default_corpus(tmp_path / "c", seed=4, **kw)
    assert _files(tmp_path / "c")["shards/fineweb_val_000000.bin"] != fa["shards/fineweb_val_000000.bin"]
    assert c["entropy_floor_bpb"] != a["entropy_floor_bpb"]

    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")}
    again = build_default_corpus(tmp_path / "a", seed=3, **kw)
    assert again == a
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")} == mtimes
    changed = build_default_corpus(tmp_path / "a", seed=3, num_train_docs=1500, num_val_docs=50)
    assert changed["num_val_docs"] == 50 and changed["val_tokens"] < a["val_tokens"]
