"""The two stores side by side: indexing, hybrid search and a one-file edit, and the embedded
store's commit cost as the corpus grows.

    .venv/bin/python -m bench.stores                                 # 10k and 100k chunks, both stores
    .venv/bin/python -m bench.stores --sizes 10000 --stores embedded --commit-sizes 10000,100000,1000000

For each store and size: ``sync_index`` builds the index from a generated corpus (Markdown files of
``--per-file`` passages each), then: ``--queries`` hybrid searches (k=5, 50 candidates per
retriever, as the app does), an edit of one file (a sentence appended) and a run with nothing
changed. Vectors are synthetic, as in ``bench/retrieval.py``: an embedder maps each text, by its
hash, to one of ``n`` vectors shaped like real all-MiniLM-L6-v2 embeddings
(``bench._common.synthetic_vectors``), and tokens are counted as words, so that embedding and the
model's tokenizer cost nothing and what is timed is the store (and the scan, read and chunking
the indexer does for either). Questions are embedded once by the real model before timing: the
search times are the store's alone, without the ~6 ms of question embedding.

Milvus is ``milvus-lite server`` (Milvus Lite 3.2.2, a Python implementation of the Milvus gRPC
service) in its own process on this machine: the same client calls as a cluster, none of its
speed. Its numbers say what the protocol and the generation filter cost here, not what a
cluster would do.

The commit rows build a snapshot of n synthetic rows (``bench._common.build_snapshot``), commit it,
change one file and time the commit that follows: what a one-file edit costs the embedded store
at that corpus size, in seconds and bytes written.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench._common import (
    TextGenerator,
    add_json_option,
    build_snapshot,
    load_embedder,
    machine,
    markdown_table,
    percentile,
    real_base_vectors,
    save_results,
    synthetic_vectors,
)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _synthetic_embedder(pool: np.ndarray, questions: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    from rag.embedding import Embedder

    class SyntheticEmbedder(Embedder):
        """all-MiniLM-L6-v2's shape without its cost: a text's vector is picked by its hash."""

        model_id = "all-MiniLM-L6-v2"
        dimension = 384
        max_tokens = 256

        def count_tokens(self, text: str) -> int:
            return len(text.split()) + 2

        def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
            rows = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") % len(pool)
                    for t in texts]
            return pool[rows]

        def embed_query(self, text: str) -> np.ndarray:
            vector = questions.get(text)
            return vector if vector is not None else self.embed([text])[0]

    return SyntheticEmbedder(batch_size=256)


def _write_corpus(root: Path, n_chunks: int, per_file: int, seed: int) -> list[Path]:
    gen = TextGenerator(seed)
    paths = []
    for f in range(0, n_chunks, per_file):
        path = root / f"part-{(f // per_file) % 20:02d}" / f"doc-{f // per_file:06d}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        paragraphs = "\n\n".join(gen.chunk_text() for _ in range(min(per_file, n_chunks - f)))
        path.write_text(f"# Document {f // per_file}\n\n{paragraphs}\n", encoding="utf-8")
        paths.append(path)
    return paths


def _bench_store(kind: str, n: int, args: argparse.Namespace, embedder, questions: list[str], uri: str) -> dict:  # type: ignore[no-untyped-def]
    from rag.config import Settings
    from rag.indexing import sync_index
    from rag.retrieval import Retriever
    from rag.store import open_store

    work = Path(tempfile.mkdtemp(prefix=f"rag-bench-stores-{kind}-"))
    try:
        settings = Settings(corpus_dir=work / "corpus", data_dir=work / "data", vector_store=kind,
                            milvus_uri=uri, milvus_collection=f"bench_{n}", checkpoint_seconds=1e9,
                            embed_group=4096)
        paths = _write_corpus(settings.corpus_dir, n, args.per_file, seed=n)
        started = time.perf_counter()
        report = sync_index(settings, embedder)
        build_s = time.perf_counter() - started
        store = open_store(settings)
        snapshot = store.load()
        retriever = Retriever(snapshot, embedder)
        latencies = []
        for i, question in enumerate(questions):
            started = time.perf_counter()
            retriever.search(question, k=5, mode="hybrid")
            if i >= 5:
                latencies.append((time.perf_counter() - started) * 1000)
        disk_before = _tree_bytes(settings.data_dir) if kind == "embedded" else 0
        edited = paths[len(paths) // 2]
        edited.write_text(edited.read_text(encoding="utf-8") + "\nOne more sentence about zebras.\n", encoding="utf-8")
        st = edited.stat()
        os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        started = time.perf_counter()
        edit = sync_index(settings, embedder)
        edit_s = time.perf_counter() - started
        assert edit.updated == (edited.relative_to(settings.corpus_dir).as_posix(),), edit
        disk_written = (_tree_bytes(settings.data_dir) - disk_before) if kind == "embedded" else None
        started = time.perf_counter()
        sync_index(settings, embedder)
        noop_s = time.perf_counter() - started
        started = time.perf_counter()
        live = store.load(previous=snapshot)
        reload_s = time.perf_counter() - started
        assert "zebras" in " ".join(h.chunk.text for h in Retriever(live, embedder).search("zebras", k=3, mode="bm25"))
        return {
            "chunks": report.chunks_total, "files": len(paths), "build_s": build_s,
            "hybrid_p50_ms": percentile(latencies, 50), "hybrid_p95_ms": percentile(latencies, 95),
            "edit_s": edit_s, "edit_chunks_embedded": edit.chunks_embedded, "edit_bytes_written": disk_written,
            "noop_s": noop_s, "reload_after_edit_s": reload_s,
        }
    finally:
        if kind == "milvus":
            from rag.milvus import MilvusStore

            store = MilvusStore(uri, collection=f"bench_{n}")
            for name in store.client.list_collections():
                if name.startswith(f"bench_{n}_"):
                    store.client.drop_collection(name)
            store.close()
        shutil.rmtree(work, ignore_errors=True)


def _bench_commit(n: int, base: np.ndarray, per_file: int) -> dict:
    """One file changed in an n-row snapshot: what the next commit costs."""
    from rag.index import FileRecord, IndexStore

    gen = TextGenerator(5000 + n)
    texts = [gen.chunk_text() for _ in range(n)]
    vectors = synthetic_vectors(base, n, seed=n)
    started = time.perf_counter()
    snapshot = build_snapshot(vectors, texts, per_file=per_file)
    fill_s = time.perf_counter() - started
    del vectors, texts
    work = Path(tempfile.mkdtemp(prefix="rag-bench-commit-"))
    try:
        store = IndexStore(work / "index")
        started = time.perf_counter()
        store.commit(snapshot)
        first_s = time.perf_counter() - started
        times, written = [], []
        for i in range(3):
            source = sorted(snapshot.files)[i * 7]
            record = snapshot.files[source]
            chunks = snapshot.chunks_of(source)
            keys = [int(c.id[:15], 16) for c in chunks]
            old_vectors = np.stack([snapshot.vector(k) for k in keys])
            snapshot.put_file(FileRecord(source, record.sha256 + "x", record.size, i + 1, record.chunk_ids),
                              chunks, old_vectors, [c.text for c in chunks])
            before = _files(store.root)
            started = time.perf_counter()
            store.commit(snapshot)
            times.append(time.perf_counter() - started)
            written.append(_bench_written(store.root, before))
        return {"rows": n, "fill_s": fill_s, "first_commit_s": first_s, "edit_commit_s": float(np.median(times)),
                "edit_commit_bytes": int(np.median(written)), "index_bytes": _live_bytes(store)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _files(root: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _bench_written(root: Path, before: dict[Path, tuple[int, int]]) -> int:
    """Bytes the last commit wrote: files new or rewritten since ``before``."""
    return sum(size for path, (size, mtime) in _files(root).items() if before.get(path) != (size, mtime))


def _live_bytes(store) -> int:  # type: ignore[no-untyped-def]
    return int(store.size_on_disk())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="corpus sizes in chunks (default 10000,100000)")
    parser.add_argument("--stores", default="embedded,milvus", help="stores to compare (default both)")
    parser.add_argument("--commit-sizes", default="10000,100000",
                        help="embedded commit cost at these row counts (default 10000,100000; add 1000000)")
    parser.add_argument("--queries", type=int, default=100, help="timed hybrid searches (default 100)")
    parser.add_argument("--per-file", type=int, default=8, help="passages per generated file (default 8)")
    parser.add_argument("--base", type=int, default=1000, help="real embeddings the synthetic ones mix (default 1000)")
    add_json_option(parser, "stores")
    args = parser.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    stores = [s for s in args.stores.split(",") if s]
    commit_sizes = [int(s) for s in args.commit_sizes.split(",") if s]
    print(f"machine {machine()}")
    model = load_embedder()
    base, seconds = real_base_vectors(model, args.base)
    gen = TextGenerator(11)
    questions = [gen.question() for _ in range(args.queries + 5)]
    question_vectors = dict(zip(questions, model.embed(questions), strict=True))

    server = None
    uri = ""
    if "milvus" in stores:
        from tests.milvus_server import MilvusServer

        server = MilvusServer(Path(tempfile.mkdtemp(prefix="rag-bench-milvus-")) / "data").start()
        uri = server.uri
    results: dict[str, dict[int, dict]] = {s: {} for s in stores}
    try:
        for n in sizes:
            pool = synthetic_vectors(base, n, seed=n)
            embedder = _synthetic_embedder(pool, question_vectors)
            for kind in stores:
                print(f"{kind}, {n} chunks ...", flush=True)
                results[kind][n] = _bench_store(kind, n, args, embedder, questions, uri)
                print(f"  {results[kind][n]}", flush=True)
    finally:
        if server is not None:
            server.stop()
    commits = []
    for n in commit_sizes:
        print(f"embedded commit, {n} rows ...", flush=True)
        commits.append(_bench_commit(n, base, args.per_file))
        print(f"  {commits[-1]}", flush=True)

    print()
    rows = []
    for n in sizes:
        for kind in stores:
            r = results[kind][n]
            rows.append([kind, f"{r['chunks']:,}", f"{r['build_s']:.1f}", f"{r['hybrid_p50_ms']:.1f}",
                         f"{r['hybrid_p95_ms']:.1f}", f"{r['edit_s']:.2f}", f"{r['noop_s']:.2f}",
                         f"{r['reload_after_edit_s']:.2f}"])
    print(markdown_table(["store", "chunks", "sync_index build s", "hybrid p50 ms", "hybrid p95 ms",
                          "one-file edit s", "nothing changed s", "reader reload after the edit s"], rows))
    if len(stores) == 2:
        print()
        ratio_rows = []
        for n in sizes:
            a, b = results[stores[1]][n], results[stores[0]][n]
            ratio_rows.append([f"{n:,}", f"{a['build_s'] / b['build_s']:.1f}x", f"{a['hybrid_p50_ms'] / b['hybrid_p50_ms']:.1f}x",
                               f"{a['edit_s'] / b['edit_s']:.2f}x"])
        print(markdown_table(["chunks", f"build {stores[1]}/{stores[0]}", "hybrid p50", "one-file edit"], ratio_rows))
    if commits:
        print()
        print(markdown_table(["rows", "first commit s", "one-file edit: commit s", "one-file edit: bytes written",
                              "index on disk MB"],
                             [[f"{c['rows']:,}", f"{c['first_commit_s']:.2f}", f"{c['edit_commit_s']:.3f}",
                               f"{c['edit_commit_bytes'] / 2**20:.2f} MiB", f"{c['index_bytes'] / 2**20:.0f}"]
                              for c in commits]))
    save_results("stores", {"sizes": results, "commits": commits, "machine": machine()}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
