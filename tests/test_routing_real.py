"""Fallback with real servers: the embedded runtime (real smollm2) and a second local endpoint
that is stopped (nothing listens on its port) or slow (a tiny HTTP server that never sends a
first token in time). The answer must come from the runtime and say why."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from rag.chat import ChatDelta
from rag.config import Settings
from rag.modelbuild import is_built
from rag.routing import EndpointsConfig, EndpointSpec, Router
from rag.types import Chunk, Hit
from tests.apphost import free_port, http_server, send_body

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILT = ROOT / ".rag" / "models" / "smollm2-135m"
HITS = [Hit(Chunk("c1", "home-composting-field-guide.pdf", "Turn the pile every 2 to 3 weeks so it gets air.",
                  0, 10, page=2), 1.0, 1, similarity=0.8)]  # fmt: skip


@pytest.fixture(scope="module")
def runtime_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not is_built(BUILT):
        pytest.skip("smollm2-135m is not built: run `python -m rag model build`")
    from rag.launcher import start_background

    data = tmp_path_factory.mktemp("data")
    (data / "models").mkdir()
    # Symlinked, not copied: the model files are 90 MB.
    (data / "models" / "smollm2-135m").symlink_to(BUILT, target_is_directory=True)
    url, stop = start_background(Settings(data_dir=data), model_dirs=[data / "models" / "smollm2-135m"])
    yield url
    stop()
    shutil.rmtree(data, ignore_errors=True)


class Slow(BaseHTTPRequestHandler):
    """Lists a model, then holds every chat request without answering."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        send_body(self, b'{"object": "list", "data": [{"id": "slow-model", "object": "model", "context_length": 8192}]}')

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        time.sleep(6)


@pytest.fixture
def slow_url() -> Iterator[str]:
    with http_server(Slow) as url:
        yield url


async def ask(
    specs: list[EndpointSpec], tmp_path: Path, *, policy: str = "local-first", by_task: dict[str, str] | None = None
) -> tuple[str, str, str]:
    settings = Settings(data_dir=tmp_path, connect_retries=0, first_token_timeout=60, max_answer_tokens=48)
    router = Router(settings.replace(policy=policy), EndpointsConfig(tuple(specs), by_task or {}, "test"))
    try:
        reply = await router.answer("How often should a compost pile be turned?", HITS)
        text = "".join([e.text async for e in reply if isinstance(e, ChatDelta)])
    finally:
        await router.aclose()
    assert reply.route is not None
    return text, reply.route.endpoint, reply.route.fallback


def test_stopped_endpoint_falls_back_to_the_runtime(runtime_url: str, tmp_path: Path) -> None:
    stopped = EndpointSpec("stopped", f"http://127.0.0.1:{free_port()}/v1", "gemma3-270m", context_window=8192)
    runtime = EndpointSpec("runtime", runtime_url, "smollm2-135m")
    text, endpoint, why = asyncio.run(ask([stopped, runtime], tmp_path))
    assert endpoint == "runtime" and text.strip()
    assert why.startswith("stopped gemma3-270m unreachable: nothing answers at http://127.0.0.1:")


def test_slow_endpoint_times_out_before_the_first_token_and_falls_back(
    runtime_url: str, slow_url: str, tmp_path: Path
) -> None:
    slow = EndpointSpec("slow", slow_url, "slow-model", first_token_timeout=1.5)
    runtime = EndpointSpec("runtime", runtime_url, "smollm2-135m")
    started = time.perf_counter()
    text, endpoint, why = asyncio.run(ask([slow, runtime], tmp_path))
    assert endpoint == "runtime" and text.strip()
    assert why.startswith("slow slow-model timed out:") and "first-token timeout" in why
    assert time.perf_counter() - started < 60


def test_cloud_first_falls_back_to_local_when_the_cloud_is_down(runtime_url: str, tmp_path: Path) -> None:
    # A stopped loopback port stands in for the cloud: marked not local, so cloud-first tries it first.
    cloud = EndpointSpec("cloud", f"http://127.0.0.1:{free_port()}/v1", "gpt-big", context_window=8192, local=False)
    runtime = EndpointSpec("runtime", runtime_url, "smollm2-135m")
    text, endpoint, why = asyncio.run(ask([runtime, cloud], tmp_path, policy="cloud-first"))
    assert endpoint == "runtime" and text.strip()
    assert why.startswith("cloud gpt-big unreachable: nothing answers at http://127.0.0.1:")


def test_by_task_falls_back_to_local_when_the_chosen_endpoint_is_slow(
    runtime_url: str, slow_url: str, tmp_path: Path
) -> None:
    slow = EndpointSpec("summariser", slow_url, "slow-model", first_token_timeout=1.5)
    runtime = EndpointSpec("runtime", runtime_url, "smollm2-135m")
    # The compost question is "general"; the rule sends general questions to the slow endpoint.
    text, endpoint, why = asyncio.run(
        ask([runtime, slow], tmp_path, policy="by-task", by_task={"general": "summariser"})
    )
    assert endpoint == "runtime" and text.strip()
    assert why.startswith("summariser slow-model timed out:")


def test_rewrite_falls_back_to_the_runtime_which_answers(
    runtime_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rag.routing
    from rag.chat import Message

    calls: list[tuple[str, str]] = []
    real = rag.routing.request_rewrite

    async def recording(client: object, model: str, *args: object, **kwargs: object) -> str:
        try:
            text = await real(client, model, *args, **kwargs)  # type: ignore[arg-type]
        except Exception as exc:
            calls.append((model, type(exc).__name__))
            raise
        calls.append((model, "ok"))
        return text

    monkeypatch.setattr(rag.routing, "request_rewrite", recording)
    stopped = EndpointSpec("stopped", f"http://127.0.0.1:{free_port()}/v1", "gemma3-270m", context_window=8192)
    runtime = EndpointSpec("runtime", runtime_url, "smollm2-135m")
    settings = Settings(data_dir=tmp_path, connect_retries=0, first_token_timeout=60)
    history = [Message("user", "How often should a compost pile be turned?"),
               Message("assistant", "Every 2 to 3 weeks, so it gets air [1].")]  # fmt: skip

    async def main() -> str:
        router = Router(settings.replace(policy="local-first"), EndpointsConfig((stopped, runtime), {}, "test"))
        try:
            return await router.rewrite(history, "and in winter?")
        finally:
            await router.aclose()

    standalone = asyncio.run(main())
    assert calls[0] == ("gemma3-270m", "EndpointUnreachableError")
    assert calls[1][1] == "ok" and calls[1][0].startswith("smollm2-135m")
    assert standalone.strip()
