"""``python -m rag serve`` in a subprocess, for the tests that drive it as a client would.

``ServeProcess`` runs it with its own data folder (``work/data``, the project's built models and
the embedding model's ONNX export linked in) and corpus (``work/corpus``, a copy of
``docs_corpus/``, which it indexes as it starts and serves as ``rag:<model>``), on a free port
(``--port 0``; the URL comes from ``serve.json``), its log in ``work/serve.log``.
``generations()`` reads the server's own log line per answer, so a test can tell that an answer
came from this server. ``built_chat_model()`` picks a built model to serve (the small fast one
first); ``built_answering_model()`` the default model first, for answers worth checking.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / ".rag" / "models"
CACHE_DIR = ROOT / ".rag" / "cache"  # the embedding model's ONNX export for questions, made once
# The small fast model first: a test wants an answer, not a good one.
PREFERRED_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")

# rag.server logs one line per answer: "<model>: <n> prompt + <m> completion tokens in <s> s (...)".
_GENERATION = re.compile(r"^(\S+): (\d+) prompt \+ (\d+) completion tokens in ", re.MULTILINE)


@dataclass(frozen=True)
class Generation:
    model: str
    prompt_tokens: int
    completion_tokens: int


def built_chat_model() -> Path | None:
    """The built model folder to serve: the first of ``PREFERRED_MODELS``, then the default model."""
    from rag.modelbuild import DEFAULT_MODEL, is_built

    for name in (*PREFERRED_MODELS, DEFAULT_MODEL):
        if is_built(MODELS_DIR / name):
            return MODELS_DIR / name
    return None


def built_answering_model() -> Path | None:
    """The built model folder whose answers from the documents are worth checking: the default
    model (Qwen2.5-Coder-0.5B; SmolLM2-135M rarely states the fact it was given), else any."""
    from rag.modelbuild import DEFAULT_MODEL, is_built

    if is_built(MODELS_DIR / DEFAULT_MODEL):
        return MODELS_DIR / DEFAULT_MODEL
    return built_chat_model()


class ServeProcess:
    """``python -m rag --data-dir work/data serve --port 0 --model-dir …`` in its own process group."""

    def __init__(self, work: Path, model_dirs: list[Path], *, env: dict[str, str] | None = None) -> None:
        self.work = work
        self.data = work / "data"
        self.corpus = work / "corpus"
        self.log_path = work / "serve.log"
        self.model_dirs = model_dirs
        self.url = ""  # http://127.0.0.1:PORT/v1 once started
        work.mkdir(parents=True, exist_ok=True)
        if not self.corpus.exists():
            shutil.copytree(ROOT / "docs_corpus", self.corpus)
        self.data.mkdir(exist_ok=True)
        if MODELS_DIR.is_dir() and not (self.data / "models").exists():
            (self.data / "models").symlink_to(MODELS_DIR)
        if CACHE_DIR.is_dir() and not (self.data / "cache").exists():
            (self.data / "cache").symlink_to(CACHE_DIR)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAG_")},
            "RAG_CORPUS_DIR": str(self.corpus),
            "RAG_DATA_DIR": str(self.data),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "rag", "--data-dir", str(self.data), "serve", "--port", "0"]
        for model_dir in self.model_dirs:
            command += ["--model-dir", str(model_dir)]
        return command

    def start(self, timeout: float = 240.0) -> None:
        """Start it and wait until ``/health`` answers; raises ``RuntimeError`` with its log if not."""
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command(), cwd=self.work, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rag serve exited with {self.process.returncode}:\n{self.tail()}")
            url = self._listening_url()
            if url and _healthy(url):
                self.url = url
                return
            time.sleep(0.3)
        raise RuntimeError(f"rag serve did not answer /health in {timeout:.0f} s:\n{self.tail()}")

    def _listening_url(self) -> str | None:
        try:
            state = json.loads((self.data / "serve.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if self.process is None or state.get("pid") != self.process.pid:
            return None
        return str(state.get("url") or "") or None

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def generations(self) -> list[Generation]:
        """One entry per answer the server finished, in order."""
        return [Generation(m[1], int(m[2]), int(m[3])) for m in _GENERATION.finditer(self.output())]

    def stop(self) -> None:
        """SIGTERM (the server shuts down cleanly and removes serve.json), SIGKILL after 20 s."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        if self.process is not None:
            self.log.close()


def _healthy(url: str) -> bool:
    health = url.removesuffix("/v1") + "/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    try:
        with opener.open(health, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False
