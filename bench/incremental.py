"""Incremental update: one changed file among many, as a fraction of the full build.

    .venv/bin/python -m bench.incremental                 # 1,000 files, a few minutes
    .venv/bin/python -m bench.incremental --files 5000 --no-cli

Writes ``--files`` small generated Markdown notes (1-3 chunks each), builds the index from
scratch with ``sync_index`` and the real model (loaded and warm beforehand, as in a running
app), then times, in the same process: a run with nothing changed, one file edited (a
sentence appended), one file added, one file deleted. Each is checked against the report
(what was updated, how many chunks were embedded). The target is an edit in <= 2 % of the full
build. Unless ``--no-cli``, it also times ``python -m rag index`` in a new process after an edit
and with nothing to do, to show what a user waits for (Python start, imports, model load).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench._common import (
    TextGenerator,
    add_json_option,
    clock,
    instrument_indexing,
    load_embedder,
    machine,
    markdown_table,
    save_results,
    write_corpus,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000, help="files in the corpus (default 1000)")
    parser.add_argument("--no-cli", action="store_true", help="skip the `python -m rag index` runs")
    add_json_option(parser, "incremental")
    args = parser.parse_args(argv)

    from rag.config import Settings
    from rag.indexing import sync_index

    work = Path(tempfile.mkdtemp(prefix="rag-bench-incremental-"))
    try:
        embedder = load_embedder()
        gen = TextGenerator(1)
        settings = Settings(corpus_dir=work / "corpus", data_dir=work / "data")
        paths = write_corpus(settings.corpus_dir, [gen.short_markdown() for _ in range(args.files)])

        def source(path: Path) -> str:
            return path.relative_to(settings.corpus_dir).as_posix()

        results: dict[str, dict] = {}

        def run(name: str, *, expect: dict[str, object]) -> None:
            with instrument_indexing(embedder) as watch, clock() as spent:
                report = sync_index(settings, embedder, show_progress=False)
            for field, value in expect.items():
                got = getattr(report, field)
                if got != value:
                    raise SystemExit(f"{name}: expected {field}={value!r}, the report says {got!r}")
            results[name] = {
                "wall_s": spent["wall"], "cpu_s": spent["cpu"], "chunks_embedded": report.chunks_embedded,
                "chunks_total": report.chunks_total, "stages_s": dict(watch.seconds),
            }
            print(f"  {name}: {spent['wall']:.2f} s, {report.chunks_embedded} chunks embedded")

        print(f"{args.files} files; machine {machine()}")
        run("full build", expect={"skipped": ()})
        run("nothing changed", expect={"chunks_embedded": 0, "added": (), "updated": (), "removed": ()})
        edited = paths[len(paths) // 2]
        with open(edited, "a", encoding="utf-8") as fh:
            fh.write(gen.sentence() + "\n")
        run("one file edited", expect={"updated": (source(edited),), "added": (), "removed": ()})
        added = settings.corpus_dir / "part-0" / "new-note.md"
        added.write_text(gen.short_markdown(), encoding="utf-8")
        run("one file added", expect={"added": (source(added),), "updated": (), "removed": ()})
        deleted = paths[len(paths) // 3]
        deleted.unlink()
        run("one file deleted", expect={"removed": (source(deleted),), "chunks_embedded": 0})

        cli: dict[str, float] = {}
        if not args.no_cli:
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
            env.update(RAG_CORPUS_DIR=str(settings.corpus_dir), RAG_DATA_DIR=str(settings.data_dir),
                       HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            with open(paths[len(paths) // 4], "a", encoding="utf-8") as fh:
                fh.write(gen.sentence() + "\n")
            for name in ("CLI, one file edited", "CLI, nothing changed"):
                with clock() as spent:
                    done = subprocess.run([sys.executable, "-m", "rag", "index"], cwd=work, env=env,
                                          capture_output=True, text=True)
                if done.returncode != 0 or ("1 updated" in done.stdout) != (name == "CLI, one file edited"):
                    raise SystemExit(f"{name} failed:\n{done.stdout}\n{done.stderr}")
                cli[name] = spent["wall"]  # the child's CPU time is not ours: wall only
                print(f"  {name}: {spent['wall']:.2f} s")

        full = results["full build"]
        chunks = full["chunks_total"]
        print()
        print(f"Incremental update, {args.files} files, {chunks} chunks "
              f"({chunks / args.files:.1f} per file); load average {machine()['load_avg_1m']}")
        print()
        rows = []
        for name, r in results.items():
            rows.append([name, f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}", r["chunks_embedded"],
                         "" if name == "full build" else f"**{100 * r['wall_s'] / full['wall_s']:.2f} %**",
                         "" if name == "full build" else f"{100 * r['cpu_s'] / full['cpu_s']:.2f} %"])
        for name, wall in cli.items():
            rows.append([name + " (new process)", f"{wall:.2f}", "", "", f"{100 * wall / full['wall_s']:.2f} %", ""])
        print(markdown_table(["run", "wall s", "CPU s", "chunks embedded", "of full build (wall)",
                              "of full build (CPU)"], rows))
        print()
        edit = results["one file edited"]
        stages = sorted(edit["stages_s"].items(), key=lambda kv: -kv[1])
        print(f"Where the edit's {edit['wall_s']:.2f} s went: "
              + ", ".join(f"{k} {v:.3f} s" for k, v in stages if v >= 0.001))
        fraction = edit["wall_s"] / full["wall_s"]
        print(f"edit / full build = {100 * fraction:.2f} % (target <= 2 %): {'met' if fraction <= 0.02 else 'NOT met'}")
        save_results("incremental", {"files": args.files, "chunks": chunks, "runs": results, "cli_s": cli,
                                     "fraction": fraction}, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
