"""The retrieval-backed models of our OpenAI-compatible API: ``rag:<model>`` answers from your documents.

Framework-neutral: both servers use it, ``rag serve`` (``rag.server``, standard library) and the
app's own API (``rag.asgi``, Starlette on the app's event loop). A server reads the body, asks
``DocumentModels.respond`` and writes the ``Reply``: a JSON body, or server-sent events.

Naming: each plain answering model gets one retrieval model, ``rag:`` + its id without the
version suffix (``qwen2.5-coder-0.5b:1`` -> ``rag:qwen2.5-coder-0.5b``); a second version of
the same name keeps its full id (``rag:x:2``). Any alias ``pick_model`` resolves works too.

A request runs ``rag.pipeline.ask``, the chat's own path (follow-up rewrite, retrieval,
relevance gate, budgeted prompt, fallback between endpoints):

- ``messages``: the last one is the question and must be the user's; the earlier user and
  assistant turns are the history (the last 12, our Sources list and citation numbers taken
  out, as the chat remembers them). System and developer messages are ignored: the system
  prompt is ours, it carries the citation rules, and a client's own (an assistant persona,
  tool instructions) would compete with them in a small model. ``tool`` messages are
  dropped; ``tools`` and ``tool_choice`` are ignored: these models never call tools.
- ``temperature`` and ``max_tokens`` apply to the answer; without them ``RAG_TEMPERATURE``
  and ``RAG_MAX_ANSWER_TOKENS``.
- The reply's text is the answer with grouped citations split (``[1, 2]`` -> ``[1][2]``,
  as the chat shows it), then a note when it was cut off, then **Sources**: one line per
  cited passage (``- [1] solar-system-fact-sheet.md, page 2, Heading``); an answer that
  cites nothing lists every passage it was given under **Passages used**.
- The last chunk of a stream (or the completion itself) carries the passages in an extra
  field, ``rag`` (``passages_field``)::

      "rag": {"model": "qwen2.5-coder-0.5b:1", "question": "…", "relevant": true,
              "min_relevance": 0.35, "cited": [1],
              "passages": [{"n": 1, "source": "a.md", "page": null, "headings": ["A"],
                            "text": "…", "score": 0.61, "cited": true}],
              "finish_reason": "stop", "fallback": ""}

  ``score`` is the passage's cosine similarity to the question (what the gate compares);
  ``text`` the whole passage, and ``excerpt``, when not null, the part of it the model was sent.
  When no passage reaches the threshold the reply is a normal assistant message saying so,
  ``relevant`` is false, ``model`` is null (no model was asked) and ``passages`` are the
  closest ones.
- ``usage`` is the answering model's own (the rewrite of a follow-up is not counted), or,
  when it did not say, counted with our tokenizer.
- Errors before the first token are OpenAI-shaped errors with an HTTP status
  (``api_error``); the stream then never started. An error after it ends the stream with
  an ``{"error": …}`` event, as OpenAI's own streams do.

Trade-offs: the status of a streamed reply is known only once the model gave its first token
(or the gate closed), so headers wait for retrieval and the first token; in exchange a failure
is a proper HTTP error instead of a broken stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import re
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Protocol

from rag.answering import Answer
from rag.chat import is_loopback
from rag.citations import normalize_citations, strip_citations
from rag.config import Settings
from rag.embedding import Embedder
from rag.errors import (
    ConfigError,
    ContextLengthError,
    EndpointError,
    EndpointTimeoutError,
    EndpointUnreachableError,
    IndexError_,
    ModelBuildError,
    PolicyError,
    RagError,
    UnknownModelError,
)
from rag.index import Snapshot
from rag.pipeline import (
    HISTORY_MESSAGES,
    AskOptions,
    Retrieval,
    Retrieved,
    Started,
    ask,
    present,
)
from rag.prompting import TokenCounter
from rag.protocol import DONE_EVENT, APIError, chat_request, encode_event, envelope
from rag.render import finish_note, plural, where
from rag.retrieval import LiveIndex
from rag.routing import Router
from rag.types import ChatDelta, Hit, Message

log = logging.getLogger("rag.api")

PREFIX = "rag:"
OWNED_BY = "rag (answers from your documents)"
# A chat request is a few KB; a long conversation pasted in, a few hundred.
MAX_BODY_BYTES = 4 * 1024 * 1024
READY_TIMEOUT = 300.0  # how long a request waits for the embedding model to load
SOURCES = "**Sources**"
PASSAGES_USED = "**Passages used**"
EMPTY_ANSWER = "_The model returned an empty answer._"
_FOOTER = re.compile(r"\n\n(?:\*\*Sources\*\*|\*\*Passages used\*\*)\n- \[\d+\] .*\Z", re.DOTALL)
_DROPPED_ROLES = ("tool", "function")


# --- Names ----------------------------------------------------------------------------------


def is_retrieval_model(model_id: str) -> bool:
    """Whether ``model_id`` names one of these models (which the chat itself never asks).

    >>> is_retrieval_model("rag:qwen2.5-coder-0.5b"), is_retrieval_model("qwen2.5-coder-0.5b:1")
    (True, False)
    """
    return model_id.startswith(PREFIX)


def retrieval_models(plain: Sequence[str]) -> dict[str, str]:
    """``rag:`` id -> the plain model that answers it, in the plain models' order.

    >>> retrieval_models(["qwen2.5-coder-0.5b:1", "x:1", "x:2"])
    {'rag:qwen2.5-coder-0.5b': 'qwen2.5-coder-0.5b:1', 'rag:x': 'x:1', 'rag:x:2': 'x:2'}
    """
    out: dict[str, str] = {}
    for model_id in plain:
        if is_retrieval_model(model_id):
            continue
        base, sep, version = model_id.rpartition(":")
        name = PREFIX + (base if sep and version.isdigit() else model_id)
        out[name if name not in out else PREFIX + model_id] = model_id
    return out


def model_card(model_id: str, answerer: str) -> dict[str, Any]:
    """What ``GET /v1/models`` lists for a retrieval model."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": OWNED_BY, "answered_by": answerer}


