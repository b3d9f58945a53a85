"""``python -m pgolf.data.overlap --data DIR``: does any validation text also occur in the training shards?

A submission was excluded from the leaderboard for training on validation text; this answers the question for a
data folder before a reviewer asks it. The validation stream (``fineweb_val_*.bin``, in order) is cut into
documents at every BOS (a document is the token run after a BOS up to the next BOS; the BOS itself is not part
of it). The training shards (``fineweb_train_*.bin``) are then streamed once, in order, and two things are
looked for:

- **exact document matches**: a training document whose tokens equal a validation document's (any length);
- **shared runs**: maximal stretches of at least ``N`` tokens (``--ngram``, default 64) that occur in a
  validation document and in a training document. Every such run is found; a run is reported once per training
  occurrence, and a run that is a whole document on both sides is reported as a document match instead.

The report gives the counts, the share of validation bytes inside a match (bytes as the challenge counts them,
from the tokenizer's byte tables, :mod:`pgolf.data.tokenizer`, or from the byte sidecar of a CaseOps-style
validation set; with no ``--tokenizer``, the share of validation tokens instead) and examples: the training
shard, the token offset in it (the index in the shard's token array after the 1024-byte header, of the first
shared token) and the validation document id (its index in the validation stream, from 0) with the offset inside
that document.

**How runs are found.** Windows of ``k = ⌈N/2⌉`` tokens are hashed with a 64-bit polynomial hash
(``h = Σ x_j B^j mod 2^64``), computed for every position at once from wrapping uint64 prefix sums:
``S[i] = Σ_{j<i} x_j B^j`` and ``h(i..i+k) = (S[i+k] − S[i]) · B^{−i}`` (B odd, so invertible mod 2^64). The
validation side keeps only every ``k``-th window of each document (stride ``s = k``), which bounds its index to
about ``2/N`` of the validation tokens (16 bytes each); the training side hashes every window. A shared run of at
least ``k + s − 1 ≤ N`` tokens contains one whole sampled validation window, so it is found. Hits on one diagonal
(train position − validation position) whose windows overlap or touch are merged, and the merged run is extended
token by token on both sides, at most ``s − 1`` tokens each way (a longer extension would have contained another
sampled window) and never past either document's ends. A :class:`Prefilter` (a cache-sized bit table of the
hashes' top bits, then a byte table of 8 further bits, at most 64 MiB) rejects almost every training window
before the sorted index is searched.

**Hash collisions.** Every hash match is only a candidate: its tokens are compared with the validation tokens
before it counts (windows compared whole, documents compared whole, lengths first). A collision therefore costs
time, never a false report; the report counts the candidates checked and the ones rejected. Equal token runs
always have equal hashes, so nothing is missed.

**Memory and time.** Training shards are memory-mapped and processed in chunks of about ``chunk_tokens`` (1 Mi)
whole documents; a document that crosses a shard boundary is completed from the next shard. Memory is the
validation tokens (2 bytes each), their byte weights and coverage mask (1 byte each), the index (16 bytes per
``k`` validation tokens), the prefilter tables and a few arrays of 8 bytes per chunk token, whatever the number of
training shards. Measured on this repository's shared 2-core machine with synthetic shards of the challenge's
sizes (62 M validation tokens, one 10^8-token training shard, warm page cache): 0.9 GB peak resident memory
(0.2 GB of it the imports, and the mapped shard's pages) and 44 M training tokens/s on one core, i.e. 3 minutes
for 80 shards and 5 for 128, plus the time to read them from disk; the shared sample data takes 0.1 s. Text
that is shared many times costs more: every (training occurrence, validation occurrence) pair is verified and
counted.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pgolf.errors import ConfigError, InputError, run_cli
from pgolf.data.shards import find_shards, read_shard

DEFAULT_NGRAM = 64
DEFAULT_BASE = 0x9E3779B97F4A7C15  # odd, so it has an inverse mod 2^64
CHUNK_TOKENS = 1 << 20
MAX_TABLE_BITS = 26  # the prefilter's byte table: at most 64 MiB
SNIPPET_TOKENS = 24


@dataclass
class Match:
    """One match. kind: "document" or "run"; length in tokens; offsets are token indices (see the module doc)."""

    kind: str
    val_doc: int
    val_doc_offset: int
    length: int
    shard: str
    offset: int
    text: str | None = None  # the first tokens, decoded (with a tokenizer)


@dataclass
class OverlapReport:
    """Everything ``--json`` writes. ``unit`` is "bytes" with a tokenizer, else "tokens" (BOS not counted)."""

    data: str
    ngram: int  # every shared run of at least this many tokens is found
    window: int  # k: hashed window length
    stride: int  # s: validation windows sampled every s tokens of a document
    val_shards: int
    val_tokens: int
    val_docs: int
    train_shards: int
    train_tokens: int
    train_docs: int
    unit: str
    val_total: int  # validation bytes (or tokens)
    exact_val_docs: int  # validation documents with at least one exact copy in train
    exact_copies: int  # training documents equal to a validation document
    exact_amount: int  # validation bytes (tokens) in those documents
    runs: int  # shared runs >= ngram (training occurrences), document matches excluded
    run_val_docs: int  # validation documents touched by such a run
    longest_run: int
    affected_amount: int  # validation bytes (tokens) inside any match
    affected_share: float
    window_candidates: int  # hash matches of windows checked against the tokens
    window_collisions: int  # ... of which the tokens differed
    doc_candidates: int
    doc_collisions: int
    seconds: float
    examples: list[Match] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the check --------------------------------------------------------------------------------------------------

def find_overlap(data: str | Path, *, ngram: int = DEFAULT_NGRAM, tokenizer: str | Path | None = None,
                 bos_id: int | None = None, examples: int = 10, chunk_tokens: int = CHUNK_TOKENS,
                 base: int = DEFAULT_BASE, progress: Callable[[str], None] | None = None) -> OverlapReport:
    """Fingerprint the validation documents of ``data`` and stream its training shards for matches.

    ``tokenizer``: a SentencePiece model for byte shares (and decoded example text); ``bos_id`` defaults to the
    tokenizer's, else 1. ``base`` is the hash base (odd; tests use a weak one to force collisions).
    """
    check_settings(ngram=ngram, examples=examples, chunk_tokens=chunk_tokens, base=base, bos_id=bos_id)
    t0 = time.perf_counter()
    val_files, train_files = find_shards(data, "val"), find_shards(data, "train")
    tok = _load_tokenizer(tokenizer)
    bos = _bos(tok, bos_id)
    hasher = PolyHash(base)
    val = ValIndex.build(val_files, bos, ngram, hasher, tok, chunk_tokens)
    tally = Tally(val, examples)
    starts = _shard_starts(train_files)
    for chunk, gstart in stream_doc_chunks(train_files, bos, chunk_tokens, progress):
        scan_chunk(chunk, gstart, val, hasher, tally)
    return tally.report(data, train_files, starts, tok, time.perf_counter() - t0)


def scan_chunk(chunk: np.ndarray, gstart: int, val: "ValIndex", hasher: "PolyHash", tally: "Tally") -> None:
    """Find the exact documents and shared runs of one chunk of whole training documents (uint16, (L,)) that
    starts at global train position ``gstart``; record them in ``tally``."""
    docs = doc_bounds(chunk, val.bos)  # (starts, ends) of the chunk's documents, content only
    tally.train_docs += len(docs[0])
    prefix = hasher.prefix(chunk)
    exact = _exact_documents(chunk, prefix, docs, val, hasher, tally)
    if len(chunk) >= val.k:
        pairs = _window_hits(chunk, hasher.windows(prefix, val.k), val, tally)
        runs = _runs(chunk, pairs, docs, val)
        tally.add_runs(runs, gstart)
    tally.add_documents(exact, gstart)


def _exact_documents(chunk: np.ndarray, prefix: np.ndarray, docs: tuple[np.ndarray, np.ndarray], val: "ValIndex",
                     hasher: "PolyHash", tally: "Tally") -> list[tuple[int, int]]:
    """(val doc id, chunk start) of every training document equal to a validation document, verified."""
    starts, ends = docs
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    hashes = hasher.segments(prefix, starts, ends)
    cand = val.doc_filter.candidates(hashes)
    train_i, val_j = lookup(hashes[cand], val.doc_hash_sorted)
    train_i = cand[train_i]
    tally.doc_candidates += len(train_i)
    found = []
    for i, j in zip(train_i.tolist(), val.doc_order[val_j].tolist()):
        s, e = int(starts[i]), int(ends[i])
        vs, ve = int(val.doc_starts[j]), int(val.doc_ends[j])
        if e - s == ve - vs and np.array_equal(chunk[s:e], val.tokens[vs:ve]):
            found.append((j, s))
        else:
            tally.doc_collisions += 1
    return found


def _window_hits(chunk: np.ndarray, hashes: np.ndarray, val: "ValIndex", tally: "Tally") -> tuple[np.ndarray, ...]:
    """(train positions, validation positions) of the windows of ``chunk`` equal to a sampled validation window.

    ``hashes``: uint64 (L − k + 1,), one per window start. Candidates pass the prefilter, then the sorted index,
    then a token-by-token comparison (the rejected ones are counted as collisions).
    """
    cand = val.win_filter.candidates(hashes)
    hit_i, idx = lookup(hashes[cand], val.win_hash)
    p, q = cand[hit_i], val.win_pos[idx]
    same = windows_equal(chunk, p, val.tokens, q, val.k)
    tally.window_candidates += len(p)
    tally.window_collisions += int(len(p) - same.sum())
    return p[same], q[same]


def _runs(chunk: np.ndarray, pairs: tuple[np.ndarray, np.ndarray], docs: tuple[np.ndarray, np.ndarray],
          val: "ValIndex") -> list[tuple[int, int, int, int]]:
    """Maximal shared runs of at least ``val.ngram`` tokens: (val start, train start in chunk, length, val doc).

    Verified window pairs on one diagonal whose windows overlap or touch are one run; it is then extended on both
    sides (at most k − 1 tokens each way, never past a document end of either side).
    """
    p, q = pairs
    if len(p) == 0:
        return []
    k = val.k
    diag = p - q
    order = np.lexsort((q, diag))
    p, q, diag = p[order], q[order], diag[order]
    new = np.ones(len(q), dtype=bool)
    new[1:] = (diag[1:] != diag[:-1]) | (q[1:] > q[:-1] + k)
    first, last = np.flatnonzero(new), np.r_[np.flatnonzero(new)[1:] - 1, len(q) - 1]
    q0, p0, q1, p1 = q[first], p[first], q[last] + k, p[last] + k
    vdoc = np.searchsorted(val.doc_starts, q0, side="right") - 1
    tdoc = np.searchsorted(docs[0], p0, side="right") - 1
    left = np.minimum.reduce([q0 - val.doc_starts[vdoc], p0 - docs[0][tdoc], np.full_like(q0, k - 1)])
    right = np.minimum.reduce([val.doc_ends[vdoc] - q1, docs[1][tdoc] - p1, np.full_like(q0, k - 1)])
    ext_l = extension(val.tokens, q0 - 1, chunk, p0 - 1, left, step=-1)
    ext_r = extension(val.tokens, q1, chunk, p1, right, step=1)
    vs, ts, length = q0 - ext_l, p0 - ext_l, (q1 + ext_r) - (q0 - ext_l)
    whole = ((vs == val.doc_starts[vdoc]) & (length == val.doc_ends[vdoc] - val.doc_starts[vdoc])
             & (ts == docs[0][tdoc]) & (length == docs[1][tdoc] - docs[0][tdoc]))
    keep = (length >= val.ngram) & ~whole  # whole documents are counted as exact matches
    return list(zip(vs[keep].tolist(), ts[keep].tolist(), length[keep].tolist(), vdoc[keep].tolist()))


# ---- the validation side -----------------------------------------------------------------------------------------

@dataclass
class ValIndex:
    """The validation fingerprints. tokens: uint16 (n,), all validation shards in order; doc_starts/doc_ends: int64
    (D,) content bounds (BOS excluded); weight: uint8 (n,) (uint16 from a sidecar) bytes (or 1 token) of each
    position; doc_hash_sorted / doc_order: the documents' hashes sorted, and their doc ids; win_hash / win_pos:
    sampled windows' hashes sorted, and their positions; win_filter / doc_filter: :class:`Prefilter` of the two
    hash sets."""

    tokens: np.ndarray
    bos: int
    ngram: int
    k: int
    doc_starts: np.ndarray
    doc_ends: np.ndarray
    weight: np.ndarray
    doc_hash_sorted: np.ndarray
    doc_order: np.ndarray
    win_hash: np.ndarray
    win_pos: np.ndarray
    win_filter: "Prefilter"
    doc_filter: "Prefilter"
    files: list[Path]

    @classmethod
    def build(cls, files: Sequence[Path], bos: int, ngram: int, hasher: "PolyHash", tok, chunk_tokens: int
              ) -> "ValIndex":
        vocab = tok.vocab_size if tok is not None else None
        tokens = np.concatenate([np.asarray(read_shard(f, vocab)) for f in files])
        starts, ends = doc_bounds(tokens, bos)
        if not (tokens == bos).any():
            raise InputError(f"the validation shards ({files[0].name}...) contain no BOS token {bos}; documents "
                             f"cannot be found. Pass the tokenizer (--tokenizer) or the right --bos-id")
        k = (ngram + 1) // 2
        pos = sampled_positions(starts, ends, k, stride=k)
        doc_hash = np.empty(len(starts), dtype=np.uint64)
        win_hash = np.empty(len(pos), dtype=np.uint64)
        for c0, c1 in doc_cuts(tokens, bos, chunk_tokens):  # whole documents per chunk, like the train side
            prefix = hasher.prefix(tokens[c0:c1])
            d = (starts >= c0) & (starts < c1)
            doc_hash[d] = hasher.segments(prefix, starts[d] - c0, ends[d] - c0)
            w = (pos >= c0) & (pos < c1)
            win_hash[w] = hasher.segments(prefix, pos[w] - c0, pos[w] - c0 + k)
        nonempty = np.flatnonzero(ends > starts)
        d_order = nonempty[np.argsort(doc_hash[nonempty], kind="stable")]
        w_order = np.argsort(win_hash, kind="stable")
        return cls(tokens, bos, ngram, k, starts, ends, position_weights(tokens, bos, tok, files), doc_hash[d_order],
                   d_order, win_hash[w_order], pos[w_order], Prefilter(win_hash), Prefilter(doc_hash[d_order]),
                   list(files))


def sampled_positions(starts: np.ndarray, ends: np.ndarray, k: int, stride: int) -> np.ndarray:
    """Window starts ``a, a + stride, ...`` (window inside the document) of every document [a, e): int64 (M,)."""
    counts = np.where(ends - starts >= k, (ends - starts - k) // stride + 1, 0)
    doc = np.repeat(np.arange(len(starts)), counts)
    rank = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return starts[doc] + rank * stride


def position_weights(tokens: np.ndarray, bos: int, tok, files: Sequence[Path] = ()) -> np.ndarray:
    """uint8 (n,) (uint16 from a sidecar): the challenge's byte count of each validation position (as a scored
    target after the previous token; from the byte sidecar beside ``files`` when there is one, as val_bpb counts
    them), or 1 for every non-BOS token without a tokenizer."""
    if tok is None:
        return (tokens != bos).astype(np.uint8)
    vocab = int(tokens.max()) + 1 if len(tokens) else tok.vocab_size
    t = tok.validation_tables(vocab, files, len(tokens)) if files else tok.byte_tables(vocab)
    if t.sidecar is not None:
        return t.sidecar.numpy().astype(np.uint16)
    base, space, boundary = (x.numpy() for x in (t.base_bytes, t.has_space, t.is_boundary))
    prev_boundary = np.ones(len(tokens), dtype=bool)
    prev_boundary[1:] = boundary[tokens[:-1]]
    return (base[tokens] + (space[tokens] & ~prev_boundary)).astype(np.uint8)


# ---- the tally and the report ------------------------------------------------------------------------------------

class Tally:
    """Counts, the validation coverage mask and the examples, accumulated over the chunks."""

    def __init__(self, val: ValIndex, examples: int):
        self.val, self.examples = val, examples
        self.covered = np.zeros(len(val.tokens), dtype=bool)
        self.exact_docs = np.zeros(len(val.doc_starts), dtype=bool)
        self.run_docs = np.zeros(len(val.doc_starts), dtype=bool)
        self.exact_copies = self.runs = self.longest = self.train_docs = 0
        self.window_candidates = self.window_collisions = self.doc_candidates = self.doc_collisions = 0
        # examples as (val doc, offset in it, length, global train position): the first documents, the longest runs
        self.doc_examples: list[tuple[int, int, int, int]] = []
        self.run_examples: list[tuple[int, int, int, int]] = []

    def add_documents(self, found: list[tuple[int, int]], gstart: int) -> None:
        v = self.val
        for j, s in found:
            self.exact_copies += 1
            self.exact_docs[j] = True
            self.covered[v.doc_starts[j]:v.doc_ends[j]] = True
            if len(self.doc_examples) < self.examples:
                self.doc_examples.append((j, 0, int(v.doc_ends[j] - v.doc_starts[j]), gstart + s))

    def add_runs(self, runs: list[tuple[int, int, int, int]], gstart: int) -> None:
        v = self.val
        for vs, ts, length, doc in runs:
            self.runs += 1
            self.longest = max(self.longest, length)
            self.run_docs[doc] = True
            self.covered[vs:vs + length] = True
            self.run_examples.append((doc, vs - int(v.doc_starts[doc]), length, gstart + ts))
        if len(self.run_examples) > 4 * self.examples:
            self.run_examples = self._longest()

    def report(self, data, train_files: Sequence[Path], starts: np.ndarray, tok, seconds: float) -> OverlapReport:
        v = self.val
        total = int(v.weight.sum(dtype=np.int64))
        affected = int(v.weight[self.covered].sum(dtype=np.int64))
        exact_amount = sum(int(v.weight[v.doc_starts[j]:v.doc_ends[j]].sum(dtype=np.int64))
                           for j in np.flatnonzero(self.exact_docs))
        examples = [self._match(kind, r, train_files, starts, tok) for kind, rows in
                    (("document", self.doc_examples), ("run", self._longest())) for r in rows]
        return OverlapReport(
            data=str(data), ngram=v.ngram, window=v.k, stride=v.k, val_shards=len(v.files),
            val_tokens=len(v.tokens), val_docs=len(v.doc_starts), train_shards=len(train_files),
            train_tokens=int(starts[-1]), train_docs=self.train_docs, unit="bytes" if tok is not None else "tokens",
            val_total=total, exact_val_docs=int(self.exact_docs.sum()), exact_copies=self.exact_copies,
            exact_amount=exact_amount, runs=self.runs, run_val_docs=int(self.run_docs.sum()),
            longest_run=self.longest, affected_amount=affected, affected_share=affected / total if total else 0.0,
            window_candidates=self.window_candidates, window_collisions=self.window_collisions,
            doc_candidates=self.doc_candidates, doc_collisions=self.doc_collisions, seconds=round(seconds, 3),
            examples=examples)

    def _longest(self) -> list[tuple[int, int, int, int]]:
        """The ``examples`` longest runs kept so far (the first found among equals)."""
        return sorted(self.run_examples, key=lambda r: -r[2])[:self.examples]

    def _match(self, kind: str, row, train_files: Sequence[Path], starts: np.ndarray, tok) -> Match:
        doc, doc_off, length, g = row
        shard = int(np.searchsorted(starts, g, side="right") - 1)
        text = None
        if tok is not None:
            a = int(self.val.doc_starts[doc]) + doc_off
            text = tok.decode(self.val.tokens[a:a + min(length, SNIPPET_TOKENS)].tolist())
        return Match(kind, int(doc), int(doc_off), int(length), train_files[shard].name, int(g - starts[shard]), text)


# ---- hashing -----------------------------------------------------------------------------------------------------

class PolyHash:
    """The polynomial hash mod 2^64 with base B: ``prefix`` gives S (uint64 (L+1,)), ``S[i] = Σ_{j<i} x_j B^j``;
    ``segments(S, a, e)`` the hash ``Σ_{a≤j<e} x_j B^{j−a}`` of each [a, e); ``windows(S, k)`` of every k-window.
    The arithmetic wraps (numpy uint64 arrays), which is the mod 2^64."""

    def __init__(self, base: int = DEFAULT_BASE):
        self.base = int(base) % 2 ** 64
        self.inverse = pow(self.base, -1, 2 ** 64)
        self.pw = np.ones(1, dtype=np.uint64)
        self.ipw = np.ones(1, dtype=np.uint64)

    def prefix(self, tokens: np.ndarray) -> np.ndarray:
        n = len(tokens)
        self._grow(n + 1)
        out = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(np.multiply(tokens, self.pw[:n], dtype=np.uint64), out=out[1:])
        return out

    def segments(self, prefix: np.ndarray, a: np.ndarray, e: np.ndarray) -> np.ndarray:
        return (prefix[e] - prefix[a]) * self.ipw[a]

    def windows(self, prefix: np.ndarray, k: int) -> np.ndarray:
        n = len(prefix) - k
        return (prefix[k:] - prefix[:n]) * self.ipw[:n]

    def _grow(self, n: int) -> None:
        if len(self.pw) >= n:
            return
        size = 1 << max(n - 1, 1).bit_length()
        self.pw, self.ipw = powers(self.base, size), powers(self.inverse, size)


class Prefilter:
    """Rejects almost every hash outside a set with two lookups before the sorted index is searched: a bit per
    value of the top ``bit_bits`` bits (about 1/16 full, a few MiB, so the lookups stay in cache), then a byte per
    value of the top ``slot_bits`` bits (at most 64 MiB, about 1/32 full) holding 8 other bits of the hash (0:
    empty, 255: several different ones). It never rejects a member of the set."""

    def __init__(self, keys: np.ndarray):
        log = math.ceil(math.log2(max(len(keys), 2)))
        self.bit_shift = np.uint64(64 - int(np.clip(log + 4, 16, MAX_TABLE_BITS + 2)))
        self.slot_shift = np.uint64(64 - int(np.clip(log + 5, 16, MAX_TABLE_BITS)))
        self.bits = np.zeros(1 << (61 - int(self.bit_shift)), dtype=np.uint8)
        top = keys >> self.bit_shift
        for b in range(8):  # one pass per bit position, so repeated indices never race
            sel = top[(top & np.uint64(7)) == b]
            self.bits[sel >> np.uint64(3)] |= np.uint8(1 << b)
        slot, fp = keys >> self.slot_shift, _fingerprint(keys)
        order = np.lexsort((fp, slot))
        slot, fp = slot[order], fp[order]
        self.slots = np.zeros(1 << (64 - int(self.slot_shift)), dtype=np.uint8)
        self.slots[slot] = fp
        clash = (slot[1:] == slot[:-1]) & (fp[1:] != fp[:-1])
        self.slots[slot[1:][clash]] = 255

    def candidates(self, h: np.ndarray) -> np.ndarray:
        """int64 indices into ``h`` (uint64 (L,)) of the hashes that may be in the set."""
        top = h >> self.bit_shift
        c = np.flatnonzero((self.bits[top >> np.uint64(3)] >> (top & np.uint64(7)).astype(np.uint8)) & 1)
        hc = h[c]
        t = self.slots[hc >> self.slot_shift]
        return c[(t == _fingerprint(hc)) | (t == 255)]


def _fingerprint(h: np.ndarray) -> np.ndarray:
    """uint8 in [1, 254] from bits 30-37 of each hash (independent of the top bits that pick the slot)."""
    return np.clip((h >> np.uint64(30)) & np.uint64(255), 1, 254).astype(np.uint8)


def powers(b: int, n: int) -> np.ndarray:
    """uint64 (n,): b^0 .. b^(n−1) mod 2^64, by doubling blocks."""
    out = np.ones(n, dtype=np.uint64)
    m = 1
    while m < n:
        c = min(m, n - m)
        out[m:m + c] = out[:c] * np.uint64(pow(b, m, 2 ** 64))
        m += c
    return out


def lookup(queries: np.ndarray, sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j) with queries[i] == sorted_keys[j]: two int64 arrays (one pair per equal key)."""
    lo = np.searchsorted(sorted_keys, queries, side="left")
    hi = np.searchsorted(sorted_keys, queries, side="right")
    counts = hi - lo
    i = np.repeat(np.arange(len(queries)), counts)
    j = np.repeat(lo, counts) + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return i, j


