"""Keyword search: Okapi BM25 over chunks, updated in place and saved as one ``.npz`` file.

Dense retrieval misses exact words (names, error codes, numbers); BM25 catches them.

Layout and trade-offs:

- Postings are kept term-major in CSR form (``indptr`` over term ids, then doc rows and term
  frequencies), the shape a query needs, and the shape saved to disk, so loading is a few
  array reads with no sorting.
- ``add`` tokenizes only the new texts and appends them to a small *tail*; ``remove`` only
  flips a row's alive bit. A search reads the base postings plus the tail, skipping dead
  rows, and counts document frequencies over live rows, so scores always equal those of a
  fresh build over the same documents. Each query term's scores are cached until a change.
- When the tail or the dead rows grow past a quarter of the base, the postings are merged
  and compacted, lazily, at the next search or save. No text is ever tokenized twice.
- Tokens are ``\\w+`` runs, so CJK text without spaces becomes long tokens: fine for names
  and codes, weak for prose in those scripts (the dense retriever covers it).
"""

from __future__ import annotations

import json
import re
import threading
import unicodedata
import zipfile
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import Stemmer  # type: ignore[import-not-found]  # PyStemmer ships no type hints

from rag.errors import IndexMismatchError, IndexMissingError

FORMAT_VERSION = "rag-bm25 v1"
# The textbook Okapi values (Lucene's defaults). On CISI (title + abstract) they give
# nDCG@10 0.384 against 0.361 for the k1=0.9, b=0.4 of Anserini's BEIR runs; k1=2.0 edges
# ahead (0.391), too little to leave the standard values for.
DEFAULT_K1 = 1.2
DEFAULT_B = 0.75

# Lucene's English stop set: short, so that phrases like "to be or not to be" keep some words.
STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their "
    "then there these they this to was will with".split()
)

_WORD = re.compile(r"\w+")
_local = threading.local()  # a PyStemmer object must not be shared between threads


