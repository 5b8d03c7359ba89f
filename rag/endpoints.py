"""Which chat endpoints exist: named in ``endpoints.toml``, or the one discovered here.

Endpoints live in one TOML file (``endpoints.toml``, ``RAG_ENDPOINTS_FILE``)::

    [[endpoint]]
    name = "local"
    base_url = "http://127.0.0.1:5273/v1"
    model = "smollm2-135m"          # empty: the endpoint's first model
    context_window = 8192           # optional: else what the endpoint says, else RAG_CONTEXT_WINDOW
    # local = true                  # default: true for a loopback URL

    [[endpoint]]
    name = "cloud"
    base_url = "https://api.example.com/v1"
    model = "big-model"
    api_key_env = "EXAMPLE_API_KEY" # the NAME of the variable holding the key, never the key

    [by_task]                       # for the by-task policy
    code = "cloud"
    default = "local"

Without the file there is one endpoint, discovered when it is first needed (``discover``), in
this order:

1. Explicit settings: ``RAG_BASE_URL`` (+ ``RAG_MODEL``, ``RAG_API_KEY``).
2. A running Foundry Local service, found with ``foundry service status`` when the ``foundry``
   command is installed (its port changes at every start, so it is asked, never guessed).
3. The embedded runtime (``python -m rag serve``, ``rag.launcher``): reused when one already
   runs for this data directory, else started in a subprocess and stopped again when the
   connection closes.

Who answers among them is ``rag.routing``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rag.chat import is_loopback
from rag.config import Settings
from rag.errors import ConfigError

TASKS = ("code", "summarise", "general")
DEFAULT_NAME = "default"
FOUNDRY_URL = re.compile(r"https?://(?:127\.0\.0\.1|localhost|\[::1\]|[\w.-]+):\d+")


# --- Specs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointSpec:
    """One named endpoint as configured (nothing opened yet)."""

    name: str
    base_url: str
    model: str = ""
    api_key_env: str = ""
    context_window: int | None = None
    local: bool = True
    first_token_timeout: float | None = None
    # Found at connection time (RAG_BASE_URL, Foundry Local, or the embedded runtime): no file.
    discovered: bool = False

    def label(self) -> str:
        """How the endpoint is shown.

        >>> EndpointSpec("cloud", "https://x/v1", "big").label()
        'cloud (big)'
        """
        return f"{self.name} ({self.model})" if self.model else self.name


@dataclass(frozen=True)
class EndpointsConfig:
    endpoints: tuple[EndpointSpec, ...]
    by_task: Mapping[str, str] = field(default_factory=dict)
    source: str = ""


_SPEC_KEYS = {"name", "base_url", "model", "api_key_env", "context_window", "local", "first_token_timeout"}


def parse_endpoints(data: Mapping[str, Any], *, source: str = "endpoints.toml") -> EndpointsConfig:
    """Validate a parsed TOML document; errors name the file and the entry.

    >>> parse_endpoints({"endpoint": [{"name": "a", "base_url": "http://127.0.0.1:1/v1"}]}).endpoints[0].local
    True
    """
    entries = data.get("endpoint", [])
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: add at least one [[endpoint]] table (name, base_url, model)")
    specs: list[EndpointSpec] = []
    for i, entry in enumerate(entries, start=1):
        where = f"{source}: endpoint {i}"
        unknown = set(entry) - _SPEC_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(_SPEC_KEYS))})")
        name, url = entry.get("name"), entry.get("base_url")
        if not isinstance(name, str) or not name or not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: needs a name and an http(s) base_url")
        if "api_key" in str(entry.get("api_key_env", "")).lower() and "=" in str(entry.get("api_key_env")):
            raise ConfigError(f"{where}: api_key_env is the NAME of an environment variable, not the key")
        window = entry.get("context_window")
        if window is not None and (not isinstance(window, int) or window < 256):
            raise ConfigError(f"{where}: context_window must be an integer of at least 256")
        specs.append(
            EndpointSpec(
                name=name,
                base_url=url,
                model=str(entry.get("model", "")),
                api_key_env=str(entry.get("api_key_env", "")),
                context_window=window,
                local=bool(entry.get("local", is_loopback(url))),
                first_token_timeout=entry.get("first_token_timeout"),
            )
        )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: endpoint names must be unique, got {names}")
    by_task = dict(data.get("by_task", {}))
    for task, target in by_task.items():
        if task not in (*TASKS, "default"):
            raise ConfigError(f"{source}: [by_task] {task!r} is not one of {', '.join(TASKS)}, default")
        if target not in names:
            raise ConfigError(f"{source}: [by_task] {task} = {target!r} names no endpoint (have {', '.join(names)})")
    return EndpointsConfig(tuple(specs), by_task, source)


def load_endpoints(path: Path) -> EndpointsConfig | None:
    """The endpoints file, or None when it does not exist."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_endpoints(data, source=str(path))


def default_config(settings: Settings) -> EndpointsConfig:
    """The one endpoint used without an endpoints file: discovered when connected. It counts as
    local unless ``RAG_BASE_URL`` names another machine (discovery finds loopback servers only).

    >>> default_config(Settings()).endpoints[0].local
    True
    """
    local = not settings.base_url or is_loopback(settings.base_url)
    spec = EndpointSpec(DEFAULT_NAME, settings.base_url, settings.model, local=local, discovered=True)
    return EndpointsConfig((spec,), {}, "")


def endpoints_config(settings: Settings) -> EndpointsConfig:
    """The endpoints file when there is one, else the discovered endpoint."""
    return load_endpoints(settings.endpoints_file) or default_config(settings)


# --- Discovery ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Discovered:
    """Where the default endpoint answers; ``stop`` ends what discovery started (the embedded
    runtime), a no-op otherwise."""

    base_url: str
    origin: str  # "settings", "foundry", "embedded"
    stop: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)


def foundry_service_url(*, timeout: float = 10.0) -> str | None:
    """The URL of a running Foundry Local service, or None (no CLI, not running)."""
    exe = shutil.which("foundry")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, "service", "status"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = FOUNDRY_URL.search(done.stdout + done.stderr)
    return match.group(0) + "/v1" if match else None


def _listening(url: str, *, timeout: float = 1.0) -> bool:
    """Whether something accepts connections at ``url``'s host and port."""
    match = re.match(r"https?://([^/:]+|\[[^\]]+\]):(\d+)", url)
    if match is None:
        return False
    try:
        with socket.create_connection((match.group(1).strip("[]"), int(match.group(2))), timeout=timeout):
            return True
    except OSError:
        return False


async def discover(settings: Settings) -> Discovered:
    """The default endpoint's URL, in the documented order; starting the embedded runtime may
    raise ``EndpointError`` or ``ModelBuildError`` (no model built yet)."""
    if settings.base_url:
        return Discovered(settings.base_url, "settings")
    url = await asyncio.to_thread(foundry_service_url)
    if url and await asyncio.to_thread(_listening, url):  # else a stale status line
        return Discovered(url, "foundry")
    from rag.launcher import start_background

    url, stop = await asyncio.to_thread(start_background, settings)
    return Discovered(url, "embedded", stop)
