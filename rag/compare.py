"""Compare models: the same questions through the full RAG pipeline, one answer per model.

Each question is retrieved once (behind the relevance gate) and the same passages go to every
endpoint/model, so the answers differ only by the model. Per answer we measure the time to the
first token and the total time from sending the request, the generated tokens (the server's
``usage`` when it reports it, else counted with our tokenizer, marked "≈") and tokens/s over the
generation (after the first token), and we check the answer:

- ``contains_expected``: a normalised substring test against the question's expected fact(s);
- ``cites_relevant``: at least one ``[n]`` it cites points at a relevant source (and page).

The report is ``report.md`` plus ``report.html``. The HTML charts are inline SVG bar charts drawn
by ``bar_chart_svg`` below (made with code, no plotting dependency), so the page is one
self-contained file that opens offline.

Questions: JSONL (``{"question": …, "expected": "…" | [...], "relevant": ["file.pdf#2"]}``), a
plain text file (one question a line), or a BEIR folder (queries + qrels: relevant documents).
"""

from __future__ import annotations

import html
import json
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rag.chat import ChatDelta, ChatDone
from rag.errors import ConfigError, RagError
from rag.pipeline import Retrieval, citations_in
from rag.prompting import TokenCounter
from rag.routing import EndpointSpec, Router
from rag.types import Hit


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


async def run_compare(
    questions: Sequence[Question],
    targets: Sequence[Target],
    router: Router,
    retrieve: Callable[[str], Retrieval],
    *,
    count: TokenCounter,
    clock: Callable[[], float] = time.perf_counter,
    on_run: Callable[[Run], None] | None = None,
) -> CompareResult:
    """Ask every target every question; failures are recorded in the run, never raised."""
    runs: list[Run] = []
    retrieval_seconds = 0.0
    for question in questions:
        started = clock()
        found = retrieve(question.text)
        retrieval_seconds += clock() - started
        for target in targets:
            run = Run(question, target.label, model=target.model, endpoint=target.spec.name)
            if not found.relevant:
                run.error = f"no passage reached the relevance threshold ({found.min_relevance:.2f}): model not asked"
            else:
                await _ask(run, question, found, target, router, count, clock)
            runs.append(run)
            if on_run is not None:
                on_run(run)
    return CompareResult([t.label for t in targets], runs, list(questions), retrieval_seconds)


async def _ask(
    run: Run, question: Question, found: Retrieval, target: Target, router: Router,
    count: TokenCounter, clock: Callable[[], float],
) -> None:  # fmt: skip
    sent = clock()
    try:
        reply = await router.answer(question.text, found.hits, count=count, candidates=[target.spec], model=target.model)
        run.model = reply.model
        done: ChatDone | None = None
        async for event in reply:
            if isinstance(event, ChatDelta) and run.ttft is None:
                run.ttft = clock() - sent
            elif isinstance(event, ChatDone):
                done = event
        run.total = clock() - sent
    except RagError as exc:
        run.error = str(exc)
        return
    run.text = reply.text.strip()
    run.finish_reason = done.finish_reason if done else None
    usage = (done.usage or {}) if done else {}
    if usage.get("completion_tokens"):
        run.tokens = int(usage["completion_tokens"])
    else:
        run.tokens, run.tokens_estimated = count(run.text), True
    numbers = citations_in(run.text, len(reply.hits))
    run.cited = [f"[{n}] {cite_label(reply.hits[n - 1])}" for n in numbers]
    run.contains_expected = contains_expected(run.text, question.expected)
    run.cites_relevant = cites_relevant(reply.hits, numbers, question.relevant)


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


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def _ratio(pair: tuple[int, int]) -> str:
    hit, judged = pair
    return "–" if judged == 0 else f"{hit}/{judged}"


