"""The chat app's logic without a browser: upload naming and safety, citation elements,
escaping, settings, notices, and the process-wide state (index updates, endpoint recovery).

``app.py`` is imported with ``CHAINLIT_APP_ROOT`` pointing at a temp copy of our Chainlit
config: importing Chainlit writes into its app root.
"""

from __future__ import annotations

import asyncio
import doctest
import inspect
import json
import importlib
import os
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from markdown_it import MarkdownIt

from rag.chat import ChatClient, Message
from rag.config import Settings
from rag.errors import EndpointUnreachableError, IndexMissingError, LoadError, RagError
from rag.index import IndexStore
from rag.indexing import sync_index
from rag.types import Chunk, Hit, IndexReport, SkippedFile
from tests.fakes import FakeEmbedder
from tests.pdfs import make_pdf

ROOT = Path(__file__).resolve().parent.parent
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


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    root = tmp_path_factory.mktemp("approot")
    shutil.copytree(ROOT / ".chainlit", root / ".chainlit")
    previous = os.environ.get("CHAINLIT_APP_ROOT")
    os.environ["CHAINLIT_APP_ROOT"] = str(root)
    try:
        module = importlib.import_module("app")
    finally:
        if previous is None:
            os.environ.pop("CHAINLIT_APP_ROOT", None)
        else:
            os.environ["CHAINLIT_APP_ROOT"] = previous
    import chainlit.config

    assert Path(chainlit.config.APP_ROOT) == root, "chainlit was imported elsewhere first"
    return module


def hit(rank: int, text: str = "text", *, source: str = "a.md", page: int | None = None,
        sim: float = 0.5, headings: tuple[str, ...] = ()) -> Hit:  # fmt: skip
    chunk = Chunk(f"{rank:032x}", source, text, 0, len(text), page=page, headings=headings)
    return Hit(chunk, 1.0 / rank, rank, similarity=sim)


def visible_text(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html)


def test_doctests(app: ModuleType) -> None:
    finder, runner = doctest.DocTestFinder(recurse=False), doctest.DocTestRunner()
    own = [(n, f) for n, f in vars(app).items() if inspect.isfunction(f) and f.__module__ == app.__name__]
    tests = [t for n, f in own for t in finder.find(f, f"app.{n}", module=False, globs=dict(vars(app))) if t.examples]
    assert len(tests) >= 8
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


# --- escaping -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", HOSTILE)
def test_escaped_text_renders_as_itself_and_never_as_markup(app: ModuleType, text: str) -> None:
    html = RENDER.render(app.escape_markdown(text))
    assert not re.search(r"<(?!/?p>)[a-z!/]", html), html  # nothing but paragraphs
    import html as html_lib

    assert " ".join(html_lib.unescape(visible_text(html)).split()) == " ".join(text.split())


@pytest.mark.parametrize("text", HOSTILE)
def test_passage_display_is_text(app: ModuleType, text: str) -> None:
    shown = app.passage_markdown(hit(1, f"Intro.\n\n{text}", source="<b>x</b>.md", page=2))
    html = RENDER.render(shown)
    tags = set(re.findall(r"<(/?[a-z0-9]+)", html))
    assert tags <= {"p", "/p", "strong", "/strong"}, html
    assert "&lt;b&gt;x&lt;/b&gt;.md, page 2" in html


def test_passage_table_escapes_cells_and_marks_weak_passages(app: ModuleType) -> None:
    table = app.passage_table([hit(1, "a | b <i>c</i>", source="x|y.md", sim=0.1), hit(2, sim=0.9)],
                              min_relevance=0.25)  # fmt: skip
    html = RENDER.render(table)
    assert "<i>" not in html
    assert table.count("\n") == 3  # header, rule, two rows: the pipes did not split cells
    assert "0.10 (below threshold)" in table and "0.90 |" in table


