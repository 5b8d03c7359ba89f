"""Loaders: every format, every encoding, and every way a corpus folder goes wrong."""

from __future__ import annotations

import codecs
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rag.errors import ConfigError, LoadError
from rag.loaders import CorpusFile, Scan, load_bytes, load_file, markdown_sections, scan_corpus
from rag.types import Document, SkippedFile
from tests.pdfs import make_pdf

MB = 1024 * 1024
LEGACY = "café naïve – “quotes” €"


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def reason(source: str, data: bytes) -> str:
    with pytest.raises(LoadError) as info:
        load_bytes(source, data)
    assert info.value.source == source
    return info.value.reason


# --- text and encodings -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param("héllo wörld ✓ 😀".encode(), "héllo wörld ✓ 😀", id="utf-8"),
        pytest.param(codecs.BOM_UTF8 + "héllo".encode(), "héllo", id="utf-8-bom"),
        pytest.param(codecs.BOM_UTF16_LE + "héllo €\r\nx".encode("utf-16-le"), "héllo €\nx", id="utf-16-le-bom"),
        pytest.param(codecs.BOM_UTF16_BE + "héllo €".encode("utf-16-be"), "héllo €", id="utf-16-be-bom"),
        pytest.param(LEGACY.encode("cp1252"), LEGACY, id="cp1252-undeclared"),
        pytest.param("Größe: 5 m², façade, señor ¿qué? ½".encode("latin-1"), "Größe: 5 m², façade, señor ¿qué? ½", id="latin-1"),
        pytest.param(
            "Привет, как дела? Это тестовый текст на русском языке.".encode("cp1251"),
            "Привет, как дела? Это тестовый текст на русском языке.",
            id="cp1251-detected",
        ),
        pytest.param(b"one\r\ntwo\rthree\n", "one\ntwo\nthree\n", id="newlines"),
        pytest.param("cafe\u0301".encode(), "café", id="nfc"),
    ],
)
def test_text_is_decoded_without_losing_characters(data: bytes, expected: str) -> None:
    assert load_bytes("notes/a.txt", data) == [Document(source="notes/a.txt", text=expected, title="a")]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"", "empty file", id="empty"),
        pytest.param(b" \n\t\r\n ", "empty file", id="whitespace"),
        pytest.param(codecs.BOM_UTF8 + b"\n", "empty file", id="bom-only"),
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary content, not text", id="png-named-txt"),
        pytest.param(bytes(range(1, 32)) * 20, "binary content, not text", id="control-chars"),
        pytest.param(codecs.BOM_UTF16_LE + "a\x00b".encode("utf-16-le"), "binary content, not text", id="utf-16-nul"),
        pytest.param(codecs.BOM_UTF16_LE + b"a", "binary content, not text", id="utf-16-odd-length"),
    ],
)
def test_bad_text_is_refused_with_a_reason(data: bytes, expected: str) -> None:
    assert reason("a.txt", data) == expected


def test_unsupported_suffix_is_refused() -> None:
    assert reason("a.docx", b"PK\x03\x04") == "unsupported file type '.docx'"


# --- Markdown ---------------------------------------------------------------------------

MARKDOWN = """\
---
title: front matter, not a heading
---
# Guide

Intro with #hashtag.

## Install [`rag`](https://example.org) **now** ##

```bash
# a shell comment, not a heading
```

~~~
## not a heading either
~~~

Setext title
============

Sub section
-----------

### Deep #

#NoSpace is not a heading

    # indented code, not a heading

- a list item
---
"""


def test_markdown_sections_follow_headings_and_skip_code() -> None:
    [doc] = load_bytes("guide.md", MARKDOWN.encode())

    def at(heading: str) -> int:
        return MARKDOWN.index(heading)

    assert doc == Document(
        source="guide.md",
        text=MARKDOWN,
        title="Guide",
        sections=(
            (at("# Guide"), ("Guide",)),
            (at("## Install"), ("Guide", "Install rag now")),
            (at("Setext title"), ("Setext title",)),
            (at("Sub section"), ("Setext title", "Sub section")),
            (at("### Deep"), ("Setext title", "Sub section", "Deep")),
        ),
    )


