"""The incremental indexer, with the fake embedder and real FAISS."""

from __future__ import annotations

import os
import hashlib
from pathlib import Path

import numpy as np
import pytest

from rag.config import Settings
from rag.index import IndexStore
from rag.indexing import sync_index
from rag.retrieval import Retriever
from tests.fakes import FakeEmbedder


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under root with its content hash (or 'dir'/'link'), to prove nothing changed."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def write(corpus: Path, name: str, text: str) -> Path:
    path = corpus / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def many_files(corpus: Path, n: int) -> None:
    for i in range(n):
        write(corpus, f"notes/file{i:03d}.md", f"# File {i}\n\nThis note number {i} talks about topic{i} and more.\n")


def search(settings: Settings, embedder: FakeEmbedder, query: str, **kw: object) -> list[str]:
    snapshot = IndexStore(settings.index_dir).load()
    return [h.chunk.source for h in Retriever(snapshot, embedder).search(query, **kw)]  # type: ignore[arg-type]


def test_first_run_indexes_everything_and_second_run_nothing(settings: Settings) -> None:
    many_files(settings.corpus_dir, 5)
    embedder = FakeEmbedder()
    report = sync_index(settings, embedder)
    assert len(report.added) == 5 and report.chunks_total == report.chunks_embedded > 0
    assert report.rebuild_reason is None

    again = FakeEmbedder()
    report2 = sync_index(settings, again)
    assert (report2.added, report2.updated, report2.removed) == ((), (), ())
    assert len(report2.unchanged) == 5
    assert again.embedded == [] and report2.chunks_embedded == 0
    assert search(settings, again, "topic3", k=1) == ["notes/file003.md"]


