"""The chat in the browser: the only module that imports Chainlit.

``chainlit run app.py`` serves it. Everything else is plain Python in ``rag/``: the library
(``rag.library``: the documents folder, indexed and watched), the router (``rag.routing``: who
answers), the one path of a question (``rag.pipeline.ask``) and what the chat shows, as Markdown
(``rag.render``). This module turns those plain values into Chainlit messages, steps and side
elements, and owns the two kinds of state:

- the process's (``Shared``): the library, the router, and the open chats to tell about index
  updates (a message pushed into each session from the watcher's task);
- each chat's (``ChatState`` in ``cl.user_session``): its options (the settings panel), its
  conversation, its running answer.

Decisions:

- One router for the process: an embedded runtime must not be loaded once per chat. A
  connection that stops answering is dropped by the router and opened again on the next
  question, so a restarted server (or a Foundry Local service on a new port) is found again.
- The answer's message is drawn as soon as the passages are known, already streaming, with a
  placeholder that the first token replaces; the stop button cancels the task, and closing the
  question's events closes the HTTP stream, which stops the generation.
- Document text and file names are shown as text (``rag.render`` escapes them); Chainlit's
  ``unsafe_allow_html`` stays off.
- Every chat is kept (``rag.history``: SQLite under the data folder, or PostgreSQL), per user
  (``rag.access``: signed in by itself on loopback, or with a password). The checks run when
  this module loads, before Chainlit serves anything: a host that must not be served without
  sign-in, or a database that cannot be opened, stops ``chainlit run`` with one line.
- Who may do what is checked twice: by ``AccessGuard`` in front of Chainlit's routes (a
  removed user, an upload by a reader, a rating of someone else's answer) and in the handlers
  (a reader's attached file, the settings that change where the shared documents may be sent).
"""

# No `from __future__ import annotations` here: Chainlit executes this file before putting it
# in sys.modules, and dataclasses with string annotations look their module up there.
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import chainlit as cl
from chainlit.auth import decode_jwt
from chainlit.auth.cookie import get_token_from_cookies
from chainlit.context import init_ws_context
from chainlit.data import get_data_layer
from chainlit.data.sql_alchemy import SQLAlchemyDataLayer
from chainlit.input_widget import Select, Slider
from chainlit.session import WebsocketSession
from chainlit.utils import utc_now
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from rag import access, history, render
from rag.answering import Answer
from rag.asgi import APIServer, start_api
from rag.config import POLICIES, RETRIEVAL_MODES, Settings, load_settings
from rag.errors import (
    ConfigError,
    IndexMismatchError,
    IndexMissingError,
    LoadError,
    RagError,
)
from rag.index import Snapshot
from rag.library import Library
from rag.pipeline import (
    AskOptions,
    Retrieval,
    Retrieved,
    Rewriting,
    Rewritten,
    Started,
    ask,
    present,
    remember,
)
from rag.routing import Connection, Router
from rag.types import ChatDelta, ChatDone, IndexReport, Message, Queued
from rag.uploads import SavedUpload, check_size, save_upload

log = logging.getLogger("rag.app")

NOTICE_AUTHOR = "Index"
NO_ANSWER = "(The documents did not contain an answer.)"  # what a follow-up's history says of a gated question


# ============================================================================================
# Sign-in and history, checked as this module loads
# ============================================================================================


def _run(coro: Any) -> Any:
    """Run ``coro`` to its end from synchronous code: here, when ``chainlit run`` loads this
    module before its event loop starts, or in a thread of its own when a loop already runs
    (``chainlit run -w`` loading it again)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _start_up() -> str:
    """The sign-in mode (``rag.access``), once the host may be served that way, Chainlit's
    session secret is set and the history database has its tables. It runs as this module
    loads, which is before Chainlit checks its secret; what fails stops the app with one line
    that says what to do (exit status 2)."""
    try:
        settings = load_settings()
        mode = access.check_sign_in(settings, access.host_of(os.environ))
        if mode != "anonymous":
            access.ensure_auth_secret(settings.data_dir)
            _run(history.prepare_database(history.database_url(settings)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return mode


SIGN_IN = _start_up()


class HistoryLayer(history.DataLayerFixes, SQLAlchemyDataLayer):
    """Chainlit's SQL data layer with our fixes and lookups (``rag.history.DataLayerFixes``)."""


