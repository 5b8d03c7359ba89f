"""Chat latency in the browser: pressing Enter to the first answer token, minus the endpoint's own
time to first token for the same request, with 10k indexed chunks.

    .venv/bin/python -m bench.chat_latency                  # scripted endpoint, ~3 min on 2 cores
    .venv/bin/python -m bench.chat_latency --real 5         # + 5 questions to `rag serve` (smollm2-135m)
    .venv/bin/python -m bench.chat_latency --chats 20 --ttft 0.3 --json
    .venv/bin/python -m bench.chat_latency --pause 200         # typed: Enter 200 ms after the last key

What runs:

- The index: ``--chunks`` synthetic chunks (generated prose from ``bench._common.TextGenerator``,
  vectors shaped like real ones by ``synthetic_vectors``: embedding 10k chunks with the real model
  takes too long on two cores) committed with ``IndexStore.commit`` into the app's data folder,
  with matching files in its corpus folder so the app's start-up sync sees them as unchanged; plus
  the sample corpus (``docs_corpus/``), which the app indexes for real at start-up and which the
  questions are about (so they pass the relevance gate). Query embeddings are always real.
- The app: ``chainlit run app.py --headless`` (as tests/test_e2e.py starts it) in a subprocess
  whose pipeline functions are wrapped to log monotonic timestamps (``--serve-app`` below):
  socket message received, retrieval (and its query embedding), prompt building, the HTTP
  request to the endpoint, its first delta, the first ``stream_token`` sent to the browser.
- The endpoint: an OpenAI-compatible server in this process. Scripted: it waits ``--ttft`` seconds,
  then streams; the rewrite (non-streamed) answers after ``--rewrite-delay``. With ``--real``, the
  same server forwards to ``python -m rag serve`` (the embedded runtime) and times the upstream's
  first non-empty token instead. Either way it logs when it received each request and when it
  sent the first token: the endpoint's own TTFT for that very request.
- The browser: Debian's Chromium through Playwright. A capture-phase ``keydown`` listener records
  Enter's ``event.timeStamp``; a ``MutationObserver`` records ``performance.now()`` when the new
  assistant message first contains the first token (a marker word the endpoint sends first).
  A wrapped ``WebSocket`` stamps the frame that carries the question out and the one that
  brings the first token in; with the browser's ``timeOrigin`` against the app's wall clock,
  the browser's share splits into the page's own work and the socket
  (``page:enter->send``, ``wire:send->app``, ``wire:app->frame``, ``page:frame->token``).

How the question is sent: by default it is put in the box (``fill``) and Enter pressed at once, so
nothing can start before Enter; with ``--pause MS`` its last character is typed as a key and Enter
pressed MS later, as a person does. ``--tabs one`` runs every chat in one page ("New chat" between them) instead of a fresh
browser context each, whose page code has never run.

Overhead = (first token in the page - Enter) - endpoint TTFT, per question; medians reported.
The first question of each chat has no history, so no rewrite; the follow-up in the same chat is
rewritten (one non-streamed request first), reported separately. Each chat is a fresh tab.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.apphost import AppProcess

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]  # fmt: skip
MARK = "Zyxwvu"  # the first answer token, looked for in the page
MODEL = "bench-model"
TRACE_ENV = "RAG_BENCH_TRACE"

# (first question, follow-up, what the scripted rewrite returns): all about the sample corpus.
QUESTIONS = [
    ("How long does light from the Sun take to reach Earth?", "and what about Mars?",
     "How long does light from the Sun take to reach Mars?"),
    ("What should I do when the compost pile smells of ammonia?", "and when it is too dry?",
     "What should I do when the compost pile is too dry?"),
    ("What does the First Amendment protect?", "and the Second?", "What does the Second Amendment protect?"),
    ("How do I add my own documents to this app?", "and how do I search them from the command line?",
     "How do I search my documents from the command line?"),
    ("What is the preamble of the Constitution about?", "who wrote it?", "Who wrote the preamble of the Constitution?"),
    ("How far is Jupiter from the Sun?", "and Saturn?", "How far is Saturn from the Sun?"),
]  # fmt: skip


# ============================================================================================
# The instrumented app (runs in the app's subprocess)
# ============================================================================================


class Trace:
    """Appends ``{"ev", "t" (monotonic), "wall", ...}`` JSON lines to a file, thread-safely."""

    def __init__(self, path: str) -> None:
        self.fh = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
        self.lock = threading.Lock()

    def __call__(self, ev: str, **fields: Any) -> None:
        line = json.dumps({"ev": ev, "t": time.monotonic(), "wall": time.time(), **fields})
        with self.lock:
            self.fh.write(line + "\n")


def _wrap_sync(owner: Any, name: str, trace: Trace, label: str, info: Callable[..., dict] | None = None) -> None:
    original = getattr(owner, name, None)
    if original is None:  # a checkout with another layout (a baseline): that stage is not traced
        return

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        trace(label + ":start", **(info(*args, **kwargs) if info else {}))
        cpu = time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            trace(label + ":end", cpu=time.thread_time() - cpu)  # this thread's CPU time in the call

    setattr(owner, name, wrapped)


def install_trace(path: str) -> None:
    """Wrap the app's stages to log timestamps; must run before chainlit loads app.py (which
    imports these names from their modules)."""
    import chainlit.message
    import chainlit.socket
    import watchfiles

    import rag.chat
    import rag.embedding
    import rag.index
    import rag.indexing
    import rag.pipeline

    try:  # this layout: the router starts each candidate's answer (rag.answering.start_answer)
        import rag.routing as answering_owner
    except ImportError:
        answering_owner = None

    trace = Trace(path)

    process_message = chainlit.socket.process_message

    async def traced_process_message(session: Any, payload: Any) -> Any:
        trace("recv")
        return await process_message(session, payload)

    chainlit.socket.process_message = traced_process_message

    _wrap_sync(rag.pipeline, "retrieve", trace, "retrieve")
    _wrap_sync(rag.pipeline, "answer", trace, "prompt")  # a baseline's layout
    if answering_owner is not None:
        _wrap_sync(answering_owner, "start_answer", trace, "prompt")
    _wrap_sync(rag.embedding.SentenceTransformerEmbedder, "embed_query", trace, "embed_query")
    _wrap_sync(rag.indexing, "sync_index", trace, "sync_index")
    _wrap_sync(rag.indexing, "load_bytes", trace, "parse", lambda source, data: {"source": source})
    _wrap_sync(rag.indexing, "split_documents", trace, "chunk")
    _wrap_sync(rag.index.IndexStore, "commit", trace, "commit", lambda self, snap, **_: {"chunks": len(snap)})
    _wrap_sync(rag.index.IndexStore, "load", trace, "load")
    _wrap_sync(rag.index.Snapshot, "update_ann", trace, "update_ann")
    _wrap_sync(rag.embedding.Embedder, "embed", trace, "embed", lambda self, texts, **_: {"n": len(texts)})

    # The follow-up's rewrite: Router.rewrite here, pipeline.rewrite_question in a baseline.
    owner, name = ((answering_owner.Router, "rewrite") if answering_owner is not None and hasattr(answering_owner, "Router")
                   else (rag.pipeline, "rewrite_question"))  # fmt: skip
    rewrite = getattr(owner, name, None)

    async def traced_rewrite(*args: Any, **kwargs: Any) -> str:
        trace("rewrite:start")
        try:
            return await rewrite(*args, **kwargs)  # type: ignore[misc]
        finally:
            trace("rewrite:end")

    if rewrite is not None:
        setattr(owner, name, traced_rewrite)

    stream = rag.chat.ChatClient.stream

    async def traced_stream(self: Any, *args: Any, **kwargs: Any) -> Any:
        trace("request")
        first = True
        async for event in stream(self, *args, **kwargs):
            if first and isinstance(event, rag.chat.ChatDelta):
                trace("first_delta")
                first = False
            yield event

    rag.chat.ChatClient.stream = traced_stream

    stream_token = chainlit.message.MessageBase.stream_token

    async def traced_stream_token(self: Any, token: str, is_sequence: bool = False) -> None:
        # The answer's first token: it replaces the placeholder the message was drawn with
        # (sent or streamed, as the app has done it), the first call with is_sequence=True.
        first = bool(token) and is_sequence and not getattr(self, "_bench_streamed", False)
        if first:
            self._bench_streamed = True
            trace("stream_token:start")
        await stream_token(self, token, is_sequence)
        if first:
            trace("stream_token:end")

    chainlit.message.MessageBase.stream_token = traced_stream_token

    send = chainlit.message.Message.send

    async def traced_send(self: Any) -> Any:
        notice = self.author == "Index" and str(self.content).startswith("Documents updated")
        if notice:
            trace("notice:start", content=str(self.content)[:200])
        try:
            return await send(self)
        finally:
            if notice:
                trace("notice:end")

    chainlit.message.Message.send = traced_send

    awatch = watchfiles.awatch

    async def traced_awatch(*args: Any, **kwargs: Any) -> Any:
        async for changes in awatch(*args, **kwargs):
            trace("watch", changes=sorted(str(p) for _, p in changes)[:5])
            yield changes

    watchfiles.awatch = traced_awatch


def serve_app(port: int) -> None:
    """``chainlit run app.py --headless`` with the trace installed (``--serve-app``)."""
    install_trace(os.environ[TRACE_ENV])
    from chainlit.cli import cli

    sys.argv = ["chainlit", "run", str(REPO / "app.py"), "--headless", "--host", "127.0.0.1", "--port", str(port)]
    cli()


class App(AppProcess):
    """The app (``tests/apphost.py``) with its pipeline instrumented: started through
    ``--serve-app`` below, writing its trace to ``work/trace.jsonl``. The corpus is the caller's.
    ``checkout``: another checkout of this repository whose app (and ``--serve-app``) runs instead,
    the baseline of a side-by-side comparison."""

    def __init__(self, work: Path, env: dict[str, str], *, checkout: Path | None = None) -> None:
        self.trace_path = work / "trace.jsonl"
        self.checkout = checkout
        if checkout is not None:
            env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}
        # A baseline runs with its own Chainlit configuration, page text, styles and script.
        super().__init__(work, {TRACE_ENV: str(self.trace_path), **env}, seed_corpus=False,
                         checkout=checkout or REPO)  # fmt: skip

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.chat_latency", "--serve-app", str(self.port)]

    def trace_offset(self) -> int:
        return self.trace_path.stat().st_size if self.trace_path.exists() else 0

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        with open(self.trace_path, "rb") as fh:
            fh.seek(since)
            return [json.loads(line) for line in fh.read().decode("utf-8").splitlines() if line.strip()]


# ============================================================================================
# The endpoint: scripted, or a timing pass-through to `rag serve`
# ============================================================================================


class Endpoint:
    """OpenAI-compatible; logs ``recv`` and ``first`` (monotonic) for every chat request.

    ``upstream`` None: scripted (``ttft`` seconds, then ``MARK`` and a few words; the rewrite
    answers after ``rewrite_delay`` with ``rewrites[question]``). Else forwards to ``upstream``
    (``rag serve``), prepending ``MARK`` to the first non-empty token, and times that token.
    """

    def __init__(self, *, ttft: float, rewrite_delay: float, rewrites: dict[str, str],
                 context_length: int = 4096) -> None:  # fmt: skip
        self.ttft = ttft
        self.rewrite_delay = rewrite_delay
        self.rewrites = rewrites
        self.context_length = context_length
        self.upstream: tuple[str, int, str] | None = None  # host, port, model id
        self.log: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        bench = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as rag serve, Foundry Local (Kestrel) and uvicorn do

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                if urlsplit(self.path).path.rstrip("/") in ("/v1/models", "/models"):
                    cards = [{"id": MODEL, "object": "model", "context_length": bench.context_length}]
                    self._json({"object": "list", "data": cards})
                else:
                    self._json({"error": {"message": "not found"}}, status=404)

            def do_POST(self) -> None:  # noqa: N802
                recv = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                entry: dict[str, Any] = {"recv": recv, "stream": bool(body.get("stream")),
                                         "prompt_chars": sum(len(m["content"]) for m in body["messages"]),
                                         "user": body["messages"][-1]["content"]}  # fmt: skip
                with bench.lock:
                    bench.log.append(entry)
                if bench.upstream is not None:
                    self._forward(body, entry)
                elif not body.get("stream"):
                    user = body["messages"][-1]["content"]
                    last = user.split("Last question:", 1)[-1].split("\n\n", 1)[0].strip()
                    time.sleep(bench.rewrite_delay)
                    content = bench.rewrites.get(last, last)
                    self._json({"model": body["model"], "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": content}}]})  # fmt: skip
                    entry["first"] = time.monotonic()
                else:
                    time.sleep(bench.ttft)
                    self._start_stream()
                    self._event({"choices": [{"index": 0, "delta": {"content": MARK + " "}}]})
                    entry["first"] = time.monotonic()
                    for word in "the passages say so [1].".split():
                        time.sleep(0.005)
                        self._event({"choices": [{"index": 0, "delta": {"content": word + " "}}]})
                    self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                    self._end_stream()

            def _forward(self, body: dict[str, Any], entry: dict[str, Any]) -> None:
                host, port, model = bench.upstream  # type: ignore[misc]
                body = {**body, "model": model}
                conn = http.client.HTTPConnection(host, port, timeout=300)
                raw = json.dumps(body).encode()
                conn.request("POST", "/v1/chat/completions", raw, {"content-type": "application/json"})
                response = conn.getresponse()
                if not body.get("stream"):
                    data = response.read()
                    entry["first"] = time.monotonic()
                    self._raw(response.status, data, response.getheader("content-type") or "application/json")
                    conn.close()
                    return
                self._start_stream()
                marked = False
                try:
                    while True:
                        line = response.fp.readline()
                        if not line:
                            break
                        if line.startswith(b"data: {") and not marked:
                            event = json.loads(line[6:])
                            choices = event.get("choices") or [{}]
                            text = (choices[0].get("delta") or {}).get("content")
                            if text:
                                choices[0]["delta"]["content"] = MARK + " " + text
                                line = b"data: " + json.dumps(event).encode() + b"\n"
                                marked = True
                                self._chunk(line)
                                entry["first"] = time.monotonic()
                                continue
                        self._chunk(line)
                    self._end_stream(done=False)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    conn.close()

            def _json(self, data: Any, status: int = 200) -> None:
                self._raw(status, json.dumps(data).encode(), "application/json")

            def _raw(self, status: int, raw: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _start_stream(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                self.close_connection = True

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _event(self, data: dict[str, Any]) -> None:
                self._chunk(f"data: {json.dumps({'model': MODEL, **data})}\n\n".encode())

            def _end_stream(self, done: bool = True) -> None:
                if done:
                    self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def entries(self, since: int) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.log[since:])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ============================================================================================
# The 10k-chunk index, committed before the app starts
# ============================================================================================


def build_index(corpus: Path, data: Path, n_chunks: int, *, base: int, per_file: int = 8, seed: int = 3) -> dict:
    """Commit ``n_chunks`` synthetic chunks (real-looking vectors, generated prose) into
    ``data/index`` with matching files under ``corpus/synthetic/`` (so the app's sync keeps
    them), and copy the sample corpus beside them (the app embeds it for real)."""
    from bench._common import TextGenerator, load_embedder, real_base_vectors, synthetic_vectors
    from rag.chunking import chunk_id
    from rag.config import load_settings
    from rag.index import FileRecord, IndexStore, Snapshot
    from rag.indexing import index_params
    from rag.types import Chunk

    started = time.perf_counter()
    embedder = load_embedder()
    settings = load_settings(environ={}, dotenv=None, corpus_dir=corpus, data_dir=data)
    params = index_params(settings, embedder)
    base_vectors, _ = real_base_vectors(embedder, base)
    vectors = synthetic_vectors(base_vectors, n_chunks, seed=seed)
    gen = TextGenerator(seed)
    texts = [gen.chunk_text() for _ in range(n_chunks)]
    snapshot = Snapshot(params=params)
    for f, start in enumerate(range(0, n_chunks, per_file)):
        source = f"synthetic/part-{f % 10}/doc-{f:05d}.md"
        title = f"Synthetic document {f}"
        chunks, offset, parts = [], 0, []
        for text in texts[start : start + per_file]:
            chunks.append(Chunk(id=chunk_id(source, None, offset, text), source=source, text=text, start=offset,
                                end=offset + len(text), headings=(title,), title=title))  # fmt: skip
            parts.append(text)
            offset += len(text) + 2
        path = corpus / source
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(parts), encoding="utf-8")
        stat = path.stat()
        record = FileRecord(source, hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_size, stat.st_mtime_ns,
                            tuple(c.id for c in chunks))  # fmt: skip
        snapshot.put_file(record, chunks, vectors[start : start + per_file], texts[start : start + per_file])
    snapshot.update_ann(settings.ann_threshold)
    store = IndexStore(settings.index_dir)
    with store.lock():
        store.commit(snapshot)
    for item in (REPO / "docs_corpus").iterdir():
        if item.is_file() and not item.name.startswith("."):
            shutil.copy(item, corpus / item.name)
    return {"chunks": len(snapshot), "files": len(snapshot.files), "seconds": time.perf_counter() - started}


def build_index_in(checkout: Path, corpus: Path, data: Path, n_chunks: int, base: int) -> None:
    """``build_index`` as another checkout's code does it (the same seed: the same chunks)."""
    code = ("import sys; from pathlib import Path; from bench.chat_latency import build_index; "
            "build_index(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), base=int(sys.argv[4]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", code, str(corpus), str(data), str(n_chunks), str(base)],
                   cwd=checkout, env=env, check=True)  # fmt: skip


