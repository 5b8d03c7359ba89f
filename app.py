"""The chat in the browser: the only module that imports Chainlit.

``chainlit run app.py`` serves it. The pipeline (``rag.pipeline``) does the work on plain values;
this module turns them into messages, steps and side elements, and owns what lives as long as
the process: the embedder, the live index, the endpoint, the folder watcher and the list of open
chats.

Trade-offs and decisions:

- One endpoint for the whole process (an embedded runtime must not be loaded once per chat);
  each chat keeps its own settings and history in ``cl.user_session``. When the endpoint stops
  answering it is dropped and opened again on the next question, so a restarted server (or a
  Foundry Local service on a new port) is found again.
- Every index update (folder watcher, upload, first build) runs ``sync_index`` in a thread under
  one asyncio lock and the on-disk writer lock, so the event loop never blocks and two updates
  never race. Readers take a whole snapshot per question: never a half-updated index.
- Open chats are told about updates by a message pushed into each session from the watcher's
  task (``init_ws_context`` gives the task that session's context).
- An uploaded file is parsed before it is saved; one that cannot be read never enters
  ``docs_corpus/``, and one saved but not indexed (it failed later) is removed again, so a failed
  upload changes nothing.
- A chat's first question is embedded before retrieval asks for it: while it is typed
  (``public/draft.js`` posts it to ``/rag/draft``) and, if that did not happen, as its socket
  frame arrives (``embed_ahead``). Retrieval takes whichever vector is there for that text.
- Document text and file names are shown as text: passages are markdown-escaped before they
  reach the page, and Chainlit's ``unsafe_allow_html`` stays off.
"""

# No `from __future__ import annotations` here: Chainlit executes this file before putting it
# in sys.modules, and dataclasses with string annotations look their module up there.
import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import chainlit as cl
import chainlit.config
import chainlit.server
import chainlit.socket
import watchfiles
from chainlit.context import init_ws_context
from chainlit.input_widget import Select, Slider
from chainlit.session import WebsocketSession
from chainlit.user_session import user_sessions
from chainlit.utils import utc_now, wrap_user_function
from starlette.requests import Request
from starlette.responses import JSONResponse

from rag.chat import ChatClient, ChatDelta, ChatDone, ChatEvent, Message
from rag.config import POLICIES, RETRIEVAL_MODES, Settings, load_settings
from rag.embedding import Embedder, QueriesAhead, embedder_for
from rag.endpoints import Endpoint, open_endpoint
from rag.errors import (
    ConfigError,
    ContextLengthError,
    EndpointError,
    EndpointTimeoutError,
    EndpointUnreachableError,
    IndexMismatchError,
    IndexMissingError,
    LoadError,
    PolicyError,
    RagError,
    UnknownModelError,
)
from rag.index import IndexStore, Snapshot
from rag.indexing import index_params, sync_index
from rag.loaders import SUPPORTED_SUFFIXES, load_bytes
from rag.pipeline import Answer, Retrieval, answer, citations_in, normalize_citations, retrieve, rewrite_question
from rag.prompting import TokenCounter, default_token_counter
from rag.retrieval import LiveIndex
from rag.routing import Router
from rag.types import Chunk, Hit, IndexReport

log = logging.getLogger("rag.app")

HISTORY_MESSAGES = 12  # turns kept per chat (the budget may send fewer)
SNIPPET_CHARS = 160
WATCH_DEBOUNCE_MS = 1500  # a burst of files within this window is one update
WATCH_STEP_MS = 300
MAX_NAME_CHARS = 120
NOTICE_AUTHOR = "Index"
FILE_TYPES = "PDF, Markdown, text or HTML"
READING = "_Reading the passages…_"  # the answer's text until its first token


# ============================================================================================
# Pure helpers (tested in tests/test_app.py)
# ============================================================================================

_INLINE_SPECIAL = re.compile(r"([\\`*_\[\]<>&|~])")
_LINE_START = re.compile(r"^([ \t]*)([#>+=-])", re.M)
_ORDERED = re.compile(r"^([ \t]*\d+)([.)])", re.M)


def escape_markdown(text: str) -> str:
    """Text a markdown renderer shows literally: characters that start inline markup, HTML or
    entities are backslash-escaped everywhere (CommonMark shows ``\\x`` as ``x``), and those
    that only matter at the start of a line (headings, quotes, lists) there. A bare URL may
    still be shown as a link (GFM autolinks): clickable, never fetched.

    >>> escape_markdown("<b>*hi*</b> [1](x) guide.md")
    '\\\\<b\\\\>\\\\*hi\\\\*\\\\</b\\\\> \\\\[1\\\\](x) guide.md'
    >>> print(escape_markdown("# 1. see x.org"))
    \\# 1. see x.org
    """
    text = _INLINE_SPECIAL.sub(r"\\\1", text)
    text = _LINE_START.sub(r"\1\\\2", text)
    return _ORDERED.sub(r"\1\\\2", text)