def _stemmer() -> Stemmer.Stemmer:
    stemmer = getattr(_local, "stemmer", None)
    if stemmer is None:
        stemmer = _local.stemmer = Stemmer.Stemmer("english")
    return stemmer


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens, stopwords dropped, Snowball-stemmed; numbers are kept.

    ``"The ﬁrst editions of 1876"`` -> ``["first", "edit", "1876"]``
    """
    # NFKC folds ligatures and full-width forms that PDF extraction leaves behind ("ﬁ" -> "fi").
    words = _WORD.findall(unicodedata.normalize("NFKC", text).lower())
    stems: list[str] = _stemmer().stemWords([w for w in words if w not in STOPWORDS])
    return stems


class KeywordIndex:
    """BM25 over int64 chunk keys. Safe to share between threads (one lock guards all state).

    >>> index = KeywordIndex()
    >>> index.add([7, 9], ["red apples", "green pears"])
    >>> [key for key, _ in index.search("apple", k=5)]
    [7]
    """

    def __init__(self, *, k1: float = DEFAULT_K1, b: float = DEFAULT_B) -> None:
        self.k1 = float(k1)
        self.b = float(b)
        self._lock = threading.RLock()
        self._vocab: dict[str, int] = {}
        self._terms: list[str] = []
        # Surface word -> term id (-1 for a stopword), so each distinct word is stemmed once.
        self._word_ids: dict[str, int] = {}
        # Per row: a document slot; a removed document leaves a dead row until compaction.
        self._ids = np.zeros(0, np.int64)
        self._lengths = np.zeros(0, np.int32)
        self._alive = np.zeros(0, bool)
        self._row_of: dict[int, int] = {}
        self._total_length = 0
        # Base postings over rows [0, base_rows), term-major CSR.
        self._base_rows = 0
        self._indptr = np.zeros(1, np.int64)
        self._post_rows = np.zeros(0, np.int32)
        self._post_tfs = np.zeros(0, np.int32)
        # Tail: documents added since the last compaction, as doc-major (row, term, tf) triples.
        self._tail: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._tail_csr: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        # Per query term, its live rows and their BM25 scores; any change clears it.
        self._term_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cached_postings = 0

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, key: object) -> bool:
        return key in self._row_of

    def add(self, ids: Sequence[int], texts: Sequence[str]) -> None:
        """Index ``texts`` under ``ids``; an id already present is replaced."""
        if len(ids) != len(texts):
            raise ValueError(f"add() got {len(ids)} ids but {len(texts)} texts")
        keys = [int(key) for key in ids]
        if len(set(keys)) != len(keys):
            raise ValueError("add() got the same id twice in one call")
        with self._lock:
            self.remove(keys)
            if not keys:
                return
            # array.array grows in C and hands its buffer to numpy without a copy.
            terms, tfs, sizes, lengths = (array("i") for _ in range(4))
            for text in texts:
                counts = self._count_terms(text)
                terms.extend(counts)
                tfs.extend(counts.values())
                sizes.append(len(counts))
                lengths.append(counts.total())
            first = len(self._ids)
            rows = np.repeat(np.arange(first, first + len(keys), dtype=np.int32), sizes)
            self._tail.append((rows, np.frombuffer(terms, np.intc), np.frombuffer(tfs, np.intc)))
            self._ids = np.concatenate([self._ids, np.asarray(keys, np.int64)])
            self._lengths = np.concatenate([self._lengths, np.frombuffer(lengths, np.intc)])
            self._alive = np.concatenate([self._alive, np.ones(len(keys), bool)])
            self._row_of.update(zip(keys, range(first, first + len(keys)), strict=True))
            self._total_length += sum(lengths)
            self._tail_csr = None
            self._forget_scores()

    def remove(self, ids: Iterable[int]) -> None:
        """Forget ``ids``; unknown ids are ignored."""
        with self._lock:
            for key in ids:
                row = self._row_of.pop(int(key), None)
                if row is not None:
                    self._alive[row] = False
                    self._total_length -= int(self._lengths[row])
                    self._forget_scores()

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` best ``(id, score)`` pairs, best first, ties by id; only scores > 0."""
        with self._lock:
            # Compaction renumbers terms: it must come before the query is mapped to term ids.
            self._maybe_compact()
            query_terms = Counter(self._vocab[t] for t in tokenize(query) if t in self._vocab)
            if k <= 0 or not query_terms or not self._row_of:
                return []
            scores = np.zeros(len(self._ids), np.float64)
            for term, query_tf in query_terms.items():
                rows, term_scores = self._term_scores(term)
                # Rows are unique within one term's postings, so fancy-index += is exact.
                scores[rows] += query_tf * term_scores
            candidates = np.flatnonzero(scores > 0)
            if len(candidates) > k:
                cut = candidates[np.argpartition(-scores[candidates], k - 1)[:k]]
                # Keep every row tied with the k-th, so that ties are broken by id below.
                candidates = candidates[scores[candidates] >= scores[cut].min()]
            top = candidates[np.lexsort((self._ids[candidates], -scores[candidates]))[:k]]
            return [(int(key), float(score)) for key, score in zip(self._ids[top], scores[top], strict=True)]

    def save(self, path: Path) -> None:
        """Write the index to exactly ``path`` (one ``.npz`` file, whatever its suffix)."""
        with self._lock:
            self._compact()
            vocab = json.dumps(self._terms, ensure_ascii=False).encode("utf-8")
            tfs = self._post_tfs
            if tfs.max(initial=0) < 2**16:  # nearly always: a quarter of the file saved
                tfs = tfs.astype(np.uint16)
            # Through a file object: np.savez given a name would append ".npz" to it.
            with open(path, "wb") as file:
                np.savez(
                    file,
                    format=np.array(FORMAT_VERSION),
                    params=np.array([self.k1, self.b], np.float64),
                    vocab=np.frombuffer(vocab, np.uint8),
                    ids=self._ids,
                    lengths=self._lengths,
                    indptr=self._indptr,
                    rows=self._post_rows,
                    tfs=tfs,
                )

    @classmethod
    def load(cls, path: Path) -> KeywordIndex:
        """Read an index written by ``save``; a file of another format raises ``IndexMismatchError``."""
        hint = "delete it and index again to rebuild it"
        try:
            data = np.load(path, allow_pickle=False)
        except FileNotFoundError as exc:
            raise IndexMissingError(f"{path}: no keyword index yet; run `python -m rag index`") from exc
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise IndexMismatchError(f"{path}: not a keyword index ({exc}); {hint}") from exc
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
            raise IndexMismatchError(f"{path}: not a keyword index; {hint}")
        with data:
            version = str(data["format"]) if "format" in data.files else "no version"
            if version != FORMAT_VERSION:
                raise IndexMismatchError(
                    f"{path}: keyword index format is {version!r}, expected {FORMAT_VERSION!r}; {hint}"
                )
            try:
                k1, b = (float(x) for x in data["params"])
                index = cls(k1=k1, b=b)
                index._terms = json.loads(data["vocab"].tobytes().decode("utf-8"))
                index._ids = data["ids"].astype(np.int64, copy=False)
                index._lengths = data["lengths"].astype(np.int32, copy=False)
                index._indptr = data["indptr"].astype(np.int64, copy=False)
                index._post_rows = data["rows"].astype(np.int32, copy=False)
                index._post_tfs = data["tfs"].astype(np.int32, copy=False)
            except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
                raise IndexMismatchError(f"{path}: damaged keyword index ({exc}); {hint}") from exc
        n_rows = len(index._ids)
        n_postings = len(index._post_rows)
        if (
            len(index._lengths) != n_rows
            or len(index._indptr) != len(index._terms) + 1
            or index._indptr[-1] != n_postings
            or len(index._post_tfs) != n_postings
            or (n_postings and not 0 <= index._post_rows.min() <= index._post_rows.max() < n_rows)
        ):
            raise IndexMismatchError(f"{path}: damaged keyword index (array lengths disagree); {hint}")
        index._vocab = {term: i for i, term in enumerate(index._terms)}
        index._alive = np.ones(n_rows, bool)
        index._row_of = dict(zip(index._ids.tolist(), range(n_rows), strict=True))
        if len(index._row_of) != n_rows:
            raise IndexMismatchError(f"{path}: damaged keyword index (an id appears twice); {hint}")
        index._total_length = int(index._lengths.sum(dtype=np.int64))
        index._base_rows = n_rows
        return index

    @classmethod
    def merged(cls, parts: Sequence[tuple[KeywordIndex, Iterable[int] | None]]) -> KeywordIndex:
        """One index from several, each keeping only the given ids (``None``: all); no text is
        tokenized again. The ids kept must not repeat across parts.

        >>> a, b = KeywordIndex(), KeywordIndex()
        >>> a.add([1, 2], ["red apples", "old pears"]); b.add([3], ["green apples"])
        >>> [key for key, _ in KeywordIndex.merged([(a, [1]), (b, None)]).search("apples", 5)]
        [1, 3]
        """
        first = parts[0][0] if parts else cls()
        out = cls(k1=first.k1, b=first.b)
        vocab: dict[str, int] = {}
        ids, lengths, terms, rows, tfs = [], [], [], [], []
        offset = 0
        for index, keep in parts:
            with index._lock:
                index._compact()
                mapping = np.fromiter((vocab.setdefault(t, len(vocab)) for t in index._terms), np.int64,
                                      count=len(index._terms))
                kept = np.ones(len(index._ids), bool) if keep is None else np.isin(
                    index._ids, np.fromiter(keep, np.int64))
                new_row = (np.cumsum(kept) - 1 + offset).astype(np.int32)
                term_of = np.repeat(np.arange(len(index._terms), dtype=np.int64), np.diff(index._indptr))
                live = kept[index._post_rows]
                terms.append(mapping[term_of[live]])
                rows.append(new_row[index._post_rows[live]])
                tfs.append(index._post_tfs[live])
                ids.append(index._ids[kept])
                lengths.append(index._lengths[kept])
                offset += int(kept.sum())
        if not ids:
            return out
        term_arr = np.concatenate(terms).astype(np.int32)
        row_arr, tf_arr = np.concatenate(rows), np.concatenate(tfs)
        order = np.lexsort((row_arr, term_arr))
        out._terms = list(vocab)
        out._vocab = dict(vocab)
        out._indptr = np.concatenate([[0], np.cumsum(np.bincount(term_arr, minlength=len(vocab)))]).astype(np.int64)
        out._post_rows, out._post_tfs = row_arr[order].astype(np.int32), tf_arr[order].astype(np.int32)
        out._ids = np.concatenate(ids).astype(np.int64)
        out._lengths = np.concatenate(lengths).astype(np.int32)
        out._alive = np.ones(len(out._ids), bool)
        out._row_of = dict(zip(out._ids.tolist(), range(len(out._ids)), strict=True))
        if len(out._row_of) != len(out._ids):
            raise ValueError("merged() got the same id in two parts")
        out._total_length = int(out._lengths.sum(dtype=np.int64))
        out._base_rows = len(out._ids)
        return out

    def _count_terms(self, text: str) -> Counter[int]:
        """Term id -> frequency in ``text``; what ``tokenize`` gives, without stemming a word twice."""
        words = _WORD.findall(unicodedata.normalize("NFKC", text).lower())
        try:
            counts = Counter(map(self._word_ids.__getitem__, words))
        except KeyError:  # new words: rare once the index has seen some text
            unseen = set(words).difference(self._word_ids)
            fresh = sorted(unseen - STOPWORDS)
            self._word_ids.update(dict.fromkeys(unseen & STOPWORDS, -1))
            self._word_ids.update(zip(fresh, map(self._term_id, _stemmer().stemWords(fresh)), strict=True))
            counts = Counter(map(self._word_ids.__getitem__, words))
        del counts[-1]
        return counts

    def _term_id(self, term: str) -> int:
        term_id = self._vocab.get(term)
        if term_id is None:
            term_id = self._vocab[term] = len(self._terms)
            self._terms.append(term)
        return term_id

    def _term_scores(self, term: int) -> tuple[np.ndarray, np.ndarray]:
        """The live rows holding ``term`` and their BM25 scores for it; cached until a change."""
        cached = self._term_cache.get(term)
        if cached is None:
            rows, tfs = self._postings(term)
            if len(self._row_of) < len(self._ids):
                live = self._alive[rows]
                rows, tfs = rows[live], tfs[live]
            n_docs, df = len(self._row_of), len(rows)
            idf = np.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))
            avg_length = self._total_length / n_docs or 1.0
            norm = self.k1 * (1.0 - self.b + self.b * self._lengths[rows] / avg_length)
            cached = rows, idf * tfs * (self.k1 + 1.0) / (tfs + norm)
            if self._cached_postings > len(self._post_rows):  # bound memory to about the postings'
                self._forget_scores()
            self._term_cache[term] = cached
            self._cached_postings += len(rows)
        return cached

    def _forget_scores(self) -> None:
        self._term_cache.clear()
        self._cached_postings = 0

    def _tail_postings(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tail as term-major CSR: ``(indptr, rows, tfs)``."""
        if self._tail_csr is None:
            rows, terms, tfs = self._tail_triples()
            order = _stable_order(terms)
            indptr = np.searchsorted(terms[order], np.arange(len(self._terms) + 1))
            self._tail_csr = (indptr, rows[order], tfs[order])
        return self._tail_csr

    def _tail_triples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tail's ``(rows, terms, tfs)``, doc-major."""
        if not self._tail:
            return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32)
        if len(self._tail) == 1:
            return self._tail[0]
        rows, terms, tfs = zip(*self._tail, strict=True)
        return np.concatenate(rows), np.concatenate(terms), np.concatenate(tfs)

    def _postings(self, term: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and term frequencies of ``term``, base then tail, dead rows included."""
        start, end = (self._indptr[term], self._indptr[term + 1]) if term + 1 < len(self._indptr) else (0, 0)
        rows, tfs = self._post_rows[start:end], self._post_tfs[start:end]
        if self._tail:
            indptr, tail_rows, tail_tfs = self._tail_postings()
            start, end = indptr[term], indptr[term + 1]
            if end > start:
                rows = np.concatenate([rows, tail_rows[start:end]])
                tfs = np.concatenate([tfs, tail_tfs[start:end]])
        return rows, tfs

    def _maybe_compact(self) -> None:
        tail = len(self._ids) - self._base_rows
        dead = len(self._ids) - len(self._row_of)
        if 4 * tail > self._base_rows or 4 * dead > len(self._ids):
            self._compact()

    def _compact(self) -> None:
        """Merge the tail into the base; drop dead rows and terms no live document uses."""
        if len(self._ids) == self._base_rows and len(self._row_of) == len(self._ids):
            return
        terms = np.repeat(np.arange(len(self._indptr) - 1, dtype=np.int32), np.diff(self._indptr))
        rows, tfs = self._post_rows, self._post_tfs
        if self._tail:
            tail_rows, tail_terms, tail_tfs = self._tail_triples()
            if self._base_rows:
                terms = np.concatenate([terms, tail_terms])
                rows = np.concatenate([rows, tail_rows])
                tfs = np.concatenate([tfs, tail_tfs])
            else:
                terms, rows, tfs = tail_terms, tail_rows, tail_tfs
        if len(self._row_of) < len(self._ids):
            live = self._alive[rows]
            new_row = (np.cumsum(self._alive) - 1).astype(np.int32)
            terms, rows, tfs = terms[live], new_row[rows[live]], tfs[live]
        if self._tail:
            # Base entries are in (term, row) order and tail rows follow base rows in row
            # order, so a stable sort on term alone gives (term, row) order.
            order = _stable_order(terms)
            rows, tfs = rows[order], tfs[order]
        counts = np.bincount(terms, minlength=len(self._terms))
        used = counts > 0
        if not used.all():
            self._terms = [term for term, keep in zip(self._terms, used.tolist(), strict=True) if keep]
            self._vocab = {term: i for i, term in enumerate(self._terms)}
            self._word_ids = {}  # its term ids are renumbered
            counts = counts[used]
        self._indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._post_rows, self._post_tfs = rows, tfs
        self._ids, self._lengths = self._ids[self._alive], self._lengths[self._alive]
        self._alive = np.ones(len(self._ids), bool)
        self._row_of = dict(zip(self._ids.tolist(), range(len(self._ids)), strict=True))
        self._base_rows = len(self._ids)
        self._tail, self._tail_csr = [], None
        self._forget_scores()


def _stable_order(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for non-negative int32 keys, several times faster.

    Packing the position under the key makes every value unique, so numpy's fast (SIMD)
    value sort gives the stable order: ``[2, 0, 2, 1] -> [1, 3, 0, 2]``.
    """
    packed = keys.astype(np.int64)
    packed <<= 32
    packed |= np.arange(len(keys), dtype=np.int64)
    packed.sort()
    packed &= 0xFFFFFFFF
    return packed
