"""Routing: several named chat endpoints, one policy that picks which one answers.

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

Without the file the list is the one endpoint ``open_endpoint`` discovers, marked local.

Policies (``RAG_POLICY``):

- ``local-only`` (default): only endpoints marked local are tried, and every client's transport
  refuses (``PolicyError``) to send anything to a host that is not local, so no document text
  leaves the machine even through a bug in the order of candidates.
- ``local-first``: local endpoints in file order, then the others.
- ``cloud-first``: the others first, then the local ones.
- ``by-task``: ``classify_task`` (keyword rules, explainable) picks the endpoint from
  ``[by_task]``; if it fails, only local endpoints are tried next (an error never sends text out).

A candidate is skipped, with the reason recorded, when the prompt would not fit its context
window without dropping passages (and another candidate remains), when it cannot be reached,
answers an HTTP error, or gives no first token within its first-token timeout. Once the first
token arrived the answer is committed: a later failure is raised, never retried elsewhere, so an
answer is never shown twice or spliced from two models.
"""

from __future__ import annotations

import asyncio
import os
import re
import tomllib
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from rag.chat import ChatClient, ChatEvent, Message
from rag.config import POLICIES, Settings
import rag.endpoints as endpoints_module
from rag.endpoints import Endpoint, is_loopback
from rag.errors import ConfigError, ContextLengthError, EndpointError, PolicyError, RagError
from rag.pipeline import DEFAULT_REWRITE_TIMEOUT, Answer, needs_rewrite, request_rewrite
from rag.prompting import SYSTEM_PROMPT, TokenCounter, default_token_counter, fit_to_budget
from rag.types import Hit

TASKS = ("code", "summarise", "general")


# --- Endpoint specs --------------------------------------------------------------------------


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


# --- The task classifier --------------------------------------------------------------------

# Ordered: the first rule that matches decides. Each rule is shown as the reason.
TASK_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("code", re.compile(r"```|\b\w+\(\)|\b(code|function|python|javascript|typescript|java|rust|sql|regex|"
                        r"bash|script|compile[sd]?|debug|stack ?trace|exception|snippet|implement|refactor|"
                        r"api|json|yaml|class|method|variable)\b", re.I)),
    ("summarise", re.compile(r"\b(summar(y|ise|ize|ising|izing)|tl;?dr|overview|outline|key points|main points|"
                             r"gist|recap|in a nutshell|briefly|condense)\b", re.I)),
)


def classify_task(question: str) -> tuple[str, str]:
    """The question's task and why: the first matching rule, else ``general``.

    >>> classify_task("Write a Python function that parses dates")
    ('code', 'matched "Python"')
    >>> classify_task("How often should compost be turned?")
    ('general', 'no code or summary keyword')
    """
    for task, pattern in TASK_RULES:
        match = pattern.search(question)
        if match:
            return task, f'matched "{match.group(0)}"'
    return "general", "no code or summary keyword"


def order_candidates(
    specs: Sequence[EndpointSpec], policy: str, question: str = "", by_task: Mapping[str, str] | None = None
) -> tuple[list[EndpointSpec], str]:
    """The endpoints to try, in order, and a note on why (pure).

    >>> a, b = EndpointSpec("a", "http://127.0.0.1:1"), EndpointSpec("b", "https://x", local=False)
    >>> [s.name for s in order_candidates([b, a], "cloud-first")[0]]
    ['b', 'a']
    >>> [s.name for s in order_candidates([b, a], "local-only")[0]]
    ['a']
    """
    local = [s for s in specs if s.local]
    remote = [s for s in specs if not s.local]
    if policy == "local-only":
        return local, "local-only"
    if policy == "local-first":
        return local + remote, "local-first"
    if policy == "cloud-first":
        return remote + local, "cloud-first"
    if policy == "by-task":
        task, why = classify_task(question)
        rules = by_task or {}
        target = rules.get(task) or rules.get("default")
        chosen = next((s for s in specs if s.name == target), None) or (local or list(specs))[0]
        rest = [s for s in local if s is not chosen]
        return [chosen, *rest], f"task {task} ({why}) -> {chosen.name}"
    raise ConfigError(f"RAG_POLICY={policy!r} is not one of {', '.join(POLICIES)}")


