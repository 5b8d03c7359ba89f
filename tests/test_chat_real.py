"""``rag.chat.ChatClient`` against the real thing: ``rag serve`` with the real SmolLM2 model.

The server is started the way the app starts it (``start_background`` over a data directory
whose ``models/`` holds the built model), once for the module. Every test drives it only
through our client, so what is checked here is the client and the server together: a fact
found only in the supplied context, streamed and non-streamed answers with finish reason and
usage, model listing and alias resolution, and the errors a user can act on. The last test
cancels a stream mid-way and checks that the server is not wedged by it.

Needs the Foundry Local SDK and the built model (``make model``); the model is built into a
temp directory when the project has none and the build environment exists.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import pytest

from rag.chat import ChatClient, ChatDelta, ChatDone, ChatEvent, Message
from rag.config import Settings
from rag.errors import ContextLengthError, UnknownModelError
from rag.modelbuild import DEFAULT_CONTEXT_WINDOW, build_model, find_build_python, is_built, project_root
from rag.launcher import start_background

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("foundry_local_sdk") is None, reason="foundry-local-sdk is not installed"
    ),
]

# The small, fast model: what is checked is the client and the server, not the answers' quality.
MODEL = "smollm2-135m"
MODEL_ID = f"{MODEL}:1"
# A made-up fact: the model cannot know it, so a right answer comes from the context.
FACT = [
    Message("system", "Answer using only the context below.\n\nContext: The launch code of project Zephyr is 7431."),
    Message("user", "What is the launch code of project Zephyr?"),
]
# Long enough that a stream which is not stopped would hold the server for a long time.
LONG_ANSWER = [Message("user", "Count from 1 to 500, separated by commas.")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh data dir whose ``models/`` links to the project's built SmolLM2 (or a fresh build)."""
    data = tmp_path_factory.mktemp("data")
    (data / "models").mkdir()
    existing = project_root() / ".rag" / "models" / MODEL
    if is_built(existing):
        (data / "models" / MODEL).symlink_to(existing, target_is_directory=True)
    elif find_build_python() is not None:
        build_model(MODEL, data / "models")
    else:
        pytest.skip("no built model and no build environment (.venv-build): run `make model`")
    return data


@pytest.fixture(scope="module")
def server_url(data_dir: Path) -> Iterator[str]:
    url, stop = start_background(Settings(data_dir=data_dir, model=MODEL), timeout=180)
    try:
        yield url
    finally:
        stop()


def client(url: str) -> ChatClient:
    # Generous clocks: the CI machine is shared and a 135M model on 2 cores is not fast.
    return ChatClient(url, first_token_timeout=120, idle_timeout=60)


async def collect(chat: ChatClient, messages: list[Message], *, max_tokens: int, model: str = MODEL_ID,
                  ) -> list[ChatEvent]:  # fmt: skip
    return [event async for event in chat.stream(messages, model=model, temperature=0, max_tokens=max_tokens)]


def text_of(events: list[ChatEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, ChatDelta))


def test_answer_comes_from_the_supplied_context_streamed(server_url: str) -> None:
    async def main() -> list[ChatEvent]:
        async with client(server_url) as chat:
            return await collect(chat, FACT, max_tokens=48)

    events = asyncio.run(main())
    deltas, done = events[:-1], events[-1]
    assert len(deltas) > 1 and all(isinstance(e, ChatDelta) for e in deltas)  # streamed, not one piece
    assert "7431" in text_of(events), text_of(events)
    assert isinstance(done, ChatDone)
    assert done.finish_reason == "stop"
    assert done.model == MODEL_ID
    assert done.usage is not None
    assert done.usage["prompt_tokens"] > 20
    assert 0 < done.usage["completion_tokens"] <= 48
    assert done.usage["total_tokens"] == done.usage["prompt_tokens"] + done.usage["completion_tokens"]


