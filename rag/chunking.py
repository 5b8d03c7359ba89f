"""Chunking: documents -> passages that fit the embedding model's window.

Structure first: a chunk never spans two Markdown sections; inside a section, paragraphs
(blank-line separated) are packed greedily while they fit, and only a paragraph too big for a
chunk on its own is cut, at sentences (a table at its rows), then at whitespace, and as a last
resort anywhere (a base64 blob, a long URL). Consecutive chunks of a section share up to
``overlap_tokens`` of trailing text, whole sentences when they fit.

What each chunk embeds is ``embedding_text``: a one-line context prefix (title and heading
path), the header row of a table it starts inside, and the chunk's text. The bound, with
``limit = window`` if a window is given, else ``max_tokens``::

    count_tokens(embedding_text(chunk)) <= limit            for every chunk

More exactly, with ``p = count_tokens(prefix) - count_tokens("")`` (the prefix's tokens
without special tokens; the prefix is everything before the chunk's text: the context line and
a ``table_header`` row with its line break), ``count_tokens(embedding_text(chunk)) <= p + min(max_tokens, limit - p)``:
the text gets ``max_tokens`` where the window leaves room for the prefix, and less where it
does not (with no prefix, ``count_tokens(chunk.text) <= min(max_tokens, limit)``). A prefix
may take the text's room down to ``min(max_tokens, limit // 2)`` tokens; a longer one loses
its leading heading levels, then the title (the chunk's ``headings`` and ``title`` then hold
what was embedded). Text is never dropped: ``chunk.text == doc.text[chunk.start:chunk.end]``
and the chunks of a document cover all of its non-whitespace text.

Trade-offs:

- Speed over exactness in packing: each unit is counted once and counts are added, which is
  exact for a whitespace-splitting tokenizer such as BERT's and close for others. Every
  finished chunk is then counted once for real, and cut again if it is over, so the bound
  holds exactly; chunks may come out a little under-full instead.
- A chunk is at most about ``MAX_CHARS_PER_TOKEN`` characters per token of budget, even if
  the tokenizer reads a huge run as one unknown token, so no chunk can swamp a prompt.
- Sentence splitting is a regex (., !, ? before a capital, digit or line break; CJK 。！？)
  with a short abbreviation list, not a language model: a rare cut lands mid-sentence.
- A table too big for one chunk is cut between rows. Every chunk stays a plain slice of the
  document; a chunk that starts below the header row carries that row in ``table_header``,
  embedded before its text (and shown to the model with it) when the window has room for it,
  so rows keep their column names ("| Neptune | Ice giant | 30.1 | …" alone says little).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rag.types import Chunk, Document

CountTokens = Callable[[str], int]

MAX_CHARS_PER_TOKEN = 10
# The smallest room for chunk text, in tokens without special tokens: enough for any one
# character, which a byte-level tokenizer may read as up to 4 tokens.
MIN_TEXT_TOKENS = 4
PREFIX_SEPARATOR = " > "

_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s)|[。！？]+[”’」』）)]*")
_BLOCK_START = re.compile(r"[^\S\n]*(?:[-*+]\s|[>|#]|\d+[.)]\s)")
_OPENERS = "\"'“‘([¿¡"
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "vs", "etc", "e.g", "i.e", "cf", "fig", "no", "vol"}
)

# How finely a piece was cut; the overlap looks inside paragraphs and sentences only.
_PARAGRAPH, _SENTENCE, _FRAGMENT = 0, 1, 2


@dataclass(frozen=True)
class _Piece:
    start: int
    end: int
    cost: int
    level: int


def chunk_id(source: str, page: int | None, start: int, text: str) -> str:
    """A stable 32-hex-digit id from where a chunk is and what it says.

    >>> chunk_id("a.md", None, 0, "Hello") == chunk_id("a.md", None, 0, "Hello")
    True
    >>> len(chunk_id("a.md", 3, 10, "Hello"))
    32
    """
    page_part = "" if page is None else str(page)
    key = "\0".join((source, page_part, str(start), text))
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def context_prefix(title: str, headings: Iterable[str]) -> str:
    """The line put before a chunk's text when it is embedded.

    >>> context_prefix("Composting guide", ("Turning the pile",))
    'Composting guide > Turning the pile\\n'
    >>> context_prefix("", ())
    ''
    """
    parts = [part for part in (title, *headings) if part.strip()]
    return PREFIX_SEPARATOR.join(parts) + "\n" if parts else ""


def embedding_text(chunk: Chunk) -> str:
    """The text the model embeds for ``chunk``: its context prefix, the header row of the table
    it starts inside (if any), then its text.

    >>> c = Chunk(id="x", source="c.md", text="Turn it weekly.", start=0, end=15,
    ...           headings=("Turning the pile",), title="Composting guide")
    >>> embedding_text(c)
    'Composting guide > Turning the pile\\nTurn it weekly.'
    """
    return context_prefix(chunk.title, chunk.headings) + with_table_header(chunk.table_header, chunk.text)


def with_table_header(header: str, text: str) -> str:
    """``text`` with a table's header row before it, on a line of its own (``text`` when there
    is none).

    >>> with_table_header("| Planet | Moons |", "| Mars | 2 |")
    '| Planet | Moons |\\n| Mars | 2 |'
    """
    return f"{header}\n{text}" if header else text


def is_table_row(line: str) -> bool:
    """Whether a line is a row of a Markdown (pipe) table.

    >>> is_table_row("  | a | b |"), is_table_row("a | b"), is_table_row("")
    (True, False, False)
    """
    return line.lstrip().startswith("|")


_TABLE_RULE = re.compile(r"\s*\|?(?:\s*:?-+:?\s*\|)+\s*(?::?-+:?\s*)?")


def is_table_rule(line: str) -> bool:
    """Whether a line is the ``|---|:--:|`` rule under a Markdown table's header row.

    >>> is_table_rule("|--------|:-----:|"), is_table_rule("| --- | --- |"), is_table_rule("| a | - |"), is_table_rule("|  |")
    (True, True, False, False)
    """
    return bool(_TABLE_RULE.fullmatch(line))


def table_start(text: str, pos: int) -> int:
    """Where the table whose row holds ``pos`` starts in ``text`` (its first line, or the start
    of ``text`` when the rows run up to it); -1 when ``pos`` is on no table row.

    >>> t = "Intro.\\n| a | b |\\n| 1 | 2 |"
    >>> table_start(t, t.index("| 1")), table_start(t, 2)
    (7, -1)
    """
    line_start = text.rfind("\n", 0, pos) + 1
    line_end = text.find("\n", pos)
    if not is_table_row(text[line_start : line_end if line_end >= 0 else len(text)]):
        return -1
    first = line_start
    while first > 0:
        previous = text.rfind("\n", 0, first - 1) + 1
        if not is_table_row(text[previous : first - 1]):
            break
        first = previous
    return first


def table_header_at(text: str, pos: int) -> str:
    """The header row (whitespace as it is) of the table whose row starts at ``pos``, when the
    table starts before ``pos``; empty when ``pos`` starts no table row or starts the header.

    >>> t = "Intro.\\n\\n| Planet | Moons |\\n|---|---|\\n| Mars | 2 |\\n| Earth | 1 |"
    >>> table_header_at(t, t.index("| Earth")), table_header_at(t, t.index("| Planet")), table_header_at(t, 0)
    ('| Planet | Moons |', '', '')
    """
    first = table_start(text, pos)
    if first < 0 or first == text.rfind("\n", 0, pos) + 1:
        return ""
    end = text.find("\n", first)
    return text[first : end if end >= 0 else len(text)].strip()


def split_documents(
    docs: Iterable[Document],
    *,
    max_tokens: int,
    overlap_tokens: int,
    count_tokens: CountTokens,
    window: int | None = None,
) -> list[Chunk]:
    """``split_document`` over several documents, in order."""
    return [
        chunk
        for doc in docs
        for chunk in split_document(
            doc, max_tokens=max_tokens, overlap_tokens=overlap_tokens, count_tokens=count_tokens, window=window
        )
    ]


def split_document(
    doc: Document,
    *,
    max_tokens: int,
    overlap_tokens: int,
    count_tokens: CountTokens,
    window: int | None = None,
) -> list[Chunk]:
    """Cut ``doc`` into chunks; see the module docstring for the rules and the bound.

    ``count_tokens`` counts special tokens too (as the model reads the text); ``window`` is
    the model's window in the same units.

    >>> words = lambda text: len(text.split()) + 2
    >>> doc = Document("a.md", "One two three four five.\\n\\nSix seven eight nine ten.", title="A")
    >>> [c.text for c in split_document(doc, max_tokens=12, overlap_tokens=0, count_tokens=words)]
    ['One two three four five.', 'Six seven eight nine ten.']
    """
    limit = window if window is not None else max_tokens
    overhead = count_tokens("")
    if min(max_tokens, limit // 2) - overhead < MIN_TEXT_TOKENS:
        raise ValueError(
            f"max_tokens={max_tokens} and window={window} leave too little room for text: the tokenizer "
            f"adds {overhead} special tokens, so use at least {2 * (overhead + MIN_TEXT_TOKENS)}"
        )
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(f"overlap_tokens={overlap_tokens} must be at least 0 and below max_tokens={max_tokens}")

    splitter = _Splitter(doc.text, count_tokens, overhead, overlap_tokens)
    chunks: list[Chunk] = []
    for start, end, headings in _sections(doc):
        if not doc.text[start:end].strip():
            continue
        title, kept, prefix_cost = _fit_prefix(doc.title, headings, limit, max_tokens, count_tokens, overhead)
        text_room = min(max_tokens, limit - prefix_cost)  # special tokens included
        prefix = context_prefix(title, kept)
        spans = splitter.verified(start, end, text_room - overhead, prefix, prefix_cost + text_room)
        for s, e in _drop_contained(spans):
            text = doc.text[s:e]
            # Rows cut from their table's header keep it, where the window has room for it.
            header = table_header_at(doc.text, s)
            if header:
                head = prefix + with_table_header(header, "")
                cost = count_tokens(head) - overhead
                if count_tokens(head + text) > cost + min(max_tokens, limit - cost):
                    header = ""
            chunks.append(
                Chunk(
                    id=chunk_id(doc.source, doc.page, s, text),
                    source=doc.source,
                    text=text,
                    start=s,
                    end=e,
                    page=doc.page,
                    headings=kept,
                    title=title,
                    table_header=header,
                )
            )
    return chunks


def _sections(doc: Document) -> list[tuple[int, int, tuple[str, ...]]]:
    """``(start, end, heading_path)`` spans; text before the first heading has no path."""
    marks = [(0, ())] + sorted(
        ((max(0, min(offset, len(doc.text))), path) for offset, path in doc.sections), key=lambda mark: mark[0]
    )
    spans = []
    for i, (start, path) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else len(doc.text)
        if end > start:
            spans.append((start, end, tuple(path)))
    return spans


def _drop_contained(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans in order, without any that lies inside another (a chunk cut again after its
    count came out over can yield a piece the previous chunk already holds).

    >>> _drop_contained([(0, 5), (3, 9), (4, 9), (1, 4), (8, 12)])
    [(0, 5), (3, 9), (8, 12)]
    """
    kept: list[tuple[int, int]] = []
    for start, end in sorted(spans, key=lambda span: (span[0], -span[1])):
        if not kept or end > kept[-1][1]:
            kept.append((start, end))
    return kept