if SIGN_IN != "anonymous":

    @cl.data_layer
    def data_layer() -> HistoryLayer:
        return HistoryLayer(**history.data_layer_options(shared().settings))


if SIGN_IN == "password":

    @cl.password_auth_callback
    async def password_auth(username: str, password: str) -> cl.User | None:
        # The same answer, in about the same time, for a wrong password and an unknown user.
        record = await asyncio.to_thread(access.user_store(shared().settings).verify, username, password)
        return cl.User(identifier=record.name, metadata={"role": record.role}) if record else None

elif SIGN_IN == "local":

    @cl.header_auth_callback  # the page asks /auth/header by itself: no login screen
    async def local_auth(headers: Any) -> cl.User | None:
        if not access.local_sign_in_allowed(headers):
            return None  # through a proxy, or a name rebound to this machine: not the local user
        return cl.User(identifier=access.LOCAL_USER, display_name="you", metadata={"role": "admin"})


def role() -> str | None:
    """The role of this chat's user *now* (read again at each check: a removed user has none)."""
    if SIGN_IN == "anonymous":
        return "admin"
    user = cl.user_session.get("user")
    return access.current_role(shared().settings, SIGN_IN, user.identifier) if user is not None else None


def _session_user(scope: dict[str, Any]) -> cl.User | None:
    """The user a request's session token names (cookie, or ``Authorization: Bearer``), if valid."""
    connection = HTTPConnection(scope)
    token = get_token_from_cookies(connection.cookies)
    if not token:
        scheme, _, value = connection.headers.get("authorization", "").partition(" ")
        token = value if scheme.lower() == "bearer" else ""
    if not token:
        return None
    try:
        return decode_jwt(token)
    except Exception:  # noqa: BLE001 - expired, forged, or signed with another secret: Chainlit refuses it too
        return None


class AccessGuard:
    """In front of Chainlit's routes (pure ASGI, so streams and websockets pass untouched):
    a session whose user was removed stops working at once (Chainlit's token would stay valid
    for days), only an admin may upload a file, and a rating goes only to an answer in one's own
    chats (``rag.access.route_needs``, ``rag.history.feedback_allowed``). Everything else,
    signing in included, is Chainlit's own check."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and SIGN_IN != "anonymous":
            prefixes = (scope.get("root_path", ""), os.environ.get("CHAINLIT_ROOT_PATH", ""))
            path = access.route_path(scope["path"], *prefixes)
            need = access.route_needs(scope.get("method", "GET"), path)
            if need is not None:
                user = _session_user(scope)
                now = access.current_role(shared().settings, SIGN_IN, user.identifier) if user else None
                if user is not None and now is None:
                    return await _deny(scope, receive, send, 401, "this account no longer exists: sign in again")
                if need == "upload" and not access.may(now, "upload"):
                    if user is None:
                        return await _deny(scope, receive, send, 401, "Unauthorized")
                    return await _deny(scope, receive, send, 403, "only admins can add documents")
                if need == "feedback" and user is not None:
                    body, receive = await _read_body(receive)
                    try:
                        payload = json.loads(body)
                    except ValueError:
                        return await _deny(scope, receive, send, 400, "the request body is not a rating (JSON)")
                    if not await history.feedback_allowed(get_data_layer(), user.identifier, scope["method"], payload):
                        return await _deny(scope, receive, send, 404, "no such answer or rating among your chats")
        await self.app(scope, receive, send)


# A rating is a few hundred bytes; a body larger than this is not one (Chainlit would refuse it).
_FEEDBACK_BODY_LIMIT = 64 * 1024


async def _read_body(receive: Any) -> tuple[bytes, Any]:
    """A request's body (empty when over ``_FEEDBACK_BODY_LIMIT``: it then fails to parse), and
    a ``receive`` that hands the same body to the app behind."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= _FEEDBACK_BODY_LIMIT:
            chunks.append(chunk)
        more = message.get("more_body", False)
    body = b"".join(chunks) if size <= _FEEDBACK_BODY_LIMIT else b""
    replayed = False

    async def replay() -> dict[str, Any]:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def _deny(scope: dict[str, Any], receive: Any, send: Any, status: int, detail: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})  # policy violation
        return
    await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


def _guard_routes() -> None:
    """Put ``AccessGuard`` in front of Chainlit's server. Chainlit documents one way to extend
    its server, importing its FastAPI object ("Custom endpoints" in its docs); this is the one
    use app.py makes of Chainlit's server module (tests/test_app.py holds it to that)."""
    from chainlit.server import app as chainlit_server_app

    with contextlib.suppress(RuntimeError):  # ``chainlit run -w`` loading this again: the first stays
        chainlit_server_app.add_middleware(AccessGuard)


