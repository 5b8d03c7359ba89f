"""A scripted model behind the real ``rag serve`` HTTP server, for the tests and benchmarks that
run the app with several chats at once (tests/test_e2e_team.py, bench/team_chats.py).

``ScriptedRuntime`` has the runtime's interface (``rag.runtime.ChatRuntime``) and answers from the
passages it is sent, citing the first: "From <file>: <its first words> [1]." — one word every
``word_delay`` seconds; a question containing "slowly" streams 600 words. A follow-up's rewrite
(the non-streamed request) answers "<the question> (standalone)". ``scripted_endpoint()`` serves it
with ``rag.server.make_server``: the same one-at-a-time queue, queue notices and disconnect
handling as the real model server.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rag.runtime import ChatStream
from rag.server import OpenAIServer, make_server

MODEL = "scripted:1"
_PASSAGE = re.compile(r"^Document (\d+) \((.+?)\):$", re.MULTILINE)


class ScriptedRuntime:
    """Answers as the module docstring says; records each request's messages and each
    generation's question, in order.

    ``hold(question)`` is called in the generation's thread before its first word: a test can
    keep the model busy until the others are waiting."""

    def __init__(self, *, word_delay: float = 0.03, context: int = 32_768) -> None:
        self.word_delay = word_delay
        self.context = context
        self.requests: list[list[dict[str, str]]] = []
        self.started: list[str] = []
        self.finished: list[str] = []
        self.hold: Callable[[str], None] = lambda question: None
        self._lock = threading.Lock()

    def models(self) -> list[str]:
        return [MODEL]

    def context_length(self, model_id: str) -> int:
        return self.context

    def stream_chat(
        self, model_id: str, messages: list[dict[str, str]], *, max_tokens: int | None, temperature: float | None
    ) -> ChatStream:
        with self._lock:
            self.requests.append(messages)
        user = messages[-1]["content"]
        # The question: after "Question:", before the instruction that follows it.
        question = user.rsplit("Question:", 1)[-1].strip().split("\n\n", 1)[0]
        words = script(user)

        def produce(stream: ChatStream) -> Iterator[str]:
            with self._lock:
                self.started.append(question)
            self.hold(question)
            for count, word in enumerate(words, start=1):
                if max_tokens is not None and count > max_tokens:
                    stream.finish_reason = "length"
                    return
                time.sleep(self.word_delay)
                yield word
            with self._lock:
                self.finished.append(question)

        return ChatStream(produce, prompt_tokens=sum(len(m["content"].split()) for m in messages))


def script(user: str) -> list[str]:
    """The words of the answer to the last user message ``user`` (see the module docstring)."""
    last = re.search(r"Last question: (.*)", user)
    if last:  # the follow-up's rewrite
        return [f"{last.group(1).strip()} (standalone)"]
    passages = _PASSAGE.findall(user)
    if "slowly" in user.rsplit("Question:", 1)[-1]:
        return [f"word{i} " for i in range(600)]
    if not passages:
        return ["I ", "don't ", "know."]
    source = passages[0][1].split(",")[0]
    first = user.split(f"Document 1 ({passages[0][1]}):\n", 1)[1].split()[:10]
    return [f"From {source}: ", *(w + " " for w in first), "[1]."]


@dataclass
class Endpoint:
    url: str  # the base URL an OpenAI client takes (…/v1)
    server: OpenAIServer
    runtime: ScriptedRuntime

    @property
    def waiting(self) -> int:
        """Requests waiting for the model, the one it answers not counted."""
        return max(0, self.server.generation_lock.queued - 1)


@contextlib.contextmanager
def scripted_endpoint(*, word_delay: float = 0.03) -> Iterator[Endpoint]:
    """``ScriptedRuntime`` behind ``rag.server``'s HTTP server on a free loopback port."""
    runtime = ScriptedRuntime(word_delay=word_delay)
    server = make_server(runtime, "127.0.0.1", 0, flush_ms=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Endpoint(server.url, server, runtime)
    finally:
        server.shutdown()
        server.server_close()
