"""Many people at once: N chats (default 8) ask at the same moment, each in its own Chromium
context, while 200 new files are being indexed; the model answers one request at a time.

    .venv/bin/python -m bench.team_chats                  # scripted model behind the real rag serve queue
    .venv/bin/python -m bench.team_chats --real           # the built default model (SmolLM2-135M), rag serve
    .venv/bin/python -m bench.team_chats --chats 4 --files 50 --json

What runs:

- The app: ``chainlit run app.py --headless`` (as the end-to-end tests start it: history on, signed
  in by itself), its corpus the sample documents.
- The model: by default ``tests/scripted.py`` (an answer of ~12 words, one every
  ``--word-delay`` seconds) behind ``rag.server``'s HTTP server, so the queue, its notices and
  its disconnect handling are the real ones. ``--real``: the app's own ``rag serve`` (the
  launcher starts it) with the built default model, answers capped at ``--max-tokens``.
- The load: once every chat has asked, ``--files`` generated Markdown notes (``bench._common``)
  land in the corpus; the app's watcher indexes them with the real embedding model, on the same
  two cores, while the questions wait and stream.
- The people: each context opens the chat, waits for the welcome, and gets its question typed
  in; then Enter is pressed in each in turn (as fast as Playwright goes) and every page is
  watched: a ``MutationObserver`` records each place in line the answer's placeholder shows
  ("2 questions ahead of yours") and when the first answer text replaces it; Enter's time is the
  ``keydown`` event's.

Reported: answers completed (whole, with the model's footer), errors (a warning in the answer,
or none within ``--timeout``), time to first token (Enter to the first answer text in the page)
by the place in line first shown (0: answered at once), how long the indexing took, and the
app's memory (RSS of the app process, and of the model server it started, sampled every 0.5 s).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

from bench._common import (
    TextGenerator,
    add_json_option,
    machine,
    markdown_table,
    save_results,
    write_corpus,
)
from tests.apphost import AppProcess

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]  # fmt: skip
QUESTIONS = [
    "How long does light from the Sun take to reach Earth?",
    "What should I do when the compost pile smells of ammonia?",
    "What does the First Amendment protect?",
    "What did Lincoln say at Gettysburg about the nation?",
    "How far is Mars from the Sun?",
    "How often should the compost pile be turned?",
    "What does the Second Amendment say?",
    "How do I add documents to this app?",
]

WATCH_JS = """() => {
  const before = document.querySelectorAll('[data-step-type="assistant_message"]').length;
  const b = window.__team = {enter: null, first: null, places: [], text: "", before};
  document.addEventListener('keydown', e => {
    if (e.key === 'Enter' && b.enter === null) b.enter = e.timeStamp;
  }, {capture: true});
  const look = () => {
    const ms = document.querySelectorAll('[data-step-type="assistant_message"]');
    if (ms.length <= before) return;
    const text = ms[ms.length - 1].innerText.trim();
    const m = text.match(/(\\d+) questions? ahead of yours/);
    if (m) {
      const n = Number(m[1]);
      if (b.places[b.places.length - 1] !== n) b.places.push(n);
    } else if (b.first === null && text && !text.includes('Reading the passages')) {
      b.first = performance.now();
    }
    b.text = text;
  };
  new MutationObserver(look).observe(document.body, {childList: true, subtree: true, characterData: true});
}"""

DONE_JS = """() => {
  const b = window.__team;
  const n = document.querySelectorAll('[data-step-type="assistant_message"]').length;
  return n > b.before && b.first !== null && !document.querySelector('#stop-button');
}"""


class MemorySampler:
    """Peak and last RSS (MiB) of a process and, separately, of its descendants."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.app_peak = self.children_peak = 0.0
        self.app_last = self.children_last = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.app_last = self.process.memory_info().rss / 2**20
                self.children_last = sum(c.memory_info().rss for c in self.process.children(recursive=True)) / 2**20
            except psutil.Error:
                pass
            self.app_peak = max(self.app_peak, self.app_last)
            self.children_peak = max(self.children_peak, self.children_last)
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--files", type=int, default=200, help="new files indexed while the chats wait")
    parser.add_argument("--real", action="store_true", help="the built default model through rag serve")
    parser.add_argument("--word-delay", type=float, default=0.4, help="scripted model: seconds per word (~5 s an answer)")
    parser.add_argument("--max-tokens", type=int, default=96, help="--real: RAG_MAX_ANSWER_TOKENS")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for every answer")
    add_json_option(parser, "team_chats")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="team-chats-") as tmp:
        result = run(Path(tmp), args)
    print_report(result)
    save_results("team_chats", result, args.json)
    return 0