_guard_routes()


# ============================================================================================
# Process-wide state
# ============================================================================================


class Shared:
    """What lives as long as the process, shared by every chat."""

    def __init__(self, settings: Settings, embedder: Any = None) -> None:
        self.settings = settings
        self.sessions: set[str] = set()  # open chats, told about index updates
        self.announced: set[tuple[str, str]] = set()  # skipped files, named once
        self.library = Library(settings, embedder, on_update=self.updated, on_error=self.failed)
        self._router: Router | None = None
        self.api: APIServer | None = None  # the OpenAI-compatible API (rag/asgi.py), from app start

    def router(self) -> Router:
        """The router, made on first use: a broken endpoints file is reported to the chat that
        asks (and read again by the next one), not at start-up."""
        if self._router is None:
            self._router = Router(self.settings)
        return self._router

    def updated(self, report: IndexReport, snapshot: Snapshot, origin: str | None) -> None:
        text = render.describe_update(report, snapshot, self.announced)
        if text:
            self.notify(text, exclude=origin)

    def failed(self, error: RagError) -> None:
        self.notify(f"Could not update the index: {render.friendly_error(error)}")

    def notify(self, content: str, *, exclude: str | None = None) -> None:
        """Post ``content`` into every open chat but ``exclude`` (from any task)."""
        for session_id in list(self.sessions):
            if session_id != exclude:
                self.library.spawn(self._push(session_id, content))

    async def _push(self, session_id: str, content: str) -> None:
        session = WebsocketSession.get_by_id(session_id)
        if session is None:  # Chainlit forgot it: the chat is gone
            self.sessions.discard(session_id)
            return
        try:
            init_ws_context(session)
            await cl.Message(content=content, author=NOTICE_AUTHOR, type="system_message").send()
        except Exception:
            log.exception("could not notify chat %s", session_id)

    async def close(self) -> None:
        if self.api is not None:
            await self.api.stop()
        await self.library.close()
        if self._router is not None:
            await self._router.aclose()


_shared: Shared | None = None


def shared() -> Shared:
    global _shared
    if _shared is None:
        _shared = Shared(load_settings())
    return _shared


@dataclass
class ChatState:
    """One browser chat: its options, its conversation, its running answer."""

    options: AskOptions
    history: list[Message] = field(default_factory=list)
    task: asyncio.Task[Any] | None = None
    models_shown: tuple[str, ...] = ()


def chat_state() -> ChatState:
    chat = cl.user_session.get("chat")
    if chat is None:
        chat = ChatState(options=AskOptions.from_settings(shared().settings))
        cl.user_session.set("chat", chat)
    return chat


# ============================================================================================
# Plain values → Chainlit
# ============================================================================================


def to_chainlit(element: render.SideElement) -> cl.Text | cl.Pdf:
    if element.kind == "pdf":
        return cl.Pdf(name=element.name, path=str(element.path), page=element.page, display="side")
    return cl.Text(name=element.name, content=element.content, display="side")


def side_elements(hits: Sequence[Any], cited: Sequence[int]) -> list[cl.Text | cl.Pdf]:
    return [to_chainlit(e) for e in render.citation_elements(hits, cited, shared().settings.corpus_dir)]


async def say(content: str, **kwargs: Any) -> cl.Message:
    msg = cl.Message(content=content, **kwargs)
    await msg.send()
    return msg


async def send_settings(chat: ChatState, connection: Connection | None) -> None:
    """The settings panel, with the models the chat's endpoint offers."""
    models = tuple(connection.models) if connection is not None else ()
    if connection is not None and chat.options.model not in models:
        try:  # an alias (RAG_MODEL=phi-4-mini) stands for one of the ids listed
            model = connection.pick(chat.options.model)
        except RagError:
            model = connection.model
        chat.options = replace(chat.options, model=model)
    options = chat.options
    inputs: list[Any] = []
    if models:
        inputs.append(Select(id="model", label="Model", values=list(models), initial_value=options.model))
    inputs += [
        Slider(id="top_k", label="Passages per question (top-k)", initial=options.top_k, min=1, max=20, step=1),
        Slider(id="temperature", label="Temperature", initial=options.temperature, min=0, max=2, step=0.1),
        Select(id="mode", label="Retrieval mode", values=list(RETRIEVAL_MODES), initial_value=options.mode),
    ]
    if access.may(role(), "corpus_settings"):  # where the shared documents may be sent: admins only
        inputs.append(Select(id="policy", label="Endpoints allowed (routing policy)", values=list(POLICIES),
                             initial_value=options.policy))  # fmt: skip
    inputs.append(Slider(id="min_relevance", label="Relevance threshold (cosine similarity)",
                         initial=options.min_relevance, min=0, max=1, step=0.05))  # fmt: skip
    await cl.ChatSettings(inputs).send()
    chat.models_shown = models


