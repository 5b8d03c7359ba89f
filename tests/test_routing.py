"""Routing between named endpoints: each policy with a fake network at the transport."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from rag.config import Settings, load_settings
from rag.endpoints import EndpointsConfig, EndpointSpec, load_endpoints, parse_endpoints
from rag.errors import ConfigError, EndpointError, PolicyError
from rag.routing import LocalOnlyTransport, Router, classify_task, order_candidates
from rag.types import ChatDelta, ChatDone, Chunk, Hit, Message, Queued
from tests.sse import sse_response
from tests.sse import sse as sse_body

pytestmark = pytest.mark.anyio

LOCAL = EndpointSpec("local", "http://127.0.0.1:5273/v1", "small", context_window=4096, local=True)
LOCAL2 = EndpointSpec("local2", "http://127.0.0.1:5274/v1", "medium", context_window=4096, local=True)
CLOUD = EndpointSpec("cloud", "https://api.example.com/v1", "big", context_window=128_000, local=False)
HITS = [Hit(Chunk("c1", "guide.pdf", "Turn the pile every 2 to 3 weeks.", 0, 10, page=2), 1.0, 1, similarity=0.8)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sse(text: str, model: str) -> bytes:
    return sse_body(text, model=model)


class FakeNetwork:
    """Every host's behaviour in one MockTransport handler; records what reached the wire."""

    def __init__(self, behaviour: dict[str, str]) -> None:
        self.behaviour = behaviour  # host:port -> "ok" | "down" | "slow" | "500" | "ctx"
        self.sent: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        key = f"{request.url.host}:{request.url.port or 443}"
        self.sent.append(f"{request.method} {request.url}")
        mode = self.behaviour.get(key, "down")
        if mode == "down":
            raise httpx.ConnectError("Connection refused", request=request)
        if mode == "slow":
            await asyncio.sleep(5)
        if mode == "500":
            return httpx.Response(500, json={"error": {"message": "model crashed"}})
        if mode == "ctx":
            return httpx.Response(400, json={"error": {"message": "maximum context length exceeded"}})
        body = json.loads(request.content) if request.content else {}
        model = body.get("model", "?")
        if body.get("stream") is False:  # a rewrite
            return httpx.Response(200, json={"choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": f"Rewritten by {model}?"}}]})  # fmt: skip
        return sse_response(sse(f"answer from {model} [1]", model))

    def to(self, spec: EndpointSpec) -> list[str]:
        host = httpx.URL(spec.base_url)
        return [s for s in self.sent if f"//{host.host}" in s]


def router(specs: list[EndpointSpec], behaviour: dict[str, str], policy: str, tmp_path: Path,
           by_task: dict[str, str] | None = None, **settings: Any) -> tuple[Router, FakeNetwork]:  # fmt: skip
    net = FakeNetwork(behaviour)
    s = Settings(data_dir=tmp_path, connect_retries=0, first_token_timeout=0.3, policy=policy, **settings)
    r = Router(s, EndpointsConfig(tuple(specs), by_task or {}, "test"), transport=httpx.MockTransport(net), environ={})
    return r, net


async def text_of(reply: Any) -> str:
    parts = [e.text async for e in reply if isinstance(e, ChatDelta)]
    return "".join(parts)


HISTORY = [Message("user", "How do I compost?"), Message("assistant", "Turn the pile weekly.")]
UP = {"127.0.0.1:5273": "ok", "127.0.0.1:5274": "ok", "api.example.com:443": "ok"}


# --- local-only: nothing leaves the machine -------------------------------------------------


async def test_local_only_answers_locally_and_sends_nothing_out(tmp_path: Path) -> None:
    r, net = router([CLOUD, LOCAL], UP, "local-only", tmp_path)
    reply = await r.answer("How often?", HITS)
    assert await text_of(reply) == "answer from small [1]"
    assert reply.route is not None and (reply.route.endpoint, reply.route.fallback) == ("local", "")
    assert net.to(CLOUD) == []
    await r.aclose()


