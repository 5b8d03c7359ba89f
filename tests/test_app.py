"""The Chainlit face (app.py) without a browser: what a question draws, in order, against a
fake endpoint at the router's transport (tests/test_e2e.py drives the same in Chromium).

``app.py`` is imported with ``CHAINLIT_APP_ROOT`` pointing at a temp copy of our Chainlit
config (importing Chainlit writes into its app root) and ``RAG_DATA_DIR`` at a temp folder
(importing app.py makes the history database and the session secret there): importing it
writes nothing into the repository.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from rag.config import Settings
from rag.types import IndexReport, Message
from tests.fakes import FakeEmbedder
from tests.sse import chunk, sse, sse_response

ROOT = Path(__file__).resolve().parent.parent
MODEL = "fake-model"


# What importing app.py reads (set for the import) or sets (restored after the module's tests).
_IMPORT_ENV = ("CHAINLIT_APP_ROOT", "RAG_DATA_DIR", "RAG_AUTH", "CHAINLIT_HOST", "CHAINLIT_AUTH_SECRET")


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    root = tmp_path_factory.mktemp("approot")
    data = tmp_path_factory.mktemp("appdata")
    shutil.copytree(ROOT / ".chainlit", root / ".chainlit")
    previous = {name: os.environ.get(name) for name in _IMPORT_ENV}
    for name in _IMPORT_ENV:
        os.environ.pop(name, None)
    os.environ.update(CHAINLIT_APP_ROOT=str(root), RAG_DATA_DIR=str(data))
    before = _repository_files()
    import chainlit.config
    import chainlit.data

    assert Path(chainlit.config.APP_ROOT) == root, "chainlit was imported elsewhere first"
    callbacks = copy.copy(chainlit.config.config.code)
    try:
        module = importlib.import_module("app")
        assert module.SIGN_IN == "local"  # 127.0.0.1, RAG_AUTH unset: history on, signed in by itself
        assert (data / "history.sqlite3").is_file() and (data / "auth-secret").is_file()
        assert _repository_files() == before, "importing app.py wrote into the repository"
        yield module
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        # Chainlit keeps app.py's data layer and sign-in callbacks process-wide: later tests
        # (tests/test_history.py) must not write through app.py's history, made for the
        # repository's data folder once RAG_DATA_DIR is gone.
        chainlit.config.config.code = callbacks
        chainlit.data._data_layer, chainlit.data._data_layer_initialized = None, False
        assert _repository_files() == before, "app.py wrote into the repository"


def _repository_files() -> dict[str, float | None]:
    """The files importing app.py would make in the repository's own data folder if it ignored
    ``RAG_DATA_DIR``: their modification times (None: absent)."""
    paths = [ROOT / ".rag" / name for name in ("history.sqlite3", "history.sqlite3-wal", "auth-secret")]
    return {str(p): p.stat().st_mtime if p.exists() else None for p in paths}


# --- the layout -------------------------------------------------------------------------------


def test_app_module_is_the_only_chainlit_importer_and_uses_no_internals(app: ModuleType) -> None:
    for path in (ROOT / "rag").glob("*.py"):
        assert not re.search(r"^\s*(import|from) chainlit\b", path.read_text(encoding="utf-8"), re.MULTILINE), path
    assert "chainlit" in sys.modules  # imported here through app.py, into the temp app root
    source = (ROOT / "app.py").read_text(encoding="utf-8")
    # One exception, the documented way to extend Chainlit's server: the access guard in front
    # of it (app._guard_routes). Nothing else of chainlit.server or chainlit.socket.
    allowed = "from chainlit.server import app as chainlit_server_app\n"
    assert source.count(allowed) == 1
    assert re.findall(r"\bchainlit_server_app\b[^\n]*", source.replace(allowed, "")) == [
        "chainlit_server_app.add_middleware(AccessGuard)"
    ]
    assert not re.search(r"chainlit\.(socket|server)\b", source.replace(allowed, ""))


def test_only_the_cli_starts_the_server_in_process() -> None:
    """The client side never depends on the runtime that serves it: ``rag.server`` is imported
    by the ``serve`` command alone (the launcher starts it as a process, by command line)."""
    importers = sorted(p.name for p in (ROOT / "rag").glob("*.py")
                       if re.search(r"^\s*(from rag\.server import|import rag\.server)", p.read_text(), re.MULTILINE))  # fmt: skip
    assert importers == ["cli.py"]


# --- a question, drawn ------------------------------------------------------------------------


class Page:
    """Stands in for Chainlit's messages and steps: records what the page would be sent, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        page = self

        class Message:
            def __init__(self, content: str = "", **kwargs: Any) -> None:
                self.content, self.elements, self.kwargs = content, kwargs.get("elements", []), kwargs

            async def send(self) -> None:
                page.log.append(("send", self.content))

            async def stream_token(self, token: str, is_sequence: bool = False) -> None:
                self.content = token if is_sequence else self.content + token
                page.log.append(("token" + (" replaces" if is_sequence else ""), token))

            async def update(self) -> None:
                page.log.append(("update", self.content))
                page.log.append(("elements", " ".join(e.name for e in self.elements)))

            async def remove(self) -> None:
                page.log.append(("remove", self.content))

        class Step:
            def __init__(self, name: str, **kwargs: Any) -> None:
                self.name, self.output, self.start, self.end = name, "", None, None

            async def send(self) -> None:
                page.log.append((f"step {self.name}" + (" done" if self.end else ""), self.output))

            async def update(self) -> None:
                page.log.append((f"step {self.name}" + (" done" if self.end else ""), self.output))

        self.Message, self.Step = Message, Step

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.log]