# --- Requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DocumentRequest:
    """A chat completion for a retrieval model, read from the client's request."""

    model: str  # the rag: id, as listed
    answerer: str  # the plain model that answers
    question: str
    history: tuple[Message, ...] = ()
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None


def remembered(text: str) -> str:
    """An earlier reply as the history keeps it: without our Sources list and its numbers.

    >>> remembered("About 8 minutes [1].\\n\\n**Sources**\\n- [1] sun.md")
    'About 8 minutes.'
    """
    return strip_citations(_FOOTER.sub("", text)).strip()


def parse_request(data: Mapping[str, Any], models: Mapping[str, str]) -> DocumentRequest:
    """Validate a decoded body for one of ``models`` (rag id -> plain id); ``APIError`` if not.

    >>> r = parse_request({"model": "rag:m", "messages": [{"role": "system", "content": "Be brief"},
    ...     {"role": "user", "content": "Hi"}]}, {"rag:m": "m:1"})
    >>> r.answerer, r.question, r.history
    ('m:1', 'Hi', ())
    """
    raw = data.get("messages")
    if isinstance(raw, list):
        raw = [m for m in raw if not (isinstance(m, dict) and m.get("role") in _DROPPED_ROLES)]
    request = chat_request({**data, "messages": raw}, list(models))
    *earlier, last = request.messages
    if last["role"] != "user" or not last["content"].strip():
        raise APIError(400, "The last message must be the user's question (role user, with text).",
                       param="messages")  # fmt: skip
    history = [
        Message(m["role"], m["content"] if m["role"] == "user" else remembered(m["content"]))
        for m in earlier
        if m["role"] in ("user", "assistant") and m["content"].strip()
    ]
    return DocumentRequest(
        model=request.model, answerer=models[request.model], question=last["content"].strip(),
        history=tuple(history[-HISTORY_MESSAGES:]), stream=request.stream, include_usage=request.include_usage,
        max_tokens=request.max_tokens, temperature=request.temperature,
    )  # fmt: skip