async def primary(chat: ChatState) -> tuple[Connection | None, RagError | None]:
    """The endpoint that answers this chat first (opened), or why there is none."""
    try:
        return await shared().router().primary(chat.options.policy), None
    except RagError as exc:
        return None, exc


# ============================================================================================
# Chainlit handlers
# ============================================================================================


@cl.on_app_startup
async def on_app_startup() -> None:
    state = shared()
    log.info("corpus %s, index %s", state.settings.corpus_dir, state.settings.index_dir)
    state.library.start()
    state.api = await start_api(state.settings, state.library, state.router)  # RAG_API_PORT, 0: none


@cl.on_app_shutdown
async def on_app_shutdown() -> None:
    if _shared is not None:
        await _shared.close()


@cl.set_starters
async def set_starters(user: Any = None, language: str | None = None) -> list[cl.Starter]:
    try:
        snapshot = await shared().library.snapshot()
    except RagError:
        return []  # nothing indexed yet
    except Exception:
        log.exception("starters failed")
        return []
    return [cl.Starter(label=label, message=question) for label, question in render.starter_questions(snapshot)]


async def wait_until_indexed(library: Library) -> Snapshot | None:
    """Wait for start-up and the first index build, showing progress; None when it failed."""
    status: cl.Message | None = None
    started = time.monotonic()

    async def show(text: str) -> None:
        nonlocal status
        if status is None:
            status = await say(text, author=NOTICE_AUTHOR, type="system_message")
        elif status.content != text:
            status.content = text
            await status.update()

    while not library.ready.is_set():
        await show(f"Loading the embedding model… ({time.monotonic() - started:.0f} s)")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(library.ready.wait(), 1.0)
    if library.startup_error is not None:
        await show(f"The app could not start: {render.friendly_error(library.startup_error)}")
        return None
    try:
        snapshot = await library.snapshot()
    except (IndexMissingError, IndexMismatchError):
        build = asyncio.ensure_future(library.ensure_index(origin=cl.context.session.id))
        folder = render.code_span(str(library.settings.corpus_dir))
        while not build.done():
            progress = library.progress()
            said = f"{render.plural(progress[0], 'passage')} embedded, {progress[1]:.0f} s" if progress else "starting"
            await show(f"Indexing {folder} for the first time: {said}…")
            await asyncio.wait({build}, timeout=1.0)
        try:
            snapshot = build.result()
        except RagError as exc:
            await show(f"Indexing failed: {render.friendly_error(exc)}")
            return None
    if status is not None:  # done: the welcome says the rest
        await status.remove()
    return snapshot


@cl.on_chat_start
async def on_chat_start() -> None:
    state = shared()
    chat = chat_state()
    try:
        # The page asked for its starters as it loaded: there were none if the index is not there yet.
        had_starters = state.library.ready.is_set() and await asyncio.to_thread(state.library.has_index)
        snapshot = await wait_until_indexed(state.library)
        # Listed only now: the first build's own report would repeat what the welcome says.
        state.sessions.add(cl.context.session.id)
        connection, error = await primary(chat)
        await send_settings(chat, connection)
        # A system message leaves the welcome screen (starters) in place until the first question.
        text = render.welcome_text(snapshot, connection, error, state.settings.corpus_dir, suggest=not had_starters)
        await say(text, type="system_message")
    except Exception as exc:
        log.exception("chat start failed")
        await say(render.friendly_error(exc))
    finally:
        state.sessions.add(cl.context.session.id)


