"""Chat history: where Chainlit's SQL data layer keeps chats, and what an answer leaves in it.

The app hands ``data_layer_options(settings)`` to Chainlit's ``SQLAlchemyDataLayer`` (it does
not create its tables: ``prepare_database`` does, idempotently, at start). By default the
history is one SQLite file, ``<data dir>/history.sqlite3`` (WAL journal: a chat killed
mid-answer, even ``kill -9``, leaves the last committed state, readable); with
``RAG_DATABASE_URL=postgresql://user:password@host/db`` it lives in PostgreSQL (asyncpg).
The schema is Chainlit 2.12's: the columns its data layer reads and writes, and no others.

Decisions:

- **Passages are kept in the database itself.** Chainlit persists an element's *content*
  only through a cloud storage client (S3, GCS, Azure) and otherwise drops it. ``InlineStorage``
  is a storage client that stores small text elements (the ``[n]`` passages, ~2 KB each) as a
  ``data:`` URL in the element's own row: no file store, no extra HTTP route, deleted with its
  thread, and served only through Chainlit's author-checked thread routes. Binary or large
  content (PDFs, uploaded files) is not copied: a cited PDF page is the corpus file, which the
  app reopens on resume when it is still the same (``passage_states``).
- **An answer carries its facts in the step's metadata** (``answer_metadata``): the model and
  endpoint, the question and its standalone rewrite, the reply as the model's history needs
  it, and each citation's source, page and chunk id. A resumed chat rebuilds its follow-up
  history from there (``history_from_steps``), and can tell whether a cited document has
  changed or is gone since.
- **Two fixes to Chainlit's data layer** (``DataLayerFixes``, mixed in by app.py): a missing
  thread is "not found" rather than a 500 with a traceback (``ThreadAuthorLookup``), and a
  step's writes land in order, so a quick step's output is not blanked by its own creation
  (``OrderedStepWrites``). With them, the lookups (``FeedbackOwners``) that let app.py refuse a
  rating of someone else's answer: Chainlit's ``/feedback`` routes write any ids they are given.

Nothing here imports Chainlit: the storage client and the mixin are duck-typed to it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from rag.config import Settings
from rag.errors import ConfigError
from rag.types import Hit, Message

HISTORY_FILE = "history.sqlite3"
METADATA_KEY = "rag"
METADATA_VERSION = 1
# Text elements up to this size are kept inline (a passage is ~1-2 KB; an uploaded text file may
# be larger). Larger or binary content is not copied into the history.
DEFAULT_INLINE_LIMIT = 256 * 1024
SQLITE_BUSY_SECONDS = 30.0

# --- the schema -----------------------------------------------------------------------------
# (column, SQLite type, PostgreSQL type). SQLite gets TEXT for ids and JSON: a column declared
# UUID or JSONB there has NUMERIC affinity, which would turn an id like "1234" into a number.
# Chainlit writes every non-empty key of its step/element dicts as a column: "autoCollapse",
# "modes" and "command" (steps), "props", "autoPlay" and "playerConfig" (elements) included.
_ID = ("TEXT", "UUID")
_JSON = ("TEXT", "JSONB")
_TEXT = ("TEXT", "TEXT")
_BOOL = ("BOOLEAN", "BOOLEAN")
_INT = ("INTEGER", "INTEGER")
_TAGS = ("TEXT", "TEXT[]")

TABLES: dict[str, list[tuple[str, tuple[str, str], str]]] = {
    "users": [
        ("id", _ID, "PRIMARY KEY"),
        ("identifier", _TEXT, "NOT NULL UNIQUE"),
        ("metadata", _JSON, "NOT NULL"),
        ("createdAt", _TEXT, ""),
    ],
    "threads": [
        ("id", _ID, "PRIMARY KEY"),
        ("createdAt", _TEXT, ""),
        ("name", _TEXT, ""),
        ("userId", _ID, 'REFERENCES users ("id") ON DELETE CASCADE'),
        ("userIdentifier", _TEXT, ""),
        ("tags", _TAGS, ""),
        ("metadata", _JSON, ""),
    ],
    "steps": [
        ("id", _ID, "PRIMARY KEY"),
        ("name", _TEXT, "NOT NULL"),
        ("type", _TEXT, "NOT NULL"),
        ("threadId", _ID, 'NOT NULL REFERENCES threads ("id") ON DELETE CASCADE'),
        ("parentId", _ID, ""),
        ("streaming", _BOOL, "NOT NULL"),
        ("waitForAnswer", _BOOL, ""),
        ("isError", _BOOL, ""),
        ("metadata", _JSON, ""),
        ("tags", _TAGS, ""),
        ("input", _TEXT, ""),
        ("output", _TEXT, ""),
        ("createdAt", _TEXT, ""),
        ("command", _TEXT, ""),
        ("modes", _JSON, ""),
        ("start", _TEXT, ""),
        ("end", _TEXT, ""),
        ("generation", _JSON, ""),
        ("showInput", _TEXT, ""),
        ("language", _TEXT, ""),
        ("indent", _INT, ""),
        ("defaultOpen", _BOOL, ""),
        ("autoCollapse", _BOOL, ""),
    ],
    "elements": [
        ("id", _ID, "PRIMARY KEY"),
        ("threadId", _ID, ""),
        ("type", _TEXT, ""),
        ("url", _TEXT, ""),
        ("chainlitKey", _TEXT, ""),
        ("name", _TEXT, "NOT NULL"),
        ("display", _TEXT, ""),
        ("objectKey", _TEXT, ""),
        ("size", _TEXT, ""),
        ("page", _INT, ""),
        ("language", _TEXT, ""),
        ("forId", _ID, ""),
        ("mime", _TEXT, ""),
        # Text, not JSONB, with a default: Chainlit's get_element json.loads() it, which fails on
        # NULL (no props) and on the dict asyncpg makes of JSONB (a 500 for its element route).
        ("props", _TEXT, "DEFAULT '{}'"),
        ("autoPlay", _BOOL, ""),
        ("playerConfig", _JSON, ""),
    ],
    "feedbacks": [
        ("id", _ID, "PRIMARY KEY"),
        ("forId", _ID, "NOT NULL"),
        ("threadId", _ID, ""),  # Chainlit's Feedback.threadId is optional
        ("value", _INT, "NOT NULL"),
        ("comment", _TEXT, ""),
    ],
}
INDEXES = [
    ("threads", "userId"),
    ("steps", "threadId"),
    ("elements", "threadId"),
    ("elements", "forId"),
    ("feedbacks", "forId"),
]


def schema_statements(dialect: str) -> list[str]:
    """The DDL for ``sqlite`` or ``postgresql``: idempotent (``IF NOT EXISTS``) and in
    dependency order."""
    which = {"sqlite": 0, "postgresql": 1}[dialect]
    statements = []
    for table, columns in TABLES.items():
        body = ",\n    ".join(f'"{name}" {types[which]}{" " + extra if extra else ""}' for name, types, extra in columns)
        statements.append(f"CREATE TABLE IF NOT EXISTS {table} (\n    {body}\n)")
    for table, column in INDEXES:
        statements.append(f'CREATE INDEX IF NOT EXISTS {table}_{column.lower()}_idx ON {table} ("{column}")')
    return statements


# --- where the history lives ----------------------------------------------------------------


def history_path(settings: Settings) -> Path:
    return settings.data_dir / HISTORY_FILE


def database_url(settings: Settings) -> str:
    """The SQLAlchemy URL of the history database: ``sqlite+aiosqlite:///<data dir>/history.sqlite3``
    by default; ``RAG_DATABASE_URL=postgresql://…`` (or ``postgres://``) becomes
    ``postgresql+asyncpg://…``, with libpq's ``sslmode`` passed on as asyncpg's ``ssl``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    raw = str(settings.database_url).strip()
    if not raw:
        return f"sqlite+aiosqlite:///{history_path(settings).resolve()}"
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise ConfigError(f"RAG_DATABASE_URL is not a database URL ({exc}): use postgresql://user:password@host/db") from exc
    scheme = url.drivername.lower()
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        query = dict(url.query)
        if "sslmode" in query and "ssl" not in query:
            query["ssl"] = query.pop("sslmode")
        url = url.set(drivername="postgresql+asyncpg", query=query)
    elif scheme in ("sqlite", "sqlite+aiosqlite"):
        url = url.set(drivername="sqlite+aiosqlite")
    else:
        raise ConfigError(
            f"RAG_DATABASE_URL uses {url.drivername!r}: use postgresql://user:password@host/db, "
            "or leave it empty to keep the history in SQLite under the data directory"
        )
    return url.render_as_string(hide_password=False)