# --- What the reply says --------------------------------------------------------------------


class CitationSplitter:
    """Streamed text with grouped citations split as ``present`` splits them, and without the
    leading and trailing whitespace it strips: a possible group (``[1, ``) or trailing
    whitespace is held back until the text after it arrives.

    >>> s = CitationSplitter(); [s.feed(p) for p in (" See [1", ", 2] and", " [3].  ")] + [s.flush()]
    ['See ', '[1][2] and', ' [3].', '']
    """

    _HELD = re.compile(r"\[[\d\s,;]*\Z|\s+\Z")

    def __init__(self) -> None:
        self._buffer = ""
        self._started = False

    def feed(self, text: str) -> str:
        self._buffer += text
        if not self._started:
            self._buffer = self._buffer.lstrip()
            self._started = bool(self._buffer)
        held = self._HELD.search(self._buffer)
        cut = held.start() if held else len(self._buffer)
        ready, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return normalize_citations(ready)

    def flush(self) -> str:
        rest, self._buffer = self._buffer, ""
        return normalize_citations(rest).rstrip()


def sources_text(hits: Sequence[Hit], cited: Sequence[int]) -> str:
    """The list under an answer: the passages it cites, or, when it cites none, every
    passage it was given (so the reader still sees where it came from).

    >>> from rag.types import Chunk
    >>> hits = [Hit(Chunk("a", "sun.md", "x", 0, 1), 1.0, 1), Hit(Chunk("b", "g.pdf", "y", 0, 1, page=2), 1.0, 2)]
    >>> print(sources_text(hits, [2]))
    **Sources**
    - [2] g.pdf, page 2
    """
    numbers = [n for n in cited if 1 <= n <= len(hits)]
    heading = SOURCES if numbers else PASSAGES_USED
    numbers = numbers or list(range(1, len(hits) + 1))
    return heading + "\n" + "\n".join(f"- [{n}] {_one_line(where(hits[n - 1]))}" for n in numbers)


def closing_text(answer: Answer, cited: Sequence[int], *, max_tokens: int, empty: bool) -> str:
    """What follows the model's own text: a note when it did not end by itself, the sources."""
    finish = answer.done.finish_reason if answer.done is not None else None
    parts = [EMPTY_ANSWER if empty else "", finish_note(finish, max_tokens).replace("RAG_MAX_ANSWER_TOKENS", "max_tokens"),
             sources_text(answer.hits, cited) if answer.hits else ""]  # fmt: skip
    return "\n\n".join(p for p in parts if p)


def gate_text(found: Retrieval) -> str:
    """The reply when no passage reaches the relevance threshold: the model is not asked."""
    best = max((h.similarity for h in found.closest), default=None)
    text = (
        "Your documents don't seem to contain the answer, so I won't guess: no passage is similar enough to "
        f"the question (relevance threshold {found.min_relevance:.2f}"
        + (f", best match {best:.2f}" if best is not None else "") + ")."
    )  # fmt: skip
    if not found.closest:
        return text + " Nothing is indexed yet."
    closest = "\n".join(f"- {_one_line(where(h))} ({h.similarity:.2f})" for h in found.closest[:3])
    return f"{text}\n\nThe closest passages:\n{closest}"


def passages_field(hits: Sequence[Hit], cited: Sequence[int] = ()) -> list[dict[str, Any]]:
    """The passages as the ``rag`` field lists them, numbered as the model saw them."""
    return [
        {"n": n, "source": h.chunk.source, "page": h.chunk.page, "headings": list(h.chunk.headings),
         "text": h.chunk.text, "table_header": h.chunk.table_header or None, "excerpt": h.excerpt,
         "score": round(float(h.similarity), 4), "cited": n in cited}
        for n, h in enumerate(hits, start=1)
    ]  # fmt: skip


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _finish_reason(reason: str | None) -> str:
    """OpenAI's finish reason for ours (``repetition``: we stopped a loop; it ended: ``stop``)."""
    return "length" if reason == "length" else "stop"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# --- Errors ---------------------------------------------------------------------------------