async def test_local_only_does_not_fall_back_to_the_cloud_when_local_is_down(tmp_path: Path) -> None:
    r, net = router([LOCAL, CLOUD], {**UP, "127.0.0.1:5273": "down"}, "local-only", tmp_path)
    with pytest.raises(EndpointError, match="local small unreachable"):
        await r.answer("How often?", HITS)
    assert net.to(CLOUD) == []
    await r.aclose()


async def test_local_only_transport_refuses_a_cloud_request_before_sending(tmp_path: Path) -> None:
    # Even asked explicitly for the cloud endpoint, the guarded transport refuses it.
    r, net = router([LOCAL, CLOUD], UP, "local-only", tmp_path)
    with pytest.raises(PolicyError, match="local-only"):
        await r.answer("How often?", HITS, candidates=[CLOUD])
    assert net.sent == []
    await r.aclose()


async def test_guard_allows_loopback_and_hosts_marked_local() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url.host))
        return httpx.Response(200)

    guard = LocalOnlyTransport(httpx.MockTransport(handler), allowed_hosts=["gpu-box.lan"])
    async with httpx.AsyncClient(transport=guard) as http:
        await http.get("http://localhost:1/x")
        await http.get("http://gpu-box.lan:8000/x")
        with pytest.raises(PolicyError):
            await http.post("https://api.example.com/v1/chat/completions", json={"secret": "doc text"})
    assert seen == ["localhost", "gpu-box.lan"]


async def test_discovered_remote_base_url_is_refused_under_local_only(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, base_url="https://api.example.com/v1", endpoints_file=tmp_path / "none.toml")
    sent: list[httpx.Request] = []
    r = Router(settings, transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200)))
    with pytest.raises(PolicyError, match="RAG_BASE_URL"):
        await r.answer("How often?", HITS)
    with pytest.raises(PolicyError, match="RAG_BASE_URL"):
        await r.primary()
    assert await r.rewrite(HISTORY, "and how often?") == "and how often?"  # asked as typed
    assert sent == []
    await r.aclose()


# --- local-first ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local_mode", "why"),
    [("down", "local small unreachable"), ("slow", "local small timed out"), ("500", "local small failed"),
     ("ctx", "local small context too small")],
)  # fmt: skip
async def test_local_first_falls_back_to_the_cloud_and_says_why(tmp_path: Path, local_mode: str, why: str) -> None:
    r, net = router([CLOUD, LOCAL], {**UP, "127.0.0.1:5273": local_mode}, "local-first", tmp_path)
    reply = await r.answer("How often?", HITS)
    assert await text_of(reply) == "answer from big [1]"
    assert reply.route is not None and reply.route.endpoint == "cloud"
    assert reply.route.fallback.startswith(why)
    await r.aclose()


async def test_local_first_falls_back_when_the_prompt_does_not_fit(tmp_path: Path) -> None:
    tiny = EndpointSpec("local", LOCAL.base_url, "small", context_window=600, local=True)
    hits = [Hit(Chunk(f"c{i}", "a.md", "word " * 200, 0, 1), 1.0, i, similarity=0.8) for i in range(1, 4)]
    r, net = router([tiny, CLOUD], UP, "local-first", tmp_path, max_answer_tokens=128)
    reply = await r.answer("Why?", hits)
    assert reply.route is not None and reply.route.endpoint == "cloud"
    assert "does not fit its 600-token window" in reply.route.fallback
    assert len(reply.hits) == 3
    assert net.to(tiny) == []  # decided before sending anything
    await r.aclose()


async def test_the_last_candidate_answers_with_fewer_passages_rather_than_not_at_all(tmp_path: Path) -> None:
    tiny = EndpointSpec("local", LOCAL.base_url, "small", context_window=600, local=True)
    hits = [Hit(Chunk(f"c{i}", "a.md", "word " * 200, 0, 1), 1.0, i, similarity=0.8) for i in range(1, 4)]
    r, _ = router([tiny], UP, "local-first", tmp_path, max_answer_tokens=128)
    reply = await r.answer("Why?", hits)
    assert reply.route is not None and reply.route.endpoint == "local" and len(reply.hits) < 3
    await r.aclose()