def describe_database(url: str) -> str:
    """``url`` for logs and messages: the password hidden."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def dialect_of(url: str) -> str:
    return "postgresql" if url.startswith("postgresql") else "sqlite"


def data_layer_options(settings: Settings, *, storage: Any | None = None) -> dict[str, Any]:
    """Keyword arguments for ``chainlit.data.sql_alchemy.SQLAlchemyDataLayer``."""
    url = database_url(settings)
    options: dict[str, Any] = {
        "conninfo": url,
        "storage_provider": storage if storage is not None else InlineStorage(),
    }
    if dialect_of(url) == "sqlite":
        # Writers wait for each other (many chats, one file) instead of failing at once.
        options["connect_args"] = {"timeout": SQLITE_BUSY_SECONDS}
    return options


async def prepare_database(url: str) -> None:
    """Create the tables and indexes if missing, add any column a newer schema has, and for
    SQLite switch the file to WAL (crash-safe, readers never block the writer) and make it
    readable by its owner only. Safe to run at every start, also by two processes at once."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.ext.asyncio import create_async_engine

    dialect = dialect_of(url)
    path: Path | None = None
    connect_args: dict[str, Any] = {}
    if dialect == "sqlite":
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        if database and database != ":memory:":
            path = Path(database)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                path.touch(mode=0o600)
        connect_args = {"timeout": SQLITE_BUSY_SECONDS}
    engine = create_async_engine(url, connect_args=connect_args)
    try:
        if dialect == "sqlite":
            async with engine.connect() as conn:  # outside a transaction: SQLite requires it
                await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        async with engine.begin() as conn:
            if dialect == "postgresql":  # two apps starting at once: one creates, the other waits
                await conn.execute(text("SELECT pg_advisory_xact_lock(7301946251)"))
            for statement in schema_statements(dialect):
                await conn.exec_driver_sql(statement)
            for table, columns in TABLES.items():
                present = await _columns(conn, dialect, table)
                for name, types, extra in columns:
                    if name not in present:
                        kind = types[1 if dialect == "postgresql" else 0]
                        default = f" {extra}" if extra.startswith("DEFAULT") else ""
                        await conn.exec_driver_sql(f'ALTER TABLE {table} ADD COLUMN "{name}" {kind}{default}')
    except (SQLAlchemyError, OSError) as exc:
        raise ConfigError(
            f"cannot open the chat history database {describe_database(url)}: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''} (check RAG_DATABASE_URL; empty keeps it in SQLite "
            "under the data directory)"
        ) from exc
    finally:
        await engine.dispose()
    if path is not None:
        for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if part.exists():
                os.chmod(part, 0o600)


