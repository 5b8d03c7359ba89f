"""The official ``openai`` Python SDK against ``python -m rag serve`` with a real built model.

Each ``Case`` names a served model, a question and what the answer must hold; the tests run for
every case, streamed and not: the bare model, and ``rag:<model>`` answering from ``docs_corpus/``
(which ``rag serve`` indexes as it starts). ``rag serve`` runs in a subprocess
(``tests.servehost``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.servehost import ServeProcess, built_chat_model

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "openai-sdk"
MODEL_DIR = built_chat_model()
LIGHT_QUESTION = "How long does light from the Sun take to reach Earth?"
SOLAR_FILE = "solar-system-fact-sheet.md"

pytestmark = [pytest.mark.slow]


@dataclass(frozen=True)
class Case:
    """A question for one served model and what its answer must contain (case-insensitive)."""

    model: str
    question: str
    must_contain: tuple[str, ...]
    max_tokens: int = 48


def cases() -> list[Case]:
    if MODEL_DIR is None:
        return []
    return [
        # The bare model, greedy: the small models repeat the word from the prompt.
        Case(
            model=f"{MODEL_DIR.name}:1",
            question="Context: The secret code word is PELICAN. Question: What is the secret code word?",
            must_contain=("pelican",),
        ),
        # The same model answering from the documents: the reply's Sources (or Passages used) list
        # names the file. The small model is not asked for the fact itself: tests/test_openwebui.py
        # asks the default model for it.
        Case(model=f"rag:{MODEL_DIR.name}", question=LIGHT_QUESTION, must_contain=(SOLAR_FILE,)),
    ]


CASES = cases()


def _case_id(case: Case) -> str:
    return case.model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    if MODEL_DIR is None:
        pytest.fail("no chat model is built in .rag/models: run `make model`")
    process = ServeProcess(tmp_path_factory.mktemp("serve"), [MODEL_DIR])
    try:
        process.start()
        yield process
    finally:
        process.stop()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(process.log_path, ARTIFACTS / "serve.log")


@pytest.fixture(scope="module")
def client(server: ServeProcess) -> Iterator[openai.OpenAI]:
    # trust_env=False: loopback never goes through a proxy set in the environment.
    with httpx.Client(trust_env=False, timeout=300) as http_client:
        yield openai.OpenAI(base_url=server.url, api_key="not-needed", max_retries=0, http_client=http_client)


def test_cases_exist() -> None:
    assert CASES, "no chat model is built in .rag/models: run `make model`"


def test_models_list_every_case_model(client: openai.OpenAI) -> None:
    listed = [m.id for m in client.models.list()]
    assert {case.model for case in CASES} <= set(listed), listed


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_answer_with_usage(client: openai.OpenAI, case: Case) -> None:
    completion = client.chat.completions.create(
        model=case.model,
        messages=[{"role": "user", "content": case.question}],
        max_tokens=case.max_tokens,
        temperature=0,
    )
    assert completion.model == case.model
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.role == "assistant"
    text = choice.message.content or ""
    assert [w for w in case.must_contain if w.lower() not in text.lower()] == [], text
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= case.max_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_stream_with_usage(client: openai.OpenAI, case: Case) -> None:
    stream = client.chat.completions.create(
        model=case.model,
        messages=[{"role": "user", "content": case.question}],
        max_tokens=case.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finish_reasons: list[str] = []
    usages = []
    for chunk in stream:
        assert chunk.model == case.model
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    text = "".join(pieces)
    assert len([p for p in pieces if p]) > 1, pieces  # streamed, not one block
    assert [w for w in case.must_contain if w.lower() not in text.lower()] == [], text
    assert len(finish_reasons) == 1 and finish_reasons[0] in ("stop", "length"), finish_reasons
    assert len(usages) == 1, usages
    assert usages[0].prompt_tokens > 0 and 0 < usages[0].completion_tokens <= case.max_tokens
    assert usages[0].total_tokens == usages[0].prompt_tokens + usages[0].completion_tokens


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_stream_and_answer_agree_at_temperature_zero(client: openai.OpenAI, case: Case) -> None:
    request = {"model": case.model, "messages": [{"role": "user", "content": case.question}],
               "max_tokens": case.max_tokens, "temperature": 0}  # fmt: skip
    answer = client.chat.completions.create(**request).choices[0].message.content
    streamed = "".join(
        choice.delta.content or ""
        for chunk in client.chat.completions.create(**request, stream=True)
        for choice in chunk.choices
    )
    assert streamed == answer


def test_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model:1", messages=[{"role": "user", "content": "hi"}])
    assert "no-such-model:1" in str(caught.value)


def where(passage: dict[str, Any]) -> str:
    """How the Sources list names a passage: file, page, heading path."""
    parts = [passage["source"], *([f"page {passage['page']}"] if passage["page"] else [])]
    return ", ".join(parts + ([" › ".join(passage["headings"])] if passage["headings"] else []))


def rag_model() -> str:
    assert MODEL_DIR is not None
    return f"rag:{MODEL_DIR.name}"


def test_a_retrieval_answer_carries_its_passages_whole_and_on_the_streams_last_chunk(
    client: openai.OpenAI, server: ServeProcess
) -> None:
    # Open WebUI sends tools with every request: ignored, never answered with a tool call.
    tools = [{"type": "function", "function": {"name": "search_web", "parameters": {"type": "object"}}}]
    request = {"model": rag_model(), "max_tokens": 48, "temperature": 0, "tools": tools,
               "messages": [{"role": "system", "content": "Answer in French."},
                            {"role": "user", "content": LIGHT_QUESTION}]}  # fmt: skip
    before = len(server.generations())
    completion = client.chat.completions.create(**request)  # type: ignore[call-overload]
    assert len(server.generations()) == before + 1  # one answer from the bare model, no rewrite
    message = completion.choices[0].message
    assert message.tool_calls is None and message.content
    extra = (completion.model_extra or {})["rag"]
    assert extra["relevant"] is True and extra["model"] == f"{MODEL_DIR.name}:1"  # type: ignore[union-attr]
    passages = extra["passages"]
    assert passages[0]["source"] == SOLAR_FILE and any("8 minutes" in p["text"] for p in passages)
    assert [p["n"] for p in passages] == list(range(1, len(passages) + 1))
    assert all(p["score"] >= extra["min_relevance"] for p in passages)
    listed = "**Sources**" if extra["cited"] else "**Passages used**"
    shown = [p for p in passages if p["cited"] or not extra["cited"]]
    assert message.content.endswith(listed + "\n" + "\n".join(f"- [{p['n']}] {where(p)}" for p in shown))

    chunks = list(client.chat.completions.create(**request, stream=True))  # type: ignore[call-overload]
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and (finals[0].model_extra or {})["rag"] == extra
    assert all("rag" not in (c.model_extra or {}) for c in chunks if c is not finals[0])
    streamed = "".join(choice.delta.content or "" for c in chunks for choice in c.choices)
    assert streamed == message.content


def test_a_question_the_documents_cannot_answer_gets_a_plain_reply_saying_so(
    client: openai.OpenAI, server: ServeProcess
) -> None:
    before = len(server.generations())
    completion = client.chat.completions.create(
        model=rag_model(), messages=[{"role": "user", "content": "What is a good recipe for chocolate chip cookies?"}]
    )
    assert len(server.generations()) == before  # the model was not asked
    text = completion.choices[0].message.content or ""
    assert text.startswith("Your documents don't seem to contain the answer"), text
    extra = (completion.model_extra or {})["rag"]
    assert extra["relevant"] is False and extra["model"] is None and extra["passages"]
    assert completion.choices[0].finish_reason == "stop"
