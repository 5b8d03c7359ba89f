"""The real model, real FAISS, real PDF: the right passage ranks first (the fake's counterpart)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rag.config import Settings
from rag.embedding import SentenceTransformerEmbedder
from rag.index import IndexStore
from rag.indexing import sync_index
from rag.retrieval import Retriever

ROOT = Path(__file__).resolve().parents[1]

# (question, source, page or heading expected on the first hit) — see docs/sample-corpus.md.
QUESTIONS = [
    ("What is the ratio of browns to greens in a compost pile?", "home-composting-field-guide.pdf", 1),
    ("How often should a compost pile be turned?", "home-composting-field-guide.pdf", 2),
    ("Why does my compost smell of ammonia?", "home-composting-field-guide.pdf", 3),
    ("How long until compost is finished?", "home-composting-field-guide.pdf", 4),
    ("What does the Fourth Amendment protect against?", "us-constitution-preamble-and-bill-of-rights.txt", None),
    ("What does four score and seven years mean?", "gettysburg-address.html", None),
    ("Which planet is the hottest?", "solar-system-fact-sheet.md", None),
]


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    root = tmp_path_factory.mktemp("real")
    shutil.copytree(ROOT / "docs_corpus", root / "corpus")
    settings = Settings(corpus_dir=root / "corpus", data_dir=root / "data")
    embedder = SentenceTransformerEmbedder()
    report = sync_index(settings, embedder)
    assert report.skipped == () and len(report.added) == 5
    return Retriever(IndexStore(settings.index_dir).load(), embedder)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hybrid", "dense"])
@pytest.mark.parametrize(("question", "source", "page"), QUESTIONS)
def test_the_right_passage_ranks_first(
    retriever: Retriever, question: str, source: str, page: int | None, mode: str
) -> None:
    top = retriever.search(question, k=3, mode=mode)[0]
    assert (top.chunk.source, top.chunk.page) == (source, page)


@pytest.mark.slow
def test_off_topic_questions_stay_below_the_default_threshold(retriever: Retriever) -> None:
    threshold = Settings().min_relevance
    for question in ("What is the capital of Mongolia?", "Who won the 2018 football world cup?"):
        assert retriever.search(question, k=5, min_similarity=threshold) == []
    assert retriever.search("How often should a compost pile be turned?", k=5, min_similarity=threshold)