def test_code_span_shows_anything_literally(app: ModuleType) -> None:
    for text in ["docs_corpus", "a`b", "`x`", "<script>", "*x*"]:
        html = RENDER.render(app.code_span(text))
        assert html.startswith("<p><code>") and "<script>" not in html


# --- citations --------------------------------------------------------------------------------


def test_citation_elements_follow_the_passages_sent(app: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "guide.pdf").write_bytes(make_pdf(["one", "two", "three"]))
    hits = [hit(1, "Alpha.", source="a.md"), hit(2, "Page two.", source="guide.pdf", page=2),
            hit(3, "Also page two.", source="guide.pdf", page=2)]  # fmt: skip
    elements = app.citation_elements(hits, [2, 1, 9, 3, 0], tmp_path)
    assert [(e.name, e.kind) for e in elements] == [
        ("[2]", "text"),
        ("guide.pdf p. 2", "pdf"),
        ("[1]", "text"),
        ("[3]", "text"),  # the same page again: no second PDF element
    ]
    pdf = elements[1]
    assert pdf.path == (tmp_path / "guide.pdf").resolve() and pdf.page == 2
    assert "Page two." in elements[0].content and "guide.pdf, page 2" in elements[0].content


def test_pdf_outside_the_corpus_or_missing_gets_no_pdf_element(app: ModuleType, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (tmp_path / "secret.pdf").write_bytes(make_pdf(["x"]))
    hits = [hit(1, source="../secret.pdf", page=1), hit(2, source="gone.pdf", page=1)]
    assert [e.kind for e in app.citation_elements(hits, [1, 2], corpus)] == ["text", "text"]


def test_sources_footer_lists_cited_passages_and_the_model(app: ModuleType) -> None:
    hits = [hit(1, source="notes/a_b.md", headings=("Guide", "Setup")), hit(2, source="g.pdf", page=3), hit(3)]
    footer = app.sources_footer(hits, [2, 1], "phi-4*mini")
    assert footer.splitlines()[:3] == ["**Sources**", "- [2] g.pdf p. 3", r"- [1] notes/a\_b.md, Guide › Setup"]
    assert footer.endswith(r"_Answered by phi-4\*mini from 3 passages._")
    assert app.sources_footer(hits[:1], [], "m") == "_Answered by m from 1 passage._"


@pytest.mark.parametrize("source", ["a*b[1].pdf", "x/<script>.pdf", "plain name (2).pdf"])
def test_pdf_label_needs_no_escaping(app: ModuleType, source: str) -> None:
    label = app.pdf_label(source, 7)
    assert label.endswith(" p. 7")
    assert RENDER.render(label).strip() == f"<p>{label}</p>"


# --- uploads --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("guide.pdf", "guide.pdf"),
        ("../../etc/passwd.md", "passwd.md"),
        ("..\\..\\Windows\\win.txt", "win.txt"),
        (".hidden.md", "hidden.md"),
        ("...dots.md", "dots.md"),
        ("  Report.PDF  ", "Report.PDF"),
        ("a\x00b\x1fc.md", "abc.md"),
        ('evil<script>:"|?*.html', "evil_script______.html"),
        ("résumé 📄.md", "résumé 📄.md"),
        ("x" * 300 + ".md", "x" * 117 + ".md"),
    ],
)
def test_safe_upload_name(app: ModuleType, name: str, expected: str) -> None:
    assert app.safe_upload_name(name) == expected


@pytest.mark.parametrize("name", ["", "..", "/", "x.docx", "noext", ".md", "archive.pdf.exe", "a/b/"])
def test_unsafe_or_unsupported_names_are_refused(app: ModuleType, name: str) -> None:
    with pytest.raises(LoadError, match="unsupported file type"):
        app.safe_upload_name(name)


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_upload_is_saved_under_its_name(app: ModuleType, tmp_path: Path) -> None:
    saved = app.save_upload(tmp_path, "../notes.md", b"# Notes\n\nHello.", max_bytes=1000)
    assert (saved.source, saved.created, saved.renamed) == ("notes.md", True, False)
    assert listing(tmp_path) == {"notes.md": b"# Notes\n\nHello."}


