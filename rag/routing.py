"""Routing: which endpoint answers a question, under a policy, with fallback.

The endpoints are ``rag.endpoints``' (a file, or the one discovered). Policies (``RAG_POLICY``,
or per chat):

- ``local-only`` (default): only endpoints marked local are tried, and every request made
  under this policy goes through a transport that refuses (``PolicyError``) to send anything
  to a host that is not local, so no document text leaves the machine even through a bug in
  the order of candidates.
- ``local-first``: local endpoints in file order, then the others.
- ``cloud-first``: the others first, then the local ones.
- ``by-task``: ``classify_task`` (keyword rules, explainable) picks the endpoint from
  ``[by_task]``; if it fails, only local endpoints are tried next (an error never sends text out).

``Router.answer`` calls ``rag.answering.start_answer`` for one candidate after the other. A
candidate is skipped, with the reason recorded, when the prompt would not fit its context
window without dropping passages (and another candidate remains), when it cannot be reached,
answers an HTTP error, or gives no first token within its first-token timeout. Once the first
token arrived the answer is committed: a later failure is raised, never retried elsewhere, so an
answer is never shown twice or spliced from two models. A queue notice (``Queued``: a busy
server holds the request in line) is not a first token: nothing of the answer has been shown,
so a candidate that times out or fails while queued still falls back to the next one. Its
notices are handed to ``on_queued`` as they come (the chat shows the place in line).

Connections are opened lazily and kept; one that stops answering (unreachable, broken) is
dropped and opened afresh next time, so a restarted server, or a Foundry Local service on a new
port, is found again.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from rag.answering import Answer, needs_rewrite, request_rewrite, start_answer
from rag.chat import ChatClient, is_loopback
from rag.config import POLICIES, Settings
from rag.endpoints import EndpointsConfig, EndpointSpec, discover, endpoints_config
from rag.errors import (
    ConfigError,
    ContextLengthError,
    EndpointError,
    EndpointTimeoutError,
    EndpointUnreachableError,
    PolicyError,
    RagError,
    UnknownModelError,
)
from rag.prompting import SYSTEM_PROMPT, TokenCounter, default_token_counter
from rag.protocol import pick_model
from rag.types import Hit, Message, Queued

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


# --- Connections ----------------------------------------------------------------------------


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

    named: bool = True  # False: the one discovered endpoint, shown by its model alone

    def describe(self) -> str:
        """One line for a footer.

        >>> Route("local", "smollm2", "http://127.0.0.1:1/v1", True, "local-first").describe()
        'local · smollm2 (local-first)'
        >>> Route("default", "smollm2", "http://127.0.0.1:1/v1", True, "local-only", named=False).describe()
        'smollm2'
        """
        text = f"{self.endpoint} · {self.model} ({self.policy})" if self.named else self.model
        return text + (f"; fallback: {self.fallback}" if self.fallback else "")


@dataclass
class Connection:
    """An endpoint opened: its URL, what it serves (model id -> context window), its clients.

    Requests under ``local-only`` go through a client whose transport refuses non-local hosts
    (``client(policy)``); the others through a plain one (a proxy is honoured for remote hosts
    only).
    """

    spec: EndpointSpec
    base_url: str
    origin: str
    model: str  # the endpoint's own: the configured one, resolved, else the first listed
    windows: dict[str, int]
    _clients: dict[bool, ChatClient] = field(default_factory=dict, repr=False)
    _make_client: Callable[[bool], ChatClient] = field(default=lambda guarded: None, repr=False)  # type: ignore[assignment, return-value]
    _stop: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def models(self) -> list[str]:
        return list(self.windows)

    @property
    def local(self) -> bool:
        return self.spec.local

    def client(self, policy: str) -> ChatClient:
        guarded = policy == "local-only" or self.spec.local
        if guarded not in self._clients:
            self._clients[guarded] = self._make_client(guarded)
        return self._clients[guarded]

    def pick(self, wanted: str = "") -> str:
        """The id to send for ``wanted`` (an id or an alias it lists); the endpoint's own for ''."""
        if not wanted:
            return self.model
        picked = pick_model(wanted, self.models)
        if picked is None:
            raise UnknownModelError(
                f"{self.base_url} does not serve model {wanted!r}; it offers: {', '.join(self.models) or 'nothing'}",
                url=self.base_url,
                available=tuple(self.models),
            )
        return picked

    def window(self, model: str, default: int) -> int:
        """The context window of ``model``: the configured one for the configured model, else
        what the endpoint said, else ``default`` (``RAG_CONTEXT_WINDOW``)."""
        if self.spec.context_window and not self.spec.discovered and model == self.spec.model:
            return self.spec.context_window
        return self.windows.get(model) or default

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
        stop, self._stop = self._stop, lambda: None
        await asyncio.to_thread(stop)