def code_span(text: str) -> str:
    """``text`` as inline code: shown literally, whatever it contains.

    >>> code_span("a`b"), code_span("docs_corpus")
    ('`` a`b ``', '`docs_corpus`')
    """
    text = " ".join(text.split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or fence != "`" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def one_line(text: str, limit: int = SNIPPET_CHARS) -> str:
    """Whitespace collapsed, cut at ``limit`` characters with an ellipsis.

    >>> one_line("a\\n\\n  b", 10), one_line("abcdefghij", 5)
    ('a b', 'abcd…')
    """
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def where(hit: Hit) -> str:
    """Where a passage comes from, as plain text: file, page, section.

    >>> from rag.types import Chunk
    >>> where(Hit(Chunk("c", "guide.pdf", "x", 0, 1, page=3), 1.0, 1))
    'guide.pdf, page 3'
    """
    parts = [hit.chunk.source]
    if hit.chunk.page is not None:
        parts.append(f"page {hit.chunk.page}")
    if hit.chunk.headings:
        parts.append(" › ".join(hit.chunk.headings))
    return ", ".join(parts)


def passage_table(hits: Sequence[Hit], *, min_relevance: float | None = None) -> str:
    """A markdown table of passages (rank, file, page, similarity, snippet), escaped."""
    if not hits:
        return "_No passages._"
    rows = ["| # | file | page | similarity | passage |", "|---|---|---|---|---|"]
    for number, hit in enumerate(hits, start=1):
        mark = " (below threshold)" if min_relevance is not None and hit.similarity < min_relevance else ""
        page = str(hit.chunk.page) if hit.chunk.page is not None else "–"
        rows.append(
            f"| {number} | {escape_markdown(hit.chunk.source)} | {page} | {hit.similarity:.2f}{mark} "
            f"| {escape_markdown(one_line(hit.chunk.text))} |"
        )
    return "\n".join(rows)


def passage_markdown(hit: Hit) -> str:
    """The exact passage with its origin, for a side panel: the text escaped, paragraphs kept."""
    paragraphs = [escape_markdown(" ".join(p.split())) for p in re.split(r"\n\s*\n", hit.chunk.text.strip())]
    body = "\n\n".join(p for p in paragraphs if p)
    return f"**{escape_markdown(where(hit))}** · similarity {hit.similarity:.2f}\n\n{body}"


_LABEL_UNSAFE = re.compile(r"[^\w .,()+-]")


def pdf_label(source: str, page: int) -> str:
    """A side-element name for a PDF page: no characters markdown would act on.

    >>> pdf_label("docs/a*b[1].pdf", 4)
    'a-b-1-.pdf p. 4'
    """
    name = _LABEL_UNSAFE.sub("-", source.rsplit("/", 1)[-1])
    return f"{name} p. {page}"


@dataclass(frozen=True)
class SideElement:
    """A side panel to attach to an answer: a passage's text, or a PDF opened at a page."""

    name: str
    kind: str  # "text" or "pdf"
    content: str = ""
    path: Path | None = None
    page: int | None = None


def citation_elements(hits: Sequence[Hit], cited: Iterable[int], corpus_dir: Path) -> list[SideElement]:
    """Side elements for the passages an answer cites: ``[n]`` shows passage n's exact text;
    a PDF passage also gets its page (one element per file and page). Numbers outside the
    passages sent are ignored."""
    out: list[SideElement] = []
    pdfs: set[str] = set()
    root = corpus_dir.resolve()
    for number in cited:
        if not 1 <= number <= len(hits):
            continue
        hit = hits[number - 1]
        out.append(SideElement(name=f"[{number}]", kind="text", content=passage_markdown(hit)))
        chunk = hit.chunk
        if chunk.page is not None and chunk.source.lower().endswith(".pdf"):
            path = (root / chunk.source).resolve()
            label = pdf_label(chunk.source, chunk.page)
            if label not in pdfs and path.is_relative_to(root) and path.is_file():
                pdfs.add(label)
                out.append(SideElement(name=label, kind="pdf", path=path, page=chunk.page))
    return out


def sources_footer(hits: Sequence[Hit], cited: Sequence[int], model: str) -> str:
    """The lines under an answer: each cited passage (its ``[n]`` and, for a PDF, its page
    label, both clickable), then the model that answered."""
    lines = []
    for number in cited:
        if not 1 <= number <= len(hits):
            continue
        hit = hits[number - 1]
        if hit.chunk.page is not None and hit.chunk.source.lower().endswith(".pdf"):
            lines.append(f"- [{number}] {pdf_label(hit.chunk.source, hit.chunk.page)}")
        else:
            lines.append(f"- [{number}] {escape_markdown(where(hit))}")
    used = f"{len(hits)} passage{'s' if len(hits) != 1 else ''}"
    footer = f"_Answered by {escape_markdown(model)} from {used}._"
    return ("**Sources**\n" + "\n".join(lines) + "\n\n" + footer) if lines else footer


# --- uploads --------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_RESERVED = re.compile(r'[<>:"|?*]')


def safe_upload_name(name: str) -> str:
    """A file name safe to create in the corpus folder: no folders, not hidden, no control
    characters, a supported type. Raises ``LoadError`` when nothing usable is left.

    >>> safe_upload_name("../../etc/.notes.md"), safe_upload_name("C:\\\\x\\\\Report?.PDF")
    ('notes.md', 'Report_.PDF')
    """
    base = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    base = _RESERVED.sub("_", _CONTROL.sub("", base)).strip().lstrip(". ").rstrip(". ")
    suffix = Path(base).suffix
    if suffix.lower() not in SUPPORTED_SUFFIXES or not Path(base).stem.strip():
        shown = suffix or "(none)"
        raise LoadError(name, f"unsupported file type {shown!r}: attach a {FILE_TYPES} file")
    stem = Path(base).stem[: MAX_NAME_CHARS - len(suffix)].rstrip()
    return stem + suffix


def candidate_names(name: str) -> Iterator[str]:
    """``name``, then ``name (2)``, ``name (3)``… keeping the suffix.

    >>> from itertools import islice
    >>> list(islice(candidate_names("a.pdf"), 3))
    ['a.pdf', 'a (2).pdf', 'a (3).pdf']
    """
    yield name
    stem, suffix = Path(name).stem, Path(name).suffix
    for n in range(2, 10_000):
        yield f"{stem} ({n}){suffix}"


@dataclass(frozen=True)
class SavedUpload:
    """Where an upload went: ``created`` is False when an identical file was already there."""

    asked: str
    source: str
    path: Path
    created: bool

    @property
    def renamed(self) -> bool:
        return self.created and Path(self.source).name != self.asked


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_upload(corpus_dir: Path, name: str, data: bytes, *, max_bytes: int) -> SavedUpload:
    """Check an uploaded file and save it into ``corpus_dir`` without overwriting anything.

    The file must be small enough and readable by our loaders (checked before saving). A
    different file with the same name keeps its name; the upload gets ``name (2)``. A file
    with the same content is reused. Raises ``LoadError`` with a reason otherwise.
    """
    safe = safe_upload_name(name)
    if len(data) > max_bytes:
        raise LoadError(name, f"too large: {len(data) / 1e6:.1f} MB, the limit is {max_bytes / 1e6:.0f} MB")
    load_bytes(safe, data)  # raises LoadError: unreadable, empty, encrypted…
    digest = hashlib.sha256(data).hexdigest()
    corpus_dir.mkdir(parents=True, exist_ok=True)
    # Written under a hidden name (the indexer skips those), then linked into place:
    # os.link never replaces an existing file, so a file that appears meanwhile is safe.
    tmp = corpus_dir / f".upload-{os.getpid()}-{time.monotonic_ns()}.tmp"
    tmp.write_bytes(data)
    try:
        for candidate in candidate_names(safe):
            path = corpus_dir / candidate
            if path.exists():
                if path.is_file() and path.stat().st_size == len(data) and _sha256_file(path) == digest:
                    return SavedUpload(safe, candidate, path, created=False)
                continue
            try:
                os.link(tmp, path)
            except FileExistsError:
                continue
            return SavedUpload(safe, candidate, path, created=True)
        raise LoadError(name, "too many files with this name already")
    finally:
        tmp.unlink(missing_ok=True)


# --- index updates, starters, settings ------------------------------------------------------


def passages_of(snapshot: Snapshot, source: str) -> int | None:
    record = snapshot.files.get(source)
    return None if record is None else len(record.chunk_ids)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe_update(report: IndexReport, snapshot: Snapshot, announced: set[tuple[str, str]]) -> str | None:
    """A short notice for open chats about what an index update changed, or None.

    Skipped files are named with their reason once (``announced`` remembers them).
    """
    parts = []
    for verb, sources in (("added", report.added), ("updated", report.updated)):
        if sources:
            names = ", ".join(
                f"**{escape_markdown(s)}** ({_plural(passages_of(snapshot, s) or 0, 'passage')})" for s in sources[:10]
            )
            more = f" and {len(sources) - 10} more" if len(sources) > 10 else ""
            parts.append(f"{verb} {names}{more}")
    if report.removed:
        names = ", ".join(f"**{escape_markdown(s)}**" for s in report.removed[:10])
        more = f" and {len(report.removed) - 10} more" if len(report.removed) > 10 else ""
        parts.append(f"removed {names}{more}")
    fresh = [s for s in report.skipped if (s.source, s.reason) not in announced]
    announced.update((s.source, s.reason) for s in report.skipped)
    lines = []
    if parts:
        lines.append("Documents updated: " + "; ".join(parts) + ". The next question uses the new index.")
    lines.extend(f"Could not read **{escape_markdown(s.source)}**: {escape_markdown(s.reason)}." for s in fresh)
    if report.rebuild_reason:
        lines.append(f"The index was rebuilt: {escape_markdown(report.rebuild_reason)}.")
    return "\n\n".join(lines) or None


def _humanize(name: str) -> str:
    return " ".join(re.sub(r"[-_]+", " ", Path(name).stem).split())


def starter_questions(snapshot: Snapshot, *, limit: int = 4) -> list[tuple[str, str]]:
    """(label, question) pairs drawn from the corpus, one per document: about its first
    section when it has sections, else about the document itself."""
    by_source: dict[str, list[Chunk]] = {}
    for chunk in snapshot.chunks.values():
        by_source.setdefault(chunk.source, []).append(chunk)
    out: list[tuple[str, str]] = []
    for source in sorted(by_source)[:limit]:
        chunks = sorted(by_source[source], key=lambda c: (c.page or 0, c.start))
        title = chunks[0].title.strip()
        if not title or title == Path(source).stem:
            title = _humanize(source)
        section = next((c.headings[-1] for c in chunks if len(c.headings) > 1 and c.headings[-1].strip()), None)
        question = f"What does “{title}” say under “{section}”?" if section else f"What is “{title}” about?"
        out.append((one_line(title, 40), question))
    return out


@dataclass(frozen=True)
class Preferences:
    """One chat's settings; changes apply to its next question."""

    model: str = ""
    top_k: int = 5
    temperature: float = 0.2
    mode: str = "hybrid"
    min_relevance: float = 0.25
    policy: str = "local-only"  # routing (rag/routing.py)

    @classmethod
    def from_settings(cls, settings: Settings, model: str = "") -> "Preferences":
        return cls(model=model, top_k=settings.top_k, temperature=settings.temperature,
                   mode=settings.retrieval_mode, min_relevance=settings.min_relevance,
                   policy=settings.policy)  # fmt: skip


def apply_settings(prefs: Preferences, values: dict[str, Any], models: Sequence[str]) -> Preferences:
    """The preferences after the settings panel sent ``values``; out-of-range or unknown
    values are clamped or ignored (the panel is a browser: trust nothing).

    >>> apply_settings(Preferences(), {"top_k": 50.0, "mode": "bm25", "model": "x"}, ["m"])
    Preferences(model='', top_k=20, temperature=0.2, mode='bm25', min_relevance=0.25, policy='local-only')
    """
    changes: dict[str, Any] = {}
    with contextlib.suppress(TypeError, ValueError):
        if "top_k" in values:
            changes["top_k"] = min(20, max(1, int(float(values["top_k"]))))
    with contextlib.suppress(TypeError, ValueError):
        if "temperature" in values:
            changes["temperature"] = min(2.0, max(0.0, float(values["temperature"])))
    with contextlib.suppress(TypeError, ValueError):
        if "min_relevance" in values:
            changes["min_relevance"] = min(1.0, max(-1.0, float(values["min_relevance"])))
    if values.get("mode") in RETRIEVAL_MODES:
        changes["mode"] = values["mode"]
    if values.get("model") in models:
        changes["model"] = values["model"]
    if values.get("policy") in POLICIES:
        changes["policy"] = values["policy"]
    return replace(prefs, **changes)


def friendly_error(exc: BaseException) -> str:
    """What to tell the user about an error: what happened and what to do (no traceback)."""
    said = escape_markdown(str(exc))
    said = said[:1].upper() + said[1:]
    if isinstance(exc, EndpointUnreachableError):
        return f"The model is not answering. {said}"
    if isinstance(exc, EndpointTimeoutError):
        return f"The model took too long. {said}"
    if isinstance(exc, ContextLengthError):
        return f"The question does not fit the model's context window. {said}"
    if isinstance(exc, UnknownModelError):
        return f"The model is not available. {said}"
    if isinstance(exc, EndpointError):
        return f"The model failed. {said}"
    if isinstance(exc, IndexMissingError | IndexMismatchError):
        return f"The index is not usable yet. {said}"
    if isinstance(exc, RagError):
        return said
    return (
        f"Something went wrong on our side ({type(exc).__name__}); the details are in the server log. "
        "Your documents and settings are unchanged: try again."
    )


# ============================================================================================
# Process-wide state
# ============================================================================================


class ProgressEmbedder(Embedder):
    """The real embedder, counting the passages embedded for indexing (queries not counted),
    with the questions embedded ahead as they arrive (``ahead``, see ``embed_ahead``)."""

    def __init__(self, inner: Embedder) -> None:
        super().__init__(batch_size=inner.batch_size)
        self.inner = inner
        self.embedded = 0
        self.ahead = QueriesAhead(inner.embed_query)

    @property  # type: ignore[override]
    def model_id(self) -> str:
        return self.inner.model_id

    @property  # type: ignore[override]
    def dimension(self) -> int:
        return self.inner.dimension

    @property  # type: ignore[override]
    def max_tokens(self) -> int:
        return self.inner.max_tokens

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def embed_batch(self, texts: Sequence[str]) -> Any:
        return self.inner.embed_batch(texts)

    def embed_query(self, text: str) -> Any:
        vector = self.ahead.take(text)
        return vector if vector is not None else self.inner.embed_query(text)  # the inner one's fast path

    def embed(self, texts: Sequence[str], *, on_batch: Callable[[int], None] | None = None) -> Any:
        if on_batch is None:
            return self.inner.embed(texts)

        def counted(n: int) -> None:
            self.embedded += n
            on_batch(n)

        return self.inner.embed(texts, on_batch=counted)


class AppState:
    """What lives as long as the process: shared by every chat."""

    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        self.settings = settings
        inner = embedder or embedder_for(settings)
        self.embedder = ProgressEmbedder(inner)
        self.live = LiveIndex(IndexStore(settings.index_dir))
        self.count: TokenCounter = lambda text: len(text) // 3 + 1
        self.ready = asyncio.Event()
        self.startup_error: BaseException | None = None
        self.sync_lock = asyncio.Lock()
        self.indexing_since: float | None = None
        self.sessions: set[str] = set()
        self.announced: set[tuple[str, str]] = set()
        self.stop = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.endpoint: Endpoint | None = None
        self.endpoint_error: BaseException | None = None
        self.endpoint_lock = asyncio.Lock()
        self.routers: dict[str, Router] = {}  # by policy, when endpoints.toml names several endpoints

    # -- background work --

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

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
        try:
            await self.sync()
        except RagError as exc:
            log.error("indexing failed: %s", exc)
            self.notify(f"Could not update the index: {friendly_error(exc)}")

    async def watch(self) -> None:
        """Re-index when files in the corpus folder change (debounced), until ``stop``."""
        corpus = self.settings.corpus_dir
        while not self.stop.is_set():
            try:
                corpus.mkdir(parents=True, exist_ok=True)
                async for _changes in watchfiles.awatch(
                    corpus, stop_event=self.stop, debounce=WATCH_DEBOUNCE_MS, step=WATCH_STEP_MS,
                    watch_filter=lambda _change, path: visible_change(corpus.absolute(), path), recursive=True,
                ):  # fmt: skip
                    try:
                        await self.sync()
                    except RagError as exc:
                        log.error("indexing failed: %s", exc)
                        self.notify(f"Could not update the index: {friendly_error(exc)}")
            except Exception:  # the folder vanished, the watcher broke: log, wait, watch again
                log.exception("watching %s failed; retrying", corpus)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 2.0)

    async def sync(self, *, origin: str | None = None) -> IndexReport:
        """Bring the index up to date (in a thread, one at a time) and tell open chats."""
        async with self.sync_lock:
            self.settings.corpus_dir.mkdir(parents=True, exist_ok=True)
            self.indexing_since, self.embedder.embedded = time.monotonic(), 0
            try:
                report = await asyncio.to_thread(
                    sync_index, self.settings, self.embedder, show_progress=False, wait_for_lock=True
                )
            finally:
                self.indexing_since = None
            snapshot = await asyncio.to_thread(self.live.snapshot)
        log.info("index: +%d ~%d -%d, %d passages", len(report.added), len(report.updated),
                 len(report.removed), report.chunks_total)  # fmt: skip
        text = describe_update(report, snapshot, self.announced)
        if text:
            self.notify(text, exclude=origin)
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

    def progress(self) -> str:
        if self.indexing_since is None:
            return ""
        seconds = time.monotonic() - self.indexing_since
        return f"{_plural(self.embedder.embedded, 'passage')} embedded, {seconds:.0f} s"

    async def snapshot(self) -> Snapshot:
        return await asyncio.to_thread(self.live.snapshot)

    # -- open chats --

    def notify(self, content: str, *, exclude: str | None = None) -> None:
        """Post ``content`` into every open chat but ``exclude`` (from any task)."""
        for session_id in list(self.sessions):
            if session_id != exclude:
                self.spawn(self._push(session_id, content))

    async def _push(self, session_id: str, content: str) -> None:
        session = WebsocketSession.get_by_id(session_id)
        if session is None:
            self.sessions.discard(session_id)
            return
        try:
            init_ws_context(session)
            await cl.Message(content=content, author=NOTICE_AUTHOR, type="system_message").send()
        except Exception:
            log.exception("could not notify chat %s", session_id)

    # -- the endpoint --

    async def connect(self) -> Endpoint:
        """The shared endpoint, opened on first use or after it failed; raises RagError."""
        async with self.endpoint_lock:
            if self.endpoint is None:
                try:
                    self.endpoint = await open_endpoint(self.settings)
                except RagError as exc:
                    self.endpoint_error = exc
                    raise
                self.endpoint_error = None
                log.info("endpoint %s (%s), model %s", self.endpoint.base_url, self.endpoint.origin, self.endpoint.model)
            return self.endpoint

    async def drop_endpoint(self, error: BaseException) -> None:
        """Forget an endpoint that stopped answering: the next question opens it again (a
        restarted server, a Foundry Local service on a new port, a crashed runtime)."""
        async with self.endpoint_lock:
            endpoint, self.endpoint, self.endpoint_error = self.endpoint, None, error
        if endpoint is not None:
            with contextlib.suppress(Exception):
                await endpoint.close()

    async def close(self) -> None:
        self.stop.set()
        for task in list(self.tasks):
            task.cancel()
        if self.endpoint is not None:
            await self.drop_endpoint(RagError("the app is shutting down"))
        for router in self.routers.values():
            await router.aclose()

    def routed(self) -> bool:
        """Whether an endpoints file decides where questions go (``router``)."""
        return self.settings.endpoints_file.is_file()

    async def router(self, policy: str) -> Router | None:
        """The router for ``policy`` when an endpoints file exists; None: the one endpoint."""
        if not self.routed():
            return None
        if policy not in self.routers:
            self.routers[policy] = await Router.create(self.settings, policy=policy)
        return self.routers[policy]


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