# --- Markdown -------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_markdown(result: CompareResult, *, title: str = "Model comparison") -> str:
    rows = summarise(result)
    estimated = any(s.estimated_tokens for s in rows)
    lines = [f"# {title}", ""]
    lines += [f"{len(result.questions)} questions × {len(result.targets)} models, the same retrieved passages "
              f"for every model (retrieval: {result.retrieval_seconds:.2f} s in all). Times are medians from "
              "sending the request; tokens/s is measured after the first token."]  # fmt: skip
    lines += [f"- {note}" for note in result.notes]
    lines += ["", "| model | answered | time to first token (s) | total (s) | tokens/s | answer length (chars) "
              "| contains expected fact | cites a relevant passage |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in rows:
        lines.append(
            f"| {_md_cell(s.target)} | {s.answered}/{s.answered + s.failed} | {_num(s.ttft)} | {_num(s.total)} "
            f"| {_num(s.tokens_per_second, '{:.1f}')}{' ≈' if s.estimated_tokens else ''} "
            f"| {_num(s.answer_chars, '{:.0f}')} | {_ratio(s.expected_hits)} | {_ratio(s.relevant_hits)} |"
        )
    if estimated:
        lines += ["", "≈: the server reported no token usage; tokens counted with cl100k."]
    for number, question in enumerate(result.questions, start=1):
        lines += ["", f"## {number}. {question.text}", ""]
        if question.expected or question.relevant:
            lines.append(f"Expected: {', '.join(question.expected) or '–'}; relevant: {', '.join(question.relevant) or '–'}")
            lines.append("")
        lines += ["| model | answer | cited | checks |", "|---|---|---|---|"]
        for run in (r for r in result.runs if r.question is question):
            answer = f"**error:** {run.error}" if run.error else run.text or "(empty)"
            checks = ", ".join(
                f"{name} {'✓' if ok else '✗'}"
                for name, ok in (("fact", run.contains_expected), ("source", run.cites_relevant)) if ok is not None
            )  # fmt: skip
            timing = f" ({_num(run.ttft)} s / {_num(run.total)} s)" if run.total is not None else ""
            lines.append(f"| {_md_cell(run.target)}{timing} | {_md_cell(answer)} | {_md_cell('; '.join(run.cited)) or '–'} "
                         f"| {checks or '–'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# --- HTML with inline SVG charts ------------------------------------------------------------

_PALETTE = ("#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5")


def bar_chart_svg(title: str, labels: Sequence[str], values: Sequence[float | None], *, unit: str = "",
                  width: int = 420, bar_height: int = 22) -> str:  # fmt: skip
    """A horizontal bar chart as an SVG string; a missing value shows "–".

    >>> svg = bar_chart_svg("TTFT", ["a", "b"], [1.0, 2.0], unit="s")
    >>> svg.startswith("<svg") and svg.count("<rect") == 2 and "2.00 s" in svg
    True
    """
    label_w, pad, top = 150, 8, 28
    top_value = max((v for v in values if v is not None), default=0.0) or 1.0
    plot_w = width - label_w - 70
    height = top + len(labels) * (bar_height + pad) + pad
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}" font-family="system-ui, sans-serif" font-size="12">',
        f'<text x="0" y="16" font-weight="600" font-size="13">{html.escape(title)}</text>',
    ]
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = top + i * (bar_height + pad)
        short = label if len(label) <= 22 else label[:21] + "…"
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_height * 0.7:.1f}" text-anchor="end">'
                     f'<title>{html.escape(label)}</title>{html.escape(short)}</text>')  # fmt: skip
        if value is None:
            parts.append(f'<text x="{label_w + 4}" y="{y + bar_height * 0.7:.1f}" fill="#888">–</text>')
            continue
        w = max(1.0, plot_w * value / top_value)
        parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_height}" '
                     f'fill="{_PALETTE[i % len(_PALETTE)]}" rx="3"/>')  # fmt: skip
        shown = f"{value:.2f}" if value < 100 else f"{value:.0f}"
        parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar_height * 0.7:.1f}">{shown}{" " + unit if unit else ""}</text>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ddd;padding:.35rem .6rem;vertical-align:top}