# --- The router -----------------------------------------------------------------------------


class Router:
    """The endpoints, their connections, and the policy's order of candidates."""

    def __init__(
        self,
        settings: Settings,
        config: EndpointsConfig | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.config = config if config is not None else endpoints_config(settings)
        self._transport = transport
        self._environ = environ
        self._connections: dict[str, Connection] = {}
        self._lock = asyncio.Lock()

    @property
    def specs(self) -> tuple[EndpointSpec, ...]:
        return self.config.endpoints

    @property
    def named(self) -> bool:
        """Whether the endpoints come from a file (else: the one discovered endpoint)."""
        return not any(s.discovered for s in self.specs)

    def spec(self, name: str) -> EndpointSpec:
        for s in self.specs:
            if s.name == name:
                return s
        raise ConfigError(f"no endpoint named {name!r} in {self.config.source} (have {', '.join(s.name for s in self.specs)})")

    def candidates(self, question: str = "", policy: str | None = None) -> tuple[list[EndpointSpec], str]:
        """The endpoints ``policy`` lets answer ``question``, in order, and why; raises
        ``PolicyError`` when it lets none."""
        policy = policy or self.settings.policy
        ordered, note = order_candidates(self.specs, policy, question, self.config.by_task)
        if not ordered:
            raise self._nobody(policy)
        return ordered, note

    def _nobody(self, policy: str) -> PolicyError:
        if not self.named and self.settings.base_url:
            return PolicyError(
                f"RAG_BASE_URL={self.settings.base_url} is not on this machine and the policy is {policy}: "
                "choose RAG_POLICY=local-first or cloud-first (or another policy in the chat's settings), or "
                f"list it with local = true in {self.settings.endpoints_file}"
            )
        return PolicyError(
            f"no endpoint may answer under the {policy} policy: mark one local in "
            f"{self.config.source or self.settings.endpoints_file} or choose another policy"
        )

    # -- connections --

    def _http_client(self, guarded: bool, spec: EndpointSpec) -> httpx.AsyncClient:
        inner = self._transport or httpx.AsyncHTTPTransport()
        if guarded:
            allowed = [_host_of(s.base_url) for s in self.specs if s.local and s.base_url]
            # trust_env=False: a proxy mount from HTTP_PROXY would bypass the guarded transport.
            return httpx.AsyncClient(transport=LocalOnlyTransport(inner, allowed_hosts=allowed), trust_env=False)
        return httpx.AsyncClient(transport=inner, trust_env=not spec.local)

    def _api_key(self, spec: EndpointSpec) -> str:
        if spec.discovered:
            return str(self.settings.api_key)
        env = self._environ if self._environ is not None else os.environ
        key = env.get(spec.api_key_env, "") if spec.api_key_env else ""
        if spec.api_key_env and not key and not spec.local:
            raise ConfigError(f"endpoint {spec.name}: set the environment variable {spec.api_key_env} to its API key")
        return key

    async def connect(self, spec: EndpointSpec, *, policy: str | None = None) -> Connection:
        """The endpoint opened (discovered if need be, models listed); raises ``EndpointError``,
        ``PolicyError`` (a remote endpoint under local-only), ``ConfigError``."""
        policy = policy or self.settings.policy
        async with self._lock:
            conn = self._connections.get(spec.name)
            if conn is None:
                conn = await self._open(spec, policy)
                self._connections[spec.name] = conn
        if policy == "local-only" and not spec.local:
            raise PolicyError(
                f"refused to send a request to {conn.base_url}: the policy is local-only, so nothing leaves this "
                "machine; choose RAG_POLICY=local-first or cloud-first"
            )
        return conn

    async def _open(self, spec: EndpointSpec, policy: str) -> Connection:
        s = self.settings
        api_key = self._api_key(spec)
        found = await discover(s) if spec.discovered else None
        base_url = found.base_url if found is not None else spec.base_url
        stop = found.stop if found is not None else (lambda: None)

        def make_client(guarded: bool) -> ChatClient:
            return ChatClient(
                base_url, api_key=api_key, client=self._http_client(guarded, spec),
                connect_timeout=s.connect_timeout, first_token_timeout=spec.first_token_timeout or s.first_token_timeout,
                idle_timeout=s.idle_timeout, connect_retries=s.connect_retries,
            )  # fmt: skip

        conn = Connection(spec, base_url, found.origin if found else spec.name, "", {}, _make_client=make_client,
                          _stop=stop)  # fmt: skip
        if spec.model and spec.context_window and not spec.discovered:
            conn.model, conn.windows = spec.model, {spec.model: spec.context_window}
            return conn  # all it needs was configured: nothing to ask the endpoint
        try:
            client = conn.client(policy)
            cards = await client.model_cards()
            # A ``rag:`` model (rag serve's retrieval models, rag/api.py) retrieves again: never ours to ask.
            conn.windows = {str(c["id"]): int(c.get("context_length") or 0) for c in cards
                            if not str(c["id"]).startswith("rag:")}  # fmt: skip
            if spec.model:
                conn.model = conn.pick(spec.model)
            elif conn.windows:
                conn.model = next(iter(conn.windows))  # the embedded runtime lists its default first
            else:
                raise UnknownModelError(
                    f"{client.models_url} lists no models (Foundry Local lists loaded models only: run "
                    "`foundry model run <alias>` first)",
                    url=client.models_url,
                )
            conn.base_url = client.chat_url.removesuffix("/chat/completions")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def forget(self, spec: EndpointSpec) -> None:
        """Drop ``spec``'s connection (it stopped answering): the next request opens it again."""
        async with self._lock:
            conn = self._connections.pop(spec.name, None)
        if conn is not None:
            await conn.close()

    def opened(self, policy: str | None = None) -> Connection | None:
        """The first endpoint ``policy`` would ask, if it is open (nothing is sent)."""
        ordered, _ = order_candidates(self.specs, policy or self.settings.policy, "", self.config.by_task)
        return self._connections.get(ordered[0].name) if ordered else None

    async def primary(self, policy: str | None = None) -> Connection:
        """The first endpoint ``policy`` would ask, opened: what a chat shows as its model."""
        ordered, _ = self.candidates(policy=policy)
        return await self.connect(ordered[0], policy=policy)

    # -- requests --

    async def rewrite(
        self, history: Sequence[Message], question: str, *, policy: str | None = None, model: str = ""
    ) -> str:
        """A follow-up made standalone by the endpoints the policy allows for it, tried in the
        order an answer would try them (``model`` at the first); the question itself when none
        succeeds. Under local-only it never leaves the machine either."""
        if not needs_rewrite(history, question):
            return question
        policy = policy or self.settings.policy
        try:
            ordered, _ = self.candidates(question, policy)
        except PolicyError:
            return question
        for position, spec in enumerate(ordered):
            try:
                conn = await self.connect(spec, policy=policy)
                chosen = conn.pick(model if position == 0 else "")
                return await request_rewrite(conn.client(policy), chosen, history, question)
            except (EndpointUnreachableError, EndpointTimeoutError) as exc:
                if isinstance(exc, EndpointUnreachableError):
                    await self.forget(spec)
                continue
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
        policy: str | None = None,
        model: str = "",
        temperature: float | None = None,
        max_answer_tokens: int | None = None,
        candidates: Sequence[EndpointSpec] | None = None,
        system: str = SYSTEM_PROMPT,
        on_queued: Callable[[Queued], Awaitable[None]] | None = None,
    ) -> Answer:
        """Start the answer at the first candidate that gives a first token (``model`` at the
        first, if given); raises the last error, with every reason, when none does.
        ``on_queued`` gets each candidate's queue notices while it waits for that token."""
        policy = policy or self.settings.policy
        count = count or default_token_counter()
        max_tokens = max_answer_tokens or self.settings.max_answer_tokens
        temp = self.settings.temperature if temperature is None else temperature
        if candidates is None:
            ordered, note = self.candidates(question, policy)
        else:
            ordered, note = list(candidates), "chosen"
        reasons: list[str] = []
        last_error: RagError | None = None
        for position, spec in enumerate(ordered):
            is_last = position == len(ordered) - 1
            try:
                conn = await self.connect(spec, policy=policy)
                chosen = conn.pick(model if position == 0 else "")
                window = conn.window(chosen, self.settings.context_window)
                reply = start_answer(
                    conn.client(policy), chosen, question, hits, history, context_window=window, count=count,
                    max_answer_tokens=max_tokens, temperature=temp, system=system,
                )  # fmt: skip
                if len(reply.hits) < len(hits) and not is_last:
                    await reply.aclose()
                    reasons.append(
                        f"{spec.name} {chosen}: the prompt with {len(hits)} passages does not fit its "
                        f"{window}-token window"
                    )
                    continue
                reply.on_error = self._forgetter(spec)
                reply.on_queued = on_queued
                await reply.start()
            except (EndpointError, ContextLengthError, PolicyError, ConfigError) as exc:
                last_error = exc
                reasons.append(f"{spec.name} {spec.model or ''} {_why(exc)}".replace("  ", " "))
                continue
            reply.route = Route(
                endpoint=conn.origin, model=chosen, base_url=conn.base_url, local=spec.local, policy=policy,
                fallback="; ".join(reasons), note=note, named=not spec.discovered,
            )  # fmt: skip
            return reply
        if isinstance(last_error, PolicyError):
            raise PolicyError("; ".join(reasons)) from last_error
        if not self.named and last_error is not None:
            raise last_error  # the one discovered endpoint: its own error says it best
        raise EndpointError(f"no endpoint could answer ({policy}): {'; '.join(reasons)}") from last_error

    def _forgetter(self, spec: EndpointSpec) -> Callable[[EndpointError], Awaitable[None]]:
        """What to do when ``spec``'s answer fails: drop its connection when it turned out
        unreachable or broke (timeouts and HTTP errors come from a live server: it is kept)."""

        async def on_error(exc: EndpointError) -> None:
            if isinstance(exc, EndpointUnreachableError) or type(exc) is EndpointError:
                await self.forget(spec)

        return on_error

    async def aclose(self) -> None:
        async with self._lock:
            connections, self._connections = list(self._connections.values()), {}
        for conn in connections:
            await conn.close()


def _why(exc: BaseException) -> str:
    """A short reason for a fallback line: the kind of failure, then the message."""
    kind = (
        "unreachable" if isinstance(exc, EndpointUnreachableError)
        else "timed out" if isinstance(exc, EndpointTimeoutError)
        else "context too small" if isinstance(exc, ContextLengthError)
        else "refused by policy" if isinstance(exc, PolicyError)
        else "failed"
    )  # fmt: skip
    message = str(exc)
    return f"{kind}: {message[:240]}" + ("…" if len(message) > 240 else "")
