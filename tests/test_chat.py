"""The chat client against a faked transport: streams, Foundry Local quirks, errors, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest

from rag.chat import NO_MODELS_HINT, ChatClient
from rag.errors import (
    ConfigError,
    ContextLengthError,
    EndpointError,
    EndpointHTTPError,
    EndpointTimeoutError,
    EndpointUnreachableError,
    UnknownModelError,
)
from rag.types import ChatDelta, ChatDone, ChatEvent, Message, Queued
from tests.apphost import http_server
from tests.sse import chunk

BASE = "http://127.0.0.1:5273/v1"
CHAT_URL = "http://127.0.0.1:5273/v1/chat/completions"
MODEL = "Phi-4-mini-instruct-generic-cpu:5"
QUESTION = [Message("user", "Hi?")]
FOUNDRY_IDS = [
    "Phi-4-mini-instruct-generic-gpu:5",
    "Phi-4-mini-instruct-generic-cpu:4",
    "Phi-4-mini-instruct-generic-cpu:5",
    "Phi-4-mini-reasoning-generic-cpu:2",
    "qwen2.5-0.5b-instruct-generic-cpu:4",
    "qwen2.5-0.5b-instruct-cuda-gpu:3",
]


class FakeStream(httpx.AsyncByteStream):
    """A response body: bytes are sent, floats are pauses, exceptions are raised.
    Records whether the client closed it; once closed, it sends nothing more (as a closed
    connection does)."""

    def __init__(self, *parts: bytes | float | Exception) -> None:
        self.parts = parts
        self.closed = False
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            if self.closed:
                return
            if isinstance(part, float):
                await asyncio.sleep(part)
            elif isinstance(part, Exception):
                raise part
            else:
                self.sent += 1
                yield part

    async def aclose(self) -> None:
        self.closed = True


USAGE = {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
USAGE_CHUNK = f"data: {json.dumps({'model': MODEL, 'choices': [], 'usage': USAGE})}\n\n".encode()
DONE = b"data: [DONE]\n\n"


def sse_response(stream: FakeStream, status: int = 200) -> httpx.Response:
    return httpx.Response(status, stream=stream, headers={"content-type": "text/event-stream"})


def error_json(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": None}}


@contextlib.asynccontextmanager
async def chat_client(
    handler: Callable[[httpx.Request], Any], **options: Any
) -> AsyncIterator[ChatClient]:
    options.setdefault("retry_backoff", 0.0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        yield ChatClient(BASE, client=http, **options)


def stream_events(body: FakeStream, **options: Any) -> list[ChatEvent]:
    async def main() -> list[ChatEvent]:
        async with chat_client(lambda request: sse_response(body), **options) as chat:
            return [event async for event in chat.stream(QUESTION, model=MODEL)]

    return asyncio.run(main())


# --- streaming ------------------------------------------------------------------------------


def test_stream_yields_deltas_then_one_done_with_usage_and_finish_reason() -> None:
    seen: list[httpx.Request] = []
    role = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n\n'
    body = FakeStream(role, chunk("Hel"), chunk("lo"), chunk(finish="stop"), USAGE_CHUNK, DONE)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return sse_response(body)

    async def main() -> list[ChatEvent]:
        async with chat_client(handler, api_key="k3y") as chat:
            return [
                event
                async for event in chat.stream(
                    QUESTION, model=MODEL, temperature=0.2, max_tokens=64, top_p=0.9
                )
            ]

    events = asyncio.run(main())

    assert events == [ChatDelta("Hel"), ChatDelta("lo"), ChatDone("stop", USAGE, MODEL)]
    assert body.closed
    (request,) = seen
    assert request.url == CHAT_URL
    assert request.headers["authorization"] == "Bearer k3y"
    assert json.loads(request.content) == {
        "top_p": 0.9,
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi?"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
        "max_tokens": 64,
    }


QUIRKS = {
    "last chunk with empty choices carries usage": (
        FakeStream(chunk("a"), chunk("b", finish="length"), USAGE_CHUNK, DONE),
        [ChatDelta("a"), ChatDelta("b"), ChatDone("length", USAGE, MODEL)],
    ),
    "no finish_reason and no [DONE]": (
        FakeStream(chunk("a"), chunk("b")),
        [ChatDelta("a"), ChatDelta("b"), ChatDone(None, None, MODEL)],
    ),
    "non-standard fields": (
        FakeStream(
            chunk("a", system_fingerprint=None, foundry={"x": 1}),
            b'data: {"choices": [{"delta": {"content": "b", "reasoning": "?"}, "logprobs": null,'
            b' "finish_reason": "stop", "stop_reason": 7}], "usage": {"total_tokens": 3,'
            b' "details": {"cached": 0}, "flag": true}}\n\n',
            DONE,
        ),
        [ChatDelta("a"), ChatDelta("b"), ChatDone("stop", {"total_tokens": 3}, MODEL)],
    ),
    "keep-alive comments, data: without space, other fields": (
        FakeStream(
            b": ping\n\n",
            b'event: message\nid: 1\nretry: 100\ndata:{"choices":[{"delta":{"content":"a"}}]}\n\n',
            b":\n",
            DONE,
        ),
        [ChatDelta("a"), ChatDone(None, None, None)],
    ),
    "CRLF line endings, split between chunks": (
        FakeStream(
            b'data: {"choices":[{"delta":{"content":"a"}}]}\r',
            b"\n\r\n",
            b'data: {"choices":[{"delta":{"content":"b"},"finish_reason":"stop"}]}\r\n\r\n',
            b"data: [DONE]\r\n\r\n",
        ),
        [ChatDelta("a"), ChatDelta("b"), ChatDone("stop", None, None)],
    ),
    "bare CR line endings": (
        FakeStream(b'data: {"choices":[{"delta":{"content":"a"}}]}\r\rdata: [DONE]\r\r'),
        [ChatDelta("a"), ChatDone(None, None, None)],
    ),
    "one JSON object over several data: lines": (
        FakeStream(b'data: {"choices":\ndata: [{"delta": {"content": "a"}}]}\n\n', DONE),
        [ChatDelta("a"), ChatDone(None, None, None)],
    ),
    "events without blank lines between them": (
        FakeStream(
            b'data: {"choices":[{"delta":{"content":"a"}}]}\n'
            b'data: {"choices":[{"delta":{"content":"b"}}]}\n'
            b"data: [DONE]\n"
        ),
        [ChatDelta("a"), ChatDelta("b"), ChatDone(None, None, None)],
    ),
    "lines and UTF-8 characters split across chunks": (
        FakeStream(*[bytes([b]) for b in chunk("café ☕")], DONE),
        [ChatDelta("café ☕"), ChatDone(None, None, MODEL)],
    ),
    "line separators inside JSON strings": (
        FakeStream(chunk("a\u2028b\x85c"), DONE),
        [ChatDelta("a\u2028b\x85c"), ChatDone(None, None, MODEL)],
    ),
    "last event without its blank line": (
        FakeStream(b'data: {"choices":[{"delta":{"content":"a"},"finish_reason":"stop"}]}'),
        [ChatDelta("a"), ChatDone("stop", None, None)],
    ),
    "message instead of delta, empty and null contents skipped": (
        FakeStream(
            b'data: {"choices":[{"message":{"role":"assistant","content":"a"}}]}\n\n',
            b'data: {"choices":[{"delta":{"content":""}}]}\n\n',
            b'data: {"choices":[{"delta":{"content":null}}]}\n\n',
            DONE,
        ),
        [ChatDelta("a"), ChatDone(None, None, None)],
    ),
    "nothing after [DONE] is read": (
        FakeStream(chunk("a"), DONE, chunk("ignored")),
        [ChatDelta("a"), ChatDone(None, None, MODEL)],
    ),
}


@pytest.mark.parametrize("body, expected", QUIRKS.values(), ids=QUIRKS.keys())
def test_stream_tolerates_server_quirks(body: FakeStream, expected: list[ChatEvent]) -> None:
    assert stream_events(body) == expected
    assert body.closed


def test_error_object_inside_the_stream_raises_with_its_message() -> None:
    body = FakeStream(chunk("a"), b'data: {"error": {"message": "GPU fell over", "code": 500}}\n\n')
    with pytest.raises(EndpointHTTPError, match="GPU fell over") as caught:
        stream_events(body)
    assert caught.value.status == 500
    assert body.closed


def test_context_length_error_inside_the_stream() -> None:
    body = FakeStream(b'data: {"error": "prompt exceeds the maximum context length"}\n\n')
    with pytest.raises(ContextLengthError, match="RAG_TOP_K"):
        stream_events(body)


def test_garbage_event_is_an_endpoint_error() -> None:
    with pytest.raises(EndpointHTTPError, match="not JSON"):
        stream_events(FakeStream(b"data: <html>\n\n"))


def test_a_json_answer_to_a_stream_request_is_one_delta() -> None:
    answer = {"model": MODEL, "choices": [{"message": {"content": "Hi."}, "finish_reason": "stop"}]}

    async def main() -> list[ChatEvent]:
        async with chat_client(lambda request: httpx.Response(200, json=answer)) as chat:
            return [event async for event in chat.stream(QUESTION, model=MODEL)]

    assert asyncio.run(main()) == [ChatDelta("Hi."), ChatDone("stop", None, MODEL)]


# --- non-streamed ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["message", "delta"])
def test_complete_reads_message_or_delta(key: str) -> None:
    seen: list[dict[str, Any]] = []
    answer = {
        "model": MODEL,
        "choices": [{"index": 0, key: {"role": "assistant", "content": "Paris [1]."},
                     "finish_reason": "stop"}],
        "usage": USAGE,
    }  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=answer)

    async def main() -> tuple[str, ChatDone]:
        async with chat_client(handler) as chat:
            return await chat.complete(QUESTION, model=MODEL, max_tokens=10)

    assert asyncio.run(main()) == ("Paris [1].", ChatDone("stop", USAGE, MODEL))
    assert seen[0]["stream"] is False and "stream_options" not in seen[0]


def test_complete_rejects_a_body_that_is_not_json() -> None:
    async def main() -> None:
        async with chat_client(lambda request: httpx.Response(200, text="<html>hi</html>")) as chat:
            await chat.complete(QUESTION, model=MODEL)

    with pytest.raises(EndpointHTTPError, match="not JSON"):
        asyncio.run(main())


# --- models ---------------------------------------------------------------------------------


def models_handler(ids: list[str]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/models"
        return httpx.Response(200, json={"object": "list", "data": [{"id": i} for i in ids]})

    return handler


def resolve(name: str, ids: list[str]) -> str:
    async def main() -> str:
        async with chat_client(models_handler(ids)) as chat:
            return await chat.resolve_model(name)

    return asyncio.run(main())


def test_list_models() -> None:
    async def main() -> list[str]:
        async with chat_client(models_handler(FOUNDRY_IDS)) as chat:
            return await chat.list_models()

    assert asyncio.run(main()) == FOUNDRY_IDS


@pytest.mark.parametrize(
    "name, expected",
    [
        ("phi-4-mini", "Phi-4-mini-instruct-generic-cpu:5"),
        ("Phi-4-mini-instruct-generic-gpu:5", "Phi-4-mini-instruct-generic-gpu:5"),
        ("phi-4-mini-instruct-generic-cpu:4", "Phi-4-mini-instruct-generic-cpu:4"),
        ("phi-4-mini-reasoning", "Phi-4-mini-reasoning-generic-cpu:2"),
        ("QWEN2.5-0.5B", "qwen2.5-0.5b-instruct-generic-cpu:4"),
        ("qwen2_5-0_5b", "qwen2.5-0.5b-instruct-generic-cpu:4"),
    ],
)
def test_resolve_model_matches_ids_and_aliases(name: str, expected: str) -> None:
    assert resolve(name, FOUNDRY_IDS) == expected


def test_empty_model_name_takes_the_only_loaded_model() -> None:
    assert resolve("", [MODEL]) == MODEL


def test_unknown_model_lists_what_the_endpoint_offers() -> None:
    with pytest.raises(UnknownModelError, match="Phi-4-mini-instruct-generic-cpu:5") as caught:
        resolve("llama-3", FOUNDRY_IDS)
    assert caught.value.available == tuple(FOUNDRY_IDS)
    assert "RAG_MODEL" in str(caught.value)


def test_unknown_model_with_nothing_loaded_says_to_run_a_model() -> None:
    with pytest.raises(UnknownModelError) as caught:
        resolve("phi-4-mini", [])
    assert NO_MODELS_HINT in str(caught.value)
    assert "foundry model run <alias>" in str(caught.value)


def test_models_route_missing_is_an_http_error() -> None:
    async def main() -> None:
        async with chat_client(lambda request: httpx.Response(404, text="Not Found")) as chat:
            await chat.list_models()

    with pytest.raises(EndpointHTTPError, match="RAG_BASE_URL") as caught:
        asyncio.run(main())
    assert caught.value.status == 404


# --- connection failures and retries --------------------------------------------------------


def test_unreachable_is_retried_then_explains_how_to_start_foundry() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("All connection attempts failed", request=request)

    with pytest.raises(EndpointUnreachableError) as caught:
        stream_events_with(handler, connect_retries=2)
    assert len(calls) == 3
    message = str(caught.value)
    assert CHAT_URL in message and "3 attempts" in message
    assert "foundry model run phi-4-mini" in message
    assert "foundry service status" in message and "python -m rag serve" in message
    assert caught.value.url == CHAT_URL
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


def stream_events_with(handler: Callable[[httpx.Request], Any], **options: Any) -> list[ChatEvent]:
    async def main() -> list[ChatEvent]:
        async with chat_client(handler, **options) as chat:
            return [event async for event in chat.stream(QUESTION, model=MODEL)]

    return asyncio.run(main())


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("slow"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
)
def test_connection_failure_then_success_on_second_attempt(failure: Exception) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise failure
        return sse_response(FakeStream(chunk("ok"), DONE))

    assert stream_events_with(handler) == [ChatDelta("ok"), ChatDone(None, None, MODEL)]
    assert calls == 2


def test_connect_timeout_names_its_setting() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    with pytest.raises(EndpointTimeoutError, match="RAG_CONNECT_TIMEOUT") as caught:
        stream_events_with(handler, connect_retries=0)
    assert CHAT_URL in str(caught.value)


def test_connect_timeout_is_passed_to_httpx() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return sse_response(FakeStream(DONE))

    stream_events_with(handler, connect_timeout=1.5)
    assert seen == [{"connect": 1.5, "read": None, "write": 1.5, "pool": 1.5}]


@pytest.mark.parametrize(
    "failure", [httpx.ReadError("reset"), httpx.RemoteProtocolError("peer closed connection")]
)
def test_failure_after_the_first_token_is_raised_not_replayed(failure: Exception) -> None:
    calls = 0
    received: list[ChatEvent] = []

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return sse_response(FakeStream(chunk("Hel"), failure, chunk("lo")))

    async def main() -> None:
        async with chat_client(handler) as chat:
            async for event in chat.stream(QUESTION, model=MODEL):
                received.append(event)

    with pytest.raises(EndpointError, match="incomplete") as caught:
        asyncio.run(main())
    assert received == [ChatDelta("Hel")]
    assert calls == 1
    assert CHAT_URL in str(caught.value)


# --- timeouts -------------------------------------------------------------------------------


def test_first_token_timeout_while_the_body_is_silent() -> None:
    body = FakeStream(b": ping\n\n", 5.0, chunk("late"))
    with pytest.raises(EndpointTimeoutError, match="RAG_FIRST_TOKEN_TIMEOUT") as caught:
        stream_events(body, first_token_timeout=0.05)
    assert CHAT_URL in str(caught.value)
    assert body.closed


def test_first_token_timeout_while_waiting_for_headers() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return sse_response(FakeStream(DONE))  # pragma: no cover

    with pytest.raises(EndpointTimeoutError, match="first-token timeout"):
        stream_events_with(handler, first_token_timeout=0.05)


# --- a busy server's queue ------------------------------------------------------------------


def queued(ahead: int) -> bytes:
    return f": queued {ahead}\n\n".encode()


def test_queue_notices_come_before_the_first_delta_and_not_after() -> None:
    body = FakeStream(queued(2), queued(1), queued(0), chunk("Hel"), queued(3), chunk("lo"), chunk(finish="stop"), DONE)
    events = stream_events(body)
    assert events[:5] == [Queued(2), Queued(1), Queued(0), ChatDelta("Hel"), ChatDelta("lo")]
    assert isinstance(events[5], ChatDone) and len(events) == 6


def test_a_queue_that_keeps_moving_restarts_the_first_token_clock() -> None:
    """1.2 s in line with a 0.6 s first-token timeout: every step forward is progress."""
    parts: list[bytes | float] = [queued(5)]
    for ahead in range(4, -1, -1):
        parts += [0.2, queued(ahead)]
    body = FakeStream(*parts, 0.2, chunk("Hi"), chunk(finish="stop"), DONE)
    events = stream_events(body, first_token_timeout=0.6)
    assert [e for e in events if isinstance(e, Queued)] == [Queued(n) for n in range(5, -1, -1)]
    assert ChatDelta("Hi") in events


def test_a_queue_that_does_not_move_times_out_like_a_silent_server() -> None:
    body = FakeStream(queued(2), 0.2, queued(2), 0.2, queued(2), 0.2, queued(2), 5.0, chunk("late"))
    received: list[ChatEvent | Queued] = []

    async def main() -> None:
        async with chat_client(lambda request: sse_response(body), first_token_timeout=0.5) as chat:
            async for event in chat.stream(QUESTION, model=MODEL):
                received.append(event)

    with pytest.raises(EndpointTimeoutError, match="waiting behind 2 others for 0.5 s without the line moving"):
        asyncio.run(main())
    assert set(received) == {Queued(2)} and len(received) < 4 and body.closed  # repeats are no progress


# --- a stream we stop: nothing left to the garbage collector ---------------------------------


class SlowSSE(BaseHTTPRequestHandler):
    """A real HTTP server's slow stream (chunked, one delta every 20 ms, 10 s in all)."""

    protocol_version = "HTTP/1.1"
    cut = threading.Event()  # the client went away mid-stream

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for i in range(500):
                data = chunk(f"w{i} ")
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
                time.sleep(0.02)
        except OSError:
            SlowSSE.cut.set()


