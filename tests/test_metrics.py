from __future__ import annotations

import json
import math
import random
from pathlib import Path

import ir_measures
import pytest
from ir_measures import RR, R, nDCG

from rag.errors import LoadError
from rag.metrics import evaluate_run, load_beir, mrr_at_k, ndcg_at_k, recall_at_k


def test_ndcg_by_hand() -> None:
    relevant = {"a": 3, "b": 1, "c": 0}
    # DCG = 1/log2(2) + 3/log2(4); ideal = 3/log2(2) + 1/log2(3).
    expected = (1 + 3 / 2) / (3 + 1 / math.log2(3))
    assert ndcg_at_k(["b", "x", "a"], relevant, 10) == pytest.approx(expected)
    assert ndcg_at_k(["a", "b"], relevant, 10) == 1.0
    assert ndcg_at_k(["b", "x", "a"], relevant, 2) == pytest.approx(1 / (3 + 1 / math.log2(3)))
    assert ndcg_at_k(["x"], relevant, 10) == 0.0
    assert ndcg_at_k(["a"], {"a": 0}, 10) == 0.0
    assert ndcg_at_k([], relevant, 10) == 0.0


def test_recall_and_mrr_by_hand() -> None:
    relevant = {"a": 1, "b": 2, "c": 0, "d": 1}
    assert recall_at_k(["c", "a", "x", "b"], relevant, 2) == pytest.approx(1 / 3)
    assert recall_at_k(["c", "a", "x", "b"], relevant, 10) == pytest.approx(2 / 3)
    assert recall_at_k(["a"], {"a": 0}, 10) == 0.0
    assert mrr_at_k(["c", "x", "b"], relevant, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["c", "x", "b"], relevant, 2) == 0.0
    assert mrr_at_k([], relevant, 10) == 0.0


def test_a_document_ranked_twice_counts_once() -> None:
    relevant = {"a": 1, "b": 1}
    assert recall_at_k(["a", "a", "b"], relevant, 2) == 1.0
    assert mrr_at_k(["x", "x", "a"], relevant, 2) == 0.5
    assert ndcg_at_k(["a", "a"], relevant, 10) == ndcg_at_k(["a"], relevant, 10)


def test_evaluate_run_averages_over_judged_queries() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 1, "c": 1}, "unjudged": {"x": 0}}
    run = {"q1": ["a"], "unjudged": ["x"], "extra": ["a"]}  # q2 missing from the run scores 0
    assert evaluate_run(run, qrels) == {"ndcg@10": 0.5, "recall@10": 0.5, "recall@100": 0.5, "mrr@10": 0.5}
    assert evaluate_run(run, {}) == {"ndcg@10": 0.0, "recall@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}


def random_run_and_qrels(seed: int) -> tuple[dict[str, list[str]], dict[str, dict[str, int]]]:
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(300)]
    run, qrels = {}, {}
    for q in range(50):
        qid = f"q{q}"
        graded = q % 2 == 0
        judged = rng.sample(docs, rng.randint(1, 120))
        qrels[qid] = {doc: rng.choice([0, 1, 2, 3] if graded else [0, 1]) for doc in judged}
        qrels[qid][judged[0]] = rng.randint(1, 3) if graded else 1  # at least one relevant
        # Some queries rank nothing relevant in the top 10, some rank fewer than 100 documents.
        run[qid] = rng.sample(docs, rng.choice([5, 60, 150, 300]))
    return run, qrels


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_agree_with_trec_eval(seed: int) -> None:
    run, qrels = random_run_and_qrels(seed)
    # trec_eval ranks by score; strictly falling scores leave no ties to break.
    scored = {
        qid: {doc: float(len(ranked) - rank) for rank, doc in enumerate(ranked)}
        for qid, ranked in run.items()
    }
    measures = {"ndcg@10": nDCG @ 10, "recall@10": R @ 10, "recall@100": R @ 100, "mrr@10": RR @ 10}
    ours = {"ndcg@10": ndcg_at_k, "recall@10": recall_at_k, "recall@100": recall_at_k, "mrr@10": mrr_at_k}
    cutoff = {"ndcg@10": 10, "recall@10": 10, "recall@100": 100, "mrr@10": 10}

    per_query = list(ir_measures.iter_calc(list(measures.values()), qrels, scored))
    assert len(per_query) == 4 * 50
    by_measure = {measure: name for name, measure in measures.items()}
    for metric in per_query:
        name = by_measure[metric.measure]
        mine = ours[name](run[metric.query_id], qrels[metric.query_id], cutoff[name])
        assert mine == pytest.approx(metric.value, abs=1e-6), (name, metric.query_id)

    reference = ir_measures.calc_aggregate(list(measures.values()), qrels, scored)
    expected = {name: pytest.approx(reference[measure], abs=1e-6) for name, measure in measures.items()}
    assert evaluate_run(run, qrels) == expected


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def test_load_beir(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "corpus.jsonl",
        [{"_id": "d1", "title": "Über", "text": "first"}, {"_id": 2, "text": "no title"}],
    )
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "what?"}, {"_id": "q2", "text": "none"}])
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\t2\t0\n\n")

    corpus, queries, qrels = load_beir(tmp_path)
    assert corpus == {"d1": ("Über", "first"), "2": ("", "no title")}
    assert queries == {"q1": "what?", "q2": "none"}
    assert qrels == {"q1": {"d1": 2, "2": 0}}


def test_load_beir_names_the_bad_file(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"corpus\.jsonl"):
        load_beir(tmp_path)
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "d1", "text": "x"}])
    (tmp_path / "queries.jsonl").write_text("{not json\n")
    with pytest.raises(LoadError, match=r"queries\.jsonl"):
        load_beir(tmp_path)
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "x"}])
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(LoadError, match="line 2: expected 3"):
        load_beir(tmp_path)