@cl.on_chat_resume
async def on_chat_resume(thread: dict[str, Any]) -> None:
    """A past chat opened from the sidebar (Chainlit redraws its messages): it continues with
    its conversation (a follow-up is rewritten against it) and its settings, and each cited
    passage opens as it was cited, with a note when its document changed or is gone since."""
    state, chat = shared(), chat_state()
    steps = thread.get("steps") or []
    for question, reply in history.remembered_turns(steps):
        chat.history = remember(chat.history, question, reply)
    meta = thread.get("metadata") or {}
    meta = json.loads(meta) if isinstance(meta, str) else meta
    connection, _ = await primary(chat)
    models = tuple(connection.models) if connection is not None else ()
    chat.options = chat.options.updated(access.settings_allowed(role(), meta.get("chat_settings") or {}), models)
    await send_settings(chat, connection)
    state.sessions.add(cl.context.session.id)  # on_chat_start is not called for a resumed chat
    try:
        snapshot = await state.library.snapshot()
    except RagError:
        return  # nothing indexed (yet): the stored passages open as they are
    await reopen_passages(thread, steps, snapshot, state.settings.corpus_dir)


async def reopen_passages(thread: dict[str, Any], steps: Sequence[Any], snapshot: Snapshot, corpus_dir: Path) -> None:
    """Patch ``thread["elements"]`` in place (Chainlit sends this very dict to the page next):
    a passage whose document changed or is gone gets a note on top; a cited PDF page (stored
    without its content) is the corpus file again while it is the same, else a note."""
    indexed = {source: set(record.chunk_ids) for source, record in snapshot.files.items()}
    states = {(p.message_id, f"[{p.citation.number}]"): p for p in history.passage_states(steps, indexed)}
    pages = {(p.message_id, render.pdf_label(p.citation.source, p.citation.page)): p
             for p in states.values() if p.citation.page is not None}  # fmt: skip
    root = corpus_dir.resolve()
    for element in thread.get("elements") or []:
        key = (element.get("forId"), element.get("name"))
        if key in states and element.get("url"):
            note = history.passage_note(states[key], escape=render.escape_markdown)
            if note:
                body = (history.read_data_url(element["url"]) or b"").decode("utf-8", "replace")
                element["url"] = history.data_url(f"{note}\n\n{body}", "text/markdown")
        elif key in pages and element.get("type") == "pdf" and not element.get("url"):
            passage = pages[key]
            path = (root / passage.citation.source).resolve()
            if passage.state == "current" and path.is_relative_to(root) and path.is_file():
                ref = await cl.context.session.persist_file(name=element["name"], path=str(path), mime="application/pdf")
                element["chainlitKey"] = ref["id"]
                element["url"] = (f"{os.environ.get('CHAINLIT_ROOT_PATH', '')}/project/file/{ref['id']}"
                                  f"?session_id={cl.context.session.id}")  # fmt: skip
            else:
                note = history.passage_note(passage, escape=render.escape_markdown) or "_The page is not available._"
                element.update(type="text", mime="text/markdown", url=history.data_url(note, "text/markdown"))


@cl.on_settings_update
async def on_settings_update(values: dict[str, Any]) -> None:
    chat = chat_state()
    chat.options = chat.options.updated(access.settings_allowed(role(), values), chat.models_shown)


@cl.on_stop
async def on_stop() -> None:
    """Chainlit cancels the running task; cancelling it here too makes the intent explicit
    (the answer's HTTP stream is closed as the cancellation unwinds it)."""
    task = chat_state().task
    if task is not None and not task.done() and not task.cancelling():
        task.cancel()


@cl.on_chat_end
async def on_chat_end() -> None:
    """The page went away (closed, reloaded, another chat opened, the connection lost): its
    running answer stops, so that a question still waiting for the model gives its place in
    line up and one being answered frees the model for the others. What came is kept."""
    task = chat_state().task
    if task is not None and not task.done() and not task.cancelling():
        task.cancel()


@cl.on_message
async def on_message(message: cl.Message) -> None:
    state = shared()
    chat = chat_state()
    chat.task = asyncio.current_task()
    try:
        files = [e for e in (message.elements or []) if getattr(e, "path", None)]
        if files and not access.may(role(), "upload"):  # the guard refuses the upload itself; this is a second check
            await say("Only an admin can add documents: the attached file was not added.")
        elif files:
            await add_uploads(state, files)
        question = (message.content or "").strip()
        if question:
            await answer_question(state, chat, question)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if not isinstance(exc, RagError):
            log.exception("answering failed")
        await say(render.friendly_error(exc))
    finally:
        chat.task = None