@pytest.mark.parametrize("how", ["closed between deltas", "cancelled while the reader is busy", "idle timeout"])
def test_a_stream_stopped_half_way_is_closed_by_us(how: str) -> None:
    """httpx reads a body through nested async generators: stopping half-way must end every one
    of them, not leave them suspended for the garbage collector (which then logs httpcore's
    "async generator ignored GeneratorExit" tracebacks); and the server must see us go."""
    SlowSSE.cut.clear()
    left: list[str] = []

    async def main(url: str) -> None:
        firstiter, finalizer = sys.get_asyncgen_hooks()
        made: list[Any] = []

        def track(agen: Any) -> None:
            if "/httpx/" in agen.ag_code.co_filename or "/httpcore/" in agen.ag_code.co_filename:
                made.append(agen)
            if firstiter is not None:
                firstiter(agen)

        sys.set_asyncgen_hooks(firstiter=track, finalizer=finalizer)
        try:
            async with ChatClient(url, idle_timeout=0.01 if how == "idle timeout" else 60) as chat:
                stream = chat.stream(QUESTION, model=MODEL)
                if how == "closed between deltas":
                    async with contextlib.aclosing(stream):
                        async for event in stream:
                            if event == ChatDelta("w2 "):
                                break
                elif how == "cancelled while the reader is busy":
                    busy = asyncio.Event()

                    async def read() -> None:
                        async with contextlib.aclosing(stream):
                            async for event in stream:
                                if event == ChatDelta("w2 "):
                                    busy.set()
                                    await asyncio.sleep(30)  # drawing it, say: not reading the stream

                    task = asyncio.create_task(read())
                    await busy.wait()
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                else:
                    with pytest.raises(EndpointTimeoutError):
                        async for _ in stream:
                            pass
                assert made, "httpx made no generators: the test would prove nothing"
                left.extend(g.ag_code.co_qualname for g in made if g.ag_frame is not None)
        finally:
            sys.set_asyncgen_hooks(firstiter=firstiter, finalizer=finalizer)

    with http_server(SlowSSE) as url:
        asyncio.run(main(url))
        assert SlowSSE.cut.wait(5), "the server kept streaming to nobody"
    assert left == []