async def _columns(conn: Any, dialect: str, table: str) -> set[str]:
    from sqlalchemy import text

    if dialect == "sqlite":
        rows = (await conn.exec_driver_sql(f"PRAGMA table_info({table})")).all()
        return {row[1] for row in rows}
    rows = (
        await conn.execute(
            text(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = :table"
            ),
            {"table": table},
        )
    ).all()
    return {row[0] for row in rows}


# --- element content, kept inline -----------------------------------------------------------


def data_url(data: bytes | str, mime: str) -> str:
    """``data:`` URL for ``data`` (text is UTF-8).

    >>> data_url("[1] é", "text/markdown")
    'data:text/markdown;charset=utf-8;base64,WzFdIMOp'
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    kind = mime or "application/octet-stream"
    if kind.startswith("text/") and "charset=" not in kind:
        kind += ";charset=utf-8"
    return f"data:{kind};base64,{base64.b64encode(raw).decode('ascii')}"


def read_data_url(url: str) -> bytes | None:
    """The bytes of a ``data:`` URL; ``None`` for anything else.

    >>> read_data_url("data:text/plain;charset=utf-8;base64,aGk="), read_data_url("data:,a%20b"), read_data_url("/x")
    (b'hi', b'a b', None)
    """
    if not url.startswith("data:") or "," not in url:
        return None
    head, _, payload = url[5:].partition(",")
    try:
        return base64.b64decode(payload, validate=True) if head.endswith(";base64") else unquote_to_bytes(payload)
    except ValueError:
        return None


class InlineStorage:
    """A Chainlit storage client (``BaseStorageClient``'s four methods) that keeps small text
    content in the element's database row, as a ``data:`` URL, and nothing else anywhere.

    ``upload_file`` returns no object key, so Chainlit stores the URL itself and hands it back
    unchanged when a thread is read; larger or non-text content gets no URL (the element keeps
    its name; the app rebuilds what it can on resume)."""

    def __init__(self, *, limit: int = DEFAULT_INLINE_LIMIT) -> None:
        self.limit = limit

    def inlines(self, data: bytes | str, mime: str) -> bool:
        size = len(data.encode("utf-8") if isinstance(data, str) else data)
        return (mime or "").startswith("text/") and size <= self.limit

    async def upload_file(
        self,
        object_key: str,
        data: bytes | str,
        mime: str = "application/octet-stream",
        overwrite: bool = True,
        content_disposition: str | None = None,
    ) -> dict[str, Any]:
        if not self.inlines(data, mime):
            return {"object_key": None, "url": None}
        return {"object_key": None, "url": data_url(data, mime)}

    async def delete_file(self, object_key: str) -> bool:
        return True  # the content goes with the element's row

    async def get_read_url(self, object_key: str) -> str:
        return object_key  # never called: no element is stored with an object key

    async def close(self) -> None:
        return None


class ThreadAuthorLookup:
    """Mix in before ``SQLAlchemyDataLayer``: an unknown thread id has no author (``""``, which
    Chainlit's ``is_thread_author`` answers with 404) instead of raising ``ValueError`` (a 500
    and a traceback in the log)."""

    async def get_thread_author(self, thread_id: str) -> str:
        try:
            return str(await super().get_thread_author(thread_id))  # type: ignore[misc]
        except ValueError:
            return ""


class OrderedStepWrites:
    """Mix in before ``SQLAlchemyDataLayer``: a step's writes land in the order they were made.

    Chainlit persists a step in background tasks: ``send()`` starts a ``create_step`` (empty
    output), ``update()`` an ``update_step`` (the output). Each is an upsert on its own pooled
    connection, after a thread check, so the empty one often lands last and blanks the output
    (a fast step such as Retrieval lost it in 14 of 30 tries here). Tasks start in the order they
    were created, and a per-step lock taken before the first ``await`` keeps that order."""

    _step_locks: dict[str, tuple[asyncio.Lock, int]]

    async def create_step(self, step_dict: dict[str, Any]) -> None:
        locks = self.__dict__.setdefault("_step_locks", {})
        key = str(step_dict.get("id"))
        lock, users = locks.get(key) or (asyncio.Lock(), 0)
        locks[key] = (lock, users + 1)
        try:
            async with lock:
                await super().create_step(step_dict)  # type: ignore[misc]
        finally:
            lock, users = locks[key]
            if users <= 1:
                del locks[key]
            else:
                locks[key] = (lock, users - 1)


class FeedbackOwners:
    """Mix in before ``SQLAlchemyDataLayer``: whose chat a rated answer, or a rating, is in.

    Chainlit's ``PUT`` and ``DELETE /feedback`` check only that someone is signed in, then write
    or delete whatever ids the request names; ``feedback_allowed`` asks these two lookups first.
    An id that is not a UUID (every id Chainlit makes is one) is unknown without asking the
    database: PostgreSQL would refuse it as an error in the log."""

    async def step_chat(self, step_id: object) -> tuple[str, str]:
        """``(thread id, author identifier)`` of the chat holding step ``step_id``; empty strings
        when there is no such step."""
        if not _is_uuid(step_id):
            return "", ""
        query = (
            'SELECT s."threadId" AS thread, t."userIdentifier" AS author '
            'FROM steps s JOIN threads t ON t."id" = s."threadId" WHERE s."id" = :id'
        )
        rows = await self.execute_sql(query=query, parameters={"id": str(step_id)})  # type: ignore[attr-defined]
        if isinstance(rows, list) and rows:
            return str(rows[0].get("thread") or ""), str(rows[0].get("author") or "")
        return "", ""

    async def feedback_step(self, feedback_id: object) -> str | None:
        """The step (answer) a stored feedback rates; ``None`` when there is no such feedback."""
        if not _is_uuid(feedback_id):
            return None
        query = 'SELECT "forId" FROM feedbacks WHERE "id" = :id'
        rows = await self.execute_sql(query=query, parameters={"id": str(feedback_id)})  # type: ignore[attr-defined]
        return str(rows[0]["forId"]) if isinstance(rows, list) and rows else None


def _is_uuid(value: object) -> bool:
    """Whether ``value`` is an id in the form Chainlit makes (``str(uuid.uuid4())``).

    >>> _is_uuid("0b6f1d1e-9a4c-4c1e-8f5e-2d1a3b4c5d6e"), _is_uuid("x'; --"), _is_uuid(None), _is_uuid(7)
    (True, False, False, False)
    """
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


async def feedback_allowed(layer: Any, identifier: str, method: str, payload: object) -> bool:
    """Whether the signed-in ``identifier`` may make this request to Chainlit's ``/feedback``
    route (``payload``: its JSON body): rate an answer in a chat of their own (``PUT``; an
    existing rating it names must be one of theirs too, and a ``threadId``, when given, the
    answer's chat), or take back a rating of theirs (``DELETE``). ``layer`` has the
    ``FeedbackOwners`` lookups. Anything malformed is refused: Chainlit would refuse it too."""
    body = payload if isinstance(payload, dict) else {}
    if method == "DELETE":
        step = await layer.feedback_step(body.get("feedbackId"))
        return step is not None and (await layer.step_chat(step))[1] == identifier
    if method != "PUT":
        return True  # Chainlit answers other methods with 405
    feedback = body.get("feedback")
    if not isinstance(feedback, dict):
        return False
    thread, author = await layer.step_chat(feedback.get("forId"))
    if not author or author != identifier or feedback.get("threadId") not in (None, thread):
        return False
    if feedback.get("id") is None:
        return True
    rated = await layer.feedback_step(feedback["id"])
    if rated is None:
        return _is_uuid(feedback["id"])  # a new rating, under an id the page chose
    return (await layer.step_chat(rated))[1] == identifier  # a changed rating: it must be theirs


class DataLayerFixes(ThreadAuthorLookup, OrderedStepWrites, FeedbackOwners):
    """The fixes and lookups: ``class HistoryLayer(DataLayerFixes, SQLAlchemyDataLayer)``."""


# --- what an answer leaves behind, and what a resumed chat reads back ------------------------


@dataclass(frozen=True)
class Citation:
    """A passage an answer cited: its number in the answer and where it came from."""

    number: int
    source: str
    chunk_id: str
    page: int | None = None
    headings: tuple[str, ...] = ()
    file_sha256: str = ""


def citations_of(hits: Sequence[Hit], cited: Iterable[int], file_hashes: Mapping[str, str]) -> list[Citation]:
    """The ``Citation`` of each cited number (1-based into ``hits``; others are ignored), with
    the content hash its file had when it was indexed (``{source: sha256}``, from the snapshot)."""
    out = []
    for number in cited:
        if 1 <= number <= len(hits):
            chunk = hits[number - 1].chunk
            sha = file_hashes.get(chunk.source, "")
            out.append(Citation(number, chunk.source, chunk.id, chunk.page, tuple(chunk.headings), sha))
    return out


def answer_metadata(
    *,
    question: str,
    reply: str,
    model: str,
    citations: Sequence[Citation] = (),
    standalone: str | None = None,
    endpoint: str = "",
    policy: str = "",
    fallback: str = "",
    passages: int = 0,
    finish: str = "",
) -> dict[str, Any]:
    """The ``metadata`` of an answer's message: JSON-ready, under one key (``"rag"``), versioned.

    ``reply`` is the text a follow-up's history should carry (what the app remembers for the
    turn: the answer without citation markers, or the "no answer" note); empty for an answer
    that must not be remembered (stopped, failed)."""
    return {
        METADATA_KEY: {
            "v": METADATA_VERSION,
            "question": question,
            "standalone": standalone if standalone is not None and standalone != question else None,
            "reply": reply,
            "model": model,
            "endpoint": endpoint,
            "policy": policy,
            "fallback": fallback or None,
            "passages": passages,
            "finish": finish or None,
            "citations": [_citation_dict(c) for c in citations],
        }
    }


def _citation_dict(c: Citation) -> dict[str, Any]:
    return {"n": c.number, "source": c.source, "chunk": c.chunk_id, "page": c.page,
            "headings": list(c.headings), "sha256": c.file_sha256}  # fmt: skip


def rag_metadata(step: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``"rag"`` metadata of a stored step (Chainlit's data layer hands metadata back as
    JSON text), or ``None``."""
    metadata = step.get("metadata")
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError:
            return None
    value = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    return value if isinstance(value, dict) and value.get("v") == METADATA_VERSION else None


def remembered_turns(steps: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """``(question, reply)`` for each remembered answer of a stored chat (one with a ``reply`` in
    its metadata), in order: what a resumed chat feeds back to ``rag.pipeline.remember``.
    Questions without such an answer (stopped, failed, cut short by a crash) are left out."""
    turns = []
    for step in sorted(steps, key=lambda s: str(s.get("createdAt") or "")):
        if step.get("type") not in ("assistant_message", "system_message"):
            continue
        meta = rag_metadata(step)
        if meta and meta.get("reply") and meta.get("question"):
            turns.append((str(meta["question"]), str(meta["reply"])))
    return turns


def history_from_steps(steps: Sequence[Mapping[str, Any]], *, limit: int | None = None) -> list[Message]:
    """``remembered_turns`` as messages (the last ``limit``), for callers without ``remember``."""
    messages = [m for q, r in remembered_turns(steps) for m in (Message("user", q), Message("assistant", r))]
    return messages[-limit:] if limit else messages


@dataclass(frozen=True)
class PassageState:
    """How a cited passage stands against the index now: ``current`` (the same passage is still
    indexed), ``changed`` (its document is indexed but no longer holds it) or ``gone`` (its
    document is not indexed any more)."""

    citation: Citation
    state: str
    message_id: str


def cited_passages(steps: Sequence[Mapping[str, Any]]) -> list[tuple[str, Citation]]:
    """``(message id, citation)`` for every citation stored with the answers in ``steps``."""
    out = []
    for step in steps:
        meta = rag_metadata(step)
        for item in (meta or {}).get("citations") or []:
            try:
                page = item.get("page")
                citation = Citation(
                    int(item["n"]), str(item["source"]), str(item["chunk"]), int(page) if page is not None else None,
                    tuple(item.get("headings") or ()), str(item.get("sha256") or ""),
                )  # fmt: skip
            except (KeyError, TypeError, ValueError):
                continue
            out.append((str(step.get("id")), citation))
    return out


def passage_states(steps: Sequence[Mapping[str, Any]], indexed: Mapping[str, Collection[str]]) -> list[PassageState]:
    """Each cited passage of a stored chat against the index now (``{source: chunk ids}``).

    >>> step = {"id": "m1", "type": "assistant_message", "metadata": answer_metadata(question="q", reply="r",
    ...     model="m", citations=[Citation(1, "a.md", "c1"), Citation(2, "b.md", "c2"), Citation(3, "c.md", "c3")])}
    >>> [p.state for p in passage_states([step], {"a.md": {"c1"}, "b.md": {"c9"}})]
    ['current', 'changed', 'gone']
    """
    states = []
    for message_id, citation in cited_passages(steps):
        chunks = indexed.get(citation.source)
        if chunks is None:
            state = "gone"
        elif citation.chunk_id in chunks:
            state = "current"
        else:
            state = "changed"
        states.append(PassageState(citation, state, message_id))
    return states


def passage_note(state: PassageState, *, escape: Callable[[str], str] = str) -> str:
    """What to tell a reader of an old answer about a passage that is not current (empty when
    it is); ``escape`` makes the file name safe for the page's markdown.

    >>> passage_note(PassageState(Citation(2, "guide.md", "c"), "gone", "m"))
    '_guide.md is no longer among the indexed documents: this is the passage as it was when the answer was written._'
    """
    source = escape(state.citation.source)
    if state.state == "gone":
        return f"_{source} is no longer among the indexed documents: this is the passage as it was when the answer was written._"
    if state.state == "changed":
        return f"_{source} has changed since this answer: this is the passage as it was when the answer was written._"
    return ""