_state: AppState | None = None


def get_state() -> AppState:
    global _state
    if _state is None:
        _state = AppState(load_settings())
    return _state


# ============================================================================================
# Chainlit handlers
# ============================================================================================


@dataclass(frozen=True)
class RewriteAhead:
    """A follow-up's rewrite started before ``ask`` runs, and what it was started with."""

    question: str
    turns: int  # len(history) then
    client: Any
    model: str
    task: asyncio.Future[str]

    def fits(self, question: str, turns: int, client: Any, model: str) -> bool:
        return (self.question, self.turns, self.model) == (question, turns, model) and self.client is client


@dataclass
class ChatState:
    """One browser chat: its settings, its conversation, its running answer."""

    prefs: Preferences
    history: list[Message] = field(default_factory=list)
    task: asyncio.Task[Any] | None = None
    models_shown: tuple[str, ...] = ()
    rewriting: RewriteAhead | None = None  # a follow-up's rewrite, started as it arrived


def _ready_state() -> AppState | None:
    """The app's state once it started and indexed, for work started outside a chat's handler
    (a frame arriving, a draft); None before, or when it failed to start."""
    state = _state
    if state is None or not state.ready.is_set() or state.startup_error is not None:
        return None
    return state


def answering_model(prefs: Preferences, endpoint: Endpoint) -> str:
    """The model a chat's question goes to: its chosen one while ``endpoint`` offers it, else
    the endpoint's own."""
    return prefs.model if prefs.model and prefs.model in endpoint.models else endpoint.model


