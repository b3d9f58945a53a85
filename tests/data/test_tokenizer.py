"""Byte accounting on the real challenge tokenizers and documents, the Tokenizer wrapper and the BPB formula."""

import json
import math

import numpy as np
import pytest
import torch

from pgolf.data.shards import find_shards, read_shard, write_shard
from pgolf.data.tokenizer import (ByteTables, Tokenizer, bits_per_byte, build_byte_tables, count_bytes,
                                  normalize_text)
from pgolf.errors import MissingInputError

MODELS = ["fineweb_1024_bpe.model", "fineweb_8192_bpe.model"]


@pytest.fixture(scope="module")
def docs(shared_data):
    lines = (shared_data / "text" / "fineweb_docs_selected_200.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


@pytest.fixture(scope="module", params=MODELS)
def tok(request, shared_data):
    return Tokenizer(shared_data / "tokenizers" / request.param)


def test_counted_bytes_equal_normalized_text_bytes(tok, docs):
    tables = tok.byte_tables()
    unchanged = 0
    encoded = tok.encode_batch(docs)
    for text, ids in zip(docs, encoded):
        toks = torch.tensor([tok.bos_id] + ids)
        counted = int(count_bytes(toks[:-1], toks[1:], tables).sum())
        norm = normalize_text(tok, text)
        assert tok.decode(ids) == norm  # the byte-fallback models round-trip the normalized text
        assert counted == len(norm.encode("utf-8"))
        if norm == text:
            unchanged += 1
            assert counted == len(text.encode("utf-8"))
    assert unchanged >= 1  # some documents are untouched by the normalizer, so the raw-text check ran


def test_special_ids_and_leading_space(tok):
    sp = tok.sp
    tables = tok.byte_tables()
    assert isinstance(tables, ByteTables) and tables.vocab_size == tok.vocab_size
    for i in (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()):
        assert tables.base_bytes[i] == 0 and tables.is_boundary[i]
    assert not tables.is_boundary[sp.piece_to_id("<0x41>")] and tables.base_bytes[sp.piece_to_id("<0x41>")] == 1
    the = sp.piece_to_id("\u2581the")
    word = sp.piece_to_id("and")
    assert sp.id_to_piece(the) == "\u2581the" and sp.id_to_piece(word) == "and"
    after_bos = count_bytes(torch.tensor([tok.bos_id]), torch.tensor([the]), tables).item()
    after_word = count_bytes(torch.tensor([word]), torch.tensor([the]), tables).item()
    assert after_bos == len("the") and after_word == len(" the")


def test_padded_tables_and_vocab_mismatch(tok):
    big = tok.byte_tables(vocab_size=tok.vocab_size + 64)
    assert big.vocab_size == tok.vocab_size + 64
    assert bool(big.is_boundary[tok.vocab_size:].all()) and int(big.base_bytes[tok.vocab_size:].abs().sum()) == 0
    assert torch.equal(big.base_bytes[:tok.vocab_size], tok.byte_tables().base_bytes)
    tok.check_vocab(tok.vocab_size)
    other = 8192 if tok.vocab_size == 1024 else 1024
    with pytest.raises(ValueError) as e:
        tok.check_vocab(other)
    assert f"vocab {tok.vocab_size}" in str(e.value) and f"expects {other}" in str(e.value)


class _FakeSP:
    """A hand-made SentencePiece-like vocab: [control, unk, byte, '▁', '▁ab', 'é', unused]."""

    pieces = ["<s>", "<unk>", "<0x41>", "\u2581", "\u2581ab", "\u00e9", "<unused>"]

    def get_piece_size(self):
        return len(self.pieces)

    def id_to_piece(self, i):
        return self.pieces[i]

    def piece_to_id(self, p):
        return self.pieces.index(p) if p in self.pieces else 1

    def is_control(self, i):
        return i == 0

    def is_unknown(self, i):
        return i == 1

    def is_byte(self, i):
        return i == 2

    def is_unused(self, i):
        return i == 6


def test_build_byte_tables_rules_on_a_hand_vocab():
    t = build_byte_tables(_FakeSP(), vocab_size=9)
    assert t.base_bytes.tolist() == [0, 0, 1, 0, 2, 2, 0, 0, 0]
    assert t.has_space.tolist() == [False, False, False, True, True, False, False, False, False]
    assert t.is_boundary.tolist() == [True, True, False, False, False, False, True, True, True]
    fake = _FakeSP()
    fake.pieces = [p for p in fake.pieces if p != "\u2581"]
    with pytest.raises(ValueError, match="U\\+2581"):
        build_byte_tables(fake)


def test_tokenizer_file_errors(tmp_path, shared_data):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(junk)
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(shared_data / "tokenizers" / "fineweb_1024_bpe.vocab")


def test_bits_per_byte_formula():
    rng = np.random.default_rng(0)
    nll = rng.uniform(0.1, 6.0, 1000)
    nbytes = rng.integers(0, 8, 1000)
    val_loss = nll.mean()
    direct = (val_loss / math.log(2)) * (len(nll) / nbytes.sum())  # the record's tokens-per-byte form
    assert bits_per_byte(float(nll.sum()), float(nbytes.sum())) == pytest.approx(direct, rel=1e-12)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_real_val_shard_documents(shared_data, docs):
    tok = Tokenizer(shared_data / "tokenizers" / "fineweb_1024_bpe.model")
    toks = read_shard(shared_data / "shards" / "fineweb10B_sp1024" / "fineweb_val_000000.bin", tok.vocab_size)
    bos = np.flatnonzero(toks == tok.bos_id)
    assert len(bos) == 50 and bos[0] == 0
    first = toks[bos[0] + 1:bos[1]]
    assert tok.decode(first.tolist()) == normalize_text(tok, docs[0])
    # the whole shard's counted bytes equal the normalized bytes of its 50 documents
    t = torch.from_numpy(toks.astype(np.int64))
    counted = int(count_bytes(t[:-1], t[1:], tok.byte_tables()).sum())
    assert counted == sum(len(normalize_text(tok, d).encode("utf-8")) for d in docs[:50])


def _caseops_like_tokenizer(folder, docs) -> Tokenizer:
    """A small BPE model whose vocab holds private-use case-control symbols, as the CaseOps tokenizers do."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs[:20]), model_prefix=str(folder / "caseops"),
                                   vocab_size=300, model_type="bpe", user_defined_symbols=["\ue001", "\ue002"],
                                   minloglevel=2)
    return Tokenizer(folder / "caseops.model")


def test_validation_tables_count_from_the_sidecar_when_the_data_has_one(tmp_path, shared_data, docs):
    tok = Tokenizer(shared_data / "tokenizers" / MODELS[0])
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 5, 6, 7, 8])
    files = find_shards(tmp_path, "val")
    plain = tok.validation_tables(1024, files, 5)
    assert plain.source == "tokenizer" and plain.sidecar is None and tok.control_symbol_pieces() == []
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", [0, 3, 1, 4, 2])
    side = tok.validation_tables(1024, files, 4)
    assert side.source == "sidecar" and side.sidecar.tolist() == [0, 3, 1, 4]
    assert torch.equal(side.base_bytes, plain.base_bytes)
    prev, tgt = torch.tensor([1, 5, 6]), torch.tensor([5, 6, 7])
    assert count_bytes(prev, tgt, side, torch.tensor([1, 2, 3])).tolist() == [3, 1, 4]
    with pytest.raises(ValueError, match="stream positions"):
        count_bytes(prev, tgt, side)


def test_a_text_rewriting_tokenizer_without_a_sidecar_is_refused(tmp_path, docs):
    caseops = _caseops_like_tokenizer(tmp_path, docs)
    marked = caseops.control_symbol_pieces()
    assert [caseops.sp.id_to_piece(i) for i in marked] == ["\ue001", "\ue002"]
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "fineweb_val_000000.bin", [1, 5, 6, 7])
    files = find_shards(data, "val")
    with pytest.raises(MissingInputError, match="fineweb_val_bytes_"):
        caseops.validation_tables(caseops.vocab_size, files, 4)
    write_shard(data / "fineweb_val_bytes_000000.bin", [0, 2, 2, 2])
    assert caseops.validation_tables(caseops.vocab_size, files, 4).source == "sidecar"
