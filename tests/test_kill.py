"""Kill -9 the indexer at many moments: the index on disk always loads, and a rerun completes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rag.config import Settings
from rag.errors import IndexMissingError
from rag.index import IndexStore, chunk_key
from rag.indexing import sync_index
from tests.fakes import FakeEmbedder

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from rag.config import Settings
    from rag.indexing import sync_index
    from tests.fakes import SlowFakeEmbedder
    settings = Settings(corpus_dir=Path({corpus!r}), data_dir=Path({data!r}), embed_group=4)
    sync_index(settings, SlowFakeEmbedder(delay=0.01, batch_size=4), checkpoint_seconds=0.0, wait_for_lock=True)
    print("done", flush=True)
    """
)


def make_corpus(corpus: Path, n: int) -> None:
    for i in range(n):
        body = "\n\n".join(f"Paragraph {j} of note {i} mentions item{i}x{j} among other things." for j in range(6))
        (corpus / f"note{i:03d}.md").write_text(f"# Note {i}\n\n{body}\n", encoding="utf-8")


def assert_consistent(store: IndexStore) -> int:
    """The live generation loads and every part of it agrees; returns its file count."""
    try:
        snapshot = store.load()
    except IndexMissingError:
        return 0
    assert snapshot.vectors.ntotal == len(snapshot.chunks) == len(snapshot.keyword)
    listed = [chunk_key(cid) for rec in snapshot.files.values() for cid in rec.chunk_ids]
    assert sorted(listed) == sorted(snapshot.chunks)
    return len(snapshot.files)


def test_kill_at_any_moment_leaves_a_loadable_index_and_rerun_completes(settings: Settings) -> None:
    make_corpus(settings.corpus_dir, 30)
    store = IndexStore(settings.index_dir)
    script = WORKER.format(root=str(ROOT), corpus=str(settings.corpus_dir), data=str(settings.data_dir))
    seen_counts = []
    for delay in (0.4, 0.7, 0.9, 1.1, 1.3, 1.6, 2.0, None):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        if delay is None:  # once after a checkpoint for sure, however slow the machine is today
            before, deadline = store.current_generation(), time.monotonic() + 60
            while store.current_generation() == before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            delay = 0.2
        time.sleep(delay)
        if proc.poll() is None:  # (a worker that finished first was reaped by poll: nothing to kill)
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        seen_counts.append(assert_consistent(store))
    # Progress survives the kills: checkpoints were committed along the way.
    assert max(seen_counts) > 0

    report = sync_index(settings, FakeEmbedder())
    assert report.skipped == ()
    assert assert_consistent(store) == 30

    reference = settings.replace(data_dir=settings.data_dir.parent / "reference")
    sync_index(reference, FakeEmbedder())
    expected = IndexStore(reference.index_dir).load()
    got = store.load()
    assert got.files.keys() == expected.files.keys()
    assert {s: r.chunk_ids for s, r in got.files.items()} == {s: r.chunk_ids for s, r in expected.files.items()}


@pytest.mark.slow
def test_kill_the_real_cli_indexer_then_rerun(tmp_path: Path) -> None:
    corpus, data = tmp_path / "corpus", tmp_path / "data"
    corpus.mkdir()
    n = 150
    make_corpus(corpus, n)
    env = {
        **os.environ,
        "RAG_CORPUS_DIR": str(corpus),
        "RAG_DATA_DIR": str(data),
        "RAG_CHECKPOINT_SECONDS": "1",
        "RAG_EMBED_GROUP": "16",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.Popen([sys.executable, "-m", "rag", "index"], cwd=tmp_path, env=env)
    store = IndexStore(data / "index")
    deadline = time.monotonic() + 120
    while store.current_generation() is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = assert_consistent(store)
    assert 0 < partial < n, "kill landed after the first checkpoint and before the end"
    done = subprocess.run(
        [sys.executable, "-m", "rag", "index"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert f"{n - partial} added" in done.stdout
    assert assert_consistent(store) == n
