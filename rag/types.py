"""The currency between pipeline stages: small frozen dataclasses, nothing else.

A file becomes ``Document``s (one per PDF page, or per file), documents become ``Chunk``s,
a search returns ``Hit``s. Paths are POSIX strings relative to the corpus directory.
A conversation is ``Message``s; a model's streamed answer is ``ChatDelta``s then one ``ChatDone``,
after ``Queued`` notices while a busy server keeps the request waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Document:
    """Text of one file, or of one page of a paged file.

    ``page`` is 1-based for paged formats (PDF) and ``None`` otherwise.
    ``sections`` marks where Markdown headings start: ``(offset, heading_path)`` pairs,
    sorted by offset, where ``heading_path`` is e.g. ``("Install", "On Linux")``.
    """

    source: str
    text: str
    page: int | None = None
    title: str = ""
    sections: tuple[tuple[int, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class Chunk:
    """A passage small enough for the embedding model's window.

    ``text`` is exactly ``document.text[start:end]``; ``headings`` is the heading path in
    force at ``start``. ``id`` is stable: derived from source, page, position and content.
    ``table_header``: when the chunk starts inside a Markdown table, below its header row, that
    row (the column names its rows would otherwise lose); empty otherwise.
    """

    id: str
    source: str
    text: str
    start: int
    end: int
    page: int | None = None
    headings: tuple[str, ...] = ()
    title: str = ""
    table_header: str = ""


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk. ``score`` orders hits within a search (higher is better);
    ``similarity`` is the cosine similarity of the query to the chunk, comparable across
    modes, and what a relevance threshold applies to. ``excerpt``, when set, is the part of
    the chunk's text the model is sent (``rag.excerpts``); a citation opens the whole chunk."""

    chunk: Chunk
    score: float
    rank: int
    similarity: float = 0.0
    dense_rank: int | None = None
    keyword_rank: int | None = None
    excerpt: str | None = None


@dataclass(frozen=True)
class SkippedFile:
    """A file that was not indexed, and why (shown to the user as is)."""

    source: str
    reason: str


@dataclass(frozen=True)
class IndexReport:
    """What one ``rag index`` run did."""

    added: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    skipped: tuple[SkippedFile, ...] = ()
    ignored: int = 0
    chunks_embedded: int = 0
    chunks_total: int = 0
    seconds: float = 0.0
    rebuild_reason: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)


@dataclass(frozen=True)
class Message:
    """One turn of a conversation, as chat-completions endpoints take it."""

    role: str
    content: str


@dataclass(frozen=True)
class ChatDelta:
    """A piece of the answer's text, in order."""

    text: str


@dataclass(frozen=True)
class ChatDone:
    """The end of an answer: the last item of every stream.

    ``finish_reason`` is ``None`` when the server never said (a Foundry Local quirk).
    """

    finish_reason: str | None
    usage: dict[str, int] | None
    model: str | None


ChatEvent = ChatDelta | ChatDone


@dataclass(frozen=True)
class Queued:
    """The server holds the request in line behind ``ahead`` others (the one it is answering
    included); ``ahead == 0``: its turn has come. Only before an answer's first delta, and only
    from a server that says so (``rag serve``: see ``rag.protocol``)."""

    ahead: int