def windows_equal(a: np.ndarray, pa: np.ndarray, b: np.ndarray, pb: np.ndarray, k: int,
                  batch: int = 1 << 16) -> np.ndarray:
    """bool (P,): a[pa:pa+k] == b[pb:pb+k] for each pair, compared in batches of ``batch`` pairs."""
    out = np.empty(len(pa), dtype=bool)
    ar = np.arange(k)
    for s in range(0, len(pa), batch):
        out[s:s + batch] = (a[pa[s:s + batch, None] + ar] == b[pb[s:s + batch, None] + ar]).all(axis=1)
    return out


def extension(a: np.ndarray, ia: np.ndarray, b: np.ndarray, ib: np.ndarray, allowed: np.ndarray, step: int
              ) -> np.ndarray:
    """int64 (R,): how many tokens a[ia + step·m] == b[ib + step·m] hold for m = 0, 1, ... before the first
    difference, at most ``allowed`` (R,) each (positions past ``allowed`` are never read)."""
    width = int(allowed.max()) if len(allowed) else 0
    if width <= 0:
        return np.zeros(len(allowed), dtype=np.int64)
    m = np.arange(width)
    ok = m[None, :] < allowed[:, None]
    xa = np.clip(ia[:, None] + step * m, 0, len(a) - 1)
    xb = np.clip(ib[:, None] + step * m, 0, len(b) - 1)
    eq = ok & (a[xa] == b[xb])
    return np.where(eq.all(axis=1), width, np.argmin(eq, axis=1)).astype(np.int64)


