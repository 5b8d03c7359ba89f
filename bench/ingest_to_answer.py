"""From a 10-page PDF landing in the corpus folder of a running app to being answerable.

    .venv/bin/python -m bench.ingest_to_answer                 # sample corpus, 4 PDFs, ~2 min on 2 cores
    .venv/bin/python -m bench.ingest_to_answer --chunks 10000  # beside a 10k-chunk index
    .venv/bin/python -m bench.ingest_to_answer --runs 6 --json

The app runs headless and instrumented exactly as in ``bench.chat_latency`` (same subprocess,
same scripted OpenAI-compatible endpoint), with one chat open in Chromium. Each run copies a new
generated 10-page PDF (about 500 words a page, a different one each run so nothing is reused
from the vector cache) into the corpus folder with ``shutil.copyfile``, like ``cp``, and then:

1. waits for the folder-watch notice ("Documents updated: added **x.pdf** ...") to appear in the
   page (a ``MutationObserver`` stamps ``Date.now()``, comparable with this process's
   ``time.time()`` on the same machine);
2. asks a question about a fact printed only on the PDF's page 7 and checks that the page-7
   passage is among those sent to the model (the endpoint sees the prompt).

The split comes from the app's own timestamps: file copied -> the watcher yields (debounce:
``WATCH_DEBOUNCE_MS``/``WATCH_STEP_MS`` in app.py) -> ``sync_index`` (its parse, chunk, embed
and commit parts) -> the new snapshot loaded and the notice sent -> the notice in the page.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.chat_latency import (
    CHROMIUM,
    CHROMIUM_ARGS,
    MODEL,
    App,
    Endpoint,
    Tab,
    build_index,
)

NAMES = ["Varnholt", "Quendris", "Mallowby", "Trevanic", "Ostrakel", "Pellimore", "Zandrith", "Corvessa",
         "Halvinor", "Brisketh", "Umbraval", "Daskelon"]  # fmt: skip

NOTICE_JS = """([name]) => {
  const b = window.__ingest = {notice: null};
  const obs = new MutationObserver(() => {
    if (b.notice !== null) return;
    if (document.body.textContent.includes('Documents updated') && document.body.textContent.includes(name)) {
      b.notice = Date.now();
      obs.disconnect();
    }
  });
  obs.observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(pages: list[list[str]]) -> bytes:
    """A PDF with one page per list of lines (Helvetica 11 pt), built with pypdf alone."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    font = writer._add_object(DictionaryObject({
        NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject("/Helvetica"), NameObject("/Encoding"): NameObject("/WinAnsiEncoding"),
    }))  # fmt: skip
    for lines in pages:
        page = writer.add_blank_page(width=612, height=792)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
        )
        content = DecodedStreamObject()
        ops = " T* ".join(f"({_escape(line)}) Tj" for line in lines)
        content.set_data(f"BT /F1 11 Tf 14 TL 60 740 Td {ops} ET".encode("cp1252"))
        page.replace_contents(content)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def wrap(text: str, width: int = 95) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def report_pdf(run: int, name: str) -> tuple[bytes, str, str]:
    """A 10-page report: ~500 words of prose a page; page 7 alone holds the fact.
    Returns (pdf bytes, question, the code the answer needs)."""
    from bench._common import TextGenerator

    gen = TextGenerator(1000 + run)
    code = f"QX-{run}{7731 + run * 17}"
    pages = []
    for number in range(1, 11):
        if number == 7:
            fact = (f"{name} turbine calibration. The calibration code for the {name} turbine is {code}. "
                    f"Technicians enter code {code} into the {name} turbine controller after every "
                    f"inspection of the {name} turbine.")  # fmt: skip
            lines = wrap(fact) + [""] + wrap(gen.paragraph((2, 3)))
        else:
            lines = [f"Section {number}", ""]
            while sum(len(line.split()) for line in lines) < 480:
                lines += wrap(gen.paragraph()) + [""]
            lines = lines[:48]
        pages.append(lines)
    return make_pdf(pages), f"What is the calibration code for the {name} turbine?", code


def _wall(events: list[dict[str, Any]], name: str, after: float) -> float | None:
    return next((e["wall"] for e in events if e["ev"] == name and e["wall"] >= after), None)


def _sum(events: list[dict[str, Any]], name: str, after: float, until: float) -> float:
    """Seconds spent in ``name:start`` .. ``name:end`` pairs between two wall times."""
    total, start = 0.0, None
    for e in events:
        if not after <= e["wall"] <= until:
            continue
        if e["ev"] == name + ":start":
            start = e["wall"]
        elif e["ev"] == name + ":end" and start is not None:
            total += e["wall"] - start
            start = None
    return total


def main(argv: list[str] | None = None) -> int:
    from bench._common import add_json_option, machine, save_results

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4, help="PDFs added one after another (default 4)")
    parser.add_argument("--chunks", type=int, default=0, help="synthetic chunks indexed beside the sample corpus (0)")
    parser.add_argument("--base", type=int, default=100, help="real embeddings the synthetic vectors mix (100)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    add_json_option(parser, "ingest_to_answer")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright


    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    print(f"machine {machine()}; work folder {work}", flush=True)
    endpoint = Endpoint(ttft=0.05, rewrite_delay=0.05, rewrites={})
    app: App | None = None
    rows: list[dict[str, Any]] = []
    try:
        corpus = work / "corpus"
        if args.chunks:
            built = build_index(corpus, work / "data", args.chunks, base=args.base)
            print(f"index: {built['chunks']} synthetic chunks committed", flush=True)
        else:
            shutil.copytree(Path(__file__).resolve().parent.parent / "docs_corpus", corpus)
        app = App(work, {"RAG_BASE_URL": endpoint.url, "RAG_MODEL": MODEL, "RAG_MAX_ANSWER_TOKENS": "64"})
        app.start(timeout=300.0)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            tab = Tab(browser, app.url)
            tab.welcome()
            # The folder watcher starts only once the start-up sync is done: a file copied before
            # that is not seen (see docs/benchmarks.md). Wait for it, then for the watcher.
            deadline = time.monotonic() + 600
            while not any(e["ev"] == "sync_index:end" for e in app.events()) and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(3.0)
            chunks_before = next((e.get("chunks") for e in reversed(app.events()) if e["ev"] == "commit:start"), None)
            print(f"app ready; index holds {chunks_before or args.chunks} chunks", flush=True)
            staging = work / "staging"
            staging.mkdir()
            for run in range(args.runs):
                name = NAMES[run % len(NAMES)]
                pdf, question, code = report_pdf(run, name)
                filename = f"{name.lower()}-turbine-report.pdf"
                (staging / filename).write_bytes(pdf)
                time.sleep(2.0)  # the watcher and the machine settle
                tab.page.evaluate(NOTICE_JS, [filename])
                offset, calls = app.trace_offset(), len(endpoint.log)
                copied = time.time()
                shutil.copyfile(staging / filename, corpus / filename)
                landed = time.time()
                tab.page.wait_for_function("() => window.__ingest.notice !== null", timeout=180_000, polling=50)
                notice_page = tab.page.evaluate("() => window.__ingest.notice") / 1000.0
                answered_at = time.time()
                tab.ask(question)
                asked = endpoint.entries(calls)
                prompt = next((c.get("user", "") for c in asked if c["stream"]), "")
                found = f"({filename}, page 7" in prompt and code in prompt
                time.sleep(0.5)
                events = app.events(offset)
                watch = _wall(events, "watch", copied)
                sync0 = _wall(events, "sync_index:start", copied)
                sync1 = _wall(events, "sync_index:end", copied)
                notice0 = _wall(events, "notice:start", copied)
                notice1 = _wall(events, "notice:end", copied)
                if None in (watch, sync0, sync1, notice0, notice1):
                    print(f"  run {run}: a timestamp is missing -- skipped", flush=True)
                    continue
                embedded = sum(e.get("n", 0) for e in events if e["ev"] == "embed:start" and e["wall"] <= sync1)
                row = {
                    "pdf_bytes": len(pdf), "chunks_embedded": embedded,
                    "copy": landed - copied,
                    "debounce": watch - landed,  # file written -> the watcher yields
                    "watch_to_sync": sync0 - watch,
                    "indexing": sync1 - sync0,
                    "load_old": _sum(events, "load", sync0, sync1),
                    "parse": _sum(events, "parse", sync0, sync1),
                    "chunk": _sum(events, "chunk", sync0, sync1),
                    "embed": _sum(events, "embed", sync0, sync1),
                    "commit": _sum(events, "commit", sync0, sync1),
                    "reload+notify": notice1 - sync1,
                    "to_page": notice_page - notice1,
                    "total_notice": notice_page - copied,
                    "page7_sent": found,
                    "answer_after": answered_at - copied,
                }  # fmt: skip
                rows.append(row)
                print(f"  run {run}: notice in page {row['total_notice']:.2f} s after the copy (debounce "
                      f"{row['debounce']:.2f}, indexing {row['indexing']:.2f} of which embed {row['embed']:.2f} "
                      f"for {embedded} chunks, reload+notify {row['reload+notify']:.2f}, to page "
                      f"{row['to_page']:.3f}); page 7 retrieved: {found}", flush=True)  # fmt: skip
            tab.close()
            browser.close()
        keys = ["total_notice", "debounce", "watch_to_sync", "indexing", "load_old", "parse", "chunk", "embed",
                "commit", "reload+notify", "to_page"]  # fmt: skip
        print()
        print("| " + " | ".join(["runs", "chunks embedded", *keys, "page 7 retrieved"]) + " |")
        print("|" + "---|" * (len(keys) + 3))
        med = {k: statistics.median(r[k] for r in rows) for k in keys} if rows else {}
        if rows:
            print(f"| {len(rows)} | {statistics.median(r['chunks_embedded'] for r in rows):.0f} | "
                  + " | ".join(f"{med[k]:.2f}" for k in keys)
                  + f" | {sum(r['page7_sent'] for r in rows)}/{len(rows)} |")  # fmt: skip
        save_results("ingest_to_answer", {"args": vars(args), "runs": rows, "median_s": med}, args.json)
    finally:
        if app is not None:
            app.stop()
        endpoint.close()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
