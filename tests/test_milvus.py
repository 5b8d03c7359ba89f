"""What only the Milvus store has to show: rows written per edit, replicas in separate processes,
a writer killed with -9. All against a ``milvus-lite server`` process over gRPC; all slow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rag.config import Settings
from rag.index import chunk_key
from rag.indexing import sync_index
from rag.milvus import LIVE, MilvusStore
from rag.retrieval import LiveIndex, Retriever
from rag.store import open_store
from tests import milvus_server
from tests.fakes import FakeEmbedder

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from rag.config import Settings
    from rag.indexing import sync_index
    from rag.retrieval import Retriever
    from rag.store import open_store
    from tests.fakes import SlowFakeEmbedder
    settings = Settings(corpus_dir=Path({corpus!r}), data_dir=Path({data!r}), vector_store="milvus",
                        milvus_uri={uri!r}, milvus_collection={collection!r}, embed_group=4)
    if sys.argv[1] == "index":
        report = sync_index(settings, SlowFakeEmbedder(delay=float(sys.argv[2]), batch_size=4),
                            checkpoint_seconds=0.0, wait_for_lock=True)
        print(json.dumps({{"added": report.added, "removed": report.removed}}), flush=True)
    else:
        snapshot = open_store(settings).load()
        hits = Retriever(snapshot, SlowFakeEmbedder(delay=0)).search(sys.argv[2], k=1, mode=sys.argv[3])
        print(json.dumps({{"generation": snapshot.generation, "sources": [h.chunk.source for h in hits]}}), flush=True)
    """
)


@pytest.fixture(scope="module")
def milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[milvus_server.MilvusServer]:
    if not milvus_server.available():
        pytest.skip("pymilvus / milvus-lite not installed: pip install '.[milvus]'")
    server = milvus_server.MilvusServer(tmp_path_factory.mktemp("milvus") / "data").start()
    yield server
    server.stop()


@pytest.fixture
def remote(settings: Settings, milvus: milvus_server.MilvusServer) -> Settings:
    return settings.replace(vector_store="milvus", milvus_uri=milvus.uri, milvus_collection=f"m{uuid.uuid4().hex[:12]}")


def make_corpus(corpus: Path, n: int) -> None:
    for i in range(n):
        body = "\n\n".join(f"Paragraph {j} of note {i} mentions item{i}x{j} among other things." for j in range(6))
        (corpus / f"note{i:03d}.md").write_text(f"# Note {i}\n\n{body}\n", encoding="utf-8")


def run_worker(settings: Settings, *args: str) -> dict:
    script = WORKER.format(root=str(ROOT), corpus=str(settings.corpus_dir), data=str(settings.data_dir),
                           uri=settings.milvus_uri, collection=settings.milvus_collection)
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows(store: MilvusStore, collection: str, filter: str) -> list[dict]:
    return store.client.query(collection, filter=filter, output_fields=["source", "gen_from", "gen_to"], limit=16384)


def assert_consistent(settings: Settings) -> int:
    snapshot = open_store(settings).load()
    listed = sorted(chunk_key(cid) for record in snapshot.files.values() for cid in record.chunk_ids)
    assert sorted(snapshot.chunks) == listed and len(snapshot) == len(listed)
    return len(snapshot.files)


def test_a_one_file_edit_writes_only_that_files_rows(remote: Settings) -> None:
    remote = remote.replace(chunk_tokens=30, chunk_overlap=0)  # several chunks per note
    make_corpus(remote.corpus_dir, 30)
    sync_index(remote, FakeEmbedder())
    store = open_store(remote)
    before = store.load()
    path = remote.corpus_dir / "note017.md"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("Paragraph 5 of note 17", "Paragraph 5 of note 17, now about zebras,"), encoding="utf-8")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 5_000_000_000))
    report = sync_index(remote, FakeEmbedder())
    assert report.updated == ("note017.md",)
    after = store.load()
    new = after.number
    written = rows(store, after.collection, f"gen_from == {new}")
    retired = rows(store, after.collection, f"gen_to == {new}")
    files_written = rows(store, store.files_name(after.epoch), f"gen_from == {new} or gen_to == {new}")
    assert {r["source"] for r in written + retired + files_written} == {"note017.md"}
    # Only the chunks whose text changed: the file's other chunks kept their rows.
    assert 0 < len(written) == len(retired) < len(before.files["note017.md"].chunk_ids)
    assert Retriever(after, FakeEmbedder()).search("zebras", k=1)[0].chunk.source == "note017.md"


