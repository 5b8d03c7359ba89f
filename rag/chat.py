"""Chat: an async client for an OpenAI-compatible chat-completions endpoint.

Written for Microsoft Foundry Local, whose streams have shipped quirks (a last chunk with
empty ``choices``, no ``finish_reason``, non-standard fields), and which lists only *loaded*
models under ids like ``Phi-4-mini-instruct-generic-cpu:5`` for the alias ``phi-4-mini``.
The wire format itself (events, chunks, errors, model ids) is ``rag.protocol``; this module
owns the HTTP side: connections, clocks, retries.

Trade-offs:

- The server-sent events are parsed by our own ``rag.protocol`` (a few dozen lines), not by a
  library, so that the quirks above are handled in one place we test.
- Three clocks instead of one read timeout: ``connect_timeout`` (httpx), ``first_token_timeout``
  from sending the request to the first delta (a model may load first), and ``idle_timeout``
  between deltas. Keep-alive comments do not reset the clocks: a server that only pings is stuck.
- A busy server that queues the request (``rag serve``: ``: queued N`` comments, see
  ``rag.protocol``) is reported as ``Queued(N)`` events before the first delta. A notice that
  shows the line moved (fewer ahead than the last one said, or our turn) restarts the
  first-token clock: the timeout bounds the wait for progress, so a long queue that keeps
  moving never times out, while one stuck at the same place does, as a silent server would.
- Connection failures are retried only before anything was received; once a delta has been
  yielded a failure is raised, never replayed, so an answer is never shown twice.
- Every failure surfaces as a ``rag.errors`` type whose message names the URL and the fix.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Any, cast

import httpx

from rag.errors import (
    ConfigError,
    ContextLengthError,
    EndpointError,
    EndpointHTTPError,
    EndpointTimeoutError,
    EndpointUnreachableError,
    UnknownModelError,
)
from rag.protocol import (
    EventBuilder,
    LineSplitter,
    StreamState,
    as_object,
    decode_payload,
    error_message,
    is_context_length_message,
    parse_completion,
    pick_model,
    queue_notice,
    request_body,
)
from rag.types import ChatDelta, ChatDone, ChatEvent, Message, Queued

DEFAULT_CONNECT_TIMEOUT = 5.0
# How long an idle connection stays in the pool (httpx's default: 5 s, shorter than most pauses
# between two questions). A server that closed it meanwhile costs nothing: the pool notices
# the closed socket and opens a new one.
KEEPALIVE_EXPIRY = 120.0
DEFAULT_FIRST_TOKEN_TIMEOUT = 120.0
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_CONNECT_RETRIES = 2
DEFAULT_RETRY_BACKOFF = 0.5
START_HINT = (
    "Start Foundry Local (`foundry model run phi-4-mini`, then set RAG_BASE_URL to the URL "
    "`foundry service status` prints) or leave RAG_BASE_URL empty to use the embedded runtime "
    "(`python -m rag serve`)"
)
NO_MODELS_HINT = (
    "the endpoint lists no loaded models (Foundry Local lists loaded models only: "
    "run `foundry model run <alias>` first)"
)
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# Retried before a response: the server never saw the request, or dropped it unanswered.
_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


def is_loopback(url: str) -> bool:
    """Whether ``url`` (or a bare ``host[:port]``) is on this machine.

    >>> is_loopback("http://127.0.0.1:5273/v1"), is_loopback("https://api.example.com/v1"), is_loopback("[::1]:80")
    (True, False, True)
    """
    host = httpx.URL(url if "://" in url else f"http://{url}").host
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


def _normalise_base_url(base_url: str) -> str:
    """``http://h:1/v1/`` -> ``http://h:1``: requests then go to ``{root}/v1/...``."""
    url = base_url.strip()
    if "://" not in url:
        url = "http://" + url
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ConfigError(f"RAG_BASE_URL={base_url!r} must start with http:// or https://")
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


# How long to wait for the end of a body after [DONE] before closing it anyway.
DRAIN_TIMEOUT = 1.0


async def _end_body(response: httpx.Response, chunks: AsyncGenerator[bytes, None]) -> None:
    """Close a response body, also one we stopped reading half-way, leaving nothing of it to
    the garbage collector.

    httpx reads a body through six nested async generators (``aiter_bytes`` → ``aiter_raw`` → …
    → httpcore's ``_receive_response_body``). Closing the outer one, which is all ``aclosing``
    does, leaves the inner ones suspended; the collector finalizes them later, outside any task,
    and httpcore's clean-up then logs "async generator ignored GeneratorExit" or "no running
    event loop" tracebacks (encode/httpx#3777). So the connection is closed first (the server
    sees us go and stops generating), then the generators are run on: reading the closed
    connection fails at once (after what was already buffered), and that error ends each of
    them in turn, innermost first."""
    try:
        await response.aclose()
        with contextlib.suppress(TimeoutError, httpx.HTTPError, httpx.StreamError):
            async with asyncio.timeout(DRAIN_TIMEOUT):
                async for _ in chunks:
                    pass
    finally:
        await chunks.aclose()