# --- The transport guard --------------------------------------------------------------------


def _host_of(url: str) -> str:
    return httpx.URL(url).host


class LocalOnlyTransport(httpx.AsyncBaseTransport):
    """Refuses, before a byte is sent, any request to a host that is neither loopback nor the
    host of an endpoint marked local. Wraps the real transport (or a test's MockTransport)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, *, allowed_hosts: Sequence[str] = ()) -> None:
        self.inner = inner
        self.allowed_hosts = frozenset(allowed_hosts)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if not (is_loopback(str(request.url)) or host in self.allowed_hosts):
            raise PolicyError(
                f"refused to send a request to {request.url.scheme}://{host}: the policy is local-only, "
                "so nothing leaves this machine. Mark the endpoint local (local = true in endpoints.toml) "
                "if it runs on your network, or choose RAG_POLICY=local-first / cloud-first (`--policy`)"
            )
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- The router -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Who answered and why: ``fallback`` is empty when the first choice answered."""

    endpoint: str
    model: str
    base_url: str
    local: bool
    policy: str
    fallback: str = ""
    note: str = ""

    def describe(self) -> str:
        """One line for a footer.

        >>> Route("local", "smollm2", "http://127.0.0.1:1/v1", True, "local-first").describe()
        'local · smollm2 (local-first)'
        """
        text = f"{self.endpoint} · {self.model} ({self.policy})"
        return text + (f"; fallback: {self.fallback}" if self.fallback else "")


@dataclass
class RoutedAnswer(Answer):
    """An ``Answer`` that also says which endpoint produced it and, after a fallback, why."""

    route: Route | None = None


@dataclass
class _Connection:
    spec: EndpointSpec
    client: ChatClient
    http: httpx.AsyncClient | None  # None: the client belongs to a discovered Endpoint
    model: str
    context_window: int