async def add_uploads(state: Shared, files: Sequence[Any]) -> None:
    """Save the attached files into the corpus, index them, and confirm each one."""
    settings = state.settings
    saved: list[SavedUpload] = []
    for element in files:
        name = str(getattr(element, "name", "") or Path(element.path).name)
        try:
            check_size(name, Path(element.path).stat().st_size, settings.max_file_bytes)
            data = await asyncio.to_thread(Path(element.path).read_bytes)
            saved.append(
                await asyncio.to_thread(save_upload, settings.corpus_dir, name, data, max_bytes=settings.max_file_bytes)
            )
        except LoadError as exc:
            await say(f"Could not add **{render.escape_markdown(name)}**: {render.escape_markdown(exc.reason)}. "
                      "Nothing was changed.")  # fmt: skip
        except OSError as exc:
            await say(f"Could not add **{render.escape_markdown(name)}**: "
                      f"{render.escape_markdown(exc.strerror or str(exc))}.")  # fmt: skip
    if not saved:
        return
    report = await state.library.sync(origin=cl.context.session.id)
    snapshot = await state.library.snapshot()
    reasons = {s.source: s.reason for s in report.skipped}
    for upload in saved:
        count = render.passages_of(snapshot, upload.source)
        if count is None and upload.created:
            upload.path.unlink(missing_ok=True)  # saved but not indexed: a failed upload changes nothing
        await say(render.upload_text(upload, count, reasons.get(upload.source), settings.corpus_dir))


async def answer_question(state: Shared, chat: ChatState, question: str) -> None:
    """One question through ``rag.pipeline.ask``, drawn as it goes: the rewrite and the
    retrieval as steps, the answer streamed into a message with its citations."""
    library = state.library
    if not library.ready.is_set():
        await wait_until_indexed(library)
    if library.startup_error is not None:
        await say(f"The app could not start: {render.friendly_error(library.startup_error)}")
        return
    options = chat.options
    router = state.router()
    drawn = Drawn(question)
    try:
        events = ask(question, chat.history, index=library.live, embedder=library.embedder, router=router,
                     options=options, count=library.count,
                     max_answer_tokens=state.settings.max_answer_tokens)  # fmt: skip
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Rewriting):
                    drawn.rewrite = cl.Step(name="Standalone question", type="llm", show_input=False)
                    drawn.rewrite.start = utc_now()
                    await drawn.rewrite.send()
                elif isinstance(event, Rewritten) and drawn.rewrite is not None:
                    drawn.standalone = event.standalone
                    drawn.rewrite.output = render.escape_markdown(event.standalone)
                    drawn.rewrite.end = utc_now()
                    await drawn.rewrite.update()
                elif isinstance(event, Retrieved):
                    await drawn.retrieved(event.retrieval, options)
                    if not event.retrieval.relevant:
                        await say(render.gate_text(event.retrieval), metadata=history.answer_metadata(
                            question=question, standalone=drawn.standalone, reply=NO_ANSWER, model="",
                            finish="gate"))  # fmt: skip
                        chat.history = remember(chat.history, question, NO_ANSWER)
                        return
                    # created_at now: a message only streamed, then updated, is stored without one
                    drawn.answer = cl.Message(content="", created_at=utc_now())
                    await drawn.answer.stream_token(render.READING)  # the first token replaces it
                elif isinstance(event, Queued) and drawn.answer is not None and not drawn.streaming:
                    # the model answers others first: say where this one is instead of a silent spinner
                    await drawn.answer.stream_token(render.queue_text(event.ahead), is_sequence=True)
                elif isinstance(event, Started):
                    drawn.stream = event.answer
                    await drawn.retrieved(drawn.found, options, sent=event.answer.hits)  # type: ignore[arg-type]
                    connection = router.opened(options.policy)
                    if connection is not None and connection.models != list(chat.models_shown):
                        await send_settings(chat, connection)  # it came back, or with other models
                elif isinstance(event, ChatDelta) and drawn.answer is not None:
                    await drawn.answer.stream_token(event.text, is_sequence=not drawn.streaming)
                    drawn.streaming = True
    except asyncio.CancelledError:
        await drawn.finish(state, note="_Stopped._", finish="stopped")
        raise
    except IndexMissingError:
        if await wait_until_indexed(library) is not None:
            await answer_question(state, chat, question)
        return
    except RagError as exc:
        log.warning("answer failed: %s", exc)
        if drawn.stream is None:  # no model answered: show the passages instead
            await drawn.no_model(exc)
            return
        await drawn.finish(state, note=f"⚠️ {render.friendly_error(exc)} Ask again to retry.", finish="error")
        return
    finally:
        await drawn.settle()
    stream = drawn.stream
    if stream is None:
        return
    done = stream.done
    reason = done.finish_reason if isinstance(done, ChatDone) else None
    remembered = bool(stream.text.strip())
    await drawn.finish(state, note=render.finish_note(reason, state.settings.max_answer_tokens),
                       finish=reason or "stop", remembered=remembered)  # fmt: skip
    if remembered:
        chat.history = remember(chat.history, question, stream.text)


