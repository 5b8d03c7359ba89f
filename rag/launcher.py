"""Start, find and stop a background ``rag serve`` for a data directory.

The app and ``rag ask`` need a chat endpoint; when none is configured they use the embedded
Foundry Local runtime, served by ``python -m rag serve`` in a subprocess. This module is that
subprocess's lifecycle, seen from the client side:

- ``<data_dir>/serve.json`` (pid, url, models), written by the server once it listens and
  removed when it stops, lets any process find a running server (``find_running``) and reuse
  it instead of loading the model a second time. A stale file (dead pid, no health) is ignored.
- ``start_background`` starts one under a file lock (``serve.lock``), so two processes starting
  at once do not load the model twice; its output goes to ``<data_dir>/serve.log``.
- ``stop_process``: SIGTERM, then SIGKILL after a grace period.

It never imports ``rag.server``: the server runs in its own process, started by command line.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rag.config import Settings
from rag.errors import EndpointError, EndpointTimeoutError

DEFAULT_HOST = "127.0.0.1"
STATE_FILE = "serve.json"


def state_path(data_dir: Path) -> Path:
    return data_dir / STATE_FILE


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_health(url: str, *, timeout: float = 2.0) -> bool:
    """``GET /health`` on the server whose base URL (``.../v1``) is given; no proxy, loopback-safe."""
    parts = urlsplit(url)
    if not parts.hostname or not parts.port:
        return False
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        return response.status == 200 and json.loads(response.read()).get("status") == "ok"
    except (OSError, ValueError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def read_state(data_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(state_path(data_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def find_running(data_dir: Path) -> str | None:
    """The URL (``http://127.0.0.1:PORT/v1``) of a live server for this data dir, if any."""
    state = read_state(data_dir)
    if not state or not isinstance(state.get("pid"), int) or not isinstance(state.get("url"), str):
        return None
    if not _pid_alive(state["pid"]) or not check_health(state["url"]):
        return None
    return str(state["url"])


def write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def remove_state(path: Path) -> None:
    state = read_state(path.parent)
    if state and state.get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def _start_lock(data_dir: Path) -> Iterator[None]:
    """Only one process at a time decides whether to start a server for a data dir."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "serve.lock", "a+b") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # Windows: no advisory lock; a rare double start only costs memory
            pass
        yield


def start_background(
    settings: Settings,
    *,
    model_dirs: Sequence[Path | str] | None = None,
    host: str = DEFAULT_HOST,
    timeout: float = 180.0,
) -> tuple[str, Callable[[], None]]:
    """Reuse a running server or start one in a subprocess; return ``(url, stop)``.

    ``stop()`` ends the subprocess this call started (a no-op for a reused server).
    Its output goes to ``<data_dir>/serve.log``.
    """
    data_dir = settings.data_dir
    with _start_lock(data_dir):
        url = find_running(data_dir)
        if url:
            return url, lambda: None
        # --no-documents: the app (or `rag ask`) has its own index and embedding model; a second
        # copy in the server would only cost memory.
        command = [sys.executable, "-m", "rag", "--data-dir", str(data_dir), "serve", "--host", host, "--port", "0",
                   "--no-documents"]  # fmt: skip
        for model_dir in model_dirs or []:
            command += ["--model-dir", str(model_dir)]
        if settings.model and not model_dirs:
            command += ["--model", settings.model]
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        log_path = data_dir / "serve.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )

        def stop() -> None:
            stop_process(process)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise EndpointError(
                    f"the model server exited with code {process.returncode}: {_last_line(log_path)} "
                    f"(log: {log_path})"
                )
            state = read_state(data_dir)
            if state and state.get("pid") == process.pid and check_health(str(state.get("url")), timeout=1.0):
                return str(state["url"]), stop
            time.sleep(0.2)
        stop()
        raise EndpointTimeoutError(f"the model server did not become ready within {timeout:.0f} s (log: {log_path})")


def stop_process(process: subprocess.Popen[Any], *, timeout: float = 15.0) -> None:
    """Ask a child process to stop (SIGTERM), kill it if it has not within ``timeout``, and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"