def embed_ahead(session_id: str, payload: Any) -> None:
    """Start a question's work the moment its frame arrives, before Chainlit dispatches it
    (~6 ms of its own work and events to the page). A question without history is embedded
    (retrieval then finds the vector done or under way); a follow-up's rewrite is started
    instead (``rewrite_ahead``): it is rewritten first, and its retrieval embeds another text."""
    state = _ready_state()
    if state is None:
        return
    chat = user_sessions.get(session_id, {}).get("chat")
    if not isinstance(chat, ChatState):
        return
    message = payload.get("message") if isinstance(payload, dict) else None
    text = str((message or {}).get("output") or "").strip()
    if not text:
        return
    if chat.history:
        rewrite_ahead(state, chat, text)
    else:
        state.embedder.ahead.start(text)


def rewrite_ahead(state: AppState, chat: ChatState, question: str) -> None:
    """Send a follow-up's rewrite request now, to the endpoint and model ``ask`` will use;
    ``ask`` awaits it (``rewrite_follow_up``) instead of sending its own. Only with the one endpoint
    already open and allowed by the chat's policy: with an endpoints file (the router decides
    there) or none open yet, ``ask`` rewrites as before."""
    endpoint = state.endpoint
    if endpoint is None or not may_send_to(endpoint, chat.prefs.policy) or state.routed():
        return
    model = answering_model(chat.prefs, endpoint)
    if chat.rewriting is not None:
        chat.rewriting.task.cancel()
    task = asyncio.ensure_future(rewrite_question(endpoint.client, model, list(chat.history), question))
    chat.rewriting = RewriteAhead(question, len(chat.history), endpoint.client, model, task)