async def test_no_fallback_after_the_first_token(tmp_path: Path) -> None:
    def broken_after_first(request: httpx.Request) -> httpx.Response:
        class Body(httpx.AsyncByteStream):
            async def __aiter__(self):  # type: ignore[no-untyped-def]
                yield sse("partial", "small").split(b"\n\n")[0] + b"\n\n"
                raise httpx.ReadError("connection reset")

        return httpx.Response(200, stream=Body(), headers={"content-type": "text/event-stream"})

    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        return broken_after_first(request)

    s = Settings(data_dir=tmp_path, connect_retries=0)
    r = Router(s.replace(policy="local-first"), EndpointsConfig((LOCAL, CLOUD), {}, "t"),
               transport=httpx.MockTransport(handler), environ={})  # fmt: skip
    reply = await r.answer("q", HITS)
    with pytest.raises(EndpointError, match="middle of an answer"):
        await text_of(reply)
    assert calls == ["127.0.0.1"]
    await r.aclose()


async def test_a_queue_notice_is_not_a_first_token(tmp_path: Path) -> None:
    """A busy local server holds the request in line (and says so), then goes silent: nothing of
    its answer was shown, so the next candidate answers. Its notices reached ``on_queued``."""

    class QueuedThenSilent(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            yield b": queued 2\n\n"
            await asyncio.sleep(5)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "127.0.0.1":
            return httpx.Response(200, stream=QueuedThenSilent(), headers={"content-type": "text/event-stream"})
        return sse_response(sse("answer from big [1]", "big"))

    told: list[Queued] = []

    async def on_queued(notice: Queued) -> None:
        told.append(notice)

    s = Settings(data_dir=tmp_path, connect_retries=0, first_token_timeout=0.3)
    r = Router(s.replace(policy="local-first"), EndpointsConfig((LOCAL, CLOUD), {}, "t"),
               transport=httpx.MockTransport(handler), environ={})  # fmt: skip
    reply = await r.answer("q", HITS, on_queued=on_queued)
    assert await text_of(reply) == "answer from big [1]"
    assert told == [Queued(2)]
    assert reply.route is not None and "waiting behind 2 others" in reply.route.fallback
    await r.aclose()


async def test_a_queued_answer_starts_when_its_turn_comes(tmp_path: Path) -> None:
    body = b": queued 1\n\n: queued 0\n\n" + sse("answer from small [1]", "small")
    told: list[Queued] = []

    async def on_queued(notice: Queued) -> None:
        told.append(notice)

    s = Settings(data_dir=tmp_path, connect_retries=0)
    r = Router(s.replace(policy="local-first"), EndpointsConfig((LOCAL, CLOUD), {}, "t"),
               transport=httpx.MockTransport(lambda request: sse_response(body)), environ={})  # fmt: skip
    reply = await r.answer("q", HITS, on_queued=on_queued)
    assert told == [Queued(1), Queued(0)] and reply.queued == Queued(0)
    assert await text_of(reply) == "answer from small [1]" and reply.route is not None and not reply.route.fallback
    await r.aclose()


# --- cloud-first ------------------------------------------------------------------------------


async def test_cloud_first_uses_the_cloud_when_it_answers(tmp_path: Path) -> None:
    r, net = router([LOCAL, CLOUD], UP, "cloud-first", tmp_path)
    reply = await r.answer("q", HITS)
    assert reply.route is not None and (reply.route.endpoint, reply.route.model) == ("cloud", "big")
    assert net.to(LOCAL) == []
    await r.aclose()


@pytest.mark.parametrize("mode", ["down", "500"])
async def test_cloud_first_falls_back_to_local_when_offline_or_failing(tmp_path: Path, mode: str) -> None:
    r, _ = router([LOCAL, CLOUD], {**UP, "api.example.com:443": mode}, "cloud-first", tmp_path)
    reply = await r.answer("q", HITS)
    assert await text_of(reply) == "answer from small [1]"
    assert reply.route is not None and reply.route.fallback.startswith("cloud big")
    await r.aclose()


async def test_missing_api_key_names_the_variable(tmp_path: Path) -> None:
    keyed = EndpointSpec("cloud", CLOUD.base_url, "big", api_key_env="EXAMPLE_KEY", context_window=9000, local=False)
    r, net = router([keyed, LOCAL], UP, "cloud-first", tmp_path)
    reply = await r.answer("q", HITS)
    assert reply.route is not None and "EXAMPLE_KEY" in reply.route.fallback
    assert net.to(keyed) == []
    await r.aclose()


# --- by-task ----------------------------------------------------------------------------------

LABELLED = [
    ("Write a Python function that reads the PDF", "code"),
    ("Why does this SQL query return nothing?", "code"),
    ("Explain this stack trace from the indexer", "code"),
    ("What does parse_date() return for an empty string?", "code"),
    ("Give me a regex for ISO dates", "code"),
    ("Summarise the composting guide", "summarise"),
    ("Can you summarize the Bill of Rights?", "summarise"),
    ("TL;DR of the Gettysburg Address", "summarise"),
    ("What are the key points of the fact sheet?", "summarise"),
    ("Give me an overview of the documents", "summarise"),
    ("How often should a compost pile be turned?", "general"),
    ("Which planet is the hottest?", "general"),
    ("What does the Fourth Amendment protect against?", "general"),
    ("Why does my compost smell of ammonia?", "general"),
    ("What does four score and seven years mean?", "general"),
]


@pytest.mark.parametrize(("question", "task"), LABELLED)
def test_classifier_on_a_labelled_set(question: str, task: str) -> None:
    assert classify_task(question)[0] == task


def test_classifier_explains_itself() -> None:
    assert classify_task("Summarise the guide") == ("summarise", 'matched "Summarise"')


async def test_by_task_routes_code_to_the_cloud_and_the_rest_locally(tmp_path: Path) -> None:
    rules = {"code": "cloud", "default": "local"}
    r, _ = router([LOCAL, CLOUD], UP, "by-task", tmp_path, by_task=rules)
    code = await r.answer("Write a Python function for this", HITS)
    general = await r.answer("Which planet is the hottest?", HITS)
    assert code.route is not None and code.route.endpoint == "cloud"
    assert 'task code (matched "Python") -> cloud' == code.route.note
    assert general.route is not None and general.route.endpoint == "local"
    await r.aclose()


def test_by_task_falls_back_only_to_local_endpoints() -> None:
    ordered, _ = order_candidates([LOCAL, CLOUD, LOCAL2], "by-task", "Summarise it", {"summarise": "local2"})
    assert [s.name for s in ordered] == ["local2", "local"]


# --- the endpoints file -------------------------------------------------------------------------


def test_endpoints_file_is_read_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.toml"
    path.write_text(
        '[[endpoint]]\nname = "local"\nbase_url = "http://127.0.0.1:5273/v1"\nmodel = "smollm2-135m"\n\n'
        '[[endpoint]]\nname = "cloud"\nbase_url = "https://api.example.com/v1"\nmodel = "big"\n'
        'api_key_env = "EXAMPLE_KEY"\ncontext_window = 128000\n\n[by_task]\ncode = "cloud"\ndefault = "local"\n'
    )
    config = load_endpoints(path)
    assert config is not None
    assert config.endpoints == (
        EndpointSpec("local", "http://127.0.0.1:5273/v1", "smollm2-135m", local=True),
        EndpointSpec("cloud", "https://api.example.com/v1", "big", "EXAMPLE_KEY", 128000, local=False),
    )
    assert config.by_task == {"code": "cloud", "default": "local"}
    assert load_endpoints(tmp_path / "missing.toml") is None


def test_the_example_file_parses() -> None:
    config = load_endpoints(Path(__file__).parent.parent / "endpoints.example.toml")
    assert config is not None and any(s.local for s in config.endpoints)


@pytest.mark.parametrize(
    ("data", "message"),
    [({}, "at least one"), ({"endpoint": [{"name": "a"}]}, "base_url"),
     ({"endpoint": [{"name": "a", "base_url": "http://x", "api_key": "sk-1"}]}, "unknown keys api_key"),
     ({"endpoint": [{"name": "a", "base_url": "http://x"}], "by_task": {"code": "b"}}, "names no endpoint")],
)  # fmt: skip
def test_bad_endpoint_files_name_the_problem(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_endpoints(data)


def test_policy_setting_is_validated() -> None:
    assert load_settings(environ={"RAG_POLICY": "local-first"}, dotenv=None).policy == "local-first"
    with pytest.raises(ConfigError, match="RAG_POLICY"):
        load_settings(environ={"RAG_POLICY": "anywhere"}, dotenv=None)


async def test_discovered_endpoint_is_the_implicit_list(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m1", "context_length": 2048}]})
        return httpx.Response(200, content=sse("hi [1]", "m1"), headers={"content-type": "text/event-stream"})

    settings = Settings(data_dir=tmp_path, base_url="http://127.0.0.1:9/v1", endpoints_file=tmp_path / "no.toml")
    r = Router(settings, transport=httpx.MockTransport(handler))
    assert [(s.name, s.local, s.discovered) for s in r.specs] == [("default", True, True)] and not r.named
    connection = await r.primary()
    assert (connection.model, connection.window("m1", 4096), connection.origin) == ("m1", 2048, "settings")
    reply = await r.answer("q", HITS)
    events = [e async for e in reply]
    assert isinstance(events[-1], ChatDone) and reply.text == "hi [1]"
    assert reply.route is not None and reply.route.describe() == "m1"  # the one endpoint: named by its model
    await r.aclose()


async def test_a_connection_that_stops_answering_is_opened_again(tmp_path: Path) -> None:
    """A restarted server (or a Foundry Local service on a new port) is found again."""
    up = {"ok": True}
    listed: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if not up["ok"]:
            raise httpx.ConnectError("Connection refused", request=request)
        if request.url.path.endswith("/models"):
            listed.append("models")
            return httpx.Response(200, json={"data": [{"id": "m1"}]})
        return sse_response(sse("hi [1]", "m1"))

    settings = Settings(data_dir=tmp_path, base_url="http://127.0.0.1:9/v1", connect_retries=0,
                        endpoints_file=tmp_path / "no.toml")  # fmt: skip
    r = Router(settings, transport=httpx.MockTransport(handler))
    first = await r.primary()
    assert await r.primary() is first and listed == ["models"]  # opened once
    up["ok"] = False
    with pytest.raises(EndpointError):
        await r.answer("q", HITS)
    assert r.opened() is None  # dropped
    up["ok"] = True
    reply = await r.answer("q", HITS)
    assert await text_of(reply) == "hi [1]" and listed == ["models", "models"]
    await r.aclose()


# --- the follow-up's rewrite ----------------------------------------------------------------

async def test_rewrite_goes_where_the_policy_sends_the_answer(tmp_path: Path) -> None:
    r, net = router([CLOUD, LOCAL], UP, "local-only", tmp_path)
    assert await r.rewrite(HISTORY, "and how often?") == "Rewritten by small?"
    assert await r.rewrite(HISTORY, "and how often?", policy="cloud-first") == "Rewritten by big?"
    assert net.to(CLOUD) == ["POST https://api.example.com/v1/chat/completions"]  # only when the policy allows
    await r.aclose()
    r, net = router([CLOUD, LOCAL], UP, "cloud-first", tmp_path)
    assert await r.rewrite(HISTORY, "and how often?") == "Rewritten by big?"
    await r.aclose()


async def test_rewrite_skips_an_endpoint_that_cannot_open_and_keeps_the_question_when_none_can(
    tmp_path: Path,
) -> None:
    r, net = router([CLOUD, LOCAL], {**UP, "api.example.com:443": "down"}, "cloud-first", tmp_path)
    assert await r.rewrite(HISTORY, "and how often?") == "Rewritten by small?"
    await r.aclose()
    r, net = router([LOCAL], {"127.0.0.1:5273": "down"}, "local-only", tmp_path)
    assert await r.rewrite(HISTORY, "and how often?") == "and how often?"
    assert await r.rewrite([], "How do I compost?") == "How do I compost?"
    await r.aclose()