# ============================================================================================
# The browser side
# ============================================================================================

ARM_JS = """([mark]) => {
  const before = document.querySelectorAll('[data-step-type="assistant_message"]').length;
  const b = window.__bench = {enter: null, first: null, paint: null, before, origin: performance.timeOrigin,
                             mark, sent: null, frame: null};
  if (!window.__benchKey) {
    window.__benchKey = true;
    document.addEventListener('keydown', e => {
      if (e.key === 'Enter' && window.__bench && window.__bench.enter === null) window.__bench.enter = e.timeStamp;
    }, {capture: true});
    document.addEventListener('click', e => {  // a starter question, clicked, is sent at once
      const starter = e.target.closest && e.target.closest('#starters button');
      if (starter && window.__bench && window.__bench.enter === null) window.__bench.enter = e.timeStamp;
    }, {capture: true});
  }
  const obs = new MutationObserver(() => {
    if (b.first !== null) return;
    const ms = document.querySelectorAll('[data-step-type="assistant_message"]');
    for (let i = before; i < ms.length; i++) {
      if (ms[i].textContent.includes(mark)) {
        b.first = performance.now();
        requestAnimationFrame(() => { b.paint = performance.now(); });
        obs.disconnect();
        return;
      }
    }
  });
  obs.observe(document.body, {childList: true, subtree: true, characterData: true});
}"""

