"""``rag serve`` as an API others reach: keys off loopback, body limits, malformed requests, the
defaults for requests that name no temperature or length, and the ``rag:`` models served over
the data directory's index (a fake runtime with the real runtime's interface, a fake embedder)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rag.api import MAX_BODY_BYTES
from rag.config import Settings
from rag.errors import ConfigError
from rag.runtime import ChatStream
from rag.server import OpenAIServer, make_server, serve
from tests.fakes import FakeEmbedder

MODEL = "tiny:1"
RAG = "rag:tiny"


class EchoRuntime:
    """Answers ``echo:`` and the first words of the last message; streams until closed when the
    last message holds ``FOREVER``. Records every request and whether two ran at once."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        self.active = 0
        self.overlapped = False
        self.stopped = threading.Event()
        self._lock = threading.Lock()

    def load(self, model_dir: Path | str) -> str:
        return MODEL

    def models(self) -> list[str]:
        return [MODEL]

    def context_length(self, model_id: str) -> int:
        return 100_000

    def close(self) -> None:
        pass

    def stream_chat(self, model_id: str, messages: list[dict[str, str]], *, max_tokens: int | None,
                    temperature: float | None) -> ChatStream:  # fmt: skip
        self.requests.append({"messages": messages, "max_tokens": max_tokens, "temperature": temperature})
        last = messages[-1]["content"]
        forever = "FOREVER" in last

        def produce(stream: ChatStream) -> Iterator[str]:
            with self._lock:
                self.active += 1
                self.overlapped |= self.active > 1
            try:
                words = ["echo:", *last.split()[:6]]
                index = 0
                while forever or index < len(words):
                    time.sleep(self.delay)
                    yield ("tick " if forever else words[index] + " ")
                    index += 1
                stream.finish_reason = "stop"
            finally:
                with self._lock:
                    self.active -= 1
                if forever:
                    self.stopped.set()

        return ChatStream(produce, prompt_tokens=len(" ".join(m["content"] for m in messages).split()))


def start(httpd: OpenAIServer) -> threading.Thread:
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def runtime() -> EchoRuntime:
    return EchoRuntime()


@pytest.fixture
def server(runtime: EchoRuntime) -> Iterator[OpenAIServer]:
    httpd = make_server(runtime, temperature=0.2, max_tokens=512)
    start(httpd)
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=30) as c:
        yield c


