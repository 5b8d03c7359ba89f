"""The OpenAI chat-completions wire format, for both sides: the client (``rag.chat``) and our
server (``rag.server``).

- Server-sent events: split lines only on CR, LF and CRLF as the SSE spec says
  (``str.splitlines`` would also split on U+2028 and friends, which a model may well emit inside
  a JSON string), collect ``data:`` lines into events, decode each to JSON or ``[DONE]``; and
  the other way, ``encode_event``.
- Queue notices (ours, an extension): while a server holds a streamed request in line, it may
  send SSE comments ``: queued N`` (N requests ahead; ``: queued 0`` when its turn comes), each
  followed by a blank line, before the first chunk. Comments are part of SSE, so OpenAI clients
  skip them; ``rag.chat`` reads them (``queue_notice``).
- Chunks and completions: the text of a choice wherever a server put it (``delta``,
  ``message``, ``text``), the finish reason, usage, and the quirks Foundry Local's service has
  shipped (a last chunk with empty ``choices``, no ``finish_reason``).
- Errors: OpenAI's ``{"error": {"message", "type", "param", "code"}}`` both read
  (``error_message``) and written (``APIError``).
- Requests: the body a client sends (``request_body``) and its validation on the server
  (``parse_chat_request``).
- Model ids: ``pick_model`` resolves an alias (``phi-4-mini``, ``smollm2-135m``) to an id the
  endpoint lists (``Phi-4-mini-instruct-generic-cpu:5``, ``smollm2-135m:1``), on both sides.

Everything here is pure: no sockets, no clocks.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from rag.types import ChatDone, Message

DONE = "[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"
ROLES = ("system", "developer", "user", "assistant")
_CONTEXT_LENGTH = re.compile(r"context length|context window|maximum context|too long|exceeds", re.I)
# Words after the alias in a Foundry Local id that only name a build of the same model.
_VARIANT_WORDS = frozenset(
    "instruct it chat generic cpu gpu cuda npu qnn openvino vitis dml directml webgpu trt rtx "
    "trtrtx onnx int4 int8 fp16 fp32 bf16 q4 q8 awq gptq rtn block acc level".split()
)


# --- Server-sent events ---------------------------------------------------------------------

QUEUE_NOTICE = "queued"


def encode_queue_notice(ahead: int) -> bytes:
    """The SSE comment that tells a waiting client how many requests are ahead of its own.

    >>> encode_queue_notice(2)
    b': queued 2\\n\\n'
    """
    return f": {QUEUE_NOTICE} {max(0, int(ahead))}\n\n".encode("ascii")


def queue_notice(line: str) -> int | None:
    """The number of requests ahead that an SSE line announces, or ``None`` for any other line.

    >>> queue_notice(": queued 2"), queue_notice(":queued 0"), queue_notice(": ping"), queue_notice("data: 1")
    (2, 0, None, None)
    """
    if not line.startswith(":"):
        return None
    word, _, number = line[1:].strip().partition(" ")
    return int(number) if word == QUEUE_NOTICE and number.isdigit() else None


class LineSplitter:
    """Incremental SSE line splitting: CRLF, LF or CR end a line, nothing else does."""

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, text: str) -> list[str]:
        self._buffer += text
        # A trailing CR may be the first half of a CRLF: wait for the next chunk.
        cut = len(self._buffer) - 1 if self._buffer.endswith("\r") else len(self._buffer)
        head, self._buffer = self._buffer[:cut], self._buffer[cut:]
        lines = re.split(r"\r\n|\r|\n", head)
        self._buffer = lines.pop() + self._buffer
        return lines

    def flush(self) -> list[str]:
        rest, self._buffer = self._buffer.rstrip("\r"), ""
        return [rest] if rest else []


class EventBuilder:
    """Collects ``data:`` lines until a blank line ends the event; ignores comments and
    the other SSE fields (``event:``, ``id:``, ``retry:``)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed_line(self, line: str) -> str | None:
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None  # keep-alive comment, e.g. ": ping"
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        payload, self._data = "\n".join(self._data), []
        return payload


