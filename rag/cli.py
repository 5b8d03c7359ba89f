"""``python -m rag``: the command line. The only place (with app.py) that prints for users.

Library errors (``RagError``) become one clear line on stderr and exit status 1; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rag.config import POLICIES, RETRIEVAL_MODES, Settings, load_settings
from rag.embedding import Embedder, embedder_for
from rag.errors import RagError
from rag.store import open_store
from rag.types import Hit, IndexReport

if TYPE_CHECKING:
    from rag.pipeline import AskOptions

Command = Callable[[argparse.Namespace, Settings], int]
_COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        _COMMANDS[name] = fn
        return fn

    return register


def make_embedder(settings: Settings) -> Embedder:
    return embedder_for(settings)


def format_report(report: IndexReport, settings: Settings) -> str:
    lines = []
    if report.rebuild_reason:
        lines.append(f"Rebuilt the whole index: {report.rebuild_reason}")
    lines.append(
        f"Indexed {settings.corpus_dir}: {len(report.added)} added, {len(report.updated)} updated, "
        f"{len(report.removed)} removed, {len(report.unchanged)} unchanged, {len(report.skipped)} skipped"
        + (f", {report.ignored} ignored (unsupported type)" if report.ignored else "")
    )
    lines.append(
        f"{report.chunks_embedded} chunks embedded, {report.chunks_total} in the index, "
        f"in {report.seconds:.1f} s"
    )
    for label, names in (("added", report.added), ("updated", report.updated), ("removed", report.removed)):
        for name in names:
            lines.append(f"  {label:8} {name}")
    for item in report.skipped:
        lines.append(f"  skipped  {item.source}: {item.reason}")
    for note in report.notes:
        lines.append(f"  note     {note}")
    return "\n".join(lines)


def format_hit(hit: Hit, *, width: int = 100) -> str:
    where = hit.chunk.source + (f", page {hit.chunk.page}" if hit.chunk.page else "")
    if hit.chunk.headings:
        where += " > " + " > ".join(hit.chunk.headings)
    snippet = " ".join(hit.chunk.text.split())
    snippet = textwrap.shorten(snippet, width=width * 2, placeholder=" …")
    body = textwrap.indent(textwrap.fill(snippet, width=width), "     ")
    return f"{hit.rank:>2}. [{hit.score:.4f} | sim {hit.similarity:.3f}] {where}\n{body}"


@command("index")
def cmd_index(args: argparse.Namespace, settings: Settings) -> int:
    from rag.indexing import sync_index

    if not settings.corpus_dir.is_dir():
        settings.corpus_dir.mkdir(parents=True)
        print(f"Created {settings.corpus_dir}/: put your PDF, Markdown, text and HTML files there.")
    report = sync_index(settings, make_embedder(settings), full=args.full, wait_for_lock=args.wait)
    print(format_report(report, settings))
    return 0


@command("search")
def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    from rag.indexing import index_params
    from rag.retrieval import Retriever

    embedder = make_embedder(settings)
    snapshot = open_store(settings).load(expected=index_params(settings, embedder))
    hits = Retriever(snapshot, embedder).search(
        args.query,
        k=args.k or settings.top_k,
        mode=args.mode or settings.retrieval_mode,
        min_similarity=args.min_similarity,
    )
    if not hits:
        print("No matching passages." + (" (try a lower --min-similarity)" if args.min_similarity else ""))
        return 0
    for hit in hits:
        print(format_hit(hit))
    return 0


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@command("status")
def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    store = open_store(settings)
    manifest = store.read_manifest()
    print(f"Corpus:          {settings.corpus_dir.resolve()}")
    print(f"Data directory:  {settings.data_dir.resolve()}")
    if manifest is None:
        print("Index:           none yet: run `python -m rag index`")
        return 0
    params = manifest["params"]
    updated = dt.datetime.fromtimestamp(manifest["updated_at"]).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"Files indexed:   {len(manifest['files'])}")
    print(f"Chunks:          {manifest['chunk_count']}")
    print(f"Embedding model: {params['embedding_model']} ({params['dimension']} dimensions)")
    print(f"Chunking:        {params['chunk_tokens']} tokens, {params['chunk_overlap']} overlap")
    print(f"Last update:     {updated} ({store.current_generation()})")
    print(f"Size on disk:    {_human_size(store.size_on_disk())}")
    skipped = manifest.get("skipped", [])
    if skipped:
        print(f"Skipped files:   {len(skipped)}")
        for item in skipped:
            print(f"  {item['source']}: {item['reason']}")
    if args.files:
        for source, rec in manifest["files"].items():
            print(f"  {source}  ({len(rec['chunk_ids'])} chunks)")
    return 0


@command("eval")
def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from rag.evaluation import evaluate_dataset, format_table

    result = evaluate_dataset(Path(args.dataset), settings, make_embedder(settings))
    print(
        f"{result.dataset}: {result.documents} documents ({result.chunks} chunks), "
        f"{result.queries} judged queries"
    )
    print(format_table(result))
    return 0


def _options(args: argparse.Namespace, settings: Settings) -> AskOptions:
    from rag.pipeline import AskOptions

    options = AskOptions.from_settings(settings)
    return options.updated(
        {"top_k": getattr(args, "k", None) or options.top_k, "mode": getattr(args, "mode", None) or options.mode,
         "min_relevance": options.min_relevance if getattr(args, "min_relevance", None) is None else args.min_relevance,
         "policy": getattr(args, "policy", None) or options.policy},
        [],
    )  # fmt: skip


@command("ask")
def cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    return asyncio.run(_ask(args, settings))


async def _ask(args: argparse.Namespace, settings: Settings) -> int:
    from contextlib import aclosing

    from rag.indexing import index_params
    from rag.pipeline import Retrieved, Started, ask
    from rag.prompting import default_token_counter
    from rag.routing import Router
    from rag.types import ChatDelta

    embedder = make_embedder(settings)
    snapshot = open_store(settings).load(expected=index_params(settings, embedder))
    router = Router(settings)
    reply = None
    try:
        events = ask(args.question, index=snapshot, embedder=embedder, router=router, options=_options(args, settings),
                     count=default_token_counter(), max_answer_tokens=settings.max_answer_tokens)  # fmt: skip
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Retrieved) and not event.retrieval.relevant:
                    found = event.retrieval
                    print(
                        f"Your documents don't seem to contain the answer: no passage reaches the relevance "
                        f"threshold ({found.min_relevance:.2f}, RAG_MIN_RELEVANCE). The closest passages:"
                    )
                    for hit in found.closest[:3]:
                        print(format_hit(hit))
                elif isinstance(event, Started):
                    reply = event.answer
                elif isinstance(event, ChatDelta):
                    print(event.text, end="", flush=True)
    finally:
        await router.aclose()
    if reply is None:
        return 0
    print()
    if reply.done is not None and reply.done.finish_reason == "repetition":
        print("(stopped: the model started repeating itself)")
    elif reply.done is not None and reply.done.finish_reason == "length":
        print(f"(cut off at {settings.max_answer_tokens} tokens: RAG_MAX_ANSWER_TOKENS)")
    cited = reply.citations()
    if cited:
        print("\nSources:")
    for number in cited:
        chunk = reply.hits[number - 1].chunk
        print(f"  [{number}] {chunk.source}" + (f", page {chunk.page}" if chunk.page else ""))
    route = reply.route
    assert route is not None
    print(f"\n— {route.model} ({route.endpoint}, {route.base_url}) · policy {route.policy}")
    if route.fallback:
        print(f"  fallback: {route.fallback}")
    return 0


# --- eval-answers (rag/answer_eval.py) ------------------------------------------------------


@command("eval-answers")
def cmd_eval_answers(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    return asyncio.run(_eval_answers(args, settings))


async def _eval_answers(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import dataclasses

    from tqdm import tqdm

    from rag.answer_eval import ask_one, format_summary, index_question_set, load_questions, summarise, write_records
    from rag.indexing import index_params
    from rag.pipeline import ask
    from rag.prompting import default_token_counter
    from rag.routing import Router

    dataset = Path(args.dataset)
    items = load_questions(dataset)
    if args.sample:  # evenly spaced over the set (it is ordered by article)
        items = [items[i * len(items) // args.sample] for i in range(min(args.sample, len(items)))]
    items = items[: args.limit] if args.limit else items
    embedder = make_embedder(settings)
    local = await asyncio.to_thread(index_question_set, dataset, settings, embedder)
    snapshot = open_store(local).load(expected=index_params(local, embedder))
    options = _options(args, settings)
    if args.model:
        options = dataclasses.replace(options, model=args.model)
    count = default_token_counter()
    router = Router(settings)
    records = []
    try:
        connection = await router.primary(options.policy)
        model = connection.pick(options.model)
        print(f"{dataset.name}: {len(items)} questions, {len(snapshot.files)} documents ({len(snapshot)} passages); "
              f"model {model} at {connection.base_url}, top-k {options.top_k}, {options.mode}")  # fmt: skip

        def bound(question: str):  # type: ignore[no-untyped-def]
            return ask(question, index=snapshot, embedder=embedder, router=router, options=options, count=count,
                       max_answer_tokens=settings.max_answer_tokens)  # fmt: skip

        with tqdm(items, unit="question", disable=args.quiet) as bar:
            for item in bar:
                record = await ask_one(item, bound)
                records.append(record)
                correct = sum(r.correct for r in records)
                bar.set_postfix_str(f"correct {correct}/{len(records)}")
    finally:
        await router.aclose()
    print(format_summary(summarise(records)))
    if args.json:
        write_records(records, Path(args.json))
        print(f"Wrote {args.json}")
    return 0


# --- compare (rag/compare.py) ---------------------------------------------------------------


@command("compare")
def cmd_compare(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    return asyncio.run(_compare(args, settings))


async def _compare(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import dataclasses

    from rag.compare import Target, load_questions, run_compare
    from rag.index import IndexStore
    from rag.indexing import index_params
    from rag.pipeline import ask
    from rag.prompting import default_token_counter
    from rag.report import write_report
    from rag.routing import Router

    questions = load_questions(Path(args.questions), limit=args.limit)
    embedder = make_embedder(settings)
    if Path(args.questions).is_dir():  # BEIR: answer from that dataset's own corpus
        from rag.evaluation import _dataset_key, build_eval_index
        from rag.metrics import load_beir

        corpus, _, _ = load_beir(Path(args.questions))
        store = IndexStore(settings.data_dir / "eval" / f"{Path(args.questions).name}-{_dataset_key(Path(args.questions))}")
        snapshot = build_eval_index(corpus, settings, embedder, store)
    else:
        snapshot = open_store(settings).load(expected=index_params(settings, embedder))
    options = _options(args, settings)
    count = default_token_counter()
    router = Router(settings)
    try:
        names = [n.strip() for n in args.endpoints.split(",")] if args.endpoints else [s.name for s in router.specs]
        models = [m.strip() for m in args.models.split(",")] if args.models else []
        specs = [router.spec(name) for name in names]
        targets = [
            Target(f"{spec.name}:{model}" if len(specs) > 1 else model or spec.label(), spec, model)
            for spec in specs
            for model in (models or [spec.model])
        ]
        if len(targets) < 2:
            print("note: only one endpoint/model to compare: name more with --endpoints or --models")

        def ask_target(question: str, target: Target):  # type: ignore[no-untyped-def]
            return ask(question, index=snapshot, embedder=embedder, router=router,
                       options=dataclasses.replace(options, model=target.model), count=count,
                       max_answer_tokens=settings.max_answer_tokens, candidates=[target.spec])  # fmt: skip

        def progress(run):  # type: ignore[no-untyped-def]
            status = f"error: {run.error[:80]}" if run.error else f"{run.total:.1f} s, {len(run.text)} chars"
            print(f"  {run.target:<28} {run.question.text[:50]:<50} {status}", flush=True)

        result = await run_compare(questions, targets, ask_target, count=count, on_run=progress)
    finally:
        await router.aclose()
    result.notes.append(f"policy {options.policy}; top-k {options.top_k}; max answer tokens "
                        f"{settings.max_answer_tokens}; temperature {options.temperature}")  # fmt: skip
    md, page = await asyncio.to_thread(write_report, result, Path(args.out))
    print(f"Wrote {md} and {page}")
    return 0


@command("serve")
def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    from rag.server import serve

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the rag: models' own requests to this server
    serve(settings.replace(model=args.model or settings.model), host=args.host, port=args.port,
          model_dirs=args.model_dir, documents=not args.no_documents)  # fmt: skip
    return 0


@command("model")
def cmd_model(args: argparse.Namespace, settings: Settings) -> int:
    from rag.modelbuild import DEFAULT_MODEL, build_model, is_built

    if args.action == "needed":
        # For `make run`: exit 0 when the offline model must be built (no endpoint configured).
        return 0 if not settings.base_url and not is_built(settings.models_dir / (settings.model or DEFAULT_MODEL)) else 1
    if args.action == "list":
        found = sorted(d.name for d in settings.models_dir.glob("*") if is_built(d)) if settings.models_dir.is_dir() else []
        print("\n".join(found) if found else "no model built yet: run `python -m rag model build`")
        return 0
    started = time.perf_counter()
    for name in args.names or [DEFAULT_MODEL]:
        path = build_model(name, settings.models_dir, force=args.force)
        print(f"{name}: {path} ready ({time.perf_counter() - started:.0f} s)")
    return 0


@command("users")
def cmd_users(args: argparse.Namespace, settings: Settings) -> int:
    import getpass

    from rag.access import user_store
    from rag.users import read_new_password

    store = user_store(settings)
    if args.action == "list":
        users = store.list()
        for user in users:
            print(f"{user.name:<24} {user.role:<7} added {user.created}")
        if not users:
            print(f"no users in {store.path}: add one with `python -m rag users add NAME --role admin`")
        return 0
    if not args.name:
        print(f"error: `users {args.action}` needs a user name", file=sys.stderr)
        return 2
    if args.action == "remove":
        store.remove(args.name)
        print(f"Removed {args.name} from {store.path}")
        return 0
    password = read_new_password(
        from_stdin=args.password_stdin, stdin=sys.stdin, prompt=getpass.getpass, interactive=sys.stdin.isatty()
    )
    user = store.add(args.name, password, role=args.role, replace=args.replace)
    print(f"{'Updated' if args.replace else 'Added'} {user.name} ({user.role}) in {store.path}")
    if settings.auth != "password":
        print("Sign-in is off: start the app with RAG_AUTH=password to require it.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rag", description="Chat with your documents, locally.")
    parser.add_argument("--corpus", type=Path, help="documents folder (RAG_CORPUS_DIR, default docs_corpus)")
    parser.add_argument("--data-dir", type=Path, help="index and models folder (RAG_DATA_DIR, default .rag)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="index new and changed files of the corpus folder")
    p.add_argument("--full", action="store_true", help="rebuild everything from scratch")
    p.add_argument("--wait", action="store_true", help="wait for another running indexer instead of failing")

    p = sub.add_parser("search", help="print the passages that best match a question")
    p.add_argument("query")
    p.add_argument("-k", type=int, help="how many passages (RAG_TOP_K, default 5)")
    p.add_argument("--mode", choices=RETRIEVAL_MODES, help="retrieval mode (RAG_RETRIEVAL_MODE, default hybrid)")
    p.add_argument("--min-similarity", type=float, help="drop passages below this cosine similarity")

    p = sub.add_parser("ask", help="answer a question from your documents, with citations")
    p.add_argument("question")
    p.add_argument("-k", type=int, help="passages to retrieve (RAG_TOP_K)")
    p.add_argument("--mode", choices=RETRIEVAL_MODES, help="retrieval mode (RAG_RETRIEVAL_MODE)")
    p.add_argument("--min-relevance", type=float, help="relevance threshold (RAG_MIN_RELEVANCE)")
    p.add_argument("--policy", choices=POLICIES, help="which endpoints may answer (RAG_POLICY, default local-only)")

    p = sub.add_parser("compare", help="ask several endpoints/models the same questions; write a report")
    p.add_argument("--questions", required=True, help="JSONL ({question, expected, relevant}), text, or a BEIR folder")
    p.add_argument("--out", required=True, help="folder for report.md and report.html")
    p.add_argument("--endpoints", help="names from endpoints.toml, comma-separated (default: all)")
    p.add_argument("--models", help="models to ask at each endpoint, comma-separated (default: its model)")
    p.add_argument("--policy", choices=POLICIES, help="local-only (default) refuses non-local endpoints")
    p.add_argument("--limit", type=int, help="ask only the first N questions")
    p.add_argument("-k", type=int, help="passages to retrieve (RAG_TOP_K)")

    p = sub.add_parser("eval-answers", help="answer a question set end to end and score the replies")
    p.add_argument("dataset", help="folder with docs/ and questions.jsonl (question, answers, source)")
    p.add_argument("--model", help="the model to ask (default: the endpoint's own)")
    p.add_argument("--limit", type=int, help="ask only the first N questions")
    p.add_argument("--sample", type=int, help="ask N questions spread evenly over the set")
    p.add_argument("-k", type=int, help="passages to retrieve (RAG_TOP_K)")
    p.add_argument("--policy", choices=POLICIES, help="which endpoints may answer (RAG_POLICY)")
    p.add_argument("--json", help="write one JSON record per question to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("status", help="what is indexed")
    p.add_argument("--files", action="store_true", help="list every indexed file")

    p = sub.add_parser("serve", help="serve the local models, and rag:<model> answering from your documents, "
                                     "over an OpenAI-compatible API")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port and prints it")
    p.add_argument("--model-dir", action="append", help="an ONNX GenAI model folder (default: every built model)")
    p.add_argument("--model", help="the model to list first: a built model's name (RAG_MODEL)")
    p.add_argument("--no-documents", action="store_true",
                   help="serve the bare models only, without the rag:<model> models that answer from your "
                        "documents (the app starts it so: it serves those itself)")  # fmt: skip

    p = sub.add_parser("model", help="build the offline chat models")
    p.add_argument("action", choices=("build", "list", "needed"))
    p.add_argument(
        "names", nargs="*", help="qwen2.5-coder-0.5b (default), qwen2.5-coder-1.5b, smollm2-135m, gemma3-270m"
    )
    p.add_argument("--force", action="store_true", help="rebuild even when already built")

    p = sub.add_parser("users", help="who may sign in to the app (RAG_AUTH=password): add, remove, list")
    p.add_argument("action", choices=("add", "remove", "list"))
    p.add_argument("name", nargs="?", help="user name (add, remove)")
    p.add_argument("--role", choices=("admin", "reader"), default="reader",
                   help="admin: may add documents and change shared settings; reader (default): asks questions")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    p.add_argument("--replace", action="store_true", help="add: set a new password and role for an existing user")

    p = sub.add_parser("eval", help="evaluate retrieval on a BEIR-format dataset")
    p.add_argument("dataset", help="folder with corpus.jsonl, queries.jsonl, qrels/test.tsv")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(corpus_dir=args.corpus, data_dir=args.data_dir)
        return _COMMANDS[args.command](args, settings)
    except RagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
