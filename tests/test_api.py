"""The retrieval models (rag/api.py): a real library (fake embedder, real index) and a scripted
OpenAI endpoint at the router's transport; the replies compared whole."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from rag.api import (
    EMPTY_ANSWER,
    CitationSplitter,
    DocumentModels,
    Reply,
    check_key,
    is_retrieval_model,
    key_policy,
    parse_request,
    passages_field,
    remembered,
    retrieval_models,
)
from rag.citations import normalize_citations
from rag.config import Settings
from rag.errors import ConfigError
from rag.library import Library
from rag.prompting import SYSTEM_PROMPT
from rag.protocol import APIError
from rag.routing import Router
from rag.types import Chunk, Hit, Message
from tests.fakes import FakeEmbedder
from tests.sse import DONE, chunk, sse, sse_response

BASE = "http://127.0.0.1:5273/v1"
MODEL = "fake-model:1"
RAG = "rag:fake-model"
pytestmark = pytest.mark.anyio

DOCS = {
    "solar.md": "# The Sun\n\nLight from the Sun takes about 8 minutes and 20 seconds to reach Earth.\n",
    "compost.md": "# Compost\n\nTurn the compost pile every week so the compost pile gets air.\n",
    "planets.md": "# Planets\n\nJupiter is the largest planet; Mercury orbits closest to the Sun.\n",
}
QUESTION = "How long does light from the Sun take to reach Earth?"
USAGE = {"prompt_tokens": 180, "completion_tokens": 9, "total_tokens": 189}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Endpoint:
    """The model's endpoint at the transport: lists ``MODEL`` (and a ``rag:`` model, which the
    router must not take for its own); ``reply(body)`` answers each chat request."""

    def __init__(self, reply: Callable[[dict[str, Any]], httpx.Response]) -> None:
        self.reply = reply
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": MODEL, "context_length": 4096}, {"id": RAG}]})
        body = json.loads(request.content)
        self.requests.append(body)
        return self.reply(body)

    @property
    def answers(self) -> list[dict[str, Any]]:
        """The answer requests (streamed), not the rewrites."""
        return [r for r in self.requests if r.get("stream")]


def streaming(*parts: str, finish: str = "stop", usage: dict[str, int] | None = USAGE) -> Endpoint:
    return Endpoint(lambda body: sse_response(sse(*parts, model=MODEL, finish=finish, usage=usage)))


@pytest.fixture
async def library(settings: Settings) -> AsyncIterator[Library]:
    for name, text in DOCS.items():
        (settings.corpus_dir / name).write_text(text, encoding="utf-8")
    library = Library(settings, FakeEmbedder())
    await library.prepare()
    try:
        yield library
    finally:
        await library.close()


def documents(library: Library, endpoint: Endpoint, **changes: Any) -> tuple[DocumentModels, Router]:
    settings = library.settings.replace(**{"base_url": BASE, "connect_retries": 0, "min_relevance": 0.1,
                                           "endpoints_file": library.settings.data_dir / "none.toml", **changes})
    router = Router(settings, transport=httpx.MockTransport(endpoint))
    return DocumentModels(settings, library, lambda: router), router


def body(question: str = QUESTION, **extra: Any) -> dict[str, Any]:
    return {"model": RAG, "messages": [{"role": "user", "content": question}], **extra}


async def streamed(reply: Reply) -> list[Any]:
    """The reply's server-sent events, decoded (``"[DONE]"`` as is)."""
    assert reply.status == 200 and reply.chunks is not None and reply.body is None
    events = []
    async for data in reply.sse():
        payload = data.decode().removeprefix("data: ").strip()
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def text_of(events: list[Any]) -> str:
    return "".join(c["delta"].get("content", "") for e in events if isinstance(e, dict) for c in e.get("choices", []))


# --- names and requests -----------------------------------------------------------------------


def test_each_plain_model_gets_one_retrieval_model() -> None:
    assert retrieval_models(["qwen2.5-coder-0.5b:1", "smollm2-135m:1", "rag:x", "Phi-4-mini-instruct-generic-cpu"]) == {
        "rag:qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b:1",
        "rag:smollm2-135m": "smollm2-135m:1",
        "rag:Phi-4-mini-instruct-generic-cpu": "Phi-4-mini-instruct-generic-cpu",
    }
    assert is_retrieval_model("rag:x") and not is_retrieval_model("x:1")


