"""Who may use the app: the sign-in mode, the start-up host check, Chainlit's session secret,
and what each role may do. Plain values in and out; app.py turns them into Chainlit callbacks.

Three ways to run (``sign_in_mode``):

==========  =====================================  ==========================================
mode        when                                   what happens
==========  =====================================  ==========================================
local       ``RAG_AUTH=none`` on a loopback host   the page signs in by itself as ``local``
            (the default: ``make run``)            (an admin); chats are kept per that user
password    ``RAG_AUTH=password``                  a login page; users from ``users.json``
anonymous   ``RAG_AUTH=none`` on another address   no sign-in and no chat history: the person
            and ``RAG_ALLOW_ANONYMOUS=1``          running it said so explicitly
==========  =====================================  ==========================================

``RAG_AUTH=none`` on a non-loopback address without ``RAG_ALLOW_ANONYMOUS=1`` refuses to start
(``check_sign_in``): anyone who reaches the port could read every chat and add documents.

How the app knows its host: ``chainlit run app.py --host H`` puts ``H`` in ``CHAINLIT_HOST``
before app.py is loaded (so does setting ``CHAINLIT_HOST`` yourself); unset, Chainlit binds
``127.0.0.1``. ``host_of(environ)`` reads it the same way.

The local sign-in trusts the requests it sees only as far as they look local
(``local_sign_in_allowed``): a ``Host`` header naming this machine and no proxy headers, so a
reverse proxy in front of a loopback app, or a web page that rebinds a DNS name to 127.0.0.1,
does not get an admin session for free.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from rag.config import Settings
from rag.errors import ConfigError
from rag.users import USERS_FILE, UserStore

AUTH_SECRET_ENV = "CHAINLIT_AUTH_SECRET"
AUTH_SECRET_FILE = "auth-secret"
LOCAL_USER = "local"
SIGN_IN_MODES = ("local", "password", "anonymous")
# What each role may do. "upload": add files to the shared corpus; "corpus_settings": see and
# change settings that affect everyone (the corpus, where questions may be sent).
PERMISSIONS = {
    "admin": frozenset({"upload", "corpus_settings"}),
    "reader": frozenset(),
}
# Chat settings that affect more than the chat that changes them: which endpoints may receive
# questions and passages from the shared documents. Only roles with "corpus_settings" see them.
SHARED_SETTINGS = frozenset({"policy"})
_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")


def users_path(settings: Settings) -> Path:
    return settings.data_dir / USERS_FILE


def user_store(settings: Settings) -> UserStore:
    return UserStore(users_path(settings))


def host_of(environ: Mapping[str, str]) -> str:
    """The address Chainlit binds: ``chainlit run --host`` sets ``CHAINLIT_HOST``; the default
    is Chainlit's own (127.0.0.1)."""
    return environ.get("CHAINLIT_HOST") or "127.0.0.1"


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this computer only.

    >>> [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "", "192.168.1.5", "example.org")]
    [True, True, True, False, False, False, False]
    """
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a name we would have to resolve, or "": treat as reachable from elsewhere


def sign_in_mode(settings: Settings, host: str) -> str:
    """``local``, ``password`` or ``anonymous`` (see the module docstring); raises
    ``ConfigError`` saying how to set sign-in up when the app must not start this way."""
    if settings.auth == "password":
        return "password"
    if is_loopback(host):
        return "local"
    if settings.allow_anonymous:
        return "anonymous"
    raise ConfigError(
        f"refusing to serve on {host or 'every address'} without sign-in: anyone who can reach it could "
        "read every chat and add documents. Either turn sign-in on (RAG_AUTH=password, then add "
        "users with `python -m rag users add NAME --role admin`), or serve on this computer only "
        "(--host 127.0.0.1), or set RAG_ALLOW_ANONYMOUS=1 to serve everyone without sign-in and "
        "without chat history."
    )


def check_sign_in(settings: Settings, host: str) -> str:
    """Everything the app checks about sign-in before it starts; returns the mode.

    ``password`` needs at least one user in the users file, and one admin to add documents."""
    mode = sign_in_mode(settings, host)
    if mode == "password":
        users = user_store(settings).list()
        if not users:
            raise ConfigError(
                f"RAG_AUTH=password but there are no users in {users_path(settings)}: add one with "
                "`python -m rag users add NAME --role admin`"
            )
    return mode


def local_sign_in_allowed(headers: Mapping[str, str]) -> bool:
    """Whether a request may be signed in as the local user: it names this machine in its
    ``Host`` header and came through no proxy.

    >>> local_sign_in_allowed({"host": "127.0.0.1:8000"}), local_sign_in_allowed({"host": "localhost"})
    (True, True)
    >>> local_sign_in_allowed({"host": "evil.example:8000"}), local_sign_in_allowed({"host": "localhost", "x-forwarded-for": "10.0.0.9"})
    (False, False)
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    if any(name in lowered for name in _PROXY_HEADERS):
        return False
    host = lowered.get("host", "")
    if host.startswith("["):  # [::1]:8000
        name = host[1:].split("]", 1)[0]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return bool(name) and is_loopback(name)


def role_of(metadata: Mapping[str, object] | str | None) -> str:
    """The role a signed-in user's metadata carries; anything unknown is a reader.

    >>> role_of({"role": "admin"}), role_of({}), role_of({"role": "root"}), role_of('{"role": "admin"}')
    ('admin', 'reader', 'reader', 'admin')
    """
    if isinstance(metadata, str):  # the SQL data layer hands metadata back as JSON text
        try:
            metadata = json.loads(metadata)
        except ValueError:
            metadata = None
    role = metadata.get("role") if isinstance(metadata, Mapping) else None
    return role if isinstance(role, str) and role in PERMISSIONS else "reader"


