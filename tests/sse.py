"""Server-sent event bodies as an OpenAI-compatible endpoint streams them, for the tests'
fake endpoints (at the httpx transport, or behind a local HTTP server)."""

from __future__ import annotations

import json
from typing import Any

import httpx

DONE = b"data: [DONE]\n\n"


def chunk(content: str | None = None, *, finish: str | None = None, model: str = "Phi-4-mini-instruct-generic-cpu:5",
          **fields: Any) -> bytes:  # fmt: skip
    """One ``chat.completion.chunk`` event: a delta with ``content`` (none: an empty delta)."""
    delta = {} if content is None else {"content": content}
    body = {"id": "c1", "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **fields}  # fmt: skip
    return f"data: {json.dumps(body)}\n\n".encode()


def sse(*parts: str, model: str = "fake-model", finish: str | None = "stop",
        usage: dict[str, int] | None = None) -> bytes:  # fmt: skip
    """A whole stream: one chunk per part, a chunk with ``finish``, a usage chunk when given,
    then ``[DONE]``."""
    body = b"".join(chunk(part, model=model) for part in parts) + chunk(finish=finish, model=model)
    if usage is not None:
        body += f"data: {json.dumps({'model': model, 'choices': [], 'usage': usage})}\n\n".encode()
    return body + DONE


def sse_response(body: bytes, status: int = 200) -> httpx.Response:
    """An ``httpx.Response`` streaming ``body`` as server-sent events."""
    return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})
