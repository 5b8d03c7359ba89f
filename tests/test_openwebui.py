"""End to end with a client we did not write: Open WebUI, offline, against ``python -m rag serve``,
driven in Debian's Chromium as a person would use it: the bare model, and ``rag:<model>``
answering a question about the shipped ``docs_corpus/`` (indexed by ``rag serve`` as it starts)
with the fact and its source file.

Open WebUI comes from ``make openwebui`` (its own venv, ``.venv-openwebui``); when it is missing or
does not start, these tests fail and say why — they are never skipped. Screenshots and both
servers' logs go to ``test-artifacts/openwebui/``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rag.config import Settings
from tests.openwebui import (
    CHROMIUM,
    CHROMIUM_ARGS,
    OpenWebUI,
    OpenWebUIError,
    ask_in_browser,
)
from tests.servehost import ServeProcess, built_answering_model

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "openwebui"

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# Open WebUI sends neither temperature nor max_tokens by default: `rag serve` applies
# RAG_TEMPERATURE and RAG_MAX_ANSWER_TOKENS then (the runtime's own defaults sampled up to the
# whole window: SmolLM2 rambled for 2,048 tokens, 168 s), so no DEFAULT_MODEL_PARAMS are set.
MAX_ANSWER_TOKENS = Settings().max_answer_tokens


@dataclass(frozen=True)
class Case:
    """A question for one served model and what its reply must contain (case-insensitive)."""

    name: str
    model: str
    question: str
    must_contain: tuple[str, ...]
    generates: str = ""  # the bare model rag serve's log names for the answer ('' : ``model``)


def plain_model_case(model_id: str) -> Case:
    # At RAG_TEMPERATURE (0, greedy) the small models repeat the word from the prompt.
    return Case(
        name="plain-model",
        model=model_id,
        question="Context: The secret code word is PELICAN. Question: What is the secret code word?",
        must_contain=("pelican",),
    )


def documents_case(model_id: str) -> Case:
    # docs_corpus/solar-system-fact-sheet.md: "Its light takes about 8 minutes and 20 seconds to
    # reach Earth". The file's name comes in the reply's Sources (or Passages used) list.
    return Case(
        name="rag-model",
        model="rag:" + model_id.rpartition(":")[0],
        question="How long does light from the Sun take to reach Earth?",
        must_contain=("8 minutes", "solar-system-fact-sheet.md"),
        generates=model_id,
    )


@pytest.fixture(scope="module", autouse=True)
def _fresh_artifacts() -> None:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    model_dir = built_answering_model()
    if model_dir is None:
        pytest.fail("no chat model is built in .rag/models: run `make model`")
    server = ServeProcess(tmp_path_factory.mktemp("serve"), [model_dir])
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.copy(server.log_path, ARTIFACTS / "serve.log")


@pytest.fixture(scope="module")
def webui(model_server: ServeProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenWebUI]:
    webui = OpenWebUI(tmp_path_factory.mktemp("openwebui"), model_server.url)
    try:
        try:
            webui.start()
        except OpenWebUIError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield webui
        measured = {"start_seconds": round(webui.start_seconds, 1), "rss_mib": round(webui.rss_mib())}
        (ARTIFACTS / "openwebui.json").write_text(json.dumps(measured) + "\n", encoding="utf-8")
    finally:
        webui.stop()
        if webui.log_path.exists():
            shutil.copy(webui.log_path, ARTIFACTS / "openwebui.log")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def served_model_id(server: ServeProcess) -> str:
    """The id ``rag serve`` gives the one model it was started with (``<name>:1``)."""
    return f"{server.model_dirs[0].name}:1"


def check_reply_in_browser(browser: Any, webui: OpenWebUI, server: ServeProcess, case: Case) -> str:
    """Ask ``case.question`` of ``case.model`` in Open WebUI; check that Open WebUI lists the model,
    that ``rag serve`` generated exactly one answer for it (``case.generates``, the bare model
    behind a ``rag:`` one) with at least one token and at most RAG_MAX_ANSWER_TOKENS (so the reply
    cannot come from anywhere else, nor from extra title or tag requests, and the server's
    defaults applied) and that the reply shown holds every ``case.must_contain``. Returns the reply."""
    offered = webui.model_ids()
    assert case.model in offered, f"Open WebUI does not offer {case.model}; it offers {offered}"
    before = len(server.generations())
    try:
        reply = ask_in_browser(browser, webui, case.model, case.question, screenshot=ARTIFACTS / f"{case.name}.png")
    except Exception as exc:  # Playwright's errors say what was awaited, not what the servers said
        raise AssertionError(f"{exc}\n{webui.tail()}\n--- rag serve ---\n{server.tail()}") from exc
    generated = server.generations()[before:]
    assert [g.model for g in generated] == [case.generates or case.model], (generated, server.tail())
    assert 0 < generated[0].completion_tokens <= MAX_ANSWER_TOKENS, generated
    assert reply.strip(), "Open WebUI showed an empty reply"
    missing = [word for word in case.must_contain if word.lower() not in reply.lower()]
    assert not missing, f"the reply lacks {missing}: {reply!r}"
    return reply


def test_open_webui_answers_with_the_served_model(browser: Any, webui: OpenWebUI, model_server: ServeProcess) -> None:
    check_reply_in_browser(browser, webui, model_server, plain_model_case(served_model_id(model_server)))


def test_open_webui_answers_from_the_documents_with_the_retrieval_model(
    browser: Any, webui: OpenWebUI, model_server: ServeProcess
) -> None:
    reply = check_reply_in_browser(browser, webui, model_server, documents_case(served_model_id(model_server)))
    assert "Sources" in reply or "Passages used" in reply, reply
