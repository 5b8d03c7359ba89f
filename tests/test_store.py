"""The store contract: the same cases against the embedded store and Milvus.

Milvus is a real gRPC service (``milvus-lite server``) in its own process, reached at its URI as a
cluster would be; each test gets its own collection prefix. Milvus cases are marked slow.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from rag.config import Settings
from rag.errors import IndexLockedError, IndexMissingError
from rag.index import chunk_key
from rag.indexing import index_params, sync_index
from rag.retrieval import LiveIndex, Retriever
from rag.store import open_store
from tests import milvus_server
from tests.fakes import FakeEmbedder

DOCS = {
    "cats.md": "# Cats\n\nCats are small domesticated carnivores that purr and hunt mice at night.\n",
    "dogs.md": "# Dogs\n\nDogs are loyal companions that bark loudly and fetch sticks in parks.\n",
    "codes.md": "# Codes\n\nThe maintenance code for the boiler is XK-4471 and must be logged daily.\n",
    "weather.md": "# Weather\n\nRain falls when clouds cool and water droplets merge into drops.\n",
    "garden.md": "# Garden\n\nCompost feeds the soil; turn the compost pile weekly for healthy roots.\n",
    "ships.md": "# Ships\n\nMerchant ships crossed the harbour carrying grain, salt and timber.\n",
}
QUERIES = [
    "which animals purr and hunt mice",
    "boiler code XK-4471",
    "turning the compost pile",
    "merchant ships in the harbour",
    "why does rain fall from clouds",
    "loyal dogs fetching sticks",
]


@pytest.fixture(scope="module")
def milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[milvus_server.MilvusServer]:
    if not milvus_server.available():
        pytest.skip("pymilvus / milvus-lite not installed: pip install '.[milvus]'")
    server = milvus_server.MilvusServer(tmp_path_factory.mktemp("milvus") / "data").start()
    yield server
    server.stop()


@pytest.fixture(params=["embedded", pytest.param("milvus", marks=pytest.mark.slow)])
def store_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    if request.param == "embedded":
        return settings
    server = request.getfixturevalue("milvus")
    return settings.replace(
        vector_store="milvus", milvus_uri=server.uri, milvus_collection=f"t{uuid.uuid4().hex[:12]}"
    )


def write(corpus: Path, name: str, text: str) -> Path:
    path = corpus / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # a change even within one tick
    return path


def fill(settings: Settings, docs: dict[str, str] = DOCS) -> None:
    for name, text in docs.items():
        write(settings.corpus_dir, name, text)


def search(settings: Settings, query: str, **kw: object) -> list[str]:
    snapshot = open_store(settings).load()
    return [h.chunk.source for h in Retriever(snapshot, FakeEmbedder()).search(query, **kw)]  # type: ignore[arg-type]


def assert_consistent(settings: Settings) -> None:
    """Every chunk the file list names is searchable, and nothing else is."""
    snapshot = open_store(settings).load()
    listed = sorted(chunk_key(cid) for record in snapshot.files.values() for cid in record.chunk_ids)
    assert sorted(snapshot.chunks) == listed
    assert len(snapshot) == len(listed)


@pytest.mark.parametrize("mode", ["hybrid", "dense", "bm25"])
def test_each_mode_finds_the_right_document_first(store_settings: Settings, mode: str) -> None:
    fill(store_settings)
    sync_index(store_settings, FakeEmbedder())
    snapshot = open_store(store_settings).load()
    hits = Retriever(snapshot, FakeEmbedder()).search("which animals purr and hunt mice", k=3, mode=mode)
    assert hits[0].chunk.source == "cats.md"
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    assert all(h.score >= nxt.score for h, nxt in zip(hits, hits[1:]))
    assert all(h.score > 0 for h in hits)


def test_hits_carry_ranks_similarity_and_whole_chunks(store_settings: Settings) -> None:
    fill(store_settings)
    embedder = FakeEmbedder()
    sync_index(store_settings, embedder)
    snapshot = open_store(store_settings).load()
    hit = Retriever(snapshot, embedder).search("boiler code XK-4471", k=1)[0]
    assert (hit.chunk.source, hit.dense_rank, hit.keyword_rank) == ("codes.md", 1, 1)
    assert hit.chunk == snapshot.chunks_of("codes.md")[0] == snapshot.chunks[chunk_key(hit.chunk.id)]
    assert hit.similarity == pytest.approx(float(embedder.embed_query("boiler code XK-4471") @ snapshot.vector(
        chunk_key(hit.chunk.id))), abs=1e-5)


def test_min_similarity_and_k(store_settings: Settings) -> None:
    fill(store_settings)
    sync_index(store_settings, FakeEmbedder())
    r = Retriever(open_store(store_settings).load(), FakeEmbedder())
    assert r.search("zzzz qqqq unrelated", k=4, min_similarity=0.5) == []
    assert len(r.search("cats dogs rain boiler", k=50, mode="dense")) == len(DOCS)
    assert r.search("   ") == []
    assert r.search("zzzz qqqq", mode="bm25") == []  # no shared word: no keyword hit


def test_one_file_edit_embeds_and_replaces_only_that_file(store_settings: Settings) -> None:
    fill(store_settings)
    sync_index(store_settings, FakeEmbedder())
    write(store_settings.corpus_dir, "ships.md", DOCS["ships.md"] + "\nZebras boarded the last ship.\n")
    embedder = FakeEmbedder()
    report = sync_index(store_settings, embedder)
    assert report.updated == ("ships.md",) and len(report.unchanged) == len(DOCS) - 1
    assert embedder.embedded and all("Zebras" in text for text in embedder.embedded)
    assert search(store_settings, "zebras", k=1) == ["ships.md"]
    assert search(store_settings, "zebras", k=1, mode="bm25") == ["ships.md"]
    assert_consistent(store_settings)


def test_deleted_file_is_gone_everywhere(store_settings: Settings) -> None:
    fill(store_settings)
    sync_index(store_settings, FakeEmbedder())
    (store_settings.corpus_dir / "cats.md").unlink()
    report = sync_index(store_settings, FakeEmbedder())
    assert report.removed == ("cats.md",)
    snapshot = open_store(store_settings).load()
    assert "cats.md" not in snapshot.files and len(snapshot) == len(DOCS) - 1
    for mode in ("hybrid", "dense", "bm25"):
        assert "cats.md" not in search(store_settings, "cats purr mice", k=10, mode=mode)
    assert_consistent(store_settings)


def test_a_snapshot_never_changes_under_its_reader(store_settings: Settings) -> None:
    fill(store_settings)
    sync_index(store_settings, FakeEmbedder())
    before = open_store(store_settings).load()
    (store_settings.corpus_dir / "dogs.md").unlink()
    write(store_settings.corpus_dir, "cats.md", "# Cats\n\nNow only about lions.\n")
    write(store_settings.corpus_dir, "new.md", "# New\n\nFresh facts about volcanoes.\n")
    sync_index(store_settings, FakeEmbedder())
    old = Retriever(before, FakeEmbedder())
    assert old.search("loyal dogs fetching sticks", k=1)[0].chunk.source == "dogs.md"
    assert "volcanoes" not in " ".join(h.chunk.text for h in old.search("volcanoes", k=10))
    assert before.chunks_of("cats.md")[0].text.startswith("# Cats\n\nCats are small")
    after = Retriever(open_store(store_settings).load(), FakeEmbedder())
    assert after.search("volcanoes", k=1)[0].chunk.source == "new.md"


def test_live_index_follows_commits_and_reports_a_missing_index(store_settings: Settings) -> None:
    with pytest.raises(IndexMissingError, match="python -m rag index"):
        LiveIndex(open_store(store_settings)).snapshot()
    fill(store_settings)
    embedder = FakeEmbedder()
    sync_index(store_settings, embedder)
    live = LiveIndex(open_store(store_settings), expected=index_params(store_settings, embedder))
    first = live.snapshot()
    assert live.snapshot() is first
    write(store_settings.corpus_dir, "new.md", "# New\n\nFresh facts about volcanoes.\n")
    (store_settings.corpus_dir / "dogs.md").unlink()
    sync_index(store_settings, embedder)
    second = live.snapshot()
    assert second is not first and "new.md" in second.files and "dogs.md" not in second.files
    assert second.files == open_store(store_settings).load().files  # the incremental reload is whole


def test_only_one_writer_at_a_time(store_settings: Settings) -> None:
    one, two = open_store(store_settings), open_store(store_settings)
    with one.lock():
        with pytest.raises(IndexLockedError, match="being updated by"):
            with two.lock():
                pass
        fill(store_settings)
        with pytest.raises(IndexLockedError):
            sync_index(store_settings, FakeEmbedder())
    with two.lock():  # released
        pass
    assert sync_index(store_settings, FakeEmbedder()).added


def test_model_change_rebuilds(store_settings: Settings) -> None:
    fill(store_settings)
    sync_index(store_settings, FakeEmbedder())
    old = open_store(store_settings).load()
    report = sync_index(store_settings, FakeEmbedder(model_id="fake-bow-2"))
    assert report.rebuild_reason and "embedding_model changed" in report.rebuild_reason
    assert report.chunks_embedded == report.chunks_total == len(DOCS)
    new = open_store(store_settings).load()
    assert new.params.embedding_model == "fake-bow-2" and new.files.keys() == old.files.keys()
    assert Retriever(old, FakeEmbedder()).search("boiler", k=1)[0].chunk.source == "codes.md"  # still readable
    assert_consistent(store_settings)


def test_touched_file_is_remembered_without_reembedding(store_settings: Settings) -> None:
    fill(store_settings)
    sync_index(store_settings, FakeEmbedder())
    path = write(store_settings.corpus_dir, "cats.md", DOCS["cats.md"])  # same bytes, new mtime
    report = sync_index(store_settings, FakeEmbedder())
    assert report.unchanged and report.chunks_embedded == 0
    assert open_store(store_settings).load().files["cats.md"].mtime_ns == path.stat().st_mtime_ns
    again = FakeEmbedder()
    assert sync_index(store_settings, again).unchanged and again.embedded == []


class NoTiesEmbedder(FakeEmbedder):
    """The fake plus a faint component drawn from the whole text, so that no two similarities
    tie (tied hits may come back in either order from either store)."""

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        out = super().embed_batch(texts)
        for row, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
            out[row] += 0.05 * np.random.default_rng(seed).standard_normal(self.dimension).astype(np.float32)
        return out


@pytest.mark.slow
def test_both_stores_rank_alike(settings: Settings, milvus: milvus_server.MilvusServer) -> None:
    """Ranks, not raw scores: the same index in both stores orders every query the same way."""
    embedded = settings
    remote = settings.replace(vector_store="milvus", milvus_uri=milvus.uri, milvus_collection="alike")
    fill(embedded)
    for s in (embedded, remote):
        sync_index(s, NoTiesEmbedder())
    a, b = (Retriever(open_store(s).load(), NoTiesEmbedder()) for s in (embedded, remote))
    for query in QUERIES:
        for mode in ("dense", "bm25", "hybrid"):
            left = [(h.chunk.id, h.dense_rank, h.keyword_rank) for h in a.search(query, k=4, mode=mode)]
            right = [(h.chunk.id, h.dense_rank, h.keyword_rank) for h in b.search(query, k=4, mode=mode)]
            assert left == right, (query, mode)
        hits_a, hits_b = a.search(query, k=3, mode="dense"), b.search(query, k=3, mode="dense")
        assert [h.similarity for h in hits_a] == pytest.approx([h.similarity for h in hits_b], abs=1e-5)