def test_a_request_becomes_question_and_history_without_system_tools_or_our_footer() -> None:
    request = parse_request(
        {"model": "rag:fake-model:1", "stream": True, "temperature": 0, "max_tokens": 99,
         "tools": [{"type": "function", "function": {"name": "search_web"}}], "tool_choice": "required",
         "messages": [
             {"role": "system", "content": "You are a pirate."},
             {"role": "user", "content": "How long does light take?"},
             {"role": "assistant", "content": "About 8 minutes [1, 2].\n\n**Sources**\n- [1] solar.md, The Sun\n- [2] x.md"},
             {"role": "assistant", "content": None, "tool_calls": [{"id": "t", "type": "function"}]},
             {"role": "tool", "tool_call_id": "t", "content": "{}"},
             {"role": "user", "content": [{"type": "text", "text": "And from "}, {"type": "text", "text": "Mars? "}]},
         ]},
        {RAG: MODEL},
    )  # fmt: skip
    assert (request.model, request.answerer, request.question) == (RAG, MODEL, "And from Mars?")
    assert request.history == (Message("user", "How long does light take?"), Message("assistant", "About 8 minutes."))
    assert (request.stream, request.temperature, request.max_tokens) == (True, 0.0, 99)


def test_only_the_last_twelve_earlier_turns_are_kept() -> None:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(20)]
    request = parse_request({"model": RAG, "messages": [*turns, {"role": "user", "content": "now?"}]}, {RAG: MODEL})
    assert [m.content for m in request.history] == [f"turn {i}" for i in range(8, 20)]


