"""``python -m rag eval-answers``: a small question set, the fake embedder, a scripted endpoint
at the router's transport; the numbers it prints and the records it writes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

import rag.cli as cli
from rag.answer_eval import Record, declines, load_questions, summarise
from rag.errors import ConfigError
from tests.fakes import FakeEmbedder
from tests.sse import sse, sse_response

REPLIES = {  # by a word of the question: what the scripted model answers
    "ingredient": "The secret ingredient is smoked quince paste [1].",
    "bell": "The passages do not mention when the bell rings.",
    "keeper": "[1] [2]",  # markers only
    "government": "It is Paris.",  # gated out: never asked
}


@pytest.fixture
def question_set(tmp_path: Path) -> Path:
    docs = tmp_path / "set" / "docs"
    docs.mkdir(parents=True)
    (docs / "stew.txt").write_text("Zorblax stew\n\nThe secret ingredient of zorblax stew is smoked quince paste.\n")
    (docs / "lighthouse.txt").write_text("Brightwater lighthouse\n\nThe keeper of the Brightwater lighthouse is "
                                         "Odalys Fenwick. She rings the fog bell at dawn.\n")  # fmt: skip
    questions = [
        {"id": "q1", "question": "What is the secret ingredient of zorblax stew?", "answers": ["smoked quince paste"],
         "source": "stew.txt"},
        {"id": "q2", "question": "Who is the keeper of the Brightwater lighthouse?", "answers": ["Odalys Fenwick"],
         "source": "lighthouse.txt"},
        {"id": "q3", "question": "When does the keeper ring the fog bell?", "answers": ["at dawn"],
         "source": "lighthouse.txt"},
        {"id": "q4", "question": "Which city hosts France's government?", "answers": ["Paris"], "source": "france.txt"},
    ]  # fmt: skip
    (tmp_path / "set" / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return tmp_path / "set"


def test_eval_answers_scores_what_a_user_is_shown(
    question_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "fake-model", "context_length": 4096}]})
        question = json.loads(request.content)["messages"][-1]["content"].rsplit("Question:", 1)[-1]
        asked.append(question)
        reply = next(text for word, text in REPLIES.items() if word in question)
        return sse_response(sse(reply, usage={"prompt_tokens": 120, "completion_tokens": 9, "total_tokens": 129}))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAG_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("RAG_MIN_RELEVANCE", "0.3")
    monkeypatch.setattr(cli, "make_embedder", lambda settings: FakeEmbedder())
    monkeypatch.setattr(httpx, "AsyncHTTPTransport", lambda *a, **k: httpx.MockTransport(handler))
    out_file = tmp_path / "records.jsonl"
    assert cli.main(["eval-answers", str(question_set), "--json", str(out_file), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert len(asked) == 3  # the out-of-set question closed the gate: the model was not asked
    assert re.search(r"accuracy \(a gold answer in the reply\)\s+1/4 \(25.0 %\)", out), out
    assert re.search(r"marker-only replies\s+1/4", out) and re.search(r"abstentions\s+2/4", out), out
    assert re.search(r"source retrieved\s+3/4", out) and "prompt tokens (median, the server's count): 120" in out
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["id"] for r in records] == ["q1", "q2", "q3", "q4"]
    first = records[0]
    assert {"id", "question", "answer", "cited_sources", "retrieved_sources", "ttft_s", "total_s"} <= set(first)
    assert first["correct"] and first["cited_sources"] == ["stew.txt"] and first["ceiling"]
    assert first["ttft_s"] is not None and first["total_s"] >= first["ttft_s"]
    assert records[1]["marker_only"] and not records[1]["correct"]
    assert records[2]["abstained"] and records[3]["abstained"] and records[3]["answer"] == ""
    # A second run reuses the set's cached index (no document embedded again).
    embedded: list[str] = []

    class Counting(FakeEmbedder):
        def embed_batch(self, texts: Any) -> Any:
            embedded.extend(texts)
            return super().embed_batch(texts)

    monkeypatch.setattr(cli, "make_embedder", lambda settings: Counting())
    assert cli.main(["eval-answers", str(question_set), "--limit", "1", "--quiet"]) == 0
    assert embedded == ["What is the secret ingredient of zorblax stew?"]  # the question alone


def test_a_question_set_must_have_its_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="questions.jsonl"):
        load_questions(tmp_path)
    (tmp_path / "questions.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(ConfigError, match=r"questions.jsonl:1"):
        load_questions(tmp_path)


def test_declining_and_the_summary() -> None:
    assert declines("I don't know.") and declines("The documents do not contain his birth date.")
    assert not declines("He was born in 1809 [1].")
    summary = summarise([Record("1", "q", correct=True, cites_source=True, ttft_s=1.0, total_s=2.0),
                         Record("2", "q", ttft_s=3.0, total_s=5.0), Record("3", "q", error="down")])  # fmt: skip
    assert (summary.correct, summary.correct_citing_source, summary.errors) == (1, 1, 1)
    assert (summary.ttft_median, summary.total_p90) == (2.0, 5.0)
