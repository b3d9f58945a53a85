"""Export pipeline: input parsing, tokenizer training and the CLI round trip on real documents."""

import json

import numpy as np
import pytest
import sentencepiece as spm

from pgolf.data import prepare as prep
from pgolf.data.prepare import main, prepare, read_documents, train_tokenizer
from pgolf.data.shards import ShardError, find_shards, read_shard
from pgolf.data.tokenizer import Tokenizer, normalize_text


@pytest.fixture(scope="module")
def real_docs(shared_data):
    lines = (shared_data / "text" / "fineweb_docs_selected_200.jsonl").read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line)["text"] for line in lines]
    return [d for d in docs if len(d.encode("utf-8")) < 1500][:14]  # short ones keep the test fast


def _split_docs(stream, bos):
    starts = np.flatnonzero(stream == bos).tolist() + [len(stream)]
    assert starts[0] == 0
    return [stream[a + 1:b] for a, b in zip(starts[:-1], starts[1:])]


def test_cli_round_trip_with_real_tokenizer(tmp_path, shared_data, real_docs):
    model = shared_data / "tokenizers" / "fineweb_1024_bpe.model"
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(real_docs)), "utf-8")
    n_val, shard_tokens = 4, 700
    out = tmp_path / "out"
    assert main(["--input", str(src), "--out", str(out), "--tokenizer", str(model), "--num-val-docs", str(n_val),
                 "--shard-tokens", str(shard_tokens), "--text-key", "body"]) == 0
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["tokenizer_fingerprint"] == Tokenizer(model).fingerprint()
    sp = spm.SentencePieceProcessor(model_file=str(model))  # independent reference: sentencepiece directly
    for split, docs in (("val", real_docs[:n_val]), ("train", real_docs[n_val:])):
        files = find_shards(out, split)
        assert [f.name for f in files] == summary[split]["files"]
        parts = [read_shard(f, 1024) for f in files]
        assert all(len(p) == shard_tokens for p in parts[:-1]) and 0 < len(parts[-1]) <= shard_tokens
        stream = np.concatenate(parts)
        expected = np.concatenate([[sp.bos_id()] + sp.encode(d) for d in docs])
        assert stream.tolist() == expected.tolist()
        decoded = [sp.decode(d.tolist()) for d in _split_docs(stream, sp.bos_id())]
        assert decoded == [normalize_text(sp, d) for d in docs]
        assert summary[split]["num_docs"] == len(docs) and summary[split]["num_tokens"] == len(expected)
        assert summary[split]["num_raw_bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    assert len(summary["train"]["files"]) > 1


def test_cli_trains_tokenizer_from_txt(tmp_path, real_docs):
    docs = [d.replace("\n\n", "\n").strip() for d in real_docs]  # .txt documents cannot contain blank lines
    src = tmp_path / "docs.txt"
    src.write_text("\n\n \n".join(docs) + "\n\n\n", "utf-8")
    assert list(read_documents(src)) == docs
    out = tmp_path / "out"
    assert main(["--input", str(src), "--out", str(out), "--train-tokenizer", "--vocab-size", "400",
                 "--num-val-docs", "2"]) == 0
    summary = json.loads((out / "prepare_summary.json").read_text())
    tok = Tokenizer(out / "fineweb_400_bpe.model")
    assert summary["tokenizer"] == str(out / "fineweb_400_bpe.model")  # the final path, not the temp folder's
    assert (out / "fineweb_400_bpe.vocab").is_file() and summary["vocab_size"] == tok.vocab_size <= 400
    stream = np.concatenate([read_shard(f) for f in find_shards(out, "train")])
    assert [tok.decode(d.tolist()) for d in _split_docs(stream, 1)] == [normalize_text(tok, d) for d in docs[2:]]


def test_train_tokenizer_settings_and_determinism(tmp_path, real_docs):
    a = train_tokenizer(real_docs, 512, tmp_path / "a")
    b = train_tokenizer(iter(real_docs), 512, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(a))
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(sp.get_piece_size())) == 256  # byte fallback
    assert sp.encode("x 2024") == sp.encode("x") + [sp.piece_to_id("\u2581")] + [sp.piece_to_id(c) for c in "2024"]
    assert sp.decode(sp.encode("ﬁ")) == "fi"  # NFKC normalization
    assert not sp.id_to_piece(sp.encode("hello")[0]).startswith("\u2581")  # no dummy prefix


def test_bad_jsonl_lines(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"\n', "utf-8")
    with pytest.raises(ValueError) as e:
        list(read_documents(p))
    assert "bad.jsonl:3" in str(e.value)
    p.write_text('{"text": "a"}\n{"txt": "b"}\n', "utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2.*'text'"):
        list(read_documents(p))
    csv = tmp_path / "x.csv"
    csv.write_text("a", "utf-8")
    with pytest.raises(ValueError, match="unsupported"):
        list(read_documents(csv))


def test_prepare_refuses_big_vocab_and_too_few_docs(tmp_path, shared_data, monkeypatch):
    model = shared_data / "tokenizers" / "fineweb_1024_bpe.model"
    with pytest.raises(ValueError, match="none for training"):
        prepare(["a b", "c"], tmp_path, model, num_val_docs=2)

    class Huge(Tokenizer):
        vocab_size = 70_000

    monkeypatch.setattr(prep, "Tokenizer", Huge)
    with pytest.raises(ShardError, match="70000"):
        prepare(["a"], tmp_path, model, num_val_docs=0)


def test_forced_rerun_replaces_the_folder_whole(tmp_path, shared_data, real_docs):
    model = shared_data / "tokenizers" / "fineweb_1024_bpe.model"
    first = prepare(real_docs, tmp_path, model, num_val_docs=2, shard_tokens=500)
    second = prepare(real_docs, tmp_path, model, num_val_docs=2, shard_tokens=10**6, force=True)
    assert len(first["train"]["files"]) > 1 and second["train"]["files"] == ["fineweb_train_000000.bin"]
    assert [f.name for f in find_shards(tmp_path, "train")] == second["train"]["files"]


def test_reproduces_the_shared_real_shards(tmp_path, shared_data):
    """The shared sp1024 shards were exported independently (docs 0-49 val, 50-199 train): byte-identical."""
    src = shared_data / "text" / "fineweb_docs_selected_200.jsonl"
    prepare(read_documents(src), tmp_path, shared_data / "tokenizers" / "fineweb_1024_bpe.model", num_val_docs=50)
    for split in ("val", "train"):
        ref = shared_data / "shards" / "fineweb10B_sp1024" / f"fineweb_{split}_000000.bin"
        assert (tmp_path / ref.name).read_bytes() == ref.read_bytes()