def test_upload_never_overwrites_a_different_file(app: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_bytes(b"original")
    (tmp_path / "notes (2).md").write_bytes(b"second original")
    saved = app.save_upload(tmp_path, "notes.md", b"# New\n\nnew text", max_bytes=1000)
    assert (saved.source, saved.created, saved.renamed) == ("notes (3).md", True, True)
    assert listing(tmp_path) == {"notes (2).md": b"second original", "notes (3).md": b"# New\n\nnew text",
                                 "notes.md": b"original"}  # fmt: skip


def test_identical_upload_reuses_the_existing_file(app: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_bytes(b"different")
    (tmp_path / "notes (2).md").write_bytes(b"# Same\n\ntext")
    saved = app.save_upload(tmp_path, "notes.md", b"# Same\n\ntext", max_bytes=1000)
    assert (saved.source, saved.created) == ("notes (2).md", False)
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("big.txt", b"x" * 2000, "too large"),
        ("empty.md", b"   \n", "empty"),
        ("binary.txt", bytes(range(256)) * 4, "binary"),
        ("broken.pdf", b"%PDF-1.4 not really", "PDF"),
        ("tool.exe", b"MZ", "unsupported"),
    ],
)
def test_bad_uploads_change_nothing(app: ModuleType, tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    (tmp_path / "keep.md").write_bytes(b"keep")
    with pytest.raises(LoadError, match=re.compile(reason, re.I)):
        app.save_upload(tmp_path, name, data, max_bytes=1000)
    assert listing(tmp_path) == {"keep.md": b"keep"}  # no temp file left behind either


# --- notices, starters, settings, errors -----------------------------------------------------


@pytest.fixture
def indexed(settings: Settings) -> Settings:
    (settings.corpus_dir / "guide.md").write_text("# Guide\n\nIntro.\n\n## Install\n\nRun make.\n")
    (settings.corpus_dir / "field_notes.txt").write_text("Birds sing at dawn.\n")
    sync_index(settings, FakeEmbedder())
    return settings


def test_describe_update_names_changes_and_each_failure_once(app: ModuleType, indexed: Settings) -> None:
    snapshot = IndexStore(indexed.index_dir).load()
    announced: set[tuple[str, str]] = set()
    report = IndexReport(added=("guide.md",), removed=("old<b>.md",), skipped=(SkippedFile("bad.pdf", "encrypted"),))
    text = app.describe_update(report, snapshot, announced)
    assert "added **guide.md** (2 passages)" in text or "added **guide.md** (1 passage)" in text
    assert r"removed **old\<b\>.md**" in text
    assert "Could not read **bad.pdf**: encrypted." in text
    assert app.describe_update(IndexReport(skipped=report.skipped), snapshot, announced) is None
    assert app.describe_update(IndexReport(unchanged=("guide.md",)), snapshot, announced) is None


def test_starters_come_from_titles_and_sections(app: ModuleType, indexed: Settings) -> None:
    snapshot = IndexStore(indexed.index_dir).load()
    assert app.starter_questions(snapshot) == [
        ("field notes", "What is “field notes” about?"),
        ("Guide", "What does “Guide” say under “Install”?"),
    ]
    assert app.starter_questions(snapshot, limit=1) == [("field notes", "What is “field notes” about?")]


def test_apply_settings_clamps_and_ignores_unknown_values(app: ModuleType) -> None:
    prefs = app.Preferences(model="a")
    new = app.apply_settings(prefs, {"model": "b", "top_k": "0", "temperature": 9, "mode": "magic",
                                     "min_relevance": "x"}, ["a", "b"])  # fmt: skip
    assert new == app.Preferences(model="b", top_k=1, temperature=2.0, mode="hybrid", min_relevance=0.25)
    assert app.apply_settings(new, {"model": "evil"}, ["a", "b"]).model == "b"


def test_friendly_errors_say_what_to_do_without_a_traceback(app: ModuleType) -> None:
    unreachable = app.friendly_error(EndpointUnreachableError("nothing answers at http://x/v1: start it"))
    assert unreachable.startswith("The model is not answering.") and "start it" in unreachable
    bug = app.friendly_error(KeyError("boom"))
    assert "KeyError" in bug and "server log" in bug and "Traceback" not in bug


def test_welcome_without_documents_says_how_to_add_them(app: ModuleType, tmp_path: Path) -> None:
    text = app.welcome_text(None, None, EndpointUnreachableError("down"), tmp_path / "docs_corpus")
    assert "Nothing is indexed yet" in text and "docs_corpus" in text
    assert "You can still search" in text


def test_welcome_lists_the_starter_questions_when_the_page_had_none(app: ModuleType, indexed: Settings) -> None:
    snapshot = IndexStore(indexed.index_dir).load()
    plain = app.welcome_text(snapshot, None, None, indexed.corpus_dir)
    text = app.welcome_text(snapshot, None, None, indexed.corpus_dir, suggest=True)
    assert "You could ask" not in plain and text.startswith(plain.split("\n\n")[0])
    html = RENDER.render(text)
    for _, question in app.starter_questions(snapshot):
        assert f"<li>{question}</li>" in html


def test_nothing_goes_to_a_remote_endpoint_under_local_only(app: ModuleType) -> None:
    from types import SimpleNamespace

    remote, local = SimpleNamespace(local=False), SimpleNamespace(local=True)
    assert not app.may_send_to(remote, "local-only")
    assert app.may_send_to(local, "local-only")
    assert app.may_send_to(remote, "local-first") and app.may_send_to(remote, "cloud-first")


def test_gate_text_shows_the_closest_passages_escaped(app: ModuleType) -> None:
    from rag.pipeline import Retrieval

    found = Retrieval("q", hits=(), closest=(hit(1, "<b>near</b>", sim=0.12),), min_relevance=0.25)
    text = app.gate_text(found)
    assert "don't seem to contain the answer" in text and "0.12" in text and "0.25" in text
    assert "<b>" not in RENDER.render(text)


# --- process-wide state: index updates and the endpoint ---------------------------------------


@pytest.fixture
def state(app: ModuleType, settings: Settings) -> Any:
    (settings.corpus_dir / "guide.md").write_text("# Guide\n\nTurn the pile weekly.\n")
    return app.AppState(settings, embedder=FakeEmbedder())


def test_queries_take_the_inner_embedders_own_query_path(app: ModuleType, state: Any) -> None:
    asked: list[str] = []

    class QueryAware(FakeEmbedder):
        def embed_query(self, text: str) -> Any:
            asked.append(text)
            return super().embed_query(text)

    progress = app.ProgressEmbedder(QueryAware())
    progress.embed_query("how often?")
    assert asked == ["how often?"] and progress.embedded == 0


def test_messages_are_answered_without_chainlits_run_step(app: ModuleType) -> None:
    import chainlit.socket
    from chainlit.config import config

    # The pinned Chainlit calls config.code.on_message for each chat message...
    chainlits_own = getattr(chainlit.socket.process_message, "embeds_ahead_for", chainlit.socket.process_message)
    assert {"code", "on_message"} <= set(chainlits_own.__code__.co_names)
    # ...and there the app's handler sits directly: @cl.on_message would put a function that
    # opens the "on_message" step between them.
    handler = config.code.on_message
    assert handler is not None and handler.__wrapped__ is app.on_message


def test_a_first_question_is_embedded_as_its_frame_arrives(
    app: ModuleType, state: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import chainlit.socket
    from chainlit.user_session import user_sessions

    # The hook sits where the pinned Chainlit looks for it: its socket handler for a chat
    # message calls the module's process_message by name, at call time.
    assert "process_message" in chainlit.socket.message.__code__.co_names
    hook = chainlit.socket.process_message
    assert hook.embeds_ahead_for.__module__ == "chainlit.socket"  # wraps Chainlit's own
    monkeypatch.setattr(chainlit.socket, "process_message", hook)  # put back after the test
    app._hook_message_arrival()  # loaded again (`chainlit run -w`): Chainlit's own is wrapped once
    assert chainlit.socket.process_message.embeds_ahead_for is hook.embeds_ahead_for

    dispatched: list[tuple[Any, Any]] = []

    async def chainlits_own(session: Any, payload: Any) -> None:
        dispatched.append((session, payload))

    monkeypatch.setattr(chainlit.socket, "process_message", chainlits_own)
    app._hook_message_arrival()
    hooked = chainlit.socket.process_message
    assert hooked is not chainlits_own
    monkeypatch.setattr(app, "_state", state)
    chat = app.ChatState(prefs=app.Preferences.from_settings(state.settings))
    monkeypatch.setitem(user_sessions, "s-1", {"chat": chat})

    class Session:
        id = "s-1"

    inner = state.embedder.inner

    session = Session()

    def arrive(text: str) -> dict[str, Any]:
        payload = {"message": {"output": text, "type": "user_message"}, "fileReferences": []}
        asyncio.run(hooked(session, payload))
        return payload

    arrive("  how often?  ")  # the app is not ready yet: nothing started
    assert state.embedder.ahead.take("how often?") is None and inner.embedded == []
    state.ready.set()
    payload = arrive("  how often?  ")
    assert dispatched[-1][0] is session and dispatched[-1][1] is payload  # Chainlit still gets it
    vector = state.embedder.embed_query("how often?")  # what retrieval asks for
    assert inner.embedded == ["how often?"] and np.allclose(vector, FakeEmbedder().embed_query("how often?"))
    chat.history = [Message("user", "how often?"), Message("assistant", "Weekly.")]
    arrive("and in winter?")  # a follow-up is rewritten first: not embedded ahead
    assert state.embedder.ahead.take("and in winter?") is None and len(dispatched) == 3


def test_a_first_question_typed_is_embedded_before_enter(
    app: ModuleType, state: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """public/draft.js posts the draft; Chainlit's own server routes it to the app (its
    catch-all page route is GET-only), and retrieval then takes the vector started for it."""
    import chainlit.server
    import httpx

    def post(body: str, content_type: str = "application/json") -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=chainlit.server.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                return await client.post(app.DRAFT_PATH, content=body, headers={"content-type": content_type})

        return asyncio.run(go())

    monkeypatch.setattr(app, "_state", state)
    inner = state.embedder.inner
    refused = post('{"text": "  how often?  "}')
    assert refused.status_code == 200 and refused.json() == {"embedding": False, "reason": "the index is not ready"}
    state.ready.set()
    accepted = post('{"text": "  how often?  "}')
    assert accepted.status_code == 202 and accepted.json() == {"embedding": True}
    vector = state.embedder.embed_query("how often?")  # what retrieval asks for once Enter is pressed
    assert inner.embedded == ["how often?"] and np.allclose(vector, FakeEmbedder().embed_query("how often?"))
    for body, reason in (("not json", "no text"), ('{"text": "   "}', "no text"), ('["how often?"]', "no text"),
                         (json.dumps({"text": "x" * (app.DRAFT_CHARS + 1)}), "longer than 1000 characters")):  # fmt: skip
        answer = post(body)
        assert answer.status_code == 200 and answer.json() == {"embedding": False, "reason": reason}, body
    # A plain-text or form post (what another site's page may send without a CORS preflight).
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        refused = post('{"text": "something else"}', content_type)
        assert refused.status_code == 415 and refused.json()["embedding"] is False
    assert inner.embedded == ["how often?"]  # none of those was embedded
    app._add_draft_route()  # loaded again (`chainlit run -w`): still one route
    assert [getattr(r, "path", None) for r in chainlit.server.app.router.routes].count(app.DRAFT_PATH) == 1


def test_first_build_then_updates_notify_open_chats(app: ModuleType, state: Any, settings: Settings) -> None:
    told: list[tuple[str, str | None]] = []
    state.notify = lambda text, exclude=None: told.append((text, exclude))

    async def main() -> None:
        with pytest.raises(IndexMissingError):
            await state.snapshot()
        snapshot = await asyncio.gather(state.ensure_index(), state.ensure_index())
        assert snapshot[0].generation == snapshot[1].generation  # one build, not two
        (settings.corpus_dir / "more.md").write_text("# More\n\nNew text.\n")
        await state.sync(origin="session-1")
        assert len(await state.snapshot()) == 2

    asyncio.run(main())
    assert len(told) == 2
    assert told[0][0].startswith("Documents updated: added **guide.md**")
    assert told[1] == (told[1][0], "session-1") and "**more.md**" in told[1][0]


def test_a_burst_of_files_in_the_folder_is_one_update(app: ModuleType, state: Any, settings: Settings) -> None:
    real_sync, calls = state.sync, []
    told: list[str] = []
    state.notify = lambda text, exclude=None: told.append(text)

    async def counted_sync(*, origin: str | None = None) -> IndexReport:
        calls.append(origin)
        return await real_sync(origin=origin)

    state.sync = counted_sync

    async def main() -> None:
        watcher = asyncio.create_task(state.watch())
        await asyncio.sleep(1.0)  # the watcher is up
        for i in range(100):
            (settings.corpus_dir / f"note-{i:03d}.md").write_text(f"# Note {i}\n\nText number {i}.\n")
        await asyncio.sleep(app.WATCH_DEBOUNCE_MS / 1000 + 3)
        (settings.corpus_dir / ".upload-1.tmp").write_text("half written")  # hidden: ignored
        await asyncio.sleep(app.WATCH_DEBOUNCE_MS / 1000 + 1)
        state.stop.set()
        await asyncio.wait_for(watcher, 10)
        assert len((await state.snapshot()).files) == 101

    asyncio.run(main())
    assert calls == [None]
    assert len(told) == 1 and "note-000.md" in told[0] and "and 91 more" in told[0]


class FakeEndpoint:
    def __init__(self, url: str, models: list[str]) -> None:
        self.base_url, self.model, self.models = url, models[0], models
        self.context_window, self.local, self.origin, self.closed = 4096, True, "settings", False
        self.client = ChatClient(url)

    async def close(self) -> None:
        self.closed = True
        await self.client.aclose()


def test_endpoint_is_opened_once_and_again_after_it_fails(app: ModuleType, state: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    opened: list[FakeEndpoint] = []
    outcomes: list[Any] = [EndpointUnreachableError("down"), "m1", "m2"]

    async def fake_open_endpoint(settings: Settings) -> FakeEndpoint:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        opened.append(FakeEndpoint(f"http://127.0.0.1:9/{outcome}/v1", [outcome]))
        return opened[-1]

    monkeypatch.setattr(app, "open_endpoint", fake_open_endpoint)

    async def main() -> None:
        with pytest.raises(RagError):
            await state.connect()
        assert isinstance(state.endpoint_error, EndpointUnreachableError)
        first = await state.connect()
        assert await state.connect() is first and first.model == "m1"
        assert state.endpoint_error is None
        await state.drop_endpoint(EndpointUnreachableError("gone"))
        assert first.closed
        second = await state.connect()
        assert second.model == "m2"
        await state.close()
        assert second.closed

    asyncio.run(main())
    assert outcomes == []


def test_hidden_files_do_not_trigger_updates(app: ModuleType) -> None:
    root = Path("/home/me/.local/docs_corpus")
    assert app.visible_change(root, "/home/me/.local/docs_corpus/guide.md")
    assert app.visible_change(root, "/home/me/.local/docs_corpus/sub/guide.md")
    assert not app.visible_change(root, "/home/me/.local/docs_corpus/.upload-1.tmp")
    assert not app.visible_change(root, "/home/me/.local/docs_corpus/.git/index")
    assert not app.visible_change(root, "/home/me/.local/docs_corpus/notes/.guide.md.swp")


def test_history_forgets_old_citation_numbers(app: ModuleType) -> None:
    chat = app.ChatState(prefs=app.Preferences())
    for i in range(10):
        app.remember(chat, f"q{i}", f"Answer {i} [1], see [2, 3].")
    assert len(chat.history) == app.HISTORY_MESSAGES
    assert chat.history[-1].content == "Answer 9, see."
    assert chat.history[0].role == "user"


def test_app_module_is_the_only_chainlit_importer() -> None:
    for path in (ROOT / "rag").glob("*.py"):
        assert "chainlit" not in path.read_text(encoding="utf-8"), path
    assert "chainlit" in sys.modules  # imported here through app.py, into the temp app root


class RecordedMessage:
    """Stands in for ``cl.Message``: records what the page would be sent, in order."""

    log: list[tuple[str, str]] = []

    def __init__(self, content: str = "", **_: Any) -> None:
        self.content = content
        self.elements: list[Any] = []

    async def send(self) -> None:
        self.log.append(("send", self.content))

    async def stream_token(self, token: str, is_sequence: bool = False) -> None:
        self.content = token if is_sequence else self.content + token
        self.log.append(("token" + (" replaces" if is_sequence else ""), token))

    async def update(self) -> None:
        self.log.append(("update", self.content))
        self.log.append(("elements", " ".join(e.name for e in self.elements)))


def test_answer_message_is_drawn_before_its_first_token_which_replaces_the_placeholder(
    app: ModuleType, state: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rag.chat import ChatDelta, ChatDone
    from rag.pipeline import Answer

    async def model_events() -> Any:
        for text in ("Turn ", "it [1]."):
            yield ChatDelta(text)
        yield ChatDone(finish_reason="stop", usage=None, model="m")

    RecordedMessage.log = []
    monkeypatch.setattr(app.cl, "Message", RecordedMessage)
    monkeypatch.setattr(app, "to_chainlit", lambda element: element)  # cl.Text needs a live chat
    stream = Answer(hits=[hit(1, "Turn the pile weekly.", source="guide.md")], messages=[], model="m",
                    _events=model_events())  # fmt: skip
    chat = app.ChatState(prefs=app.Preferences.from_settings(state.settings))
    asyncio.run(app.stream_answer(state, chat, "How often?", stream, aiter(stream)))
    log = RecordedMessage.log
    # The placeholder starts the stream (the page draws a streaming message: no buttons to
    # take away when the first token comes); the first token replaces it.
    assert log[:3] == [("token", app.READING), ("token replaces", "Turn "), ("token", "it [1].")]
    assert log[3][0] == "update" and log[3][1].startswith("Turn it [1].") and app.READING not in log[3][1]
    assert log[4:] == [("elements", "[1]")]
    assert chat.history[-1].content == "Turn it."  # remembered without the placeholder


def test_the_retrieval_step_waits_for_the_answers_request_but_never_long(app: ModuleType) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        written = asyncio.Event()
        first: asyncio.Future[Any] = loop.create_future()
        loop.call_later(0.02, written.set)
        began = loop.time()
        await app.until_written(first, written, limit=5)
        assert 0.015 < loop.time() - began < 1  # until the request was written
        failed: asyncio.Future[Any] = loop.create_future()
        loop.call_later(0.02, failed.set_exception, RagError("refused"))
        await app.until_written(failed, asyncio.Event(), limit=5)  # an error instead: no wait for nothing
        assert failed.done()
        failed.exception()
        began = loop.time()
        await app.until_written(loop.create_future(), asyncio.Event(), limit=0.05)
        assert loop.time() - began < 1  # a request that hangs: the step is drawn anyway

    asyncio.run(main())


def test_a_finished_step_drawn_later_is_drawn_once_even_on_an_error(app: ModuleType) -> None:
    class Step:
        updates = 0

        async def update(self) -> None:
            self.updates += 1

    async def main() -> None:
        step = Step()
        async with app.DrawnLater(step) as later:  # type: ignore[arg-type]
            assert step.updates == 0
            await later.draw()
            await later.draw()
        assert step.updates == 1
        failing = Step()
        with pytest.raises(RagError):
            async with app.DrawnLater(failing):  # type: ignore[arg-type]
                raise RagError("retrieval failed")
        assert failing.updates == 1  # not left spinning in the page
        async with app.DrawnLater(None) as nothing:
            await nothing.draw()  # no rewrite, no step

    asyncio.run(main())


def test_a_follow_ups_rewrite_is_sent_as_its_frame_arrives(
    app: ModuleType, state: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chainlit.user_session import user_sessions

    class Client:
        def __init__(self) -> None:
            self.asked: list[tuple[str, str]] = []

        async def complete(self, messages: list[Message], *, model: str, **_: Any) -> tuple[str, Any]:
            self.asked.append((model, messages[-1].content))
            await asyncio.sleep(0.01)
            return "How often in winter?", None

    class Endpoint:
        def __init__(self, local: bool = True) -> None:
            self.client, self.models, self.model, self.local = Client(), ["m1", "m2"], "m1", local

    monkeypatch.setattr(app, "_state", state)
    state.ready.set()
    chat = app.ChatState(prefs=app.Preferences.from_settings(state.settings))
    chat.history = [Message("user", "How often?"), Message("assistant", "Weekly.")]
    monkeypatch.setitem(user_sessions, "s-2", {"chat": chat})
    follow_up = {"message": {"output": " and in winter? ", "type": "user_message"}}

    async def main() -> None:
        state.endpoint = endpoint = Endpoint()
        app.embed_ahead("s-2", follow_up)  # the frame arrives: the request goes out at once
        await asyncio.sleep(0)
        assert len(endpoint.client.asked) == 1 and "and in winter?" in endpoint.client.asked[0][1]
        assert state.embedder.ahead.take("and in winter?") is None  # not embedded: it is rewritten first
        standalone = await app.rewrite_follow_up(chat, endpoint.client, "m1", "and in winter?")  # what ask does
        assert standalone == "How often in winter?" and len(endpoint.client.asked) == 1  # that request, not another
        assert chat.rewriting is None
        # Started with other settings than ask ends up using (the model was changed): asked again.
        app.embed_ahead("s-2", follow_up)
        await asyncio.sleep(0)
        stale = chat.rewriting
        assert await app.rewrite_follow_up(chat, endpoint.client, "m2", "and in winter?") == "How often in winter?"
        assert [model for model, _ in endpoint.client.asked] == ["m1", "m1", "m2"] and stale.task.cancelled()
        # A remote endpoint under local-only: nothing is sent ahead (ask refuses it too).
        state.endpoint = remote = Endpoint(local=False)
        app.embed_ahead("s-2", follow_up)
        assert chat.rewriting is None and remote.client.asked == []

    asyncio.run(main())


def test_the_starters_offered_are_embedded_before_one_is_clicked(
    app: ModuleType, state: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "_state", state)

    async def main() -> list[Any]:
        await state.ensure_index()
        return await app.set_starters()

    starters = asyncio.run(main())
    assert [s.message for s in starters] == ["What is “Guide” about?"]
    inner = state.embedder.inner
    clicked = state.embedder.embed_query("What is “Guide” about?")  # waits for the one under way, if it is
    assert inner.embedded.count("What is “Guide” about?") == 1
    again = state.embedder.embed_query("What is “Guide” about?")  # clicked in another chat
    assert inner.embedded.count("What is “Guide” about?") == 1 and np.allclose(clicked, again)
