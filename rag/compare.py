"""Compare models: the same questions through the full RAG pipeline, one answer per model.

Each question is retrieved once (behind the relevance gate) and the same passages go to every
endpoint/model, so the answers differ only by the model. Per answer we measure the time to the
first token and the total time from sending the request, the generated tokens (the server's
``usage`` when it reports it, else counted with our tokenizer, marked "≈") and tokens/s over the
generation (after the first token), and we check the answer:

- ``contains_expected``: a normalised substring test against the question's expected fact(s);
- ``cites_relevant``: at least one passage it cites points at a relevant source (and page); the
  answer is taken as the chat shows it (``rag.pipeline.present``), so a citation found afterwards
  for an answer without markers counts, as it does for the user.

Each question goes through the whole answer path (``rag.pipeline.ask``) once per target: retrieval
is deterministic, so every model gets the same passages. The report is ``rag.report``.

Questions: JSONL (``{"question": …, "expected": "…" | [...], "relevant": ["file.pdf#2"]}``), a
plain text file (one question a line), or a BEIR folder (queries + qrels: relevant documents).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

from rag.answering import Answer
from rag.endpoints import EndpointSpec
from rag.errors import ConfigError, RagError
from rag.pipeline import Event, Retrieved, Started, present
from rag.prompting import TokenCounter
from rag.types import ChatDelta, ChatDone, Hit


@dataclass(frozen=True)
class Question:
    text: str
    expected: tuple[str, ...] = ()
    relevant: tuple[str, ...] = ()  # "source" or "source#page"
    id: str = ""


@dataclass(frozen=True)
class Target:
    """One endpoint and model to ask."""

    label: str
    spec: EndpointSpec
    model: str


@dataclass
class Run:
    question: Question
    target: str
    model: str = ""
    endpoint: str = ""
    text: str = ""
    cited: list[str] = field(default_factory=list)
    ttft: float | None = None
    total: float | None = None
    tokens: int = 0
    tokens_estimated: bool = False
    finish_reason: str | None = None
    error: str = ""
    contains_expected: bool | None = None
    cites_relevant: bool | None = None

    @property
    def tokens_per_second(self) -> float | None:
        if self.ttft is None or self.total is None or self.tokens < 2 or self.total <= self.ttft:
            return None
        return (self.tokens - 1) / (self.total - self.ttft)


@dataclass
class CompareResult:
    targets: list[str]
    runs: list[Run]
    questions: list[Question]
    retrieval_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# --- Questions ------------------------------------------------------------------------------


def _as_tuple(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    raise ConfigError(f"expected a string or a list, got {value!r}")


def load_questions(path: Path, *, limit: int | None = None) -> list[Question]:
    """Questions from JSONL, plain text or a BEIR folder; raises ``ConfigError`` naming the line."""
    if path.is_dir():
        from rag.metrics import load_beir

        _, queries, qrels = load_beir(path)
        out = [
            Question(text, relevant=tuple(d for d, score in qrels[qid].items() if score > 0), id=qid)
            for qid, text in queries.items()
            if qrels.get(qid)
        ]
        return out[:limit] if limit else out
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the questions file {path}: {exc}") from exc
    out = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                data = json.loads(line)
                text = str(data["question"])
            except (json.JSONDecodeError, KeyError) as exc:
                raise ConfigError(f'{path}:{number}: expected {{"question": …, "expected": …}}: {exc}') from exc
            out.append(Question(text, _as_tuple(data.get("expected")), _as_tuple(data.get("relevant")),
                                str(data.get("id", number))))  # fmt: skip
        else:
            out.append(Question(line, id=str(number)))
    if not out:
        raise ConfigError(f"{path} holds no questions")
    return out[:limit] if limit else out


# --- Checks (pure) --------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Lower case, punctuation as spaces, whitespace collapsed.

    >>> normalise("Every 2–3 Weeks!")
    'every 2 3 weeks'
    """
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def contains_expected(answer: str, expected: Sequence[str]) -> bool | None:
    """Whether the answer states one of the expected facts; None when there is none.

    >>> contains_expected("Turn it every 2 to 3 weeks [1].", ["2 to 3 weeks"])
    True
    """
    if not expected:
        return None
    said = f" {normalise(answer)} "
    return any(f" {normalise(e)} " in said for e in expected if normalise(e))