# Installed before the page's scripts: stamps the socket frames that carry the question (sent) and
# the first answer token (received), so the browser's share splits into its own work and the wire.
WS_JS = """(() => {
  const Native = window.WebSocket;
  window.WebSocket = function (...args) {
    const ws = new Native(...args);
    ws.addEventListener('message', e => {
      const b = window.__bench;
      if (b && b.frame === null && typeof e.data === 'string' && b.mark && e.data.includes(b.mark)) b.frame = performance.now();
    });
    const send = ws.send.bind(ws);
    ws.send = data => {
      const b = window.__bench;
      if (b && b.sent === null && b.enter !== null && typeof data === 'string' && data.includes('"message"')) b.sent = performance.now();
      return send(data);
    };
    return ws;
  };
  window.WebSocket.prototype = Native.prototype;
  Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
})();"""

DONE_JS = """() => {
  const b = window.__bench;
  const n = document.querySelectorAll('[data-step-type="assistant_message"]').length;
  return n > b.before && !document.querySelector('#stop-button') && (b.first === null || b.paint !== null);
}"""


class Tab:
    def __init__(self, browser: Any, url: str, *, timeout_ms: float = 300_000) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.context.add_init_script(WS_JS)
        self.page = self.context.new_page()
        self.page.set_default_timeout(timeout_ms)
        with self.page.expect_websocket():
            self.page.goto(url)
        self.page.wait_for_selector("#chat-input")

    def welcome(self, timeout_ms: float = 300_000) -> None:
        self.page.get_by_text("Ask about your documents", exact=False).first.wait_for(timeout=timeout_ms)

    def ask(self, question: str, *, pause_ms: float = 0, timeout_ms: float = 120_000) -> dict[str, Any]:
        """Put ``question`` in the box, arm the observers, press Enter, wait for the whole answer.
        ``pause_ms`` 0: Enter follows at once (a pasted question); else the last character is
        typed as a key and Enter pressed ``pause_ms`` later (a typist's next key)."""
        if pause_ms:
            self.page.fill("#chat-input", question[:-1])
            self.page.type("#chat-input", question[-1])
        else:
            self.page.fill("#chat-input", question)
        self.page.evaluate(ARM_JS, [MARK])
        if pause_ms:
            self.page.wait_for_timeout(pause_ms)
        self.page.press("#chat-input", "Enter")
        self.page.wait_for_function(DONE_JS, timeout=timeout_ms, polling=100)
        return dict(self.page.evaluate("() => window.__bench"))

    def click_starter(self, index: int, *, timeout_ms: float = 120_000) -> dict[str, Any]:
        """Click the page's ``index``-th starter question (its time stands for Enter's)."""
        button = self.page.locator("#starters button").nth(index)
        button.wait_for()
        self.page.evaluate(ARM_JS, [MARK])
        button.click()
        self.page.wait_for_function(DONE_JS, timeout=timeout_ms, polling=100)
        return dict(self.page.evaluate("() => window.__bench"))

    def new_chat(self) -> None:
        """Chainlit's "New chat" (the page stays loaded: its code already ran once)."""
        before = self.page.evaluate("() => document.querySelectorAll('[data-step-type=\"assistant_message\"]').length")
        self.page.click("#new-chat-button")
        self.page.click("#new-chat-dialog #confirm")
        self.page.wait_for_function(
            "([n]) => document.querySelectorAll('[data-step-type=\"assistant_message\"]').length < n || n === 0",
            arg=[before])
        self.welcome()

    def close(self) -> None:
        self.context.close()


