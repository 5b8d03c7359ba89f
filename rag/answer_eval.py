"""End-to-end answer quality: index a question set's documents, ask every question through the
chat's own path (``rag.pipeline.ask``), score what a user would be shown.

A question set is laid out like ``../shared/eval/qa-dev``::

    docs/             the documents (any type the loaders read)
    questions.jsonl   {"id", "question", "answers": [...], "source": "<file in docs/>"} per line
    SOURCE.md         where it comes from

Per question we record the reply as shown (``rag.pipeline.present``), the sources it cites,
the sources retrieved (past the gate) and sent, the time to the first token and in all, and
score it (``rag.scoring``): correct (a gold answer in the reply, SQuAD-normalised, whole
tokens, markers stripped), token F1, whether it cites a passage of ``source``, whether
``source`` was retrieved, the ceiling (a gold answer in the passages sent), abstentions (the
gate closed, or the model said it does not know) and answers cut for looping.

The documents' index is cached under ``<data dir>/eval/<set>-<hash>/`` (the set's files and
the index parameters decide it), so a second run only asks.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rag.config import Settings
from rag.embedding import Embedder
from rag.errors import ConfigError, RagError
from rag.pipeline import Event, Retrieved, Started, declines, present
from rag.scoring import contains_answer, is_correct, token_f1
from rag.types import ChatDelta, ChatDone

@dataclass(frozen=True)
class QAItem:
    id: str
    question: str
    answers: tuple[str, ...]
    source: str


def load_questions(dataset: Path, *, limit: int | None = None) -> list[QAItem]:
    """``questions.jsonl`` of a question set; raises ``ConfigError`` naming the line."""
    path = dataset / "questions.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc} (a question set holds docs/ and questions.jsonl)") from exc
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            answers = data["answers"]
            items.append(QAItem(str(data.get("id", number)), str(data["question"]),
                                tuple(str(a) for a in (answers if isinstance(answers, list) else [answers])),
                                str(data.get("source", ""))))  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f'{path}:{number}: expected {{"question", "answers", "source"}}: {exc}') from exc
    if not items:
        raise ConfigError(f"{path} holds no questions")
    return items[:limit] if limit else items


@dataclass
class Record:
    """One question asked and scored (what ``--json`` writes, one object a line)."""

    id: str
    question: str
    answer: str = ""
    cited_sources: list[str] = field(default_factory=list)
    retrieved_sources: list[str] = field(default_factory=list)
    sent_sources: list[str] = field(default_factory=list)
    ttft_s: float | None = None
    total_s: float | None = None
    correct: bool = False
    f1: float = 0.0
    cites_source: bool = False
    retrieved_source: bool = False
    ceiling: bool = False
    abstained: bool = False
    looped: bool = False
    marker_only: bool = False
    prompt_tokens: int | None = None
    error: str = ""


Ask = Callable[[str], AsyncIterator[Event]]
"""Asks one question through the answer path (``rag.pipeline.ask`` bound to an index and router)."""


async def ask_one(item: QAItem, ask: Ask, *, clock: Callable[[], float] = time.perf_counter) -> Record:
    """Ask ``item`` and score the reply; failures are recorded, never raised."""
    record = Record(item.id, item.question)
    began = clock()
    answer = None
    done: ChatDone | None = None
    sent_texts: list[str] = []
    try:
        async with aclosing(ask(item.question)) as events:
            async for event in events:
                if isinstance(event, Retrieved):
                    record.retrieved_sources = _unique(h.chunk.source for h in event.retrieval.hits)
                    if not event.retrieval.relevant:
                        record.abstained = True
                elif isinstance(event, Started):
                    answer = event.answer
                    record.sent_sources = _unique(h.chunk.source for h in answer.hits)
                    sent_texts = [m.content for m in answer.messages if m.role == "user"][-1:]
                elif isinstance(event, ChatDelta) and record.ttft_s is None:
                    record.ttft_s = clock() - began
                elif isinstance(event, ChatDone):
                    done = event
        record.total_s = clock() - began
    except RagError as exc:
        record.error = str(exc)
    if answer is not None:
        shown = present(answer, item.question)
        record.answer = shown.text
        record.marker_only = shown.marker_only
        record.cited_sources = _unique(answer.hits[n - 1].chunk.source for n in shown.cited)
        record.looped = done is not None and done.finish_reason == "repetition"
        record.abstained = record.abstained or (declines(shown.text) and not is_correct(shown.text, item.answers))
        usage = (done.usage or {}) if done is not None else {}
        record.prompt_tokens = usage.get("prompt_tokens")
    record.correct = is_correct(record.answer, item.answers)
    record.f1 = token_f1(record.answer, item.answers)
    record.cites_source = item.source in record.cited_sources
    record.retrieved_source = item.source in record.retrieved_sources
    record.ceiling = contains_answer(sent_texts, item.answers)
    return record


def _unique(sources: Any) -> list[str]:
    return list(dict.fromkeys(sources))


# --- Summary (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    questions: int
    correct: int
    f1: float
    cites_source: int
    correct_citing_source: int
    retrieved_source: int
    ceiling: int
    abstained: int
    looped: int
    marker_only: int
    errors: int
    ttft_median: float | None
    ttft_p90: float | None
    total_median: float | None
    total_p90: float | None
    prompt_tokens_median: float | None


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if q < 1 else ordered[-1]


def summarise(records: Sequence[Record]) -> Summary:
    """The numbers of a run.

    >>> summarise([Record("1", "q", correct=True, cites_source=True, ttft_s=2.0), Record("2", "q")]).correct
    1
    """
    ttfts = [r.ttft_s for r in records if r.ttft_s is not None]
    totals = [r.total_s for r in records if r.total_s is not None]
    prompts = [r.prompt_tokens for r in records if r.prompt_tokens]
    return Summary(
        questions=len(records),
        correct=sum(r.correct for r in records),
        f1=statistics.mean(r.f1 for r in records) if records else 0.0,
        cites_source=sum(r.cites_source for r in records),
        correct_citing_source=sum(r.correct and r.cites_source for r in records),
        retrieved_source=sum(r.retrieved_source for r in records),
        ceiling=sum(r.ceiling for r in records),
        abstained=sum(r.abstained for r in records),
        looped=sum(r.looped for r in records),
        marker_only=sum(r.marker_only for r in records),
        errors=sum(bool(r.error) for r in records),
        ttft_median=statistics.median(ttfts) if ttfts else None,
        ttft_p90=_quantile(ttfts, 0.9),
        total_median=statistics.median(totals) if totals else None,
        total_p90=_quantile(totals, 0.9),
        prompt_tokens_median=statistics.median(prompts) if prompts else None,
    )


def format_summary(summary: Summary) -> str:
    """The summary as the terminal shows it."""
    n = summary.questions or 1

    def share(count: int, of: int | None = None) -> str:
        total = n if of is None else of
        return f"{count}/{total} ({100 * count / total:.1f} %)" if total else "0/0"

    def seconds(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f} s"

    return "\n".join([
        f"accuracy (a gold answer in the reply)       {share(summary.correct)}",
        f"token F1 (mean)                             {summary.f1:.3f}",
        f"cites a passage from the source             {share(summary.cites_source)}",
        f"  of the correct answers                    {share(summary.correct_citing_source, summary.correct)}",
        f"source retrieved                            {share(summary.retrieved_source)}",
        f"ceiling (a gold answer in the passages sent) {share(summary.ceiling)}",
        f"abstentions                                 {share(summary.abstained)}",
        f"marker-only replies                         {share(summary.marker_only)}",
        f"answers cut for looping                     {share(summary.looped)}",
        f"errors                                      {share(summary.errors)}",
        f"time to first token: median {seconds(summary.ttft_median)}, p90 {seconds(summary.ttft_p90)}",
        f"total time:          median {seconds(summary.total_median)}, p90 {seconds(summary.total_p90)}",
        "prompt tokens (median, the server's count): "
        + ("–" if summary.prompt_tokens_median is None else f"{summary.prompt_tokens_median:.0f}"),
    ])  # fmt: skip


def write_records(records: Sequence[Record], path: Path) -> None:
    """One JSON object per question (``id``, ``question``, ``answer``, ``cited_sources``,
    ``retrieved_sources``, ``ttft_s``, ``total_s`` and the scores)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")


# --- The question set's index ---------------------------------------------------------------


def eval_settings(dataset: Path, settings: Settings) -> Settings:
    """Settings whose corpus is the set's ``docs/`` and whose index is cached for that set
    (embedded store: the evaluation never writes into a shared Milvus collection)."""
    docs = dataset / "docs"
    if not docs.is_dir():
        raise ConfigError(f"{dataset} has no docs/ folder (a question set holds docs/ and questions.jsonl)")
    digest = hashlib.sha256()
    for path in sorted(docs.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(docs).as_posix().encode() + b"\0" + path.read_bytes())
    key = f"{dataset.resolve().name}-{digest.hexdigest()[:12]}"
    changes: dict[str, Any] = {"corpus_dir": docs, "data_dir": settings.data_dir / "eval" / key}
    if hasattr(settings, "vector_store"):
        changes["vector_store"] = "embedded"
    return settings.replace(**changes)


def index_question_set(dataset: Path, settings: Settings, embedder: Embedder) -> Settings:
    """Index the set's documents (only what changed since the last run); returns the settings
    whose index that is."""
    from rag.indexing import sync_index

    local = eval_settings(dataset, settings)
    sync_index(local, embedder, show_progress=True)
    return local