def test_markdown_title_falls_back_to_the_file_stem() -> None:
    [doc] = load_bytes("docs/release notes.markdown", b"## Only a level two\n\ntext\n")
    assert (doc.title, doc.sections) == ("release notes", ((0, ("Only a level two",)),))


def test_markdown_heading_levels_may_skip() -> None:
    assert markdown_sections("### Deep\n# Top\n### Child\n") == (
        "Top",
        ((0, ("Deep",)), (9, ("Top",)), (15, ("Top", "Child"))),
    )


# --- HTML -------------------------------------------------------------------------------

HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title> Composting &amp; You </title>
<style>p { color: red }</style><script>var s = "<p>not text</p>";</script></head>
<body>
<h1>Compost</h1>
<p>Greens   and <b>browns</b>
mix &mdash; 3&nbsp;parts&lt;1 &#8364;</p>
<noscript>Please enable JavaScript</noscript><template><p>template</p></template>
<h2>Table</h2>
<table><tr><th>Item</th><th>Type</th></tr><tr><td>Leaves</td><td>brown</td></tr></table>
<ul><li>one</li><li>two</li></ul>
<pre>keep
  this</pre>
</body></html>
"""


def test_html_keeps_visible_text_only() -> None:
    [doc] = load_bytes("site/page.html", HTML.encode())
    text = (
        "Compost\n\n"
        "Greens and browns mix — 3 parts<1 €\n\n"
        "Table\n\n"
        "| Item | Type |\n| --- | --- |\n| Leaves | brown |\n\n"
        "one\ntwo\n\n"
        "keep\n  this"
    )
    assert doc == Document(
        source="site/page.html",
        text=text,
        title="Composting & You",
        sections=((0, ("Compost",)), (text.index("Table"), ("Compost", "Table"))),
    )


def test_html_tables_become_markdown_tables() -> None:
    page = ("<p>Intro.</p><table><thead><tr><th>Planet</th><th>Moons</th></tr></thead><tbody>"
            "<tr><td>Mars</td><td>2</td></tr><tr><td>Earth</td><td></td></tr>"
            "<tr><td><b>Jupiter</b> big<p>a|b</p>c<br>d</td><td>95</td></tbody></table>"
            "<table><tr><td>no<td>header<tr><td>rows<td>only</table>After.")  # fmt: skip
    [doc] = load_bytes("t.html", page.encode())
    assert doc.text == (
        "Intro.\n\n| Planet | Moons |\n| --- | --- |\n| Mars | 2 |\n| Earth |  |\n| Jupiter big a\\|b c d | 95 |\n\n"
        "| no | header |\n| rows | only |\n\nAfter."
    )
    pretty = "<table>\n  <tr>\n    <th>Planet</th>\n    <th>Moons</th>\n  </tr>\n  <tr>\n    <td>Mars</td>\n    <td>2</td>\n  </tr>\n</table>"
    assert load_bytes("p.html", pretty.encode())[0].text == "| Planet | Moons |\n| --- | --- |\n| Mars | 2 |"


def test_html_meta_charset_is_honoured() -> None:
    page = f'<html><head><meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1"></head><p>{LEGACY}</p>'
    [doc] = load_bytes("legacy.htm", page.encode("cp1252"))
    assert (doc.text, doc.title) == (LEGACY, "legacy")


def test_html_wrong_meta_charset_falls_back_to_detection() -> None:
    [doc] = load_bytes("a.html", f'<meta charset="utf-8"><p>{LEGACY}</p>'.encode("cp1252"))
    assert doc.text == LEGACY


def test_html_without_visible_text_is_refused() -> None:
    assert reason("a.html", b"<html><head><title>T</title><script>x()</script></head></html>") == (
        "no visible text in this HTML page"
    )


# --- PDF --------------------------------------------------------------------------------


@pytest.fixture
def quiet(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test if pypdf logs or warns anything."""
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.name.startswith("pypdf")] == []


