"""Retrieval evaluation on a BEIR-format dataset, through the same pipeline as the app.

Each corpus entry becomes one ``Document`` (title + text), is chunked and embedded exactly as a
file from ``docs_corpus/`` would be, and a query's document ranking is its chunk ranking with
each document kept at its best chunk. The built index is cached in the data directory (keyed
by the dataset's content and the index parameters), so a second run only searches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from rag.chunking import embedding_text
from rag.config import RETRIEVAL_MODES, Settings
from rag.embedding import Embedder
from rag.errors import IndexMismatchError, IndexMissingError
from rag.index import FileRecord, IndexStore, Snapshot
from rag.indexing import chunk_documents, index_params
from rag.metrics import evaluate_run, load_beir
from rag.retrieval import Retriever
from rag.types import Document

RUN_DEPTH = 100


@dataclass(frozen=True)
class EvalResult:
    dataset: str
    documents: int
    queries: int
    chunks: int
    metrics: dict[str, dict[str, float]]  # mode -> metric -> value


def _dataset_key(dataset_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        h.update((dataset_dir / name).read_bytes())
    return h.hexdigest()[:16]


def build_eval_index(
    corpus: dict[str, tuple[str, str]], settings: Settings, embedder: Embedder, store: IndexStore
) -> Snapshot:
    """Index every corpus entry as one document (cached in ``store``)."""
    params = index_params(settings, embedder)
    try:
        return store.load(expected=params)
    except (IndexMissingError, IndexMismatchError):
        pass
    snapshot = Snapshot(params=params)
    documents = [Document(source=doc_id, text=text, title=title) for doc_id, (title, text) in corpus.items()]
    chunks = chunk_documents([d for d in documents if d.text.strip()], settings, embedder)
    texts = [embedding_text(c) for c in chunks]
    vectors = embedder.embed(texts)
    by_source: dict[str, list[int]] = {}
    for row, chunk in enumerate(chunks):
        by_source.setdefault(chunk.source, []).append(row)
    for source, rows in by_source.items():
        record = FileRecord(source, "", 0, 0, tuple(chunks[r].id for r in rows))
        snapshot.put_file(record, [chunks[r] for r in rows], vectors[rows], [texts[r] for r in rows])
    with store.lock():
        store.commit(snapshot)
    return snapshot


def rank_documents(retriever: Retriever, query: str, mode: str, depth: int = RUN_DEPTH) -> list[str]:
    """Document ids best first, each document at its best chunk's rank."""
    # Several chunks can belong to one document: ask for more chunks than documents needed.
    hits = retriever.search(query, k=depth * 3, mode=mode, candidates=depth * 3)
    ranked: list[str] = []
    seen: set[str] = set()
    for hit in hits:
        if hit.chunk.source not in seen:
            seen.add(hit.chunk.source)
            ranked.append(hit.chunk.source)
    return ranked[:depth]


def evaluate_dataset(
    dataset_dir: Path,
    settings: Settings,
    embedder: Embedder,
    *,
    modes: tuple[str, ...] = RETRIEVAL_MODES,
) -> EvalResult:
    corpus, queries, qrels = load_beir(dataset_dir)
    store = IndexStore(settings.data_dir / "eval" / f"{dataset_dir.name}-{_dataset_key(dataset_dir)}")
    snapshot = build_eval_index(corpus, settings, embedder, store)
    retriever = Retriever(snapshot, embedder)
    judged = {qid: text for qid, text in queries.items() if qrels.get(qid)}
    metrics: dict[str, dict[str, float]] = {}
    for mode in modes:
        run = {qid: rank_documents(retriever, text, mode) for qid, text in judged.items()}
        metrics[mode] = evaluate_run(run, qrels)
    return EvalResult(
        dataset=dataset_dir.name,
        documents=len(corpus),
        queries=len(judged),
        chunks=len(snapshot),
        metrics=metrics,
    )


def format_table(result: EvalResult) -> str:
    """A Markdown table of the metrics, one row per mode."""
    names = list(next(iter(result.metrics.values())).keys()) if result.metrics else []
    lines = ["| mode | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for mode, values in result.metrics.items():
        lines.append(f"| {mode} | " + " | ".join(f"{values[n]:.4f}" for n in names) + " |")
    return "\n".join(lines)
