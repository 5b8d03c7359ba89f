"""Loading: the corpus folder -> ``CorpusFile``s -> ``Document``s.

``scan_corpus`` walks the folder and says what will be read, skipped (and why) or ignored;
``load_bytes`` parses one file's bytes into documents, ``load_file`` reads then parses.
Reading and parsing are split so the indexer can hash and parse the very same bytes: a file
that changes while it is being indexed stays consistent with its recorded hash.

Trade-offs, chosen on purpose:

- Text decoding trusts a byte-order mark, then (HTML) ``<meta charset>``, then strict UTF-8,
  then charset-normalizer, then Windows-1252, then Latin-1. When the non-ASCII bytes mostly
  stand alone (Western text) and Windows-1252 is plausible, it wins over the guess: short
  Western texts are otherwise read as Windows-1250 ("naïve" -> "naďve") or worse. The price:
  a very short Cyrillic, Greek or Chinese legacy file may come out garbled. UTF-16 without a
  BOM counts as binary. Nothing is ever decoded with replacement characters.
- Text is NFC-normalised once, with ``\\n`` newlines, so offsets into ``Document.text``
  (Markdown and HTML sections) stay valid downstream.
- Markdown stays raw (its syntax helps both chunking and the reader); only heading positions
  are parsed, with a small line scanner rather than a full CommonMark parser.
- HTML is reduced to visible text with the standard library: no CSS, so text hidden by a
  stylesheet is kept; a table becomes a Markdown table (``| a | b |`` rows, a ``| --- |`` rule
  under a header row of ``<th>`` cells), so chunking, excerpts and the side panel treat it as
  one, as they do Markdown's.
- PDF gives one document per page with text; a page pypdf cannot parse is skipped (and
  logged) rather than failing the whole file. Scanned pages without text are not OCR'd.
- The scan follows directory symlinks but visits each real directory once, so loops and
  duplicate links are reported instead of walked. Hidden names (``.git``) are passed over
  silently; other unsupported files are only counted. The scan and the loaders never write.
"""

from __future__ import annotations

import codecs
import errno
import io
import logging
import os
import re
import stat
import unicodedata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath

from rag.errors import ConfigError, LoadError
from rag.types import Document, SkippedFile

SUPPORTED_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".pdf", ".html", ".htm"})
MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
HTML_SUFFIXES = frozenset({".html", ".htm"})

log = logging.getLogger(__name__)

Sections = tuple[tuple[int, tuple[str, ...]], ...]


@dataclass(frozen=True)
class CorpusFile:
    """A file the scan found: ``source`` is its POSIX path relative to the corpus root."""

    source: str
    path: Path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Scan:
    """What a scan found: files to load, files skipped with a reason, and a count of
    files ignored for their type."""

    files: tuple[CorpusFile, ...]
    skipped: tuple[SkippedFile, ...]
    ignored: int


# --- scanning ---------------------------------------------------------------------------


def scan_corpus(root: Path, *, max_bytes: int) -> Scan:
    """List the loadable files under ``root``, sorted by source. Reads no file contents.

    Skipped folders are reported with a trailing ``/`` (``"private/"``).
    """
    root = Path(root).absolute()
    try:
        root_stat = root.stat()
    except FileNotFoundError as exc:
        raise ConfigError(f"corpus folder {root} does not exist: create it or set RAG_CORPUS_DIR") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read corpus folder {root}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(root_stat.st_mode):
        raise ConfigError(f"corpus folder {root} is not a folder: set RAG_CORPUS_DIR to a folder")

    files: list[CorpusFile] = []
    skipped: list[SkippedFile] = []
    ignored = 0
    visited = {(root_stat.st_dev, root_stat.st_ino): "."}

    def walk(folder: Path, prefix: str, ancestors: frozenset[tuple[int, int]]) -> None:
        nonlocal ignored
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            reason = "permission denied" if isinstance(exc, PermissionError) else f"cannot list: {exc.strerror}"
            if not prefix:
                raise ConfigError(f"cannot read corpus folder {root}: {reason}") from exc
            skipped.append(SkippedFile(prefix, reason))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            source = prefix + entry.name
            path = folder / entry.name
            supported = Path(entry.name).suffix.lower() in SUPPORTED_SUFFIXES
            try:
                st = path.stat()
            except OSError as exc:
                skipped.append(SkippedFile(source, _stat_failure(path, exc)))
                continue
            if not _is_utf8(source):
                shown = os.fsencode(source).decode("utf-8", "replace")
                skipped.append(SkippedFile(shown, "file name is not valid UTF-8: rename it"))
            elif stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    skipped.append(SkippedFile(source + "/", f"symlink loop: leads back to {visited[key]!r}"))
                elif key in visited:
                    skipped.append(SkippedFile(source + "/", f"same folder as {visited[key]!r}, read once"))
                elif not os.access(path, os.R_OK | os.X_OK):
                    skipped.append(SkippedFile(source + "/", "permission denied"))
                else:
                    visited[key] = source + "/"
                    walk(path, source + "/", ancestors | {key})
            elif not supported:
                ignored += 1
            elif not stat.S_ISREG(st.st_mode):
                skipped.append(SkippedFile(source, "not a regular file"))
            elif st.st_size > max_bytes:
                skipped.append(
                    SkippedFile(
                        source,
                        f"too large: {_human_size(st.st_size)}, limit {_human_size(max_bytes)} (RAG_MAX_FILE_MB)",
                    )
                )
            elif not os.access(path, os.R_OK):
                skipped.append(SkippedFile(source, "permission denied"))
            else:
                files.append(CorpusFile(source, path, st.st_size, st.st_mtime_ns))

    walk(root, "", frozenset({(root_stat.st_dev, root_stat.st_ino)}))
    return Scan(
        files=tuple(sorted(files, key=lambda f: f.source)),
        skipped=tuple(sorted(skipped, key=lambda s: s.source)),
        ignored=ignored,
    )