th{background:#f4f4f4}.charts{display:flex;flex-wrap:wrap;gap:1.5rem}.grid{display:grid;gap:1rem}
.card{border:1px solid #ddd;border-radius:6px;padding:.7rem}.card h4{margin:.1rem 0 .4rem}
.meta{color:#666;font-size:.85em}.err{color:#b00}.answer{white-space:pre-wrap}
"""


def render_html(result: CompareResult, *, title: str = "Model comparison") -> str:
    esc = html.escape
    rows = summarise(result)
    labels = [s.target for s in rows]
    charts = [
        bar_chart_svg("Time to first token (median)", labels, [s.ttft for s in rows], unit="s"),
        bar_chart_svg("Total time (median)", labels, [s.total for s in rows], unit="s"),
        bar_chart_svg("Tokens per second (median)", labels, [s.tokens_per_second for s in rows]),
        bar_chart_svg("Answer length (mean)", labels, [s.answer_chars for s in rows], unit="chars"),
    ]
    table = ["<table><tr><th>model</th><th>answered</th><th>TTFT (s)</th><th>total (s)</th><th>tokens/s</th>"
             "<th>answer chars</th><th>contains expected fact</th><th>cites a relevant passage</th></tr>"]  # fmt: skip
    for s in rows:
        table.append(
            f"<tr><td>{esc(s.target)}</td><td>{s.answered}/{s.answered + s.failed}</td><td>{_num(s.ttft)}</td>"
            f"<td>{_num(s.total)}</td><td>{_num(s.tokens_per_second, '{:.1f}')}{' ≈' if s.estimated_tokens else ''}</td>"
            f"<td>{_num(s.answer_chars, '{:.0f}')}</td><td>{_ratio(s.expected_hits)}</td><td>{_ratio(s.relevant_hits)}</td></tr>"
        )
    table.append("</table>")
    columns = f"grid-template-columns:repeat({max(1, len(result.targets))},1fr)"
    sections = []
    for number, question in enumerate(result.questions, start=1):
        cards = []
        for run in (r for r in result.runs if r.question is question):
            checks = " ".join(
                f"{name} {'✓' if ok else '✗'}"
                for name, ok in (("fact", run.contains_expected), ("source", run.cites_relevant)) if ok is not None
            )  # fmt: skip
            body = f'<p class="err">{esc(run.error)}</p>' if run.error else f'<div class="answer">{esc(run.text)}</div>'
            cited = "".join(f"<li>{esc(c)}</li>" for c in run.cited) or "<li>no citation</li>"
            cards.append(
                f'<div class="card"><h4>{esc(run.target)}</h4><div class="meta">TTFT {_num(run.ttft)} s · total '
                f"{_num(run.total)} s · {run.tokens} tokens · {esc(checks)}</div>{body}<ul class=meta>{cited}</ul></div>"
            )
        expected = f'<p class="meta">Expected: {esc(", ".join(question.expected) or "–")}</p>' if question.expected else ""
        sections.append(f"<h3>{number}. {esc(question.text)}</h3>{expected}<div class=grid style=\"{columns}\">{''.join(cards)}</div>")
    notes = "".join(f"<li>{esc(n)}</li>" for n in result.notes)
    return (
        f"<!doctype html><html lang=en><meta charset=utf-8><title>{esc(title)}</title><style>{_CSS}</style>"
        f"<h1>{esc(title)}</h1><p>{len(result.questions)} questions × {len(result.targets)} models; the same "
        "retrieved passages go to every model. Charts drawn as inline SVG by rag/compare.py.</p>"
        f"<ul>{notes}</ul><div class=charts>{''.join(charts)}</div>{''.join(table)}<h2>Answers</h2>{''.join(sections)}</html>\n"
    )


def write_report(result: CompareResult, out_dir: Path, *, title: str = "Model comparison") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(render_markdown(result, title=title), encoding="utf-8")
    page.write_text(render_html(result, title=title), encoding="utf-8")
    return md, page