def test_pdf_gives_one_document_per_page_with_text(quiet: None) -> None:
    data = make_pdf(["Turn the pile (every 2 weeks).", "", "Compost is ready in 2 to 6 months."], title="Field guide")
    assert load_bytes("guide.pdf", data) == [
        Document(source="guide.pdf", text="Turn the pile (every 2 weeks).", page=1, title="Field guide"),
        Document(source="guide.pdf", text="Compost is ready in 2 to 6 months.", page=3, title="Field guide"),
    ]


def test_pdf_title_falls_back_to_the_file_stem(quiet: None) -> None:
    [doc] = load_bytes("a/b/report.pdf", make_pdf(["x"]))
    assert (doc.title, doc.page) == ("report", 1)


@pytest.mark.parametrize("algorithm", ["RC4-128", "AES-128", "AES-256"])
def test_pdf_encrypted_with_empty_user_password_loads(quiet: None, algorithm: str) -> None:
    data = make_pdf(["open sesame"], user_password="", owner_password="owner", algorithm=algorithm)
    assert [d.text for d in load_bytes("e.pdf", data)] == ["open sesame"]


def test_pdf_needing_a_password_is_refused(quiet: None) -> None:
    assert reason("e.pdf", make_pdf(["secret"], user_password="secret")) == "encrypted PDF (password required)"


def test_pdf_without_text_is_refused(quiet: None) -> None:
    assert reason("scan.pdf", make_pdf(["", ""])) == "no extractable text (scanned images? OCR is not supported)"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(make_pdf(["one", "two"])[:400], id="truncated"),
        pytest.param(b"%PDF-1.7\n" + b"\x8f garbage ( [ << /x " * 40, id="garbage-with-header"),
    ],
)
def test_corrupt_pdf_is_refused_quietly(quiet: None, data: bytes) -> None:
    assert reason("bad.pdf", data).startswith("not a readable PDF: ")


def test_not_a_pdf_at_all_is_refused(quiet: None) -> None:
    assert reason("bad.pdf", b"<html>oops</html>") == "not a readable PDF: no %PDF header (is it really a PDF?)"


# --- scanning ---------------------------------------------------------------------------


def test_scan_lists_supported_files_sorted_and_counts_the_rest(tmp_path: Path) -> None:
    for name in ["b.md", "a.txt", "sub/c.PDF", "sub/d.htm", "x.markdown", "page.html"]:
        write(tmp_path / name, "x")
    for name in ["image.png", "report.docx", "Makefile", "sub/notes.md~"]:
        write(tmp_path / name, "x")
    for name in [".hidden.md", ".git/config.md", "sub/.cache/e.txt"]:
        write(tmp_path / name, "x")
    scan = scan_corpus(tmp_path, max_bytes=MB)
    assert [f.source for f in scan.files] == ["a.txt", "b.md", "page.html", "sub/c.PDF", "sub/d.htm", "x.markdown"]
    assert (scan.skipped, scan.ignored) == ((), 4)
    first = scan.files[0]
    st = (tmp_path / "a.txt").stat()
    assert first == CorpusFile("a.txt", tmp_path / "a.txt", st.st_size, st.st_mtime_ns)


def test_scan_of_a_missing_folder_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist: create it or set RAG_CORPUS_DIR"):
        scan_corpus(tmp_path / "nope", max_bytes=MB)


def test_files_over_the_size_limit_are_skipped(tmp_path: Path) -> None:
    write(tmp_path / "small.txt", "x" * 100)
    write(tmp_path / "medium.txt", "x" * 2000)
    with open(tmp_path / "huge.pdf", "wb") as fh:
        fh.truncate(64_172_851)  # sparse: 61.2 MB on paper, nothing on disk
    assert scan_corpus(tmp_path, max_bytes=1000).skipped == (
        SkippedFile("huge.pdf", "too large: 61.2 MB, limit 1000 bytes (RAG_MAX_FILE_MB)"),
        SkippedFile("medium.txt", "too large: 2 KB, limit 1000 bytes (RAG_MAX_FILE_MB)"),
    )
    assert scan_corpus(tmp_path, max_bytes=50 * MB).skipped == (
        SkippedFile("huge.pdf", "too large: 61.2 MB, limit 50 MB (RAG_MAX_FILE_MB)"),
    )


