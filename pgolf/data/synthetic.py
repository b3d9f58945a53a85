"""Built-in synthetic corpus with an exactly known entropy floor (the demo's and the tests' default data).

:class:`MarkovSource` is a seeded sparse first-order Markov chain over made-up lowercase words. A document
starts with a word drawn from a start distribution; after each word it ends with probability ``p_end``,
else the next word follows the chain; its text is the words joined by single spaces. The scored stream
``[BOS] doc [BOS] doc ...`` is a stationary Markov chain over {BOS} ∪ words, which gives in closed form:

- :meth:`MarkovSource.entropy_rate_bpb`: the best achievable bits per byte (BOS costs NLL but 0 bytes, the
  first word of a document has no leading space byte);
- :meth:`MarkovSource.unigram_bpb`: the best context-free predictor (a model below it has learned context);
- :meth:`MarkovSource.oracle_bits`: exact -log2 P of given documents (incl. their start and end events).

:func:`build_default_corpus` samples documents, trains a 512-piece tokenizer and writes shards + ``meta.json``
(idempotent). CLI: ``python -m pgolf.data.synthetic --out data/synthetic [--seed 0]`` prints the meta.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import string
import sys
import time
from pathlib import Path

import numpy as np

from pgolf.utils import atomic_write_json, atomic_write_text

FORMAT_VERSION = 1


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent generators for the chain's structure (stream 0) and for sampling (stream 1)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=(int(stream),))))


class MarkovSource:
    """A seeded sparse word-level Markov chain; documents end after each word with probability ``p_end``.

    Structure (all from ``seed``): ``num_words`` distinct words of ``min_word_len..max_word_len`` letters a-z;
    start probabilities ~ Dirichlet(alpha) over all words; each word has ``min_successors..max_successors``
    successors with Dirichlet(alpha) probabilities. State 0 of the chain matrices is BOS, state 1+i is word i.
    """

    def __init__(self, seed: int = 0, num_words: int = 64, min_word_len: int = 2, max_word_len: int = 8,
                 min_successors: int = 2, max_successors: int = 6, p_end: float = 1 / 60, alpha: float = 1.0):
        if not 1 <= min_word_len <= max_word_len:
            raise ValueError(f"need 1 <= min_word_len <= max_word_len, got {min_word_len}, {max_word_len}")
        if 26 ** max_word_len < 2 * num_words:
            raise ValueError(f"{num_words} distinct words do not fit in {max_word_len} letters")
        if not 1 <= min_successors <= max_successors <= num_words:
            raise ValueError(f"need 1 <= min_successors <= max_successors <= num_words, got "
                             f"{min_successors}, {max_successors}, {num_words}")
        if not 0 < p_end < 1 or alpha <= 0:
            raise ValueError(f"need 0 < p_end < 1 and alpha > 0, got p_end={p_end}, alpha={alpha}")
        self.params = {"seed": int(seed), "num_words": int(num_words), "min_word_len": int(min_word_len),
                       "max_word_len": int(max_word_len), "min_successors": int(min_successors),
                       "max_successors": int(max_successors), "p_end": float(p_end), "alpha": float(alpha)}
        rng = _rng(seed, 0)
        letters = np.array(list(string.ascii_lowercase))
        words: list[str] = []
        seen: set[str] = set()
        while len(words) < num_words:
            w = "".join(letters[rng.integers(0, 26, int(rng.integers(min_word_len, max_word_len + 1)))])
            if w not in seen:
                seen.add(w)
                words.append(w)
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        self.p_end = float(p_end)
        self.start = rng.dirichlet(np.full(num_words, alpha))
        self.P = np.zeros((num_words, num_words))
        for i in range(num_words):
            k = int(rng.integers(min_successors, max_successors + 1))
            succ = rng.choice(num_words, size=k, replace=False)
            self.P[i, succ] = rng.dirichlet(np.full(k, alpha))
        self.word_bytes = np.array([len(w.encode("utf-8")) for w in words], dtype=np.float64)

    @classmethod
    def from_tables(cls, words: list[str], start, transitions, p_end: float) -> "MarkovSource":
        """A hand-built source: ``start`` (W,) and row-stochastic ``transitions`` (W, W) float64 probabilities."""
        start = np.asarray(start, dtype=np.float64)
        trans = np.asarray(transitions, dtype=np.float64)
        w = len(words)
        if len(set(words)) != w or any((not x) or " " in x for x in words):
            raise ValueError("words must be distinct, non-empty and contain no spaces")
        if start.shape != (w,) or trans.shape != (w, w):
            raise ValueError(f"need start ({w},) and transitions ({w}, {w}), got {start.shape}, {trans.shape}")
        if (start < 0).any() or (trans < 0).any() or not np.allclose(start.sum(), 1) \
                or not np.allclose(trans.sum(axis=1), 1):
            raise ValueError("start and every row of transitions must be probability distributions")
        if not 0 < p_end < 1:
            raise ValueError(f"need 0 < p_end < 1, got {p_end}")
        self = cls.__new__(cls)
        self.params = {"custom": True, "words": list(words), "p_end": float(p_end)}
        self.words = list(words)
        self.index = {x: i for i, x in enumerate(self.words)}
        self.p_end = float(p_end)
        self.start = start
        self.P = trans
        self.word_bytes = np.array([len(x.encode("utf-8")) for x in self.words], dtype=np.float64)
        return self

    @property
    def num_words(self) -> int:
        """Number of words W (the chain has W + 1 states with BOS)."""
        return len(self.words)

    # ---- chain over {BOS} ∪ words -------------------------------------------------------------------------
    def transition_matrix(self) -> np.ndarray:
        """Q float64 (W+1, W+1): Q[0, 1+j] = start_j, Q[1+i, 0] = p_end, Q[1+i, 1+j] = (1-p_end) P_ij."""
        w = self.num_words
        q = np.zeros((w + 1, w + 1))
        q[0, 1:] = self.start
        q[1:, 0] = self.p_end
        q[1:, 1:] = (1.0 - self.p_end) * self.P
        return q

    def byte_matrix(self) -> np.ndarray:
        """B float64 (W+1, W+1): bytes of transition s -> j: len(word_j) + (1 if s is a word), 0 into BOS."""
        w = self.num_words
        b = np.zeros((w + 1, w + 1))
        b[0, 1:] = self.word_bytes
        b[1:, 1:] = self.word_bytes[None, :] + 1.0
        return b

    def stationary_distribution(self) -> np.ndarray:
        """π float64 (W+1,) with π Q = π and Σ π = 1 (a direct linear solve)."""
        q = self.transition_matrix()
        a = q.T - np.eye(q.shape[0])
        a[-1, :] = 1.0
        rhs = np.zeros(q.shape[0])
        rhs[-1] = 1.0
        return np.linalg.solve(a, rhs)

    def _bytes_per_step(self, pi: np.ndarray) -> float:
        return float(pi @ (self.transition_matrix() * self.byte_matrix()).sum(axis=1))

    def entropy_rate_bpb(self) -> float:
        """Σ_s π_s H(next | s) / Σ_s π_s E[bytes | s], in bits per byte: the floor no model can beat."""
        q = self.transition_matrix()
        pi = self.stationary_distribution()
        logq = np.log2(np.where(q > 0, q, 1.0))
        h = -(q * logq).sum(axis=1)
        return float(pi @ h) / self._bytes_per_step(pi)

    def unigram_bpb(self) -> float:
        """H(π) / E[bytes per step]: bits per byte of the best context-free predictor over {BOS} ∪ words."""
        pi = self.stationary_distribution()
        p = pi[pi > 0]
        return float(-(p * np.log2(p)).sum()) / self._bytes_per_step(pi)

    def oracle_bits(self, docs: list[str]) -> tuple[float, int]:
        """(bits, bytes): exact -log2 P of ``docs`` (start word, transitions, end event; inf if impossible)
        under this source, and their UTF-8 bytes. Raises ValueError for a word the source does not have."""
        log_start = np.log2(np.where(self.start > 0, self.start, np.nan))
        log_step = np.log2(np.where(self.P > 0, (1.0 - self.p_end) * self.P, np.nan))
        bits, nbytes = 0.0, 0
        for d, doc in enumerate(docs):
            try:
                ids = np.fromiter((self.index[w] for w in doc.split(" ")), dtype=np.int64)
            except KeyError as e:
                raise ValueError(f"document {d} has the word {e.args[0]!r}, which this source cannot emit") from None
            terms = np.concatenate([log_start[ids[:1]], log_step[ids[:-1], ids[1:]]])
            if np.isnan(terms).any():
                return math.inf, sum(len(x.encode("utf-8")) for x in docs)
            bits += -float(terms.sum()) - math.log2(self.p_end)
            nbytes += len(doc.encode("utf-8"))
        return bits, nbytes

    # ---- sampling ---------------------------------------------------------------------------------------
    def sample_word_ids(self, n_docs: int, seed: int) -> list[np.ndarray]:
        """``n_docs`` documents as int64 word-id arrays (all documents advance together, one numpy step each)."""
        if n_docs < 0:
            raise ValueError(f"n_docs must be >= 0, got {n_docs}")
        rng = _rng(seed, 1)
        cum = np.cumsum(self.P, axis=1)
        last = (self.P > 0).shape[1] - 1 - np.argmax((self.P > 0)[:, ::-1], axis=1)
        cum[np.arange(cum.shape[1])[None, :] >= last[:, None]] = 1.0  # exact 1 from the last successor on
        cum_start = np.cumsum(self.start)
        cum_start[-1] = 1.0
        cur = np.minimum(np.searchsorted(cum_start, rng.random(n_docs), side="right"), self.num_words - 1)
        steps = [cur.copy()]
        length = np.ones(n_docs, dtype=np.int64)
        alive = np.arange(n_docs)
        while alive.size:
            alive = alive[rng.random(alive.size) >= self.p_end]
            u = rng.random(alive.size)
            cur[alive] = (cum[cur[alive]] <= u[:, None]).sum(axis=1)
            length[alive] += 1
            step = np.full(n_docs, -1, dtype=np.int64)
            step[alive] = cur[alive]
            steps.append(step)
        table = np.stack(steps, axis=1)
        return [table[i, :length[i]] for i in range(n_docs)]

    def sample_documents(self, n_docs: int, seed: int) -> list[str]:
        """``n_docs`` document texts (words joined by single spaces), reproducible from ``seed``."""
        words = self.words
        return [" ".join([words[j] for j in ids.tolist()]) for ids in self.sample_word_ids(n_docs, seed)]


def build_default_corpus(out_dir: str | os.PathLike = "data/synthetic", seed: int = 0, num_train_docs: int = 13_700,
                         num_val_docs: int = 800, vocab_size: int = 512, verbose: bool = False,
                         **source_kwargs) -> dict:
    """Sample docs, train a tokenizer on the train docs, write shards and ``meta.json``; return the meta dict.

    Layout: ``out_dir/docs.jsonl`` (val docs first), ``out_dir/tokenizer_{vocab}_bpe.model``,
    ``out_dir/shards/fineweb_{val,train}_000000.bin``, ``out_dir/meta.json``. The returned dict has
    ``tokenizer_path``, ``shard_dir`` and ``docs_path`` as absolute paths (meta.json keeps them relative to
    out_dir). Idempotent: if meta.json exists with the same parameters and its files exist it is returned as is.
    """
    from pgolf.data.prepare import prepare, train_tokenizer

    out = Path(out_dir)
    source = MarkovSource(seed=seed, **source_kwargs)
    params = {"format": FORMAT_VERSION, "seed": int(seed), "num_train_docs": int(num_train_docs),
              "num_val_docs": int(num_val_docs), "vocab_size": int(vocab_size), "source": source.params}
    meta_path = out / "meta.json"
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None and old.get("params") == params:
            resolved = _resolve(old, out)
            shard_dir = Path(resolved["shard_dir"])
            names = old.get("files", {}).get("val", []) + old.get("files", {}).get("train", [])
            if Path(resolved["tokenizer_path"]).is_file() and names and all((shard_dir / n).is_file() for n in names):
                if verbose:
                    print(f"synthetic corpus in {out} is up to date", file=sys.stderr)
                return resolved
    t0 = time.perf_counter()
    if num_val_docs < 1 or num_train_docs < 1:
        raise ValueError(f"need at least one val and one train document, got {num_val_docs}, {num_train_docs}")
    docs = source.sample_documents(num_val_docs + num_train_docs, seed)
    atomic_write_text(out / "docs.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok_path = train_tokenizer(docs[num_val_docs:], vocab_size, out / f"tokenizer_{vocab_size}_bpe")
    summary = prepare(docs, out / "shards", tok_path, num_val_docs, shard_tokens=100_000_000, force=True)  # a cache
    val_bits, val_bytes = source.oracle_bits(docs[:num_val_docs])
    meta = {
        "params": params,
        "seed": int(seed),
        "num_train_docs": int(num_train_docs),
        "num_val_docs": int(num_val_docs),
        "vocab_size": summary["vocab_size"],
        "train_tokens": summary["train"]["num_tokens"],
        "val_tokens": summary["val"]["num_tokens"],
        "train_bytes": summary["train"]["num_raw_bytes"],
        "val_bytes": val_bytes,
        "entropy_floor_bpb": source.entropy_rate_bpb(),
        "unigram_bpb": source.unigram_bpb(),
        "val_oracle_bpb": val_bits / val_bytes,
        "files": {"val": summary["val"]["files"], "train": summary["train"]["files"]},
        "tokenizer_path": tok_path.name,
        "shard_dir": "shards",
        "docs_path": "docs.jsonl",
        "words": source.words,
    }
    atomic_write_json(meta_path, meta)
    if verbose:
        print(f"built synthetic corpus in {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return _resolve(meta, out)


def _resolve(meta: dict, out: Path) -> dict:
    """A copy of ``meta`` with its relative paths made absolute under ``out``."""
    res = dict(meta)
    for key in ("tokenizer_path", "shard_dir", "docs_path"):
        res[key] = str((out / meta[key]).resolve())
    return res


def main(argv: list[str] | None = None) -> dict:
    """CLI: build (or reuse) the corpus and print its meta as JSON."""
    ap = argparse.ArgumentParser(prog="python -m pgolf.data.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/synthetic", help="output directory (default data/synthetic)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    meta = build_default_corpus(args.out, seed=args.seed, verbose=args.verbose)
    printable = {k: v for k, v in meta.items() if k != "words"}
    json.dump(printable, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return meta


if __name__ == "__main__":
    main()