async def rewrite_follow_up(chat: ChatState, client: ChatClient, model: str, question: str) -> str:
    """``rewrite_question``, or the rewrite ``rewrite_ahead`` started for this very question,
    history, endpoint and model."""
    ahead, chat.rewriting = chat.rewriting, None
    if ahead is not None:
        if ahead.fits(question, len(chat.history), client, model):
            return await ahead.task
        ahead.task.cancel()
    return await rewrite_question(client, model, chat.history, question)


def _hook_message_arrival() -> None:
    """Call ``embed_ahead`` from Chainlit's socket handler for a chat message, which looks up
    ``chainlit.socket.process_message`` as it runs (Chainlit has no hook before on_message;
    tests/test_app.py checks this one against the pinned version). Without it, questions
    are embedded when retrieval asks, as before."""
    current = getattr(chainlit.socket, "process_message", None)
    if current is None:
        log.warning("chainlit.socket.process_message is gone: questions are not embedded ahead")
        return
    # Chainlit's own, once: `chainlit run -w` loads this module again, and the hook must call
    # the new module's embed_ahead (its state), not wrap the old hook.
    original = getattr(current, "embeds_ahead_for", current)

    async def process_message(session: Any, payload: Any) -> Any:
        try:
            embed_ahead(session.id, payload)
        except Exception:  # noqa: BLE001 - an optimisation: never in the way of the message
            log.exception("could not embed the question ahead")
        return await original(session, payload)

    process_message.embeds_ahead_for = original  # type: ignore[attr-defined]
    chainlit.socket.process_message = process_message


_hook_message_arrival()

DRAFT_PATH = "/rag/draft"
DRAFT_CHARS = 1000  # public/draft.js sends nothing longer either


def accept_draft(payload: Any) -> str | None:
    """Start embedding a chat's first question while it is typed (``public/draft.js`` posts it
    50 ms after the last keystroke); when Enter is pressed, retrieval takes the vector as from
    ``embed_ahead``. Returns why it was not started, or None. A draft is only ever a text to
    embed: nothing is answered, stored or shown, and one never asked for is dropped with the
    oldest (``QueriesAhead``)."""
    state = _ready_state()
    if state is None:
        return "the index is not ready"
    text = payload.get("text") if isinstance(payload, dict) else None
    if not isinstance(text, str) or not text.strip():
        return "no text"
    if len(text) > DRAFT_CHARS:
        return f"longer than {DRAFT_CHARS} characters"
    state.embedder.ahead.start(text.strip())
    return None


async def post_draft(request: Request) -> JSONResponse:
    # JSON only: another site's page can send a form or plain text here without asking (no CORS
    # preflight), but not JSON, and config.toml allows no other origin.
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return JSONResponse({"embedding": False, "reason": "send JSON"}, status_code=415)
    try:
        payload = await request.json()
    except ValueError:
        payload = None
    reason = accept_draft(payload)
    if reason is None:
        return JSONResponse({"embedding": True}, status_code=202)
    return JSONResponse({"embedding": False, "reason": reason})


def _add_draft_route() -> None:
    """``POST /rag/draft`` on Chainlit's server (its own routes are GET-only at that path);
    replaced, not added twice, when ``chainlit run -w`` loads this module again."""
    routes = chainlit.server.app.router.routes
    routes[:] = [r for r in routes if getattr(r, "path", None) != DRAFT_PATH]
    chainlit.server.app.add_api_route(DRAFT_PATH, post_draft, methods=["POST"], include_in_schema=False)


_add_draft_route()


def chat_state() -> ChatState:
    chat = cl.user_session.get("chat")
    if chat is None:
        chat = ChatState(prefs=Preferences.from_settings(get_state().settings))
        cl.user_session.set("chat", chat)
    return chat


def to_chainlit(element: SideElement) -> cl.Text | cl.Pdf:
    if element.kind == "pdf":
        return cl.Pdf(name=element.name, path=str(element.path), page=element.page, display="side")
    return cl.Text(name=element.name, content=element.content, display="side")


async def say(content: str, **kwargs: Any) -> cl.Message:
    msg = cl.Message(content=content, **kwargs)
    await msg.send()
    return msg


@cl.on_app_startup
async def on_app_startup() -> None:
    state = get_state()
    log.info("corpus %s, index %s", state.settings.corpus_dir, state.settings.index_dir)

    # Watch first: a file that lands while the start-up indexing runs triggers another update
    # (updates are serialised), instead of waiting for the next change in the folder.
    state.spawn(state.watch())

    async def start() -> None:
        with contextlib.suppress(Exception):  # already logged; chats show startup_error
            await state.prepare()

    state.spawn(start())


@cl.on_app_shutdown
async def on_app_shutdown() -> None:
    if _state is not None:
        await _state.close()


@cl.set_starters
async def set_starters(user: Any = None, language: str | None = None) -> list[cl.Starter]:
    state = get_state()
    try:
        snapshot = await state.snapshot()
    except RagError:
        return []  # nothing indexed yet
    except Exception:
        log.exception("starters failed")
        return []
    starters = starter_questions(snapshot)
    # A starter, clicked, is sent at once: nothing is typed to embed ahead (public/draft.js).
    state.embedder.ahead.pin([question for _, question in starters])
    return [cl.Starter(label=label, message=question) for label, question in starters]


