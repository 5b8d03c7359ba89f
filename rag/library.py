"""The library: the documents folder kept indexed while the app runs.

``Library`` owns what lives as long as the process and serves every chat: the embedder, the
live index (``rag.retrieval.LiveIndex``), the folder watcher and the updates. It reports what
each update changed through callbacks the app passes in (``on_update``, ``on_error``), so it
knows nothing about how the app shows it.

Trade-offs:

- Every update (folder watcher, upload, first build) runs ``sync_index`` in a thread under one
  asyncio lock and the on-disk writer lock, so the event loop never blocks and two updates
  never race. Readers take a whole snapshot per question: never a half-updated index.
- The watcher debounces: a burst of files within ``WATCH_DEBOUNCE_MS`` is one update. Changes
  inside hidden files or folders (uploads being written, editor swap files) are ignored, as
  the indexer ignores them.
- Start-up loads the embedding model first (a first question would wait for it anyway), then
  brings the index up to date; ``ready`` is set in between, so chats can show progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import watchfiles

from rag.config import Settings
from rag.embedding import Embedder, ProgressEmbedder, embedder_for
from rag.errors import ConfigError, IndexMismatchError, IndexMissingError, RagError
from rag.index import Snapshot
from rag.indexing import index_params, sync_index
from rag.prompting import TokenCounter, default_token_counter
from rag.retrieval import LiveIndex
from rag.store import open_store
from rag.types import IndexReport

log = logging.getLogger("rag.library")

WATCH_DEBOUNCE_MS = 1500  # a burst of files within this window is one update
WATCH_STEP_MS = 300

UpdateCallback = Callable[[IndexReport, Snapshot, "str | None"], None]
"""``(report, snapshot, origin)``: an update finished; ``origin`` is who asked for it (a chat)."""
ErrorCallback = Callable[[RagError], None]


def visible_change(root: Path, path: str) -> bool:
    """Whether a change at ``path`` can matter to the index: not inside a hidden file or
    folder of the corpus ``root`` (uploads being written, editor swap files), which the
    indexer skips anyway.

    >>> visible_change(Path("/x/.data/docs"), "/x/.data/docs/a.md"), visible_change(Path("/d"), "/d/.a.tmp")
    (True, False)
    """
    try:
        parts = Path(path).relative_to(root).parts
    except ValueError:
        parts = Path(path).parts[-1:]
    return not any(part.startswith(".") for part in parts)


class Library:
    """The indexed documents folder, kept up to date. Use from one event loop."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder | None = None,
        *,
        on_update: UpdateCallback = lambda report, snapshot, origin: None,
        on_error: ErrorCallback = lambda error: None,
        debounce_ms: int = WATCH_DEBOUNCE_MS,
    ) -> None:
        self.settings = settings
        self.embedder = ProgressEmbedder(embedder or embedder_for(settings))
        self.live = LiveIndex(open_store(settings))  # the embedded files, or Milvus (RAG_VECTOR_STORE)
        self.count: TokenCounter = lambda text: len(text) // 3 + 1  # until the tokenizer is loaded
        self.on_update = on_update
        self.on_error = on_error
        self.debounce_ms = debounce_ms
        self.ready = asyncio.Event()
        self.startup_error: BaseException | None = None
        self.sync_lock = asyncio.Lock()
        self.indexing_since: float | None = None
        self.stop = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background until it ends or the library closes."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def start(self) -> None:
        """Watch the folder and prepare, in the background. Watching starts first: a file that
        lands while the start-up indexing runs triggers another update (updates are serialised)
        instead of waiting for the next change in the folder."""
        self.spawn(self.watch())

        async def prepare() -> None:
            with contextlib.suppress(Exception):  # logged; chats show startup_error
                await self.prepare()

        self.spawn(prepare())

    async def prepare(self) -> None:
        """Load the embedding model and the tokenizer, then bring the index up to date."""
        try:
            self.settings.corpus_dir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(self.embedder.embed_query, "warm up")
            self.live.expected = index_params(self.settings, self.embedder)
            try:
                self.count = default_token_counter()
            except ConfigError as exc:
                log.warning("%s; counting tokens approximately", exc)
        except BaseException as exc:
            self.startup_error = exc
            log.error("startup failed: %s", exc)
            raise
        finally:
            self.ready.set()
        await self._sync_reporting()

    async def watch(self) -> None:
        """Re-index when files in the corpus folder change (debounced), until ``stop``."""
        corpus = self.settings.corpus_dir
        while not self.stop.is_set():
            try:
                corpus.mkdir(parents=True, exist_ok=True)
                async for _changes in watchfiles.awatch(
                    corpus, stop_event=self.stop, debounce=self.debounce_ms, step=min(WATCH_STEP_MS, self.debounce_ms),
                    watch_filter=lambda _change, path: visible_change(corpus.absolute(), path), recursive=True,
                ):  # fmt: skip
                    await self._sync_reporting()
            except Exception:  # the folder vanished, the watcher broke: log, wait, watch again
                log.exception("watching %s failed; retrying", corpus)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 2.0)

    async def _sync_reporting(self) -> None:
        try:
            await self.sync()
        except RagError as exc:
            log.error("indexing failed: %s", exc)
            self.on_error(exc)

    async def sync(self, *, origin: str | None = None) -> IndexReport:
        """Bring the index up to date (in a thread, one at a time) and report it."""
        async with self.sync_lock:
            self.settings.corpus_dir.mkdir(parents=True, exist_ok=True)
            self.indexing_since, self.embedder.embedded = time.monotonic(), 0
            try:
                report = await asyncio.to_thread(
                    sync_index, self.settings, self.embedder, show_progress=False, wait_for_lock=True
                )
                try:
                    snapshot = await self.snapshot()
                except IndexMismatchError as exc:
                    if report.added or report.updated or report.removed or report.rebuild_reason:
                        raise
                    # The file records said nothing changed (decided without loading the index), yet
                    # the index does not load: damaged outside the app. Rebuild it, as an update
                    # that found it so while loading would.
                    log.warning("the index does not load (%s): rebuilding it", exc)
                    report = await asyncio.to_thread(
                        sync_index, self.settings, self.embedder, full=True, show_progress=False, wait_for_lock=True
                    )
                    snapshot = await self.snapshot()
            finally:
                self.indexing_since = None
        log.info("index: +%d ~%d -%d, %d passages", len(report.added), len(report.updated),
                 len(report.removed), report.chunks_total)  # fmt: skip
        self.on_update(report, snapshot, origin)
        return report

    async def ensure_index(self, *, origin: str | None = None) -> Snapshot:
        """The index, built first if there is none (or waiting for the update that builds it)."""
        while True:
            try:
                return await self.snapshot()
            except (IndexMissingError, IndexMismatchError):
                if not self.sync_lock.locked():
                    await self.sync(origin=origin)
                    return await self.snapshot()
            async with self.sync_lock:  # another update is running: wait for it, then look again
                pass

    async def snapshot(self) -> Snapshot:
        """The newest complete index; raises ``IndexMissingError`` before the first build."""
        return await asyncio.to_thread(self.live.snapshot)

    def has_index(self) -> bool:
        """Whether an index exists on disk (cheap: no loading)."""
        return self.live.store.current_generation() is not None

    def progress(self) -> tuple[int, float] | None:
        """While an update runs: (passages embedded so far, seconds since it started)."""
        if self.indexing_since is None:
            return None
        return self.embedder.embedded, time.monotonic() - self.indexing_since

    async def close(self) -> None:
        self.stop.set()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