class ChatClient:
    """Talks to ``{root}/v1/chat/completions``; owns its httpx client unless one is given.

    Use as ``async with ChatClient(url) as chat: ...`` or call ``aclose()``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str = "",
        client: httpx.AsyncClient | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        first_token_timeout: float = DEFAULT_FIRST_TOKEN_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        connect_retries: int = DEFAULT_CONNECT_RETRIES,
        retry_backoff: float = DEFAULT_RETRY_BACKOFF,
    ) -> None:
        self.root = _normalise_base_url(base_url)
        self.api_key = api_key
        self.connect_timeout = connect_timeout
        self.first_token_timeout = first_token_timeout
        self.idle_timeout = idle_timeout
        self.connect_retries = max(0, connect_retries)
        self.retry_backoff = retry_backoff
        self._owns_client = client is None
        # A proxy from HTTP_PROXY would intercept requests meant for this machine.
        local = is_loopback(self.root)
        self._client = client if client is not None else httpx.AsyncClient(
            trust_env=not local, limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY)
        )

    @property
    def chat_url(self) -> str:
        return f"{self.root}/v1/chat/completions"

    @property
    def models_url(self) -> str:
        return f"{self.root}/v1/models"

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- models --

    async def list_models(self) -> list[str]:
        """Ids the endpoint serves now (Foundry Local: the loaded ones)."""
        return [str(card["id"]) for card in await self.model_cards()]

    async def model_cards(self) -> list[dict[str, Any]]:
        """The entries of ``/v1/models`` as sent (ours add ``context_length``)."""
        request = self._client.build_request("GET", self.models_url, headers=self._headers())
        loop = asyncio.get_running_loop()
        response = await self._send(request, deadline=loop.time() + self.first_token_timeout)
        try:
            body = await self._read_before(response, loop.time() + self.first_token_timeout)
        finally:
            await response.aclose()
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            raise EndpointHTTPError(
                f"{self.models_url} did not answer with JSON: is RAG_BASE_URL an OpenAI-compatible "
                f"endpoint? It answered: {error_message(body, limit=200)}",
                url=self.models_url,
                status=response.status_code,
            ) from exc
        entries = data.get("data", []) if isinstance(data, dict) else data
        if not isinstance(entries, list):
            return []
        return [e for e in entries if isinstance(e, dict) and e.get("id")]

    async def resolve_model(self, name: str) -> str:
        """The full id to send for ``name``: an id the endpoint lists, or an alias of one."""
        available = await self.list_models()
        if not name and len(available) == 1:
            return available[0]
        picked = pick_model(name, available) if name else None
        if picked is None:
            raise self._unknown_model(name, tuple(available))
        return picked

    def _unknown_model(
        self, name: str, available: tuple[str, ...], *, said: str = "", listed: bool = True
    ) -> UnknownModelError:
        asked = f"model {name!r}" if name else "a model (RAG_MODEL is empty)"
        server = f" (it said: {said})" if said else ""
        if not listed:
            offer = "and listing its models failed too"
        elif available:
            offer = "it offers: " + ", ".join(available) + ". Set RAG_MODEL to one of them"
        else:
            offer = NO_MODELS_HINT
        return UnknownModelError(
            f"{self.root} does not serve {asked}{server}; {offer}",
            url=self.chat_url,
            available=available,
        )

    # -- chat --

    async def stream(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        temperature: float | None = None,
        max_tokens: int | None = None,
        **extra: Any,
    ) -> AsyncIterator[ChatEvent | Queued]:
        """Yield ``ChatDelta``s as they arrive, then exactly one ``ChatDone``; before the first
        delta, ``Queued`` notices while the server keeps the request waiting.

        Closing the generator (``aclose()``, ``break`` inside ``aclosing``, a cancelled task)
        closes the HTTP response, which tells the server to stop generating.
        """
        body = request_body(
            messages, model=model, stream=True, temperature=temperature, max_tokens=max_tokens, extra=extra
        )
        url = self.chat_url
        headers = {**self._headers(), "Accept": "text/event-stream"}
        request = self._client.build_request("POST", url, json=body, headers=headers)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.first_token_timeout
        response = await self._send(request, deadline=deadline, model=model)
        try:
            if response.headers.get("content-type", "").startswith("application/json"):
                # A server that ignored "stream": true answered in one piece.
                text, done = self._parse_completion(await self._read_before(response, deadline))
                if text:
                    yield ChatDelta(text)
                yield done
                return
            answer = StreamState()
            splitter, builder = LineSplitter(), EventBuilder()
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            chunks = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
            ahead: int | None = None  # the last place in line the server told
            try:
                closed = False
                while not (answer.ended or closed):
                    try:
                        async with asyncio.timeout_at(deadline):
                            chunk = await anext(chunks)
                        lines = splitter.feed(utf8.decode(chunk))
                    except StopAsyncIteration:
                        # Flush whatever the server left unterminated, then end the last event.
                        lines = [*splitter.feed(utf8.decode(b"", final=True)), *splitter.flush(), ""]
                        closed = True
                    except TimeoutError:
                        raise self._stream_timeout(answer.started, ahead=ahead) from None
                    except httpx.HTTPError as exc:
                        raise self._broken(exc, answer.started) from exc
                    for event in self._events(lines, builder, response.status_code):
                        if isinstance(event, Queued):
                            if answer.started:
                                continue  # a late notice means nothing once the answer streams
                            if ahead is None or event.ahead < ahead:  # the line moved: a fresh clock
                                deadline = loop.time() + self.first_token_timeout
                            ahead = event.ahead
                            yield event
                            continue
                        text = answer.take(event)
                        if text:
                            yield ChatDelta(text)
                            deadline = loop.time() + self.idle_timeout
                        if answer.ended:
                            break
                if not closed:
                    # Read past [DONE] to the end of the body (the server closes it right away):
                    # abandoning httpcore's stream mid-way leaves its generators to the garbage
                    # collector, which logs cancel-scope errors (encode/httpx#3777).
                    with contextlib.suppress(TimeoutError, httpx.HTTPError):
                        async with asyncio.timeout(DRAIN_TIMEOUT):
                            async for _ in chunks:
                                pass
            finally:
                await _end_body(response, chunks)
            yield answer.done()
        finally:
            await response.aclose()

    def _events(
        self, lines: list[str], builder: EventBuilder, status: int
    ) -> Iterator[dict[str, Any] | str | Queued]:
        """The decoded events these lines complete, and queue notices; raises on an error event
        or garbage."""
        for line in lines:
            ahead = queue_notice(line)
            if ahead is not None:
                yield Queued(ahead)
                continue
            payload = builder.feed_line(line)
            if payload is None:
                continue
            try:
                events = decode_payload(payload)
            except ValueError as exc:
                raise EndpointHTTPError(
                    f"{self.chat_url} sent {exc}", url=self.chat_url, status=status
                ) from exc
            for event in events:
                if isinstance(event, dict):
                    self._raise_stream_error(event, status)
                yield event

    async def complete(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        temperature: float | None = None,
        max_tokens: int | None = None,
        **extra: Any,
    ) -> tuple[str, ChatDone]:
        """The whole answer in one response (``stream: false``).

        The answer must arrive within ``first_token_timeout`` of sending the request.
        """
        body = request_body(
            messages, model=model, stream=False, temperature=temperature, max_tokens=max_tokens, extra=extra
        )
        request = self._client.build_request("POST", self.chat_url, json=body, headers=self._headers())
        deadline = asyncio.get_running_loop().time() + self.first_token_timeout
        response = await self._send(request, deadline=deadline, model=model)
        try:
            raw = await self._read_before(response, deadline)
        finally:
            await response.aclose()
        return self._parse_completion(raw, status=response.status_code)

    def _parse_completion(self, raw: bytes, *, status: int = 200) -> tuple[str, ChatDone]:
        try:
            data = as_object(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise EndpointHTTPError(
                f"{self.chat_url} answered with something that is not JSON: "
                f"{error_message(raw, limit=200)}",
                url=self.chat_url,
                status=status,
            ) from exc
        self._raise_stream_error(data, status)
        return parse_completion(data)

    # -- transport --

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _timeout(self) -> httpx.Timeout:
        # Reads are timed by our own clocks (first token, idle), not by httpx.
        return httpx.Timeout(self.connect_timeout, read=None, write=self.connect_timeout)

    async def _send(
        self, request: httpx.Request, *, deadline: float, model: str | None = None
    ) -> httpx.Response:
        """Send with retries on connection failures; raise on an HTTP error status."""
        request.extensions["timeout"] = self._timeout().as_dict()
        url = str(request.url)
        attempts = self.connect_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout_at(deadline):
                    response = await self._client.send(request, stream=True)
                break
            except TimeoutError:
                raise self._stream_timeout(False, url=url) from None
            except _RETRYABLE as exc:
                if attempt == attempts:
                    raise self._unreachable(exc, url, attempts) from exc
                await asyncio.sleep(self.retry_backoff * 2 ** (attempt - 1))
            except httpx.HTTPError as exc:
                raise self._unreachable(exc, url, attempt) from exc
        if response.status_code >= 400:
            try:
                raw = await self._read_before(response, deadline)
            finally:
                await response.aclose()
            raise await self._http_error(response.status_code, raw, url, model)
        return response

    async def _read_before(self, response: httpx.Response, deadline: float) -> bytes:
        try:
            async with asyncio.timeout_at(deadline):
                return await response.aread()
        except TimeoutError:
            raise self._stream_timeout(False, url=str(response.request.url)) from None
        except httpx.HTTPError as exc:
            raise self._broken(exc, False, url=str(response.request.url)) from exc

    async def _http_error(
        self, status: int, raw: bytes, url: str, model: str | None
    ) -> EndpointError:
        said = error_message(raw)
        if status in (400, 413) and is_context_length_message(said):
            return self._context_error(said)
        if model is not None and (status == 404 or status == 400) and "model" in said.lower():
            try:
                available, listed = tuple(await self.list_models()), True
            except EndpointError:
                available, listed = (), False
            return self._unknown_model(model, available, said=said, listed=listed)
        hint = ""
        if status == 404:
            hint = f" (is RAG_BASE_URL right? requests go to {url})"
        elif status in (401, 403):
            hint = " (check RAG_API_KEY)"
        return EndpointHTTPError(
            f"{url} answered HTTP {status}: {said or '(no message)'}{hint}", url=url, status=status
        )

    def _context_error(self, said: str) -> ContextLengthError:
        return ContextLengthError(
            f"the request does not fit the model's context window ({self.chat_url} said: {said}); "
            "lower RAG_TOP_K or RAG_MAX_ANSWER_TOKENS, or ask a shorter question",
            url=self.chat_url,
        )

    def _raise_stream_error(self, event: dict[str, Any], status: int) -> None:
        error = event.get("error")
        if not error:
            return
        said = error_message(json.dumps({"error": error}))
        if is_context_length_message(said):
            raise self._context_error(said)
        code = error.get("code") if isinstance(error, dict) else None
        raise EndpointHTTPError(
            f"{self.chat_url} reported an error: {said}",
            url=self.chat_url,
            status=code if isinstance(code, int) else status,
        )

    def _unreachable(self, exc: Exception, url: str, attempts: int) -> EndpointError:
        tries = f" ({attempts} attempts)" if attempts > 1 else ""
        if isinstance(exc, httpx.TimeoutException):
            return EndpointTimeoutError(
                f"could not connect to {url} within {self.connect_timeout:g} s{tries}; "
                f"raise RAG_CONNECT_TIMEOUT if the machine is slow. {START_HINT}",
                url=url,
            )
        return EndpointUnreachableError(
            f"nothing answers at {url}{tries}: {str(exc) or type(exc).__name__}. {START_HINT}",
            url=url,
        )

    def _stream_timeout(self, got_delta: bool, *, url: str | None = None, ahead: int | None = None) -> EndpointTimeoutError:
        url = url or self.chat_url
        if not got_delta and ahead:
            return EndpointTimeoutError(
                f"{url} kept the request waiting behind {ahead} others for {self.first_token_timeout:g} s "
                "without the line moving (first-token timeout); raise RAG_FIRST_TOKEN_TIMEOUT if its "
                "answers are long",
                url=url,
            )
        if got_delta:
            return EndpointTimeoutError(
                f"{url} sent nothing for {self.idle_timeout:g} s in the middle of an answer "
                "(idle timeout); raise RAG_IDLE_TIMEOUT if the model is slow",
                url=url,
            )
        return EndpointTimeoutError(
            f"{url} gave no answer within {self.first_token_timeout:g} s of the request "
            "(first-token timeout); the model may still be loading: raise RAG_FIRST_TOKEN_TIMEOUT",
            url=url,
        )

    def _broken(self, exc: Exception, got_delta: bool, *, url: str | None = None) -> EndpointError:
        url = url or self.chat_url
        when = "in the middle of an answer (it is incomplete)" if got_delta else "before answering"
        return EndpointError(
            f"the connection to {url} broke {when}: {str(exc) or type(exc).__name__}", url=url
        )
