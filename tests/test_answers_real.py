"""The built default model answers questions about the shipped ``docs_corpus/`` correctly and
cites the right file: the whole answer path (retrieval, gate, excerpts, prompt, the real model in
the Foundry Local runtime, citations), through ``rag serve``'s retrieval model.

Scored as ``rag eval-answers`` scores (``rag.scoring``): a gold answer in the reply, as whole
SQuAD-normalised tokens, markers stripped; and a cited passage from the expected file.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rag.modelbuild import DEFAULT_MODEL
from rag.scoring import is_correct
from tests.servehost import MODELS_DIR, ServeProcess

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "answers"

pytestmark = [pytest.mark.slow]

# From docs/sample-corpus.md ("Facts to test citations with"): Markdown prose and a row of its table
# (whose chunk starts below the header row), a PDF page, a text file.
QUESTIONS = [
    ("How long does light from the Sun take to reach Earth?", ["8 minutes and 20 seconds", "8 minutes"],
     "solar-system-fact-sheet.md"),
    ("How long does Jupiter take to orbit the Sun?", ["11.9 years"], "solar-system-fact-sheet.md"),
    ("How often should a compost pile be turned?", ["every 2 to 3 weeks", "2 to 3 weeks"],
     "home-composting-field-guide.pdf"),
    ("What does the Fourth Amendment protect against?", ["unreasonable searches and seizures"],
     "us-constitution-preamble-and-bill-of-rights.txt"),
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    model = MODELS_DIR / DEFAULT_MODEL
    if not (model / "genai_config.json").is_file():
        pytest.fail(f"the default model {DEFAULT_MODEL} is not built in {MODELS_DIR}: run `make model`")
    process = ServeProcess(tmp_path_factory.mktemp("answers"), [model])
    try:
        process.start()
        yield process
    finally:
        process.stop()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(process.log_path, ARTIFACTS / "serve.log")


@pytest.mark.parametrize(("question", "answers", "source"), QUESTIONS, ids=[f"{q[2]}-{i}" for i, q in enumerate(QUESTIONS)])
def test_the_default_model_answers_and_cites_the_right_file(
    server: ServeProcess, question: str, answers: list[str], source: str
) -> None:
    with httpx.Client(trust_env=False, timeout=300) as client:
        reply = client.post(f"{server.url}/chat/completions", json={
            "model": f"rag:{DEFAULT_MODEL}", "messages": [{"role": "user", "content": question}], "temperature": 0,
        }).json()  # fmt: skip
    text = reply["choices"][0]["message"]["content"]
    answer = text.split("\n\n**Sources**", 1)[0]  # the model's answer, without the list of sources
    extra = reply["rag"]
    cited = [p["source"] for p in extra["passages"] if p["cited"]]
    assert is_correct(answer, answers), text
    assert source in cited, (text, cited)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{source}-{QUESTIONS.index((question, answers, source))}.txt").write_text(
        f"Q: {question}\n\n{text}\n", encoding="utf-8"
    )
