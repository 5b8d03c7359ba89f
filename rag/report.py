"""The comparison report: ``report.md`` and a self-contained ``report.html``.

The HTML charts are inline SVG bar charts drawn by ``bar_chart_svg`` (made with code, no
plotting dependency), so the page is one file that opens offline. What is compared, and how it
is scored, is ``rag.compare``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from rag.compare import CompareResult, summarise


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
        "retrieved passages go to every model. Charts drawn as inline SVG by rag/report.py.</p>"
        f"<ul>{notes}</ul><div class=charts>{''.join(charts)}</div>{''.join(table)}<h2>Answers</h2>{''.join(sections)}</html>\n"
    )


def write_report(result: CompareResult, out_dir: Path, *, title: str = "Model comparison") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(render_markdown(result, title=title), encoding="utf-8")
    page.write_text(render_html(result, title=title), encoding="utf-8")
    return md, page