DOCS = {
    "compost.md": "# Compost\n\nTurn the compost pile every week so the compost pile gets air.\n",
    "planets.md": "# Planets\n\nJupiter is the largest planet; Mercury orbits closest to the Sun.\n",
}


class Endpoint:
    """A fake OpenAI endpoint at the transport: ``reply(body)`` answers chat requests."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        self.closed = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        import json

        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": MODEL}, {"id": "other"}]})
        body = json.loads(request.content)
        self.requests.append(body)
        return self.reply(body)


@pytest.fixture
def shared(app: ModuleType, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, text in DOCS.items():
        (settings.corpus_dir / name).write_text(text)
    state = app.Shared(settings.replace(base_url="http://127.0.0.1:9/v1", connect_retries=0, min_relevance=0.1,
                                        endpoints_file=settings.data_dir / "none.toml"), FakeEmbedder())  # fmt: skip
    monkeypatch.setattr(app, "_shared", state)
    monkeypatch.setattr(app, "to_chainlit", lambda element: element)  # cl.Text needs a live chat
    return state


def ask(app: ModuleType, shared: Any, endpoint: Endpoint, question: str, page: Page,
        monkeypatch: pytest.MonkeyPatch, history: list[Message] | None = None) -> Any:  # fmt: skip
    from rag.routing import Router

    monkeypatch.setattr(app.cl, "Message", page.Message)
    monkeypatch.setattr(app.cl, "Step", page.Step)
    shared._router = Router(shared.settings, transport=httpx.MockTransport(endpoint))
    chat = app.ChatState(options=app.AskOptions.from_settings(shared.settings), history=list(history or []),
                         models_shown=(MODEL, "other"))  # fmt: skip

    async def main() -> None:
        await shared.library.prepare()
        try:
            await app.answer_question(shared, chat, question)
        finally:
            await shared.close()

    asyncio.run(main())
    return chat


def test_a_question_is_drawn_as_it_goes_and_the_first_token_replaces_the_placeholder(
    app: ModuleType, shared: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = Page()
    endpoint = Endpoint(lambda body: sse_response(sse("Turn ", "it weekly [1] [7].", model=MODEL)))
    chat = ask(app, shared, endpoint, "How often should the compost pile be turned?", page, monkeypatch)
    assert page.kinds() == ["step Retrieval done", "token", "step Retrieval done", "token replaces", "token",
                            "update", "elements"]  # fmt: skip
    assert "passages found" in page.log[0][1] and "sent to the model" in page.log[2][1]
    assert page.log[1] == ("token", app.render.READING)  # the answer is drawn while the model reads
    final = page.log[5][1]
    assert final.startswith("Turn it weekly [1] [7].") and app.render.READING not in final
    assert "- [1] compost.md" in final and f"_Answered by {MODEL} from" in final
    assert page.log[6] == ("elements", "[1]")  # the model's [7] links nowhere
    assert chat.history == [Message("user", "How often should the compost pile be turned?"),
                            Message("assistant", "Turn it weekly.")]  # fmt: skip


def test_a_busy_model_shows_the_place_in_line_in_the_answers_placeholder(
    app: ModuleType, shared: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = Page()
    body = b": queued 2\n\n: queued 1\n\n: queued 0\n\n" + sse("Turn ", "it weekly [1].", model=MODEL)
    endpoint = Endpoint(lambda _: sse_response(body))
    ask(app, shared, endpoint, "How often should the compost pile be turned?", page, monkeypatch)
    assert page.kinds()[:6] == ["step Retrieval done", "token", "token replaces", "token replaces", "token replaces",
                                "step Retrieval done"]  # fmt: skip
    assert [text for _, text in page.log[1:5]] == [
        app.render.READING,
        "⏳ 2 questions ahead of yours: the model answers one at a time…",
        "⏳ 1 question ahead of yours: the model answers one at a time…",
        app.render.READING,  # its turn: the model reads the passages
    ]
    assert page.log[6] == ("token replaces", "Turn ")


def test_a_follow_up_shows_its_rewrite_and_the_chosen_model_answers(
    app: ModuleType, shared: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def reply(body: dict[str, Any]) -> httpx.Response:
        if body["stream"] is False:
            return httpx.Response(200, json={"choices": [{"index": 0, "message": {"content": "Which planet is largest?"}}]})
        return sse_response(sse("Jupiter [1].", model=body["model"]))

    page = Page()
    endpoint = Endpoint(reply)
    history = [Message("user", "Tell me about planets"), Message("assistant", "There are eight.")]
    monkeypatch.setattr(app.AskOptions, "from_settings", classmethod(lambda cls, s: cls(model="other", min_relevance=0.1)))
    ask(app, shared, endpoint, "and the biggest?", page, monkeypatch, history)
    assert page.kinds()[:2] == ["step Standalone question", "step Standalone question done"]
    assert page.log[1][1] == "Which planet is largest?"
    assert [r["model"] for r in endpoint.requests] == ["other", "other"]
    assert "Answered by other" in page.log[-2][1]


def test_nothing_relevant_gets_the_gate_and_the_model_is_not_asked(
    app: ModuleType, shared: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = Page()
    endpoint = Endpoint(lambda body: pytest.fail("the model was asked"))
    monkeypatch.setattr(shared, "settings", shared.settings.replace(min_relevance=0.9))
    monkeypatch.setattr(app.AskOptions, "from_settings", classmethod(lambda cls, s: cls(min_relevance=0.9)))
    chat = ask(app, shared, endpoint, "chocolate chip cookies", page, monkeypatch)
    assert page.kinds() == ["step Retrieval done", "send"]
    assert "don't seem to contain the answer" in page.log[1][1] and endpoint.requests == []
    assert chat.history[-1].content == "(The documents did not contain an answer.)"


def test_a_dead_endpoint_shows_the_passages_in_the_answers_place(
    app: ModuleType, shared: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    page = Page()
    chat = ask(app, shared, refuse, "How often should the compost pile be turned?", page, monkeypatch)  # type: ignore[arg-type]
    assert page.kinds() == ["step Retrieval done", "token", "update", "elements"]
    assert page.log[2][1].startswith("⚠️ The model is not answering.") and "- [1] compost.md" in page.log[2][1]
    assert chat.history == []  # nothing was answered: nothing to follow up on


def test_stopping_closes_the_stream_and_keeps_what_came(
    app: ModuleType, shared: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[bool] = []

    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            while True:
                await asyncio.sleep(0.01)
                yield chunk("tok ", model=MODEL)

        async def aclose(self) -> None:
            closed.append(True)

    page = Page()
    endpoint = Endpoint(lambda body: httpx.Response(200, stream=Endless(), headers={"content-type": "text/event-stream"}))
    monkeypatch.setattr(app.cl, "Message", page.Message)
    monkeypatch.setattr(app.cl, "Step", page.Step)
    from rag.routing import Router

    shared._router = Router(shared.settings, transport=httpx.MockTransport(endpoint))
    chat = app.ChatState(options=app.AskOptions.from_settings(shared.settings), models_shown=(MODEL, "other"))

    async def main() -> None:
        await shared.library.prepare()
        task = asyncio.create_task(app.answer_question(shared, chat, "How often should the compost pile be turned?"))
        for _ in range(1000):
            if page.kinds().count("token") >= 3 or task.done():
                break
            await asyncio.sleep(0.01)
        assert not task.done(), (page.log, task.exception())
        task.cancel()  # the stop button
        with pytest.raises(asyncio.CancelledError):
            await task
        await shared.close()

    asyncio.run(main())
    assert closed == [True]  # the HTTP stream was closed: the server stops generating
    final = [text for kind, text in page.log if kind == "update"][-1]
    assert final.startswith("tok tok") and "_Stopped._" in final
    assert chat.history == []


def test_open_chats_are_told_about_updates_but_not_the_one_that_caused_it(
    app: ModuleType, shared: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    told: list[tuple[str, str | None]] = []
    monkeypatch.setattr(shared, "notify", lambda text, exclude=None: told.append((text, exclude)))

    async def main() -> None:
        await shared.library.ensure_index(origin="chat-1")
        shared.failed(app.RagError("disk full"))

    asyncio.run(main())
    assert told[0][0].startswith("Documents updated: added **compost.md**") and told[0][1] == "chat-1"
    assert told[1] == ("Could not update the index: Disk full", None)
    shared.updated(IndexReport(unchanged=("compost.md",)), None, None)  # nothing changed: nothing said
    assert len(told) == 2


def test_the_app_serves_its_api_on_its_own_port_with_its_own_library_and_router(
    app: ModuleType, shared: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``RAG_API_PORT``: the app's start serves the rag: models with the chat's library and
    router (no second index or embedder), and its shutdown stops it."""
    import socket

    from rag.routing import Router

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(shared, "settings", shared.settings.replace(api_port=port))
    endpoint = Endpoint(lambda body: sse_response(sse("Turn it weekly [1].", model=MODEL)))
    shared._router = Router(shared.settings, transport=httpx.MockTransport(endpoint))
    question = {"model": "rag:fake-model", "messages": [{"role": "user", "content": "How often is compost turned?"}]}

    async def main() -> tuple[Any, Any, bool]:
        await app.on_app_startup()
        try:
            assert shared.api is not None and shared.api.url == f"http://127.0.0.1:{port}/v1"
            async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
                models = (await client.get(f"{shared.api.url}/models")).json()
                answer = (await client.post(f"{shared.api.url}/chat/completions", json=question)).json()
        finally:
            await app.on_app_shutdown()
        return models, answer, shared.api.task.done()

    models, answer, stopped = asyncio.run(main())
    assert [m["id"] for m in models["data"]] == ["rag:fake-model", "rag:other"]
    assert answer["choices"][0]["message"]["content"] == "Turn it weekly [1].\n\n**Sources**\n- [1] compost.md, Compost"
    assert endpoint.requests[0]["model"] == MODEL and stopped