class Router:
    """Opens endpoints lazily (one client each) and answers through the policy's candidates."""

    def __init__(
        self,
        config: EndpointsConfig,
        settings: Settings,
        *,
        policy: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        environ: Mapping[str, str] | None = None,
        default_endpoint: Endpoint | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.policy = policy or settings.policy
        if self.policy not in POLICIES:
            raise ConfigError(f"RAG_POLICY={self.policy!r} is not one of {', '.join(POLICIES)}")
        self._transport = transport
        self._environ = environ
        self._connections: dict[str, _Connection] = {}
        self._default = default_endpoint
        self._lock = asyncio.Lock()

    @classmethod
    async def create(
        cls,
        settings: Settings,
        *,
        policy: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Router:
        """From ``settings.endpoints_file``, or the one discovered endpoint when there is none."""
        config = load_endpoints(settings.endpoints_file)
        if config is not None:
            return cls(config, settings, policy=policy, transport=transport, environ=environ)
        chosen = policy or settings.policy
        if chosen == "local-only" and settings.base_url and not is_loopback(settings.base_url):
            raise PolicyError(
                f"RAG_BASE_URL={settings.base_url} is not on this machine and the policy is local-only: "
                "choose RAG_POLICY=local-first or cloud-first, or list it with local = true in "
                f"{settings.endpoints_file}"
            )
        # Looked up at call time so that tests can replace it.
        opening = endpoints_module.open_endpoint
        endpoint = await (opening(settings) if transport is None else opening(settings, transport=transport))
        # Discovery only finds loopback servers (Foundry Local, the embedded runtime); a
        # RAG_BASE_URL elsewhere was refused above under local-only, before any request.
        local = endpoint.origin != "settings" or is_loopback(endpoint.base_url)
        spec = EndpointSpec(
            name=endpoint.origin, base_url=endpoint.base_url, model=endpoint.model,
            context_window=endpoint.context_window, local=local,
        )  # fmt: skip
        router = cls(EndpointsConfig((spec,), {}, "discovered"), settings, policy=policy, transport=transport,
                     environ=environ, default_endpoint=endpoint)  # fmt: skip
        # Its client is reused: the embedded runtime it may have started must not start twice.
        router._connections[f"{spec.name}\0{spec.model}"] = _Connection(
            spec, endpoint.client, None, endpoint.model, endpoint.context_window
        )
        return router

    @property
    def specs(self) -> tuple[EndpointSpec, ...]:
        return self.config.endpoints

    def spec(self, name: str) -> EndpointSpec:
        for s in self.specs:
            if s.name == name:
                return s
        raise ConfigError(f"no endpoint named {name!r} in {self.config.source} (have {', '.join(s.name for s in self.specs)})")

    def _http_client(self, spec: EndpointSpec) -> httpx.AsyncClient:
        inner = self._transport or httpx.AsyncHTTPTransport()
        if self.policy == "local-only":
            allowed = [_host_of(s.base_url) for s in self.specs if s.local]
            # trust_env=False: a proxy mount from HTTP_PROXY would bypass the guarded transport.
            return httpx.AsyncClient(transport=LocalOnlyTransport(inner, allowed_hosts=allowed), trust_env=False)
        return httpx.AsyncClient(transport=inner, trust_env=not spec.local)

    async def connect(self, spec: EndpointSpec, *, model: str = "") -> _Connection:
        """The endpoint opened (model resolved, window known); raises ``EndpointError``/``PolicyError``."""
        key = f"{spec.name}\0{model or spec.model}"
        async with self._lock:
            if key in self._connections:
                return self._connections[key]
            env = self._environ if self._environ is not None else os.environ
            api_key = env.get(spec.api_key_env, "") if spec.api_key_env else str(self.settings.api_key if spec.name == "settings" else "")
            if spec.api_key_env and not api_key and not spec.local:
                raise ConfigError(f"endpoint {spec.name}: set the environment variable {spec.api_key_env} to its API key")
            s = self.settings
            http = self._http_client(spec)
            client = ChatClient(
                spec.base_url, api_key=api_key, client=http,
                connect_timeout=s.connect_timeout,
                first_token_timeout=spec.first_token_timeout or s.first_token_timeout,
                idle_timeout=s.idle_timeout, connect_retries=s.connect_retries,
            )  # fmt: skip
            try:
                wanted = model or spec.model
                # A configured window belongs to the configured model, not to another one asked for.
                window = spec.context_window if wanted == spec.model else None
                if not wanted or window is None:
                    cards = await client.model_cards()
                    if not wanted:
                        if not cards:
                            raise EndpointError(f"{client.models_url} lists no models", url=client.models_url)
                        wanted = str(cards[0]["id"])
                    elif wanted not in {c.get("id") for c in cards}:
                        wanted = await client.resolve_model(wanted)  # an alias; raises UnknownModelError
                    card = next((c for c in cards if c.get("id") == wanted), {})
                    window = window or int(card.get("context_length") or s.context_window)
            except BaseException:
                await http.aclose()
                raise
            conn = _Connection(spec, client, http, wanted, window)
            self._connections[key] = conn
            return conn

    async def rewrite(self, history: Sequence[Message], question: str) -> str:
        """A follow-up made standalone by the endpoints the policy allows for it, tried in the
        order an answer would try them; the question itself when none succeeds (as
        ``rewrite_question``). Under local-only it never leaves the machine either."""
        if not needs_rewrite(history, question):
            return question
        ordered, _ = order_candidates(self.specs, self.policy, question, self.config.by_task)
        for spec in ordered:
            try:
                conn = await self.connect(spec)
                return await request_rewrite(conn.client, conn.model, history, question, timeout=DEFAULT_REWRITE_TIMEOUT)
            except (RagError, TimeoutError):
                continue
        return question

    async def answer(
        self,
        question: str,
        hits: Sequence[Hit],
        history: Sequence[Message] = (),
        *,
        count: TokenCounter | None = None,
        temperature: float | None = None,
        max_answer_tokens: int | None = None,
        candidates: Sequence[EndpointSpec] | None = None,
        model: str = "",
        system: str = SYSTEM_PROMPT,
    ) -> RoutedAnswer:
        """Start the answer at the first candidate that gives a first token; raises the last
        error (with every reason) when none does."""
        count = count or default_token_counter()
        max_tokens = max_answer_tokens or self.settings.max_answer_tokens
        temp = self.settings.temperature if temperature is None else temperature
        if candidates is None:
            ordered, note = order_candidates(self.specs, self.policy, question, self.config.by_task)
        else:
            ordered, note = list(candidates), "chosen"
        if not ordered:
            raise PolicyError(
                f"no endpoint may answer under the {self.policy} policy: mark one local in "
                f"{self.config.source} or choose another policy"
            )
        reasons: list[str] = []
        last_error: RagError | None = None
        for position, spec in enumerate(ordered):
            is_last = position == len(ordered) - 1
            try:
                conn = await self.connect(spec, model=model if position == 0 else "")
                messages, kept = fit_to_budget(
                    question, hits, history=history, context_window=conn.context_window,
                    reserve_answer_tokens=max_tokens, count=count, system=system,
                )  # fmt: skip
                if len(kept) < len(hits) and not is_last:
                    reasons.append(
                        f"{spec.name} {conn.model}: the prompt with {len(hits)} passages does not fit its "
                        f"{conn.context_window}-token window"
                    )
                    continue
                events = conn.client.stream(messages, model=conn.model, temperature=temp, max_tokens=max_tokens)
                try:
                    first = await anext(events)  # type: ignore[call-overload]
                except BaseException:
                    await events.aclose()  # type: ignore[attr-defined]
                    raise
            except (EndpointError, ContextLengthError, PolicyError, ConfigError) as exc:
                last_error = exc
                reasons.append(f"{spec.name} {spec.model or ''} {_why(exc)}".replace("  ", " "))
                continue
            route = Route(
                endpoint=spec.name, model=conn.model, base_url=spec.base_url, local=spec.local,
                policy=self.policy, fallback="; ".join(reasons), note=note,
            )  # fmt: skip
            return RoutedAnswer(hits=list(kept), messages=messages, model=conn.model,
                                _events=_chain(first, events), route=route)  # fmt: skip
        summary = "; ".join(reasons)
        if isinstance(last_error, PolicyError):
            raise PolicyError(summary) from last_error
        raise EndpointError(f"no endpoint could answer ({self.policy}): {summary}") from last_error

    async def aclose(self) -> None:
        for conn in self._connections.values():
            if conn.http is not None:
                await conn.http.aclose()
        self._connections.clear()
        if self._default is not None:
            await self._default.close()  # its client, and the embedded runtime it started
            self._default = None


def _why(exc: BaseException) -> str:
    """A short reason for a fallback line: the kind of failure, then the message."""
    from rag.errors import EndpointTimeoutError, EndpointUnreachableError

    kind = (
        "unreachable" if isinstance(exc, EndpointUnreachableError)
        else "timed out" if isinstance(exc, EndpointTimeoutError)
        else "context too small" if isinstance(exc, ContextLengthError)
        else "refused by policy" if isinstance(exc, PolicyError)
        else "failed"
    )  # fmt: skip
    message = str(exc)
    return f"{kind}: {message[:240]}" + ("…" if len(message) > 240 else "")


async def _chain(first: ChatEvent, rest: Any) -> AsyncGenerator[ChatEvent, None]:
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await rest.aclose()