def api_error(exc: RagError) -> APIError:
    """Our error as the API answers it: a status and OpenAI's error shape; the message is ours
    (it says what to do)."""
    message = str(exc)
    if isinstance(exc, ContextLengthError):
        return APIError(400, message, param="messages", code="context_length_exceeded")
    if isinstance(exc, UnknownModelError):
        return APIError(404, message, param="model", code="model_not_found")
    if isinstance(exc, PolicyError):
        return APIError(403, message, type_="permission_error", code="refused_by_policy")
    if isinstance(exc, EndpointTimeoutError):
        return APIError(504, message, type_="server_error", code="model_timeout")
    if isinstance(exc, EndpointUnreachableError | ModelBuildError):
        return APIError(503, message, type_="server_error", code="model_unavailable")
    if isinstance(exc, EndpointError):
        return APIError(502, message, type_="server_error", code="model_failed")
    if isinstance(exc, IndexError_):
        return APIError(503, message, type_="server_error", code="index_unavailable")
    if isinstance(exc, ConfigError):
        return APIError(500, message, type_="server_error", code="configuration_error")
    return APIError(500, message, type_="server_error")


# --- Keys -----------------------------------------------------------------------------------


def needs_key(host: str) -> bool:
    """Whether a server bound to ``host`` must check an API key: any address but loopback.

    >>> needs_key("127.0.0.1"), needs_key("localhost"), needs_key("0.0.0.0")
    (False, False, True)
    """
    return not is_loopback(host)


def key_policy(host: str, key: str, *, setting: str = "RAG_API_KEY") -> str:
    """The key a server on ``host`` checks ('' for none); ``ConfigError`` when it would listen
    beyond this machine without one."""
    if not needs_key(host):
        return ""
    if not key:
        raise ConfigError(
            f"refusing to serve the API on {host} without a key: anyone who can reach this address could "
            f"read your documents through it. Set {setting} (clients send it as `Authorization: Bearer …`), "
            "or listen on 127.0.0.1"
        )
    return key


def check_key(authorization: str | None, key: str) -> APIError | None:
    """None when the request may pass: no key is needed, or its bearer token is the key
    (compared in constant time).

    >>> check_key(None, ""), check_key("Bearer s3cret", "s3cret"), check_key("Bearer x", "s3cret").status
    (None, None, 401)
    """
    if not key:
        return None
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
        return None
    return APIError(401, "Incorrect or missing API key: send it as `Authorization: Bearer <key>`.",
                    code="invalid_api_key")  # fmt: skip


# --- Replies --------------------------------------------------------------------------------


@dataclass
class Reply:
    """What a server sends back: ``body`` as JSON with ``status``, or ``chunks`` as a stream
    (status 200; ``sse()`` frames them). Close it (``aclose``) when the client leaves."""

    status: int
    body: dict[str, Any] | None = None
    chunks: AsyncGenerator[dict[str, Any], None] | None = None

    @classmethod
    def error(cls, error: APIError) -> Reply:
        return cls(error.status, error.body())

    async def sse(self) -> AsyncGenerator[bytes, None]:
        """The stream's server-sent events, ``data: [DONE]`` last; an error event ends it early."""
        assert self.chunks is not None
        async for chunk in self.chunks:
            yield encode_event(chunk)
            if "error" in chunk:
                return
        yield DONE_EVENT

    async def aclose(self) -> None:
        if self.chunks is not None:
            await self.chunks.aclose()


class Library(Protocol):
    """What a request needs of ``rag.library.Library``: the live index and the embedder."""

    live: LiveIndex
    embedder: Embedder
    count: TokenCounter
    ready: asyncio.Event
    startup_error: BaseException | None

    async def ensure_index(self, *, origin: str | None = None) -> Snapshot: ...