def test_idle_timeout_between_tokens() -> None:
    body = FakeStream(chunk("a"), 5.0, chunk("b"))
    received: list[ChatEvent] = []

    async def main() -> None:
        async with chat_client(lambda request: sse_response(body), idle_timeout=0.05) as chat:
            async for event in chat.stream(QUESTION, model=MODEL):
                received.append(event)

    with pytest.raises(EndpointTimeoutError, match="RAG_IDLE_TIMEOUT") as caught:
        asyncio.run(main())
    assert received == [ChatDelta("a")]
    assert "idle timeout" in str(caught.value) and CHAT_URL in str(caught.value)
    assert body.closed


def test_keep_alive_pings_do_not_reset_the_idle_clock() -> None:
    pings: list[bytes | float] = [b": ping\n\n", 0.02] * 50
    body = FakeStream(chunk("a"), *pings, chunk("b"))
    with pytest.raises(EndpointTimeoutError, match="RAG_IDLE_TIMEOUT"):
        stream_events(body, idle_timeout=0.15)


def test_complete_times_out_on_first_token_timeout() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json={})  # pragma: no cover

    async def main() -> None:
        async with chat_client(handler, first_token_timeout=0.05) as chat:
            await chat.complete(QUESTION, model=MODEL)

    with pytest.raises(EndpointTimeoutError, match="RAG_FIRST_TOKEN_TIMEOUT"):
        asyncio.run(main())