def test_symlinks_are_followed_once_and_loops_reported(tmp_path: Path) -> None:
    write(tmp_path / "a/doc.md", "# A")
    write(tmp_path / "outside/ext.txt", "elsewhere")
    corpus = tmp_path
    (corpus / "a/up").symlink_to("..", target_is_directory=True)  # loop to the corpus root
    (corpus / "a/self").symlink_to(".", target_is_directory=True)  # loop to itself
    (corpus / "b_same").symlink_to("a", target_is_directory=True)  # the same folder twice
    (corpus / "dangling.md").symlink_to("missing.md")
    (corpus / "x.md").symlink_to("y.md")
    (corpus / "y.md").symlink_to("x.md")
    (corpus / "linked.txt").symlink_to(corpus / "outside/ext.txt")
    scan = scan_corpus(corpus, max_bytes=MB)
    assert [f.source for f in scan.files] == ["a/doc.md", "linked.txt", "outside/ext.txt"]
    assert scan.skipped == (
        SkippedFile("a/self/", "symlink loop: leads back to 'a/'"),
        SkippedFile("a/up/", "symlink loop: leads back to '.'"),
        SkippedFile("b_same/", "same folder as 'a/', read once"),
        SkippedFile("dangling.md", "broken symlink: 'missing.md' does not exist"),
        SkippedFile("x.md", "symlink loop"),
        SkippedFile("y.md", "symlink loop"),
    )


def test_special_files_are_skipped_not_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.txt")  # reading it would block forever
    assert scan_corpus(tmp_path, max_bytes=MB).skipped == (SkippedFile("pipe.txt", "not a regular file"),)


def test_paths_with_spaces_and_non_ascii_characters(tmp_path: Path) -> None:
    write(tmp_path / "Ünïcödé dir/my notes é.md", "# Notes é\n\nbody")
    [file] = scan_corpus(tmp_path, max_bytes=MB).files
    assert file.source == "Ünïcödé dir/my notes é.md"
    [doc] = load_file(file)
    assert (doc.source, doc.title, doc.text) == ("Ünïcödé dir/my notes é.md", "Notes é", "# Notes é\n\nbody")


# --- permissions: real checks, as an unprivileged user ------------------------------------


