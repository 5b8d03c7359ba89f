"""A real Milvus gRPC service for the tests: ``milvus-lite server`` in its own process.

The tests reach it over gRPC at ``http://127.0.0.1:PORT`` exactly as the app reaches a Milvus
standalone server or cluster (only the URI differs); nothing runs inside the test process.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

MILVUS_LITE = Path(sys.executable).with_name("milvus-lite")


def available() -> bool:
    try:
        import pymilvus  # noqa: F401
    except ImportError:
        return False
    return MILVUS_LITE.exists() or shutil.which("milvus-lite") is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MilvusServer:
    """Start with ``start()``, stop with ``stop()``; ``uri`` is what ``RAG_MILVUS_URI`` would be."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"milvus-lite-{self.port}.log"

    def start(self, timeout: float = 60.0) -> MilvusServer:
        command = str(MILVUS_LITE) if MILVUS_LITE.exists() else "milvus-lite"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [command, "server", "--data-dir", str(self.data_dir), "--host", "127.0.0.1",
                 "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"milvus-lite server did not listen on port {self.port} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