def test_nothing_changed_is_decided_from_the_file_records_without_loading_the_index(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    many_files(settings.corpus_dir, 4)
    first = sync_index(settings, FakeEmbedder())

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the whole index was loaded")

    monkeypatch.setattr(IndexStore, "load", refuse)
    report = sync_index(settings, FakeEmbedder())
    assert (report.added, report.updated, report.removed, report.chunks_embedded) == ((), (), (), 0)
    assert report.unchanged == first.added and report.chunks_total == first.chunks_total
    # Anything that may have changed goes the full way: a new stat, a deleted file.
    bump_mtime(settings.corpus_dir / "notes/file001.md")
    with pytest.raises(AssertionError, match="loaded"):
        sync_index(settings, FakeEmbedder())
    monkeypatch.undo()
    sync_index(settings, FakeEmbedder())
    monkeypatch.setattr(IndexStore, "load", refuse)
    (settings.corpus_dir / "notes/file002.md").unlink()
    with pytest.raises(AssertionError, match="loaded"):
        sync_index(settings, FakeEmbedder())


def test_changing_one_file_among_many_embeds_only_that_file(settings: Settings) -> None:
    many_files(settings.corpus_dir, 40)
    sync_index(settings, FakeEmbedder())
    path = write(settings.corpus_dir, "notes/file017.md", "# File 17\n\nRewritten: now about zebras only.\n")
    bump_mtime(path)

    embedder = FakeEmbedder()
    report = sync_index(settings, embedder)
    assert report.updated == ("notes/file017.md",)
    assert len(report.unchanged) == 39
    snapshot = IndexStore(settings.index_dir).load()
    own_chunks = snapshot.chunks_of("notes/file017.md")
    # Only the chunks of the changed file whose text is new were embedded.
    assert 0 < report.chunks_embedded <= len(own_chunks)
    assert all("zebras" in text for text in embedder.embedded)
    assert search(settings, embedder, "zebras", k=1) == ["notes/file017.md"]


def test_deleted_file_is_removed(settings: Settings) -> None:
    many_files(settings.corpus_dir, 3)
    sync_index(settings, FakeEmbedder())
    (settings.corpus_dir / "notes/file001.md").unlink()
    report = sync_index(settings, FakeEmbedder())
    assert report.removed == ("notes/file001.md",)
    snapshot = IndexStore(settings.index_dir).load()
    assert "notes/file001.md" not in snapshot.files
    assert all(c.source != "notes/file001.md" for c in snapshot.chunks.values())
    assert "notes/file001.md" not in search(settings, FakeEmbedder(), "topic1", k=5)


def test_touched_but_unchanged_file_is_not_reembedded(settings: Settings) -> None:
    many_files(settings.corpus_dir, 2)
    sync_index(settings, FakeEmbedder())
    bump_mtime(settings.corpus_dir / "notes/file000.md")
    embedder = FakeEmbedder()
    report = sync_index(settings, embedder)
    assert report.updated == () and embedder.embedded == []
    assert "notes/file000.md" in report.unchanged


def test_renamed_file_reuses_its_vectors(settings: Settings) -> None:
    many_files(settings.corpus_dir, 2)
    sync_index(settings, FakeEmbedder())
    os.rename(settings.corpus_dir / "notes/file000.md", settings.corpus_dir / "notes/renamed.md")
    embedder = FakeEmbedder()
    report = sync_index(settings, embedder)
    assert report.added == ("notes/renamed.md",) and report.removed == ("notes/file000.md",)
    # The title prefix is the file's first heading, unchanged by the rename: nothing to embed.
    assert embedder.embedded == []


def test_identical_files_are_both_indexed_and_embedded_once(settings: Settings) -> None:
    text = "# Twins\n\nIdentical content about quasars and pulsars.\n"
    write(settings.corpus_dir, "a.md", text)
    write(settings.corpus_dir, "b.md", text)
    embedder = FakeEmbedder()
    report = sync_index(settings, embedder)
    assert report.added == ("a.md", "b.md")
    assert len(embedder.embedded) == len(set(embedder.embedded))
    assert sorted(search(settings, embedder, "quasars", k=2)) == ["a.md", "b.md"]


def test_model_change_rebuilds_and_says_why(settings: Settings) -> None:
    many_files(settings.corpus_dir, 2)
    sync_index(settings, FakeEmbedder())
    embedder = FakeEmbedder(model_id="fake-bow-2")
    report = sync_index(settings, embedder)
    assert report.rebuild_reason is not None
    assert "embedding_model changed from 'fake-bow' to 'fake-bow-2'" in report.rebuild_reason
    assert len(report.added) == 2 and report.chunks_embedded == report.chunks_total


def test_chunking_change_rebuilds_and_says_why(settings: Settings) -> None:
    many_files(settings.corpus_dir, 2)
    sync_index(settings, FakeEmbedder())
    report = sync_index(settings.replace(chunk_tokens=100), FakeEmbedder())
    assert report.rebuild_reason is not None and "chunk_tokens changed from 200 to 100" in report.rebuild_reason


def test_bad_files_are_skipped_with_reasons_and_the_rest_indexed(settings: Settings) -> None:
    corpus = settings.corpus_dir
    write(corpus, "good.md", "# Good\n\nA perfectly fine document about otters.\n")
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (corpus / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ngarbage")
    (corpus / "big.txt").write_bytes(b"word " * 300_000)
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n")
    before = tree_digest(corpus)
    report = sync_index(settings.replace(max_file_mb=1.0), FakeEmbedder())
    assert report.added == ("good.md",)
    reasons = {s.source: s.reason for s in report.skipped}
    assert set(reasons) == {"empty.txt", "binary.txt", "broken.pdf", "big.txt"}
    assert "empty" in reasons["empty.txt"]
    assert "binary" in reasons["binary.txt"]
    assert "PDF" in reasons["broken.pdf"]
    assert "too large" in reasons["big.txt"]
    assert report.ignored == 1
    assert tree_digest(corpus) == before  # nothing written into the corpus
    assert search(settings, FakeEmbedder(), "otters", k=1) == ["good.md"]


def test_a_file_that_turns_bad_keeps_its_previous_version(settings: Settings) -> None:
    write(settings.corpus_dir, "doc.md", "# Doc\n\nThe original text about herons.\n")
    sync_index(settings, FakeEmbedder())
    path = settings.corpus_dir / "doc.md"
    path.write_bytes(b"\x00\x01\x02" * 100)
    bump_mtime(path)
    report = sync_index(settings, FakeEmbedder())
    assert [s.source for s in report.skipped] == ["doc.md"]
    assert report.notes == ("doc.md: kept the previously indexed version",)
    assert search(settings, FakeEmbedder(), "herons", k=1) == ["doc.md"]


def test_file_deleted_between_scan_and_read_is_skipped(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    many_files(settings.corpus_dir, 3)
    import rag.indexing as indexing

    real_scan = indexing.scan_corpus

    def scan_then_delete(*args, **kwargs):  # type: ignore[no-untyped-def]
        scan = real_scan(*args, **kwargs)
        (settings.corpus_dir / "notes/file002.md").unlink()
        return scan

    monkeypatch.setattr(indexing, "scan_corpus", scan_then_delete)
    report = sync_index(settings, FakeEmbedder())
    assert report.added == ("notes/file000.md", "notes/file001.md")
    assert [(s.source, s.reason) for s in report.skipped] == [
        ("notes/file002.md", "file disappeared while indexing")
    ]
    monkeypatch.undo()
    report2 = sync_index(settings, FakeEmbedder())
    assert report2.added == () and report2.skipped == ()


def test_chunks_of_many_files_are_embedded_together_in_groups(settings: Settings) -> None:
    many_files(settings.corpus_dir, 7)
    write(settings.corpus_dir, "copy.md", "# File 0\n\nThis note number 0 talks about topic0 and more.\n")
    calls: list[int] = []

    class Counting(FakeEmbedder):
        def embed(self, texts, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(len(texts))
            return super().embed(texts, **kwargs)

    report = sync_index(settings.replace(embed_group=3), Counting())
    # Files are gathered until a group holds 3 texts to embed; a text already embedded (the
    # copy of file 0) is not embedded twice.
    assert calls == [3, 3, 1]
    assert report.chunks_embedded == 7 and report.chunks_total == 8
    one_by_one = settings.replace(data_dir=settings.data_dir.parent / "one-by-one", embed_group=1)
    sync_index(one_by_one, FakeEmbedder())
    grouped, single = IndexStore(settings.index_dir).load(), IndexStore(one_by_one.index_dir).load()
    assert {s: r.chunk_ids for s, r in grouped.files.items()} == {s: r.chunk_ids for s, r in single.files.items()}
    for key in single.chunks:
        np.testing.assert_array_equal(grouped.vector(key), single.vector(key))


def test_checkpoints_commit_finished_files_along_the_way(settings: Settings) -> None:
    many_files(settings.corpus_dir, 6)
    store = IndexStore(settings.index_dir)
    sync_index(settings.replace(embed_group=1), FakeEmbedder(), checkpoint_seconds=0.0)
    # One generation per checkpoint plus the final one; only the newest two are kept.
    assert store.current_generation() == "gen-000007"
    assert len(store.load().files) == 6


def test_files_of_a_folder_that_turns_unreadable_are_kept(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    write(settings.corpus_dir, "private/secret.md", "# Secret\n\nNotes about lighthouses.\n")
    write(settings.corpus_dir, "public.md", "# Public\n\nNotes about harbours.\n")
    sync_index(settings, FakeEmbedder())
    import rag.indexing as indexing
    from rag.loaders import Scan
    from rag.types import SkippedFile

    real_scan = indexing.scan_corpus

    def scan_without_private(*args, **kwargs):  # type: ignore[no-untyped-def]
        scan = real_scan(*args, **kwargs)
        files = tuple(f for f in scan.files if not f.source.startswith("private/"))
        return Scan(files=files, skipped=(SkippedFile("private/", "permission denied"),), ignored=0)

    monkeypatch.setattr(indexing, "scan_corpus", scan_without_private)
    report = sync_index(settings, FakeEmbedder())
    assert report.removed == ()
    assert report.notes == ("private/secret.md: kept the previously indexed version",)
    assert search(settings, FakeEmbedder(), "lighthouses", k=1) == ["private/secret.md"]


def test_file_changed_between_scan_and_read_is_indexed_as_read(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(settings.corpus_dir, "live.md", "# Live\n\nFirst draft about walruses.\n")
    import rag.indexing as indexing

    real_scan = indexing.scan_corpus

    def scan_then_edit(*args, **kwargs):  # type: ignore[no-untyped-def]
        scan = real_scan(*args, **kwargs)
        path = write(settings.corpus_dir, "live.md", "# Live\n\nSecond draft, now about narwhals instead.\n")
        bump_mtime(path)
        return scan

    monkeypatch.setattr(indexing, "scan_corpus", scan_then_edit)
    sync_index(settings, FakeEmbedder())
    monkeypatch.undo()
    # The bytes read are what is indexed, whole: never half of one version and half of another.
    assert search(settings, FakeEmbedder(), "narwhals", k=1) == ["live.md"]
    assert all("walruses" not in c.text for c in IndexStore(settings.index_dir).load().chunks.values())
    # The next run notices the stat changed, finds the same content, and embeds nothing.
    embedder = FakeEmbedder()
    report = sync_index(settings, embedder)
    assert report.unchanged == ("live.md",) and embedder.embedded == []