def _stat_failure(path: Path, exc: OSError) -> str:
    if path.is_symlink():
        if isinstance(exc, FileNotFoundError):
            return f"broken symlink: {os.readlink(path)!r} does not exist"
        if exc.errno == errno.ELOOP:  # links pointing at each other
            return "symlink loop"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot read: {exc.strerror or exc}"


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates
        return False
    return True


def _human_size(n: int) -> str:
    """``64_170_000 -> '61.2 MB'``, ``52_428_800 -> '50 MB'``, ``100 -> '100 bytes'``."""
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


# --- loading ----------------------------------------------------------------------------


def load_file(file: CorpusFile | Path, *, root: Path | None = None) -> list[Document]:
    """Read one file and parse it; every failure is a ``LoadError`` with a short reason.

    A bare ``Path`` gets a source relative to ``root`` when given, else its own POSIX path.
    """
    if isinstance(file, CorpusFile):
        path, source, missing = file.path, file.source, "file disappeared while indexing"
    else:
        path, missing = Path(file), "file not found"
        source = path.as_posix()
        if root is not None and path.absolute().is_relative_to(Path(root).absolute()):
            source = path.absolute().relative_to(Path(root).absolute()).as_posix()
    try:
        with open(path, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise LoadError(source, "not a regular file")
            data = fh.read()
    except FileNotFoundError as exc:
        raise LoadError(source, missing) from exc
    except PermissionError as exc:
        raise LoadError(source, "permission denied") from exc
    except IsADirectoryError as exc:
        raise LoadError(source, "is a folder, not a file") from exc
    except OSError as exc:
        raise LoadError(source, f"cannot read file: {exc.strerror or exc}") from exc
    return load_bytes(source, data)


def load_bytes(source: str, data: bytes) -> list[Document]:
    """Parse a file's bytes by the suffix of ``source``.

    >>> load_bytes("a.md", b"# Hi\\ntext")[0].sections
    ((0, ('Hi',)),)
    """
    suffix = PurePosixPath(source).suffix.lower()
    stem = PurePosixPath(source).stem
    if suffix not in SUPPORTED_SUFFIXES:
        raise LoadError(source, f"unsupported file type {suffix or '(none)'!r}")
    if not data.strip():
        raise LoadError(source, "empty file")
    if suffix == ".pdf":
        return _load_pdf(source, data, stem)
    text = decode_text(data, declared=_declared_charset(data) if suffix in HTML_SUFFIXES else None)
    if text is None:
        raise LoadError(source, "binary content, not text")
    if suffix in HTML_SUFFIXES:
        text, title, sections = html_to_text(text)
        if not text.strip():
            raise LoadError(source, "no visible text in this HTML page")
        return [Document(source=source, text=text, title=title or stem, sections=sections)]
    if not text.strip():
        raise LoadError(source, "empty file")
    if suffix in MARKDOWN_SUFFIXES:
        title, sections = markdown_sections(text)
        return [Document(source=source, text=text, title=title or stem, sections=sections)]
    return [Document(source=source, text=text, title=stem)]


# --- decoding ---------------------------------------------------------------------------

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16 LE: it starts with the same two bytes
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
# Browsers read these labels as Windows-1252 (WHATWG Encoding); UTF-16 without a BOM as UTF-8.
_HTML_LABELS = {"iso-8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252", "us-ascii": "cp1252",
                "ascii": "cp1252", "utf-16": "utf-8", "utf-16le": "utf-8", "utf-16be": "utf-8"}
_META_CHARSET = re.compile(rb"""<meta[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


def decode_text(data: bytes, *, declared: str | None = None) -> str | None:
    """Bytes -> NFC text with ``\\n`` newlines, or ``None`` when the bytes look binary.

    >>> decode_text("café “x”".encode("cp1252"))
    'café “x”'
    """
    text = None
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                text = data.decode(codec)
            except UnicodeDecodeError:
                return None
            break
    else:
        if b"\x00" in data:
            return None
        for encoding in _candidates(data, declared):
            try:
                text = data.decode(encoding)
                break
            except (UnicodeDecodeError, LookupError):
                continue
    if text is None:
        return None
    text = text.removeprefix("\ufeff")
    sample = text[:65536]
    if "\x00" in text or len(_CONTROL.findall(sample)) > 0.05 * len(sample):
        return None
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


def _candidates(data: bytes, declared: str | None) -> Iterator[str]:
    if declared:
        yield declared
    yield "utf-8"
    if guess := _guess_encoding(data):
        yield guess
    yield "cp1252"
    yield "latin-1"  # decodes any byte string


def _guess_encoding(data: bytes) -> str | None:
    import charset_normalizer  # imported late: it is slow to import and rarely needed

    matches = [m for m in charset_normalizer.from_bytes(data) if not m.encoding.startswith(("utf_16", "utf_32"))]
    if not matches:
        return None
    best = matches[0]
    # Its language scores barely tell Latin code pages apart (markup alone can score higher
    # than the words), so Windows-1252 wins when it is plausible and the text looks Western.
    plausible = {m.encoding for m in matches} | {c for m in matches for c in m.could_be_from_charset}
    if ("cp1252" in plausible or best.coherence == 0) and _looks_western(data):
        try:
            data.decode("cp1252")
            return "cp1252"
        except UnicodeDecodeError:
            pass
    return best.encoding


def _looks_western(data: bytes) -> bool:
    """Most non-ASCII bytes stand alone, as in "naïve" or "“quoted”"; Cyrillic, Greek and
    CJK legacy encodings put them in runs."""
    runs = re.findall(rb"[\x80-\xff]+", data)
    return sum(1 for run in runs if len(run) == 1) * 2 >= sum(len(run) for run in runs)


def _declared_charset(data: bytes) -> str | None:
    match = _META_CHARSET.search(data[:4096])
    if match is None:
        return None
    label = match.group(1).decode("ascii").lower()
    return _HTML_LABELS.get(label, label)


# --- Markdown ---------------------------------------------------------------------------

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*))?$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_BREAK = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_NOT_PARAGRAPH = re.compile(r"^(?: {4}|\t| {0,3}(?:[>|<]|[-*+][ \t]|\d{1,9}[.)][ \t]))")


def markdown_sections(text: str) -> tuple[str, Sections]:
    """First H1 and ``(offset, heading_path)`` for ATX and setext headings, code fences skipped.

    >>> markdown_sections("# A\\n## B\\n```\\n# no\\n```\\nC\\n-\\n")
    ('A', ((0, ('A',)), (4, ('A', 'B')), (22, ('A', 'C'))))
    """
    sections: list[tuple[int, tuple[str, ...]]] = []
    path: list[tuple[int, str]] = []
    title = ""
    fence = ""
    para_start: int | None = None
    para: list[str] = []

    def add(offset: int, level: int, raw: str) -> None:
        nonlocal title
        heading = _plain_heading(raw)
        if not heading:
            return
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, heading))
        sections.append((offset, tuple(h for _, h in path)))
        if level == 1 and not title:
            title = heading

    offset = _front_matter_end(text)
    for line in text[offset:].splitlines(keepends=True):
        start, offset = offset, offset + len(line)
        line = line.rstrip("\n")
        if fence:
            if re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}[ \t]*$", line):
                fence = ""
            continue
        if (m := _FENCE.match(line)) and not (m.group(1)[0] == "`" and "`" in m.group(2)):
            fence, para_start, para = m.group(1), None, []
        elif (m := _ATX.match(line)) is not None:
            content = re.sub(r"(?:^|[ \t]+)#+[ \t]*$", "", m.group(2) or "")
            add(start, len(m.group(1)), content)
            para_start, para = None, []
        elif para_start is not None and (m := _SETEXT.match(line)):
            add(para_start, 1 if m.group(1)[0] == "=" else 2, " ".join(para))
            para_start, para = None, []
        elif not line.strip() or _BREAK.match(line):
            para_start, para = None, []
        elif para_start is None and _NOT_PARAGRAPH.match(line):
            continue
        else:
            if para_start is None:
                para_start = start
            para.append(line.strip())
    return title, tuple(sections)


def _front_matter_end(text: str) -> int:
    """Offset just past a leading YAML front-matter block, else 0."""
    if not text.startswith("---\n"):
        return 0
    match = re.search(r"^(?:---|\.\.\.)[ \t]*(?:\n|$)", text[4:], re.MULTILINE)
    return 4 + match.end() if match else 0


def _plain_heading(raw: str) -> str:
    """Strip inline Markdown from a heading: ``'The [`cli`](x) **way**' -> 'The cli way'``."""
    s = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    s = re.sub(r"(`+)(.+?)\1", r"\2", s)
    s = re.sub(r"(\*\*|\*|~~)(?=\S)(.+?)(?<=\S)\1", r"\2", s)
    s = re.sub(r"(?<!\w)(__|_)(?=\S)(.+?)(?<=\S)\1(?!\w)", r"\2", s)
    s = re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", s)
    return " ".join(s.split())


# --- HTML -------------------------------------------------------------------------------

_HIDDEN = frozenset({"script", "style", "noscript", "template", "svg", "math", "canvas", "iframe", "object"})
_PARAGRAPH = frozenset(
    "p pre blockquote ul ol dl table section article header footer nav aside main figure form "
    "fieldset address details hr h1 h2 h3 h4 h5 h6".split()
)
_LINE = frozenset("br div li dt dd tr caption figcaption summary legend option".split())
_CELL = frozenset({"td", "th"})
_HEAD_TAGS = frozenset({"head", "title", "meta", "link", "base", "style", "script", "noscript", "template"})


class _TextExtractor(HTMLParser):
    """Collects visible text; ``pending`` holds the strongest break (1 newline, 2 blank line)
    requested since the last text, so nested blocks never stack empty lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.length = 0
        self.pending = 0
        self.space = False
        self.cell = False
        self.row: list[list[str]] | None = None  # the cells of the table row being read
        self.row_pending = 0
        self.row_heads = True  # every cell of the row so far is a <th>
        self.rows = 0  # rows written of the current table
        self.hidden = 0
        self.pre = 0
        self.in_head = False
        self.in_title = False
        self.title: list[str] = []
        self.first_h1 = ""
        self.heading: tuple[int, list[str], list[int]] | None = None
        self.path: list[tuple[int, str]] = []
        self.sections: list[tuple[int, tuple[str, ...]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN:
            self.hidden += 1
        elif tag == "title" and not self.hidden:
            self.in_title = True
        if tag == "head":
            self.in_head = True
        elif tag not in _HEAD_TAGS:
            self.in_head = False  # a body element ends an unclosed <head>, as in browsers
        if tag == "table":
            self._end_row()
            self.rows = 0
        elif tag == "tr" and not self.hidden:
            self._end_row()
        self._block(tag)
        if tag == "tr" and not self.hidden:
            self.row, self.row_pending, self.row_heads = [], self.pending, True
        if tag in _CELL and self.row is not None and not self.hidden:
            self.row.append([])
            self.row_heads = self.row_heads and tag == "th"
        elif self.row and (tag in _PARAGRAPH or tag in _LINE):
            self.row[-1].append(" ")  # a block inside a cell: its words stay apart
        elif tag in _CELL:
            self.cell = True
        elif tag == "pre":
            self.pre += 1
        elif tag in {"h1", "h2", "h3", "h4", "h5", "h6"} and not self.hidden:
            self.heading = (int(tag[1]), [], [])

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag == "head":
            self.in_head = False
        elif tag == "title":
            self.in_title = False
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
        elif self.heading and tag == f"h{self.heading[0]}":
            self._end_heading()
        elif tag in ("tr", "table"):
            self._end_row()
        if self.row and (tag in _PARAGRAPH or tag in _LINE):
            self.row[-1].append(" ")
        self._block(tag)

    def handle_data(self, data: str) -> None:
        data = unicodedata.normalize("NFC", data)
        if self.in_title:
            self.title.append(data)
        if self.hidden or self.in_head or self.in_title:
            return
        if self.row is not None:  # a table cell: the row is written whole at its end
            if not self.row:
                if not data.strip():
                    return  # the indentation before a row's first cell
                self.row.append([])
            self.row[-1].append(data)
            return
        if self.pre:
            self._write(data)
            return
        if data[:1].isspace():
            self.space = True
        if words := " ".join(data.split()):
            self._write(words)
            self.space = data[-1:].isspace()

    def _end_row(self) -> None:
        """Write the row being read as a Markdown table row (``| a | b |``, a ``|`` inside a cell
        escaped), and a ``| --- |`` rule under a first row made of ``<th>`` cells."""
        if self.row is None:
            return
        cells = [" ".join("".join(parts).split()).replace("|", "\\|") for parts in self.row]
        heads, self.row = self.row_heads, None
        if not any(cells):
            return
        self.pending = max(self.row_pending, 1)
        self._write("| " + " | ".join(cells) + " |")
        if heads and self.rows == 0:
            self.pending = 1
            self._write("| " + " | ".join("---" for _ in cells) + " |")
        self.rows += 1
        self.pending = 1

    def _block(self, tag: str) -> None:
        if tag in _PARAGRAPH:
            self.pending = 2
        elif tag in _LINE:
            self.pending = max(self.pending, 1)
        if tag in _PARAGRAPH or tag in _LINE:
            self.cell = False

    def _write(self, text: str) -> None:
        if self.length:
            if self.pending:
                sep = "\n" * self.pending
            elif self.cell:
                sep = " | "
            else:
                sep = " " if self.space and not self.parts[-1].endswith("\n") else ""
            self.parts.append(sep)
            self.length += len(sep)
        self.pending, self.space, self.cell = 0, False, False
        if self.heading is not None:
            self.heading[1].append(text)
            self.heading[2].append(self.length)
        self.parts.append(text)
        self.length += len(text)

    def _end_heading(self) -> None:
        if self.heading is None:
            return
        level, texts, offsets = self.heading
        self.heading = None
        text = " ".join("".join(texts).split())
        if not text:
            return
        while self.path and self.path[-1][0] >= level:
            self.path.pop()
        self.path.append((level, text))
        self.sections.append((offsets[0], tuple(h for _, h in self.path)))
        if level == 1 and not self.first_h1:
            self.first_h1 = text


def html_to_text(html: str) -> tuple[str, str, Sections]:
    """Visible text, title and heading sections of an HTML page.

    >>> html_to_text("<title>T</title><h1>A &amp; B</h1><p>x<script>y</script></p>")
    ('A & B\\n\\nx', 'T', ((0, ('A & B',)),))
    """
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    parser._end_heading()  # a heading left open at the end of the page
    title = " ".join("".join(parser.title).split()) or parser.first_h1
    return "".join(parser.parts), title, tuple(parser.sections)


# --- PDF --------------------------------------------------------------------------------


@contextmanager
def _quiet_pypdf() -> Iterator[None]:
    """pypdf reports recoverable damage through ``logging`` and ``warnings``; the outcome is
    what matters to us (documents or a ``LoadError``), so both are silenced while it runs."""
    logger = logging.getLogger("pypdf")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _load_pdf(source: str, data: bytes, stem: str) -> list[Document]:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError

    if b"%PDF-" not in data[:1024]:
        raise LoadError(source, "not a readable PDF: no %PDF header (is it really a PDF?)")
    with _quiet_pypdf():
        try:
            reader = PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not reader.decrypt(""):
                raise LoadError(source, "encrypted PDF (password required)")
            pages = list(reader.pages)
        except LoadError:
            raise
        except DependencyError as exc:
            raise LoadError(source, f"encrypted PDF needs the 'cryptography' package: {_short(exc)}") from exc
        except Exception as exc:  # pypdf raises many types on damaged files
            raise LoadError(source, f"not a readable PDF: {_short(exc)}") from exc
        try:
            title = str(reader.metadata.title or "").strip() if reader.metadata else ""
        except Exception:  # a damaged info dictionary only costs us the title
            title = ""
        documents: list[Document] = []
        failure: Exception | None = None
        for number, page in enumerate(pages, start=1):
            try:
                raw = page.extract_text()
            except Exception as exc:
                log.warning("%s: page %d skipped: %s", source, number, _short(exc))
                failure = failure or exc
                continue
            text = unicodedata.normalize("NFC", raw.replace("\r\n", "\n").replace("\r", "\n"))
            text = _CONTROL.sub("", text).strip()
            if text:
                documents.append(Document(source=source, text=text, page=number, title=title or stem))
    if not documents:
        if failure is not None:
            raise LoadError(source, f"not a readable PDF: {_short(failure)}")
        raise LoadError(source, "no extractable text (scanned images? OCR is not supported)")
    return documents