def as_unprivileged(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` where file permissions apply. Root reads everything, so as root the call
    runs in a forked child that has become ``nobody``; the result comes back as JSON."""
    if os.geteuid() != 0:
        return json.loads(json.dumps(fn()))
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, json.dumps(fn()).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        out = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child failed"
    return json.loads(out)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder ``nobody`` can reach (pytest's tmp_path sits in a root-only folder)."""
    path = Path(tempfile.mkdtemp(prefix="rag-loaders-"))
    path.chmod(0o755)
    yield path
    for sub in [path, *path.rglob("*")]:
        sub.chmod(0o755)
    shutil.rmtree(path)


def test_unreadable_files_and_folders_are_skipped(shared_dir: Path) -> None:
    for name in ["ok.md", "secret.md", "private/inner.md"]:
        write(shared_dir / name, "# x").chmod(0o644)
    (shared_dir / "private").chmod(0o755)
    (shared_dir / "secret.md").chmod(0o000)
    (shared_dir / "private").chmod(0o000)

    def scan() -> tuple[list[str], list[list[str]]]:
        result = scan_corpus(shared_dir, max_bytes=MB)
        return [f.source for f in result.files], [[s.source, s.reason] for s in result.skipped]

    assert as_unprivileged(scan) == [["ok.md"], [["private/", "permission denied"], ["secret.md", "permission denied"]]]


def test_loading_an_unreadable_file_says_permission_denied(shared_dir: Path) -> None:
    write(shared_dir / "secret.md", "# x").chmod(0o000)

    def load() -> str:
        try:
            load_file(shared_dir / "secret.md", root=shared_dir)
        except LoadError as exc:
            return f"{exc.source}: {exc.reason}"
        return "loaded"

    assert as_unprivileged(load) == "secret.md: permission denied"


# --- load_file --------------------------------------------------------------------------


def test_file_deleted_between_scan_and_load(tmp_path: Path) -> None:
    write(tmp_path / "gone.txt", "soon gone")
    [file] = scan_corpus(tmp_path, max_bytes=MB).files
    (tmp_path / "gone.txt").unlink()
    with pytest.raises(LoadError, match="^gone.txt: file disappeared while indexing$"):
        load_file(file)


def test_load_file_with_a_plain_path(tmp_path: Path) -> None:
    write(tmp_path / "sub/a.txt", "hello")
    assert load_file(tmp_path / "sub/a.txt", root=tmp_path) == [Document(source="sub/a.txt", text="hello", title="a")]
    assert load_file(tmp_path / "sub/a.txt")[0].source == (tmp_path / "sub/a.txt").as_posix()
    with pytest.raises(LoadError, match="^sub/missing.txt: file not found$"):
        load_file(tmp_path / "sub/missing.txt", root=tmp_path)
    (tmp_path / "dir.md").mkdir()
    with pytest.raises(LoadError, match="is a folder, not a file"):
        load_file(tmp_path / "dir.md", root=tmp_path)


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything about a tree that a write would change (not access times)."""
    state: dict[str, tuple[Any, ...]] = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        link = os.readlink(path) if path.is_symlink() else None
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        state[path.relative_to(root).as_posix()] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, link, data)
    return state


def test_scanning_and_loading_never_write_into_the_corpus(tmp_path: Path) -> None:
    write(tmp_path / "a.md", MARKDOWN)
    write(tmp_path / "b.txt", LEGACY.encode("cp1252"))
    write(tmp_path / "c.html", HTML)
    write(tmp_path / "d.pdf", make_pdf(["page one", "page two"]))
    write(tmp_path / "e.pdf", make_pdf(["locked"], user_password="pw"))
    write(tmp_path / "f.txt", b"")
    write(tmp_path / "sub/g.png", b"\x89PNG")
    (tmp_path / "sub/loop").symlink_to("..", target_is_directory=True)
    before = snapshot(tmp_path)
    scan: Scan = scan_corpus(tmp_path, max_bytes=MB)
    loaded, failed = [], []
    for file in scan.files:
        try:
            loaded.extend(load_file(file))
        except LoadError as exc:
            failed.append(exc.source)
    assert snapshot(tmp_path) == before
    assert sorted({d.source for d in loaded}) == ["a.md", "b.txt", "c.html", "d.pdf"]
    assert failed == ["e.pdf", "f.txt"]


# --- the sample corpus ------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_sample_corpus_loads_cleanly() -> None:
    scan = scan_corpus(REPO / "docs_corpus", max_bytes=MB)
    assert (scan.skipped, scan.ignored) == ((), 0)
    documents = [doc for file in scan.files for doc in load_file(file)]
    assert {d.source for d in documents} == {f.source for f in scan.files}
    pages = {d.page: d.text for d in documents if d.source == "home-composting-field-guide.pdf"}
    assert sorted(pages) == [1, 2, 3, 4]
    assert "turned every 2 to 3 weeks" in pages[2]
    assert "ready in 2 to 6 months" in pages[4]


def test_sample_pdf_is_up_to_date() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_sample_pdf", REPO / "scripts/make_sample_pdf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build() == (REPO / "docs_corpus/home-composting-field-guide.pdf").read_bytes(), (
        "run python scripts/make_sample_pdf.py"
    )
