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
"""

# No `from __future__ import annotations` here: Chainlit executes this file before putting it
# in sys.modules, and dataclasses with string annotations look their module up there.
import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import chainlit as cl
from chainlit.context import init_ws_context
from chainlit.input_widget import Select, Slider
from chainlit.session import WebsocketSession
from chainlit.utils import utc_now

from rag import render
from rag.answering import Answer
from rag.config import POLICIES, RETRIEVAL_MODES, Settings, load_settings
from rag.errors import IndexMismatchError, IndexMissingError, LoadError, RagError
from rag.index import Snapshot
from rag.library import Library
from rag.pipeline import AskOptions, Retrieval, Retrieved, Rewriting, Rewritten, Started, ask, present, remember
from rag.routing import Connection, Router
from rag.types import ChatDelta, ChatDone, IndexReport, Message
from rag.uploads import SavedUpload, check_size, save_upload

log = logging.getLogger("rag.app")

NOTICE_AUTHOR = "Index"


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
        Select(id="policy", label="Endpoints allowed (routing policy)", values=list(POLICIES),
               initial_value=options.policy),  # fmt: skip
        Slider(id="min_relevance", label="Relevance threshold (cosine similarity)",
               initial=options.min_relevance, min=0, max=1, step=0.05),  # fmt: skip
    ]
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


@cl.on_settings_update
async def on_settings_update(values: dict[str, Any]) -> None:
    chat = chat_state()
    chat.options = chat.options.updated(values, chat.models_shown)


@cl.on_stop
async def on_stop() -> None:
    """Chainlit cancels the running task; cancelling it here too makes the intent explicit
    (the answer's HTTP stream is closed as the cancellation unwinds it)."""
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
        if files:
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
    drawn = Drawn()
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
                    drawn.rewrite.output = render.escape_markdown(event.standalone)
                    drawn.rewrite.end = utc_now()
                    await drawn.rewrite.update()
                elif isinstance(event, Retrieved):
                    await drawn.retrieved(event.retrieval, options)
                    if not event.retrieval.relevant:
                        await say(render.gate_text(event.retrieval))
                        chat.history = remember(chat.history, question, "(The documents did not contain an answer.)")
                        return
                    drawn.answer = cl.Message(content="")
                    await drawn.answer.stream_token(render.READING)  # the first token replaces it
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
        await drawn.finish(state, note="_Stopped._")
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
        await drawn.finish(state, note=f"⚠️ {render.friendly_error(exc)} Ask again to retry.")
        return
    finally:
        await drawn.settle()
    stream = drawn.stream
    if stream is None:
        return
    done = stream.done
    await drawn.finish(state, note=render.finish_note(done.finish_reason if isinstance(done, ChatDone) else None,
                                                      state.settings.max_answer_tokens))  # fmt: skip
    if stream.text.strip():
        chat.history = remember(chat.history, question, stream.text)


class Drawn:
    """What one question has drawn so far, so that any way out (an answer, an error, a stop)
    leaves the page complete: no step left spinning, no message left with its placeholder."""

    def __init__(self) -> None:
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
            await self.answer.update()
            self.finished = True
        else:
            await say(text, elements=elements)

    async def finish(self, state: Shared, *, note: str) -> None:
        """The answer's final text: the model's, citations split, a note, the sources."""
        if self.answer is None or self.finished:
            return
        self.finished = True
        stream = self.stream
        if stream is None:
            self.answer.content = note or render.READING
            await self.answer.update()
            return
        shown = present(stream)
        text, cited = shown.text, shown.cited
        if not text and not note:
            text = "_The model returned an empty answer._"
        model = stream.route.describe() if stream.route is not None else stream.model
        parts = [p for p in (text, note, render.sources_footer(stream.hits, cited, model)) if p]
        self.answer.content = "\n\n".join(parts)
        self.answer.elements = side_elements(stream.hits, cited)  # type: ignore[assignment]
        await self.answer.update()

    async def settle(self) -> None:
        """Anything still drawn as running is drawn done (the page never keeps a spinner)."""
        if self.rewrite is not None and self.rewrite.end is None:
            self.rewrite.end = utc_now()
            await self.rewrite.update()
        if self.answer is not None and not self.finished and self.stream is None:
            self.finished = True
            self.answer.content = "_No answer._"
            await self.answer.update()
