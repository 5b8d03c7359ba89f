"""``python -m rag serve``: the embedded Foundry Local runtime behind an OpenAI-compatible API.

Routes (loopback only by default)::

    GET  /health                 {"status": "ok", "models": [...], "queued": n}
    GET  /v1/models              OpenAI list shape: the bare models, then rag:<model> for each
    POST /v1/chat/completions    stream (SSE, ``data: [DONE]``) or one JSON answer

So the app talks to this server exactly as it talks to a Foundry Local service or any other
OpenAI-compatible endpoint: one client, one code path. ``rag:<model>`` answers from the data
directory's documents (``rag.api``; ``Documents``): a library over its index, watched, on an
event loop of its own, whose router asks this same server's bare model over HTTP. That request
waits in line for the generation lock like any other; the ``rag:`` request holds no lock, so
neither waits for the other. ``--no-documents`` (what the app's launcher starts) serves the
bare models only.

Safety: off loopback every route but ``/health`` wants ``RAG_API_KEY`` as a bearer token
(compared in constant time), and without one the server refuses to start. Bodies are limited
(``rag.api.MAX_BODY_BYTES``, and a ``Content-Length`` is required); anything malformed, even
a request line the standard library refuses, gets an OpenAI-shaped error, and an unexpected
failure a 500 whose details stay in the log. A request without ``temperature`` or
``max_tokens`` gets ``RAG_TEMPERATURE`` and ``RAG_MAX_ANSWER_TOKENS``: the runtime's own
defaults sample up to the whole context window.

Trade-offs:

- Standard library ``ThreadingHTTPServer``: no new dependency, and a few local clients is
  all it must serve. A thread per connection; generations are serialised through a FIFO
  lock (the runtime runs one at a time), so queued clients wait and no two streams
  interleave. A waiting streamed request gets its stream's head at once and a ``: queued N``
  comment each time its place changes (``: queued 0`` when its turn comes; nothing at all
  when it did not have to wait): the chat shows "2 questions ahead of yours", and the client
  restarts its first-token clock whenever the line moves (``rag.chat``). A client that leaves
  while waiting gives its place up (noticed within 0.25 s, or when a notice cannot be sent).
- A client that goes away stops its generation: checked while it waits, between tokens, and
  every 0.25 s while a non-streamed answer is generated.
- Streams follow OpenAI's shape, without the quirks Foundry Local's service has shipped:
  every stream ends with a chunk carrying ``finish_reason``, a usage chunk only when
  ``stream_options.include_usage`` asks for it, then ``data: [DONE]``.
- The prompt is measured (the SDK's preflight) before any byte is sent, so a too-long
  prompt gets a proper 400 ``context_length_exceeded`` instead of a broken stream.
- Tokens that arrive together are sent together: after each write the stream gathers for
  ``RAG_SERVE_FLUSH_MS`` (25 ms) before the next one; the first token goes out at once. At the
  small models' 60-100 tokens/s that halves the writes, and with them the wake-ups of the reader,
  whose CPU time on a small machine comes out of the model's (docs/benchmarks.md). 0 sends
  one event per token.
- ``<data_dir>/serve.json`` (pid, url, models) lets other processes find and reuse a
  running server instead of loading the model a second time (``rag.launcher``).
- The wire format (request validation, errors, events) is ``rag.protocol``, shared with the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import queue
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rag.api import (
    MAX_BODY_BYTES,
    DocumentModels,
    Reply,
    check_key,
    is_retrieval_model,
    key_policy,
    retrieval_models,
)
from rag.config import Settings
from rag.embedding import Embedder
from rag.endpoints import DEFAULT_NAME, EndpointsConfig, EndpointSpec
from rag.errors import (
    ContextLengthError,
    EndpointError,
    ModelBuildError,
    RagError,
    UnknownModelError,
)
from rag.launcher import (
    DEFAULT_HOST,
    find_running,
    remove_state,
    state_path,
    write_state,
)
from rag.library import Library
from rag.modelbuild import DEFAULT_MODEL, is_built
from rag.protocol import (
    DONE_EVENT,
    APIError,
    ChatRequest,
    chat_request,
    decode_body,
    encode_event,
    encode_queue_notice,
    envelope,
)
from rag.routing import Router
from rag.runtime import ChatRuntime, ChatStream

log = logging.getLogger("rag.server")

OWNED_BY = "rag (Foundry Local runtime)"


# -- serialising generations ------------------------------------------------------------------


class FairLock:
    """A FIFO lock whose waiters can give up (a client that disconnected while queued) and are
    told their place in line as it changes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._abandoned: set[int] = set()

    @property
    def queued(self) -> int:
        with self._cond:
            return self._next_ticket - self._serving - len(self._abandoned)

    def acquire(
        self,
        *,
        give_up: Callable[[], bool] = lambda: False,
        on_wait: Callable[[int], None] | None = None,
        poll: float = 0.25,
    ) -> bool:
        """Wait for our turn (True), or give up (False) when ``give_up()`` says so.

        ``on_wait(ahead)`` is called, outside the lock, whenever the number of holders and
        waiters ahead of us changes (first when we have to wait at all); if it raises, our
        place is given up and the exception raised."""
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
        told = None
        while True:
            with self._cond:
                if ticket == self._serving:
                    return True
                ahead = ticket - self._serving - sum(1 for t in self._abandoned if t < ticket)
            if on_wait is not None and ahead != told:
                try:
                    on_wait(ahead)
                except BaseException:
                    self._abandon(ticket)
                    raise
                told = ahead
            with self._cond:
                if ticket != self._serving:
                    self._cond.wait(poll)
                if ticket != self._serving and give_up():
                    self._abandon(ticket)
                    return False

    def _abandon(self, ticket: int) -> None:
        with self._cond:
            if ticket == self._serving:  # our turn came meanwhile: pass it on
                self._next_turn()
            else:
                self._abandoned.add(ticket)
                self._cond.notify_all()  # those behind move up

    def release(self) -> None:
        with self._cond:
            self._next_turn()

    def _next_turn(self) -> None:
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()