def chat(content: str = "hello", model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def raw(server: OpenAIServer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; the status, headers and body of the answer."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def assert_openai_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict[str, Any]:
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"]
    return dict(error)


# --- defaults --------------------------------------------------------------------------------------


def test_a_request_naming_no_temperature_or_length_gets_the_settings(
    server: OpenAIServer, runtime: EchoRuntime, client: httpx.Client
) -> None:
    client.post(f"{server.url}/chat/completions", json=chat())
    client.post(f"{server.url}/chat/completions", json=chat(temperature=0, max_tokens=5))
    client.post(f"{server.url}/chat/completions", json=chat(temperature=1.5, max_completion_tokens=9))
    assert [(r["temperature"], r["max_tokens"]) for r in runtime.requests] == [(0.2, 512), (0.0, 5), (1.5, 9)]


# --- keys ------------------------------------------------------------------------------------------


def test_serving_beyond_loopback_without_a_key_is_refused_before_loading_anything(settings: Settings) -> None:
    runtime = EchoRuntime()
    with pytest.raises(ConfigError, match="RAG_API_KEY"):
        serve(settings, host="0.0.0.0", runtime=runtime, model_dirs=[settings.corpus_dir], documents=False)
    assert runtime.requests == [] and not (settings.data_dir / "serve.json").exists()


def test_beyond_loopback_every_route_but_health_wants_the_key(settings: Settings, tmp_path: Path) -> None:
    ready: list[OpenAIServer] = []
    thread = threading.Thread(target=serve, args=(settings.replace(api_key="s3cret"),), daemon=True, kwargs={
        "host": "0.0.0.0", "runtime": EchoRuntime(), "model_dirs": [tmp_path], "ready": ready.append,
        "documents": False})  # fmt: skip
    thread.start()
    deadline = time.monotonic() + 10
    while not ready and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready, "serve() never became ready"
    httpd = ready[0]
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with httpx.Client(trust_env=False, timeout=10) as c:
            assert c.get(f"{url}/health").status_code == 200
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                for response in (c.get(f"{url}/v1/models", headers=headers),
                                 c.post(f"{url}/v1/chat/completions", json=chat(), headers=headers)):  # fmt: skip
                    assert response.status_code == 401, headers
                    assert response.json()["error"]["code"] == "invalid_api_key"
            key = {"Authorization": "Bearer s3cret"}
            assert c.get(f"{url}/v1/models", headers=key).json()["data"][0]["id"] == MODEL
            answer = c.post(f"{url}/v1/chat/completions", json=chat("hi there"), headers=key).json()
            assert answer["choices"][0]["message"]["content"] == "echo: hi there "
    finally:
        httpd.shutdown()
        thread.join(10)


def test_beyond_loopback_the_retrieval_models_reach_their_bare_model_with_the_key(
    settings: Settings, tmp_path: Path
) -> None:
    """Their own request to this server's bare model carries RAG_API_KEY too."""
    (settings.corpus_dir / "solar.md").write_text(DOCS["solar.md"], encoding="utf-8")
    runtime = EchoRuntime()
    ready: list[OpenAIServer] = []
    thread = threading.Thread(target=serve, daemon=True, args=(settings.replace(
        api_key="s3cret", min_relevance=0.1, endpoints_file=settings.data_dir / "none.toml"),), kwargs={
        "host": "0.0.0.0", "runtime": runtime, "model_dirs": [tmp_path], "ready": ready.append,
        "embedder": FakeEmbedder()})  # fmt: skip
    thread.start()
    deadline = time.monotonic() + 20
    while not ready and time.monotonic() < deadline:
        time.sleep(0.01)
    httpd = ready[0]
    try:
        with httpx.Client(trust_env=False, timeout=30) as c:
            response = c.post(f"http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions",
                              json=chat("How long does light take to reach Earth?", RAG),
                              headers={"Authorization": "Bearer s3cret"})  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.json()["rag"]["model"] == MODEL and len(runtime.requests) == 1
    finally:
        httpd.shutdown()
        thread.join(10)


def test_on_loopback_no_key_is_checked(server: OpenAIServer, client: httpx.Client) -> None:
    response = client.post(f"{server.url}/chat/completions", json=chat(), headers={"Authorization": "Bearer anything"})
    assert response.status_code == 200


# --- limits and malformed requests -----------------------------------------------------------------


def post_head(length: str | None, *, extra: str = "") -> bytes:
    lines = ["POST /v1/chat/completions HTTP/1.1", "Host: x", "Connection: close", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + extra + "\r\n\r\n").encode()


def test_a_body_over_the_limit_is_refused_unread(server: OpenAIServer, runtime: EchoRuntime) -> None:
    error = assert_openai_error(*raw(server, post_head(str(MAX_BODY_BYTES + 1)) + b"{}"), 413)
    assert error["code"] == "request_too_large" and str(MAX_BODY_BYTES) in error["message"]
    assert runtime.requests == []


@pytest.mark.parametrize(("head", "status", "code"), [
    (post_head(None, extra="\r\nTransfer-Encoding: chunked") + b"2\r\n{}\r\n0\r\n\r\n", 411, "length_required"),
    (post_head("-5"), 400, "invalid_content_length"),
    (post_head("twelve"), 400, "invalid_content_length"),
    (post_head("9") + b"{not json", 400, None),
    (post_head("7") + b"[1, 2]}", 400, None),
    (post_head("12") + b"\xff\xfe\x00bad json!", 400, None),
    (post_head("4000") + b"[" * 2000 + b"]" * 2000, 400, None),
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    (b"GET /v1/models HTTP/9.9\r\n\r\n", 505, "http_version_not_supported"),
    (b"BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 501, "not_implemented"),
    (b"GET /v1/models HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", 431, None),
])  # fmt: skip
def test_malformed_requests_get_openai_shaped_errors(
    server: OpenAIServer, head: bytes, status: int, code: str | None
) -> None:
    error = assert_openai_error(*raw(server, head), status)
    if code is not None:
        assert error["code"] == code


def test_an_unexpected_failure_is_a_500_without_a_traceback(
    server: OpenAIServer, runtime: EchoRuntime, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> ChatStream:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(runtime, "stream_chat", broken)
    response = client.post(f"{server.url}/chat/completions", json=chat())
    error = assert_openai_error(response.status_code, dict(response.headers), response.content, 500)
    assert "ZeroDivisionError" not in error["message"] and "log" in error["message"]
    assert client.get(f"{server.url}/models").status_code == 200  # the server lives on


# --- the rag: models -------------------------------------------------------------------------------

DOCS = {
    "solar.md": "# The Sun\n\nLight from the Sun takes about 8 minutes and 20 seconds to reach Earth.\n",
    "compost.md": "# Compost\n\nTurn the compost pile every week so the compost pile gets air.\n",
}


@pytest.fixture
def documents(settings: Settings, tmp_path: Path) -> Iterator[tuple[OpenAIServer, EchoRuntime, Settings]]:
    """``serve()`` with the retrieval models, over a corpus of ``DOCS``, in a thread."""
    for name, text in DOCS.items():
        (settings.corpus_dir / name).write_text(text, encoding="utf-8")
    # temperature 0.3: not the default, so the check below sees the server's own setting applied
    settings = settings.replace(min_relevance=0.1, endpoints_file=settings.data_dir / "none.toml", temperature=0.3)
    runtime = EchoRuntime(delay=0.002)
    ready: list[OpenAIServer] = []
    thread = threading.Thread(target=serve, args=(settings,), daemon=True, kwargs={
        "runtime": runtime, "model_dirs": [tmp_path], "ready": ready.append, "embedder": FakeEmbedder()})  # fmt: skip
    thread.start()
    deadline = time.monotonic() + 20
    while not ready and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready, "serve() never became ready"
    yield ready[0], runtime, settings
    ready[0].shutdown()
    thread.join(10)
    assert not thread.is_alive()


def sse_events(response: httpx.Response) -> list[Any]:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_rag_serve_lists_and_answers_the_retrieval_model_from_its_index(
    documents: tuple[OpenAIServer, EchoRuntime, Settings], client: httpx.Client
) -> None:
    server, runtime, _ = documents
    listed = client.get(f"{server.url}/models").json()["data"]
    assert [(m["id"], m["owned_by"]) for m in listed] == [
        (MODEL, "rag (Foundry Local runtime)"), (RAG, "rag (answers from your documents)")]  # fmt: skip
    assert client.get(f"{server.url}/models/{RAG}").json()["answered_by"] == MODEL
    question = "How long does light from the Sun take to reach Earth?"
    answer = client.post(f"{server.url}/chat/completions", json=chat(question, RAG)).json()
    assert answer["model"] == RAG and answer["rag"]["model"] == MODEL
    assert answer["rag"]["passages"][0]["source"] == "solar.md"
    # The echo repeats the prompt's "Document 1 (solar.md, …)": no citation, and no word of the
    # passage's own to find one by, so the passages used are listed.
    assert answer["choices"][0]["message"]["content"].endswith("\n\n**Passages used**\n- [1] solar.md, The Sun")
    [inner] = runtime.requests  # the answer's own request came back to this server, for the bare model
    assert question in inner["messages"][-1]["content"] and "8 minutes and 20 seconds" in inner["messages"][-1]["content"]
    assert (inner["temperature"], inner["max_tokens"]) == (0.3, 512)
    with client.stream("POST", f"{server.url}/chat/completions",
                       json=chat(question, RAG, stream=True, stream_options={"include_usage": True})) as response:  # fmt: skip
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]" and events[-3]["rag"]["passages"] == answer["rag"]["passages"]
    streamed = "".join(c["delta"].get("content", "") for e in events[:-1] for c in e["choices"])
    assert streamed == answer["choices"][0]["message"]["content"]
    assert events[-2]["usage"]["completion_tokens"] > 0


def test_retrieval_answers_and_bare_requests_at_once_all_finish_one_generation_at_a_time(
    documents: tuple[OpenAIServer, EchoRuntime, Settings]
) -> None:
    """No deadlock on the generation lock: a rag: request holds none while its own request to
    the bare model waits in line behind the others."""
    server, runtime, _ = documents
    runtime.delay = 0.01
    results: dict[int, int] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        body = chat("How long does light take to reach Earth?", RAG if i % 2 == 0 else MODEL, stream=i % 3 == 0)
        try:
            with httpx.Client(trust_env=False, timeout=60) as c:
                results[i] = c.post(f"{server.url}/chat/completions", json=body).status_code
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert errors == [] and results == dict.fromkeys(range(6), 200)
    assert len(runtime.requests) == 6 and not runtime.overlapped


def test_a_file_dropped_into_the_corpus_is_answerable_without_a_restart(
    documents: tuple[OpenAIServer, EchoRuntime, Settings], client: httpx.Client
) -> None:
    server, _, settings = documents
    question = "What colour is the saffron kettle?"
    before = client.post(f"{server.url}/chat/completions", json=chat(question, RAG)).json()
    assert "kettle.md" not in json.dumps(before["rag"])
    (settings.corpus_dir / "kettle.md").write_text("# Kettle\n\nThe saffron kettle is painted bright orange.\n")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = client.post(f"{server.url}/chat/completions", json=chat(question, RAG)).json()
        if after["rag"]["passages"] and after["rag"]["passages"][0]["source"] == "kettle.md":
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"kettle.md never answered: {after['rag']}")


def test_a_client_leaving_a_retrieval_stream_stops_the_generation(
    documents: tuple[OpenAIServer, EchoRuntime, Settings], client: httpx.Client
) -> None:
    server, runtime, _ = documents
    body = chat("How long does light take to reach Earth? FOREVER", RAG, stream=True)
    with client.stream("POST", f"{server.url}/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert [line for line, _ in zip(lines, range(8)) if line.startswith("data: ")]
    assert runtime.stopped.wait(10), "the generation kept running after the client left"
    assert client.post(f"{server.url}/chat/completions", json=chat("next")).status_code == 200


def test_the_server_for_the_app_serves_no_retrieval_models(settings: Settings, tmp_path: Path) -> None:
    ready: list[OpenAIServer] = []
    thread = threading.Thread(target=serve, args=(settings,), daemon=True, kwargs={
        "runtime": EchoRuntime(), "model_dirs": [tmp_path], "ready": ready.append, "documents": False})  # fmt: skip
    thread.start()
    deadline = time.monotonic() + 10
    while not ready and time.monotonic() < deadline:
        time.sleep(0.01)
    httpd = ready[0]
    try:
        with httpx.Client(trust_env=False, timeout=10) as c:
            assert [m["id"] for m in c.get(f"{httpd.url}/models").json()["data"]] == [MODEL]
            response = c.post(f"{httpd.url}/chat/completions", json=chat("hi", RAG))
            assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    finally:
        httpd.shutdown()
        thread.join(10)