@pytest.mark.parametrize(
    ("data", "status", "param"),
    [
        ({"model": "rag:nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"model": RAG, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, 400,
         "messages"),
        ({"model": RAG, "messages": [{"role": "user", "content": "   "}]}, 400, "messages"),
        ({"model": RAG, "messages": [{"role": "user", "content": 42}]}, 400, "messages"),
        ({"model": RAG, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
        ({"model": RAG, "messages": "hi"}, 400, "messages"),
        ({"model": RAG, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
        ({"model": RAG, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_as_openai_would(data: dict[str, Any], status: int, param: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_request(data, {RAG: MODEL})
    assert (caught.value.status, caught.value.param) == (status, param)


def test_an_earlier_reply_is_remembered_without_our_sources() -> None:
    assert remembered("Weekly [2].\n\n**Passages used**\n- [1] a.md\n- [2] b.md, page 3") == "Weekly."
    assert remembered("See **Sources** below [1].") == "See **Sources** below."


@pytest.mark.parametrize("text", [
    "Light takes about 8 minutes [1, 2]. It travels [3;1] fast [12] [x] [1, ",
    "  [1][2] only markers [1 , 2]  \n\n",
    "No citations at all, just text.   ",
    "Nested [[1, 2]] and [] and [1,2,3,4] end",
])  # fmt: skip
def test_splitting_citations_as_they_stream_gives_what_present_gives(text: str) -> None:
    rng = random.Random(text)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(6, len(text) - 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        splitter = CitationSplitter()
        out = "".join(splitter.feed(p) for p in pieces) + splitter.flush()
        assert out == normalize_citations(text).strip(), pieces


def test_a_passage_inside_a_table_carries_the_tables_header_row() -> None:
    rows = Chunk("t", "planets.md", "| Mars | 2 |\n| Jupiter | 95 |", 40, 70, table_header="| Planet | Moons |")
    prose = Chunk("p", "planets.md", "Mars has two moons.", 0, 19)
    fields = passages_field([Hit(rows, 1.0, 1, similarity=0.5), Hit(prose, 0.9, 2, similarity=0.4)], cited=[1])
    assert [(f["n"], f["table_header"], f["cited"]) for f in fields] == [(1, "| Planet | Moons |", True), (2, None, False)]


# --- keys -------------------------------------------------------------------------------------


def test_a_key_is_required_off_loopback_only() -> None:
    assert key_policy("127.0.0.1", "") == "" and key_policy("localhost", "k") == ""
    assert key_policy("0.0.0.0", "k") == "k"
    with pytest.raises(ConfigError, match="RAG_API_KEY"):
        key_policy("0.0.0.0", "")
    assert check_key("Bearer k", "k") is None and check_key("bearer k", "k") is None
    for sent in (None, "", "Bearer", "Bearer kk", "Basic k", "k"):
        refused = check_key(sent, "k")
        assert refused is not None and refused.status == 401 and refused.code == "invalid_api_key", sent


# --- answers ----------------------------------------------------------------------------------


async def test_models_lists_one_retrieval_model_per_model_of_the_endpoint(library: Library) -> None:
    models, router = documents(library, streaming("x"))
    try:
        assert await models.cards() == [
            {"id": RAG, "object": "model", "created": 0, "owned_by": "rag (answers from your documents)",
             "answered_by": MODEL}
        ]  # fmt: skip
    finally:
        await router.aclose()


async def test_a_whole_answer_cites_lists_its_sources_and_carries_the_passages(library: Library) -> None:
    endpoint = streaming("Light takes about ", "8 minutes and 20 seconds [1, 2].")
    # Not the default temperature (0): a setting that never reached the request would look the same.
    models, router = documents(library, endpoint, temperature=0.3)
    try:
        reply = await models.respond(body(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto"))
    finally:
        await router.aclose()
    assert reply.status == 200 and reply.chunks is None and reply.body is not None
    answer = reply.body
    extra = answer.pop("rag")
    passages = extra.pop("passages")
    assert [p["n"] for p in passages] == list(range(1, len(passages) + 1)) and len(passages) >= 2
    assert set(passages[0]) == {"n", "source", "page", "headings", "text", "table_header", "excerpt", "score",
                                 "cited"}
    assert passages[0]["source"] == "solar.md" and "8 minutes and 20 seconds" in passages[0]["text"]
    assert all(p["cited"] == (p["n"] in (1, 2)) for p in passages)
    assert all(0.1 <= p["score"] <= 1.0 and p["page"] is None for p in passages)
    assert extra == {"model": MODEL, "question": QUESTION, "relevant": True, "min_relevance": 0.1, "cited": [1, 2],
                     "finish_reason": "stop", "fallback": ""}  # fmt: skip
    second = f"{passages[1]['source']}, {passages[1]['headings'][0]}"
    assert answer["choices"] == [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": (
        "Light takes about 8 minutes and 20 seconds [1][2].\n\n"
        f"**Sources**\n- [1] solar.md, The Sun\n- [2] {second}")}}]  # fmt: skip
    assert answer["usage"] == USAGE and answer["model"] == RAG and answer["object"] == "chat.completion"
    [sent] = endpoint.requests
    assert sent["model"] == MODEL and sent["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert (sent["temperature"], sent["max_tokens"]) == (0.3, 512)  # RAG_TEMPERATURE, RAG_MAX_ANSWER_TOKENS
    assert "tools" not in sent and "tool_choice" not in sent
    assert "tool_calls" not in answer["choices"][0]["message"]


async def test_a_stream_says_the_same_as_the_whole_answer_with_the_passages_on_its_last_chunk(
    library: Library,
) -> None:
    parts = ("  Light takes", " about 8 minutes [1", ", 2", "]. Jupiter ", "is big [3", "].  ")
    models, router = documents(library, streaming(*parts))
    try:
        whole = (await models.respond(body())).body
        reply = await models.respond(body(stream=True, stream_options={"include_usage": True}))
        events = await streamed(reply)
    finally:
        await router.aclose()
    assert whole is not None and events[-1] == "[DONE]"
    chunks, usage, final = events[:-1], events[-2], events[-3]
    assert text_of(events) == whole["choices"][0]["message"]["content"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "[1][2]" in text_of(events) and len([c for c in chunks if text_of([c])]) > 2  # streamed, in pieces
    assert final["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert final["rag"] == whole["rag"]
    assert usage["choices"] == [] and usage["usage"] == USAGE
    assert all("rag" not in c for c in chunks if c is not final)
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and {c["model"] for c in chunks} == {RAG}
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks[:-1])


async def test_without_include_usage_a_stream_has_no_usage(library: Library) -> None:
    models, router = documents(library, streaming("About 8 minutes [1]."))
    try:
        events = await streamed(await models.respond(body(stream=True)))
    finally:
        await router.aclose()
    assert all("usage" not in e for e in events[:-1]) and events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_an_uncited_answer_gets_the_passage_that_holds_what_it_says(library: Library) -> None:
    models, router = documents(library, streaming("About 8 minutes and 20 seconds."))
    try:
        answer = (await models.respond(body())).body
    finally:
        await router.aclose()
    assert answer is not None
    text = answer["choices"][0]["message"]["content"]
    assert text.startswith("About 8 minutes and 20 seconds. [1]\n\n**Sources**\n- [1] solar.md")
    assert answer["rag"]["cited"] == [1]


async def test_an_answer_citing_nothing_lists_the_passages_it_was_given(library: Library) -> None:
    models, router = documents(library, streaming("Yes."))  # nothing of it is in a passage
    try:
        answer = (await models.respond(body())).body
    finally:
        await router.aclose()
    assert answer is not None
    text = answer["choices"][0]["message"]["content"]
    passages = answer["rag"]["passages"]
    listed = "\n".join(f"- [{p['n']}] {p['source']}, {p['headings'][0]}" for p in passages)
    assert text == f"Yes.\n\n**Passages used**\n{listed}"
    assert answer["rag"]["cited"] == [] and not any(p["cited"] for p in passages)


async def test_usage_is_counted_when_the_model_does_not_say(library: Library) -> None:
    models, router = documents(library, streaming("About 8 minutes [1].", usage=None))
    try:
        answer = (await models.respond(body())).body
    finally:
        await router.aclose()
    assert answer is not None
    usage = answer["usage"]
    assert usage["completion_tokens"] == library.count("About 8 minutes [1].")
    assert usage["prompt_tokens"] > usage["completion_tokens"] and usage["total_tokens"] == sum(
        usage[k] for k in ("prompt_tokens", "completion_tokens"))  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_cut_off_says_so(library: Library, stream: bool) -> None:
    models, router = documents(library, streaming("Light takes about 8", finish="length"))
    try:
        reply = await models.respond(body(stream=stream, max_tokens=7))
        text = text_of(await streamed(reply)) if stream else reply.body["choices"][0]["message"]["content"]  # type: ignore[index]
    finally:
        await router.aclose()
    assert text.startswith("Light takes about 8 [1]\n\n_The answer was cut off at 7 tokens (max_tokens)._\n\n**Sources**")


async def test_the_clients_temperature_and_max_tokens_reach_the_model(library: Library) -> None:
    endpoint = streaming("About 8 minutes [1].")
    models, router = documents(library, endpoint)
    try:
        await models.respond(body(temperature=0, max_tokens=100))
    finally:
        await router.aclose()
    assert (endpoint.requests[0]["temperature"], endpoint.requests[0]["max_tokens"]) == (0, 100)


async def test_an_empty_answer_says_so_and_still_lists_the_passages(library: Library) -> None:
    models, router = documents(library, streaming())
    try:
        whole = (await models.respond(body())).body
        events = await streamed(await models.respond(body(stream=True)))
    finally:
        await router.aclose()
    assert whole is not None
    assert whole["choices"][0]["message"]["content"].startswith(EMPTY_ANSWER + "\n\n**Passages used**\n- [1] solar.md")
    assert text_of(events) == whole["choices"][0]["message"]["content"]


async def test_a_follow_up_is_rewritten_from_the_history_without_our_footer(library: Library) -> None:
    def reply(request: dict[str, Any]) -> httpx.Response:
        if not request.get("stream"):  # the rewrite
            return httpx.Response(200, json={"model": MODEL, "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "How long does light from the Sun take to reach Earth?"}}]})  # fmt: skip
        return sse_response(sse("About 8 minutes [1].", model=MODEL))

    endpoint = Endpoint(reply)
    models, router = documents(library, endpoint)
    messages = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "What is the largest planet?"},
        {"role": "assistant", "content": "Jupiter [1].\n\n**Sources**\n- [1] planets.md, Planets"},
        {"role": "user", "content": "and how long does its light take?"},
    ]
    try:
        answer = (await models.respond({"model": RAG, "messages": messages})).body
    finally:
        await router.aclose()
    assert answer is not None and answer["rag"]["question"] == QUESTION
    rewrite, sent = endpoint.requests
    assert "Jupiter." in json.dumps(rewrite["messages"]) and "Sources" not in json.dumps(rewrite["messages"])
    assert "pirate" not in json.dumps(endpoint.requests)
    assert {"role": "assistant", "content": "Jupiter."} in sent["messages"]


# --- the gate and errors ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_nothing_relevant_is_a_normal_answer_saying_so_and_the_model_is_not_asked(
    library: Library, stream: bool
) -> None:
    endpoint = streaming("should never be asked")
    models, router = documents(library, endpoint, min_relevance=0.9)
    try:
        reply = await models.respond(body("recipe for chocolate chip cookies", stream=stream,
                                          stream_options={"include_usage": True}))  # fmt: skip
        if stream:
            events = await streamed(reply)
            text, final, usage = text_of(events), events[-3], events[-2]["usage"]
        else:
            assert reply.body is not None
            text, final, usage = reply.body["choices"][0]["message"]["content"], reply.body, reply.body["usage"]
    finally:
        await router.aclose()
    assert endpoint.requests == []
    assert text.startswith("Your documents don't seem to contain the answer, so I won't guess: no passage is "
                           "similar enough to the question (relevance threshold 0.90, best match ")  # fmt: skip
    assert "The closest passages:\n- " in text
    extra = final["rag"]
    assert (extra["model"], extra["relevant"], extra["min_relevance"], extra["cited"]) == (None, False, 0.9, [])
    assert 1 <= len(extra["passages"]) <= 5 and not any(p["cited"] for p in extra["passages"])
    assert all(p["score"] < 0.9 for p in extra["passages"])
    assert final["choices"][0]["finish_reason"] == "stop"
    assert usage["completion_tokens"] == library.count(text) and usage["prompt_tokens"] > 0


async def test_an_endpoint_that_cannot_be_reached_is_a_503(library: Library) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    settings = library.settings.replace(base_url=BASE, connect_retries=0, endpoints_file=library.settings.data_dir / "x")
    router = Router(settings, transport=httpx.MockTransport(refuse))
    models = DocumentModels(settings, library, lambda: router)
    try:
        reply = await models.respond(body(stream=True))
        cards = await models.cards()
    finally:
        await router.aclose()
    assert reply.status == 503 and reply.chunks is None and reply.body is not None
    error = reply.body["error"]
    assert (error["type"], error["code"]) == ("server_error", "model_unavailable") and BASE.removesuffix("/v1") in error["message"]
    assert cards == []  # the list stays valid: no model to offer


@pytest.mark.parametrize(("status", "message", "answered", "code"), [
    (500, "boom", 502, "model_failed"),
    (400, "This model's maximum context length is 4096 tokens", 400, "context_length_exceeded"),
])  # fmt: skip
async def test_a_failing_model_is_an_error_reply_before_any_stream(
    library: Library, status: int, message: str, answered: int, code: str
) -> None:
    failing = Endpoint(lambda request: httpx.Response(status, json={"error": {"message": message, "type": "x"}}))
    models, router = documents(library, failing)
    try:
        reply = await models.respond(body(stream=True))
    finally:
        await router.aclose()
    assert reply.chunks is None and reply.body is not None
    assert (reply.status, reply.body["error"]["code"]) == (answered, code)
    assert message in reply.body["error"]["message"]


async def test_a_model_failing_mid_stream_ends_the_stream_with_an_error_event(library: Library) -> None:
    broken = chunk("Light takes", model=MODEL) + b'data: {"error": {"message": "the model crashed"}}\n\n' + DONE
    models, router = documents(library, Endpoint(lambda request: sse_response(broken)))
    try:
        events = await streamed(await models.respond(body(stream=True)))
    finally:
        await router.aclose()
    assert text_of(events) == "Light takes"
    assert "the model crashed" in events[-1]["error"]["message"] and events[-1]["error"]["type"] == "server_error"
    assert "[DONE]" not in events


async def test_a_library_that_failed_to_start_is_a_503(library: Library) -> None:
    library.startup_error = ConfigError("the embedding model could not be loaded")
    models, router = documents(library, streaming("x"))
    try:
        reply = await models.respond(body())
    finally:
        await router.aclose()
    assert reply.status == 500 and reply.body is not None
    assert reply.body["error"]["message"] == "the embedding model could not be loaded"
