"""`python -m rag compare`: fake endpoints at the transport, the fake embedder, a real index."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

import rag.cli as cli
from rag.compare import CompareResult, Question, Run, contains_expected, load_questions, summarise
from rag.report import bar_chart_svg, render_markdown
from tests.fakes import FakeEmbedder
from tests.sse import sse as sse_body

ANSWERS = {
    "good-model": "Turn the pile every 2 to 3 weeks [1].",
    "terse-model": "Weekly, I think.",
}


def sse(text: str, model: str) -> bytes:
    """``text`` streamed word by word, with usage."""
    words = [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))]
    return sse_body(*words, model=model, usage={"prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59})


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    corpus = tmp_path / "docs_corpus"
    corpus.mkdir()
    (corpus / "compost.md").write_text("# Compost\n\nTurn the compost pile every 2 to 3 weeks.\n", encoding="utf-8")
    (corpus / "planets.md").write_text("# Planets\n\nVenus is the hottest planet.\n", encoding="utf-8")
    (tmp_path / "endpoints.toml").write_text(
        '[[endpoint]]\nname = "a"\nbase_url = "http://127.0.0.1:5301/v1"\nmodel = "good-model"\ncontext_window = 4096\n\n'
        '[[endpoint]]\nname = "b"\nbase_url = "http://127.0.0.1:5302/v1"\nmodel = "terse-model"\ncontext_window = 4096\n\n'
        '[[endpoint]]\nname = "cloud"\nbase_url = "https://api.example.com/v1"\nmodel = "big"\ncontext_window = 9000\n'
    )
    (tmp_path / "questions.jsonl").write_text(
        '{"question": "How often should the compost pile be turned?", "expected": "2 to 3 weeks", "relevant": ["compost.md"]}\n'
        '{"question": "Which planet is the hottest?", "expected": ["Venus"], "relevant": ["planets.md"]}\n'
        "How often should I turn my compost pile?\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAG_MIN_RELEVANCE", "0.05")
    monkeypatch.setattr(cli, "make_embedder", lambda settings: FakeEmbedder())
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(str(request.url))
        model = json.loads(request.content)["model"]
        return httpx.Response(200, content=sse(ANSWERS[model], model), headers={"content-type": "text/event-stream"})

    # The router builds its transports from httpx.AsyncHTTPTransport: answer from the fakes instead.
    monkeypatch.setattr(httpx, "AsyncHTTPTransport", lambda *a, **k: httpx.MockTransport(handler))
    assert cli.main(["index"]) == 0
    return sent


def test_compare_end_to_end_on_three_questions(project: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["compare", "--questions", "questions.jsonl", "--endpoints", "a,b", "--out", "out"])
    assert code == 0, capsys.readouterr().err
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert len(project) == 6  # 3 questions x 2 models, nothing else
    rows = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| a:") or line.startswith("| b:")}
    # good-model states the compost fact (not Venus) and always cites [1], the best passage.
    assert "| 3/3 |" in rows["| a:good-model"] and "| 1/2 | 2/2 |" in rows["| a:good-model"]  # its [1] is the planets passage there
    # terse-model writes no marker; as in the chat, its "Weekly" is traced to the compost passage.
    assert "| 0/2 | 1/2 |" in rows["| b:terse-model"]
    assert "Weekly, I think. [1]" in md
    assert "[1] compost.md" in md and "Weekly, I think." in md
    assert page.count("<svg") == 4 and "Time to first token" in page and "Turn the pile every 2 to 3 weeks [1]." in page


def test_compare_under_local_only_refuses_the_cloud_endpoint(project: list[str], tmp_path: Path) -> None:
    assert cli.main(["compare", "--questions", "questions.jsonl", "--endpoints", "a,cloud", "--out", "out", "--limit", "1"]) == 0
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "refused to send a request to https://api.example.com" in md
    assert all("api.example.com" not in url for url in project)


def test_load_questions_formats(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('# comment\n{"question": "Q1", "expected": "x", "relevant": ["a.pdf#2"]}\nQ2\n')
    assert load_questions(path) == [Question("Q1", ("x",), ("a.pdf#2",), "2"), Question("Q2", id="3")]
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "t"}\n')
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "what?"}\n{"_id": "q2", "text": "unjudged"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    assert load_questions(beir) == [Question("what?", relevant=("d1",), id="q1")]


@pytest.mark.parametrize(
    ("answer", "expected", "result"),
    [("Every 2–3 weeks.", ["2 3 weeks"], True), ("It is 23 weeks", ["2 to 3 weeks"], False),
     ("Venus [1]", ["venus", "Mercury"], True), ("x", [], None), ("", ["a"], False)],
)  # fmt: skip
def test_contains_expected(answer: str, expected: list[str], result: bool | None) -> None:
    assert contains_expected(answer, expected) is result


def test_bar_chart_scales_to_the_largest_and_marks_missing_values() -> None:
    svg = bar_chart_svg("t", ["fast", "slow", "failed"], [1.0, 4.0, None], unit="s")
    assert svg.count("<rect") == 2 and "–" in svg and "4.00 s" in svg


def test_summary_and_markdown_count_failures_and_estimated_tokens() -> None:
    q = Question("q?", expected=("x",))
    runs = [Run(q, "m1", text="x [1]", ttft=0.5, total=1.5, tokens=11, tokens_estimated=True, contains_expected=True),
            Run(q, "m2", error="nothing answers")]  # fmt: skip
    result = CompareResult(["m1", "m2"], runs, [q])
    s1, s2 = summarise(result)
    assert (s1.answered, s1.ttft, s1.tokens_per_second, s1.expected_hits) == (1, 0.5, 10.0, (1, 1))
    assert (s2.answered, s2.failed, s2.ttft) == (0, 1, None)
    md = render_markdown(result)
    assert "| m1 | 1/1 | 0.50 | 1.50 | 10.0 ≈ |" in md and "**error:** nothing answers" in md