class DocumentModels:
    """The ``rag:`` models over one library and one router.

    ``plain_models`` lists the models that can answer (default: those of the endpoint the
    router asks first); ``router`` makes (or returns) the router, so that a broken
    endpoints file is reported to the request that needs it.
    """

    def __init__(
        self,
        settings: Settings,
        library: Library,
        router: Callable[[], Router],
        *,
        plain_models: Callable[[], Awaitable[Sequence[str]]] | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.library = library
        self.router = router
        self._plain_models = plain_models or self._primary_models
        self.ready_timeout = ready_timeout

    async def _primary_models(self) -> Sequence[str]:
        return (await self.router().primary(self.settings.policy)).models

    async def models(self) -> dict[str, str]:
        """rag id -> plain id; raises ``RagError`` when no endpoint can be opened."""
        return retrieval_models(await self._plain_models())

    async def cards(self) -> list[dict[str, Any]]:
        """The model list's entries; none when no endpoint answers (the list stays valid)."""
        try:
            models = await self.models()
        except RagError:
            return []
        return [model_card(rag_id, plain) for rag_id, plain in models.items()]

    async def respond(self, data: Mapping[str, Any]) -> Reply:
        """Answer one decoded ``/v1/chat/completions`` body for a ``rag:`` model. Never raises
        a ``RagError`` or ``APIError``: they become error replies."""
        try:
            request = parse_request(data, await self.models())
        except APIError as exc:
            return Reply.error(exc)
        except RagError as exc:
            return Reply.error(api_error(exc))
        try:
            await self._wait_until_indexed()
        except RagError as exc:
            return Reply.error(api_error(exc))
        options = dataclasses.replace(
            AskOptions.from_settings(self.settings, model=request.answerer),
            temperature=self.settings.temperature if request.temperature is None else request.temperature,
        )
        max_tokens = request.max_tokens or self.settings.max_answer_tokens
        events = ask(request.question, request.history, index=self.library.live, embedder=self.library.embedder,
                     router=self.router(), options=options, count=self.library.count,
                     max_answer_tokens=max_tokens)  # fmt: skip
        found: Retrieval | None = None
        started = time.perf_counter()
        try:
            while True:
                event = await anext(events)
                if isinstance(event, Retrieved):
                    found = event.retrieval
                    if not found.relevant:
                        await events.aclose()
                        return self._gated(request, found)
                elif isinstance(event, Started):
                    break
        except RagError as exc:
            await events.aclose()
            return Reply.error(api_error(exc))
        except BaseException:
            await events.aclose()
            raise
        assert found is not None
        answer = event.answer
        if request.stream:
            return Reply(200, chunks=self._streamed(request, found, answer, events, max_tokens, started))
        return await self._whole(request, found, answer, events, max_tokens, started)

    async def _wait_until_indexed(self) -> None:
        library = self.library
        if not library.ready.is_set():
            try:
                await asyncio.wait_for(library.ready.wait(), self.ready_timeout)
            except TimeoutError:
                raise IndexError_(
                    f"the embedding model is still loading after {self.ready_timeout:.0f} s: try again shortly"
                ) from None
        if library.startup_error is not None:
            error = library.startup_error
            raise error if isinstance(error, RagError) else RagError(f"the documents could not be loaded: {error}")
        await library.ensure_index()

    # -- the replies --

    def _extra(self, found: Retrieval, answer: Answer | None, cited: Sequence[int]) -> dict[str, Any]:
        route = answer.route if answer is not None else None
        finish = answer.done.finish_reason if answer is not None and answer.done is not None else None
        return {
            "model": (route.model if route else answer.model) if answer is not None else None,
            "question": found.question,
            "relevant": found.relevant,
            "min_relevance": found.min_relevance,
            "cited": list(cited),
            "passages": passages_field(answer.hits if answer is not None else found.closest, cited),
            "finish_reason": finish if answer is not None else None,
            "fallback": route.fallback if route else "",
        }

    def _log(self, request: DocumentRequest, answer: Answer, cited: Sequence[int], started: float) -> None:
        route = answer.route.describe() if answer.route is not None else answer.model
        log.info("%s: answered by %s from %s, citing %s, in %.1f s", request.model, route, plural(len(answer.hits), "passage"),
                 cited or "none", time.perf_counter() - started)  # fmt: skip

    def _answer_usage(self, answer: Answer) -> dict[str, int]:
        said = (answer.done.usage if answer.done is not None else None) or {}
        count = self.library.count
        prompt = said.get("prompt_tokens")
        completion = said.get("completion_tokens")
        if prompt is None:
            prompt = sum(count(m.content) for m in answer.messages)
        if completion is None:
            completion = count(answer.text) if answer.text else 0
        return _usage(prompt, completion)

    def _gated(self, request: DocumentRequest, found: Retrieval) -> Reply:
        text = gate_text(found)
        log.info("%s: no passage reaches %.2f, answered without the model", request.model, found.min_relevance)
        usage = _usage(self.library.count(request.question), self.library.count(text))
        extra = self._extra(found, None, ())
        if not request.stream:
            return Reply(200, _completion(request.model, text, "stop", usage, extra))

        async def chunks() -> AsyncGenerator[dict[str, Any], None]:
            head = envelope("chat.completion.chunk", request.model)
            yield _chunk(head, request, {"role": "assistant", "content": ""})
            yield _chunk(head, request, {"content": text})
            yield {**_chunk(head, request, {}, "stop"), "rag": extra}
            if request.include_usage:
                yield {**head, "choices": [], "usage": usage}

        return Reply(200, chunks=chunks())

    async def _whole(self, request: DocumentRequest, found: Retrieval, answer: Answer,
                     events: AsyncGenerator[Any, None], max_tokens: int, started: float) -> Reply:  # fmt: skip
        try:
            async for _event in events:
                pass
        except RagError as exc:
            return Reply.error(api_error(exc))
        finally:
            await events.aclose()
        shown = present(answer, found.question)
        closing = closing_text(answer, shown.cited, max_tokens=max_tokens, empty=not shown.text)
        text = "\n\n".join(p for p in (shown.text, closing) if p)
        finish = _finish_reason(answer.done.finish_reason if answer.done else None)
        extra = self._extra(found, answer, shown.cited)
        self._log(request, answer, shown.cited, started)
        return Reply(200, _completion(request.model, text, finish, self._answer_usage(answer), extra))

    async def _streamed(self, request: DocumentRequest, found: Retrieval, answer: Answer, events: AsyncGenerator[Any, None],
                        max_tokens: int, started: float) -> AsyncGenerator[dict[str, Any], None]:  # fmt: skip
        head = envelope("chat.completion.chunk", request.model)
        splitter = CitationSplitter()
        sent = False
        try:
            yield _chunk(head, request, {"role": "assistant", "content": ""})
            try:
                async for event in events:
                    if isinstance(event, ChatDelta):
                        text = splitter.feed(event.text)
                        if text:
                            sent = True
                            yield _chunk(head, request, {"content": text})
            except RagError as exc:
                yield api_error(exc).body()
                return
            shown = present(answer, found.question)
            rest = splitter.flush() + shown.added  # a citation found afterwards, or a bare [1] explained
            closing = closing_text(answer, shown.cited, max_tokens=max_tokens, empty=not (sent or rest))
            tail = "\n\n".join(p for p in (rest, closing) if p)
            if tail:
                yield _chunk(head, request, {"content": ("\n\n" if sent and not rest else "") + tail})
            finish = _finish_reason(answer.done.finish_reason if answer.done else None)
            self._log(request, answer, shown.cited, started)
            yield {**_chunk(head, request, {}, finish), "rag": self._extra(found, answer, shown.cited)}
            if request.include_usage:
                yield {**head, "choices": [], "usage": self._answer_usage(answer)}
        finally:
            await events.aclose()


def _chunk(head: dict[str, Any], request: DocumentRequest, delta: dict[str, str],
           finish_reason: str | None = None) -> dict[str, Any]:  # fmt: skip
    chunk = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return {**chunk, "usage": None} if request.include_usage else chunk


def _completion(model: str, text: str, finish_reason: str, usage: dict[str, int],
                extra: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    return {
        **envelope("chat.completion", model),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": usage,
        "rag": extra,
    }