# -- HTTP ------------------------------------------------------------------------------------------


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


def coalesce(pieces: Iterator[str], interval: float) -> Iterator[str]:
    """The text of ``pieces``, with the pieces that arrive within ``interval`` seconds of the last
    write joined into one.

    The first piece comes out as soon as it exists; after each one, pieces gather for
    ``interval`` (less when the stream ends), so no piece waits longer than that. ``pieces`` is
    read by a worker thread; closing this generator stops reading after the piece in hand
    and waits for the worker, so the caller may then close ``pieces`` itself. An error raised
    by ``pieces`` is raised here, after the text that came before it.

    >>> list(coalesce(iter(["a", "b", "c"]), 0.0))
    ['a', 'b', 'c']
    """
    if interval <= 0:
        yield from pieces
        return
    ready: queue.SimpleQueue[object] = queue.SimpleQueue()
    finished, stop = threading.Event(), threading.Event()

    def read() -> None:
        try:
            for piece in pieces:
                ready.put(piece)
                if stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            ready.put(_Failed(exc))
        finally:
            ready.put(_END)
            finished.set()

    worker = threading.Thread(target=read, name="rag-serve-tokens", daemon=True)
    worker.start()
    try:
        while True:
            batch = [ready.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(ready.get_nowait())
            text = "".join(p for p in batch if isinstance(p, str))
            if text:
                yield text
            for item in batch:
                if isinstance(item, _Failed):
                    raise item.error
                if item is _END:
                    return
            finished.wait(interval)
    finally:
        stop.set()
        worker.join()


class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        runtime: ChatRuntime,
        *,
        flush_interval: float = 0.025,
        temperature: float | None = None,
        max_tokens: int | None = None,
        api_key: str = "",
    ) -> None:
        super().__init__(address, ChatHandler)
        self.runtime = runtime
        self.generation_lock = FairLock()
        self.flush_interval = flush_interval
        # What a request that names neither gets (RAG_TEMPERATURE, RAG_MAX_ANSWER_TOKENS); None:
        # the runtime's own, which samples at temperature 1.0 up to the context window.
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.api_key = api_key  # '' on loopback: no key is checked
        self.documents: Documents | None = None  # the rag: models (rag.api), when served

    def with_defaults(self, request: ChatRequest) -> ChatRequest:
        """``request`` with this server's temperature and answer length where it named none."""
        return dataclasses.replace(
            request,
            temperature=self.temperature if request.temperature is None else request.temperature,
            max_tokens=request.max_tokens or self.max_tokens,
        )

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def _peer_closed(sock: socket.socket) -> bool:
    """True when the client has closed its end (readable with nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class ChatHandler(BaseHTTPRequestHandler):
    server: OpenAIServer
    protocol_version = "HTTP/1.1"
    timeout = 300  # a client that stops reading for this long is dropped (its generation stops)
    # TCP_NODELAY: on a kept-alive connection, a stream's first event would otherwise wait for the
    # client's delayed ACK of the headers (Nagle): ~30-40 ms added to the first token.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("%s " + format, self.client_address[0], *args)

    # every request

    def handle_one_request(self) -> None:
        """One request; an unexpected failure answers a 500 in OpenAI's shape (the traceback
        goes to the log, never to the client)."""
        self._responded = False
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            log.exception("request %r failed", getattr(self, "requestline", ""))
            self.close_connection = True
            if not self._responded:
                with contextlib.suppress(OSError):
                    self._error(APIError(500, "The server failed on this request; the details are in its log.",
                                         type_="server_error"))  # fmt: skip

    def send_response(self, code: int, message: str | None = None) -> None:
        self._responded = True
        super().send_response(code, message)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (a malformed request line, headers too long, an
        unknown method) in OpenAI's shape instead of an HTML page."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # not parsed: answer as HTTP/1.1 all the same
            self.request_version = "HTTP/1.1"
        status = HTTPStatus(code)
        text = message or status.phrase
        error = APIError(code, f"{text}." if not text.endswith(".") else text,
                         type_="server_error" if code >= 500 else "invalid_request_error",
                         code=status.phrase.lower().replace(" ", "_"))  # fmt: skip
        with contextlib.suppress(OSError):
            self._error(error)

    def _authorized(self) -> bool:
        """Whether the request may pass (off loopback: it carries the key); else answers 401."""
        refused = check_key(self.headers.get("Authorization"), self.server.api_key)
        if refused is None:
            return True
        if self.command == "POST":  # read it: closing on an unread body resets the connection,
            self._discard_body()  # and the client would never see this answer
        self._error(refused)
        return False

    # routes

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = urlsplit(self.path).path.rstrip("/")
        runtime = self.server.runtime
        if path != "/health" and not self._authorized():
            return
        if path == "/health":
            self._json(200, {"status": "ok", "models": runtime.models(), "queued": self.server.generation_lock.queued})
        elif path == "/v1/models":
            self._json(200, {"object": "list", "data": self._model_cards()})
        elif path.startswith("/v1/models/") and (card := self._find_card(path[len("/v1/models/") :])):
            self._json(200, card)
        else:
            self._error(APIError(404, f"Unknown route GET {path or '/'}", code="not_found"))

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        path = urlsplit(self.path).path.rstrip("/")
        if path != "/v1/chat/completions":
            self._discard_body()
            self._error(APIError(404, f"Unknown route POST {path}", code="not_found"))
            return
        if not self._authorized():
            return
        try:
            data = decode_body(self._read_body())
            if self.server.documents is not None and is_retrieval_model(str(data.get("model") or "")):
                self._documents(self.server.documents, data)
                return
            request = self.server.with_defaults(chat_request(data, self.server.runtime.models()))
        except APIError as exc:
            self._error(exc)
            return
        self._queue_told = False
        try:  # a streamed request is told its place in line while it waits (rag.protocol)
            acquired = self.server.generation_lock.acquire(
                give_up=lambda: _peer_closed(self.connection), on_wait=self._tell_queue if request.stream else None
            )
        except OSError:  # it left as we told it
            acquired = False
        if not acquired:
            log.info("client %s left while queued", self.client_address[0])
            self.close_connection = True
            return
        try:
            if self._queue_told:
                self._tell_queue(0)  # its turn
            self._complete(request, opened=self._queue_told)
        except OSError as exc:
            log.info("client %s went away as its turn came (%s)", self.client_address[0], exc)
            self.close_connection = True
        finally:
            self.server.generation_lock.release()

    def do_DELETE(self) -> None:  # noqa: N802
        self._error(APIError(405, "Method not allowed", code="method_not_allowed"))

    do_PUT = do_PATCH = do_DELETE  # noqa: N815

    # chat

    def _complete(self, request: ChatRequest, *, opened: bool = False) -> None:
        """Answer ``request``; ``opened``: its stream's head was sent already (it was queued),
        so an error goes out as an error event, as it would mid-stream."""
        try:
            stream = self.server.runtime.stream_chat(
                request.model, request.messages, max_tokens=request.max_tokens, temperature=request.temperature
            )
        except ContextLengthError as exc:
            self._refuse(APIError(400, str(exc), param="messages", code="context_length_exceeded"), opened)
            return
        except UnknownModelError as exc:
            self._refuse(APIError(404, str(exc), param="model", code="model_not_found"), opened)
            return
        except RagError as exc:
            self._refuse(APIError(500, str(exc), type_="server_error"), opened)
            return
        with stream:
            if request.stream:
                self._stream(request, stream, opened=opened)
            else:
                self._answer(request, stream)

    def _refuse(self, error: APIError, opened: bool) -> None:
        if opened:
            self._event(error.body())
        else:
            self._error(error)

    def _tell_queue(self, ahead: int) -> None:
        """Tell a waiting streamed request how many are ahead (its stream's head goes out first)."""
        if not self._queue_told:
            self._open_stream()
            self._queue_told = True
        self.wfile.write(encode_queue_notice(ahead))

    def _answer(self, request: ChatRequest, stream: ChatStream) -> None:
        started = time.perf_counter()
        pieces: list[str] = []
        checked = started
        try:
            for piece in stream:
                pieces.append(piece)
                if time.perf_counter() - checked > 0.25:  # a client that left frees the model
                    checked = time.perf_counter()
                    if _peer_closed(self.connection):
                        log.info("client %s went away before its answer: generation stopped", self.client_address[0])
                        self.close_connection = True
                        return
        except RagError as exc:
            self._error(APIError(500, str(exc), type_="server_error"))
            return
        text = "".join(pieces)
        self._log_generation(request, stream, started)
        body = {
            **envelope("chat.completion", request.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": stream.finish_reason or "stop",
                }
            ],
            "usage": _usage(stream),
        }
        self._json(200, body)

    def _open_stream(self) -> None:
        self.close_connection = True  # the stream ends when the connection does
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

    def _stream(self, request: ChatRequest, stream: ChatStream, *, opened: bool = False) -> None:
        head = envelope("chat.completion.chunk", request.model)
        extra = {"usage": None} if request.include_usage else {}

        def chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
            return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}

        if not opened:
            self._open_stream()
        started = time.perf_counter()
        try:
            self._event(chunk({"role": "assistant", "content": ""}))
            pieces = coalesce(stream, self.server.flush_interval)
            try:
                for piece in pieces:
                    self._event(chunk({"content": piece}))
                    if _peer_closed(self.connection):
                        raise ConnectionResetError("client closed the connection")
            finally:
                pieces.close()  # stops its reader before ``stream`` is closed
            self._event(chunk({}, stream.finish_reason or "stop"))
            if request.include_usage:
                self._event({**head, "choices": [], "usage": _usage(stream)})
            self.wfile.write(DONE_EVENT)
            self._log_generation(request, stream, started)
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as exc:
            log.info("client %s went away mid-stream (%s): generation stopped", self.client_address[0], exc)
        except RagError as exc:
            with contextlib.suppress(OSError):
                self._event(APIError(500, str(exc), type_="server_error").body())

    # the retrieval models (rag.api)

    def _documents(self, documents: Documents, data: dict[str, Any]) -> None:
        """Answer a ``rag:`` model's request on the documents' event loop. This thread holds no
        generation lock: the answer's own request to the bare model comes back to this server
        on another connection and waits in line there."""

        def gone() -> bool:
            return _peer_closed(self.connection)

        try:
            reply = documents.call(documents.models.respond(data), give_up=gone)
        except ClientGone:
            log.info("client %s left before its answer started", self.client_address[0])
            self.close_connection = True
            return
        if reply.chunks is None:
            self._json(reply.status, reply.body or {})
            return
        events = reply.sse()
        try:
            self._open_stream()
            while (event := documents.call(_next(events), give_up=gone)) is not None:
                self.wfile.write(event)
        except (ClientGone, BrokenPipeError, ConnectionResetError, TimeoutError) as exc:
            log.info("client %s went away mid-answer (%s): generation stopped", self.client_address[0],
                     type(exc).__name__)  # fmt: skip
        finally:
            documents.call(_close(events, reply))

    def _model_cards(self) -> list[dict[str, Any]]:
        cards = [self._model_card(m) for m in self.server.runtime.models()]
        if self.server.documents is not None:  # after the plain ones: a client's default stays a plain model
            documents = self.server.documents
            cards += documents.call(documents.models.cards())
        return cards

    def _find_card(self, model_id: str) -> dict[str, Any] | None:
        return next((c for c in self._model_cards() if c["id"] == model_id), None)

    # plumbing

    def _event(self, data: dict[str, Any]) -> None:
        self.wfile.write(encode_event(data))

    def _model_card(self, model_id: str) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": 0,
            "owned_by": OWNED_BY,
            "context_length": self.server.runtime.context_length(model_id),
        }

    def _read_body(self) -> bytes:
        """The body, at most ``MAX_BODY_BYTES``; its length must be given (no chunked bodies)."""
        raw = self.headers.get("Content-Length")
        try:
            length = int(raw) if raw is not None else None
        except ValueError:
            length = -1
        if length is None or length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True  # the body is left unread
            if length is None:
                raise APIError(411, "Send the body with a Content-Length header.", code="length_required")
            if length < 0:
                raise APIError(400, f"Invalid Content-Length: {raw!r}.", code="invalid_content_length")
            raise APIError(413, f"The body is {length} bytes; this server accepts at most {MAX_BODY_BYTES}.",
                           code="request_too_large")  # fmt: skip
        return self.rfile.read(length)

    def _discard_body(self) -> None:
        with contextlib.suppress(APIError):
            self._read_body()

    def _json(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:  # so that the client does not send its next request on it
            self.send_header("Connection", "close")
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(payload)

    def _error(self, error: APIError) -> None:
        self._json(error.status, error.body())

    def _log_generation(self, request: ChatRequest, stream: ChatStream, started: float) -> None:
        seconds = time.perf_counter() - started
        usage = _usage(stream)
        log.info(
            "%s: %d prompt + %d completion tokens in %.1f s (%.1f tokens/s)",
            request.model, usage["prompt_tokens"], usage["completion_tokens"], seconds,
            usage["completion_tokens"] / seconds if seconds > 0 else 0.0,
        )  # fmt: skip


def _usage(stream: ChatStream) -> dict[str, int]:
    prompt = stream.usage.prompt_tokens if stream.usage else stream.prompt_tokens
    completion = stream.usage.completion_tokens if stream.usage else stream.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def make_server(
    runtime: ChatRuntime,
    host: str = DEFAULT_HOST,
    port: int = 0,
    *,
    flush_ms: float = 25.0,
    temperature: float | None = None,
    max_tokens: int | None = None,
    api_key: str = "",
) -> OpenAIServer:
    """Bind (``port=0``: any free port) without serving yet; call ``serve_forever()``.

    ``flush_ms``: how long streamed tokens gather between writes (0: one event per token).
    ``temperature``, ``max_tokens``: for requests that name neither. ``api_key``: required as
    a bearer token on every route but ``/health`` ('': none)."""
    return OpenAIServer((host, port), runtime, flush_interval=flush_ms / 1000, temperature=temperature,
                        max_tokens=max_tokens, api_key=api_key)  # fmt: skip


# -- the retrieval models ------------------------------------------------------------------------


class ClientGone(Exception):
    """The client closed its connection while its request was being answered."""


async def _next(events: Any) -> bytes | None:
    try:
        return bytes(await anext(events))
    except StopAsyncIteration:
        return None


async def _close(events: Any, reply: Reply) -> None:
    await events.aclose()
    await reply.aclose()


class Documents:
    """The ``rag:`` models inside ``rag serve``: a library over the data directory's index
    (watched: a file dropped into the corpus folder is answerable without a restart) and a
    router whose one endpoint is this same server's bare models, on an event loop of their own
    (the HTTP server is threaded; ``call`` runs a coroutine there from a handler thread)."""

    def __init__(self, settings: Settings, server: OpenAIServer, *, embedder: Embedder | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rag-serve-documents", daemon=True)
        self._thread.start()
        own = settings.replace(base_url=own_url(server), model="")
        spec = EndpointSpec(DEFAULT_NAME, own.base_url, local=True, discovered=True)

        async def start() -> tuple[Library, Router]:
            library = Library(settings, embedder)
            library.start()
            return library, Router(own, EndpointsConfig((spec,)))

        self.library, self.router = self.call(start())
        runtime = server.runtime

        async def plain_models() -> list[str]:
            return runtime.models()

        self.models = DocumentModels(settings, self.library, lambda: self.router, plain_models=plain_models)

    def call(self, coro: Any, *, give_up: Callable[[], bool] = lambda: False, poll: float = 0.25) -> Any:
        """Run ``coro`` on the documents' loop and return its result; when ``give_up()`` turns
        true while waiting, cancel it and raise ``ClientGone``."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        while True:
            try:
                return future.result(poll)
            except TimeoutError:
                if give_up():
                    future.cancel()
                    raise ClientGone() from None

    def close(self) -> None:
        async def stop() -> None:
            await self.library.close()
            await self.router.aclose()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        try:
            self.call(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()


def own_url(server: OpenAIServer) -> str:
    """Where this server reaches itself: its address, or loopback when it listens on all."""
    host, port = server.server_address[:2]
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/v1"


# -- process lifecycle ---------------------------------------------------------------------------


def default_model_sources(settings: Settings) -> list[str]:
    """What to load when no model directory is named: every built model, the one named by
    ``RAG_MODEL`` (or the default offline model) first; or ``RAG_MODEL`` as a Foundry catalog
    alias when no such model is built."""
    name = settings.model or DEFAULT_MODEL
    built = sorted(d for d in settings.models_dir.glob("*") if is_built(d)) if settings.models_dir.is_dir() else []
    first = settings.models_dir / name
    if is_built(first):
        return [str(first)] + [str(d) for d in built if d != first]
    if settings.model:
        return [settings.model]  # a catalog alias: needs the internet the first time
    raise ModelBuildError(
        f"no chat model in {settings.models_dir / name}: build it with `python -m rag model build` "
        "(or `make model`)"
    )


def serve(
    settings: Settings,
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    model_dirs: Sequence[Path | str] | None = None,
    runtime: Any = None,
    ready: Callable[[OpenAIServer], None] | None = None,
    documents: bool = True,
    embedder: Embedder | None = None,
) -> None:
    """Load the models, serve until SIGTERM/SIGINT (or ``server.shutdown()``), then clean up.

    ``model_dirs`` entries are model directories or, when not a directory, catalog aliases.
    ``ready(server)`` is called once it listens (``server.url``, ``server.shutdown``).
    ``documents``: also serve the ``rag:`` models over ``settings``' corpus and index (the app
    starts its server without them: it has its own). Off loopback ``RAG_API_KEY`` is required.
    """
    api_key = key_policy(host, str(settings.api_key))
    running = find_running(settings.data_dir)
    if running:
        raise EndpointError(f"a model server already runs at {running}: use it, or stop it first", url=running)
    sources = [str(d) for d in model_dirs] if model_dirs else default_model_sources(settings)
    owns_runtime = runtime is None
    if runtime is None:
        from rag.runtime import FoundryRuntime

        runtime = FoundryRuntime(settings.data_dir)
    path = state_path(settings.data_dir)
    httpd: OpenAIServer | None = None
    try:
        for source in sources:
            started = time.perf_counter()
            model_id = runtime.load(source) if Path(source).is_dir() else runtime.load_alias(source)
            log.info("loaded %s in %.1f s", model_id, time.perf_counter() - started)
        httpd = make_server(runtime, host, port, flush_ms=settings.serve_flush_ms, temperature=settings.temperature,
                            max_tokens=settings.max_answer_tokens, api_key=api_key)  # fmt: skip
        if documents:
            httpd.documents = Documents(settings, httpd, embedder=embedder)
        write_state(path, {"pid": os.getpid(), "url": httpd.url, "models": runtime.models()})
        if threading.current_thread() is threading.main_thread():
            server = httpd
            signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
        log.info("listening on %s", httpd.url)
        log.info("clients must send RAG_API_KEY as a bearer token" if api_key else "no API key needed on loopback")
        if documents:
            log.info("answering from %s as %s", settings.corpus_dir,
                     ", ".join(rag_id for rag_id in retrieval_models(runtime.models())))  # fmt: skip
        if ready is not None:
            ready(httpd)
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        log.info("interrupted")
    finally:
        remove_state(path)
        if httpd is not None:
            if httpd.documents is not None:
                httpd.documents.close()
            httpd.server_close()
        if owns_runtime:
            runtime.close()