# --- HTTP errors ----------------------------------------------------------------------------


def chat_error_handler(status: int, body: Any) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": MODEL}]})
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    return handler


@pytest.mark.parametrize(
    "status, message",
    [(404, "No model matching 'llama-3'"), (400, "The model `llama-3` does not exist")],
)
def test_unknown_model_from_the_chat_route_lists_available(status: int, message: str) -> None:
    with pytest.raises(UnknownModelError) as caught:
        stream_events_with(chat_error_handler(status, error_json(message)))
    assert caught.value.available == (MODEL,)
    assert message in str(caught.value) and MODEL in str(caught.value)


@pytest.mark.parametrize(
    "status, message",
    [
        (400, "This model's maximum context length is 4096 tokens. However, you requested 5000."),
        (413, "Request too long"),
        (400, "Prompt exceeds the context window of 8192 tokens"),
    ],
)
def test_context_length_errors(status: int, message: str) -> None:
    with pytest.raises(ContextLengthError, match="RAG_MAX_ANSWER_TOKENS") as caught:
        stream_events_with(chat_error_handler(status, error_json(message)))
    assert message in str(caught.value)


def test_server_error_message_is_surfaced() -> None:
    handler = chat_error_handler(500, error_json("onnxruntime: out of memory"))
    with pytest.raises(EndpointHTTPError) as caught:
        stream_events_with(handler)
    assert caught.value.status == 500
    assert str(caught.value) == f"{CHAT_URL} answered HTTP 500: onnxruntime: out of memory"


