"""Endpoint discovery (explicit settings, the Foundry Local service, the embedded runtime), as
the router opens the one discovered endpoint."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

import rag.endpoints as endpoints
from rag.chat import is_loopback
from rag.config import Settings
from rag.endpoints import foundry_service_url
from rag.errors import EndpointUnreachableError, UnknownModelError
from rag.routing import Connection, Router

FOUNDRY_MODELS = {
    "data": [
        {"id": "Phi-4-mini-instruct-generic-cpu:5", "object": "model"},
        {"id": "qwen2.5-0.5b-instruct-generic-cpu:4", "object": "model"},
    ]
}


def models_transport(body: dict, seen: list[str] | None = None) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(str(request.url))
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=body)
        return httpx.Response(404, json={"error": {"message": "not here"}})

    return httpx.MockTransport(handler)


def open_endpoint(settings: Settings, *, transport: httpx.MockTransport | None = None) -> Connection:
    """The discovered endpoint opened by a router (then closed again), as the app opens it."""

    async def go() -> Connection:
        router = Router(settings.replace(endpoints_file=settings.data_dir / "none.toml"), transport=transport)
        try:
            return await router.primary()
        finally:
            await router.aclose()

    return asyncio.run(go())


def test_explicit_settings_resolve_an_alias_and_fall_back_to_the_configured_window(settings: Settings) -> None:
    s = settings.replace(base_url="http://127.0.0.1:5273/v1", model="phi-4-mini", context_window=8192)

    endpoint = open_endpoint(s, transport=models_transport(FOUNDRY_MODELS))
    assert endpoint.model == "Phi-4-mini-instruct-generic-cpu:5"
    assert endpoint.models == ["Phi-4-mini-instruct-generic-cpu:5", "qwen2.5-0.5b-instruct-generic-cpu:4"]
    assert (endpoint.window(endpoint.model, s.context_window), endpoint.local, endpoint.origin) == (8192, True, "settings")
    assert endpoint.base_url == "http://127.0.0.1:5273/v1"


def test_the_endpoints_own_context_length_wins(settings: Settings) -> None:
    body = {"data": [{"id": "smollm2-135m", "context_length": 8192}, {"id": "gemma3-270m", "context_length": 32768}]}
    s = settings.replace(base_url="http://localhost:9/v1", model="gemma3-270m")

    endpoint = open_endpoint(s, transport=models_transport(body))
    assert endpoint.model == "gemma3-270m" and endpoint.window(endpoint.model, s.context_window) == 32768


def test_no_model_named_takes_the_first_listed(settings: Settings) -> None:
    s = settings.replace(base_url="http://127.0.0.1:1/v1")

    assert open_endpoint(s, transport=models_transport(FOUNDRY_MODELS)).model == "Phi-4-mini-instruct-generic-cpu:5"


def test_unknown_model_lists_what_is_offered(settings: Settings) -> None:
    s = settings.replace(base_url="http://127.0.0.1:1/v1", model="llama-70b")
    with pytest.raises(UnknownModelError, match="Phi-4-mini-instruct-generic-cpu:5"):
        open_endpoint(s, transport=models_transport(FOUNDRY_MODELS))


def test_unreachable_explicit_endpoint_names_the_url(settings: Settings) -> None:
    s = settings.replace(base_url="http://127.0.0.1:9/v1", connect_retries=0, connect_timeout=1.0)
    with pytest.raises(EndpointUnreachableError, match="127.0.0.1:9"):
        open_endpoint(s)


def fake_foundry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "foundry"
    exe.write_text(f"#!/bin/sh\ncat <<'OUT'\n{output}\nOUT\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_foundry_service_url_is_read_from_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_foundry(tmp_path, monkeypatch, "🟢 Model management service is running on http://127.0.0.1:53917/openai/status")
    assert foundry_service_url() == "http://127.0.0.1:53917/v1"


def test_foundry_not_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_foundry(tmp_path, monkeypatch, "🔴 Model management service is not running!")
    assert foundry_service_url() is None


def test_foundry_service_is_used_before_the_embedded_runtime(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_foundry(tmp_path, monkeypatch, "running on http://127.0.0.1:53917/openai/status")
    monkeypatch.setattr("rag.launcher.start_background", lambda s: pytest.fail("embedded runtime started"))
    monkeypatch.setattr(endpoints, "_listening", lambda url: url == "http://127.0.0.1:53917/v1")
    seen: list[str] = []
    endpoint = open_endpoint(settings, transport=models_transport(FOUNDRY_MODELS, seen))
    assert endpoint.origin == "foundry" and seen == ["http://127.0.0.1:53917/v1/models"]


def test_a_stale_foundry_status_falls_through_to_the_embedded_runtime(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_foundry(tmp_path, monkeypatch, "running on http://127.0.0.1:9/openai/status")  # nothing listens there
    monkeypatch.setattr("rag.launcher.start_background", lambda s: ("http://127.0.0.1:41000/v1", lambda: None))
    body = {"data": [{"id": "smollm2-135m"}]}
    assert open_endpoint(settings, transport=models_transport(body)).origin == "embedded"


def test_embedded_runtime_is_started_and_stopped_last(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(endpoints, "foundry_service_url", lambda: None)
    stopped: list[bool] = []
    monkeypatch.setattr("rag.launcher.start_background", lambda s: ("http://127.0.0.1:41000/v1", lambda: stopped.append(True)))
    body = {"data": [{"id": "smollm2-135m", "context_length": 8192}]}

    async def go() -> Connection:
        router = Router(settings.replace(endpoints_file=settings.data_dir / "none.toml"), transport=models_transport(body))
        endpoint = await router.primary()
        assert stopped == []
        await router.aclose()  # the app ends: the runtime it started stops
        return endpoint

    endpoint = asyncio.run(go())
    assert (endpoint.origin, endpoint.model, endpoint.window(endpoint.model, 4096)) == ("embedded", "smollm2-135m", 8192)
    assert stopped == [True]


def test_is_loopback() -> None:
    assert is_loopback("http://localhost:8000/v1") and is_loopback("http://[::1]:5/v1")
    assert not is_loopback("https://my-resource.openai.azure.com/openai/v1")
