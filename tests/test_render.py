"""What the chat shows (rag.render): text stays text, citations point at the passages sent,
notices and errors say what happened and what to do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from rag.errors import EndpointUnreachableError, PolicyError
from rag.index import IndexStore
from rag.indexing import sync_index
from rag.config import Settings
from rag.pipeline import AskOptions, Retrieval
from rag.render import (
    citation_elements,
    code_span,
    describe_update,
    escape_markdown,
    finish_note,
    friendly_error,
    gate_text,
    no_model_text,
    passage_markdown,
    passage_table,
    pdf_label,
    retrieval_text,
    sources_footer,
    starter_questions,
    upload_text,
    welcome_text,
)
from rag.types import Chunk, Hit, IndexReport, SkippedFile
from rag.uploads import SavedUpload
from tests.fakes import FakeEmbedder
from tests.pdfs import make_pdf

# The worst case: a renderer that passes raw HTML through. Escaped text must produce no tags.
RENDER = MarkdownIt("commonmark", {"html": True})
HOSTILE = [
    "<script>alert('x')</script>",
    '<img src=x onerror="alert(1)">',
    "![tracker](http://evil.example/pixel.png)",
    "[click me](javascript:alert(1))",
    "<http://evil.example>",
    "**bold** _it_ `code` # heading | pipe | ~~strike~~",
    "&lt;script&gt; &amp; &#60;b&#62;",
    "1. not a list\n- nor this\n> nor a quote",
    "back\\slash \\[1\\] [1] [^1]",
    "Emoji 🙂 and 中文 and ünïcödé",
]


def hit(rank: int, text: str = "text", *, source: str = "a.md", page: int | None = None,
        sim: float = 0.5, headings: tuple[str, ...] = ()) -> Hit:  # fmt: skip
    chunk = Chunk(f"{rank:032x}", source, text, 0, len(text), page=page, headings=headings)
    return Hit(chunk, 1.0 / rank, rank, similarity=sim)


def visible_text(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html)


# --- escaping -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", HOSTILE)
def test_escaped_text_renders_as_itself_and_never_as_markup(text: str) -> None:
    html = RENDER.render(escape_markdown(text))
    assert not re.search(r"<(?!/?p>)[a-z!/]", html), html  # nothing but paragraphs
    import html as html_lib

    assert " ".join(html_lib.unescape(visible_text(html)).split()) == " ".join(text.split())


@pytest.mark.parametrize("text", HOSTILE)
def test_passage_display_is_text(text: str) -> None:
    shown = passage_markdown(hit(1, f"Intro.\n\n{text}", source="<b>x</b>.md", page=2))
    html = RENDER.render(shown)
    tags = set(re.findall(r"<(/?[a-z0-9]+)", html))
    assert tags <= {"p", "/p", "strong", "/strong"}, html
    assert "&lt;b&gt;x&lt;/b&gt;.md, page 2" in html


def test_a_passages_table_rows_show_as_a_table_of_text() -> None:
    gfm = MarkdownIt("commonmark", {"html": True}).enable("table")
    text = ("The planets:\n| Planet | Moons |\n|--------|:-----:|\n| Mars | 2 |\n"
            "| <script>x</script> | [a](javascript:alert(1)) *b* |\n\nAfter the table.")  # fmt: skip
    html = gfm.render(passage_markdown(hit(1, text)))
    assert "<th>Planet</th>" in html and "<td>Mars</td>" in html and html.count("<tr>") == 3
    assert "<script>" not in html and "<a " not in html and "<em>" not in html and "&lt;script&gt;" in html
    assert "<p>The planets:</p>" in html and "<p>After the table.</p>" in html and "---" not in html
    # a passage that starts below its table's header row shows that row as the header
    rows = "| Earth | 1 |\n| Mars | 2 |"
    below = Hit(Chunk("c", "p.md", rows, 0, len(rows), table_header="| Planet | Moons |"), 1.0, 1)
    html = gfm.render(passage_markdown(below))
    assert "<th>Planet</th>" in html and "<td>Earth</td>" in html and html.count("<tr>") == 3
    # rows whose header is unknown are not dressed up as one
    html = gfm.render(passage_markdown(hit(1, rows)))
    assert "<th>Earth</th>" not in html and "<td>Earth</td>" in html


def test_passage_table_escapes_cells_and_marks_weak_passages() -> None:
    table = passage_table([hit(1, "a | b <i>c</i>", source="x|y.md", sim=0.1), hit(2, sim=0.9)],
                              min_relevance=0.25)  # fmt: skip
    html = RENDER.render(table)
    assert "<i>" not in html
    assert table.count("\n") == 3  # header, rule, two rows: the pipes did not split cells
    assert "0.10 (below threshold)" in table and "0.90 |" in table


def test_code_span_shows_anything_literally() -> None:
    for text in ["docs_corpus", "a`b", "`x`", "<script>", "*x*"]:
        html = RENDER.render(code_span(text))
        assert html.startswith("<p><code>") and "<script>" not in html


# --- citations --------------------------------------------------------------------------------


def test_citation_elements_follow_the_passages_sent(tmp_path: Path) -> None:
    (tmp_path / "guide.pdf").write_bytes(make_pdf(["one", "two", "three"]))
    hits = [hit(1, "Alpha.", source="a.md"), hit(2, "Page two.", source="guide.pdf", page=2),
            hit(3, "Also page two.", source="guide.pdf", page=2)]  # fmt: skip
    elements = citation_elements(hits, [2, 1, 9, 3, 0], tmp_path)
    assert [(e.name, e.kind) for e in elements] == [
        ("[2]", "text"),
        ("guide.pdf p. 2", "pdf"),
        ("[1]", "text"),
        ("[3]", "text"),  # the same page again: no second PDF element
    ]
    pdf = elements[1]
    assert pdf.path == (tmp_path / "guide.pdf").resolve() and pdf.page == 2
    assert "Page two." in elements[0].content and "guide.pdf, page 2" in elements[0].content


def test_pdf_outside_the_corpus_or_missing_gets_no_pdf_element(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (tmp_path / "secret.pdf").write_bytes(make_pdf(["x"]))
    hits = [hit(1, source="../secret.pdf", page=1), hit(2, source="gone.pdf", page=1)]
    assert [e.kind for e in citation_elements(hits, [1, 2], corpus)] == ["text", "text"]


def test_sources_footer_lists_cited_passages_and_the_model() -> None:
    hits = [hit(1, source="notes/a_b.md", headings=("Guide", "Setup")), hit(2, source="g.pdf", page=3), hit(3)]
    footer = sources_footer(hits, [2, 1], "phi-4*mini")
    assert footer.splitlines()[:3] == ["**Sources**", "- [2] g.pdf p. 3", r"- [1] notes/a\_b.md, Guide › Setup"]
    assert footer.endswith(r"_Answered by phi-4\*mini from 3 passages._")
    assert sources_footer(hits[:1], [], "m") == "_Answered by m from 1 passage._"


@pytest.mark.parametrize("source", ["a*b[1].pdf", "x/<script>.pdf", "plain name (2).pdf"])
def test_pdf_label_needs_no_escaping(source: str) -> None:
    label = pdf_label(source, 7)
    assert label.endswith(" p. 7")
    assert RENDER.render(label).strip() == f"<p>{label}</p>"


# --- notices, starters, settings, errors -----------------------------------------------------


@pytest.fixture
def indexed(settings: Settings) -> Settings:
    (settings.corpus_dir / "guide.md").write_text("# Guide\n\nIntro.\n\n## Install\n\nRun make.\n")
    (settings.corpus_dir / "field_notes.txt").write_text("Birds sing at dawn.\n")
    sync_index(settings, FakeEmbedder())
    return settings


def test_describe_update_names_changes_and_each_failure_once(indexed: Settings) -> None:
    snapshot = IndexStore(indexed.index_dir).load()
    announced: set[tuple[str, str]] = set()
    report = IndexReport(added=("guide.md",), removed=("old<b>.md",), skipped=(SkippedFile("bad.pdf", "encrypted"),))
    text = describe_update(report, snapshot, announced)
    assert "added **guide.md** (2 passages)" in text or "added **guide.md** (1 passage)" in text
    assert r"removed **old\<b\>.md**" in text
    assert "Could not read **bad.pdf**: encrypted." in text
    assert describe_update(IndexReport(skipped=report.skipped), snapshot, announced) is None
    assert describe_update(IndexReport(unchanged=("guide.md",)), snapshot, announced) is None


def test_starters_come_from_titles_and_sections(indexed: Settings) -> None:
    snapshot = IndexStore(indexed.index_dir).load()
    assert starter_questions(snapshot) == [
        ("field notes", "What is “field notes” about?"),
        ("Guide", "What does “Guide” say under “Install”?"),
    ]
    assert starter_questions(snapshot, limit=1) == [("field notes", "What is “field notes” about?")]


def test_friendly_errors_say_what_to_do_without_a_traceback() -> None:
    unreachable = friendly_error(EndpointUnreachableError("nothing answers at http://x/v1: start it"))
    assert unreachable.startswith("The model is not answering.") and "start it" in unreachable
    bug = friendly_error(KeyError("boom"))
    assert "KeyError" in bug and "server log" in bug and "Traceback" not in bug


def test_welcome_without_documents_says_how_to_add_them(tmp_path: Path) -> None:
    text = welcome_text(None, None, EndpointUnreachableError("down"), tmp_path / "docs_corpus")
    assert "Nothing is indexed yet" in text and "docs_corpus" in text
    assert "You can still search" in text


def test_welcome_lists_the_starter_questions_when_the_page_had_none(indexed: Settings) -> None:
    snapshot = IndexStore(indexed.index_dir).load()
    plain = welcome_text(snapshot, None, None, indexed.corpus_dir)
    text = welcome_text(snapshot, None, None, indexed.corpus_dir, suggest=True)
    assert "You could ask" not in plain and text.startswith(plain.split("\n\n")[0])
    html = RENDER.render(text)
    for _, question in starter_questions(snapshot):
        assert f"<li>{question}</li>" in html


def test_gate_text_shows_the_closest_passages_escaped() -> None:
    from rag.pipeline import Retrieval

    found = Retrieval("q", hits=(), closest=(hit(1, "<b>near</b>", sim=0.12),), min_relevance=0.25)
    text = gate_text(found)
    assert "don't seem to contain the answer" in text and "0.12" in text and "0.25" in text
    assert "<b>" not in RENDER.render(text)


def test_retrieval_text_says_found_then_sent_and_what_did_not_fit() -> None:
    options = AskOptions(top_k=3, mode="hybrid", min_relevance=0.3)
    found = Retrieval("q", hits=(hit(1, sim=0.8), hit(2, sim=0.6)), closest=(), min_relevance=0.3)
    assert retrieval_text(found, None, options).startswith("hybrid search, top 3, relevance threshold 0.30: 2 passages found.")
    sent = retrieval_text(found, found.hits[:1], options)
    assert "1 passage sent to the model (1 more left out: nothing in them for this question, or no room)." in sent
    assert sent.count("| a.md |") == 1


def test_notes_under_answers_that_did_not_end_by_themselves() -> None:
    assert finish_note("length", 512).startswith("_The answer was cut off at 512 tokens")
    assert finish_note("repetition", 512) == "_Stopped: the model started repeating itself._"
    assert finish_note("stop", 512) == ""


def test_no_model_shows_why_and_the_passages() -> None:
    text = no_model_text(EndpointUnreachableError("nothing answers at http://x/v1"), [hit(1, source="a*.md")])
    assert text.startswith("⚠️ The model is not answering.") and r"- [1] a\*.md" in text
    assert friendly_error(PolicyError("RAG_BASE_URL=https://x is not on this machine")).startswith("No model may answer")


def test_upload_texts(tmp_path: Path) -> None:
    renamed = SavedUpload("notes.md", "notes (2).md", tmp_path / "notes (2).md", created=True)
    assert upload_text(renamed, 3, None, tmp_path).startswith("Added **notes (2).md** to `")
    assert "(a different file named notes.md is already there): 3 passages indexed." in upload_text(renamed, 3, None, tmp_path)
    same = SavedUpload("notes.md", "notes.md", tmp_path / "notes.md", created=False)
    assert upload_text(same, 1, None, tmp_path) == "**notes.md** is already in your documents (1 passage)."
    assert upload_text(renamed, None, "empty", tmp_path) == "Could not index **notes (2).md**: empty. The file was not kept."
