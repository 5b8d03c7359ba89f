"""Question answering: rewrite a follow-up, retrieve behind a relevance gate, answer with citations.

The flow shared by the chat app and the command line, as plain values (no UI framework)::

    question ──rewrite_question──▶ standalone question ──retrieve──▶ Retrieval
        Retrieval.relevant is False ─▶ say the documents don't contain the answer (no model call)
        Retrieval.relevant is True  ─▶ answer() streams ChatDelta…ChatDone; Answer.hits are
                                       the passages actually sent, so the model's [n] is hits[n-1]

Trade-offs:

- The rewrite is a second model call before every follow-up. It costs time to first token, but
  retrieval for "and what does it cost?" finds nothing without it. It is best effort: any
  failure, an empty or rambling rewrite falls back to the question as asked.
- The gate uses the cosine similarity each hit carries, which means the same in every retrieval
  mode. Passages under the threshold are not sent even when others pass: a weak passage
  numbered [4] invites a citation that supports nothing.
- Budgeting (``fit_to_budget``) may drop the lowest-ranked passages; citations are resolved
  against what was sent, never against what was retrieved.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from rag.chat import ChatClient, ChatDelta, ChatDone, ChatEvent, Message
from rag.config import DEFAULT_MIN_RELEVANCE
from rag.embedding import Embedder
from rag.errors import RagError
from rag.index import Snapshot
from rag.prompting import SYSTEM_PROMPT, TokenCounter, default_token_counter, fit_to_budget
from rag.retrieval import LiveIndex, Retriever
from rag.types import Hit

DEFAULT_REWRITE_TIMEOUT = 30.0
REWRITE_MAX_TOKENS = 96
# How much of the conversation the rewrite sees: the last few turns, each cut short.
REWRITE_HISTORY_MESSAGES = 6
REWRITE_MESSAGE_CHARS = 600

REWRITE_PROMPT = """\
Rewrite the user's last question so that it can be understood without the conversation: \
replace pronouns and references such as "it", "they" or "that one" with what they refer to. \
Keep the question's meaning and language; do not answer it. If it is already self-contained, \
repeat it unchanged. Reply with the rewritten question only."""

_CITATION_GROUP = re.compile(r"\[(\s*\d{1,3}(?:\s*[,;]\s*\d{1,3})*\s*)\]")
_PREFIX = re.compile(r"^(?:standalone|rewritten)?\s*question\s*:\s*", re.I)


# --- Rewriting ------------------------------------------------------------------------------


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def rewrite_messages(history: Sequence[Message], question: str) -> list[Message]:
    """The request that asks for a standalone version of ``question``.

    >>> [m.role for m in rewrite_messages([Message("user", "Hi"), Message("assistant", "Yo")], "Why?")]
    ['system', 'user']
    """
    recent = [m for m in history if m.role in ("user", "assistant")][-REWRITE_HISTORY_MESSAGES:]
    transcript = "\n".join(f"{m.role.capitalize()}: {_clip(m.content, REWRITE_MESSAGE_CHARS)}" for m in recent)
    user = f"Conversation:\n{transcript}\n\nLast question: {question.strip()}\n\nStandalone question:"
    return [Message("system", REWRITE_PROMPT), Message("user", user)]


def clean_rewrite(text: str, question: str) -> str:
    """The model's rewrite tidied up, or ``question`` when the rewrite is unusable.

    Unusable: empty, several lines of prose, or much longer than the question (a model that
    answers instead of rewriting).

    >>> clean_rewrite('Standalone question: "What does the Pro plan cost?"', "And the Pro?")
    'What does the Pro plan cost?'
    >>> clean_rewrite("", "And the Pro?")
    'And the Pro?'
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines or len(lines) > 2:
        return question
    rewrite = _PREFIX.sub("", " ".join(lines)).strip().strip("\"'“”«»").strip()
    if not rewrite or len(rewrite) > max(4 * len(question.strip()), 200):
        return question
    return rewrite


def needs_rewrite(history: Sequence[Message], question: str) -> bool:
    """Whether ``question`` is a follow-up worth making standalone: there is a conversation
    before it, and a question. Checked before any endpoint is asked (or opened).

    >>> needs_rewrite([], "and Mars?"), needs_rewrite([Message("user", "Venus?")], " ")
    (False, False)
    """
    return bool(history) and bool(question.strip())


async def rewrite_question(
    client: ChatClient,
    model: str,
    history: Sequence[Message],
    question: str,
    *,
    timeout: float | None = DEFAULT_REWRITE_TIMEOUT,
) -> str:
    """A standalone version of a follow-up ``question``; the question itself when there is
    no history or anything goes wrong (endpoint error, timeout, unusable answer)."""
    if not needs_rewrite(history, question):
        return question
    try:
        return await request_rewrite(client, model, history, question, timeout=timeout)
    except (RagError, TimeoutError):
        return question


async def request_rewrite(
    client: ChatClient, model: str, history: Sequence[Message], question: str, *, timeout: float | None
) -> str:
    """``rewrite_question`` that raises (``RagError``, ``TimeoutError``) instead of giving up:
    for a caller with another endpoint to try."""
    async with asyncio.timeout(timeout):
        text, _ = await client.complete(
            rewrite_messages(history, question), model=model, temperature=0.0, max_tokens=REWRITE_MAX_TOKENS
        )
    return clean_rewrite(text, question)


# --- Retrieval and the relevance gate -------------------------------------------------------


