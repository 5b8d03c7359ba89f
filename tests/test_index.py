"""The on-disk index: round trips, versioning, atomic generations, the writer's lock."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from rag.chunking import chunk_id
from rag.errors import IndexLockedError, IndexMismatchError, IndexMissingError
from rag.index import FileRecord, IndexParams, IndexStore, Snapshot, chunk_key
from rag.types import Chunk
from tests.fakes import FakeEmbedder

PARAMS = IndexParams(
    embedding_model="fake-bow", dimension=256, chunk_tokens=200, chunk_overlap=40, window=256, chunker="t"
)


def make_chunks(source: str, texts: list[str]) -> list[Chunk]:
    chunks, offset = [], 0
    for text in texts:
        chunks.append(Chunk(chunk_id(source, None, offset, text), source, text, offset, offset + len(text)))
        offset += len(text) + 2
    return chunks


def add_file(snapshot: Snapshot, source: str, texts: list[str]) -> list[Chunk]:
    chunks = make_chunks(source, texts)
    vectors = FakeEmbedder().embed(texts)
    record = FileRecord(source, f"sha-{source}", 1, 1, tuple(c.id for c in chunks))
    snapshot.put_file(record, chunks, vectors, texts)
    return chunks


def test_commit_and_load_round_trip(tmp_path: Path) -> None:
    store = IndexStore(tmp_path / "index")
    snapshot = Snapshot(params=PARAMS)
    chunks = add_file(snapshot, "a.md", ["apples are red", "bananas are yellow"])
    add_file(snapshot, "b.md", ["the sky is blue"])
    rows = replace(make_chunks("t.md", ["| Mars | 687 days |"])[0], headings=("Planets",), title="Facts",
                   table_header="| Planet | Orbital period |")  # fmt: skip
    snapshot.put_file(FileRecord("t.md", "sha-t", 1, 1, (rows.id,)), [rows], FakeEmbedder().embed([rows.text]),
                      [rows.text])  # fmt: skip
    store.commit(snapshot)

    loaded = store.load(expected=PARAMS)
    assert loaded.params == PARAMS
    assert loaded.files == snapshot.files
    assert loaded.chunks == snapshot.chunks
    assert loaded.chunks_of("a.md") == chunks
    assert loaded.chunks_of("t.md") == [rows]  # every field of a chunk, its table header included
    key = chunk_key(chunks[1].id)
    np.testing.assert_allclose(loaded.vector(key), snapshot.vector(key))
    assert loaded.keyword.search("bananas", 5)[0][0] == key


def test_drop_file_removes_vectors_keywords_and_chunks(tmp_path: Path) -> None:
    snapshot = Snapshot(params=PARAMS)
    add_file(snapshot, "a.md", ["apples are red"])
    kept = add_file(snapshot, "b.md", ["bananas are yellow"])
    snapshot.drop_file("a.md")
    assert list(snapshot.files) == ["b.md"]
    assert list(snapshot.chunks) == [chunk_key(kept[0].id)]
    assert snapshot.vectors.ntotal == 1
    assert snapshot.keyword.search("apples", 5) == []


def test_missing_index_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(IndexMissingError, match="python -m rag index"):
        IndexStore(tmp_path / "index").load()


def test_other_parameters_are_a_mismatch(tmp_path: Path) -> None:
    store = IndexStore(tmp_path / "index")
    snapshot = Snapshot(params=PARAMS)
    add_file(snapshot, "a.md", ["x y z"])
    store.commit(snapshot)
    other = IndexParams(**{**PARAMS.__dict__, "embedding_model": "other-model"})
    with pytest.raises(IndexMismatchError, match="embedding_model changed from 'fake-bow' to 'other-model'"):
        store.load(expected=other)


def test_other_format_version_is_a_mismatch(tmp_path: Path) -> None:
    store = IndexStore(tmp_path / "index")
    store.commit(Snapshot(params=PARAMS))
    manifest = store.root / store.current_generation() / "manifest.json"
    data = json.loads(manifest.read_text())
    data["format"] = "rag-index v0"
    manifest.write_text(json.dumps(data))
    with pytest.raises(IndexMismatchError, match="rag-index v0"):
        store.load()


def test_commit_keeps_two_generations_and_clears_leftovers(tmp_path: Path) -> None:
    store = IndexStore(tmp_path / "index")
    snapshot = Snapshot(params=PARAMS)
    for i in range(4):
        add_file(snapshot, f"f{i}.md", [f"text number {i}"])
        store.commit(snapshot)
    # What a writer killed mid-commit leaves behind:
    (store.root / ".tmp-gen-000009-123").mkdir()
    (store.root / ".tmp-gen-000009-123" / "chunks.jsonl").write_text("{half")
    (store.root / ".CURRENT.tmp-123").write_text("gen-000009")
    assert store.load().files.keys() == snapshot.files.keys()
    store.collect_garbage()
    names = sorted(p.name for p in store.root.iterdir() if p.name != "lock")
    assert [n for n in names if not n.startswith("seg-")] == ["CURRENT", "gen-000003", "gen-000004"]
    # Exactly the segments the two kept generations are made of.
    used = {seg["name"] for gen in ("gen-000003", "gen-000004")
            for seg in json.loads((store.root / gen / "manifest.json").read_text())["segments"]}
    assert {n for n in names if n.startswith("seg-")} == used


def test_a_generation_without_manifest_is_never_live(tmp_path: Path) -> None:
    store = IndexStore(tmp_path / "index")
    snapshot = Snapshot(params=PARAMS)
    add_file(snapshot, "a.md", ["first version"])
    store.commit(snapshot)
    # A renamed-but-unpointed generation (killed between rename and pointer swap) is ignored.
    (store.root / "gen-000002").mkdir()
    loaded = store.load()
    assert loaded.generation == "gen-000001"
    snapshot2 = Snapshot(params=PARAMS)
    add_file(snapshot2, "b.md", ["second"])
    assert store.commit(snapshot2) == "gen-000003"
    assert list(store.load().files) == ["b.md"]


def test_lock_refuses_a_second_writer(tmp_path: Path) -> None:
    store = IndexStore(tmp_path / "index")
    with store.lock():
        with pytest.raises(IndexLockedError, match="being updated by pid"):
            with IndexStore(tmp_path / "index").lock():
                pass
    with store.lock():  # released
        pass


def test_chunk_id_collision_is_refused(tmp_path: Path) -> None:
    snapshot = Snapshot(params=PARAMS)
    chunks = make_chunks("a.md", ["same"])
    twin = Chunk(chunks[0].id, "b.md", "same", 0, 4)
    vectors = FakeEmbedder().embed(["same"])
    snapshot.put_file(FileRecord("a.md", "s", 1, 1, (chunks[0].id,)), chunks, vectors, ["same"])
    with pytest.raises(IndexMismatchError, match="collision"):
        snapshot.put_file(FileRecord("b.md", "s", 1, 1, (twin.id,)), [twin], vectors, ["same"])


def test_approximate_index_past_the_threshold_follows_updates(tmp_path: Path) -> None:
    snapshot = Snapshot(params=PARAMS)
    for i in range(60):
        add_file(snapshot, f"f{i}.md", [f"document {i} about topic{i % 7} and item{i}"])
    snapshot.update_ann(threshold=100)
    assert snapshot.ann is None  # below the threshold: exact search only
    snapshot.update_ann(threshold=50)
    assert snapshot.ann is not None and snapshot.ann.ntotal == 60
    snapshot.drop_file("f3.md")
    add_file(snapshot, "new.md", ["a brand new document"])
    assert snapshot.ann.ntotal == snapshot.vectors.ntotal == 60

    store = IndexStore(tmp_path / "index")
    store.commit(snapshot)
    loaded = store.load()
    assert loaded.ann is not None and loaded.ann_trained_on == 60
    # Probing every list makes the approximate search exact: the same neighbours.
    loaded.ann.nprobe = loaded.ann.nlist
    query = FakeEmbedder().embed(["document about topic3"])
    approx_scores, approx = loaded.ann.search(query, 10)
    exact_scores, exact = loaded.vectors.search(query, 10)
    np.testing.assert_allclose(approx_scores, exact_scores, rtol=1e-5)  # ties may swap ids


def test_a_commit_writes_only_what_changed_and_segments_stay_few(tmp_path: Path) -> None:
    store = IndexStore(tmp_path / "index")
    snapshot = Snapshot(params=PARAMS)
    for i in range(200):
        add_file(snapshot, f"f{i:03d}.md", [f"document {i} about topic{i % 7}", f"more on item{i}"])
    store.commit(snapshot)
    live = store.load()
    for round_ in range(40):
        before = {p: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file()}
        add_file(live, f"f{round_ * 3:03d}.md", [f"edited {round_} about zebras{round_}"])
        if round_ % 5 == 0:
            live.drop_file(f"f{199 - round_:03d}.md")
        store.commit(live)
        segments = json.loads((store.root / store.current_generation() / "manifest.json").read_text())["segments"]
        written = [p for p in store.root.rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns]
        # One small segment (or a merge of small ones) and a manifest: never the whole index.
        assert max(seg["rows"] for seg in segments[1:] or [{"rows": 0}]) < 200
        assert len(segments) <= 8
        if len(segments) > 1:
            assert "chunks.jsonl" not in {p.name for p in written if segments[0]["name"] in str(p)}
    # Many small commits load as the same index a single whole write gives.
    loaded = store.load()
    whole = IndexStore(tmp_path / "whole")
    whole.commit(Snapshot(params=PARAMS, files=dict(loaded.files), chunks=dict(loaded.chunks),
                          vectors=loaded.vectors, keyword=loaded.keyword))
    fresh = whole.load()
    assert loaded.files == live.files == fresh.files and loaded.chunks == live.chunks == fresh.chunks
    for key in loaded.chunks:
        np.testing.assert_array_equal(loaded.vector(key), live.vector(key))
    for query in ("zebras7", "topic3 document", "item150"):
        assert loaded.keyword.search(query, 10) == live.keyword.search(query, 10)


def test_merges_follow_files_put_back_dropped_and_re_added(tmp_path: Path) -> None:
    """Random edits, deletions and files put back as they were (their old chunk ids revived) over
    many commits of one live snapshot: after each, a reload reads back exactly what is live."""
    rng = np.random.default_rng(7)
    store = IndexStore(tmp_path / "index")
    live = Snapshot(params=PARAMS)
    versions = {f"f{i:02d}.md": [f"file {i} version 0 about topic{i}", f"tail {i}"] for i in range(30)}
    for source, texts in versions.items():
        add_file(live, source, texts)
    store.commit(live)
    live = store.load()
    for round_ in range(60):
        source = f"f{rng.integers(30):02d}.md"
        action = rng.integers(3)
        if action == 0 and source in live.files:
            live.drop_file(source)
        elif action == 1:
            add_file(live, source, versions[source])  # back as it was first
        else:
            add_file(live, source, [f"file {source} edit {round_} word{round_}"])
        store.commit(live)
        loaded = store.load()
        assert loaded.files == live.files and loaded.chunks == live.chunks, round_
        for query in (f"word{round_}", "version topic3", "tail"):
            assert loaded.keyword.search(query, 10) == live.keyword.search(query, 10), (round_, query)