# ---- documents and chunks ----------------------------------------------------------------------------------------

def doc_bounds(tokens: np.ndarray, bos: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends), int64 (D,): the content of each document of ``tokens`` (after its BOS up to the next BOS);
    tokens before the first BOS form a document of their own."""
    b = np.flatnonzero(tokens == bos)
    starts = b + 1
    ends = np.r_[b[1:], len(tokens)].astype(np.int64)
    if len(tokens) and (len(b) == 0 or b[0] > 0):
        starts, ends = np.r_[0, starts], np.r_[b[0] if len(b) else len(tokens), ends]
    return starts.astype(np.int64), ends.astype(np.int64)


def doc_cuts(tokens: np.ndarray, bos: int, target: int) -> list[tuple[int, int]]:
    """[c0, c1) pieces of ``tokens`` cut only at BOS positions, each about ``target`` tokens or one longer document."""
    b = np.flatnonzero(tokens == bos)
    marks = np.arange(target, len(tokens), target)
    cuts = np.unique(np.r_[0, b[np.maximum(np.searchsorted(b, marks, side="right") - 1, 0)] if len(b) else [],
                           len(tokens)]).astype(np.int64)
    return [(int(a), int(e)) for a, e in zip(cuts[:-1], cuts[1:]) if e > a]


def stream_doc_chunks(files: Sequence[Path], bos: int, target: int,
                      progress: Callable[[str], None] | None = None) -> Iterator[tuple[np.ndarray, int]]:
    """(chunk, global start) over the concatenated shards, each chunk whole documents (uint16): the document that
    crosses a shard boundary is held back and completed from the next shard."""
    pending: list[np.ndarray] = []  # the pieces of the document that continues into the next shard
    pending_start = g = 0
    for n, f in enumerate(files, 1):
        t0 = time.perf_counter()
        tokens = read_shard(f)
        b = np.flatnonzero(tokens == bos)
        if len(b) == 0:  # the whole shard is inside one document
            pending_start = pending_start if pending else g
            pending.append(tokens)
            g += len(tokens)
            continue
        first, last = int(b[0]), int(b[-1])
        if pending or first > 0:
            yield np.concatenate(pending + [tokens[:first]]), (pending_start if pending else g)
        for a, e in doc_cuts(tokens[first:last], bos, target):
            yield np.asarray(tokens[first + a:first + e]), g + first + a
        pending, pending_start = [tokens[last:]], g + last
        g += len(tokens)
        if progress:
            dt = time.perf_counter() - t0
            progress(f"train shard {n}/{len(files)} {f.name}: {len(tokens):,} tokens in {dt:.1f} s "
                     f"({len(tokens) / max(dt, 1e-9) / 1e6:.1f} M tokens/s)")
    if pending:
        yield np.concatenate(pending), pending_start


def _shard_starts(files: Sequence[Path]) -> np.ndarray:
    """int64 (F+1,): global train position of each shard's first token, and the total."""
    from pgolf.data.shards import shard_num_tokens

    return np.r_[0, np.cumsum([shard_num_tokens(f) for f in files])].astype(np.int64)


