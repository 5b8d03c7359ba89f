"""One model call for one endpoint: a budgeted, cited answer streamed, or a follow-up rewritten.

``start_answer`` fits the passages and history into the model's window (``rag.prompting``) and
returns an ``Answer`` whose request goes out when it is started or iterated. The router
(``rag.routing``) calls it once per candidate endpoint; the question's whole path
(rewrite → retrieve → gate → answer) is ``rag.pipeline.ask``.

Trade-offs:

- Small models fall into loops that run to the token limit: an answer whose finished lines
  repeat is stopped early (``finish_reason="repetition"``), which closes the HTTP stream and
  with it the generation on the server.
- The rewrite is a second model call before every follow-up. It costs time to first token, but
  retrieval for "and what does it cost?" finds nothing without it. ``request_rewrite`` raises
  on failure so that a caller with another endpoint can try it; the router falls back to the
  question as asked when none succeeds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rag.chat import ChatClient
from rag.citations import citations_in
from rag.config import DEFAULT_TEMPERATURE
from rag.errors import EndpointError
from rag.prompting import SYSTEM_PROMPT, TokenCounter, clean_rewrite, fit_to_budget, rewrite_messages
from rag.types import ChatDone, ChatEvent, Hit, Message, Queued

if TYPE_CHECKING:
    from rag.routing import Route

DEFAULT_REWRITE_TIMEOUT = 30.0
REWRITE_MAX_TOKENS = 96


@dataclass
class Answer:
    """A streaming answer. Iterate it for ``ChatDelta``s then one ``ChatDone``.

    ``hits`` are the passages sent, numbered as sent: the model's ``[n]`` is ``hits[n - 1]``.
    ``text`` accumulates the answer as it streams; ``route`` says which endpoint answered (set
    by the router). ``start()`` waits for the first event (the request's errors are raised
    there); ``aclose()`` (or cancelling the task that iterates) closes the HTTP stream, which
    stops the generation on the server. While a busy server keeps the request waiting, its
    ``Queued`` notices go to ``on_queued`` (they are not the first event: the answer may still
    fail over to another endpoint) and ``queued`` holds the last one.
    """

    hits: list[Hit]
    messages: list[Message]
    model: str
    _events: AsyncGenerator[ChatEvent | Queued, None] | None = None
    text: str = ""
    done: ChatDone | None = field(default=None)
    route: Route | None = None
    # Called (then the error raised) when the endpoint fails: the router drops a dead connection.
    on_error: Callable[[EndpointError], Awaitable[None]] | None = field(default=None, repr=False)
    on_queued: Callable[[Queued], Awaitable[None]] | None = field(default=None, repr=False)
    queued: Queued | None = None
    _first: ChatEvent | None = field(default=None, repr=False)
    _iterator: AsyncGenerator[ChatEvent, None] | None = field(default=None, repr=False)

    async def start(self) -> None:
        """Send the request and wait for its first event; raises what the endpoint raised
        (and closes the stream then)."""
        if self._first is not None or self._events is None:
            return
        try:
            self._first = await self._next_event(self._events)
        except StopAsyncIteration:
            self._first = ChatDone(finish_reason=None, usage=None, model=self.model)
        except BaseException as exc:
            await self.aclose()
            await self._failed(exc)
            raise

    def __aiter__(self) -> AsyncIterator[ChatEvent]:
        if self._iterator is None:
            self._iterator = self._iterate()
        return self._iterator

    async def _iterate(self) -> AsyncGenerator[ChatEvent, None]:
        assert self._events is not None, "an Answer streams once"
        events, self._events = self._events, None
        pending, self._first = self._first, None
        try:
            while True:
                if pending is not None:
                    event, pending = pending, None
                else:
                    try:
                        event = await self._next_event(events)
                    except StopAsyncIteration:
                        return
                    except BaseException as exc:
                        await self._failed(exc)
                        raise
                if isinstance(event, ChatDone):
                    self.done = event
                    yield event
                    continue
                self.text += event.text
                yield event
                if is_looping(self.text):
                    # Closing the stream (below) stops the generation on the server.
                    self.done = ChatDone(finish_reason="repetition", usage=None, model=self.model)
                    yield self.done
                    return
        finally:
            await events.aclose()

    async def _next_event(self, events: AsyncGenerator[ChatEvent | Queued, None]) -> ChatEvent:
        """The next delta or end; queue notices on the way go to ``on_queued``."""
        while True:
            event = await anext(events)
            if not isinstance(event, Queued):
                return event
            self.queued = event
            if self.on_queued is not None:
                await self.on_queued(event)

    async def _failed(self, exc: BaseException) -> None:
        if self.on_error is not None and isinstance(exc, EndpointError):
            await self.on_error(exc)

    async def aclose(self) -> None:
        """Close the stream, whether it was iterated or not (closing an HTTP stream ourselves:
        left to the garbage collector, httpcore's generators are finalised outside the loop)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            await iterator.aclose()
        if self._events is not None:
            events, self._events = self._events, None
            await events.aclose()

    def citations(self) -> list[int]:
        """The passage numbers the answer so far cites, in order of first citation."""
        return citations_in(self.text, len(self.hits))


def start_answer(
    client: ChatClient,
    model: str,
    question: str,
    hits: Sequence[Hit],
    history: Sequence[Message] = (),
    *,
    context_window: int,
    count: TokenCounter,
    max_answer_tokens: int = 512,
    temperature: float | None = DEFAULT_TEMPERATURE,
    system: str = SYSTEM_PROMPT,
) -> Answer:
    """The passages and history fitted into the model's window, ready to stream (nothing is
    sent before ``Answer.start()`` or iteration).

    Raises ``ContextLengthError`` at once when even the question alone does not fit.
    """
    messages, kept = fit_to_budget(
        question,
        hits,
        history=history,
        context_window=context_window,
        reserve_answer_tokens=max_answer_tokens,
        count=count,
        system=system,
    )
    events = client.stream(messages, model=model, temperature=temperature, max_tokens=max_answer_tokens)
    return Answer(hits=list(kept), messages=messages, model=model, _events=events)  # type: ignore[arg-type]


def is_looping(text: str, *, repeats: int = 3, min_length: int = 12) -> bool:
    """True when a finished line of at least ``min_length`` characters has come ``repeats``
    times: the model is repeating itself.

    >>> is_looping("It is 8 minutes.\\nSee [1].\\nIt is 8 minutes.\\nSee [1].\\nIt is 8 minutes.\\n")
    True
    >>> is_looping("It is 8 minutes.\\nIt is 8 minutes.\\nIt is 8 min")
    False
    """
    finished = text.split("\n")[:-1]  # the last piece may still be growing
    counts: dict[str, int] = {}
    for line in finished:
        line = line.strip()
        if len(line) >= min_length:
            counts[line] = counts.get(line, 0) + 1
            if counts[line] >= repeats:
                return True
    return False


def needs_rewrite(history: Sequence[Message], question: str) -> bool:
    """Whether ``question`` is a follow-up worth making standalone: there is a conversation
    before it, and a question. Checked before any endpoint is asked (or opened).

    >>> needs_rewrite([], "and Mars?"), needs_rewrite([Message("user", "Venus?")], " ")
    (False, False)
    """
    return bool(history) and bool(question.strip())


async def request_rewrite(
    client: ChatClient,
    model: str,
    history: Sequence[Message],
    question: str,
    *,
    timeout: float | None = DEFAULT_REWRITE_TIMEOUT,
) -> str:
    """A standalone version of a follow-up ``question``, or the question itself when the
    model's rewrite is unusable. Raises (``RagError``, ``TimeoutError``) when the endpoint
    fails: for a caller with another endpoint to try."""
    async with asyncio.timeout(timeout):
        text, _ = await client.complete(
            rewrite_messages(history, question), model=model, temperature=0.0, max_tokens=REWRITE_MAX_TOKENS
        )
    return clean_rewrite(text, question)