class ReusedTab:
    """One page for every chat: each chat after the first starts with "New chat"."""

    def __init__(self, make: Callable[[], Tab]) -> None:
        self._make = make
        self.tab: Tab | None = None

    def __call__(self) -> "ReusedTab":
        if self.tab is None:
            self.tab = self._make()
        else:
            self.tab.new_chat()
        return self

    def welcome(self) -> None:
        assert self.tab is not None
        self.tab.welcome()

    def ask(self, question: str, *, pause_ms: float = 0) -> dict[str, Any]:
        assert self.tab is not None
        return self.tab.ask(question, pause_ms=pause_ms)

    def click_starter(self, index: int) -> dict[str, Any]:
        assert self.tab is not None
        return self.tab.click_starter(index)

    def close(self) -> None:  # the page stays for the next chat (closed with the browser)
        pass


# ============================================================================================
# Putting the timestamps together
# ============================================================================================


def _first(events: list[dict[str, Any]], name: str, after: float = 0.0, field: str = "t") -> float | None:
    """``field`` of the first ``name`` event at or after monotonic ``after`` (None: no such event or field)."""
    return next((e.get(field) for e in events if e["ev"] == name and e["t"] >= after), None)


def analyse(browser: dict[str, Any], events: list[dict[str, Any]], calls: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One question's numbers in ms, or None when the model was not asked (gate) or a stamp is missing."""
    chats = [c for c in calls if c["stream"] and "first" in c]
    if browser.get("first") is None or browser.get("enter") is None or not chats:
        return None
    chat = chats[0]
    total = browser["first"] - browser["enter"]
    ep_ttft = (chat["first"] - chat["recv"]) * 1000
    row: dict[str, Any] = {"total": total, "paint": (browser["paint"] or browser["first"]) - browser["enter"],
                           "endpoint_ttft": ep_ttft, "overhead": total - ep_ttft,
                           "prompt_chars": chat["prompt_chars"]}  # fmt: skip
    recv = _first(events, "recv")
    stamps = {name: _first(events, name) for name in ("rewrite:start", "rewrite:end", "retrieve:start",
              "embed_query:start", "embed_query:end", "retrieve:end", "prompt:start", "prompt:end", "request",
              "first_delta", "stream_token:start", "stream_token:end")}  # fmt: skip
    if recv is None or any(stamps[k] is None for k in ("retrieve:start", "retrieve:end", "request", "first_delta",
                                                       "stream_token:end")):  # fmt: skip
        return row
    ms = lambda a, b: (b - a) * 1000  # noqa: E731
    rewrites = [c for c in calls if not c["stream"] and "first" in c]
    if stamps["rewrite:start"] is not None and stamps["rewrite:end"] is not None:
        row["rewrite_total"] = ms(stamps["rewrite:start"], stamps["rewrite:end"])
        row["rewrite_endpoint"] = (rewrites[0]["first"] - rewrites[0]["recv"]) * 1000 if rewrites else 0.0
        row["overhead_without_rewrite"] = row["overhead"] - row["rewrite_total"]  # the target's measure
        row["dispatch"] = ms(recv, stamps["rewrite:start"]) + ms(stamps["rewrite:end"], stamps["retrieve:start"])
    else:
        row["dispatch"] = ms(recv, stamps["retrieve:start"])
    row["retrieve"] = ms(stamps["retrieve:start"], stamps["retrieve:end"])
    if stamps["embed_query:start"] is not None and stamps["embed_query:end"] is not None:
        row["embed_query"] = ms(stamps["embed_query:start"], stamps["embed_query:end"])
        cpu = _first(events, "embed_query:end", field="cpu")
        if cpu is not None:  # (a baseline's older trace has no CPU times)
            row["embed_query cpu"] = 1000 * cpu
    if stamps["prompt:start"] is not None and stamps["prompt:end"] is not None:
        row["prompt"] = ms(stamps["prompt:start"], stamps["prompt:end"])
    row["retrieval_step+prompt"] = ms(stamps["retrieve:end"], stamps["request"])
    row["http_to_endpoint"] = ms(stamps["request"], chat["recv"])
    row["sse_read"] = ms(chat["first"], stamps["first_delta"])
    row["emit_token"] = ms(stamps["first_delta"], stamps["stream_token:end"])
    server = ms(recv, stamps["stream_token:end"]) - ep_ttft - row.get("rewrite_endpoint", 0.0)
    row["server_side"] = server
    row["socket+render"] = total - ep_ttft - row.get("rewrite_endpoint", 0.0) - server
    # Split by the wall clock (the browser's timeOrigin and the app's time.time(), same machine):
    # Enter -> the socket message in the app, and the first token's emit -> seen in the page.
    origin = browser.get("origin")
    recv_wall, emitted_wall = _first(events, "recv", field="wall"), _first(events, "stream_token:end", field="wall")
    if origin and recv_wall is not None and emitted_wall is not None:
        row["to_app"] = recv_wall * 1000 - (origin + browser["enter"])
        row["to_page"] = (origin + browser["first"]) - emitted_wall * 1000
        if browser.get("sent") is not None and browser.get("frame") is not None:
            row["page:enter->send"] = browser["sent"] - browser["enter"]
            row["wire:send->app"] = recv_wall * 1000 - (origin + browser["sent"])
            row["wire:app->frame"] = (origin + browser["frame"]) - emitted_wall * 1000
            row["page:frame->token"] = browser["first"] - browser["frame"]
    return row


def med(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else None


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


# ============================================================================================
# Main
# ============================================================================================


def start_runtime(work: Path, model_dir: Path) -> tuple[str, Callable[[], None], str, int]:
    """``rag serve`` for ``model_dir`` in a subprocess: (url, stop, model id, context length)."""
    from rag.config import load_settings
    from rag.launcher import start_background

    settings = load_settings(environ={}, dotenv=None, data_dir=work / "serve")
    url, stop = start_background(settings, model_dirs=[model_dir], timeout=300)
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", "/v1/models")
    card = json.loads(conn.getresponse().read())["data"][0]
    conn.close()
    return url, stop, str(card["id"]), int(card.get("context_length") or 4096)


def run_side_by_side(browser: Any, apps: list[App], endpoint: Endpoint, questions: list[tuple[Any, str, str]],
                     *, log: Callable[[str], None], pause_ms: float = 0,
                     follow_up: bool = True) -> list[tuple[list[dict], list[dict]]]:  # fmt: skip
    """Each chat on every app in turn (the order alternating), so that both see the same load."""
    results: list[tuple[list[dict], list[dict]]] = [([], []) for _ in apps]
    for i, chat in enumerate(questions):
        order = list(range(len(apps)))[:: 1 if i % 2 == 0 else -1]
        for a in order:
            firsts, follows = run_chats(lambda: Tab(browser, apps[a].url), apps[a], endpoint, [chat],
                                        follow_up=follow_up, pause_ms=pause_ms,
                                        log=lambda text: log(f"  [{'current' if a == 0 else 'baseline'}] "
                                                             + text.strip().replace("chat 0", f"chat {i}", 1)))  # fmt: skip
            results[a][0].extend(firsts)
            results[a][1].extend(follows)
    return results


def run_chats(tab_factory: Callable[[], Tab], app: App, endpoint: Endpoint, questions: list[tuple[Any, str, str]],
              *, follow_up: bool, log: Callable[[str], None], pause_ms: float = 0) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Each chat: ``question`` (a text, or the index of a starter question to click), then with
    ``follow_up`` its follow-up."""
    firsts, follows = [], []
    for i, (question, follow, _) in enumerate(questions):
        tab = tab_factory()
        try:
            tab.welcome()
            time.sleep(0.5)  # let the welcome, settings and starters settle
            for kind, text in (("first", question), ("follow-up", follow))[: 2 if follow_up else 1]:
                offset, calls = app.trace_offset(), len(endpoint.log)
                browser = tab.click_starter(text) if isinstance(text, int) else tab.ask(text, pause_ms=pause_ms)
                time.sleep(0.2)
                row = analyse(browser, app.events(offset), endpoint.entries(calls))
                if row is None:
                    log(f"  chat {i} {kind}: no model answer (gated?) -- skipped")
                    continue
                row["question"] = f"starter {text}" if isinstance(text, int) else text
                (firsts if kind == "first" else follows).append(row)
                log(f"  chat {i} {kind}: page {row['total']:.0f} ms, endpoint {row['endpoint_ttft']:.0f} ms, "
                    f"overhead {row['overhead']:.0f} ms" + (f" (rewrite {row['rewrite_total']:.0f} ms)"
                                                           if "rewrite_total" in row else ""))  # fmt: skip
                time.sleep(0.3)
        finally:
            tab.close()
    return firsts, follows


BREAKDOWN = ["dispatch", "retrieve", "embed_query", "embed_query cpu", "retrieval_step+prompt", "prompt", "http_to_endpoint",
             "sse_read", "emit_token", "server_side", "socket+render", "to_app", "to_page",
             "page:enter->send", "wire:send->app", "wire:app->frame", "page:frame->token"]  # fmt: skip


def report(name: str, firsts: list[dict], follows: list[dict]) -> str:
    lines = [f"### {name}", "",
             "| question | n | Enter → first token in page (ms) | endpoint TTFT (ms) | overhead, median (ms) "
             "| overhead p90 (ms) | rewrite: total / endpoint's own (ms) | overhead without the rewrite (ms) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, rows in (("first (no rewrite)", firsts), ("follow-up (rewritten)", follows)):
        if not rows:
            continue
        over = sorted(r["overhead"] for r in rows)
        p90 = over[min(len(over) - 1, int(round(0.9 * (len(over) - 1))))]
        rewrite = (f"{fmt(med(rows, 'rewrite_total'))} / {fmt(med(rows, 'rewrite_endpoint'))}"
                   if med(rows, "rewrite_total") is not None else "–")  # fmt: skip
        lines.append(f"| {label} | {len(rows)} | {fmt(med(rows, 'total'))} | {fmt(med(rows, 'endpoint_ttft'))} "
                     f"| **{fmt(med(rows, 'overhead'))}** | {fmt(p90)} | {rewrite} "
                     f"| {fmt(med(rows, 'overhead_without_rewrite'))} |")  # fmt: skip
    lines += ["", "Where the overhead goes (medians, ms):", "",
              "| question | " + " | ".join(BREAKDOWN) + " |", "|---|" + "---|" * len(BREAKDOWN)]  # fmt: skip
    for label, rows in (("first", firsts), ("follow-up", follows)):
        if rows:
            lines.append(f"| {label} | " + " | ".join(fmt(med(rows, k)) for k in BREAKDOWN) + " |")
    return "\n".join(lines)


def compare(firsts: list[dict], follows: list[dict], base_firsts: list[dict], base_follows: list[dict]) -> str:
    """This checkout against the baseline, run side by side: medians and their ratio."""
    lines = ["### Side by side", "", "| question | overhead, median: this checkout (ms) | baseline (ms) | ratio |",
             "|---|---|---|---|"]  # fmt: skip
    for label, rows, base, key in (("first (no rewrite)", firsts, base_firsts, "overhead"),
                                   ("follow-up (rewritten)", follows, base_follows, "overhead"),
                                   ("follow-up, rewrite excluded", follows, base_follows, "overhead_without_rewrite")):
        now, then = med(rows, key), med(base, key)
        if now is not None and then is not None:
            lines.append(f"| {label} | **{now:.0f}** | {then:.0f} | {now / then:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--serve-app":
        serve_app(int(sys.argv[2]))
        return 0
    from bench._common import add_json_option, machine, save_results

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=10_000, help="synthetic chunks in the index (default 10000)")
    parser.add_argument("--base", type=int, default=100, help="real embeddings the synthetic vectors mix (default 100)")
    parser.add_argument("--chats", type=int, default=12, help="timed chats, each a first question + follow-up (12)")
    parser.add_argument("--ttft", type=float, default=0.2, help="the scripted endpoint's time to first token, s")
    parser.add_argument("--rewrite-delay", type=float, default=0.1, help="the scripted rewrite's latency, s")
    parser.add_argument("--real", type=int, default=0, metavar="N",
                        help="also N first questions against `rag serve` (the embedded runtime)")
    parser.add_argument("--model-dir", type=Path, default=REPO / ".rag" / "models" / "smollm2-135m")
    parser.add_argument("--max-answer-tokens", type=int, default=64, help="RAG_MAX_ANSWER_TOKENS for the app (64)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="another checkout (e.g. `git worktree add /tmp/base <commit>`) whose app runs side by "
                             "side: the same index, endpoint and browser, chats alternating between the two")
    parser.add_argument("--pause", type=float, default=0, metavar="MS",
                        help="0: Enter right after the question lands in the box (pasted); else its last "
                             "character is typed as a key and Enter pressed MS later (typed)")
    parser.add_argument("--starters", type=int, default=0, metavar="N",
                        help="also N chats whose first question is one of the page's starters, clicked")
    parser.add_argument("--tabs", choices=("fresh", "one"), default="fresh",
                        help="fresh: each chat opens the page in a new browser context (cold page code); "
                             "one: one page, each chat after the first starts with New chat")
    add_json_option(parser, "chat_latency")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright


    def log(text: str) -> None:
        print(text, flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench-chat-"))
    log(f"machine {machine()}; work folder {work}")
    stop_runtime: Callable[[], None] = lambda: None  # noqa: E731
    endpoint = Endpoint(ttft=args.ttft, rewrite_delay=args.rewrite_delay, rewrites={f: s for _, f, s in QUESTIONS})
    apps: list[App] = []
    try:
        built = build_index(work / "corpus", work / "data", args.chunks, base=args.base)
        log(f"index: {built['chunks']} synthetic chunks in {built['files']} files, committed in {built['seconds']:.0f} s")
        upstream = None
        if args.real:
            url, stop_runtime, model_id, window = start_runtime(work, args.model_dir)
            parts = urlsplit(url)
            upstream = (parts.hostname or "127.0.0.1", int(parts.port or 80), model_id)
            endpoint.context_length = window
            log(f"rag serve at {url}: {model_id}, context {window}")
        app_env = {"RAG_BASE_URL": endpoint.url, "RAG_MODEL": MODEL, "RAG_MAX_ANSWER_TOKENS": str(args.max_answer_tokens)}
        app = App(work, app_env)
        apps = [app]
        if args.baseline is not None:
            base_work = work / "baseline"
            # The same index, written by the baseline's own code: its on-disk format may differ,
            # and an app that cannot read an index re-embeds every chunk for real.
            build_index_in(args.baseline.resolve(), base_work / "corpus", base_work / "data", args.chunks, args.base)
            apps.append(App(base_work, app_env, checkout=args.baseline.resolve()))
        started = time.monotonic()
        for each in apps:
            each.start(timeout=300.0)
        results: dict[str, Any] = {}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            factory: Callable[[], Any] = lambda: Tab(browser, app.url)  # noqa: E731
            if args.tabs == "one":
                factory = ReusedTab(factory)
            for each in apps:
                warm = Tab(browser, each.url)
                warm.welcome()
                run_chats(lambda: warm, each, endpoint, QUESTIONS[:1], follow_up=True, log=lambda _: None)  # noqa: B023
            log(f"app{'s' if len(apps) > 1 else ''} ready in {time.monotonic() - started:.0f} s; warmed up")
            questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.chats)]
            log(f"scripted endpoint (TTFT {args.ttft * 1000:.0f} ms): {args.chats} chats")
            load0 = os.getloadavg()[0]
            title = f"Scripted endpoint, TTFT {args.ttft * 1000:.0f} ms, rewrite {args.rewrite_delay * 1000:.0f} ms"
            title += f", Enter {args.pause:.0f} ms after the last key" if args.pause else ", Enter at once"
            title += ", one page" if args.tabs == "one" else ""
            if len(apps) == 1:
                firsts, follows = run_chats(factory, app, endpoint, questions, follow_up=True, log=log,
                                            pause_ms=args.pause)
                text = report(title, firsts, follows)
            else:
                (firsts, follows), (base_firsts, base_follows) = run_side_by_side(browser, apps, endpoint, questions,
                                                                                  log=log, pause_ms=args.pause)  # fmt: skip
                results["baseline"] = {"checkout": str(args.baseline), "first": base_firsts, "follow_up": base_follows}
                text = (report(title + ": this checkout", firsts, follows) + "\n\n"
                        + report(title + f": baseline {args.baseline}", base_firsts, base_follows) + "\n\n"
                        + compare(firsts, follows, base_firsts, base_follows))  # fmt: skip
            results["scripted"] = {"first": firsts, "follow_up": follows, "load_avg_1m": [load0, os.getloadavg()[0]]}
            if args.starters:
                log(f"starter questions, clicked: {args.starters} chats")
                starters = [(i % 4, "", "") for i in range(args.starters)]
                title = "A starter question clicked (sent at once), scripted endpoint"
                if len(apps) == 1:
                    clicked, _ = run_chats(factory, app, endpoint, starters, follow_up=False, log=log)
                    text += "\n\n" + report(title, clicked, [])
                else:
                    (clicked, _), (base_clicked, _) = run_side_by_side(browser, apps, endpoint, starters, log=log,
                                                                       follow_up=False)  # fmt: skip
                    results["baseline"]["starters"] = base_clicked
                    now, then = med(clicked, "overhead"), med(base_clicked, "overhead")
                    text += ("\n\n" + report(title + ": this checkout", clicked, []) + "\n\n"
                             + report(title + f": baseline {args.baseline}", base_clicked, [])
                             + (f"\n\nStarters side by side: **{now:.0f}** vs {then:.0f} ms, ratio {now / then:.2f}"
                                if now is not None and then is not None else ""))  # fmt: skip
                results["starters"] = {"first": clicked}
            if upstream is not None:
                endpoint.upstream = upstream
                log(f"rag serve ({upstream[2]}): {args.real} chats, first questions only")
                run_chats(factory, app, endpoint, QUESTIONS[:1], follow_up=False, log=lambda _: None)  # warm-up
                load0 = os.getloadavg()[0]
                real, _ = run_chats(factory, app, endpoint, [QUESTIONS[i % len(QUESTIONS)] for i in range(args.real)],
                                    follow_up=False, log=log, pause_ms=args.pause)  # fmt: skip
                results["real"] = {"model": upstream[2], "first": real, "load_avg_1m": [load0, os.getloadavg()[0]]}
                text += "\n\n" + report(f"`rag serve` ({upstream[2]}), through a timing pass-through", real, [])
            browser.close()
        snapshot_chunks = next((e.get("chunks") for e in reversed(app.events()) if e["ev"] == "commit:start"), None)
        log(f"index in the app: {snapshot_chunks or built['chunks']} chunks")
        print("\n" + text + "\n")
        results["index_chunks"] = snapshot_chunks or built["chunks"]
        save_results("chat_latency", {"args": vars(args) | {"model_dir": str(args.model_dir)}, **results},
                     args.json)  # fmt: skip
    finally:
        for each in apps:
            if each.process is not None:
                each.stop()
        endpoint.close()
        stop_runtime()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
