"""Finding the chat endpoint and its model, in a fixed order.

1. Explicit settings: ``RAG_BASE_URL`` (+ ``RAG_MODEL``, ``RAG_API_KEY``).
2. A running Foundry Local service, found with ``foundry service status`` when the ``foundry``
   command is installed (its port changes at every start, so it is asked, never guessed).
3. The embedded runtime (``python -m rag serve``): reused when one already runs for this data
   directory, else started in a subprocess and stopped again by ``Endpoint.close()``.

A model may be named by alias (``phi-4-mini``) or full id; it is resolved against the ids the
endpoint lists. The context window comes from the endpoint when it says (ours does, as the
non-standard ``context_length`` field), else from ``RAG_CONTEXT_WINDOW``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from rag.chat import ChatClient
from rag.config import Settings
from rag.errors import EndpointUnreachableError

FOUNDRY_URL = re.compile(r"https?://(?:127\.0\.0\.1|localhost|\[::1\]|[\w.-]+):\d+")


@dataclass
class Endpoint:
    """An endpoint ready to answer: client, resolved model, and what it offers."""

    base_url: str
    model: str
    models: list[str]
    context_window: int
    local: bool
    client: ChatClient
    origin: str  # "settings", "foundry", "embedded"
    _stop: Callable[[], None] = field(default=lambda: None, repr=False)

    async def close(self) -> None:
        await self.client.aclose()
        await asyncio.to_thread(self._stop)


def is_loopback(url: str) -> bool:
    """>>> is_loopback("http://127.0.0.1:5273/v1"), is_loopback("https://api.example.com/v1")
    (True, False)
    """
    host = re.sub(r"^\w+://", "", url).split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    return host in {"127.0.0.1", "localhost", "::1"} or host.startswith("127.")


def foundry_service_url(*, timeout: float = 10.0) -> str | None:
    """The URL of a running Foundry Local service, or None (no CLI, not running)."""
    exe = shutil.which("foundry")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, "service", "status"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = FOUNDRY_URL.search(done.stdout + done.stderr)
    return match.group(0) + "/v1" if match else None


def _client(settings: Settings, base_url: str, transport: httpx.AsyncBaseTransport | None) -> ChatClient:
    return ChatClient(
        base_url,
        client=httpx.AsyncClient(transport=transport) if transport is not None else None,
        api_key=str(settings.api_key),
        connect_timeout=settings.connect_timeout,
        first_token_timeout=settings.first_token_timeout,
        idle_timeout=settings.idle_timeout,
        connect_retries=settings.connect_retries,
    )


async def _connect(
    settings: Settings,
    base_url: str,
    origin: str,
    stop: Callable[[], None] = lambda: None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Endpoint:
    client = _client(settings, base_url, transport)
    try:
        cards = await client.model_cards()
        models = [str(c["id"]) for c in cards]
        # No model named: the endpoint's first (the embedded runtime lists the default first).
        model = models[0] if models and not settings.model else await client.resolve_model(settings.model)
    except BaseException:
        await client.aclose()
        await asyncio.to_thread(stop)
        raise
    card = next(c for c in cards if c["id"] == model)
    window = int(card.get("context_length") or settings.context_window)
    return Endpoint(
        base_url=client.chat_url.removesuffix("/chat/completions"),
        model=model,
        models=models,
        context_window=window,
        local=is_loopback(base_url),
        client=client,
        origin=origin,
        _stop=stop,
    )


async def open_endpoint(settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> Endpoint:
    """The first endpoint that answers, in the documented order; raises an ``EndpointError``
    (or ``ModelBuildError`` when the embedded runtime has no model built yet)."""
    if settings.base_url:
        return await _connect(settings, settings.base_url, "settings", transport=transport)
    url = await asyncio.to_thread(foundry_service_url)
    if url:
        try:
            return await _connect(settings, url, "foundry", transport=transport)
        except EndpointUnreachableError:
            pass  # a stale status line: fall through to the embedded runtime
    from rag.server import start_background

    url, stop = await asyncio.to_thread(start_background, settings)
    return await _connect(settings, url, "embedded", stop, transport=transport)