class Drawn:
    """What one question has drawn so far, so that any way out (an answer, an error, a stop)
    leaves the page complete: no step left spinning, no message left with its placeholder."""

    def __init__(self, question: str = "") -> None:
        self.question = question
        self.standalone: str | None = None  # the follow-up's rewrite, once made
        self.rewrite: cl.Step | None = None
        self.retrieval: cl.Step | None = None
        self.found: Retrieval | None = None
        self.answer: cl.Message | None = None
        self.stream: Answer | None = None
        self.streaming = False
        self.finished = False

    async def retrieved(self, found: Retrieval, options: AskOptions, *, sent: Sequence[Any] | None = None) -> None:
        self.found = found
        if self.retrieval is None:
            self.retrieval = cl.Step(name="Retrieval", type="retrieval", show_input=False)
            self.retrieval.start = self.retrieval.end = utc_now()  # drawn done: the search is over
            self.retrieval.output = render.retrieval_text(found, sent, options)
            await self.retrieval.send()
        else:
            self.retrieval.output = render.retrieval_text(found, sent, options)
            await self.retrieval.update()

    async def no_model(self, error: RagError) -> None:
        hits = list(self.found.hits) if self.found is not None else []
        text = render.no_model_text(error, hits)
        elements = side_elements(hits, range(1, len(hits) + 1))
        if self.answer is not None:
            self.answer.content, self.answer.elements = text, elements  # type: ignore[assignment]
            self.answer.metadata = history.answer_metadata(question=self.question, standalone=self.standalone,
                                                           reply="", model="", finish="error")  # fmt: skip
            await self.answer.update()
            self.finished = True
        else:
            await say(text, elements=elements)

    async def finish(self, state: Shared, *, note: str, finish: str = "", remembered: bool = False) -> None:
        """The answer's final text: the model's, citations split, a note, the sources; and
        what the history keeps of it (``remembered``: a follow-up may build on it)."""
        if self.answer is None or self.finished:
            return
        self.finished = True
        stream = self.stream
        if stream is None:
            self.answer.content = note or render.READING
            await self.answer.update()
            return
        shown = present(stream, self.standalone or self.question)
        text, cited = shown.text, shown.cited
        if not text and not note:
            text = "_The model returned an empty answer._"
        model = stream.route.describe() if stream.route is not None else stream.model
        parts = [p for p in (text, note, render.sources_footer(stream.hits, cited, model)) if p]
        self.answer.content = "\n\n".join(parts)
        self.answer.elements = side_elements(stream.hits, cited)  # type: ignore[assignment]
        self.answer.metadata = await self.metadata(state, stream, cited, finish, remembered)
        await self.answer.update()

    async def metadata(self, state: Shared, stream: Answer, cited: Sequence[int], finish: str,
                       remembered: bool) -> dict[str, Any]:  # fmt: skip
        """What the history keeps of this answer (``rag.history.answer_metadata``)."""
        try:
            snapshot = await state.library.snapshot()
            hashes = {source: record.sha256 for source, record in snapshot.files.items()}
        except RagError:
            hashes = {}
        route = stream.route
        return history.answer_metadata(
            question=self.question, standalone=self.standalone, model=stream.model,
            reply=stream.text if remembered else "", endpoint=route.endpoint if route else "",
            policy=route.policy if route else "", fallback=route.fallback if route else "",
            passages=len(stream.hits), finish=finish, citations=history.citations_of(stream.hits, cited, hashes),
        )  # fmt: skip

    async def settle(self) -> None:
        """Anything still drawn as running is drawn done (the page never keeps a spinner)."""
        if self.rewrite is not None and self.rewrite.end is None:
            self.rewrite.end = utc_now()
            await self.rewrite.update()
        if self.answer is not None and not self.finished and self.stream is None:
            self.finished = True
            self.answer.content = "_No answer._"
            await self.answer.update()