_ACCOUNT_ROUTES = ("/user", "/project/", "/feedback", "/mcp", "/ws/", "/set-session-cookie")


def route_path(path: str, *prefixes: str) -> str:
    """A request's path as Chainlit's routes name it: without the prefixes the app is served
    under, in order (the ASGI ``root_path`` a server or proxy sets, then Chainlit's own
    ``--root-path`` / ``CHAINLIT_ROOT_PATH``, which prefixes every route it has).

    >>> route_path("/kb/project/file", "", "/kb"), route_path("/kb/project/file", "/kb/"), route_path("/kbx/user", "/kb")
    ('/project/file', '/project/file', '/kbx/user')
    >>> route_path("/proxy/kb/feedback", "/proxy", "/kb"), route_path("/kb", "/kb"), route_path("/user", "/", "")
    ('/feedback', '/', '/user')
    """
    for prefix in prefixes:
        prefix = prefix.rstrip("/")
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            path = path[len(prefix):] or "/"
    return path


def route_needs(method: str, path: str) -> str | None:
    """What a request to Chainlit's server needs on top of Chainlit's own checks: ``"upload"``
    (an admin) to put a file into a chat (``POST /project/file``), ``"feedback"`` (an account,
    rating answers in its own chats only: ``rag.history.feedback_allowed``) to rate an answer or
    take a rating back, ``"account"`` (a user who still exists) for the other data routes and the
    chat socket, ``None`` for pages, assets and signing in or out (a removed user must still get
    the login page).

    >>> route_needs("POST", "/project/file"), route_needs("GET", "/project/thread/x"), route_needs("GET", "/thread/x")
    ('upload', 'account', None)
    >>> route_needs("GET", "/ws/socket.io/"), route_needs("POST", "/login"), route_needs("GET", "/project/translations")
    ('account', None, None)
    >>> route_needs("PUT", "/feedback"), route_needs("DELETE", "/feedback")
    ('feedback', 'feedback')
    """
    if method == "POST" and path.rstrip("/") == "/project/file":
        return "upload"
    if method in ("PUT", "DELETE") and path.rstrip("/") == "/feedback":
        return "feedback"
    if path == "/project/translations":  # the login page needs it too
        return None
    if path == "/user" or any(path.startswith(prefix) for prefix in _ACCOUNT_ROUTES[1:]):
        return "account"
    return None


def current_role(settings: Settings, mode: str, identifier: str) -> str | None:
    """The role ``identifier`` has *now*: read from the users file at each call (Chainlit's
    session token keeps the role of its sign-in for days), ``None`` when the user was removed
    (the session must stop working). The local user is an admin; everyone is one in
    ``anonymous`` mode (no sign-in at all, as the person running it chose)."""
    if mode == "anonymous":
        return "admin"
    if mode == "local":
        return "admin" if identifier == LOCAL_USER else None
    try:
        record = user_store(settings).get(identifier)
    except ConfigError:
        return None  # a damaged users file: fail closed
    return record.role if record is not None else None


def may(role: str | None, action: str) -> bool:
    """Whether ``role`` may do ``action`` (``upload``, ``corpus_settings``).

    >>> may("admin", "upload"), may("reader", "upload"), may("nobody", "upload")
    (True, False, False)
    """
    return role is not None and action in PERMISSIONS.get(role, frozenset())


def settings_allowed(role: str | None, values: Mapping[str, object]) -> dict[str, object]:
    """The chat-settings ``values`` this role may change (the others are dropped: the panel
    hides them, and a crafted update must not get through either).

    >>> settings_allowed("reader", {"top_k": 3, "policy": "cloud-first"}), settings_allowed("admin", {"policy": "cloud-first"})
    ({'top_k': 3}, {'policy': 'cloud-first'})
    """
    if may(role, "corpus_settings"):
        return dict(values)
    return {k: v for k, v in values.items() if k not in SHARED_SETTINGS}


def ensure_auth_secret(data_dir: Path, environ: MutableMapping[str, str] | None = None) -> str:
    """Chainlit's session-signing secret: ``CHAINLIT_AUTH_SECRET`` when set, else the one kept in
    ``<data_dir>/auth-secret`` (made once, 0600). Puts it in ``environ`` (default ``os.environ``),
    where Chainlit reads it, and returns it. Sessions survive restarts because it is kept;
    deleting the file signs everyone out."""
    env = os.environ if environ is None else environ
    given = env.get(AUTH_SECRET_ENV, "")
    if given:
        return given
    path = data_dir / AUTH_SECRET_FILE
    secret = _read_secret(path) or _create_secret(path)
    env[AUTH_SECRET_ENV] = secret
    return secret


def _read_secret(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; remove it to make a new one (everyone is signed out)") from exc


def _create_secret(path: Path) -> str:
    """Write a new secret unless another process just did: link a complete temp file into place
    (fails if the name exists), so nobody ever reads a half-written secret."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_urlsafe(48) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won: use theirs
    finally:
        tmp.unlink(missing_ok=True)
    secret = _read_secret(path)
    if not secret:
        raise ConfigError(f"{path} is empty: remove it to make a new one")
    return secret