@dataclass(frozen=True)
class Retrieval:
    """What a search found for ``question``.

    ``hits`` are the passages that reach the relevance threshold (ranked 1..n, best first):
    what the model will see. ``relevant`` is False when none does; ``closest`` holds the best
    passages regardless of the threshold, to show the user what came nearest.
    """

    question: str
    hits: tuple[Hit, ...]
    closest: tuple[Hit, ...]
    min_relevance: float
    generation: str | None = None

    @property
    def relevant(self) -> bool:
        return bool(self.hits)


def gate(hits: Sequence[Hit], min_relevance: float) -> tuple[Hit, ...]:
    """The hits whose similarity reaches ``min_relevance``, ranked again from 1.

    >>> from rag.types import Chunk
    >>> hits = [Hit(Chunk(c, "a.md", c, 0, 1), 1.0, r, similarity=s)
    ...         for r, (c, s) in enumerate([("x", 0.2), ("y", 0.6)], start=1)]
    >>> [(h.chunk.id, h.rank) for h in gate(hits, 0.5)]
    [('y', 1)]
    """
    kept = [h for h in hits if h.similarity >= min_relevance]
    return tuple(dataclasses.replace(h, rank=i) for i, h in enumerate(kept, start=1))


def retrieve(
    index: LiveIndex | Snapshot,
    embedder: Embedder,
    question: str,
    *,
    k: int = 5,
    mode: str = "hybrid",
    min_relevance: float = DEFAULT_MIN_RELEVANCE,
) -> Retrieval:
    """Search one consistent snapshot (the newest one, given a ``LiveIndex``) and apply the gate.

    Blocking (embeds the question): run it in a thread from async code.
    """
    snapshot = index.snapshot() if isinstance(index, LiveIndex) else index
    closest = Retriever(snapshot, embedder).search(question, k=k, mode=mode)
    return Retrieval(
        question=question,
        hits=gate(closest, min_relevance),
        closest=tuple(closest),
        min_relevance=min_relevance,
        generation=snapshot.generation,
    )


# --- Answering ------------------------------------------------------------------------------


@dataclass
class Answer:
    """A streaming answer. Iterate it for ``ChatDelta``s then one ``ChatDone``.

    ``hits`` are the passages sent, numbered as sent: the model's ``[n]`` is ``hits[n - 1]``.
    ``text`` accumulates the answer as it streams. ``aclose()`` (or cancelling the task that
    iterates) closes the HTTP stream, which stops the generation on the server.
    """

    hits: list[Hit]
    messages: list[Message]
    model: str
    _events: AsyncGenerator[ChatEvent, None] | None = None
    text: str = ""
    done: ChatDone | None = field(default=None)

    def __aiter__(self) -> AsyncIterator[ChatEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncGenerator[ChatEvent, None]:
        assert self._events is not None, "an Answer streams once"
        events, self._events = self._events, None
        try:
            async for event in events:
                if isinstance(event, ChatDelta):
                    self.text += event.text
                    yield event
                    if is_looping(self.text):
                        # Small models fall into loops that run to the token limit: stop early
                        # (closing the stream stops the generation on the server).
                        self.done = ChatDone(finish_reason="repetition", usage=None, model=self.model)
                        yield self.done
                        return
                    continue
                if isinstance(event, ChatDone):
                    self.done = event
                yield event
        finally:
            await events.aclose()

    async def aclose(self) -> None:
        if self._events is not None:
            await self._events.aclose()
            self._events = None

    def citations(self) -> list[int]:
        """The passage numbers the answer so far cites, in order of first citation."""
        return citations_in(self.text, len(self.hits))


def answer(
    client: ChatClient,
    model: str,
    question: str,
    hits: Sequence[Hit],
    history: Sequence[Message] = (),
    *,
    context_window: int,
    max_answer_tokens: int = 512,
    temperature: float | None = 0.2,
    count: TokenCounter | None = None,
    system: str = SYSTEM_PROMPT,
    on_sent: Callable[[], None] | None = None,
) -> Answer:
    """Fit the passages and history into the model's window, then start streaming the answer.

    Raises ``ContextLengthError`` at once when even the question alone does not fit.
    ``on_sent``: called when the request has been written (``ChatClient.stream``).
    """
    messages, kept = fit_to_budget(
        question,
        hits,
        history=history,
        context_window=context_window,
        reserve_answer_tokens=max_answer_tokens,
        count=count or default_token_counter(),
        system=system,
    )
    events = client.stream(
        messages, model=model, temperature=temperature, max_tokens=max_answer_tokens, on_sent=on_sent
    )
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


# --- Citations ------------------------------------------------------------------------------


def citations_in(text: str, n_passages: int) -> list[int]:
    """The passage numbers ``text`` cites, in order of first citation; numbers outside
    1..n_passages (invented by the model) are left out. ``[1, 3]`` cites 1 and 3.

    >>> citations_in("Turn it weekly [2][1]. Keep it moist [2, 7]. See [0].", 3)
    [2, 1]
    """
    seen: list[int] = []
    for match in _CITATION_GROUP.finditer(text):
        for part in re.split(r"[,;]", match.group(1)):
            number = int(part)
            if 1 <= number <= n_passages and number not in seen:
                seen.append(number)
    return seen


def normalize_citations(text: str) -> str:
    """Split grouped citations into single ones, ``[1, 2]`` -> ``[1][2]``, so that each number
    can be linked on its own.

    >>> normalize_citations("Moist [1, 2]; hot [3;9].")
    'Moist [1][2]; hot [3][9].'
    """

    def split(match: re.Match[str]) -> str:
        return "".join(f"[{p.strip()}]" for p in re.split(r"[,;]", match.group(1)))

    return _CITATION_GROUP.sub(split, text)
