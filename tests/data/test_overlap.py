"""Train/validation overlap: planted documents and runs are found where they were put, a clean set reports
nothing, the coverage equals a brute-force check (also with forced hash collisions and on the real shared data),
and the command's settings, outputs and errors."""

import json

import numpy as np
import pytest

from pgolf.data.overlap import find_overlap, main, position_weights
from pgolf.data.shards import read_shard, write_shard
from pgolf.data.tokenizer import Tokenizer

BOS = 1


def _docs(rng, n, vocab, lo=20, hi=200):
    return [rng.integers(2, vocab, int(rng.integers(lo, hi))).astype(np.uint16) for _ in range(n)]


def _stream(docs):
    return np.concatenate([np.r_[BOS, d].astype(np.uint16) for d in docs])


def _write(folder, val_docs, train_docs, shard_tokens):
    """Val and train streams cut into shards every ``shard_tokens`` tokens, as the exporter cuts them (documents
    cross shard boundaries)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, docs in (("val", val_docs), ("train", train_docs)):
        s = _stream(docs)
        for i, a in enumerate(range(0, len(s), shard_tokens)):
            write_shard(folder / f"fineweb_{split}_{i:06d}.bin", s[a:a + shard_tokens])


def _brute_force(val_docs, train_docs, n):
    """(covered val tokens, set of val docs with an exact train copy), by enumerating every n-window."""
    where = {}
    for d, doc in enumerate(val_docs):
        for o in range(len(doc) - n + 1):
            where.setdefault(doc[o:o + n].tobytes(), []).append((d, o))
    covered = [np.zeros(len(doc), dtype=bool) for doc in val_docs]
    train_set = {t.tobytes() for t in train_docs if len(t)}
    exact = {d for d, doc in enumerate(val_docs) if len(doc) and doc.tobytes() in train_set}
    for d in exact:
        covered[d][:] = True
    for t in train_docs:
        for o in range(len(t) - n + 1):
            for d, vo in where.get(t[o:o + n].tobytes(), ()):
                covered[d][vo:vo + n] = True
    return int(sum(c.sum() for c in covered)), exact


def _plant(rng, val_docs, train_docs, count, lengths):
    """Copy ``count`` pieces of validation documents (some whole, some at a document's start or end) into the
    training documents, in place."""
    for _ in range(count):
        v = val_docs[int(rng.integers(len(val_docs)))]
        length = min(len(v), int(rng.integers(*lengths)))
        start = int(rng.choice([0, len(v) - length, int(rng.integers(0, len(v) - length + 1))]))
        piece = v[start:start + length]
        if rng.random() < 0.3:
            train_docs.insert(int(rng.integers(len(train_docs) + 1)), v.copy())
            continue
        i = int(rng.integers(len(train_docs)))
        t = train_docs[i]
        at = int(rng.integers(0, len(t) + 1))
        train_docs[i] = np.r_[t[:at], piece, t[at:]].astype(np.uint16)


def test_planted_document_and_run_are_found_where_they_were_put(tmp_path):
    rng = np.random.default_rng(0)
    val, train = _docs(rng, 30, 1000), _docs(rng, 200, 1000)
    val[12] = rng.integers(2, 1000, 150).astype(np.uint16)
    train.insert(50, val[7].copy())  # an exact document
    train.insert(101, val[3].copy())  # another, which the shard cut below splits in two
    t, seg = train[120], val[12][20:100]  # an 80-token run inside another document
    host = np.r_[t[:10], seg, t[10:]].astype(np.uint16)
    for i, v in ((9, val[12][19]), (90, val[12][100])):  # its neighbours differ, so the run is exactly 80 long
        host[i] = host[i] % 998 + 2 if host[i] == v else host[i]
    train[120] = host
    first = np.cumsum([0] + [len(d) + 1 for d in train[:-1]]) + 1  # global position of each document's content
    shard = int(first[101]) + len(val[3]) // 2
    _write(tmp_path, val, train, shard_tokens=shard)

    r = find_overlap(tmp_path, ngram=64)

    docs = {(m.val_doc, m.shard, m.offset) for m in r.examples if m.kind == "document"}
    assert docs == {(7, "fineweb_train_000000.bin", int(first[50])), (3, "fineweb_train_000000.bin", int(first[101]))}
    runs = [m for m in r.examples if m.kind == "run"]
    g_run = int(first[120]) + 10
    assert [(m.val_doc, m.val_doc_offset, m.length, m.shard, m.offset) for m in runs] == \
        [(12, 20, 80, f"fineweb_train_{g_run // shard:06d}.bin", g_run % shard)]
    assert (r.exact_val_docs, r.exact_copies, r.runs) == (2, 2, 1)
    assert r.affected_amount == len(val[7]) + len(val[3]) + 80
    assert r.unit == "tokens" and r.val_total == sum(len(d) for d in val)


def test_clean_set_reports_nothing(tmp_path):
    rng = np.random.default_rng(1)
    _write(tmp_path, _docs(rng, 30, 1000), _docs(rng, 200, 1000), shard_tokens=9000)
    r = find_overlap(tmp_path, ngram=32)
    assert r.train_shards > 1 and r.train_docs == 200 and r.val_docs == 30
    assert (r.exact_val_docs, r.exact_copies, r.runs, r.affected_amount, r.affected_share) == (0, 0, 0, 0, 0.0)
    assert r.examples == []


@pytest.mark.parametrize("seed,vocab,n", [(2, 1000, 32), (3, 5, 16), (4, 4, 12)])
def test_coverage_equals_brute_force(tmp_path, seed, vocab, n):
    """Random plants of every length around n, whole documents, pieces at document edges, and (small vocabularies)
    many chance repeats: the covered validation tokens and the exact documents equal an exhaustive check, and every
    reported example is really shared."""
    rng = np.random.default_rng(seed)
    val, train = _docs(rng, 20, vocab, lo=1, hi=120), _docs(rng, 60, vocab, lo=1, hi=150)
    _plant(rng, val, train, 25, (n // 2, 3 * n))
    _write(tmp_path, val, train, shard_tokens=1500)
    covered, exact = _brute_force(val, train, n)

    r = find_overlap(tmp_path, ngram=n, examples=1000)

    assert r.affected_amount == covered
    assert r.exact_val_docs == len(exact) and {m.val_doc for m in r.examples if m.kind == "document"} == exact
    assert covered > 0 and r.runs > 0
    _check_examples(tmp_path, val, r)


def test_hash_collisions_are_rejected_not_reported(tmp_path):
    """With base 1 the hash is the token sum, so every permutation of a window collides: the tokens decide."""
    rng = np.random.default_rng(5)
    val, train = _docs(rng, 20, 6), _docs(rng, 60, 6)
    _plant(rng, val, train, 10, (40, 100))
    _write(tmp_path, val, train, shard_tokens=2000)
    good, weak = find_overlap(tmp_path, ngram=32), find_overlap(tmp_path, ngram=32, base=1)
    assert weak.window_collisions > 1000 and weak.doc_collisions >= 0 and good.window_collisions == 0
    same = ("exact_val_docs", "exact_copies", "runs", "run_val_docs", "longest_run", "affected_amount")
    assert [getattr(weak, k) for k in same] == [getattr(good, k) for k in same]
    assert good.affected_amount == _brute_force(val, train, 32)[0] > 0


def _check_examples(folder, val, r):
    streams = {p.name: read_shard(p) for p in folder.glob("fineweb_train_*.bin")}
    names = sorted(streams)
    flat = np.concatenate([streams[k] for k in names])
    base = dict(zip(names, np.cumsum([0] + [len(streams[k]) for k in names[:-1]])))
    for m in r.examples:
        g = int(base[m.shard]) + m.offset
        assert np.array_equal(flat[g:g + m.length], val[m.val_doc][m.val_doc_offset:m.val_doc_offset + m.length])
        if m.kind == "document":
            assert flat[g - 1] == BOS and (g + m.length == len(flat) or flat[g + m.length] == BOS)
        else:
            assert m.length >= r.ngram


def _shared_docs(path):
    t = np.asarray(read_shard(path))
    b = np.flatnonzero(t == BOS)
    return [t[s + 1:e] for s, e in zip(b, np.r_[b[1:], len(t)])]


def test_shared_data_matches_brute_force_and_writes_json(shared_data, tmp_path, capsys):
    d = shared_data / "shards" / "fineweb10B_sp8192"
    tok = shared_data / "tokenizers" / "fineweb_8192_bpe.model"
    out = tmp_path / "overlap.json"
    assert main(["--data", str(d), "--ngram", "32", "--tokenizer", str(tok), "--json", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert f"validation bytes inside a match: {rep['affected_amount']:,} of {rep['val_total']:,}" in text

    val = _shared_docs(d / "fineweb_val_000000.bin")
    train = _shared_docs(d / "fineweb_train_000000.bin")
    covered, exact = _brute_force(val, train, 32)
    tokens_only = find_overlap(d, ngram=32)
    assert tokens_only.affected_amount == covered and tokens_only.exact_val_docs == len(exact)
    assert rep["val_docs"] == len(val) == 50 and rep["train_docs"] == len(train) == 150
    assert rep["unit"] == "bytes" and rep["val_total"] > rep["val_tokens"]  # sp8192 averages > 1 byte per token
    assert (rep["affected_amount"] > 0) == (covered > 0)
    for m in rep["examples"]:
        assert m["text"] and m["shard"] == "fineweb_train_000000.bin"


def test_json_is_never_overwritten_without_force(tmp_path, capsys):
    rng = np.random.default_rng(6)
    _write(tmp_path / "d", _docs(rng, 5, 100), _docs(rng, 5, 100), shard_tokens=10_000)
    out = tmp_path / "r.json"
    out.write_text("keep me")
    assert main(["--data", str(tmp_path / "d"), "--json", str(out), "--quiet"]) != 0
    assert out.read_text() == "keep me" and "--force" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "d"), "--json", str(out), "--force", "--quiet"]) == 0
    assert json.loads(out.read_text())["val_docs"] == 5


@pytest.mark.parametrize("argv,says", [
    (["--ngram", "4"], "--ngram 4"),
    (["--examples", "-1"], "--examples -1"),
    (["--bos-id", "70000"], "--bos-id 70000"),
])
def test_bad_settings_are_named_before_any_work(tmp_path, capsys, argv, says):
    assert main(["--data", str(tmp_path / "missing")] + argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_bad_inputs_are_named(tmp_path, shared_data, capsys):
    assert main(["--data", str(tmp_path / "nowhere")]) == 1
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    rng = np.random.default_rng(7)
    _write(tmp_path / "d", _docs(rng, 3, 5000), _docs(rng, 3, 5000), shard_tokens=10_000)
    small = shared_data / "tokenizers" / "fineweb_1024_bpe.model"  # vocab 1024 < the ids in the shards
    assert main(["--data", str(tmp_path / "d"), "--tokenizer", str(small), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "fineweb_val_000000.bin" in err and "vocab" in err and "Traceback" not in err
    assert main(["--data", str(tmp_path / "d"), "--bos-id", "0", "--quiet"]) == 1
    assert "no BOS token 0" in capsys.readouterr().err


def test_byte_shares_come_from_the_byte_sidecar_when_there_is_one(shared_data, tmp_path):
    """A sidecar of twice the tokenizer's counts doubles every byte amount of the report."""
    src = shared_data / "shards" / "fineweb10B_sp8192"
    tok = shared_data / "tokenizers" / "fineweb_8192_bpe.model"
    for f in src.glob("fineweb_*.bin"):
        write_shard(tmp_path / f.name, read_shard(f))
    plain = find_overlap(tmp_path, ngram=32, tokenizer=tok)
    val = np.asarray(read_shard(src / "fineweb_val_000000.bin"))
    weights = position_weights(val, BOS, Tokenizer(tok))
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", 2 * weights.astype(np.int64))
    side = find_overlap(tmp_path, ngram=32, tokenizer=tok)
    assert plain.val_total == int(weights.sum()) and plain.affected_amount > 0
    assert (side.val_total, side.affected_amount) == (2 * plain.val_total, 2 * plain.affected_amount)
