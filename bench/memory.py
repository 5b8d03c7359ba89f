"""Memory (peak RSS) and disk per 10k chunks, one fresh process per size and phase.

    .venv/bin/python -m bench.memory                      # 10k and 50k chunks, a few minutes
    .venv/bin/python -m bench.memory --sizes 10000,50000,100000,200000

For each size, two child processes (so that one size's memory never shows in the next):

- **build**: generated chunk texts and unit vectors are loaded first; then the peak RSS is
  reset (``/proc/self/clear_refs``) and a ``Snapshot`` is filled with ``put_file``, given its
  IVF index when past ``ann_threshold`` (as ``sync_index`` does), and committed with
  ``IndexStore.commit``. Reported: peak RSS above the RSS before, and the committed
  generation's size on disk, file by file.
- **serve**: after the imports, the peak is reset; ``IndexStore.load`` (RSS it holds is
  reported), then the real embedding model is loaded and 20 hybrid searches run. Reported: the
  app's peak RSS, and that peak minus the peak of the same process without an index (the model
  alone, measured once in a child of its own).

Vector values do not change sizes, so the vectors here are random unit vectors; the texts are
the generated prose of the other benchmarks (BM25 postings and ``chunks.jsonl`` depend on them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench._common import (
    REPO,
    TextGenerator,
    add_json_option,
    build_snapshot,
    machine,
    markdown_table,
    reset_peak_rss,
    rss_mib,
    save_results,
)


def unit_vectors(n: int, dim: int = 384, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def worker_build(n: int, texts_path: Path, index_dir: Path) -> dict:
    from rag.config import Settings
    from rag.index import IndexStore

    with open(texts_path, encoding="utf-8") as fh:
        texts = [json.loads(line) for _, line in zip(range(n), fh)]
    vectors = unit_vectors(n)
    before, _ = rss_mib()
    exact_peak = reset_peak_rss()
    snapshot = build_snapshot(vectors, texts)
    snapshot.update_ann(Settings().ann_threshold)
    filled, peak_fill = rss_mib()
    reset_peak_rss()
    store = IndexStore(index_dir)
    store.commit(snapshot)
    after, peak_commit = rss_mib()
    peak = max(peak_fill, peak_commit)
    generation = index_dir / str(store.current_generation())
    return {
        "rss_before_mib": before,
        "peak_above_mib": peak - before,
        "retained_above_mib": after - before,
        "snapshot_mib": filled - before,
        "commit_peak_above_mib": peak_commit - filled,
        "peak_exact": exact_peak,
        "ivf": snapshot.ann is not None,
        "disk_bytes": store.size_on_disk(),
        "files": {p.name: p.stat().st_size for p in sorted(generation.iterdir())},
    }


def worker_serve(index_dir: Path | None) -> dict:
    """Load the index (if given), then the model, then run 20 hybrid searches (bm25 without a model)."""
    import sentence_transformers  # noqa: F401 - imported before the baseline, as the app does

    from bench._common import load_embedder
    from rag.index import IndexStore
    from rag.retrieval import Retriever

    before, _ = rss_mib()
    exact_peak = reset_peak_rss()
    snapshot = IndexStore(index_dir).load() if index_dir else None
    index_held, _ = rss_mib()
    embedder = load_embedder()
    gen = TextGenerator(11)
    for _ in range(20):
        query = gen.question()
        if snapshot is not None:
            Retriever(snapshot, embedder).search(query, k=5, mode="hybrid")
        else:
            embedder.embed_query(query)
    after, peak = rss_mib()
    return {"rss_before_mib": before, "index_held_mib": index_held - before, "peak_above_mib": peak - before,
            "peak_mib": peak, "retained_above_mib": after - before, "peak_exact": exact_peak,
            "chunks": len(snapshot) if snapshot is not None else 0}


def child(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.memory", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,50000", help="index sizes in chunks (default 10000,50000)")
    add_json_option(parser, "memory")
    parser.add_argument("--worker", nargs=3, metavar=("PHASE", "N", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        phase, n, folder = args.worker
        folder = Path(folder)
        if phase == "build":
            out = worker_build(int(n), folder / "texts.jsonl", folder / f"index-{n}")
        else:
            out = worker_serve(folder / f"index-{n}" if int(n) else None)
        print(json.dumps(out))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="rag-bench-memory-"))
    try:
        print(f"machine {machine()}; generating {max(sizes)} chunk texts ...")
        gen = TextGenerator(5)
        with open(work / "texts.jsonl", "w", encoding="utf-8") as fh:
            for _ in range(max(sizes)):
                fh.write(json.dumps(gen.chunk_text()) + "\n")
        model = child("--worker", "serve", "0", str(work))
        print(f"  the model alone: peak {model['peak_mib']:.0f} MiB RSS, "
              f"+{model['peak_above_mib']:.0f} MiB over the imports")
        results = {}
        for n in sizes:
            build = child("--worker", "build", str(n), str(work))
            serve = child("--worker", "serve", str(n), str(work))
            results[n] = {"build": build, "serve": serve}
            serve["index_share_mib"] = serve["peak_above_mib"] - model["peak_above_mib"]
            print(f"  {n}: build peak +{build['peak_above_mib']:.0f} MiB, index held {serve['index_held_mib']:.0f} "
                  f"MiB, app peak {serve['peak_mib']:.0f} MiB, disk {build['disk_bytes'] / 2**20:.1f} MiB")
            shutil.rmtree(work / f"index-{n}", ignore_errors=True)

        print()
        print(f"Memory and disk by index size. The app with the model loaded and no index peaks at "
              f"{model['peak_mib']:.0f} MiB RSS; load average {machine()['load_avg_1m']}")
        print()
        rows = []
        for n, r in results.items():
            per = 10_000 / n
            b, s = r["build"], r["serve"]
            rows.append([f"{n:,}", "yes" if b["ivf"] else "no",
                         f"{b['disk_bytes'] / 2**20:.1f} ({b['disk_bytes'] / 2**20 * per:.1f})",
                         f"{b['peak_above_mib']:.0f} ({b['peak_above_mib'] * per:.1f})",
                         f"{b['commit_peak_above_mib']:.0f}",
                         f"{s['index_held_mib']:.0f} ({s['index_held_mib'] * per:.1f})",
                         f"{s['peak_mib']:.0f}",
                         f"{s['index_share_mib']:.0f} ({s['index_share_mib'] * per:.1f})"])
        print(markdown_table(["chunks", "IVF", "disk MiB (per 10k)", "build: peak RSS MiB (per 10k)", "commit: peak over the filled snapshot MiB",
                              "load: index held MiB (per 10k)", "search: app peak RSS MiB",
                              "search: peak over model alone MiB (per 10k)"], rows))
        print()
        files = sorted({f for r in results.values() for f in r["build"]["files"]})
        rows = [[f"{n:,}", *(f"{r['build']['files'].get(f, 0) / 2**20:.2f}" for f in files)] for n, r in results.items()]
        print("Disk per file of the committed generation (MiB); the data directory keeps two generations:")
        print()
        print(markdown_table(["chunks", *files], rows))
        if not all(r["build"]["peak_exact"] and r["serve"]["peak_exact"] for r in results.values()):
            print("\nnote: /proc/self/clear_refs was not writable: peaks include what came before")
        save_results("memory", {"sizes": results, "model_alone": model}, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