def test_two_replicas_in_two_processes_see_each_others_updates(remote: Settings) -> None:
    (remote.corpus_dir / "volcano.md").write_text("# Volcano\n\nLava flows from the volcano.\n", encoding="utf-8")
    other = run_worker(remote, "index", "0")  # replica 1 indexes ...
    assert other["added"] == ["volcano.md"]
    live = LiveIndex(open_store(remote))  # ... replica 2 (this process) answers from it
    assert Retriever(live.snapshot(), FakeEmbedder()).search("lava", k=1)[0].chunk.source == "volcano.md"

    (remote.corpus_dir / "glacier.md").write_text("# Glacier\n\nIce carves the glacier valley.\n", encoding="utf-8")
    sync_index(remote, FakeEmbedder())  # replica 2 indexes ...
    seen = run_worker(remote, "search", "glacier ice", "bm25")  # ... replica 1 answers from it
    assert seen == {"generation": live.snapshot().generation, "sources": ["glacier.md"]}


def test_a_writer_killed_at_any_moment_leaves_a_whole_generation_and_the_next_recovers(
    remote: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_corpus(remote.corpus_dir, 24)
    store = MilvusStore(remote.milvus_uri, collection=remote.milvus_collection, lock_ttl=2.0, grace_seconds=0.0)
    script = WORKER.format(root=str(ROOT), corpus=str(remote.corpus_dir), data=str(remote.data_dir),
                           uri=remote.milvus_uri, collection=remote.milvus_collection)
    seen = []
    for n, delay in enumerate((1.0, 1.5, 2.0)):
        if n == 1:  # an edit and a deletion for the killed writer to retire half-way
            (remote.corpus_dir / "note000.md").write_text("# Note 0\n\nRewritten about otters.\n", encoding="utf-8")
            (remote.corpus_dir / "note001.md").unlink()
            for i in range(24, 36):
                (remote.corpus_dir / f"note{i:03d}.md").write_text(f"# Note {i}\n\nAbout item{i}.\n", encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-c", script, "index", "0.05"], stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        start = store.current_generation()
        while store.current_generation() == start and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(delay / 4)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        seen.append(assert_consistent(remote))
        monkeypatch.setattr("rag.indexing.open_store", lambda settings: store)
        if n < 2:
            # The dead writer's lock is broken once its heartbeat is older than the TTL.
            with store.lock(wait=True):
                store.collect_garbage()
            assert assert_consistent(remote) == seen[-1]
    assert max(seen) > 0
    report = sync_index(remote, FakeEmbedder(), wait_for_lock=True)
    assert report.skipped == ()
    assert assert_consistent(remote) == 35
    snapshot = store.load()
    chunks = snapshot.chunks_of("note000.md")
    assert "otters" in chunks[0].text and "note001.md" not in snapshot.files
    # Nothing left over: every row is live (the grace period is 0 here), none half-retired.
    physical = rows(store, snapshot.collection, "gen_from >= 0")
    assert len(physical) == len(snapshot) and all(r["gen_to"] == LIVE for r in physical)

    reference = remote.replace(milvus_collection=f"r{uuid.uuid4().hex[:12]}")
    monkeypatch.undo()
    sync_index(reference, FakeEmbedder())
    expected = open_store(reference).load()
    assert {s: r.chunk_ids for s, r in snapshot.files.items()} == {s: r.chunk_ids for s, r in expected.files.items()}


def test_moving_an_embedded_index_to_milvus_embeds_nothing_again(remote: Settings) -> None:
    make_corpus(remote.corpus_dir, 11)
    rows = "\n".join(f"| item {i} | {i * 7} grams | keep it dry |" for i in range(120))
    (remote.corpus_dir / "table.md").write_text(f"# Weights\n\n| Item | Weight | Note |\n|---|---|---|\n{rows}\n")
    embedded = remote.replace(vector_store="embedded")
    sync_index(embedded, FakeEmbedder())
    embedder = FakeEmbedder()
    report = sync_index(remote, embedder)  # the same data directory, now RAG_VECTOR_STORE=milvus
    assert len(report.added) == 12 and report.chunks_embedded == 0 and embedder.embedded == []
    here, there = open_store(embedded).load(), open_store(remote).load()
    assert {s: r.chunk_ids for s, r in here.files.items()} == {s: r.chunk_ids for s, r in there.files.items()}
    assert there.chunks_of("table.md") == here.chunks_of("table.md")  # every field, the table header included
    assert any(c.table_header == "| Item | Weight | Note |" for c in there.chunks_of("table.md"))
    key = next(iter(here.chunks))
    assert np.allclose(here.vector(key), there.vector(key))
