"""Ingest throughput: ``sync_index`` against the bare model on the same chunk texts.

    .venv/bin/python -m bench.ingest                      # >= 2,000 chunks, a few minutes idle
    .venv/bin/python -m bench.ingest --repeat 2 --compare-batching --json   # docs/benchmarks.md
    .venv/bin/python -m bench.ingest --chunks 10000 --sweep-chunks 0 --repeat 3

1. Writes a generated Markdown corpus of at least ``--chunks`` chunks (rag's own chunker and
   the model's tokenizer decide how many chunks a file makes).
2. Gets the chunk texts exactly as the indexer does (``load_bytes``, ``split_documents``,
   ``embedding_text``) and times ``SentenceTransformer.encode`` on them at each ``--batches``
   size (on a sample of ``--sweep-chunks``; 0 = all; slice by slice, the sizes in a rotating
   order), keeping the fastest.
3. Times ``encode`` of all the texts at that batch size, then ``sync_index`` (full build, fresh
   data directory, ``embed_batch_size`` = that batch) with the same loaded model; ``--repeat``
   alternates the two.

The ratio is rag's chunks/s over the bare model's chunks/s; the target is >= 0.9. The
``sync_index`` time is also split by stage (functions wrapped with timers), the word-pieces the
model runs over are counted for both (padding), ``--compare-batching`` times the model on the
same texts batched as the indexer does, as proposed, and as ``encode`` does, and ``--profile``
runs one more build under cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import shutil
import tempfile
from pathlib import Path

from bench._common import (
    TextGenerator,
    add_json_option,
    chunk_corpus,
    chunks_of,
    clock,
    instrument_indexing,
    load_embedder,
    machine,
    markdown_table,
    median,
    save_results,
    write_corpus,
)


def build_corpus(root: Path, min_chunks: int, settings, embedder, *, seed: int = 0):  # type: ignore[no-untyped-def]
    """Write generated documents until the indexer would make at least ``min_chunks`` chunks."""
    gen = TextGenerator(seed)
    documents: list[str] = []
    files = []
    while sum(len(f.texts) for f in files) < min_chunks:
        missing = min_chunks - sum(len(f.texts) for f in files)
        documents += [gen.markdown() for _ in range(max(1, missing // 8))]
        shutil.rmtree(root, ignore_errors=True)
        write_corpus(root, documents)
        files = chunk_corpus(settings, embedder)
    return files


def encode(model, texts: list[str], batch_size: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Wall and CPU seconds of one ``SentenceTransformer.encode`` call as ``embed_batch`` makes it."""
    with clock() as spent:
        model.encode(
            texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
    return spent


def padded_word_pieces(lengths: list[int], chars: list[int], batch_size: int) -> int:
    """Word-pieces the model runs over for one ``encode`` call: each batch is padded to its longest.

    ``encode`` orders the texts by length in characters (longest first) before batching.
    ``[5, 3, 4], batch 2 -> 5 + 5 + 3 = 13``
    """
    order = sorted(range(len(lengths)), key=lambda i: -chars[i])
    total = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        total += max(batch) * len(batch)
    return total


def compare_batching(model, files, batch_size: int, tokens: list[int], *, group: int = 512) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Model seconds for the same texts batched three ways, alternated group by group.

    - ``per_file``: what ``sync_index`` did before 2026-11-25: ``embed`` per file, batches cut
      in file order.
    - ``proposed``: files gathered until >= ``group`` chunks, texts ordered by word-pieces,
      batches of ``batch_size`` cut from that order, each one ``encode`` call (what
      ``sync_index`` does now, except that ``Embedder.embed`` orders by characters, as
      ``encode`` does).
    - ``encode``: one ``encode`` call per group (sentence-transformers orders by characters):
      the baseline, within 0.5 % of one call over everything in padding.
    """
    groups, current = [], []
    offset = 0
    for f in files:
        current.append((f, tokens[offset : offset + len(f.texts)]))
        offset += len(f.texts)
        if sum(len(g.texts) for g, _ in current) >= group:
            groups.append(current)
            current = []
    if current:
        groups.append(current)

    def per_file(gr):  # type: ignore[no-untyped-def]
        for f, _ in gr:
            for start in range(0, len(f.texts), batch_size):
                batch = list(f.texts[start : start + batch_size])
                encode(model, batch, len(batch))

    def proposed(gr):  # type: ignore[no-untyped-def]
        pairs = sorted(((n, t) for f, counts in gr for t, n in zip(f.texts, counts)), key=lambda p: -p[0])
        texts = [t for _, t in pairs]
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            encode(model, batch, len(batch))

    def one_call(gr):  # type: ignore[no-untyped-def]
        encode(model, [t for f, _ in gr for t in f.texts], batch_size)

    ways = [("per_file", per_file), ("proposed", proposed), ("encode", one_call)]
    spent = dict.fromkeys((name for name, _ in ways), 0.0)
    for i, gr in enumerate(groups):
        for name, fn in ways[i % 3 :] + ways[: i % 3]:
            with clock() as took:
                fn(gr)
            spent[name] += took["wall"]
    return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=2000, help="at least this many chunks (default 2000)")
    parser.add_argument("--batches", default="8,16,32,64", help="batch sizes to try (default 8,16,32,64)")
    parser.add_argument("--sweep-chunks", type=int, default=256, help="texts per sweep run; 0 = all (default 256)")
    parser.add_argument("--repeat", type=int, default=1, help="encode/index pairs, alternated (default 1)")
    parser.add_argument("--compare-batching", action="store_true",
                        help="time the model on the same texts batched as the indexer does, as proposed, and in "
                             "one encode call per group of >= 512 chunks, alternating group by group")
    parser.add_argument("--profile", action="store_true", help="one more build under cProfile; print the top")
    add_json_option(parser, "ingest")
    args = parser.parse_args(argv)

    from rag.config import Settings
    from rag.indexing import sync_index

    work = Path(tempfile.mkdtemp(prefix="rag-bench-ingest-"))
    try:
        with clock() as spent:
            embedder = load_embedder()
            model = embedder.model
        print(f"model loaded and warm in {spent['wall']:.1f} s; machine {machine()}")
        settings = Settings(corpus_dir=work / "corpus", data_dir=work / "data")
        files = build_corpus(settings.corpus_dir, args.chunks, settings, embedder)
        texts = list(chunks_of(files))
        tokens = embedder.count_tokens_many(texts)
        corpus_bytes = sum(p.stat().st_size for p in settings.corpus_dir.rglob("*.md"))
        print(f"corpus: {len(files)} files, {corpus_bytes / 1e6:.1f} MB, {len(texts)} chunks, "
              f"{sum(tokens) / len(tokens):.0f} word-pieces per chunk on average (max {max(tokens)})")

        sample = texts if args.sweep_chunks <= 0 else random.Random(0).sample(texts, min(args.sweep_chunks, len(texts)))
        # Slice by slice, every batch size in a rotating order: a drift in the machine's load
        # (other work comes and goes) then favours no batch size.
        batches = [int(b) for b in args.batches.split(",")]
        step = max(batches)
        seconds = dict.fromkeys(batches, 0.0)
        for i, start in enumerate(range(0, len(sample), step)):
            for batch in batches[i % len(batches):] + batches[:i % len(batches)]:
                seconds[batch] += encode(model, sample[start : start + step], batch)["wall"]
        sweep = {batch: len(sample) / seconds[batch] for batch in batches}
        for batch in batches:
            print(f"  encode, batch {batch:>3}: {sweep[batch]:.1f} chunks/s ({len(sample)} chunks)")
        best = max(sweep, key=sweep.__getitem__)

        runs = []
        for i in range(args.repeat):
            data_dir = work / f"data-{i}"
            run_settings = settings.replace(data_dir=data_dir, embed_batch_size=best)
            embedder.batch_size = best
            # Alternate the order, so a drift in the machine's load favours neither.
            if i % 2 == 0:
                bare = encode(model, texts, best)
            with instrument_indexing(embedder) as watch, clock() as spent:
                report = sync_index(run_settings, embedder, show_progress=False)
            if i % 2 == 1:
                bare = encode(model, texts, best)
            if report.chunks_embedded != len(set(texts)) or report.skipped:
                raise SystemExit(f"the indexer embedded {report.chunks_embedded} chunks, expected {len(set(texts))}")
            run = {
                "encode_s": bare["wall"],
                "index_s": spent["wall"],
                "encode_cpu_s": bare["cpu"],
                "index_cpu_s": spent["cpu"],
                "encode_chunks_per_s": len(texts) / bare["wall"],
                "index_chunks_per_s": len(texts) / spent["wall"],
                "ratio": bare["wall"] / spent["wall"],
                "cpu_ratio": bare["cpu"] / spent["cpu"],
                "stages_s": dict(watch.seconds),
                "stage_calls": dict(watch.calls),
                "load_avg_1m": machine()["load_avg_1m"],
            }
            runs.append(run)
            print(f"  run {i + 1}: encode {bare['wall']:.1f} s, sync_index {spent['wall']:.1f} s, "
                  f"ratio {run['ratio']:.3f} (CPU time: {run['cpu_ratio']:.3f})")
            shutil.rmtree(data_dir, ignore_errors=True)

        batching = None
        if args.compare_batching:
            batching = compare_batching(model, files, best, tokens)
            print(f"  model time: per-file batches {batching['per_file']:.1f} s, proposed "
                  f"{batching['proposed']:.1f} s, one encode call per group {batching['encode']:.1f} s")

        profile_text = None
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            sync_index(settings.replace(data_dir=work / "data-profile", embed_batch_size=best), embedder,
                       show_progress=False)
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
            profile_text = out.getvalue()

        ratio = median([r["ratio"] for r in runs])
        cpu_ratio = median([r["cpu_ratio"] for r in runs])
        print()
        print(f"Ingest throughput, {len(texts)} chunks in {len(files)} Markdown files "
              f"({sum(tokens) / len(tokens):.0f} word-pieces per chunk on average); "
              f"load average {machine()['load_avg_1m']}")
        print()
        rows = [[f"`encode`, batch {b}" + (" (best)" if b == best else ""), len(sample), f"{v:.1f}", "", "", ""]
                for b, v in sweep.items()]
        for i, r in enumerate(runs, 1):
            suffix = f" (run {i})" if len(runs) > 1 else ""
            rows.append([f"`encode`, batch {best}, all chunks{suffix}", len(texts),
                         f"{r['encode_chunks_per_s']:.1f}", f"{r['encode_cpu_s']:.1f}", "1.00", "1.00"])
            rows.append([f"`sync_index` full build, batch {best}{suffix}", len(texts),
                         f"{r['index_chunks_per_s']:.1f}", f"{r['index_cpu_s']:.1f}",
                         f"**{r['ratio']:.3f}**", f"{r['cpu_ratio']:.3f}"])
        print(markdown_table(["run", "chunks", "chunks/s", "CPU s", "ratio (wall)", "ratio (CPU time)"], rows))
        print()
        last = runs[-1]
        stages = dict(last["stages_s"])
        accounted = sum(v for k, v in stages.items())
        stages["other (hashing, vector cache, loop)"] = last["index_s"] - accounted
        stage_rows = [[k, f"{v:.2f}", f"{100 * v / last['index_s']:.1f} %", last["stage_calls"].get(k, "")]
                      for k, v in sorted(stages.items(), key=lambda kv: -kv[1])]
        stage_rows.append(["`encode` of the same texts in one call (for comparison)", f"{last['encode_s']:.2f}", "", 1])
        print(f"Where `sync_index` spent its {last['index_s']:.1f} s (last run):")
        print()
        print(markdown_table(["stage", "seconds", "share", "calls"], stage_rows))
        print()
        print(f"ratio {ratio:.3f}, CPU-time ratio {cpu_ratio:.3f} (target >= 0.9): "
              f"{'met' if ratio >= 0.9 else 'NOT met'}")
        if profile_text:
            print()
            print(profile_text)
        # Padding: one encode() call sorts all texts by length; the indexer sorts within groups of
        # consecutive files holding >= RAG_EMBED_GROUP texts (before 2026-11-25: file by file).
        window = embedder.max_tokens
        clipped = [min(t, window) for t in tokens]
        chars = [len(t) for t in texts]
        padded_bare = padded_word_pieces(clipped, chars, best)
        padded_per_file = padded_grouped = 0
        offset = group_start = 0
        for f in files:
            n = len(f.texts)
            for start in range(offset, offset + n, best):
                end = min(start + best, offset + n)
                padded_per_file += padded_word_pieces(clipped[start:end], chars[start:end], end - start)
            offset += n
            if offset - group_start >= settings.embed_group or f is files[-1]:
                padded_grouped += padded_word_pieces(clipped[group_start:offset], chars[group_start:offset], best)
                group_start = offset
        padding = {"real": sum(clipped), "encode": padded_bare, "sync_index": padded_grouped,
                   "per_file": padded_per_file}
        print()
        print(f"Word-pieces the model ran over: {sum(clipped)} real; {padded_bare} for one `encode` call "
              f"(texts sorted by length, batch {best}); {padded_grouped} for `sync_index`'s batches, sorted "
              f"within groups of >= {settings.embed_group} texts (+{100 * (padded_grouped / padded_bare - 1):.1f} %; "
              f"file by file, as before, it was {padded_per_file}, +{100 * (padded_per_file / padded_bare - 1):.1f} %); "
              f"{last['stage_calls'].get('embed', 0)} model calls against {-(-len(texts) // best)}.")
        if batching:
            non_model = last["index_s"] - stages.get("embed", 0.0)
            estimate = batching["encode"] / (batching["proposed"] + non_model * batching["encode"] / last["encode_s"])
            print(f"Model time for the same {len(texts)} texts, batched three ways, alternated group by group "
                  f"(>= 512 chunks): as `sync_index` did before (per file) {batching['per_file']:.1f} s; proposed "
                  f"(groups of >= 512, ordered by word-pieces, batch {best}) {batching['proposed']:.1f} s; one "
                  f"`encode` call per group {batching['encode']:.1f} s. Per-file / encode = "
                  f"{batching['per_file'] / batching['encode']:.3f}; proposed / encode = "
                  f"{batching['proposed'] / batching['encode']:.3f}. With the other stages as measured above "
                  f"({non_model:.1f} s), the ratio would be about {estimate:.2f}.")
            batching["estimated_ratio"] = estimate
        save_results(
            "ingest",
            {
                "chunks": len(texts), "files": len(files), "mean_word_pieces": sum(tokens) / len(tokens),
                "sweep_chunks": len(sample), "sweep_chunks_per_s": sweep, "best_batch": best,
                "runs": runs, "padding": padding, "batching": batching, "ratio": ratio, "cpu_ratio": cpu_ratio, "profile": profile_text,
            },
            args.json,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