def run(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from contextlib import ExitStack

    from playwright.sync_api import sync_playwright

    with ExitStack() as stack:
        if args.real:
            from rag.modelbuild import DEFAULT_MODEL, is_built

            models = REPO / ".rag" / "models"
            if not is_built(models / DEFAULT_MODEL):
                raise SystemExit(f"no chat model built in {models}: run `python -m rag model build`")
            (work / "data").mkdir()
            (work / "data" / "models").symlink_to(models)
            env = {"RAG_BASE_URL": "", "RAG_MODEL": "", "RAG_MAX_ANSWER_TOKENS": str(args.max_tokens)}
            model = f"{DEFAULT_MODEL} (rag serve, answers up to {args.max_tokens} tokens)"
        else:
            from tests.scripted import MODEL, scripted_endpoint

            endpoint = stack.enter_context(scripted_endpoint(word_delay=args.word_delay))
            env = {"RAG_BASE_URL": endpoint.url, "RAG_MODEL": MODEL}
            model = f"scripted ({args.word_delay:g} s a word, ~12 words), rag serve's queue"
        app = AppProcess(work, env)
        started = time.perf_counter()
        app.start(600)
        stack.callback(app.stop)
        assert app.process is not None
        memory = stack.enter_context(MemorySampler(app.process.pid))
        playwright = stack.enter_context(sync_playwright())
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        stack.callback(browser.close)
        pages = []
        for i in range(args.chats):
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            page = context.new_page()
            page.set_default_timeout(args.timeout * 1000)
            page.goto(app.url)
            page.wait_for_selector("#chat-input")
            pages.append(page)
        for page in pages:  # the first visit waits for the model to load and the samples to be indexed
            page.get_by_text("Ask about your documents", exact=False).first.wait_for()
        ready = time.perf_counter() - started
        for page, question in zip(pages, QUESTIONS * (args.chats // len(QUESTIONS) + 1), strict=False):
            page.evaluate(WATCH_JS)
            page.fill("#chat-input", question)
        asked = time.perf_counter()
        for page in pages:
            page.press("#chat-input", "Enter")
        log_offset = app.log_path.stat().st_size
        generator = TextGenerator(seed=14)
        write_corpus(app.corpus / "incoming", [generator.short_markdown() for _ in range(args.files)], prefix="note")
        indexed_at = None
        results: list[dict[str, Any] | None] = [None] * len(pages)
        deadline = asked + args.timeout
        while time.perf_counter() < deadline and (None in results or indexed_at is None):
            for i, page in enumerate(pages):
                if results[i] is None and page.evaluate(DONE_JS):
                    results[i] = dict(page.evaluate("() => window.__team"))
            if indexed_at is None and indexed(app.log_path.read_bytes()[log_offset:]) >= args.files:
                indexed_at = time.perf_counter() - asked
            time.sleep(0.2)
        memory_now = (memory.app_last, memory.children_last)
    rows = []
    for i, got in enumerate(results):
        if got is None:
            rows.append({"chat": i, "place": None, "ttft_s": None, "complete": False, "error": "timed out"})
            continue
        text = got["text"]
        complete = "Answered by" in text and "⚠️" not in text
        rows.append({
            "chat": i,
            "place": got["places"][0] if got["places"] else 0,
            "places": got["places"],
            "ttft_s": round((got["first"] - got["enter"]) / 1000, 2) if got["first"] and got["enter"] else None,
            "complete": complete,
            "error": None if complete else text[-200:],
        })  # fmt: skip
    return {
        "model": model,
        "chats": args.chats,
        "files_indexed_meanwhile": args.files,
        "app_ready_s": round(ready, 1),
        "indexing_s": round(indexed_at, 1) if indexed_at is not None else None,
        "answers_completed": sum(r["complete"] for r in rows),
        "errors": sum(not r["complete"] for r in rows),
        "per_chat": rows,
        "memory_mib": {
            "app_peak": round(memory.app_peak),
            "app_end": round(memory_now[0]),
            "model_server_peak": round(memory.children_peak),
            "model_server_end": round(memory_now[1]),
        },
        "machine_at_end": machine(),
    }


def indexed(log: bytes) -> int:
    """Files the app's watcher added, by its log lines ("index: +12 ~0 -0, 340 passages")."""
    return sum(int(n) for n in re.findall(rb"index: \+(\d+) ", log))


def print_report(result: dict[str, Any]) -> None:
    print(f"model: {result['model']}; {result['chats']} chats at once, {result['files_indexed_meanwhile']} files "
          f"indexed meanwhile (took {result['indexing_s']} s)")  # fmt: skip
    print(f"answers completed: {result['answers_completed']}/{result['chats']}, errors: {result['errors']}")
    by_place: dict[int, list[float]] = {}
    for row in result["per_chat"]:
        if row["ttft_s"] is not None and row["place"] is not None:
            by_place.setdefault(row["place"], []).append(row["ttft_s"])
    print(markdown_table(["place in line first shown", "chats", "time to first token (s)"],
                         [(p, len(v), f"{statistics.median(v):.1f}") for p, v in sorted(by_place.items())]))  # fmt: skip
    mem = result["memory_mib"]
    print(f"memory (MiB): app peak {mem['app_peak']}, at the end {mem['app_end']}; "
          f"model server peak {mem['model_server_peak']}")  # fmt: skip
    for row in result["per_chat"]:
        if row["error"]:
            print(f"chat {row['chat']}: {row['error']}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
