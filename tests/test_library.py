"""The documents folder kept indexed while the app runs (rag.library): the first build, updates
reported to the app, the folder watcher."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rag.config import Settings
from rag.errors import IndexMissingError
from rag.index import Snapshot
from rag.library import Library, visible_change
from rag.types import IndexReport
from tests.fakes import FakeEmbedder


class Reports:
    """Collects what the library reports; ``next()`` waits for the next update."""

    def __init__(self) -> None:
        self.updates: list[tuple[IndexReport, Snapshot, str | None]] = []
        self._arrived = asyncio.Event()

    def __call__(self, report: IndexReport, snapshot: Snapshot, origin: str | None) -> None:
        self.updates.append((report, snapshot, origin))
        self._arrived.set()

    async def next(self, timeout: float = 30.0) -> tuple[IndexReport, Snapshot, str | None]:
        await asyncio.wait_for(self._arrived.wait(), timeout)
        self._arrived.clear()
        return self.updates[-1]


@pytest.fixture
def library(settings: Settings) -> Library:
    (settings.corpus_dir / "guide.md").write_text("# Guide\n\nTurn the pile weekly.\n")
    return Library(settings, FakeEmbedder(), debounce_ms=300)


def test_the_first_build_is_made_once_then_updates_are_reported(library: Library, settings: Settings) -> None:
    async def main() -> None:
        reports = Reports()
        library.on_update = reports
        with pytest.raises(IndexMissingError):
            await library.snapshot()
        assert not await asyncio.to_thread(library.has_index)
        built = await asyncio.gather(library.ensure_index(), library.ensure_index())
        assert built[0].generation == built[1].generation  # one build, not two
        assert len(reports.updates) == 1 and reports.updates[0][0].added == ("guide.md",)
        (settings.corpus_dir / "more.md").write_text("# More\n\nNew text.\n")
        await library.sync(origin="chat-1")
        report, snapshot, origin = reports.updates[-1]
        assert (report.added, len(snapshot), origin) == (("more.md",), 2, "chat-1")
        assert library.progress() is None  # no update running

    asyncio.run(main())


def test_prepare_loads_the_model_then_indexes(library: Library) -> None:
    async def main() -> None:
        reports = Reports()
        library.on_update = reports
        await library.prepare()
        assert library.ready.is_set() and library.startup_error is None
        assert library.live.expected is not None and len(await library.snapshot()) == 1
        assert library.embedder.embedded == 1  # the one passage (the warm-up query is not counted)

    asyncio.run(main())


def test_a_burst_of_files_in_the_folder_is_one_update_and_hidden_files_none(library: Library, settings: Settings) -> None:
    async def main() -> None:
        reports = Reports()
        library.on_update = reports
        await library.ensure_index()
        await reports.next()
        watcher = asyncio.create_task(library.watch())
        probe = settings.corpus_dir / "probe.md"
        while not reports.updates[1:]:  # the watcher is up once it reports a change
            probe.write_text(f"# Probe\n\n{len(reports.updates)} {asyncio.get_running_loop().time()}\n")
            try:
                await reports.next(timeout=1.0)
            except TimeoutError:
                continue
        before = len(reports.updates)
        for i in range(100):
            (settings.corpus_dir / f"note-{i:03d}.md").write_text(f"# Note {i}\n\nText number {i}.\n")
        report, snapshot, _ = await reports.next()
        assert len(reports.updates) == before + 1 and len(report.added) == 100 and len(snapshot.files) == 102
        (settings.corpus_dir / ".upload-1.tmp").write_text("half written")  # hidden: ignored
        (settings.corpus_dir / ".git").mkdir()
        (settings.corpus_dir / ".git" / "index").write_text("x")
        with pytest.raises(TimeoutError):
            await reports.next(timeout=library.debounce_ms / 1000 * 4)
        library.stop.set()
        await asyncio.wait_for(watcher, 10)

    asyncio.run(main())


def test_an_update_that_fails_is_reported_and_the_index_kept(library: Library, settings: Settings,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from rag.errors import IndexLockedError

    async def main() -> None:
        failures: list[Exception] = []
        library.on_error = failures.append
        await library.ensure_index()

        def locked(*args: object, **kwargs: object) -> IndexReport:
            raise IndexLockedError("another indexer holds the lock")

        monkeypatch.setattr("rag.library.sync_index", locked)
        await library._sync_reporting()
        assert [str(f) for f in failures] == ["another indexer holds the lock"]
        assert len(await library.snapshot()) == 1

    asyncio.run(main())


def test_an_index_damaged_outside_the_app_is_rebuilt_although_no_file_changed(
    library: Library, settings: Settings
) -> None:
    async def main() -> None:
        reports = Reports()
        library.on_update = reports
        await library.ensure_index()
        for vectors in settings.index_dir.glob("seg-*/vectors.npy"):
            vectors.unlink()  # the file records still say every document is indexed
        restarted = Library(settings, FakeEmbedder(), debounce_ms=300)
        restarted.on_update = reports
        report = await restarted.sync()
        assert report.rebuild_reason == "full rebuild requested" and report.added == ("guide.md",)
        assert len(await restarted.snapshot()) == 1

    asyncio.run(main())


def test_hidden_files_do_not_trigger_updates() -> None:
    root = Path("/home/me/.local/docs_corpus")
    assert visible_change(root, "/home/me/.local/docs_corpus/guide.md")
    assert visible_change(root, "/home/me/.local/docs_corpus/sub/guide.md")
    assert not visible_change(root, "/home/me/.local/docs_corpus/.upload-1.tmp")
    assert not visible_change(root, "/home/me/.local/docs_corpus/.git/index")
    assert not visible_change(root, "/home/me/.local/docs_corpus/notes/.guide.md.swp")
