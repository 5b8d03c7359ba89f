"""Many people at once, end to end: ``chainlit run app.py`` in a subprocess (history on, signed in
by itself), answered by a scripted model behind the real one-at-a-time model server
(``tests/scripted.py``: ``rag.server`` with its queue), each person in their own Chromium context.

What a waiting person sees ("2 questions ahead of yours"), that every answer arrives whole and is
stored in its own chat, and that stopping or leaving while waiting gives the place up.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.apphost import AppProcess, chromium
from tests.scripted import MODEL, Endpoint, scripted_endpoint
from tests.test_e2e import START_TIMEOUT, Chat, unexpected_tracebacks

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# One question per document, so that each answer says which chat it belongs to ("From <file>: …").
QUESTIONS = {
    "How long does light from the Sun take to reach Earth?": "solar-system-fact-sheet.md",
    "What should I do when the compost pile smells of ammonia?": "home-composting-field-guide.pdf",
    "What does the First Amendment protect?": "us-constitution-preamble-and-bill-of-rights.txt",
    "What did Lincoln say at Gettysburg about the nation?": "gettysburg-address.html",
}

# Records every place in line the page shows in its answers, as it changes.
WATCH_QUEUE = """() => {
    window.__places = [];
    const seen = () => {
        const m = document.body.innerText.match(/(\\d+) questions? ahead of yours/);
        const n = m ? Number(m[1]) : null;
        if (n !== null && window.__places[window.__places.length - 1] !== n) window.__places.push(n);
    };
    new MutationObserver(seen).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Endpoint]:
    with scripted_endpoint(word_delay=0.05) as served:
        yield served


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, endpoint: Endpoint) -> Iterator[AppProcess]:
    process = AppProcess(tmp_path_factory.mktemp("team"), {"RAG_BASE_URL": endpoint.url, "RAG_MODEL": MODEL})
    process.start(START_TIMEOUT)
    try:
        yield process
    finally:
        process.stop()
    assert not unexpected_tracebacks(process.output()), process.output()


def wait_until(condition: Any, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.05)


def stored_answers(database: Path) -> dict[str, list[dict[str, Any]]]:
    """Each chat's stored answers by the chat's name (its first question), read from the file."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        rows = db.execute(
            'SELECT t."name", s."output", s."metadata", t."userIdentifier" FROM steps s JOIN threads t '
            'ON s."threadId" = t."id" WHERE s."type" = \'assistant_message\' ORDER BY s."createdAt"'
        ).fetchall()
    chats: dict[str, list[dict[str, Any]]] = {}
    for name, output, metadata, user in rows:
        chats.setdefault(name, []).append({"output": output, "rag": json.loads(metadata or "{}").get("rag"),
                                           "user": user})  # fmt: skip
    return chats


def test_four_chats_at_once_wait_their_turn_and_each_answer_lands_in_its_own_chat(
    browser: Any, app: AppProcess, endpoint: Endpoint
) -> None:
    runtime = endpoint.runtime
    before = len(runtime.started)
    # The model keeps the first question until the three others wait behind it: each of them
    # then shows its place, deterministically 3, 2 and 1 in some order.
    runtime.hold = lambda question: wait_until(lambda: endpoint.waiting == 3 or len(runtime.started) > before + 1,
                                               what="the three other questions to wait")  # fmt: skip
    tabs = [Chat(browser, app, f"team-{i}") for i in range(len(QUESTIONS))]
    try:
        for tab in tabs:
            tab.wait_text("Ask about your documents")
            tab.page.evaluate(WATCH_QUEUE)
        for tab, question in zip(tabs, QUESTIONS, strict=True):
            tab.ask(question, wait=False)
        replies = [tab.last_reply(after=0).inner_text() for tab in tabs]
        for tab in tabs:
            tab.shot("answered")
        places = [tab.page.evaluate("window.__places") for tab in tabs]
    finally:
        runtime.hold = lambda question: None
        for tab in tabs:
            tab.close()
    for reply, source in zip(replies, QUESTIONS.values(), strict=True):
        assert f"From {source}: " in reply and f"Answered by {MODEL}" in reply, reply
        assert "ahead of yours" not in reply and "Reading the passages" not in reply
    # Three waited; each saw its place go down to 1 (then the model read its passages).
    waited = sorted(p for p in places if p)
    assert waited == [[1], [2, 1], [3, 2, 1]], places
    assert places.count([]) == 1
    # Every answer is stored whole, in its own chat, with the question it answers.
    database = app.data / "history.sqlite3"
    wait_until(lambda: all(any(f"From {QUESTIONS[q]}" in a["output"] for a in stored_answers(database).get(q, []))
                           for q in QUESTIONS), timeout=30, what="the answers in the history")  # fmt: skip
    chats = stored_answers(database)
    for question, source in QUESTIONS.items():
        [answer] = chats[question]
        assert answer["output"].startswith(f"From {source}: ") and f"Answered by {MODEL}" in answer["output"]
        assert answer["rag"]["question"] == question and answer["rag"]["model"] == MODEL
        assert answer["rag"]["reply"].startswith(f"From {source}: ") and answer["user"] == "local"
        assert [c["source"] for c in answer["rag"]["citations"]] == [source]
    assert sorted(runtime.started[before:]) == sorted(QUESTIONS)


@pytest.mark.parametrize("how", ["stops", "leaves"])
def test_a_waiting_chat_that_stops_or_leaves_gives_its_place_up(
    browser: Any, app: AppProcess, endpoint: Endpoint, how: str
) -> None:
    runtime = endpoint.runtime
    busy, waiting = Chat(browser, app, f"busy-{how}"), Chat(browser, app, f"waiting-{how}")
    try:
        for tab in (busy, waiting):
            tab.wait_text("Ask about your documents")
        busy.ask("Explain slowly how long light from the Sun takes to reach Earth", wait=False)
        wait_until(lambda: runtime.started and "slowly" in runtime.started[-1], what="the slow answer")
        question = "What does the First Amendment protect?"
        waiting.ask(question, wait=False)
        waiting.wait_text("1 question ahead of yours")
        waiting.shot("waiting")
        assert endpoint.waiting == 1
        if how == "stops":
            waiting.page.click("#stop-button")
            waiting.wait_text("Stopped")
        else:
            waiting.close()
        wait_until(lambda: endpoint.waiting == 0, timeout=15, what="the place to be given up")
        assert "slowly" in runtime.started[-1]  # the slow answer still runs: nobody else was served
        busy.page.click("#stop-button")
        busy.wait_text("Stopped")
        wait_until(lambda: endpoint.server.generation_lock.queued == 0, timeout=15, what="the model to be free")
        assert runtime.started[-1] != question
    finally:
        busy.close()
        if how == "stops":
            waiting.close()
