"""Retrieval metrics for evaluation, as trec_eval (and so BEIR) defines them.

A run ranks document ids per query; qrels grade them (``rel > 0`` is relevant, the grade is the
gain). Pure functions over plain values, plus ``load_beir`` to read a BEIR-layout dataset.

Conventions, chosen to match trec_eval's ``ndcg_cut``, ``recall`` and ``recip_rank``:

- nDCG: gain = rel, discount = 1 / log2(rank + 1), normalised by the ideal ranking of all judged
  documents (cut at k). Grades of 0 or below count as not relevant.
- A document id ranked again is dropped, so the ranks after it move up (a run in trec_eval
  cannot hold one document twice).
- ``evaluate_run`` averages over queries with at least one relevant document (as BEIR does);
  such a query missing from the run scores 0 rather than being left out.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from rag.errors import LoadError


def _top(ranked: Sequence[str], k: int) -> list[str]:
    """The first ``k`` distinct ids: ``["a", "b", "a", "c"], 2 -> ["a", "b"]``."""
    return list(dict.fromkeys(ranked))[:k] if k > 0 else []


def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """Normalised discounted cumulative gain of the top ``k``.

    ``["a", "b"], {"b": 1}, 10 -> (1 / log2(3)) / (1 / log2(2)) = 0.6309…``
    """
    dcg = sum(max(relevant.get(doc, 0), 0) / math.log2(rank + 2) for rank, doc in enumerate(_top(ranked, k)))
    gains = sorted((rel for rel in relevant.values() if rel > 0), reverse=True)[:k]
    ideal = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains))
    return dcg / ideal if ideal > 0 else 0.0


def recall_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """Share of the relevant documents found in the top ``k``: ``["a", "x"], {"a": 1, "b": 2}, 10 -> 0.5``."""
    wanted = {doc for doc, rel in relevant.items() if rel > 0}
    if not wanted:
        return 0.0
    return sum(doc in wanted for doc in _top(ranked, k)) / len(wanted)


def mrr_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """Reciprocal rank of the first relevant document in the top ``k``, else 0.

    ``["x", "a"], {"a": 1}, 10 -> 0.5``
    """
    for rank, doc in enumerate(_top(ranked, k), start=1):
        if relevant.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


_RUN_METRICS = (
    ("ndcg@10", ndcg_at_k, 10),
    ("recall@10", recall_at_k, 10),
    ("recall@100", recall_at_k, 100),
    ("mrr@10", mrr_at_k, 10),
)


def evaluate_run(
    run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]
) -> dict[str, float]:
    """Mean ``ndcg@10``, ``recall@10``, ``recall@100`` and ``mrr@10`` over the judged queries."""
    judged = [qid for qid, rels in qrels.items() if any(rel > 0 for rel in rels.values())]
    means = {}
    for name, metric, k in _RUN_METRICS:
        total = sum(metric(run.get(qid, ()), qrels[qid], k) for qid in judged)
        means[name] = total / len(judged) if judged else 0.0
    return means


def load_beir(
    dataset_dir: Path,
) -> tuple[dict[str, tuple[str, str]], dict[str, str], dict[str, dict[str, int]]]:
    """Read ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/test.tsv`` of a BEIR dataset.

    Returns ``corpus`` (id -> (title, text)), ``queries`` (id -> text) and ``qrels``
    (query id -> document id -> grade).
    """
    corpus = {
        row["_id"]: (row.get("title") or "", row.get("text") or "")
        for row in _jsonl(dataset_dir / "corpus.jsonl")
    }
    queries = {row["_id"]: row.get("text") or "" for row in _jsonl(dataset_dir / "queries.jsonl")}
    path = dataset_dir / "qrels" / "test.tsv"
    qrels: dict[str, dict[str, int]] = {}
    try:
        with open(path, encoding="utf-8", newline="") as file:
            reader = csv.reader(file, delimiter="\t")
            next(reader, None)  # header: query-id, corpus-id, score
            for line, fields in enumerate(reader, start=2):
                if not fields:
                    continue
                if len(fields) != 3:
                    reason = f"line {line}: expected 3 tab-separated fields, got {len(fields)}"
                    raise LoadError(str(path), reason)
                qid, docid, score = fields
                qrels.setdefault(qid, {})[docid] = int(score)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LoadError(str(path), f"cannot read BEIR qrels: {exc}") from exc
    return corpus, queries, qrels


def _jsonl(path: Path) -> Iterator[dict[str, str]]:
    try:
        with open(path, encoding="utf-8") as file:
            for line_number, line in enumerate(file, start=1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or "_id" not in row:
                        reason = f"line {line_number}: expected a JSON object with an '_id'"
                        raise LoadError(str(path), reason)
                    row["_id"] = str(row["_id"])
                    yield row
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LoadError(str(path), f"cannot read BEIR file: {exc}") from exc
