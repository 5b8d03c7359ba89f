"""Retrieval over a snapshot: modes, fusion, thresholds, and live reloading."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from rag.config import Settings
from rag.errors import ConfigError, IndexMissingError
from rag.index import IndexStore
from rag.indexing import index_params, sync_index
from rag.retrieval import LiveIndex, Retriever, reciprocal_rank_fusion, search_one
from tests.fakes import FakeEmbedder

DOCS = {
    "cats.md": "# Cats\n\nCats are small domesticated carnivores that purr and hunt mice.\n",
    "dogs.md": "# Dogs\n\nDogs are loyal companions that bark and fetch sticks.\n",
    "codes.md": "# Codes\n\nThe maintenance code for the boiler is XK-4471 and must be logged.\n",
    "weather.md": "# Weather\n\nRain falls when clouds cool and water droplets merge.\n",
}


@pytest.fixture
def indexed(settings: Settings) -> tuple[Settings, FakeEmbedder]:
    for name, text in DOCS.items():
        (settings.corpus_dir / name).write_text(text, encoding="utf-8")
    embedder = FakeEmbedder()
    sync_index(settings, embedder)
    return settings, embedder


def retriever(settings: Settings, embedder: FakeEmbedder) -> Retriever:
    return Retriever(IndexStore(settings.index_dir).load(), embedder)


@pytest.mark.parametrize("mode", ["hybrid", "dense", "bm25"])
def test_each_mode_finds_the_right_document_first(indexed: tuple[Settings, FakeEmbedder], mode: str) -> None:
    hits = retriever(*indexed).search("which animals purr and hunt mice", k=3, mode=mode)
    assert hits[0].chunk.source == "cats.md"
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    assert all(h.score >= nxt.score for h, nxt in zip(hits, hits[1:]))


def test_hybrid_hit_records_both_ranks_and_similarity(indexed: tuple[Settings, FakeEmbedder]) -> None:
    settings, embedder = indexed
    hit = retriever(settings, embedder).search("boiler code XK-4471", k=1)[0]
    assert hit.chunk.source == "codes.md"
    assert hit.dense_rank == 1 and hit.keyword_rank == 1
    query = embedder.embed_query("boiler code XK-4471")
    snapshot = IndexStore(settings.index_dir).load()
    expected = float(query @ snapshot.vector(next(k for k, c in snapshot.chunks.items() if c.source == "codes.md")))
    assert hit.similarity == pytest.approx(expected, abs=1e-6)


def test_min_similarity_filters_and_can_leave_nothing(indexed: tuple[Settings, FakeEmbedder]) -> None:
    r = retriever(*indexed)
    assert r.search("zzzz qqqq unrelated", k=4, min_similarity=0.5) == []
    hits = r.search("cats purr", k=4, min_similarity=0.2)
    assert hits and all(h.similarity >= 0.2 for h in hits)


def test_empty_query_and_bad_mode(indexed: tuple[Settings, FakeEmbedder]) -> None:
    r = retriever(*indexed)
    assert r.search("   ") == []
    with pytest.raises(ConfigError, match="not one of"):
        r.search("cats", mode="magic")


def test_k_larger_than_the_index(indexed: tuple[Settings, FakeEmbedder]) -> None:
    hits = retriever(*indexed).search("cats dogs rain boiler", k=50, mode="dense")
    assert len(hits) == len(DOCS)


def test_rrf_rewards_agreement() -> None:
    fused = reciprocal_rank_fusion([[1, 2, 3], [2, 4]], k=60)
    assert [key for key, _ in fused] == [2, 1, 4, 3]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)


def test_live_index_reloads_after_a_new_generation(indexed: tuple[Settings, FakeEmbedder]) -> None:
    settings, embedder = indexed
    live = LiveIndex(IndexStore(settings.index_dir), expected=index_params(settings, embedder))
    first = live.snapshot()
    assert live.snapshot() is first  # nothing changed: same object, no reload
    (settings.corpus_dir / "new.md").write_text("# New\n\nFresh facts about volcanoes.\n", encoding="utf-8")
    sync_index(settings, embedder)
    second = live.snapshot()
    assert second is not first and "new.md" in second.files
    assert "new.md" not in first.files  # the old snapshot a reader holds never changes


def test_live_index_without_index(settings: Settings) -> None:
    with pytest.raises(IndexMissingError):
        LiveIndex(IndexStore(settings.index_dir)).snapshot()


def test_one_query_searches_on_its_own_thread_only() -> None:
    """A single query runs without OpenMP helpers (they stall when a core is busy); the
    thread's own setting comes back afterwards."""
    vectors = np.eye(4, dtype=np.float32)
    index = faiss.IndexFlatIP(4)
    index.add(vectors)
    seen: list[int] = []
    original = index.search

    def search(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        seen.append(faiss.omp_get_max_threads())
        return original(x, k)

    index.search = search  # type: ignore[method-assign]
    mine = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(3)
    try:
        scores, keys = search_one(index, vectors[2], 2)
        assert seen == [1]
        assert faiss.omp_get_max_threads() == 3
    finally:
        faiss.omp_set_num_threads(mine)
    assert keys[0][0] == 2 and scores[0][0] == pytest.approx(1.0)