async def wait_until_indexed(state: AppState) -> Snapshot | None:
    """Wait for startup and the first index build, showing progress; None when it failed."""
    status: cl.Message | None = None
    started = time.monotonic()

    async def show(text: str) -> None:
        nonlocal status
        if status is None:
            status = await say(text, author=NOTICE_AUTHOR, type="system_message")
        elif status.content != text:
            status.content = text
            await status.update()

    while not state.ready.is_set():
        await show(f"Loading the embedding model… ({time.monotonic() - started:.0f} s)")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.ready.wait(), 1.0)
    if state.startup_error is not None:
        await show(f"The app could not start: {friendly_error(state.startup_error)}")
        return None
    try:
        snapshot = await state.snapshot()
    except (IndexMissingError, IndexMismatchError):
        build = asyncio.ensure_future(state.ensure_index(origin=cl.context.session.id))
        while not build.done():
            progress = state.progress() or "starting"
            await show(f"Indexing {code_span(str(state.settings.corpus_dir))} for the first time: {progress}…")
            await asyncio.wait({build}, timeout=1.0)
        try:
            snapshot = build.result()
        except RagError as exc:
            await show(f"Indexing failed: {friendly_error(exc)}")
            return None
    if status is not None:  # done: the welcome says the rest
        await status.remove()
    return snapshot


async def send_settings(chat: ChatState, endpoint: Endpoint | None) -> None:
    models = tuple(endpoint.models) if endpoint is not None else ()
    if endpoint is not None and chat.prefs.model not in models:
        chat.prefs = replace(chat.prefs, model=endpoint.model)
    inputs: list[Any] = []
    if models:
        inputs.append(Select(id="model", label="Model", values=list(models), initial_value=chat.prefs.model))
    inputs += [
        Slider(id="top_k", label="Passages per question (top-k)", initial=chat.prefs.top_k, min=1, max=20, step=1),
        Slider(id="temperature", label="Temperature", initial=chat.prefs.temperature, min=0, max=2, step=0.1),
        Select(id="mode", label="Retrieval mode", values=list(RETRIEVAL_MODES), initial_value=chat.prefs.mode),
        Select(id="policy", label="Endpoints allowed (routing policy)", values=list(POLICIES),
               initial_value=chat.prefs.policy),  # fmt: skip
        Slider(id="min_relevance", label="Relevance threshold (cosine similarity)",
               initial=chat.prefs.min_relevance, min=0, max=1, step=0.05),  # fmt: skip
    ]
    await cl.ChatSettings(inputs).send()
    chat.models_shown = models


def may_send_to(endpoint: Endpoint, policy: str) -> bool:
    """Whether the chat may send anything at all (a question, a rewrite, a connection check) to
    ``endpoint`` under the routing ``policy``: under local-only, only to this computer."""
    return endpoint.local or policy != "local-only"


def welcome_text(snapshot: Snapshot | None, endpoint: Endpoint | None, error: BaseException | None,
                 corpus_dir: Path, *, suggest: bool = False) -> str:  # fmt: skip
    """The chat's first message. ``suggest``: list the starter questions in it (the page shows
    them as buttons only when they existed as it loaded, i.e. not on a first visit that waited
    for the first index build)."""
    folder = code_span(str(corpus_dir))
    lines = []
    if snapshot is None or len(snapshot) == 0:
        lines.append(
            f"**Nothing is indexed yet.** Attach {FILE_TYPES} files to a message (📎 or drag and drop), "
            f"or copy them into {folder}: they are indexed within seconds."
        )
    else:
        lines.append(
            f"**Ask about your documents.** {_plural(len(snapshot.files), 'document')} and "
            f"{_plural(len(snapshot), 'passage')} are indexed from {folder}. Answers cite their passages "
            f"as [1], [2]…: click a number to read it. Add files by attaching them or dropping them into {folder}."
        )
        if suggest:
            questions = [q for _, q in starter_questions(snapshot)]
            lines.append("You could ask:\n" + "\n".join(f"- {escape_markdown(q)}" for q in questions))
    if endpoint is not None:
        where_ = "on this computer" if endpoint.local else escape_markdown(endpoint.base_url)
        lines.append(f"Answers come from **{escape_markdown(endpoint.model)}** ({where_}).")
    elif error is not None:
        lines.append(
            f"⚠️ {friendly_error(error)}\n\nYou can still search: I'll show the passages that match, "
            "and try the model again with your next question."
        )
    return "\n\n".join(lines)


@cl.on_chat_start
async def on_chat_start() -> None:
    state = get_state()
    chat = chat_state()
    try:
        # The page asked for its starters as it loaded: there were none if the index is not there yet.
        had_starters = state.ready.is_set() and await asyncio.to_thread(state.live.store.current_generation) is not None
        snapshot = await wait_until_indexed(state)
        # Listed only now: the first build's own report would repeat what the welcome says.
        state.sessions.add(cl.context.session.id)
        endpoint: Endpoint | None = None
        error: BaseException | None = None
        try:
            endpoint = await state.connect()
        except RagError as exc:
            error = exc
        await send_settings(chat, endpoint)
        if endpoint is not None and may_send_to(endpoint, chat.prefs.policy):
            state.spawn(endpoint.client.preconnect())  # the first question's connection
        # A system message leaves the welcome screen (starters) in place until the first question.
        text = welcome_text(snapshot, endpoint, error, state.settings.corpus_dir, suggest=not had_starters)
        await say(text, type="system_message")
    except Exception as exc:
        log.exception("chat start failed")
        await say(friendly_error(exc))
    finally:
        state.sessions.add(cl.context.session.id)


@cl.on_chat_end
async def on_chat_end() -> None:
    # The session may come back (a reconnecting socket keeps it): it leaves the list when
    # Chainlit forgets it (see AppState._push).
    return None


@cl.on_settings_update
async def on_settings_update(values: dict[str, Any]) -> None:
    chat = chat_state()
    chat.prefs = apply_settings(chat.prefs, values, chat.models_shown)


@cl.on_stop
async def on_stop() -> None:
    """Chainlit cancels the running task; cancelling it here too makes the intent explicit
    (the answer's HTTP stream is closed as the cancellation unwinds it)."""
    task = chat_state().task
    if task is not None and not task.done() and not task.cancelling():
        task.cancel()


async def on_message(message: cl.Message) -> None:
    state = get_state()
    chat = chat_state()
    chat.task = asyncio.current_task()
    try:
        files = [e for e in (message.elements or []) if getattr(e, "path", None)]
        if files:
            await add_uploads(state, files)
        question = (message.content or "").strip()
        if question:
            await ask(state, chat, question)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if not isinstance(exc, RagError):
            log.exception("answering failed")
        await say(friendly_error(exc))
    finally:
        chat.task = None


