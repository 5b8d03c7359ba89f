"""What the chat shows, as Markdown text: passages, citations, notices, welcome and errors.

Pure functions from plain values (hits, reports, snapshots, errors) to Markdown strings and
``SideElement`` descriptions; ``app.py`` turns them into Chainlit messages, steps and elements.

Document text and file names are shown as text, never as markup: they are escaped before they
reach the page (``escape_markdown``, ``code_span``), and Chainlit's ``unsafe_allow_html`` stays off.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rag.chunking import is_table_row, is_table_rule
from rag.errors import (
    ContextLengthError,
    EndpointError,
    EndpointTimeoutError,
    EndpointUnreachableError,
    IndexMismatchError,
    IndexMissingError,
    PolicyError,
    RagError,
    UnknownModelError,
)
from rag.index import Snapshot
from rag.pipeline import AskOptions, Retrieval
from rag.types import Hit, IndexReport
from rag.uploads import FILE_TYPES, SavedUpload


class Model(Protocol):
    """Who answers: an opened endpoint (``rag.routing.Connection``) as the welcome names it."""

    model: str
    base_url: str

    @property
    def local(self) -> bool: ...


SNIPPET_CHARS = 160
READING = "_Reading the passages…_"  # an answer's text until its first token


def queue_text(ahead: int) -> str:
    """An answer's text while the model answers others first (``READING`` once its turn came).
    Plain text: the page shows a streaming message's markup as typed.

    >>> queue_text(2)
    '⏳ 2 questions ahead of yours: the model answers one at a time…'
    >>> queue_text(0) == READING
    True
    """
    if ahead <= 0:
        return READING
    return f"⏳ {ahead} question{'' if ahead == 1 else 's'} ahead of yours: the model answers one at a time…"


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
            f"| {escape_markdown(one_line(hit.excerpt if hit.excerpt is not None else hit.chunk.text))} |"
        )
    return "\n".join(rows)


def passage_markdown(hit: Hit) -> str:
    """The exact passage with its origin, for a side panel: the text escaped, paragraphs kept,
    and the rows of a Markdown table shown as a table (under the header row the passage
    starts below, when it does: ``Chunk.table_header``)."""
    blocks = []
    for number, paragraph in enumerate(re.split(r"\n\s*\n", hit.chunk.text.strip())):
        lines = paragraph.splitlines()
        for i, (is_row, run) in enumerate(itertools.groupby(lines, key=is_table_row)):
            run = list(run)
            if is_row:
                above = hit.chunk.table_header if number == 0 and i == 0 else ""
                blocks.append(markdown_table(run, header=above))
            elif text := " ".join(" ".join(run).split()):
                blocks.append(escape_markdown(text))
    body = "\n\n".join(blocks)
    return f"**{escape_markdown(where(hit))}** · similarity {hit.similarity:.2f}\n\n{body}"


def markdown_table(rows: Sequence[str], *, header: str = "") -> str:
    """Pipe-table ``rows`` as a Markdown table whose cells show as text (escaped). ``header``, or
    else the first row when a ``|---|`` rule follows it, heads the table; without either the
    header is left blank rather than showing a data row as one.

    >>> print(markdown_table(["| Planet | Moons |", "|---|---|", "| Mars | *2* |"]))
    | Planet | Moons |
    | --- | --- |
    | Mars | \\*2\\* |
    >>> print(markdown_table(["| Mars | 2 |"]))
    |  |  |
    | --- | --- |
    | Mars | 2 |
    """

    def cells(row: str) -> list[str]:
        return [" ".join(c.split()) for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]

    head = cells(header) if header else []
    if not head and len(rows) > 1 and is_table_rule(rows[1]):
        head, rows = cells(rows[0]), rows[1:]
    body = [cells(row) for row in rows if not is_table_rule(row)]
    width = max(len(row) for row in [head, *body])

    def line(row: list[str]) -> str:
        return "| " + " | ".join(escape_markdown(c) for c in row + [""] * (width - len(row))) + " |"

    return "\n".join([line(head), "| " + " | ".join(["---"] * width) + " |", *map(line, body)])


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


def plural(n: int, word: str) -> str:
    """``n`` and ``word``, plural unless one.

    >>> plural(1, "passage"), plural(2, "passage")
    ('1 passage', '2 passages')
    """
    return f"{n} {word}{'' if n == 1 else 's'}"


# --- Index updates, starters, welcome -------------------------------------------------------


def passages_of(snapshot: Snapshot, source: str) -> int | None:
    record = snapshot.files.get(source)
    return None if record is None else len(record.chunk_ids)


def describe_update(report: IndexReport, snapshot: Snapshot, announced: set[tuple[str, str]]) -> str | None:
    """A short notice for open chats about what an index update changed, or None.

    Skipped files are named with their reason once (``announced`` remembers them).
    """
    parts = []
    for verb, sources in (("added", report.added), ("updated", report.updated)):
        if sources:
            names = ", ".join(
                f"**{escape_markdown(s)}** ({plural(passages_of(snapshot, s) or 0, 'passage')})" for s in sources[:10]
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
    out: list[tuple[str, str]] = []
    for source in sorted(snapshot.files)[:limit]:  # a file's chunks alone: the store may be Milvus
        chunks = sorted(snapshot.chunks_of(source), key=lambda c: (c.page or 0, c.start))
        if not chunks:
            continue
        title = chunks[0].title.strip()
        if not title or title == Path(source).stem:
            title = _humanize(source)
        section = next((c.headings[-1] for c in chunks if len(c.headings) > 1 and c.headings[-1].strip()), None)
        question = f"What does “{title}” say under “{section}”?" if section else f"What is “{title}” about?"
        out.append((one_line(title, 40), question))
    return out


def welcome_text(snapshot: Snapshot | None, model: Model | None, error: BaseException | None,
                 corpus_dir: Path, *, suggest: bool = False) -> str:  # fmt: skip
    """The chat's first message: what is indexed, and who answers (``model``) or why nobody
    can (``error``). ``suggest``: list the starter questions in it (the page shows them as
    buttons only when they existed as it loaded, i.e. not on a first visit that waited for the
    first index build)."""
    folder = code_span(str(corpus_dir))
    lines = []
    if snapshot is None or len(snapshot) == 0:
        lines.append(
            f"**Nothing is indexed yet.** Attach {FILE_TYPES} files to a message (📎 or drag and drop), "
            f"or copy them into {folder}: they are indexed within seconds."
        )
    else:
        lines.append(
            f"**Ask about your documents.** {plural(len(snapshot.files), 'document')} and "
            f"{plural(len(snapshot), 'passage')} are indexed from {folder}. Answers cite their passages "
            f"as [1], [2]…: click a number to read it. Add files by attaching them or dropping them into {folder}."
        )
        if suggest:
            questions = [q for _, q in starter_questions(snapshot)]
            lines.append("You could ask:\n" + "\n".join(f"- {escape_markdown(q)}" for q in questions))
    if model is not None:
        where_ = "on this computer" if model.local else escape_markdown(model.base_url)
        lines.append(f"Answers come from **{escape_markdown(model.model)}** ({where_}).")
    elif error is not None:
        lines.append(
            f"⚠️ {friendly_error(error)}\n\nYou can still search: I'll show the passages that match, "
            "and try the model again with your next question."
        )
    return "\n\n".join(lines)


# --- Answers --------------------------------------------------------------------------------


def retrieval_text(found: Retrieval, sent: Sequence[Hit] | None, options: AskOptions) -> str:
    """The Retrieval step's text: how it searched, then the passages found, or sent to the
    model once it has them (``sent``), or the closest ones when none was relevant."""
    setup = f"{options.mode} search, top {options.top_k}, relevance threshold {options.min_relevance:.2f}"
    if not found.relevant:
        return (
            f"{setup}: no passage reaches the threshold. Closest:\n\n"
            f"{passage_table(found.closest, min_relevance=found.min_relevance)}"
        )
    if sent is None:
        return f"{setup}: {plural(len(found.hits), 'passage')} found.\n\n{passage_table(found.hits)}"
    dropped = len(found.hits) - len(sent)
    fit = f" ({dropped} more left out: nothing in them for this question, or no room)" if dropped > 0 else ""
    return f"{setup}: {plural(len(sent), 'passage')} sent to the model{fit}.\n\n{passage_table(sent)}"


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


def upload_text(upload: SavedUpload, passages: int | None, reason: str | None, corpus_dir: Path) -> str:
    """What to say about one file attached to a message, once the index was updated."""
    shown = escape_markdown(upload.source)
    if passages is None:
        return f"Could not index **{shown}**: {escape_markdown(reason or 'it has no text to index')}. The file was not kept."
    if not upload.created:
        return f"**{shown}** is already in your documents ({plural(passages, 'passage')})."
    renamed = f" (a different file named {escape_markdown(upload.asked)} is already there)" if upload.renamed else ""
    return f"Added **{shown}** to {code_span(str(corpus_dir))}{renamed}: {plural(passages, 'passage')} indexed."


def no_model_text(error: BaseException, hits: Sequence[Hit]) -> str:
    """What to say when no model could answer: why, and the passages that match best."""
    lines = "\n".join(f"- [{n}] {escape_markdown(where(h))}" for n, h in enumerate(hits, start=1))
    return (
        f"⚠️ {friendly_error(error)}\n\nThe passages that match best (click a number to read it):\n{lines}\n\n"
        "I'll try the model again with your next question."
    )


def finish_note(finish_reason: str | None, max_answer_tokens: int) -> str:
    """A note under an answer that did not end by itself, or ''."""
    if finish_reason == "length":
        return f"_The answer was cut off at {max_answer_tokens} tokens (RAG_MAX_ANSWER_TOKENS)._"
    if finish_reason == "repetition":
        return "_Stopped: the model started repeating itself._"
    return ""


# --- Errors ---------------------------------------------------------------------------------


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
    if isinstance(exc, PolicyError):
        return f"No model may answer under this policy. {said}"
    if isinstance(exc, IndexMissingError | IndexMismatchError):
        return f"The index is not usable yet. {said}"
    if isinstance(exc, RagError):
        return said
    return (
        f"Something went wrong on our side ({type(exc).__name__}); the details are in the server log. "
        "Your documents and settings are unchanged: try again."
    )