def test_complete_returns_the_whole_answer_with_usage(server_url: str) -> None:
    async def main() -> tuple[str, ChatDone]:
        async with client(server_url) as chat:
            return await chat.complete(FACT, model=MODEL_ID, temperature=0, max_tokens=48)

    text, done = asyncio.run(main())
    assert "7431" in text, text
    assert done.finish_reason == "stop"
    assert done.model == MODEL_ID
    assert done.usage is not None and done.usage["completion_tokens"] > 0


def test_max_tokens_cuts_the_answer_with_finish_reason_length(server_url: str) -> None:
    async def main() -> tuple[str, ChatDone]:
        async with client(server_url) as chat:
            return await chat.complete(LONG_ANSWER, model=MODEL_ID, temperature=0, max_tokens=8)

    text, done = asyncio.run(main())
    assert text
    assert done.finish_reason == "length"
    assert done.usage is not None and done.usage["completion_tokens"] == 8


def test_models_are_listed_and_the_alias_resolves(server_url: str) -> None:
    async def main() -> tuple[list[str], str, str, list[dict]]:
        async with client(server_url) as chat:
            return (
                await chat.list_models(),
                await chat.resolve_model(MODEL),
                await chat.resolve_model(""),  # one model served: it is the default
                await chat.model_cards(),
            )

    models, by_alias, by_default, cards = asyncio.run(main())
    assert models == [MODEL_ID]
    assert by_alias == by_default == MODEL_ID
    assert cards[0]["context_length"] == DEFAULT_CONTEXT_WINDOW


def test_unknown_model_lists_the_real_one(server_url: str) -> None:
    async def send() -> None:
        async with client(server_url) as chat:
            await collect(chat, FACT, max_tokens=8, model="phi-4-mini")

    async def resolve() -> None:
        async with client(server_url) as chat:
            await chat.resolve_model("phi-4-mini")

    for attempt in (send, resolve):
        with pytest.raises(UnknownModelError, match=MODEL_ID) as info:
            asyncio.run(attempt())
        assert info.value.available == (MODEL_ID,)
        assert "'phi-4-mini'" in str(info.value)


def test_prompt_longer_than_the_context_window_is_a_context_length_error(server_url: str) -> None:
    too_long = [Message("user", "word " * 9000)]  # the model's window is 4,096 tokens

    async def main() -> None:
        async with client(server_url) as chat:
            await collect(chat, too_long, max_tokens=16)

    with pytest.raises(ContextLengthError, match=f"{DEFAULT_CONTEXT_WINDOW} tokens") as info:
        asyncio.run(main())
    assert "RAG_MAX_ANSWER_TOKENS" in str(info.value)  # says what to do


def test_cancelled_stream_stops_the_generation_and_the_server_serves_the_next(
    server_url: str, data_dir: Path
) -> None:
    log = data_dir / "serve.log"

    async def main() -> tuple[list[str], float, list[ChatEvent]]:
        async with client(server_url) as chat:
            received: list[str] = []
            stream = chat.stream(LONG_ANSWER, model=MODEL_ID, temperature=0, max_tokens=1000)
            async with aclosing(stream):
                async for event in stream:
                    if isinstance(event, ChatDelta):
                        received.append(event.text)
                    if len(received) == 2:
                        break  # the user pressed stop: aclosing closes the connection
            cancelled_at = time.perf_counter()
            events = await collect(chat, FACT, max_tokens=48)
            return received, time.perf_counter() - cancelled_at, events

    received, seconds, events = asyncio.run(main())
    assert len(received) == 2
    assert "7431" in text_of(events)
    assert isinstance(events[-1], ChatDone) and events[-1].finish_reason == "stop"
    # The server noticed the closed connection and stopped generating (it does not run the
    # 1,000 tokens to the end before serving the next request).
    assert "went away mid-stream" in log.read_text(encoding="utf-8")
    print(f"next answer {seconds:.1f} s after the cancel")