def register_on_message(handler: Callable[[cl.Message], Any]) -> None:
    """Register ``handler`` for chat messages without the "on_message" run step that
    ``@cl.on_message`` opens around it. That step draws nothing of its own (the page shows its
    children in place), but costs the page two more socket events per question, one of them
    before the first token, and nests everything the answer sends below it, so that each
    token re-renders the run with all its children (docs/benchmarks.md). The Retrieval step and
    the answer are top-level messages instead, drawn the same."""
    chainlit.config.config.code.on_message = wrap_user_function(handler)  # as @cl.on_message, less the step


register_on_message(on_message)


async def add_uploads(state: AppState, files: Sequence[Any]) -> None:
    """Save the attached files into the corpus, index them, and confirm each one."""
    settings = state.settings
    saved: list[SavedUpload] = []
    for element in files:
        name = str(getattr(element, "name", "") or Path(element.path).name)
        try:
            size = os.path.getsize(element.path)
            if size > settings.max_file_bytes:
                raise LoadError(name, f"too large: {size / 1e6:.1f} MB, the limit is {settings.max_file_mb:g} MB")
            data = await asyncio.to_thread(Path(element.path).read_bytes)
            saved.append(
                await asyncio.to_thread(save_upload, settings.corpus_dir, name, data, max_bytes=settings.max_file_bytes)
            )
        except LoadError as exc:
            await say(f"Could not add **{escape_markdown(name)}**: {escape_markdown(exc.reason)}. Nothing was changed.")
        except OSError as exc:
            await say(f"Could not add **{escape_markdown(name)}**: {escape_markdown(exc.strerror or str(exc))}.")
    if not saved:
        return
    report = await state.sync(origin=cl.context.session.id)
    snapshot = await state.snapshot()
    reasons = {s.source: s.reason for s in report.skipped}
    folder = code_span(str(settings.corpus_dir))
    for upload in saved:
        count = passages_of(snapshot, upload.source)
        shown = escape_markdown(upload.source)
        if count is None:
            if upload.created:
                upload.path.unlink(missing_ok=True)
            reason = escape_markdown(reasons.get(upload.source, "it has no text to index"))
            await say(f"Could not index **{shown}**: {reason}. The file was not kept.")
        elif not upload.created:
            await say(f"**{shown}** is already in your documents ({_plural(count, 'passage')}).")
        else:
            renamed = (
                f" (a different file named {escape_markdown(upload.asked)} is already there)" if upload.renamed else ""
            )
            await say(f"Added **{shown}** to {folder}{renamed}: {_plural(count, 'passage')} indexed.")


async def ask(state: AppState, chat: ChatState, question: str) -> None:
    """One question: rewrite, retrieve (visible step), gate, stream the cited answer."""
    if not state.ready.is_set():
        await wait_until_indexed(state)
    if state.startup_error is not None:
        await say(f"The app could not start: {friendly_error(state.startup_error)}")
        return
    endpoint: Endpoint | None = None
    endpoint_error: BaseException | None = None
    try:
        endpoint = await state.connect()
    except RagError as exc:
        endpoint_error = exc
    client = endpoint.client if endpoint is not None else None
    if endpoint is not None and endpoint.models != list(chat.models_shown):
        await send_settings(chat, endpoint)  # it came back, or with other models
    model = answering_model(chat.prefs, endpoint) if endpoint is not None else ""
    if endpoint is not None and not may_send_to(endpoint, chat.prefs.policy):
        # Routing (rag/routing.py): nothing, not even the rewrite request, goes to a remote host.
        client, endpoint_error = None, PolicyError(
            f"{endpoint.base_url} is not on this computer and the policy is local-only: "
            "choose another policy in the settings")  # fmt: skip

    prefs = chat.prefs
    # --- routing (rag/routing.py): an endpoints file; the rewrite goes where the answer would ---
    router = await state.router(prefs.policy)
    standalone = question
    rewritten: cl.Step | None = None  # done, but drawn so only with the Retrieval step (below)
    if chat.history and (router is not None or client is not None):
        rewritten = cl.Step(name="Standalone question", type="llm", show_input=False)
        rewritten.start = utc_now()
        await rewritten.send()
        try:
            if router is not None:
                standalone = await router.rewrite(chat.history, question)
            else:
                standalone = await rewrite_follow_up(chat, client, model, question)  # type: ignore[arg-type]
        except BaseException as exc:
            rewritten.end, rewritten.output, rewritten.is_error = utc_now(), str(exc), True
            await rewritten.update()
            raise
        rewritten.end, rewritten.output = utc_now(), escape_markdown(standalone)

    async with DrawnLater(rewritten) as rewrite_done:
        try:
            found: Retrieval = await asyncio.to_thread(
                retrieve, state.live, state.embedder, standalone, k=prefs.top_k, mode=prefs.mode,
                min_relevance=prefs.min_relevance,
            )  # fmt: skip
        except IndexMissingError:
            if await wait_until_indexed(state) is None:
                return
            found = await asyncio.to_thread(
                retrieve, state.live, state.embedder, standalone, k=prefs.top_k, mode=prefs.mode,
                min_relevance=prefs.min_relevance,
            )  # fmt: skip

        stream: Answer | None = None
        written = asyncio.Event()  # the answer's request is on the wire
        # --- routing (rag/routing.py): several endpoints, or local-only against a remote one ---
        if router is not None and found.relevant:
            try:
                stream = await router.answer(
                    standalone, found.hits, chat.history, count=state.count, temperature=prefs.temperature,
                    max_answer_tokens=state.settings.max_answer_tokens,
                )  # fmt: skip
            except RagError as exc:
                endpoint_error = exc
        # --- end routing ---
        elif found.relevant and client is not None:
            stream = answer(
                client, model, standalone, found.hits, chat.history,
                context_window=endpoint.context_window if endpoint is not None else state.settings.context_window,
                max_answer_tokens=state.settings.max_answer_tokens, temperature=prefs.temperature, count=state.count,
                on_sent=written.set,
            )  # fmt: skip
        sent = stream.hits if stream is not None else list(found.hits)
        # The answer's request goes out first; the Retrieval step is drawn while the model reads it.
        events = aiter(stream) if stream is not None else None
        first = asyncio.ensure_future(anext(events)) if events is not None else None
        try:
            if first is not None and router is None:
                await until_written(first, written)
            # Drawn done only now: drawn as the rewrite ended, the page's re-render took a core from
            # the rewritten question's embedding (docs/benchmarks.md).
            await rewrite_done.draw()
            await show_retrieval(found, sent, prefs, to_model=stream is not None)
        except BaseException:
            if first is not None:
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
                await events.aclose()  # type: ignore[union-attr]
            raise

    if not found.relevant:
        await say(gate_text(found))
        remember(chat, question, "(The documents did not contain an answer.)")
        return
    if stream is None:
        elements = citation_elements(sent, range(1, len(sent) + 1), state.settings.corpus_dir)
        lines = "\n".join(f"- [{n}] {escape_markdown(where(h))}" for n, h in enumerate(sent, start=1))
        await say(
            f"⚠️ {friendly_error(endpoint_error or RagError('no model endpoint'))}\n\nThe passages that match best "
            f"(click a number to read it):\n{lines}\n\nI'll try the model again with your next question.",
            elements=[to_chainlit(e) for e in elements],
        )  # fmt: skip
        return
    assert first is not None and events is not None  # a stream was started above
    await stream_answer(state, chat, question, stream, _started(first, events))
    if client is not None and router is None:
        # A stream may end with its connection (rag serve's do): open the next question's now,
        # not while that question is embedded (on two cores, that slows the embedding).
        state.spawn(client.preconnect())