def _fit_prefix(
    title: str,
    headings: tuple[str, ...],
    limit: int,
    max_tokens: int,
    count_tokens: CountTokens,
    overhead: int,
) -> tuple[str, tuple[str, ...], int]:
    """The longest prefix that leaves the text ``min(max_tokens, limit // 2)`` tokens:
    drop leading heading levels, then the title. Returns ``(title, headings, cost)``."""
    room = limit - min(max_tokens, limit // 2)
    candidates = [(title, headings[i:]) for i in range(len(headings) + 1)] + [("", ())]
    for cand_title, cand_headings in candidates:
        prefix = context_prefix(cand_title, cand_headings)
        cost = count_tokens(prefix) - overhead if prefix else 0
        if cost <= room:
            return cand_title, cand_headings, cost
    return "", (), 0  # pragma: no cover - the empty prefix always fits


class _Splitter:
    """Cuts spans of one text; holds what every step needs so the helpers stay short."""

    def __init__(self, text: str, count_tokens: CountTokens, overhead: int, overlap: int) -> None:
        self.text = text
        self.count_tokens = count_tokens
        self.overhead = overhead
        self.overlap = overlap

    def cost(self, start: int, end: int) -> int:
        """Tokens of ``text[start:end]`` without special tokens, or a character floor."""
        tokens = self.count_tokens(self.text[start:end]) - self.overhead
        return max(tokens, math.ceil((end - start) / MAX_CHARS_PER_TOKEN))

    def verified(self, start: int, end: int, budget: int, prefix: str, cap: int) -> list[tuple[int, int]]:
        """Pack ``[start, end)``, count each chunk once for real, and re-cut any that is over ``cap``."""
        out: list[tuple[int, int]] = []
        for s, e in self.pack(start, end, budget):
            excess = self.count_tokens(prefix + self.text[s:e]) - cap
            if excess <= 0:
                out.append((s, e))
            elif budget > 1:
                # The summed counts were short for this text: cut it again with less room.
                out.extend(self.verified(s, e, max(1, budget - excess), prefix, cap))
            else:
                raise ValueError(
                    f"could not cut the text at {s}..{e} below {cap} tokens: the tokenizer counts "
                    f"{cap + excess} for it"
                )
        return out

    def pack(self, start: int, end: int, budget: int) -> list[tuple[int, int]]:
        """Greedy packing of the pieces of ``[start, end)``, with overlap between chunks."""
        chunks: list[tuple[int, int]] = []
        current: list[_Piece] = []
        used = 0
        for piece in self.pieces(start, end, budget):
            if current and used + piece.cost > budget:
                chunks.append((current[0].start, current[-1].end))
                tail = self.tail(current, min(self.overlap, budget - piece.cost))
                current = [tail] if tail else []
                used = tail.cost if tail else 0
            current.append(piece)
            used += piece.cost
        if current:
            chunks.append((current[0].start, current[-1].end))
        return chunks

    def pieces(self, start: int, end: int, budget: int) -> list[_Piece]:
        """Paragraphs that fit ``budget``; bigger ones cut into sentences, then fragments.
        A span longer than the character floor allows is over budget without counting it."""
        too_long = budget * MAX_CHARS_PER_TOKEN
        out: list[_Piece] = []
        for ps, pe in _paragraphs(self.text, start, end):
            cost = None if pe - ps > too_long else self.cost(ps, pe)
            if cost is not None and cost <= budget:
                out.append(_Piece(ps, pe, cost, _PARAGRAPH))
                continue
            sentences = _sentences(self.text, ps, pe)
            for ss, se in sentences:
                if len(sentences) > 1:
                    cost = None if se - ss > too_long else self.cost(ss, se)
                if cost is not None and cost <= budget:
                    out.append(_Piece(ss, se, cost, _SENTENCE))
                else:
                    ratio = (se - ss) / cost if cost else MAX_CHARS_PER_TOKEN
                    out.extend(self.fragments(ss, se, budget, ratio))
        return out

    def fragments(self, start: int, end: int, budget: int, ratio: float) -> list[_Piece]:
        """Cut a span over ``budget`` at whitespace, or anywhere if it has none. Each cut is
        guessed from ``ratio`` (characters per token, updated as pieces are counted) and
        checked with one count, so a huge span costs about one pass of the tokenizer."""
        out: list[_Piece] = []
        while True:
            start = _skip_space(self.text, start, end)
            if start >= end:
                return out
            want = max(1, int(budget * ratio * 0.9))
            if end - start <= want:  # the guess says the rest fits: check it
                cost = self.cost(start, end)
                if cost <= budget:
                    out.append(_Piece(start, end, cost, _FRAGMENT))
                    return out
                want = max(1, int(budget * (end - start) / cost * 0.9))
            while True:
                cut = _cut_before(self.text, start, start + want, end)
                piece_end = _strip_end(self.text, start, cut)
                cost = self.cost(start, piece_end)
                if cost <= budget:
                    break
                if cut - start <= 1:
                    raise ValueError(f"a single character costs {cost} tokens, more than the {budget} left for text")
                want = min(cut - start - 1, max(1, int((cut - start) * budget / cost * 0.9)))
            out.append(_Piece(start, piece_end, cost, _FRAGMENT))
            ratio = (piece_end - start) / cost
            start = cut

    def tail(self, pieces: list[_Piece], allowance: int) -> _Piece | None:
        """The trailing text of a finished chunk to repeat in the next, costing at most
        ``allowance``: whole pieces, then whole sentences, or else whole words."""
        start, taken = pieces[-1].end, 0
        for piece in reversed(pieces):
            left = allowance - taken
            if piece.cost <= left and piece is not pieces[0]:  # never the whole chunk again
                start, taken = piece.start, taken + piece.cost
                continue
            found = self.sentence_tail(piece, left) if piece.level == _PARAGRAPH and left > 0 else None
            if found:
                start, taken = found[0], taken + found[1]
            elif taken == 0:
                start, taken = self.word_tail(piece.start, piece.end, piece.cost, left)
            break
        return _Piece(start, pieces[-1].end, taken, _SENTENCE) if taken else None

    def sentence_tail(self, piece: _Piece, allowance: int) -> tuple[int, int] | None:
        """``(start, cost)`` of the longest run of trailing sentences of ``piece`` that the
        characters-per-token guess allows and a count confirms, or ``None``."""
        starts = [s for s, _ in _sentences(self.text, piece.start, piece.end)[1:]]
        guess = piece.end - allowance * (piece.end - piece.start) / piece.cost
        for begin in [s for s in starts if s >= guess] or starts[-1:]:
            cost = self.cost(begin, piece.end)
            if cost <= allowance:
                return begin, cost
        return None

    def word_tail(self, start: int, end: int, cost: int, allowance: int) -> tuple[int, int]:
        """``(start, cost)`` of the longest whole-word suffix of ``[start, end)`` within
        ``allowance`` (guessed, then counted); ``(end, 0)`` if there is none."""
        want = int(allowance * (end - start) / max(cost, 1) * 0.9)
        while want > 0:
            begin = _word_start_after(self.text, max(end - want, start + 1), end)
            if begin >= end:
                return end, 0
            tail_cost = self.cost(begin, end)
            if tail_cost <= allowance:
                return begin, tail_cost
            want = min(end - begin - 1, int((end - begin) * allowance / tail_cost * 0.9))
        return end, 0


def _paragraphs(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Blank-line separated blocks of ``text[start:end]``, stripped.

    >>> _paragraphs("a b\\n\\n  \\nc", 0, 9)
    [(0, 3), (8, 9)]
    """
    spans, pos = [], start
    for match in _PARAGRAPH_BREAK.finditer(text, start, end):
        spans.append((pos, match.start()))
        pos = match.end()
    spans.append((pos, end))
    return [span for span in (_strip(text, s, e) for s, e in spans) if span[1] > span[0]]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence of ``text``, paragraph by paragraph (a table row, list
    item or quote line is one).

    >>> t = "Dr. Who came. He left!\\n\\nNew paragraph"
    >>> [t[s:e] for s, e in sentence_spans(t)]
    ['Dr. Who came.', 'He left!', 'New paragraph']
    """
    return [span for ps, pe in _paragraphs(text, 0, len(text)) for span in _sentences(text, ps, pe)]


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Sentences of a paragraph, stripped; table rows, list items and quote lines stand alone.

    >>> t = "Dr. Who came. He left!\\n| a | b |\\n| 1 | 2 |"
    >>> [t[s:e] for s, e in _sentences(t, 0, len(t))]
    ['Dr. Who came.', 'He left!', '| a | b |', '| 1 | 2 |']
    """
    blocks: list[tuple[int, int, bool]] = []  # (start, end, is_table_row)
    pos = start
    while pos < end:
        newline = text.find("\n", pos, end)
        line_end = end if newline < 0 else newline
        is_row = is_table_row(text[pos:line_end])
        starts_block = is_row or bool(_BLOCK_START.match(text, pos, line_end))
        if not blocks or starts_block or blocks[-1][2]:
            blocks.append((pos, line_end, is_row))
        else:
            blocks[-1] = (blocks[-1][0], line_end, False)
        pos = line_end + 1
    spans: list[tuple[int, int]] = []
    for bs, be, is_row in blocks:
        spans.extend([(bs, be)] if is_row else _split_sentences(text, bs, be))
    return [span for span in (_strip(text, s, e) for s, e in spans) if span[1] > span[0]]


def _split_sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans, pos = [], start
    for match in _SENTENCE_END.finditer(text, start, end):
        cut = match.end()
        if text[match.start()] not in "。！？" and not _is_sentence_break(text, match.start(), cut, end):
            continue
        spans.append((pos, cut))
        pos = cut
    spans.append((pos, end))
    return spans


def _is_sentence_break(text: str, mark: int, cut: int, end: int) -> bool:
    """After ``.!?`` at ``mark``: a break if a line break, capital, digit or opening quote
    follows, and the word before a full stop is not an abbreviation or an initial."""
    nxt = _skip_space(text, cut, end)
    if nxt >= end:
        return False
    following = text[nxt]
    if "\n" not in text[cut:nxt] and not (following.isupper() or following.isdigit() or following in _OPENERS):
        return False
    if text[mark] == ".":
        word_start = mark
        while word_start > 0 and not text[word_start - 1].isspace():
            word_start -= 1
        word = text[word_start:mark].lstrip(_OPENERS).lower()
        if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            return False
    return True


def _skip_space(text: str, pos: int, end: int) -> int:
    while pos < end and text[pos].isspace():
        pos += 1
    return pos


def _strip_end(text: str, start: int, end: int) -> int:
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    start = _skip_space(text, start, end)
    return start, _strip_end(text, start, end)


def _cut_before(text: str, start: int, limit: int, end: int) -> int:
    """The last whitespace in ``(start, limit]`` to cut at, else ``limit`` itself (mid-word)."""
    if limit >= end or text[limit].isspace():
        return min(limit, end)
    for pos in range(limit - 1, start, -1):
        if text[pos].isspace():
            return pos
    return limit


def _word_start_after(text: str, pos: int, end: int) -> int:
    """The start of the first whole word at or after ``pos``."""
    if pos > 0 and not text[pos - 1].isspace():
        while pos < end and not text[pos].isspace():
            pos += 1
    return _skip_space(text, pos, end)