def decode_payload(payload: str) -> list[dict[str, Any] | str]:
    """One event's data -> JSON objects, or ``"[DONE]"``.

    An event whose ``data:`` lines are each a whole JSON object (a server that forgot the
    blank lines between events) gives one object per line.

    >>> decode_payload('{"a": 1}\\n{"a": 2}')
    [{'a': 1}, {'a': 2}]
    """
    if payload.strip() == DONE:
        return [DONE]
    try:
        return [as_object(json.loads(payload))]
    except json.JSONDecodeError:
        pass
    out: list[dict[str, Any] | str] = []
    for line in payload.split("\n"):
        if not line.strip():
            continue
        if line.strip() == DONE:
            out.append(DONE)
            continue
        try:
            out.append(as_object(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ValueError(f"a stream event is not JSON: {payload[:200]!r}") from exc
    return out


def as_object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def parse_sse_lines(lines: Iterable[str]) -> Iterator[dict[str, Any] | str]:
    """SSE lines -> each event's JSON object, or ``"[DONE]"``; comments and blanks skipped.

    >>> list(parse_sse_lines([": ping", 'data:{"x": 1}', "", "data: [DONE]", ""]))
    [{'x': 1}, '[DONE]']
    """
    builder = EventBuilder()
    for line in lines:
        payload = builder.feed_line(line.rstrip("\r"))
        if payload is not None:
            yield from decode_payload(payload)
    payload = builder.flush()  # the stream closed without a final blank line
    if payload is not None:
        yield from decode_payload(payload)


def encode_event(data: dict[str, Any]) -> bytes:
    """One SSE event carrying ``data`` as JSON (UTF-8, not ASCII-escaped).

    >>> encode_event({"a": "é"})
    b'data: {"a": "\\xc3\\xa9"}\\n\\n'
    """
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


# --- Chunks, completions and errors ---------------------------------------------------------


def first_choice(body: dict[str, Any]) -> dict[str, Any]:
    choices = body.get("choices")
    if not isinstance(choices, list):
        return {}
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return {}


def choice_text(choice: dict[str, Any]) -> str:
    """Text of a choice, whether the server put it in ``delta``, ``message`` or ``text``."""
    for key in ("delta", "message"):
        part = choice.get(key)
        if isinstance(part, dict) and isinstance(part.get("content"), str):
            return str(part["content"])
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def usage_of(value: Any) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    return {k: v for k, v in value.items() if isinstance(v, int) and not isinstance(v, bool)}


def error_message(body: bytes | str, *, limit: int = 500) -> str:
    """The server's own message from an error body: OpenAI JSON, or the text truncated.

    >>> error_message(b'{"error": {"message": "boom", "type": "server_error"}}')
    'boom'
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        for candidate in (data.get("error"), data):
            if isinstance(candidate, str) and candidate.strip():
                return candidate.strip()
            if isinstance(candidate, dict):
                for key in ("message", "detail", "error"):
                    if isinstance(candidate.get(key), str) and candidate[key].strip():
                        return str(candidate[key]).strip()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_context_length_message(message: str) -> bool:
    """Whether a server's error message says the request did not fit the context window.

    >>> is_context_length_message("This model's maximum context length is 4096 tokens")
    True
    """
    return bool(_CONTEXT_LENGTH.search(message))


class StreamState:
    """What a stream has said so far: the last finish_reason, usage and model seen."""

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.model: str | None = None
        self.started = False  # a delta was received
        self.ended = False  # [DONE] was received

    def take(self, event: dict[str, Any] | str) -> str:
        """Record one event; returns its text (often empty)."""
        if event == DONE or not isinstance(event, dict):
            self.ended = self.ended or event == DONE
            return ""
        if isinstance(event.get("model"), str) and event["model"]:
            self.model = event["model"]
        self.usage = usage_of(event.get("usage")) or self.usage
        choice = first_choice(event)
        if isinstance(choice.get("finish_reason"), str) and choice["finish_reason"]:
            self.finish_reason = choice["finish_reason"]
        text = choice_text(choice)
        self.started = self.started or bool(text)
        return text

    def done(self) -> ChatDone:
        return ChatDone(finish_reason=self.finish_reason, usage=self.usage, model=self.model)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def envelope(kind: str, model: str, *, id_: str | None = None) -> dict[str, Any]:
    """The fields every completion (``chat.completion``) or chunk (``chat.completion.chunk``) carries."""
    return {"id": id_ or completion_id(), "object": kind, "created": int(time.time()), "model": model}


def request_body(
    messages: Sequence[Message],
    *,
    model: str,
    stream: bool,
    temperature: float | None = None,
    max_tokens: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON a client sends to ``/v1/chat/completions``.

    >>> request_body([Message("user", "Hi")], model="m", stream=True, max_tokens=5)["stream_options"]
    {'include_usage': True}
    """
    body: dict[str, Any] = dict(extra or {})
    body["model"] = model
    body["messages"] = [{"role": m.role, "content": m.content} for m in messages]
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    if temperature is not None:
        body["temperature"] = temperature
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def parse_completion(data: dict[str, Any]) -> tuple[str, ChatDone]:
    """A whole (``stream: false``) completion: its text and how it ended.

    >>> parse_completion({"model": "m", "choices": [{"message": {"content": "Hi"}, "finish_reason": "stop"}]})
    ('Hi', ChatDone(finish_reason='stop', usage=None, model='m'))
    """
    choice = first_choice(data)
    done = ChatDone(
        finish_reason=choice.get("finish_reason") or None,
        usage=usage_of(data.get("usage")),
        model=data.get("model") or None,
    )
    return choice_text(choice), done



# --- Model ids ------------------------------------------------------------------------------


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[-_.\s]+", name.lower()) if w]


def _split_version(model_id: str) -> tuple[str, int]:
    base, sep, version = model_id.rpartition(":")
    if sep and version.isdigit():
        return base, int(version)
    return model_id, -1


def pick_model(name: str, available: Sequence[str]) -> str | None:
    """The id ``name`` stands for: the id itself, or the best variant of an alias.

    Variants whose extra words only name a build (``instruct-generic-cpu``) beat other models
    that merely share the prefix (``phi-4-mini-reasoning``); then CPU builds; then the
    highest version.

    >>> pick_model("phi-4-mini", ["Phi-4-mini-instruct-generic-gpu:5",
    ...     "Phi-4-mini-instruct-generic-cpu:4", "Phi-4-mini-instruct-generic-cpu:5"])
    'Phi-4-mini-instruct-generic-cpu:5'
    >>> pick_model("smollm2-135m", ["smollm2-135m:1"]), pick_model("x", ["smollm2-135m:1"])
    ('smollm2-135m:1', None)
    """
    if name in available:
        return name
    folded = [m for m in available if m.casefold() == name.casefold()]
    if folded:
        return folded[0]
    alias = _words(_split_version(name)[0])
    if not alias:
        return None
    candidates = []
    for model_id in available:
        base, version = _split_version(model_id)
        words = _words(base)
        if words[: len(alias)] != alias:
            continue
        extra = words[len(alias) :]
        clean = all(w in _VARIANT_WORDS for w in extra)
        candidates.append((clean, "cpu" in extra, version, -len(extra), model_id))
    if not candidates:
        return None
    # max() keeps the first of equals: sort by id so ties resolve the same way every time.
    return max(sorted(candidates, key=lambda c: c[-1]), key=lambda c: c[:-1])[-1]


# --- Errors, as our server writes them -----------------------------------------------------


class APIError(Exception):
    """An error answered with OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- Requests, as our server reads them ------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None


def _text_of(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{index}].content: only text parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts", param="messages")


def parse_chat_request(body: bytes, available: Sequence[str]) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body; raise ``APIError`` as OpenAI would."""
    return chat_request(decode_body(body), available)


def decode_body(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object; ``APIError`` 400 when it is not one.

    >>> decode_body(b'{"model": "m"}')
    {'model': 'm'}
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}).") from exc
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return data


def chat_request(data: dict[str, Any], available: Sequence[str]) -> ChatRequest:
    """Validate a decoded ``/v1/chat/completions`` body against the ``available`` model ids.

    Fields this server does not act on (``tools``, ``tool_choice``, ``top_p``, ``user``, …) are
    ignored, as a model that never calls tools would."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "You must provide a model parameter.", param="model", code="missing_required_parameter")
    raw_messages = data.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise APIError(
            400, "You must provide a non-empty messages array.", param="messages", code="missing_required_parameter"
        )
    messages = []
    for index, message in enumerate(raw_messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(
                400, f"messages[{index}].role must be one of {', '.join(ROLES)}", param=f"messages[{index}].role"
            )
        content = message.get("content")
        if content is None and message["role"] == "assistant":
            content = ""  # OpenAI allows it (an assistant turn that only called tools)
        messages.append({"role": message["role"], "content": _text_of(content, index)})
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be a boolean", param="stream")
    options = data.get("stream_options") or {}
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise APIError(400, "max_tokens must be a positive integer", param="max_tokens")
    temperature = data.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2
    ):
        raise APIError(400, "temperature must be a number between 0 and 2", param="temperature")
    if data.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    resolved = pick_model(model, available)
    if resolved is None:
        raise APIError(
            404,
            f"The model '{model}' does not exist or is not loaded. Available models: {', '.join(available) or 'none'}.",
            param="model",
            code="model_not_found",
        )
    return ChatRequest(resolved, messages, stream, include_usage, max_tokens,
                       None if temperature is None else float(temperature))  # fmt: skip
