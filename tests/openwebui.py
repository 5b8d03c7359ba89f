"""Open WebUI (``make openwebui`` installs it in ``.venv-openwebui``) in a subprocess, offline,
against an OpenAI-compatible base URL, and driven in Debian's Chromium.

``OpenWebUI`` starts ``open-webui serve`` with a fresh data folder and the environment that keeps
it off the network and off our one-at-a-time endpoint except for the chat itself (no title, tag,
follow-up or autocomplete requests; no hub lookup for an embedder it does not need), waits for
``/health`` and stops it with its process group. Its output goes to ``work/openwebui.log``; a
failure to start raises ``OpenWebUIError`` with the log's tail. ``ask_in_browser`` picks a model
in the page, sends one message and returns the reply as the page shows it.

Trade-offs: a real Open WebUI costs a 2.9 GB venv (~4 min to install), ~800 MB of memory and
25 s per start on 2 cores (70 s when the machine is busy); one start serves every test of a module.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-openwebui"
EXECUTABLE = VENV / "bin" / "open-webui"
VERSION = "0.12.4"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]  # fmt: skip

# Its own settings, several of them named RAG_* like ours: ours are dropped from its environment.
OFFLINE_ENV = {
    "WEBUI_AUTH": "False",  # one implicit admin; the API still wants a token (see ``token``)
    "ENABLE_OLLAMA_API": "False",
    "OFFLINE_MODE": "True",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # Without these it loads (and looks up on the hub) a sentence-transformers embedder for uploads.
    "RAG_EMBEDDING_ENGINE": "openai",
    "BYPASS_EMBEDDING_AND_RETRIEVAL": "True",
    # Each of these would send another chat request to the model after every reply.
    "ENABLE_TITLE_GENERATION": "False",
    "ENABLE_TAGS_GENERATION": "False",
    "ENABLE_FOLLOW_UP_GENERATION": "False",
    "ENABLE_AUTOCOMPLETE_GENERATION": "False",
    "ENABLE_VERSION_UPDATE_CHECK": "False",
    # The environment wins over what an earlier run stored in its database.
    "ENABLE_PERSISTENT_CONFIG": "False",
    "SCARF_NO_ANALYTICS": "true",
    "DO_NOT_TRACK": "true",
    "ANONYMIZED_TELEMETRY": "false",
}


class OpenWebUIError(RuntimeError):
    """Open WebUI is not installed, or did not start; the message says which and shows its log."""


def _free_port() -> int:
    from tests.apphost import free_port

    return free_port()


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy


class OpenWebUI:
    """``open-webui serve`` on a free loopback port, with ``work/data`` as its data folder."""

    def __init__(
        self,
        work: Path,
        openai_base_url: str,
        *,
        api_key: str = "not-needed",
        default_params: dict[str, Any] | None = None,
    ) -> None:
        """``default_params``: sent with every chat request unless the chat sets its own (its
        ``DEFAULT_MODEL_PARAMS``, as in Admin Settings → Models), e.g. ``{"temperature": 0}``."""
        self.work = work
        self.data = work / "data"
        self.log_path = work / "openwebui.log"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAG_")},
            **OFFLINE_ENV,
            "DATA_DIR": str(self.data),
            "OPENAI_API_BASE_URL": openai_base_url,
            "OPENAI_API_KEY": api_key,
            "WEBUI_SECRET_KEY": secrets.token_hex(16),
            "NO_PROXY": "127.0.0.1,localhost",
            "PYTHONUNBUFFERED": "1",
        }
        if default_params:
            self.env["DEFAULT_MODEL_PARAMS"] = json.dumps(default_params)
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0
        self._token: str | None = None

    def start(self, timeout: float = 240.0) -> None:
        """Start it and wait until ``/health`` answers."""
        if not EXECUTABLE.exists():
            raise OpenWebUIError(
                f"Open WebUI is not installed: {EXECUTABLE} is missing. Run `make openwebui` (it installs "
                f"open-webui=={VERSION} into {VENV.name} from PyPI)."
            )
        installed = sorted(d.name for d in VENV.glob("lib/python*/site-packages/open_webui-*.dist-info"))
        if f"open_webui-{VERSION}.dist-info" not in installed:
            raise OpenWebUIError(
                f"{VENV.name} holds {installed or 'no open_webui'}, not open-webui {VERSION}: run `make openwebui`."
            )
        self.data.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        self.process = subprocess.Popen(
            [str(EXECUTABLE), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=self.work, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise OpenWebUIError(f"Open WebUI exited with {self.process.returncode} while starting:\n{self.tail()}")
            if self._healthy():
                self.start_seconds = time.monotonic() - started
                return
            time.sleep(0.5)
        raise OpenWebUIError(f"Open WebUI did not answer /health within {timeout:.0f} s:\n{self.tail()}")

    def _healthy(self) -> bool:
        try:
            with _opener().open(f"{self.url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def api(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        """A JSON request to its API; ``auth`` sends the token (``token()``)."""
        headers = {"content-type": "application/json"}
        if auth:
            headers["authorization"] = f"Bearer {self.token()}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers, method=method)
        try:
            with _opener().open(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise OpenWebUIError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}\n{self.tail()}") from exc

    def token(self) -> str:
        """Its API wants a token even with ``WEBUI_AUTH=False``: signing in with an empty email and
        password as the implicit admin returns one."""
        if self._token is None:
            self._token = str(
                self.api("POST", "/api/v1/auths/signin", {"email": "", "password": ""}, auth=False)["token"]
            )
        return self._token

    def model_ids(self) -> list[str]:
        """The models it offers (fetched from the OpenAI base URL)."""
        return [m["id"] for m in self.api("GET", "/api/models")["data"]]

    def rss_mib(self) -> float:
        """Resident memory of its whole process group."""
        if self.process is None:
            return 0.0
        out = subprocess.run(
            ["ps", "-o", "rss=", "-g", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        return sum(int(x) for x in out.stdout.split()) / 1024

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 40) -> str:
        return f"--- last {lines} lines of {self.log_path} ---\n" + "\n".join(self.output().splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after 20 s."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        if self.process is not None:
            self.log.close()


def ask_in_browser(
    browser: Any, webui: OpenWebUI, model_id: str, question: str, *, screenshot: Path, timeout_ms: float = 300_000
) -> str:
    """Open Open WebUI in a new tab, pick ``model_id``, send ``question``, wait for the whole reply
    and return its text as shown; a screenshot of the page (also on failure) goes to ``screenshot``."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        page.goto(webui.url)
        page.locator("#chat-input").wait_for()
        # First visit: a "what's new" dialog covers the page.
        welcome = page.get_by_role("button", name="Okay, Let's Go!")
        try:
            welcome.wait_for(timeout=10_000)
            welcome.click()
        except PlaywrightTimeoutError:  # not shown: not the first visit of this Open WebUI user
            pass
        page.locator("#model-selector-model-button").click()
        page.locator(f'[role="option"][aria-label="Select {model_id} model"]').click()
        page.locator("#chat-input").fill(question)
        page.locator("#send-message-button").click()
        # The regenerate button appears under a reply once it is complete.
        page.locator('#messages-container button[aria-label="Regenerate"]').last.wait_for(timeout=timeout_ms)
        return str(page.locator(".chat-assistant #response-content-container").last.inner_text())
    finally:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot))
        context.close()