class DrawnLater:
    """A step whose work is over, drawn done by ``draw`` or, at the latest, on leaving the block
    (an error, a stop): never left spinning in the page."""

    def __init__(self, step: cl.Step | None) -> None:
        self.step = step

    async def draw(self) -> None:
        step, self.step = self.step, None
        if step is not None:
            await step.update()

    async def __aenter__(self) -> "DrawnLater":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.draw()


async def until_written(first: asyncio.Future[ChatEvent], written: asyncio.Event, *, limit: float = 0.1) -> None:
    """Wait (at most ``limit`` s) until the answer's request is written, or its first event
    (an error) came. Drawn at once, the Retrieval step's events and formatting ran before the
    request task got its turn: ~2 ms more before the model could start reading."""
    if written.is_set() or first.done():
        return
    waiter = asyncio.ensure_future(written.wait())
    try:
        await asyncio.wait((first, waiter), timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


async def _started(first: asyncio.Future[ChatEvent], events: AsyncIterator[ChatEvent]) -> AsyncIterator[ChatEvent]:
    """The events of an answer whose first event was asked for ahead (``first``), then the rest."""
    try:
        event = await first
    except StopAsyncIteration:
        return
    yield event
    async for event in events:
        yield event


async def show_retrieval(found: Retrieval, sent: Sequence[Hit], prefs: Preferences, *, to_model: bool) -> None:
    async with cl.Step(name="Retrieval", type="retrieval", show_input=False) as step:
        setup = f"{prefs.mode} search, top {prefs.top_k}, relevance threshold {prefs.min_relevance:.2f}"
        if found.relevant:
            told = "sent to the model" if to_model else "found"
            step.output = f"{setup}: {_plural(len(sent), 'passage')} {told}.\n\n{passage_table(sent)}"
        else:
            step.output = (
                f"{setup}: no passage reaches the threshold. Closest:\n\n"
                f"{passage_table(found.closest, min_relevance=found.min_relevance)}"
            )


def gate_text(found: Retrieval) -> str:
    best = max((h.similarity for h in found.closest), default=None)
    head = (
        "**Your documents don't seem to contain the answer**, so I won't guess: no passage is similar enough "
        f"to the question (threshold {found.min_relevance:.2f}"
        + (f", best match {best:.2f}" if best is not None else "")
        + "; you can lower it in the settings)."
    )
    if not found.closest:
        return head + "\n\nNothing is indexed yet."
    closest = "\n".join(
        f"{n}. {escape_markdown(where(h))} ({h.similarity:.2f}): {escape_markdown(one_line(h.chunk.text))}"
        for n, h in enumerate(found.closest[:3], start=1)
    )
    return f"{head}\n\nThe closest passages:\n\n{closest}"


_OLD_CITATION = re.compile(r"\s*\[\d{1,3}(?:\s*[,;]\s*\d{1,3})*\]")


def remember(chat: ChatState, question: str, reply: str) -> None:
    """Keep a turn for follow-ups. Citation numbers are dropped from the reply: they named
    that turn's passages, and would mislead the model about the next turn's."""
    chat.history.extend([Message("user", question), Message("assistant", _OLD_CITATION.sub("", reply))])
    del chat.history[:-HISTORY_MESSAGES]


async def stream_answer(
    state: AppState, chat: ChatState, question: str, stream: Answer, events: AsyncIterator[ChatEvent]
) -> None:
    """Stream ``stream``'s ``events`` (already started: see ``ask``) into a new message.

    The message is drawn while the model reads the prompt, already streaming, with a
    placeholder the first token replaces: in the page, the first token is then a change of
    text (Chainlit's ``stream_token``), not a new message to lay out, nor a message turning
    to streaming (``stream_start``: its copy and feedback buttons unmounted, the cursor
    mounted), in the same frame (docs/benchmarks.md)."""
    msg = cl.Message(content="")
    await msg.stream_token(READING)
    started = False
    problem = ""
    done: ChatDone | None = None
    try:
        async for event in events:
            if isinstance(event, ChatDelta):
                await msg.stream_token(event.text, is_sequence=not started)  # the first replaces READING
                started = True
            else:
                done = event
    except asyncio.CancelledError:
        await finish_answer(state, msg, stream, note="_Stopped._")
        raise
    except EndpointError as exc:
        problem = f"⚠️ {friendly_error(exc)} Ask again to retry."
        log.warning("answer failed: %s", exc)
        if isinstance(exc, EndpointUnreachableError) or type(exc) is EndpointError:
            # Nothing answers, or the connection broke: open it afresh for the next question.
            # (Timeouts and HTTP errors come from a live server: keep it.)
            await state.drop_endpoint(exc)
    note = problem
    if done is not None and done.finish_reason == "length":
        note = f"_The answer was cut off at {state.settings.max_answer_tokens} tokens (RAG_MAX_ANSWER_TOKENS)._"
    elif done is not None and done.finish_reason == "repetition":
        note = "_Stopped: the model started repeating itself._"
    await finish_answer(state, msg, stream, note=note)
    if stream.text.strip() and not problem:
        remember(chat, question, stream.text)


async def finish_answer(state: AppState, msg: cl.Message, stream: Answer, *, note: str) -> None:
    text = normalize_citations(stream.text).strip()
    cited = citations_in(text, len(stream.hits))
    if not text and not note:
        text = "_The model returned an empty answer._"
    route = getattr(stream, "route", None)  # a RoutedAnswer says which endpoint answered and why
    parts = [p for p in (text, note, sources_footer(stream.hits, cited, route.describe() if route else stream.model)) if p]
    msg.content = "\n\n".join(parts)
    msg.elements = [to_chainlit(e) for e in citation_elements(stream.hits, cited, state.settings.corpus_dir)]
    await msg.update()
