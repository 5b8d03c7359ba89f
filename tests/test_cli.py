"""The command line, in process with the fake embedder, and as a real subprocess (slow)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rag.cli as cli
from tests.fakes import FakeEmbedder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    corpus = tmp_path / "docs_corpus"
    corpus.mkdir()
    (corpus / "owls.md").write_text("# Owls\n\nOwls hunt at night and swallow prey whole.\n", encoding="utf-8")
    (corpus / "ferns.md").write_text("# Ferns\n\nFerns reproduce with spores, not seeds.\n", encoding="utf-8")
    (corpus / "empty.txt").write_text("", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "make_embedder", lambda settings: FakeEmbedder())
    return tmp_path


def test_index_search_status(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["index"]) == 0
    out = capsys.readouterr().out
    assert "2 added, 0 updated, 0 removed, 0 unchanged, 1 skipped" in out
    assert "skipped  empty.txt: empty file" in out

    assert cli.main(["search", "how do ferns reproduce", "-k", "1", "--mode", "bm25"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(" 1. [") and "ferns.md > Ferns" in out and "spores" in out

    assert cli.main(["status", "--files"]) == 0
    out = capsys.readouterr().out
    assert "Files indexed:   2" in out and "Embedding model: fake-bow (256 dimensions)" in out
    assert "empty.txt: empty file" in out and "owls.md  (1 chunks)" in out


def test_errors_are_one_line_with_exit_status_1(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["search", "anything"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no index in") and "python -m rag index" in err and "Traceback" not in err


def test_bad_setting_from_environment(project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_TOP_K", "lots")
    assert cli.main(["status"]) == 1
    assert "RAG_TOP_K='lots'" in capsys.readouterr().err


def test_status_before_indexing(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status"]) == 0
    assert "none yet: run `python -m rag index`" in capsys.readouterr().out


@pytest.mark.slow
def test_real_cli_on_the_sample_corpus(tmp_path: Path) -> None:
    """The shipped docs_corpus, the real model, the real CLI in a subprocess."""
    shutil.copytree(ROOT / "docs_corpus", tmp_path / "docs_corpus")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "rag", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = run("index")
    assert "0 skipped" in out and " added" in out
    assert "0 added, 0 updated, 0 removed" in run("index")
    status = run("status")
    assert "Embedding model: all-MiniLM-L6-v2 (384 dimensions)" in status
    hits = run("search", "How often should a compost pile be turned?", "-k", "3")
    assert ".pdf, page" in hits.splitlines()[0]


def fake_endpoint(monkeypatch: pytest.MonkeyPatch, answer_parts: list[str]) -> list[str]:
    """RAG_BASE_URL set, and its HTTP answered by a fake (the router builds its transports from
    httpx.AsyncHTTPTransport); returns the paths requested."""
    import httpx

    from tests.sse import sse, sse_response

    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "fake-model"}]})
        return sse_response(sse(*answer_parts))

    monkeypatch.setenv("RAG_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setattr(httpx, "AsyncHTTPTransport", lambda *a, **k: httpx.MockTransport(handler))
    return asked


def test_ask_streams_a_cited_answer(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["index"]) == 0
    capsys.readouterr()
    fake_endpoint(monkeypatch, ["Owls hunt ", "at night [1]", " [4]."])
    assert cli.main(["ask", "when do owls hunt", "--min-relevance", "0.1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Owls hunt at night [1] [4].\n")
    assert "Sources:\n  [1] owls.md\n" in out and "[4]" not in out.split("Sources:")[1]
    assert "— fake-model (settings, http://127.0.0.1:9/v1)" in out


def test_ask_without_relevant_passages_does_not_call_the_model(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["index"]) == 0
    capsys.readouterr()
    asked = fake_endpoint(monkeypatch, ["never"])
    assert cli.main(["ask", "quantum chromodynamics lattice gauge"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Your documents don't seem to contain the answer")
    assert asked == []  # the model was not asked (nor even listed)