def test_plain_text_error_body_is_truncated() -> None:
    with pytest.raises(EndpointHTTPError) as caught:
        stream_events_with(chat_error_handler(502, "bad gateway " * 200))
    assert caught.value.status == 502
    assert len(str(caught.value)) < 600 and str(caught.value).endswith("…")


def test_complete_maps_errors_too() -> None:
    async def main() -> None:
        async with chat_client(chat_error_handler(401, error_json("bad key"))) as chat:
            await chat.complete(QUESTION, model=MODEL)

    with pytest.raises(EndpointHTTPError, match="RAG_API_KEY"):
        asyncio.run(main())


# --- cancellation ---------------------------------------------------------------------------


def test_aclose_after_the_first_delta_closes_the_response() -> None:
    body = FakeStream(chunk("a"), chunk("b"), chunk("c"), DONE)

    async def main() -> list[ChatEvent]:
        async with chat_client(lambda request: sse_response(body)) as chat:
            events = chat.stream(QUESTION, model=MODEL)
            first = await anext(events)
            await events.aclose()  # type: ignore[attr-defined]
            return [first]

    assert asyncio.run(main()) == [ChatDelta("a")]
    assert body.closed
    assert body.sent == 1


def test_cancelling_the_consuming_task_closes_the_response() -> None:
    body = FakeStream(chunk("a"), 5.0, chunk("b"))
    received: list[ChatEvent] = []

    async def consume(chat: ChatClient) -> None:
        async for event in chat.stream(QUESTION, model=MODEL):
            received.append(event)

    async def main() -> None:
        async with chat_client(lambda request: sse_response(body)) as chat:
            task = asyncio.create_task(consume(chat))
            while not received:
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert received == [ChatDelta("a")]
    assert body.closed


