"""End to end with a client we did not write: Open WebUI, offline, against ``python -m rag serve``,
driven in Debian's Chromium as a person would use it.

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

from tests.openwebui import CHROMIUM, CHROMIUM_ARGS, OpenWebUI, OpenWebUIError, ask_in_browser
from tests.servehost import ServeProcess, built_chat_model

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "openwebui"

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# Open WebUI sends neither temperature nor max_tokens by default, and `rag serve` then samples
# (at the runtime's temperature 1.0) up to the context window: SmolLM2 rambled for 2,048 tokens
# (168 s). Greedy and short, like a user would set them in Admin Settings → Models.
WEBUI_PARAMS = {"temperature": 0, "max_tokens": 64}


@dataclass(frozen=True)
class Case:
    """A question for one served model and what its reply must contain (case-insensitive)."""

    name: str
    model: str
    question: str
    must_contain: tuple[str, ...]


def plain_model_case(model_id: str) -> Case:
    # Greedy (WEBUI_PARAMS), the small models repeat the word from the prompt.
    return Case(
        name="plain-model",
        model=model_id,
        question="Context: The secret code word is PELICAN. Question: What is the secret code word?",
        must_contain=("pelican",),
    )


@pytest.fixture(scope="module", autouse=True)
def _fresh_artifacts() -> None:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    model_dir = built_chat_model()
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
    webui = OpenWebUI(tmp_path_factory.mktemp("openwebui"), model_server.url, default_params=WEBUI_PARAMS)
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
    that ``rag serve`` generated exactly one answer for it with at least one token (so the reply
    cannot come from anywhere else, nor from extra title or tag requests) and that the reply shown
    holds every ``case.must_contain``. Returns the reply."""
    offered = webui.model_ids()
    assert case.model in offered, f"Open WebUI does not offer {case.model}; it offers {offered}"
    before = len(server.generations())
    try:
        reply = ask_in_browser(browser, webui, case.model, case.question, screenshot=ARTIFACTS / f"{case.name}.png")
    except Exception as exc:  # Playwright's errors say what was awaited, not what the servers said
        raise AssertionError(f"{exc}\n{webui.tail()}\n--- rag serve ---\n{server.tail()}") from exc
    generated = server.generations()[before:]
    assert [g.model for g in generated] == [case.model], (generated, server.tail())
    assert 0 < generated[0].completion_tokens <= WEBUI_PARAMS["max_tokens"], generated
    assert reply.strip(), "Open WebUI showed an empty reply"
    missing = [word for word in case.must_contain if word.lower() not in reply.lower()]
    assert not missing, f"the reply lacks {missing}: {reply!r}"
    return reply


def test_open_webui_answers_with_the_served_model(browser: Any, webui: OpenWebUI, model_server: ServeProcess) -> None:
    check_reply_in_browser(browser, webui, model_server, plain_model_case(served_model_id(model_server)))
