"""The OpenAI wire format, both sides: events, errors, requests, model ids (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rag.protocol import (
    APIError,
    decode_payload,
    encode_event,
    error_message,
    parse_chat_request,
    parse_sse_lines,
    pick_model,
    request_body,
)
from rag.types import Message

MODEL = "fake-model:1"


def chat(text: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}]}


def test_parse_sse_lines() -> None:
    lines = [": ping", "data: {\"a\": 1}", "", "event: x", "data:[DONE]", "", "data: {\"b\": 2}"]
    assert list(parse_sse_lines(lines)) == [{"a": 1}, "[DONE]", {"b": 2}]


def test_decode_payload_rejects_non_json() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        decode_payload("hello")


@pytest.mark.parametrize(
    "body, expected",
    [
        (b'{"error": {"message": "boom"}}', "boom"),
        (b'{"error": "flat"}', "flat"),
        (b'{"detail": "fastapi style"}', "fastapi style"),
        (b"  plain\n text ", "plain text"),
        (b"", ""),
    ],
)
def test_error_message(body: bytes, expected: str) -> None:
    assert error_message(body) == expected


def test_alias_prefers_cpu_then_highest_version() -> None:
    ids = ["phi-4-mini-instruct-cuda-gpu:9", "phi-4-mini-instruct-generic-cpu:2",
           "phi-4-mini-instruct-generic-cpu:10"]  # fmt: skip
    assert pick_model("phi-4-mini", ids) == "phi-4-mini-instruct-generic-cpu:10"
    assert pick_model("phi-4-mini", ids[:1]) == "phi-4-mini-instruct-cuda-gpu:9"
    assert pick_model("phi-4", ["phi-4-mini-instruct-generic-cpu:1"]) is not None
    assert pick_model("phi-4-mini", ["phi-4-instruct-generic-cpu:1"]) is None


def test_parse_chat_request_keeps_the_options() -> None:
    body = json.dumps({**chat("x"), "stream": True, "stream_options": {"include_usage": True},
                       "max_completion_tokens": 7, "temperature": 0}).encode()  # fmt: skip
    request = parse_chat_request(body, [MODEL])
    assert (request.model, request.stream, request.include_usage, request.max_tokens, request.temperature) == (
        MODEL, True, True, 7, 0.0,
    )  # fmt: skip
    with pytest.raises(APIError):
        parse_chat_request(json.dumps({**chat("x"), "stream": "yes"}).encode(), [MODEL])


def test_request_body_and_encoded_events_round_trip() -> None:
    body = request_body([Message("system", "S"), Message("user", "Q\u2028?")], model="m", stream=True,
                        temperature=0.0, max_tokens=9, extra={"seed": 1})  # fmt: skip
    assert body == {"seed": 1, "model": "m", "messages": [{"role": "system", "content": "S"},
                    {"role": "user", "content": "Q\u2028?"}], "stream": True,
                    "stream_options": {"include_usage": True}, "temperature": 0.0, "max_tokens": 9}  # fmt: skip
    raw = encode_event(body).decode("utf-8")
    assert list(parse_sse_lines(raw.split("\n"))) == [body]  # U+2028 does not split a line
    assert parse_chat_request(json.dumps(body).encode(), ["m"]).messages[1]["content"] == "Q\u2028?"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [(b"{", 400, None), (b"[]", 400, None), (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "model"),
     (json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages"),
     (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "messages[0].role"),
     (json.dumps({"model": "other", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model")],
)  # fmt: skip
def test_bad_requests_are_refused_as_openai_would(body: bytes, status: int, param: str | None) -> None:
    with pytest.raises(APIError) as caught:
        parse_chat_request(body, [MODEL])
    assert (caught.value.status, caught.value.param) == (status, param)
    assert set(caught.value.body()["error"]) == {"message", "type", "param", "code"}