# ---- settings, the command line -------------------------------------------------------------------------------------

def check_settings(*, ngram: int, examples: int, chunk_tokens: int, base: int, bos_id: int | None) -> None:
    """ConfigError naming the flag for any setting out of range (checked before any work)."""
    if not 8 <= ngram <= 1 << 16:
        raise ConfigError(f"--ngram {ngram}: must be between 8 and 65536 tokens (a run this long is always found; "
                          f"32 or 64 are the usual choices)")
    if examples < 0:
        raise ConfigError(f"--examples {examples}: must be 0 or more")
    if chunk_tokens < 1 << 12:
        raise ConfigError(f"chunk_tokens {chunk_tokens}: must be at least 4096")
    if base % 2 == 0:
        raise ConfigError(f"hash base {base}: must be odd (invertible mod 2^64)")
    if bos_id is not None and not 0 <= bos_id <= 65535:
        raise ConfigError(f"--bos-id {bos_id}: must be a token id in [0, 65535]")


def _load_tokenizer(path):
    if path is None:
        return None
    from pgolf.data.tokenizer import Tokenizer

    return Tokenizer(path)


def _bos(tok, bos_id: int | None) -> int:
    if tok is None:
        return 1 if bos_id is None else bos_id
    if tok.bos_id < 0 and bos_id is None:
        raise ConfigError(f"--tokenizer {tok.path} has no BOS token; pass --bos-id")
    if bos_id is not None and tok.bos_id >= 0 and bos_id != tok.bos_id:
        raise ConfigError(f"--bos-id {bos_id} differs from the BOS id {tok.bos_id} of --tokenizer {tok.path}; drop "
                          f"--bos-id or pass the tokenizer the shards were made with")
    return tok.bos_id if bos_id is None else bos_id


