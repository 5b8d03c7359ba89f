"""The app's own OpenAI-compatible API: the ``rag:`` models (``rag.api``) as a small ASGI app,
served by uvicorn on the app's event loop, on its own port (``RAG_API_PORT``, 8001).

Routes::

    GET  /health                 {"status": "ok"}
    GET  /v1/models              the rag:<model> models (the bare models stay behind the app)
    GET  /v1/models/<id>
    POST /v1/chat/completions    stream (SSE, ``data: [DONE]``) or one JSON answer

Trade-offs:

- In the app's process, with the app's library and router: no second embedding model or
  index in memory, the same watched folder (a dropped-in file is answerable at once), the same
  routing policy and fallback as the chat. Its requests and the chat's share one event loop;
  the work they wait for (embedding a question, the model) runs elsewhere.
- Its own port, never a route on Chainlit's server (Chainlit's catch-all page would shadow it,
  and its sign-in would not apply to API clients). Raw ASGI, not a framework: five routes.
- The socket is bound before uvicorn starts, so a taken port is a logged warning and the chat
  runs on without the API, instead of uvicorn's ``sys.exit`` inside the app's loop. uvicorn's
  signal handling is left to the app's own server (``_Server``), and its logging configuration
  is not touched.
- A client that goes away cancels its answer (the model's stream is closed with it), whether
  it was waiting for the first token, reading a stream, or waiting for a whole answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import uvicorn

from rag.api import (
    MAX_BODY_BYTES,
    DocumentModels,
    Library,
    Reply,
    check_key,
    key_policy,
)
from rag.config import Settings
from rag.errors import ConfigError
from rag.protocol import APIError, decode_body
from rag.routing import Router

log = logging.getLogger("rag.asgi")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before its reply was complete."""


class APIApp:
    """The ASGI application: ``APIApp(models, api_key=…)``; ``api_key`` '' checks none."""

    def __init__(self, models: DocumentModels, *, api_key: str = "") -> None:
        self.models = models
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self._route(scope, receive, tracked)
        except ClientGone:
            log.info("API client left before its reply was complete")
        except Exception:
            log.exception("API request %s %s failed", scope.get("method"), scope.get("path"))
            if not started:
                error = APIError(500, "The server failed on this request; the details are in its log.",
                                 type_="server_error")  # fmt: skip
                with contextlib.suppress(Exception):
                    await _json(send, error.status, error.body())

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"].rstrip("/")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if path == "/health":
            await _json(send, 200, {"status": "ok"})
            return
        refused = check_key(headers.get("authorization"), self.api_key)
        if refused is not None:
            await _error(send, refused)
            return
        routes = {"/v1/models": ("GET",), "/v1/chat/completions": ("POST",)}
        allowed = routes.get(path, ("GET",) if path.startswith("/v1/models/") else None)
        if allowed is None:
            await _error(send, APIError(404, f"Unknown route {method} {path or '/'}", code="not_found"))
        elif method not in allowed:
            await _error(send, APIError(405, f"Method {method} not allowed on {path}", code="method_not_allowed"))
        elif path == "/v1/models":
            await _json(send, 200, {"object": "list", "data": await self.models.cards()})
        elif path.startswith("/v1/models/"):
            wanted = path[len("/v1/models/") :]
            card = next((c for c in await self.models.cards() if c["id"] == wanted), None)
            if card is None:
                await _error(send, APIError(404, f"The model '{wanted}' does not exist", param="model",
                                            code="model_not_found"))  # fmt: skip
            else:
                await _json(send, 200, card)
        else:
            await self._complete(headers, receive, send)

    async def _complete(self, headers: dict[str, str], receive: Receive, send: Send) -> None:
        try:
            data = decode_body(await read_body(receive, headers))
        except APIError as exc:
            await _error(send, exc)
            return
        gone = asyncio.ensure_future(_disconnected(receive))
        reply: Reply | None = None
        try:
            reply = await _unless_gone(self.models.respond(data), gone)
            if reply.chunks is None:
                await _json(send, reply.status, reply.body or {})
                return
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})  # fmt: skip
            events = reply.sse()
            try:
                while (event := await _unless_gone(_next(events), gone)) is not None:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            finally:
                await events.aclose()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
            if reply is not None:
                await reply.aclose()


async def read_body(receive: Receive, headers: dict[str, str], *, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request's body, refused (413) past ``limit`` bytes, whether it says its length or not."""
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise APIError(400, f"Invalid Content-Length: {declared!r}.", code="invalid_content_length")
        if int(declared) > limit:
            raise APIError(413, f"The body is {declared} bytes; this server accepts at most {limit}.",
                           code="request_too_large")  # fmt: skip
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise APIError(413, f"The body is larger than {limit} bytes, the most this server accepts.",
                           code="request_too_large")  # fmt: skip
        parts.append(part)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _next(events: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the body was read already: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(awaitable: Awaitable[T], gone: asyncio.Future[None]) -> T:
    """``awaitable``'s result; cancelled, and ``ClientGone`` raised, when ``gone`` finishes first."""
    task = asyncio.ensure_future(awaitable)
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone()


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": payload})


async def _error(send: Send, error: APIError) -> None:
    await _json(send, error.status, error.body())


# --- Serving it on the app's loop -----------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the process's own server (Chainlit's) owns them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class APIServer:
    """The API listening on ``url``; ``stop()`` ends it (open streams get a few seconds)."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], url: str) -> None:
        self.server = server
        self.task = task
        self.url = url

    async def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except TimeoutError:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (IPv4 or IPv6), not yet listening; ``OSError`` if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def serve_app(app: Any, sock: socket.socket, *, started_within: float = 10.0) -> APIServer:
    """Serve the ASGI ``app`` on ``sock`` as a task of the running loop; returns once it listens."""
    config = uvicorn.Config(app, lifespan="off", log_config=None, log_level=None, access_log=False,
                            timeout_graceful_shutdown=3)  # fmt: skip
    server = _Server(config)

    async def run() -> None:
        try:
            await server.serve(sockets=[sock])
        except SystemExit:  # uvicorn's way of failing to start: never out of the app's loop
            log.error("the API server could not start")
        finally:
            sock.close()

    task = asyncio.create_task(run(), name="rag-api")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + started_within
    while not server.started and not task.done() and loop.time() < deadline:
        await asyncio.sleep(0.02)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return APIServer(server, task, f"http://{shown}:{port}/v1")


async def start_api(settings: Settings, library: Library, router: Callable[[], Router]) -> APIServer | None:
    """The app's API on ``RAG_API_HOST:RAG_API_PORT`` with the app's ``library`` and router;
    None (and a log line saying why) when ``RAG_API_PORT`` is 0, the port is taken, or the
    address is not loopback and ``RAG_API_KEY`` is not set."""
    host, port = settings.api_host, settings.api_port
    if not port:
        log.info("no OpenAI-compatible API (RAG_API_PORT=0)")
        return None
    try:
        key = key_policy(host, str(settings.api_key))
        sock = bind(host, port)
    except ConfigError as exc:
        log.error("no OpenAI-compatible API: %s", exc)
        return None
    except OSError as exc:
        log.warning("no OpenAI-compatible API: cannot listen on %s:%d (%s); set RAG_API_PORT to a free port, "
                    "or 0 for none", host, port, exc.strerror or exc)  # fmt: skip
        return None
    app = APIApp(DocumentModels(settings, library, router), api_key=key)
    api = await serve_app(app, sock)
    log.info("OpenAI-compatible API on %s (models rag:<model>; %s)", api.url,
             "clients send RAG_API_KEY as a bearer token" if key else "no key needed on loopback")  # fmt: skip
    return api