def cites_relevant(hits: Sequence[Hit], cited: Sequence[int], relevant: Sequence[str]) -> bool | None:
    """Whether a cited passage comes from a relevant source (``file`` or ``file#page``)."""
    if not relevant:
        return None
    for number in cited:
        chunk = hits[number - 1].chunk
        for item in relevant:
            source, _, page = item.partition("#")
            if (chunk.source == source or chunk.source.endswith("/" + source)) and (
                not page or str(chunk.page) == page
            ):
                return True
    return False


def cite_label(hit: Hit) -> str:
    return hit.chunk.source + (f" p. {hit.chunk.page}" if hit.chunk.page is not None else "")


# --- Running --------------------------------------------------------------------------------


Ask = Callable[[str, "Target"], AsyncIterator[Event]]
"""Runs one question through the answer path for one target (``rag.pipeline.ask``)."""


async def run_compare(
    questions: Sequence[Question],
    targets: Sequence[Target],
    ask: Ask,
    *,
    count: TokenCounter,
    clock: Callable[[], float] = time.perf_counter,
    on_run: Callable[[Run], None] | None = None,
) -> CompareResult:
    """Ask every target every question; failures are recorded in the run, never raised."""
    runs: list[Run] = []
    retrieval_seconds = 0.0
    for question in questions:
        for target in targets:
            run = Run(question, target.label, model=target.model, endpoint=target.spec.name)
            retrieval_seconds += await _ask(run, question, target, ask, count, clock)
            runs.append(run)
            if on_run is not None:
                on_run(run)
    return CompareResult([t.label for t in targets], runs, list(questions), retrieval_seconds / max(1, len(targets)))


async def _ask(
    run: Run, question: Question, target: Target, ask: Ask, count: TokenCounter, clock: Callable[[], float]
) -> float:
    """One question for one target, recorded in ``run``; returns the retrieval's seconds."""
    began = clock()
    sent = retrieval = 0.0
    answer: Answer | None = None
    done: ChatDone | None = None
    try:
        async with aclosing(ask(question.text, target)) as events:
            async for event in events:
                if isinstance(event, Retrieved):
                    sent = clock()
                    retrieval = sent - began
                    if not event.retrieval.relevant:
                        run.error = (f"no passage reached the relevance threshold "
                                     f"({event.retrieval.min_relevance:.2f}): model not asked")  # fmt: skip
                        return retrieval
                elif isinstance(event, Started):
                    answer = event.answer
                    run.model = answer.model
                elif isinstance(event, ChatDelta) and run.ttft is None:
                    run.ttft = clock() - sent
                elif isinstance(event, ChatDone):
                    done = event
        run.total = clock() - sent
    except RagError as exc:
        run.error = str(exc)
        return retrieval
    if answer is None:
        return retrieval
    shown = present(answer, question.text)  # as the chat shows it: a citation found afterwards included
    run.text = shown.text
    run.finish_reason = done.finish_reason if done else None
    usage = (done.usage or {}) if done else {}
    if usage.get("completion_tokens"):
        run.tokens = int(usage["completion_tokens"])
    else:
        run.tokens, run.tokens_estimated = count(answer.text.strip()), True
    numbers = shown.cited
    run.cited = [f"[{n}] {cite_label(answer.hits[n - 1])}" for n in numbers]
    run.contains_expected = contains_expected(run.text, question.expected)
    run.cites_relevant = cites_relevant(answer.hits, numbers, question.relevant)
    return retrieval


# --- Summary (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    target: str
    answered: int
    failed: int
    ttft: float | None  # median seconds
    total: float | None
    tokens_per_second: float | None
    answer_chars: float | None  # mean
    expected_hits: tuple[int, int]  # (contains, judged)
    relevant_hits: tuple[int, int]
    estimated_tokens: bool


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def summarise(result: CompareResult) -> list[Summary]:
    out = []
    for target in result.targets:
        runs = [r for r in result.runs if r.target == target]
        ok = [r for r in runs if not r.error]
        out.append(
            Summary(
                target=target,
                answered=len(ok),
                failed=len(runs) - len(ok),
                ttft=_median([r.ttft for r in ok]),
                total=_median([r.total for r in ok]),
                tokens_per_second=_median([r.tokens_per_second for r in ok]),
                answer_chars=statistics.mean(len(r.text) for r in ok) if ok else None,
                expected_hits=(sum(bool(r.contains_expected) for r in ok),
                               sum(r.question.expected != () for r in runs)),  # fmt: skip
                relevant_hits=(sum(bool(r.cites_relevant) for r in ok),
                               sum(r.question.relevant != () for r in runs)),  # fmt: skip
                estimated_tokens=any(r.tokens_estimated for r in ok),
            )
        )
    return out