def format_report(r: OverlapReport) -> str:
    """The report as text (what the command prints)."""
    pct = (lambda x: f"{100 * x / r.val_total:.4f}%" if r.val_total else "n/a")
    lines = [
        f"train/validation overlap in {r.data}",
        f"validation: {r.val_shards} shard(s), {r.val_tokens:,} tokens, {r.val_docs:,} documents, "
        f"{r.val_total:,} {r.unit}",
        f"train: {r.train_shards} shard(s), {r.train_tokens:,} tokens, {r.train_docs:,} documents; "
        f"{r.seconds:.2f} s in all ({r.train_tokens / max(r.seconds, 1e-9) / 1e6:.1f} M train tokens/s)",
        f"every shared run of >= {r.ngram} tokens is found ({r.window}-token windows; one validation position in "
        f"{r.stride} indexed)",
        f"exact document matches: {r.exact_val_docs:,} validation documents ({r.exact_copies:,} train copies), "
        f"{r.exact_amount:,} {r.unit} ({pct(r.exact_amount)})",
        f"shared runs >= {r.ngram} tokens (whole documents excluded): {r.runs:,} in {r.run_val_docs:,} validation "
        f"documents, longest {r.longest_run:,} tokens",
        f"validation {r.unit} inside a match: {r.affected_amount:,} of {r.val_total:,} ({pct(r.affected_amount)})",
        f"hash candidates checked against the tokens: {r.window_candidates:,} windows ({r.window_collisions:,} "
        f"collisions rejected), {r.doc_candidates:,} documents ({r.doc_collisions:,} rejected)",
    ]
    for m in r.examples:
        text = f"  {m.text!r}" if m.text is not None else ""
        lines.append(f"  {m.kind:8s} val doc {m.val_doc} +{m.val_doc_offset}, {m.length:,} tokens: {m.shard} "
                     f"offset {m.offset:,}{text}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("pgolf.data.overlap", lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    check_settings(ngram=args.ngram, examples=args.examples, chunk_tokens=CHUNK_TOKENS, base=DEFAULT_BASE,
                   bos_id=args.bos_id)
    if args.json:
        from pgolf.utils import check_output

        check_output(args.json, force=args.force, what="JSON report", flag="--json")
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.quiet else None
    report = find_overlap(args.data, ngram=args.ngram, tokenizer=args.tokenizer, bos_id=args.bos_id,
                          examples=args.examples, progress=say)
    print(format_report(report))
    if args.json:
        from pgolf.utils import atomic_write_json

        atomic_write_json(args.json, report.to_dict())
        print(f"wrote {args.json}")
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pgolf.data.overlap",
                                 description="Find validation documents and long validation n-grams in the training "
                                             "shards (exact, hash-indexed, verified against the tokens).")
    ap.add_argument("--data", required=True, help="folder with fineweb_val_*.bin and fineweb_train_*.bin")
    ap.add_argument("--ngram", type=int, default=DEFAULT_NGRAM, metavar="N",
                    help=f"report shared runs of at least N tokens (default {DEFAULT_NGRAM})")
    ap.add_argument("--tokenizer", default=None, help="SentencePiece .model: shares in bytes and example text")
    ap.add_argument("--bos-id", type=int, default=None, help="document separator id (default: the tokenizer's, else 1)")
    ap.add_argument("--examples", type=int, default=10, help="examples of each kind to show (default 10)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON")
    ap.add_argument("--force", action="store_true", help="replace an existing --json file")
    ap.add_argument("--quiet", action="store_true", help="no per-shard progress on stderr")
    return ap


__all__ = ["Match", "OverlapReport", "find_overlap", "scan_chunk", "ValIndex", "PolyHash", "Prefilter", "powers",
           "lookup", "windows_equal", "extension", "doc_bounds", "doc_cuts", "stream_doc_chunks", "sampled_positions",
           "position_weights", "check_settings", "format_report", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
