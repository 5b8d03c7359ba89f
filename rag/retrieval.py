"""Retrieval: dense, keyword (BM25), or both fused, over one index snapshot (FAISS files or Milvus).

Hybrid is the default: dense search finds paraphrases, BM25 finds rare exact terms (names,
codes, numbers) that a 384-d sentence embedding blurs. The two ranked lists are fused by
reciprocal rank (RRF), which needs no score calibration between two very different scales;
``docs/evaluation.md`` shows what it gains on a public test collection.

Every hit also carries ``similarity``, the cosine similarity between the query and the chunk.
It means the same in every mode, so a relevance threshold (the chat's "nothing relevant was
found" gate) is set once, whatever the mode.

The fusion runs here, over the two ranked lists the snapshot returns, for both stores: Milvus's
own ``hybrid_search`` with ``RRFRanker`` would save one round trip but hides each list's ranks
(shown with every hit) and breaks ties its own way, so the two stores would rank differently.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from rag.config import RETRIEVAL_MODES
from rag.embedding import Embedder
from rag.errors import ConfigError, IndexMissingError
from rag.index import IndexParams, IndexStore, Snapshot, search_one
from rag.types import Hit

if TYPE_CHECKING:
    from rag.milvus import MilvusSnapshot, MilvusStore

__all__ = ["LiveIndex", "Retriever", "reciprocal_rank_fusion", "search_one"]

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


class Retriever:
    """Searches one snapshot. Cheap to create; a snapshot never changes under it."""

    def __init__(
        self, snapshot: Snapshot | MilvusSnapshot, embedder: Embedder, *, rrf_k: int = DEFAULT_RRF_K
    ) -> None:
        self.snapshot = snapshot
        self.embedder = embedder
        self.rrf_k = rrf_k

    def dense(self, query_vector: np.ndarray, n: int) -> list[tuple[int, float]]:
        return self.snapshot.dense_search(query_vector, n)

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
        pending = _keyword_pool.submit(self.snapshot.keyword_search, query, depth) if mode != "dense" else None
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
        top = ranked[:k]
        found = self.snapshot.fetch([key for key, _ in top])
        for key, score in top:
            chunk, vector = found[key]
            similarity = float(np.dot(query_vector, vector))
            if min_similarity is not None and similarity < min_similarity:
                continue
            hits.append(
                Hit(
                    chunk=chunk,
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

    ``snapshot()`` costs one small read when nothing changed (a file; with Milvus, one row);
    callers keep the snapshot they got for a whole question, so an update never shows them a
    half-updated index. Works with any store (``rag.store.open_store``).
    """

    def __init__(self, store: IndexStore | MilvusStore, *, expected: IndexParams | None = None) -> None:
        self.store = store
        self.expected = expected
        self._snapshot: Snapshot | None = None
        self._lock = threading.Lock()

    def snapshot(self) -> Snapshot:
        generation = self.store.current_generation()
        if generation is None:
            raise IndexMissingError(
                f"no index in {self.store.location}: run `python -m rag index` (or `make run`) to build it"
            )
        with self._lock:
            if self._snapshot is None or self._snapshot.generation != generation:
                self._snapshot = self.store.load(expected=self.expected, previous=self._snapshot)
            return self._snapshot
