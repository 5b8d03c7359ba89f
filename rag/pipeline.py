"""The one path of a question: rewrite → retrieve → gate → budgeted prompt → stream with fallback.

The chat app, ``rag ask``, ``rag compare``, ``rag eval-answers`` and the API's retrieval models
all call ``ask`` and render what it yields, as plain values (no UI framework)::

    question ──router.rewrite──▶ standalone        (a follow-up only)     Rewriting, Rewritten
        ──retrieve──▶ Retrieval                                             Retrieved
        Retrieval.relevant is False ─▶ stop: say the documents don't contain the answer
        ──router.answer──▶ Answer (the candidate that gave a first token)   Queued …, Started
        ──▶ ChatDelta … ChatDone                                           (the answer's events)

Trade-offs:

- The gate uses the cosine similarity each hit carries, which means the same in every retrieval
  mode. Passages under the threshold are not sent even when others pass: a weak passage
  numbered [4] invites a citation that supports nothing.
- Budgeting may drop the lowest-ranked passages (``Started.answer.hits`` are those sent);
  citations are resolved against what was sent, never against what was retrieved.
- A rewrite failure never fails the question: it is asked as it was typed.
- While a busy endpoint keeps the answer's request waiting, its ``Queued`` notices are yielded
  as they come, before ``Started`` (the router is still waiting for a first token then, and may
  yet fall back to another endpoint). Closing ``ask`` meanwhile gives the place up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rag.answering import Answer, needs_rewrite
from rag.citations import citations_in, normalize_citations, strip_citations
from rag.config import DEFAULT_MIN_RELEVANCE, DEFAULT_TEMPERATURE, POLICIES, RETRIEVAL_MODES, Settings
from rag.embedding import Embedder
from rag.endpoints import EndpointSpec
from rag.chunking import sentence_spans
from rag.excerpts import DEFAULT_BUDGET, select_excerpts, word_scores
from rag.index import Snapshot
from rag.keyword import tokenize
from rag.prompting import TokenCounter
from rag.retrieval import LiveIndex, Retriever
from rag.routing import Router
from rag.types import ChatEvent, Hit, Message, Queued

_WORDS = re.compile(r"\w{2,}")
HISTORY_MESSAGES = 12  # turns kept per conversation (the budget may send fewer)
MAX_TOP_K = 20


# --- Options --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AskOptions:
    """How one question is answered (a chat's settings; changes apply to its next question)."""

    model: str = ""  # empty: the endpoint's own
    top_k: int = 5
    temperature: float = DEFAULT_TEMPERATURE
    mode: str = "hybrid"
    min_relevance: float = DEFAULT_MIN_RELEVANCE
    policy: str = "local-only"  # routing (rag/routing.py)
    # Tokens of passage text sent to the model (rag/excerpts.py); 0: whole passages.
    excerpt_tokens: int = DEFAULT_BUDGET

    @classmethod
    def from_settings(cls, settings: Settings, model: str = "") -> AskOptions:
        return cls(model=model or settings.model, top_k=settings.top_k, temperature=settings.temperature,
                   mode=settings.retrieval_mode, min_relevance=settings.min_relevance,
                   policy=settings.policy, excerpt_tokens=settings.excerpt_tokens)  # fmt: skip

    def updated(self, values: Mapping[str, Any], models: Sequence[str]) -> AskOptions:
        """These options after a settings form sent ``values``; out-of-range or unknown values
        are clamped or ignored (the form is a browser: trust nothing).

        >>> AskOptions().updated({"top_k": 50.0, "mode": "bm25", "model": "x"}, ["m"])
        AskOptions(model='', top_k=20, temperature=0.0, mode='bm25', min_relevance=0.35, policy='local-only', excerpt_tokens=200)
        """
        changes: dict[str, Any] = {}
        with contextlib.suppress(TypeError, ValueError):
            if "top_k" in values:
                changes["top_k"] = min(MAX_TOP_K, max(1, int(float(values["top_k"]))))
        with contextlib.suppress(TypeError, ValueError):
            if "temperature" in values:
                changes["temperature"] = min(2.0, max(0.0, float(values["temperature"])))
        with contextlib.suppress(TypeError, ValueError):
            if "min_relevance" in values:
                changes["min_relevance"] = min(1.0, max(-1.0, float(values["min_relevance"])))
        if values.get("mode") in RETRIEVAL_MODES:
            changes["mode"] = values["mode"]
        if values.get("model") in models:
            changes["model"] = values["model"]
        if values.get("policy") in POLICIES:
            changes["policy"] = values["policy"]
        return dataclasses.replace(self, **changes)


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


# --- The path -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rewriting:
    """A follow-up is being made standalone (a model call: it takes a moment)."""

    question: str


@dataclass(frozen=True)
class Rewritten:
    """A follow-up was made standalone (``standalone`` may equal ``question``)."""

    question: str
    standalone: str


@dataclass(frozen=True)
class Retrieved:
    """What the search found; when ``retrieval.relevant`` is False nothing more comes."""

    retrieval: Retrieval


@dataclass(frozen=True)
class Started:
    """The answer's first event arrived: ``answer.hits`` were sent, ``answer.route`` answers."""

    answer: Answer


Event = Rewriting | Rewritten | Retrieved | Queued | Started | ChatEvent


async def ask(
    question: str,
    history: Sequence[Message] = (),
    *,
    index: LiveIndex | Snapshot,
    embedder: Embedder,
    router: Router,
    options: AskOptions,
    count: TokenCounter,
    max_answer_tokens: int | None = None,
    candidates: Sequence[EndpointSpec] | None = None,
) -> AsyncGenerator[Event, None]:
    """Answer ``question`` (after ``history``) from the documents: yields ``Rewriting`` and
    ``Rewritten`` (a follow-up only), ``Retrieved``, then, when a passage is relevant, ``Queued``
    while a busy endpoint keeps it waiting, ``Started`` and the answer's ``ChatDelta``s and
    ``ChatDone``. ``Started.answer`` holds the text so far, the
    citations and the route, also when the stream fails later.

    Raises what no endpoint could get past (``EndpointError``, ``PolicyError``, …) after
    ``Retrieved``: the caller can still show the passages. Close the generator (``aclosing``)
    to stop the answer; its HTTP stream closes with it.
    """
    standalone = question
    if needs_rewrite(history, question):
        yield Rewriting(question)
        standalone = await router.rewrite(history, question, policy=options.policy, model=options.model)
        yield Rewritten(question, standalone)
    found = await asyncio.to_thread(
        retrieve, index, embedder, standalone, k=options.top_k, mode=options.mode, min_relevance=options.min_relevance
    )
    yield Retrieved(found)
    if not found.relevant:
        return
    sent: Sequence[Hit] = found.hits
    if options.excerpt_tokens:  # the sentences that matter: fewer tokens for the model to read
        sent = await asyncio.to_thread(select_excerpts, standalone, found.hits, count=count,
                                       budget=options.excerpt_tokens)  # fmt: skip
    notices: asyncio.Queue[Queued] = asyncio.Queue()

    async def queued(notice: Queued) -> None:
        notices.put_nowait(notice)

    starting = asyncio.ensure_future(router.answer(
        standalone, sent, history, count=count, policy=options.policy, model=options.model,
        temperature=options.temperature, max_answer_tokens=max_answer_tokens, candidates=candidates,
        on_queued=queued,
    ))  # fmt: skip
    handed = False
    try:
        while not starting.done():
            told = asyncio.ensure_future(notices.get())
            try:
                await asyncio.wait({starting, told}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                told.cancel()
            if told.done() and not told.cancelled():
                yield told.result()
        answer = starting.result()  # raises what no endpoint could get past
        while not notices.empty():  # those that came with the first token, in order
            yield notices.get_nowait()
        handed = True
    finally:
        if not handed:  # closed or cancelled while waiting: give the place in line up
            await _abandon(starting)
    try:
        yield Started(answer)
        async for event in answer:
            yield event
    finally:
        await answer.aclose()


async def _abandon(starting: asyncio.Future[Answer]) -> None:
    """Stop an answer that is still starting (its request is closed), or close it if it started."""
    if not starting.done():
        starting.cancel()
        await asyncio.wait({starting})
    if not starting.cancelled() and starting.exception() is None:
        await starting.result().aclose()


@dataclass(frozen=True)
class Presented:
    """An answer as it is shown: ``text`` with grouped citations split (``[1, 2]`` ->
    ``[1][2]``), the passage numbers it cites (invented ones left out), and how it was made:
    ``attributed`` when the citation was found afterwards, ``marker_only`` when the model wrote
    nothing but markers (``text`` then quotes the passage it pointed at). ``added`` is what was
    appended to the model's own text, for a caller that streamed that text already."""

    text: str
    cited: list[int]
    marker_only: bool = False
    attributed: bool = False
    added: str = ""


# Replies that decline to answer: they get no citation of ours.
_DECLINES = re.compile(
    r"\b(i (do not|don't|cannot|can't) (know|find|answer|tell)|not (mentioned|stated|specified|provided|"
    r"given|found|available) in|(passages|documents|context) (do not|don't|does not|doesn't) "
    r"(contain|mention|say|provide|include)|no information)\b",
    re.I,
)


def declines(text: str) -> bool:
    """Whether a reply says it cannot answer.

    >>> declines("The documents do not mention his age."), declines("He was 56 [1].")
    (True, False)
    """
    return bool(_DECLINES.search(text))


def present(answer: Answer, question: str = "") -> Presented:
    """What a user is shown for ``answer`` (the app, ``rag ask``, the API and the evaluation
    all show this).

    - An answer in words that cites nothing (small models rarely cite) gets the number of the
      passage that holds what it says: the one sharing the most of its words that are not the
      question's (``supporting_passage``); none when nothing is shared, or it declines.
    - An answer of markers only (``[1] [2]``) is never shown bare: it becomes the sentence of
      the first passage it points at that matches the question best, quoted and cited.
    """
    text = normalize_citations(answer.text).strip()
    hits = answer.hits
    cited = citations_in(text, len(hits))
    if text and hits and not _WORDS.search(strip_citations(text)):
        number = cited[0] if cited else 1
        sentence = best_sentence(hits[number - 1], question)
        shown = f"The model pointed at passage [{number}] without answering in words. It says: “{sentence}” [{number}]"
        return Presented(shown, [number], marker_only=True, added="\n\n" + shown)
    if text and hits and not cited and not declines(text):
        number = supporting_passage(text, hits, question)
        if number is not None:
            return Presented(f"{text} [{number}]", [number], attributed=True, added=f" [{number}]")
    return Presented(text, cited)


def supporting_passage(text: str, hits: Sequence[Hit], question: str = "") -> int | None:
    """The number of the passage (as sent: its excerpt) sharing the most of ``text``'s words,
    the question's own words left out unless nothing else is said; the best-ranked on a tie.

    >>> from rag.types import Chunk
    >>> hits = [Hit(Chunk(c, "a.txt", t, 0, 1), 1.0, 1) for c, t in [("a", "He died in 1865."), ("b", "Lincoln was born in 1809.")]]
    >>> supporting_passage("Lincoln was born in 1809.", hits, "When was Lincoln born?")
    2
    """
    said = set(tokenize(text))
    own = said - set(tokenize(question)) or said
    best, number = 0, None
    for n, hit in enumerate(hits, start=1):
        shared = len(own & set(tokenize(hit.excerpt if hit.excerpt is not None else hit.chunk.text)))
        if shared > best:
            best, number = shared, n
    return number


def best_sentence(hit: Hit, question: str) -> str:
    """The sentence of a passage (as sent) that shares the most of the question's words.

    >>> from rag.types import Chunk
    >>> best_sentence(Hit(Chunk("a", "a.txt", "He was tall. He was born in 1809.", 0, 1), 1.0, 1), "When was he born?")
    'He was born in 1809.'
    """
    text = hit.excerpt if hit.excerpt is not None else hit.chunk.text
    sentences = [" ".join(text[s:e].split()) for s, e in sentence_spans(text)] or [text.strip()]
    scores = word_scores(question, sentences)
    return sentences[max(range(len(sentences)), key=lambda i: (scores[i], -i))]


def remember(history: Sequence[Message], question: str, reply: str, *, keep: int = HISTORY_MESSAGES) -> list[Message]:
    """The conversation with one more turn, for follow-ups: the last ``keep`` messages, the
    reply without its citation numbers (they named that turn's passages, and would mislead
    the model about the next turn's).

    >>> [m.content for m in remember([], "How often?", "Weekly [1].")]
    ['How often?', 'Weekly.']
    """
    turns = [*history, Message("user", question), Message("assistant", strip_citations(reply))]
    return turns[-keep:]
