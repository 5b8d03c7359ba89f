"""Retrieval: dense (FAISS), keyword (BM25), or both fused, over one index snapshot.

Hybrid is the default: dense search finds paraphrases, BM25 finds rare exact terms (names,
codes, numbers) that a 384-d sentence embedding blurs. The two ranked lists are fused by
reciprocal rank (RRF), which needs no score calibration between two very different scales;
``docs/evaluation.md`` shows what it gains on a public test collection.

Every hit also carries ``similarity``, the cosine similarity between the query and the chunk.
It means the same in every mode, so a relevance threshold (the chat's "nothing relevant was
found" gate) is set once, whatever the mode.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

from rag.config import RETRIEVAL_MODES
from rag.embedding import Embedder
from rag.errors import ConfigError, IndexMissingError
from rag.index import IndexParams, IndexStore, Snapshot
from rag.types import Hit

DEFAULT_RRF_K = 60
DEFAULT_CANDIDATES = 50

# BM25 runs here while the calling thread embeds the query (the model lets go of the GIL):
# the two overlap instead of adding up.
_keyword_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rag-bm25")


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[int]], *, k: int = DEFAULT_RRF_K, weights: Sequence[float] | None = None
) -> list[tuple[int, float]]:
    """Fuse ranked id lists: score(d) = sum_i w_i / (k + rank_i(d)), ranks from 1.

    Ties keep the order of first appearance.

    >>> reciprocal_rank_fusion([[1, 2, 3], [3, 1]], k=1)
    [(1, 0.8333333333333333), (3, 0.75), (2, 0.3333333333333333)]
    """
    weights = weights or [1.0] * len(rankings)
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for rank, key in enumerate(ranking, start=1):
            scores[key] = scores.get(key, 0.0) + weight / (k + rank)
    order = {key: i for i, key in enumerate(scores)}
    return sorted(scores.items(), key=lambda item: (-item[1], order[item[0]]))


def search_one(index: faiss.Index, vector: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` for one query vector, on this thread alone.

    FAISS spreads even a single query over OpenMP threads. When another program holds a core
    (the browser drawing the question, the model server, indexing), the search waits at
    OpenMP's barrier for a thread that is not running: 10k flat vectors took 5.9 ms median
    (p90 21 ms) on two threads against 2.3 ms (p90 6 ms) on one with one core busy, and 1.6
    against 1.1 ms with none (docs/benchmarks.md). The thread count is OpenMP's per-thread
    setting: other threads (an index build) keep theirs, and this one gets its own back.
    """
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(vector.reshape(1, -1).astype(np.float32), n)
    finally:
        faiss.omp_set_num_threads(previous)


class Retriever:
    """Searches one snapshot. Cheap to create; a snapshot never changes under it."""

    def __init__(self, snapshot: Snapshot, embedder: Embedder, *, rrf_k: int = DEFAULT_RRF_K) -> None:
        self.snapshot = snapshot
        self.embedder = embedder
        self.rrf_k = rrf_k

    def dense(self, query_vector: np.ndarray, n: int) -> list[tuple[int, float]]:
        index = self.snapshot.ann if self.snapshot.ann is not None else self.snapshot.vectors
        assert index is not None
        n = min(n, index.ntotal)
        if n == 0:
            return []
        scores, keys = search_one(index, query_vector, n)
        return [(int(key), float(s)) for key, s in zip(keys[0], scores[0], strict=True) if key != -1]

    def search(
        self,
        query: str,
        *,
        k: int = 5,
        mode: str = "hybrid",
        min_similarity: float | None = None,
        candidates: int = DEFAULT_CANDIDATES,
    ) -> list[Hit]:
        """The ``k`` best chunks for ``query``, best first, ranks from 1.

        With ``min_similarity`` set, hits below it are dropped (possibly all of them).
        """
        if mode not in RETRIEVAL_MODES:
            raise ConfigError(f"retrieval mode {mode!r} is not one of {', '.join(RETRIEVAL_MODES)}")
        if not query.strip() or len(self.snapshot) == 0:
            return []
        depth = max(candidates, k)
        pending = _keyword_pool.submit(self.snapshot.keyword.search, query, depth) if mode != "dense" else None
        try:
            query_vector = self.embedder.embed_query(query)
            dense = self.dense(query_vector, depth) if mode != "bm25" else []
        finally:
            keyword = pending.result() if pending is not None else []
        dense_rank = {key: r for r, (key, _) in enumerate(dense, start=1)}
        keyword_rank = {key: r for r, (key, _) in enumerate(keyword, start=1)}
        if mode == "dense":
            ranked = dense
        elif mode == "bm25":
            ranked = keyword
        else:
            ranked = reciprocal_rank_fusion(
                [[key for key, _ in dense], [key for key, _ in keyword]], k=self.rrf_k
            )
        hits = []
        for key, score in ranked[:k]:
            similarity = float(np.dot(query_vector, self.snapshot.vector(key)))
            if min_similarity is not None and similarity < min_similarity:
                continue
            hits.append(
                Hit(
                    chunk=self.snapshot.chunks[key],
                    score=float(score),
                    rank=len(hits) + 1,
                    similarity=similarity,
                    dense_rank=dense_rank.get(key),
                    keyword_rank=keyword_rank.get(key),
                )
            )
        return hits


class LiveIndex:
    """The newest committed snapshot, reloaded when a writer commits a new generation.

    ``snapshot()`` costs one small file read when nothing changed; callers keep the snapshot
    they got for a whole question, so an update never shows them a half-updated index.
    """

    def __init__(self, store: IndexStore, *, expected: IndexParams | None = None) -> None:
        self.store = store
        self.expected = expected
        self._snapshot: Snapshot | None = None
        self._lock = threading.Lock()

    def snapshot(self) -> Snapshot:
        generation = self.store.current_generation()
        if generation is None:
            raise IndexMissingError(
                f"no index in {self.store.root}: run `python -m rag index` (or `make run`) to build it"
            )
        with self._lock:
            if self._snapshot is None or self._snapshot.generation != generation:
                self._snapshot = self.store.load(expected=self.expected)
            return self._snapshot
