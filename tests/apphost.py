"""Processes for the tests that need real servers, shared with the benchmarks (bench/chat_latency.py).

``free_port`` for a server about to start; ``http_server`` and ``send_body``: a small HTTP
server in this process for a test's own handler; ``AppProcess``: the Chainlit app as a user runs
it, ``chainlit run app.py --headless``, in a subprocess with its own app root, corpus and data folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]  # fmt: skip


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Debian's headless Chromium through Playwright (a test is skipped where it is missing)."""
    import pytest

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` served on a free local port by threads of this process; yields the base URL
    an OpenAI-style client takes (``http://127.0.0.1:PORT/v1``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def send_body(handler: BaseHTTPRequestHandler, body: bytes, content_type: str = "application/json") -> None:
    """A 200 response with ``body`` and its length (keeps an HTTP/1.1 connection usable)."""
    handler.send_response(200)
    handler.send_header("content-type", content_type)
    handler.send_header("content-length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class AppProcess:
    """The app in a subprocess: ``work/approot`` (a copy of ``.chainlit``, ``chainlit.md`` and
    ``public``), ``work/corpus`` (seeded with ``docs_corpus/`` unless ``seed_corpus`` is false),
    ``work/data`` and ``work/app.log``. ``env`` is added to the environment, whose ``RAG_*``
    variables are dropped first. ``checkout``: the repository the app root is copied from (another
    checkout's, for a benchmark's baseline). A subclass may start something else than
    ``chainlit run app.py`` by overriding ``command``."""

    def __init__(
        self,
        work: Path,
        env: dict[str, str],
        *,
        seed_corpus: bool = True,
        checkout: Path = ROOT,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = work / "approot"
        self.corpus = work / "corpus"
        self.data = work / "data"
        self.log_path = work / "app.log"
        if not self.root.exists():
            shutil.copytree(checkout / ".chainlit", self.root / ".chainlit")
            shutil.copy(checkout / "chainlit.md", self.root / "chainlit.md")
            shutil.copytree(checkout / "public", self.root / "public")
        if seed_corpus:
            shutil.copytree(ROOT / "docs_corpus", self.corpus)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAG_")},
            "CHAINLIT_APP_ROOT": str(self.root),
            "RAG_CORPUS_DIR": str(self.corpus),
            "RAG_DATA_DIR": str(self.data),
            "RAG_API_PORT": "0",  # the app's API would take 8001 from a `make run` on this machine
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "chainlit", "run", str(ROOT / "app.py"), "--headless",
                "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip

    def start(self, timeout: float = 240.0) -> None:
        """Start it (again, after ``stop`` or ``kill``: the log goes on) and wait until it serves;
        raises ``RuntimeError`` with its output if it does not."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command(), cwd=self.root, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited with {self.process.returncode}:\n{self.output()}")
            if b"Your app is available at" in self.log_path.read_bytes()[offset:]:
                return
            time.sleep(0.3)
        raise RuntimeError(f"the app did not start in {timeout:.0f} s:\n{self.output()}")

    def kill(self) -> None:
        """``kill -9`` the app and everything it started, as a crash or a power cut would."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(15)
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        """Stop the app and everything it started (its process group)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.log.close()
