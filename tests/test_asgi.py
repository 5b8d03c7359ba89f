"""The app's own API (rag/asgi.py): the ASGI app driven through httpx's ASGI transport, and
``start_api`` serving it for real with uvicorn on the running loop (a real socket)."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from rag.api import MAX_BODY_BYTES, DocumentModels
from rag.asgi import APIApp, start_api
from rag.config import Settings
from rag.library import Library
from rag.routing import Router
from tests.fakes import FakeEmbedder
from tests.sse import sse, sse_response

BASE = "http://127.0.0.1:5273/v1"
MODEL = "fake-model:1"
RAG = "rag:fake-model"
QUESTION = "How long does light from the Sun take to reach Earth?"
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Endpoint:
    """The model behind the router, at its transport."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": MODEL, "context_length": 4096}]})
        self.requests.append(json.loads(request.content))
        return sse_response(sse("About 8 minutes ", "and 20 seconds [1].", model=MODEL))


@pytest.fixture
async def parts(settings: Settings) -> AsyncIterator[tuple[Settings, Library, Router, Endpoint]]:
    (settings.corpus_dir / "solar.md").write_text(
        "# The Sun\n\nLight from the Sun takes about 8 minutes and 20 seconds to reach Earth.\n", encoding="utf-8"
    )
    settings = settings.replace(base_url=BASE, connect_retries=0, min_relevance=0.1,
                                endpoints_file=settings.data_dir / "none.toml")  # fmt: skip
    library = Library(settings, FakeEmbedder())
    await library.prepare()
    endpoint = Endpoint()
    router = Router(settings, transport=httpx.MockTransport(endpoint))
    try:
        yield settings, library, router, endpoint
    finally:
        await router.aclose()
        await library.close()


def client_for(parts: tuple[Settings, Library, Router, Endpoint], *, api_key: str = "") -> httpx.AsyncClient:
    settings, library, router, _ = parts
    app = APIApp(DocumentModels(settings, library, lambda: router), api_key=api_key)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": RAG, "messages": [{"role": "user", "content": QUESTION}], **extra}


async def test_it_lists_the_retrieval_models_and_answers_whole_and_streamed(
    parts: tuple[Settings, Library, Router, Endpoint],
) -> None:
    async with client_for(parts) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        listed = (await client.get("/v1/models")).json()
        assert [m["id"] for m in listed["data"]] == [RAG] and listed["object"] == "list"
        assert (await client.get(f"/v1/models/{RAG}")).json()["answered_by"] == MODEL
        assert (await client.get("/v1/models/nope")).json()["error"]["code"] == "model_not_found"
        whole = (await client.post("/v1/chat/completions", json=chat())).json()
        async with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    text = whole["choices"][0]["message"]["content"]
    assert text == "About 8 minutes and 20 seconds [1].\n\n**Sources**\n- [1] solar.md, The Sun"
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert "".join(c["delta"].get("content", "") for e in events for c in e["choices"]) == text
    assert events[-1]["rag"] == whole["rag"] and whole["rag"]["passages"][0]["source"] == "solar.md"


async def test_the_key_is_checked_on_every_route_but_health(parts: tuple[Settings, Library, Router, Endpoint]) -> None:
    async with client_for(parts, api_key="s3cret") as client:
        assert (await client.get("/health")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}):
            for response in (await client.get("/v1/models", headers=headers),
                             await client.post("/v1/chat/completions", json=chat(), headers=headers)):  # fmt: skip
                assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        ok = await client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"].startswith("About 8 minutes")


async def test_bodies_over_the_limit_are_refused_whether_they_say_their_length_or_not(
    parts: tuple[Settings, Library, Router, Endpoint],
) -> None:
    big = b'{"model": "rag:fake-model", "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]

    async with client_for(parts) as client:
        declared = await client.post("/v1/chat/completions", content=big)
        chunked = await client.post("/v1/chat/completions", content=chunks())
    for response in (declared, chunked):
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert parts[3].requests == []


