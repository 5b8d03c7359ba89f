"""Retrieval latency (query embedding included) at 10k and 100k chunks, and IVF recall.

    .venv/bin/python -m bench.retrieval                   # 10k and 100k chunks, a few minutes
    .venv/bin/python -m bench.retrieval --sizes 10000,100000,300000 --queries 500

Embedding 100k real chunks would take over an hour on two cores, so the document vectors are
synthetic but shaped like real ones: ``--base`` generated chunks are embedded with the real
model (cached in bench/results/cache), and every document vector mixes one of them with a near
neighbour and adds noise shaped by their covariance (``bench._common.synthetic_vectors``; the
first table compares their neighbour statistics with the real vectors'). The chunk texts are generated prose, so
BM25 runs over real postings. Queries are generated search-box questions, embedded by the
real model inside every timed search.

The index is a ``Snapshot`` filled with ``put_file`` (as the indexer does), searched through
``Retriever.search`` (k=5, 50 candidates per retriever, as the app does). For every query, the
modes run one after another in a rotating order, so a change in the machine's load hits them
all alike. The BM25 term-score cache is cleared before each timed search (the first query
after an update; the slow case) except in the row marked warm.

IVF is the approximate index ``Snapshot.update_ann`` builds (~sqrt(n) lists); its recall@10
and recall@50 (the hybrid's candidate depth) are measured against exact search on the same
query vectors, for each ``--nprobe``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from bench._common import (
    TextGenerator,
    add_json_option,
    build_snapshot,
    clock,
    load_embedder,
    machine,
    markdown_table,
    neighbour_stats,
    percentile,
    real_base_vectors,
    save_results,
    synthetic_vectors,
)

WARMUP = 10


def query_top1(vectors: np.ndarray, queries: np.ndarray) -> float:
    return float((queries @ vectors.T).max(axis=1).mean())


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return (time.perf_counter() - started) * 1000.0, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="index sizes in chunks (default 10000,100000)")
    parser.add_argument("--queries", type=int, default=200, help="timed queries per mode (default 200)")
    parser.add_argument("--base", type=int, default=2000, help="real chunk embeddings to mix (default 2000)")
    parser.add_argument("--noise", type=float, default=0.5,
                        help="noise norm of the synthetic vectors (default 0.5; see bench._common.synthetic_vectors)")
    parser.add_argument("--nprobe", default="4,8,16,32", help="IVF nprobe values to compare (default 4,8,16,32)")
    add_json_option(parser, "retrieval")
    args = parser.parse_args(argv)

    from rag.config import Settings
    from rag.index import DEFAULT_NPROBE
    from rag.retrieval import Retriever

    sizes = [int(s) for s in args.sizes.split(",")]
    nprobes = [int(p) for p in args.nprobe.split(",")]
    threshold = Settings().ann_threshold
    embedder = load_embedder()
    print(f"machine {machine()}")
    base, seconds = real_base_vectors(embedder, args.base)
    print(f"{len(base)} real chunk embeddings " + (f"computed in {seconds:.0f} s" if seconds else "from the cache"))
    gen = TextGenerator(11)
    queries = [gen.question() for _ in range(args.queries + WARMUP)]
    query_vectors = embedder.embed(queries)

    realism = [["real chunks", len(base), *neighbour_stats(base).values(), query_top1(base, query_vectors)]]
    same_size = synthetic_vectors(base, len(base), seed=99, noise=args.noise)
    realism.append(["synthetic", len(base), *neighbour_stats(same_size).values(), query_top1(same_size, query_vectors)])

    results: dict[int, dict] = {}
    for n in sizes:
        print(f"\n{n} chunks: generating texts and vectors, filling the snapshot ...")
        text_gen = TextGenerator(1000 + n)
        with clock() as build:
            texts = [text_gen.chunk_text() for _ in range(n)]
            vectors = synthetic_vectors(base, n, seed=n, noise=args.noise)
            snapshot = build_snapshot(vectors, texts)
        realism.append(["synthetic", n, *neighbour_stats(vectors).values(), query_top1(vectors, query_vectors)])
        with clock() as train:
            snapshot.update_ann(1)  # force the IVF index whatever the size, for the comparison
        ivf = snapshot.ann
        assert ivf is not None
        print(f"  built in {build['wall']:.0f} s; IVF ({ivf.nlist} lists) trained in {train['wall']:.1f} s")
        retriever = Retriever(snapshot, embedder)
        default_uses_ivf = n >= threshold

        def search(mode: str, nprobe: int | None, *, cold: bool = True) -> Callable[[str], list]:
            def run(query: str) -> list:
                snapshot.ann = None if nprobe is None else ivf
                if nprobe is not None:
                    ivf.nprobe = nprobe
                if cold:
                    snapshot.keyword._forget_scores()  # the BM25 term-score cache (private: bench only)
                return [hit.chunk.id for hit in retriever.search(query, k=5, mode=mode)]

            return run

        modes: dict[str, Callable[[str], object]] = {
            "query embedding only": embedder.embed_query,
            "query embedding only, torch (before 2026-11-25)": embedder.embed_query_torch,
            "dense, exact": search("dense", None),
            f"dense, IVF nprobe {DEFAULT_NPROBE}": search("dense", DEFAULT_NPROBE),
            "bm25": search("bm25", None),
            "hybrid, exact": search("hybrid", None),
        }
        for p in nprobes:
            modes[f"hybrid, IVF nprobe {p}"] = search("hybrid", p)
        default_mode = f"hybrid, IVF nprobe {DEFAULT_NPROBE}" if default_uses_ivf else "hybrid, exact"
        modes[f"{default_mode}, warm BM25 cache"] = search("hybrid", DEFAULT_NPROBE if default_uses_ivf else None,
                                                           cold=False)
        names = list(modes)
        latency: dict[str, list[float]] = {name: [] for name in names}
        answers: dict[str, list[object]] = {name: [] for name in names}
        for i, query in enumerate(queries):
            rotation = names[i % (len(names) - 1):-1] + names[:i % (len(names) - 1)] + names[-1:]
            for name in rotation:
                ms, out = timed(lambda: modes[name](query))  # noqa: B023 - called at once
                if i >= WARMUP:
                    latency[name].append(ms)
                    answers[name].append(out)
        snapshot.ann = ivf

        # Recall of the IVF index against exact search, on the same query vectors.
        qv = query_vectors[WARMUP:]
        assert snapshot.vectors is not None
        _, exact = snapshot.vectors.search(qv, 50)
        recall = {}
        for p in nprobes:
            ivf.nprobe = p
            ivf_ms = [timed(lambda: ivf.search(qv[j : j + 1], 50))[0] for j in range(len(qv))]  # noqa: B023
            _, approx = ivf.search(qv, 50)
            exact_ms = [timed(lambda: snapshot.vectors.search(qv[j : j + 1], 50))[0]  # noqa: B023
                        for j in range(min(50, len(qv)))]
            hybrid_exact, hybrid_ivf = answers["hybrid, exact"], answers[f"hybrid, IVF nprobe {p}"]
            recall[p] = {
                "recall@10": float(np.mean([len(set(a[:10]) & set(e[:10])) / 10 for a, e in zip(approx, exact)])),
                "recall@50": float(np.mean([len(set(a) & set(e)) / 50 for a, e in zip(approx, exact)])),
                "hybrid_top5_overlap": float(np.mean([len(set(a) & set(e)) / max(1, len(e))
                                                      for a, e in zip(hybrid_ivf, hybrid_exact)])),
                "ivf_search_p50_ms": percentile(ivf_ms, 50),
                "exact_search_p50_ms": percentile(exact_ms, 50),
            }
        results[n] = {
            "build_s": build["wall"], "ivf_train_s": train["wall"], "ivf_lists": ivf.nlist,
            "default_mode": default_mode,
            "latency_ms": {
                name: {
                    "p50": percentile(v, 50), "p95": percentile(v, 95), "mean": float(np.mean(v)),
                    # Same query, moments apart: what the index adds to embedding the query.
                    "over_embedding_p50": percentile(np.subtract(v, latency["query embedding only"]), 50),
                }
                for name, v in latency.items()
            },
            "ivf": recall,
        }
        del snapshot, retriever, vectors, texts

    print()
    print(f"Retrieval benchmark, {args.queries} queries; load average {machine()['load_avg_1m']}")
    print()
    print("Synthetic vectors against real ones (mean cosine similarity):")
    print()
    print(markdown_table(["vectors", "count", "to nearest", "to 10th nearest", "to a random one", "query to top-1"],
                         [[r[0], r[1], *(f"{x:.3f}" for x in r[2:])] for r in realism]))
    for n, r in results.items():
        print()
        print(f"{n:,} chunks (build {r['build_s']:.0f} s, IVF {r['ivf_lists']} lists trained in "
              f"{r['ivf_train_s']:.1f} s); the app's default path here: {r['default_mode']}")
        print()
        rows = [[("**" + name + "** (default)") if name == r["default_mode"] else name,
                 f"{v['p50']:.1f}", f"{v['p95']:.1f}", f"{v['mean']:.1f}",
                 "" if name == "query embedding only" else f"{v['over_embedding_p50']:.1f}"]
                for name, v in r["latency_ms"].items()]
        print(markdown_table(["search (k=5, incl. query embedding)", "p50 ms", "p95 ms", "mean ms",
                              "p50 of (search - embedding) ms"], rows))
        print()
        rows = [[p, f"{v['recall@10']:.3f}", f"{v['recall@50']:.3f}", f"{v['hybrid_top5_overlap']:.3f}",
                 f"{v['ivf_search_p50_ms']:.2f}", f"{v['exact_search_p50_ms']:.2f}",
                 f"{r['latency_ms'][f'hybrid, IVF nprobe {p}']['p50']:.1f}"] for p, v in r["ivf"].items()]
        print(markdown_table(["nprobe", "recall@10", "recall@50", "hybrid top-5 same as exact",
                              "IVF search p50 ms", "exact search p50 ms", "hybrid p50 ms"], rows))
    largest = max(results)
    p50 = results[largest]["latency_ms"][results[largest]["default_mode"]]["p50"]
    print()
    print(f"default hybrid p50 at {largest:,} chunks: {p50:.1f} ms (target <= 15 ms): {'met' if p50 <= 15 else 'NOT met'}")
    save_results("retrieval", {"queries": args.queries, "base": len(base), "realism": realism,
                               "sizes": results}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