# --- the client itself ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "base_url",
    ["http://127.0.0.1:5273", "http://127.0.0.1:5273/", "http://127.0.0.1:5273/v1",
     "http://127.0.0.1:5273/v1/", "127.0.0.1:5273/v1"],
)  # fmt: skip
def test_base_url_with_or_without_v1(base_url: str) -> None:
    async def main() -> tuple[str, str]:
        async with ChatClient(base_url) as chat:
            return chat.chat_url, chat.models_url

    assert asyncio.run(main()) == (CHAT_URL, "http://127.0.0.1:5273/v1/models")


def test_base_url_must_be_http() -> None:
    with pytest.raises(ConfigError, match="RAG_BASE_URL"):
        ChatClient("ftp://example.org")


def test_owns_only_the_client_it_made() -> None:
    async def main() -> tuple[bool, bool]:
        async with ChatClient(BASE) as owned:
            pass
        async with httpx.AsyncClient() as given:
            await ChatClient(BASE, client=given).aclose()
            return owned._client.is_closed, given.is_closed

    assert asyncio.run(main()) == (True, False)


# --- proxies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("base_url, trusts_env", [(BASE, False), ("http://localhost:1/v1", False),
                                                  ("https://example.org/v1", True)])  # fmt: skip
def test_local_endpoints_bypass_environment_proxies(base_url: str, trusts_env: bool) -> None:
    async def main() -> bool:
        async with ChatClient(base_url) as chat:
            return chat._client.trust_env

    assert asyncio.run(main()) is trusts_env