@pytest.mark.parametrize(("method", "path", "content", "status"), [
    ("POST", "/v1/chat/completions", b"{not json", 400),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400),
    ("POST", "/v1/chat/completions", json.dumps({"model": RAG, "messages": []}).encode(), 400),
    ("POST", "/v1/chat/completions", json.dumps({"model": "fake-model:1", "messages": [
        {"role": "user", "content": "x"}]}).encode(), 404),
    ("POST", "/v1/completions", b"{}", 404),
    ("DELETE", "/v1/models", b"", 405),
    ("GET", "/v1/chat/completions", b"", 405),
])  # fmt: skip
async def test_bad_requests_get_openai_shaped_errors(
    parts: tuple[Settings, Library, Router, Endpoint], method: str, path: str, content: bytes, status: int
) -> None:
    async with client_for(parts) as client:
        response = await client.request(method, path, content=content)
    assert response.status_code == status and response.headers["content-type"] == "application/json"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_an_unexpected_failure_is_a_500_without_a_traceback(
    parts: tuple[Settings, Library, Router, Endpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: DocumentModels, data: Any) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(DocumentModels, "respond", broken)
    async with client_for(parts) as client:
        response = await client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert "ZeroDivisionError" not in response.text


# --- start_api: uvicorn on the running loop ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_start_api_serves_on_its_port_until_stopped(parts: tuple[Settings, Library, Router, Endpoint]) -> None:
    settings, library, router, _ = parts
    port = free_port()
    api = await start_api(settings.replace(api_port=port), library, lambda: router)
    assert api is not None and api.url == f"http://127.0.0.1:{port}/v1"
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            assert [m["id"] for m in (await client.get(f"{api.url}/models")).json()["data"]] == [RAG]
            answer = (await client.post(f"{api.url}/chat/completions", json=chat())).json()
            assert answer["rag"]["passages"][0]["source"] == "solar.md"
    finally:
        await api.stop()
    assert api.task.done()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            await client.get(f"{api.url}/models")


async def test_no_api_when_off_taken_or_exposed_without_a_key(
    parts: tuple[Settings, Library, Router, Endpoint], caplog: pytest.LogCaptureFixture
) -> None:
    settings, library, router, _ = parts
    caplog.set_level(logging.INFO, logger="rag.asgi")
    assert await start_api(settings.replace(api_port=0), library, lambda: router) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert await start_api(settings.replace(api_port=port), library, lambda: router) is None
    assert await start_api(settings.replace(api_host="0.0.0.0", api_port=free_port()), library, lambda: router) is None
    said = [r.getMessage() for r in caplog.records]
    assert "RAG_API_PORT=0" in said[0]
    assert f"cannot listen on 127.0.0.1:{port}" in said[1] and "RAG_API_PORT" in said[1]
    assert "refusing to serve the API on 0.0.0.0 without a key" in said[2] and "RAG_API_KEY" in said[2]


# --- the real app -----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_running_app_serves_the_api_from_its_index_and_stops_with_it(tmp_path: Any) -> None:
    """``chainlit run app.py`` with ``RAG_API_PORT``: the real embedding model and the shipped
    documents behind the API, a scripted model behind the app; SIGTERM stops both servers."""
    from http.server import BaseHTTPRequestHandler

    from tests.apphost import AppProcess, http_server, send_body

    class Model(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            send_body(self, json.dumps({"data": [{"id": "scripted:1", "context_length": 8192}]}).encode())

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            send_body(self, sse("About 8 minutes ", "and 20 seconds [1].", model="scripted:1"), "text/event-stream")

    api_port = free_port()
    with http_server(Model) as model_url:
        app = AppProcess(tmp_path, {"RAG_BASE_URL": model_url, "RAG_API_PORT": str(api_port)})
        try:
            app.start()
            with httpx.Client(trust_env=False, timeout=240) as client:
                url = f"http://127.0.0.1:{api_port}/v1"
                assert [m["id"] for m in client.get(f"{url}/models").json()["data"]] == ["rag:scripted"]
                answer = client.post(f"{url}/chat/completions", json={"model": "rag:scripted", "messages": [
                    {"role": "user", "content": QUESTION}]}).json()  # fmt: skip
        finally:
            app.stop()
        code = app.process.returncode if app.process is not None else None
    text = answer["choices"][0]["message"]["content"]
    assert text.startswith("About 8 minutes and 20 seconds [1].\n\n**Sources**\n- [1] solar-system-fact-sheet.md")
    assert answer["rag"]["passages"][0]["source"] == "solar-system-fact-sheet.md"
    log = app.output()
    assert f"OpenAI-compatible API on http://127.0.0.1:{api_port}/v1" in log
    assert "Traceback" not in log, log[-3000:]
    assert code is not None and code in (0, -15), (code, log[-2000:])
