"""The OpenAI-compatible HTTP layer, against a fake runtime with the real runtime's interface."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rag.config import Settings
from rag.errors import ContextLengthError, EndpointError, ModelBuildError, UnknownModelError
from rag.runtime import ChatStream
from rag.launcher import find_running, state_path
from rag.server import FairLock, OpenAIServer, coalesce, default_model_sources, make_server, serve

MODEL = "fake-model:1"


class FakeRuntime:
    """Echoes the last message word by word. Records overlapping generations and stops.

    A last message of ``forever`` streams until closed; ``context`` counts words.
    """

    def __init__(self, *, delay: float = 0.0, context: int = 50) -> None:
        self.delay = delay
        self.context = context
        self.loaded: list[str] = [MODEL]
        self.active = 0
        self.overlapped = False
        self.started: list[str] = []
        self.stopped = threading.Event()
        self._lock = threading.Lock()

    def load(self, model_dir: Path | str) -> str:
        self.loaded.append(f"{Path(model_dir).name}:1")
        return self.loaded[-1]

    def load_alias(self, alias: str) -> str:
        raise EndpointError(f"offline: cannot fetch {alias}")

    def models(self) -> list[str]:
        return sorted(self.loaded)

    def context_length(self, model_id: str) -> int:
        return self.context

    def close(self) -> None:
        pass

    def stream_chat(
        self, model_id: str, messages: list[dict[str, str]], *, max_tokens: int | None, temperature: float | None
    ) -> ChatStream:
        if model_id not in self.loaded:
            raise UnknownModelError(f"{model_id} not loaded", available=tuple(self.loaded))
        prompt = sum(len(m["content"].split()) for m in messages)
        if prompt + (max_tokens or 0) > self.context:
            raise ContextLengthError(f"{prompt} + {max_tokens} words > {self.context}")
        last = messages[-1]["content"]

        def produce(stream: ChatStream) -> Iterator[str]:
            with self._lock:
                self.active += 1
                self.overlapped |= self.active > 1
                self.started.append(last)
            try:
                words = ["echo:", *last.split()]
                index = 0
                while last == "forever" or index < len(words):
                    if max_tokens is not None and index >= max_tokens:
                        stream.finish_reason = "length"
                        return
                    time.sleep(self.delay)
                    yield ("tick " if last == "forever" else words[index] + " ")
                    index += 1
                stream.finish_reason = "stop"
            finally:
                with self._lock:
                    self.active -= 1
                if last == "forever":
                    self.stopped.set()

        return ChatStream(produce, prompt_tokens=prompt)


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def server(runtime: FakeRuntime) -> Iterator[OpenAIServer]:
    httpd = make_server(runtime)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10) as c:
        yield c


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def sse_events(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream_text(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[str, list[Any]]:
    with client.stream("POST", f"{url}/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    return text, events


# -- routes ---------------------------------------------------------------------------------------


def test_models_and_health(server: OpenAIServer, client: httpx.Client) -> None:
    models = client.get(f"{server.url}/models").json()
    assert models == {
        "object": "list",
        "data": [
            {"id": MODEL, "object": "model", "created": 0, "owned_by": "rag (Foundry Local runtime)",
             "context_length": 50}
        ],
    }  # fmt: skip
    assert client.get(server.url.removesuffix("/v1") + "/health").json() == {
        "status": "ok",
        "models": [MODEL],
        "queued": 0,
    }


def test_stream_has_openai_shape(server: OpenAIServer, client: httpx.Client) -> None:
    text, events = stream_text(client, server.url, chat("hello there", stream_options={"include_usage": True}))
    assert text == "echo: hello there "
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1] == "[DONE]"
    final, usage = events[-3], events[-2]
    assert final["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert {e["object"] for e in events[:-1]} == {"chat.completion.chunk"}
    assert len({e["id"] for e in events[:-1]}) == 1


def test_tokens_ready_together_are_sent_together(runtime: FakeRuntime, client: httpx.Client) -> None:
    runtime.delay = 0.004
    words = " ".join(f"w{i}" for i in range(40))
    for flush_ms, fewer in ((25.0, True), (0.0, False)):
        httpd = make_server(runtime, flush_ms=flush_ms)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        try:
            text, events = stream_text(client, httpd.url, chat(words))
        finally:
            httpd.shutdown()
            httpd.server_close()
        pieces = [e["choices"][0]["delta"]["content"] for e in events[1:-2]]
        assert text == "echo: " + words + " "
        if fewer:  # 41 tokens 4 ms apart, gathered for 25 ms after each write
            assert len(pieces) <= 20 and pieces[0] == "echo: "
        else:
            assert pieces == ["echo: ", *(f"w{i} " for i in range(40))]


def test_coalesce_sends_the_first_piece_at_once_and_joins_the_rest() -> None:
    def slow() -> Iterator[str]:
        yield "first "
        time.sleep(0.2)
        for i in range(5):
            yield f"p{i} "

    started = time.perf_counter()
    out = coalesce(slow(), 0.1)
    assert next(out) == "first "
    assert time.perf_counter() - started < 0.1
    rest = list(out)
    assert "".join(rest) == "p0 p1 p2 p3 p4 " and len(rest) < 5


def test_coalesce_raises_the_error_after_the_text_before_it() -> None:
    def failing() -> Iterator[str]:
        yield "a"
        yield "b"
        raise EndpointError("model crashed")

    out = coalesce(failing(), 0.05)
    got = []
    with pytest.raises(EndpointError, match="model crashed"):
        for piece in out:
            got.append(piece)
    assert "".join(got) == "ab"


def test_closing_coalesce_stops_reading_the_source() -> None:
    read: list[int] = []

    def endless() -> Iterator[str]:
        i = 0
        while True:
            read.append(i)
            time.sleep(0.005)
            yield str(i)
            i += 1

    out = coalesce(endless(), 0.02)
    next(out)
    out.close()  # returns once the reader has stopped
    count = len(read)
    time.sleep(0.1)
    assert len(read) == count


def test_stream_without_include_usage_has_no_usage_chunk(server: OpenAIServer, client: httpx.Client) -> None:
    _, events = stream_text(client, server.url, chat("hi"))
    assert all(e["choices"] for e in events[:-1])
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_stream_stopped_by_max_tokens_says_length(server: OpenAIServer, client: httpx.Client) -> None:
    text, events = stream_text(client, server.url, chat("one two three four", max_tokens=2))
    assert text == "echo: one "
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_non_streaming_completion(server: OpenAIServer, client: httpx.Client) -> None:
    body = client.post(f"{server.url}/chat/completions", json=chat("hello")).json()
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "echo: hello "}, "finish_reason": "stop"}
    ]
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def test_model_name_without_version_resolves(server: OpenAIServer, client: httpx.Client) -> None:
    body = client.post(f"{server.url}/chat/completions", json={**chat("hi"), "model": "fake-model"}).json()
    assert body["model"] == MODEL


def test_text_parts_are_joined(server: OpenAIServer, client: httpx.Client) -> None:
    message = {"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]}
    body = client.post(f"{server.url}/chat/completions", json={"model": MODEL, "messages": [message]}).json()
    assert body["choices"][0]["message"]["content"] == "echo: a b "


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b"{not json", 400, None, None),
        (b"[1, 2]", 400, None, None),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "model",
         "missing_required_parameter"),
        (json.dumps({"model": MODEL}).encode(), 400, "messages", "missing_required_parameter"),
        (json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages", "missing_required_parameter"),
        (json.dumps({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}).encode(), 400,
         "messages[0].role", None),
        (json.dumps({**chat("x"), "max_tokens": 0}).encode(), 400, "max_tokens", None),
        (json.dumps({**chat("x"), "temperature": "hot"}).encode(), 400, "temperature", None),
        (json.dumps({**chat("x"), "model": "gpt-9"}).encode(), 404, "model", "model_not_found"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors(
    server: OpenAIServer, client: httpx.Client, body: bytes, status: int, param: str | None, code: str | None
) -> None:
    response = client.post(
        f"{server.url}/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"]


def test_unknown_model_lists_available(server: OpenAIServer, client: httpx.Client) -> None:
    response = client.post(f"{server.url}/chat/completions", json={**chat("x"), "model": "gpt-9"})
    assert "gpt-9" in response.json()["error"]["message"]
    assert MODEL in response.json()["error"]["message"]


@pytest.mark.parametrize("stream", [True, False])
def test_prompt_longer_than_context_is_400_before_streaming(
    server: OpenAIServer, client: httpx.Client, stream: bool
) -> None:
    response = client.post(f"{server.url}/chat/completions", json=chat("word " * 60, stream=stream))
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert response.json()["error"]["param"] == "messages"


def test_unknown_route_is_404_json(server: OpenAIServer, client: httpx.Client) -> None:
    response = client.post(f"{server.url}/completions", json={})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


# -- concurrency and disconnects ------------------------------------------------------------------


def test_four_concurrent_streams_complete_without_interleaving(server: OpenAIServer, runtime: FakeRuntime) -> None:
    runtime.delay = 0.01
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with httpx.Client(trust_env=False, timeout=30) as c:
                results[i] = stream_text(c, server.url, chat(" ".join(f"c{i}w{j}" for j in range(8))))[0]
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert results == {i: "echo: " + " ".join(f"c{i}w{j}" for j in range(8)) + " " for i in range(4)}
    assert not runtime.overlapped
    assert len(runtime.started) == 4


def test_client_disconnect_stops_generation(server: OpenAIServer, runtime: FakeRuntime) -> None:
    runtime.delay = 0.01
    with httpx.Client(trust_env=False, timeout=10) as c:
        with c.stream("POST", f"{server.url}/chat/completions", json=chat("forever", stream=True)) as response:
            lines = response.iter_lines()
            received = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
            assert received
    assert runtime.stopped.wait(5), "generation kept running after the client left"
    with httpx.Client(trust_env=False, timeout=10) as c:  # the lock was released
        assert c.post(f"{server.url}/chat/completions", json=chat("next")).status_code == 200


def test_client_leaving_a_non_streamed_answer_stops_generation(server: OpenAIServer, runtime: FakeRuntime) -> None:
    runtime.delay = 0.01
    with pytest.raises(httpx.ReadTimeout), httpx.Client(trust_env=False, timeout=0.3) as c:
        c.post(f"{server.url}/chat/completions", json=chat("forever"))
    assert runtime.stopped.wait(5), "generation kept running after the client left"
    with httpx.Client(trust_env=False, timeout=10) as c:  # the lock was released
        assert c.post(f"{server.url}/chat/completions", json=chat("next")).status_code == 200


def test_client_leaving_the_queue_is_never_served(server: OpenAIServer, runtime: FakeRuntime) -> None:
    runtime.delay = 0.05

    def ask_first() -> None:
        with httpx.Client(trust_env=False, timeout=10) as c:
            c.post(f"{server.url}/chat/completions", json=chat("a b c d e f g h i j"))

    first = threading.Thread(target=ask_first)
    first.start()
    while not runtime.started:
        time.sleep(0.01)
    host, port = server.server_address[:2]
    body = json.dumps(chat("queued then gone")).encode()
    with socket.create_connection((host, port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(0.1)
    first.join(10)
    with httpx.Client(trust_env=False, timeout=10) as c:
        assert c.post(f"{server.url}/chat/completions", json=chat("last")).json()["choices"]
    assert runtime.started == ["a b c d e f g h i j", "last"]


def wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_fair_lock_serves_in_order_and_skips_abandoned() -> None:
    lock = FairLock()
    assert lock.acquire()
    order: list[str] = []
    gone = threading.Event()

    def wait(name: str, give_up: Any = lambda: False) -> None:
        if lock.acquire(give_up=give_up, poll=0.01):
            order.append(name)
            lock.release()

    b = threading.Thread(target=wait, args=("b", gone.is_set))
    b.start()
    wait_until(lambda: lock.queued == 2)  # b holds its ticket: c comes after it
    c = threading.Thread(target=wait, args=("c",))
    c.start()
    wait_until(lambda: lock.queued == 3)
    gone.set()
    b.join(2)
    lock.release()
    c.join(2)
    assert order == ["c"]
    assert lock.queued == 0


def test_fair_lock_tells_each_waiter_its_place_as_it_changes() -> None:
    lock = FairLock()
    assert lock.acquire()
    places: dict[str, list[int]] = {"b": [], "c": []}
    served: list[str] = []
    finish = {"b": threading.Event(), "c": threading.Event()}

    def wait(name: str) -> None:
        assert lock.acquire(on_wait=places[name].append, poll=0.01)
        served.append(name)
        finish[name].wait(5)
        lock.release()

    b = threading.Thread(target=wait, args=("b",))
    b.start()
    wait_until(lambda: places["b"] == [1])
    c = threading.Thread(target=wait, args=("c",))
    c.start()
    wait_until(lambda: places["c"] == [2])
    lock.release()
    wait_until(lambda: served == ["b"] and places["c"] == [2, 1])  # b answers, c is next
    finish["b"].set()
    wait_until(lambda: served == ["b", "c"])
    finish["c"].set()
    b.join(2)
    c.join(2)
    assert places == {"b": [1], "c": [2, 1]}
    assert lock.acquire(on_wait=places["b"].append)  # nobody ahead: nothing to tell
    assert places["b"] == [1]


def test_a_waiter_that_cannot_be_told_gives_its_place_up() -> None:
    lock = FairLock()
    assert lock.acquire()

    def gone(ahead: int) -> None:
        raise BrokenPipeError("client left")

    with pytest.raises(BrokenPipeError):
        lock.acquire(on_wait=gone, poll=0.01)
    assert lock.queued == 1
    lock.release()
    assert lock.acquire(poll=0.01)  # not stuck behind the one that left


def _stream_lines(url: str, content: str, lines: list[str], *, leave: threading.Event | None = None) -> None:
    """Stream a chat request, appending each non-empty line as it comes: all of them, or, given
    ``leave``, up to the first ``data:`` line, then hold the stream until ``leave`` is set."""
    with httpx.Client(trust_env=False, timeout=30) as c:
        with c.stream("POST", f"{url}/chat/completions", json=chat(content, stream=True)) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                if leave is not None and line.startswith("data: "):
                    leave.wait(10)
                    return


def test_queued_streams_are_told_their_place_then_their_turn(server: OpenAIServer, runtime: FakeRuntime) -> None:
    """rag serve answers one request at a time: a streamed request that has to wait gets ``: queued N``
    comments (OpenAI clients skip them) as its place changes, ``: queued 0`` when its turn comes; one
    that did not wait gets none."""
    runtime.delay = 0.01
    first: list[str] = []
    leave = threading.Event()
    holder = threading.Thread(target=_stream_lines, args=(server.url, "forever", first), kwargs={"leave": leave})
    holder.start()
    wait_until(lambda: runtime.started == ["forever"])
    second: list[str] = []
    third: list[str] = []
    threads = [threading.Thread(target=_stream_lines, args=(server.url, "second", second))]
    threads[0].start()
    wait_until(lambda: second == [": queued 1"])
    threads.append(threading.Thread(target=_stream_lines, args=(server.url, "third", third)))
    threads[1].start()
    wait_until(lambda: third == [": queued 2"])
    leave.set()  # the first one leaves: its generation stops, the line moves
    holder.join(10)
    for t in threads:
        t.join(10)
    assert [line for line in first if line.startswith(":")] == []
    assert second[:2] == [": queued 1", ": queued 0"] and third[:3] == [": queued 2", ": queued 1", ": queued 0"]
    for lines, word in ((second, "second"), (third, "third")):
        data = [line for line in lines[2:] if not line.startswith(":")]
        text = "".join(json.loads(d[6:])["choices"][0]["delta"].get("content", "") for d in data[:-1]
                       if json.loads(d[6:])["choices"])  # fmt: skip
        assert text == f"echo: {word} " and data[-1] == "data: [DONE]"
    assert runtime.started == ["forever", "second", "third"] and not runtime.overlapped


def test_a_queued_stream_that_leaves_is_never_served(server: OpenAIServer, runtime: FakeRuntime) -> None:
    runtime.delay = 0.01
    body = json.dumps(chat("queued then gone", stream=True)).encode()
    host, port = server.server_address[:2]
    with socket.create_connection((host, port)) as sock:  # holds the model while the other waits
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(json.dumps(chat('forever', stream=True)))}\r\n\r\n".encode()
                     + json.dumps(chat("forever", stream=True)).encode())  # fmt: skip
        wait_until(lambda: runtime.started == ["forever"])
        with socket.create_connection((host, port)) as waiting:
            waiting.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
            head = b""
            while b": queued 1\n\n" not in head:
                head += waiting.recv(4096)
            assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
        wait_until(lambda: server.generation_lock.queued == 1)  # its place is given up while the first runs
    assert runtime.stopped.wait(5)
    with httpx.Client(trust_env=False, timeout=10) as c:
        assert c.post(f"{server.url}/chat/completions", json=chat("last")).json()["choices"]
    assert runtime.started == ["forever", "last"]


# -- process lifecycle ----------------------------------------------------------------------------


def _serve_in_thread(
    settings: Settings, runtime: FakeRuntime, model_dir: Path
) -> tuple[OpenAIServer, threading.Thread]:
    ready: list[OpenAIServer] = []
    thread = threading.Thread(
        target=serve, args=(settings,),
        kwargs={"runtime": runtime, "model_dirs": [model_dir], "ready": ready.append, "documents": False},
        daemon=True,
    )  # fmt: skip
    thread.start()
    deadline = time.monotonic() + 10
    while not ready and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready, "serve() never became ready"
    return ready[0], thread


def test_serve_writes_state_that_find_running_reuses(settings: Settings, tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    runtime = FakeRuntime()
    httpd, thread = _serve_in_thread(settings, runtime, model_dir)
    state = json.loads(state_path(settings.data_dir).read_text())
    assert state == {"pid": os.getpid(), "url": httpd.url, "models": [MODEL, "tiny:1"]}
    assert httpd.url.startswith("http://127.0.0.1:") and httpd.url.endswith("/v1")
    assert find_running(settings.data_dir) == httpd.url
    with pytest.raises(EndpointError, match="already runs"):
        serve(settings, runtime=FakeRuntime(), model_dirs=[model_dir], documents=False)
    httpd.shutdown()
    thread.join(5)
    assert not state_path(settings.data_dir).exists()
    assert find_running(settings.data_dir) is None


def test_missing_default_model_says_how_to_build_it(settings: Settings) -> None:
    with pytest.raises(ModelBuildError, match="python -m rag model build"):
        default_model_sources(settings)


def test_small_writes_go_out_at_once(server: OpenAIServer, client: httpx.Client,
                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """TCP_NODELAY on every connection: on a kept-alive connection (the chat opens one ahead
    of its request), a stream's first event must not wait for the client to ACK the headers."""
    from rag.server import ChatHandler

    nodelay: list[int] = []
    setup = ChatHandler.setup

    def recording_setup(self: ChatHandler) -> None:
        setup(self)
        nodelay.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(ChatHandler, "setup", recording_setup)
    client.get(f"{server.url}/models")
    text, _ = stream_text(client, server.url, chat("kept alive"))
    assert text == "echo: kept alive "
    assert nodelay and all(nodelay)
