"""Sign-in settings and checks (rag/access.py): the mode, the host check at start, the local
sign-in's limits, roles, and Chainlit's auth secret kept in the data directory."""

from __future__ import annotations

import doctest
import stat
import threading
from pathlib import Path

import pytest
from argon2 import PasswordHasher

import rag.access
from rag.access import (
    check_sign_in,
    current_role,
    ensure_auth_secret,
    host_of,
    is_loopback,
    local_sign_in_allowed,
    may,
    role_of,
    route_needs,
    settings_allowed,
    sign_in_mode,
    users_path,
)
from rag.config import Settings, load_settings
from rag.errors import ConfigError
from rag.users import UserStore


def test_doctests() -> None:
    assert doctest.testmod(rag.access).failed == 0


def test_settings_read_auth_database_and_anonymous(tmp_path: Path) -> None:
    s = load_settings(environ={}, dotenv=None)
    assert (s.auth, str(s.database_url), s.allow_anonymous) == ("none", "", False)
    s = load_settings(
        environ={"RAG_AUTH": "password", "RAG_DATABASE_URL": "postgresql://u:pw@db/rag", "RAG_ALLOW_ANONYMOUS": "1"},
        dotenv=None,
    )
    assert (s.auth, str(s.database_url), s.allow_anonymous) == ("password", "postgresql://u:pw@db/rag", True)
    assert "pw" not in repr(s)  # the URL may hold a password: kept out of reprs and logs
    for raw, value in (("true", True), ("YES", True), ("on", True), ("0", False), ("", False), ("off", False)):
        assert load_settings(environ={"RAG_ALLOW_ANONYMOUS": raw}, dotenv=None).allow_anonymous is value


def test_bad_auth_settings_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="RAG_AUTH='ldap' is not one of none, password"):
        load_settings(environ={"RAG_AUTH": "ldap"}, dotenv=None)
    with pytest.raises(ConfigError, match="RAG_ALLOW_ANONYMOUS='maybe' is not a valid bool"):
        load_settings(environ={"RAG_ALLOW_ANONYMOUS": "maybe"}, dotenv=None)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("app.localhost", True), ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.5", False),
     ("myhost.lan", False)],
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_the_host_comes_from_chainlit_host() -> None:
    assert host_of({}) == "127.0.0.1"  # chainlit run's default
    assert host_of({"CHAINLIT_HOST": "0.0.0.0"}) == "0.0.0.0"  # chainlit run --host 0.0.0.0 sets it


def test_modes(settings: Settings) -> None:
    assert sign_in_mode(settings, "127.0.0.1") == "local"
    assert sign_in_mode(settings.replace(auth="password"), "0.0.0.0") == "password"
    assert sign_in_mode(settings.replace(auth="password"), "127.0.0.1") == "password"
    assert sign_in_mode(settings.replace(allow_anonymous=True), "0.0.0.0") == "anonymous"
    assert sign_in_mode(settings.replace(allow_anonymous=True), "localhost") == "local"


def test_serving_the_network_without_sign_in_is_refused_with_directions(settings: Settings) -> None:
    with pytest.raises(ConfigError) as caught:
        check_sign_in(settings, "0.0.0.0")
    message = str(caught.value)
    assert "refusing to serve on 0.0.0.0 without sign-in" in message
    for direction in ("RAG_AUTH=password", "python -m rag users add NAME --role admin", "--host 127.0.0.1",
                      "RAG_ALLOW_ANONYMOUS=1"):  # fmt: skip
        assert direction in message


def test_password_sign_in_needs_a_user(settings: Settings) -> None:
    password = settings.replace(auth="password")
    with pytest.raises(ConfigError, match=r"no users in .*users\.json: add one with `python -m rag users add"):
        check_sign_in(password, "0.0.0.0")
    UserStore(users_path(settings), hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)).add(
        "ada", "correct horse", role="admin"
    )
    assert check_sign_in(password, "0.0.0.0") == "password"


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [({"host": "127.0.0.1:8000"}, True), ({"Host": "localhost:8000"}, True), ({"host": "[::1]:8000"}, True),
     ({"host": "localhost"}, True), ({}, False), ({"host": "192.168.1.20:8000"}, False),
     ({"host": "attacker.example:8000"}, False),  # DNS rebinding: a page's own name pointed at 127.0.0.1
     ({"host": "127.0.0.1:8000", "X-Forwarded-For": "203.0.113.9"}, False),  # behind a proxy
     ({"host": "127.0.0.1:8000", "forwarded": "for=203.0.113.9"}, False)],
)  # fmt: skip
def test_local_sign_in_only_for_requests_that_look_local(headers: dict[str, str], allowed: bool) -> None:
    assert local_sign_in_allowed(headers) is allowed


def test_roles_fail_closed() -> None:
    assert role_of({"role": "admin"}) == "admin"
    assert role_of('{"role": "admin"}') == "admin"  # as the SQLite data layer returns it
    assert [role_of(m) for m in (None, {}, {"role": "root"}, "not json", {"role": ["admin"]})] == ["reader"] * 5
    assert may("admin", "upload") and may("admin", "corpus_settings")
    assert not may("reader", "upload") and not may("reader", "corpus_settings") and not may("admin", "anything")


def test_auth_secret_is_made_once_and_kept_private(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    first = ensure_auth_secret(tmp_path / "data", env)
    assert env["CHAINLIT_AUTH_SECRET"] == first and len(first) >= 64
    path = tmp_path / "data" / "auth-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again: dict[str, str] = {}
    assert ensure_auth_secret(tmp_path / "data", again) == first  # a restart keeps everyone signed in
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["auth-secret"]


def test_a_secret_the_user_set_wins(tmp_path: Path) -> None:
    env = {"CHAINLIT_AUTH_SECRET": "set-by-the-user"}
    assert ensure_auth_secret(tmp_path / "data", env) == "set-by-the-user"
    assert not (tmp_path / "data").exists()


def test_two_processes_starting_at_once_agree_on_one_secret(tmp_path: Path) -> None:
    results: list[str] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        results.append(ensure_auth_secret(tmp_path, {}))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["auth-secret"]


def test_an_empty_secret_file_is_explained(tmp_path: Path) -> None:
    (tmp_path / "auth-secret").write_text("")
    with pytest.raises(ConfigError, match="auth-secret is empty: remove it"):
        ensure_auth_secret(tmp_path, {})


def test_the_current_role_is_read_from_the_users_file(settings: Settings) -> None:
    store = UserStore(users_path(settings), hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    store.add("ada", "correct horse", role="admin")
    store.add("bob", "battery staple")
    assert current_role(settings, "password", "ada") == "admin"
    assert current_role(settings, "password", "bob") == "reader"
    store.add("bob", "battery staple", role="admin", replace=True)
    assert current_role(settings, "password", "bob") == "admin"  # promoted: no new sign-in needed
    store.remove("bob")
    assert current_role(settings, "password", "bob") is None  # removed: the session must end
    assert current_role(settings, "password", "local") is None
    assert current_role(settings, "local", "local") == "admin"
    assert current_role(settings, "local", "ada") is None
    assert current_role(settings, "anonymous", "") == "admin"
    users_path(settings).write_text("{damaged")
    assert current_role(settings, "password", "ada") is None
    assert not may(None, "upload")


def test_readers_cannot_change_shared_settings() -> None:
    values = {"top_k": 8, "temperature": 0.5, "mode": "bm25", "min_relevance": 0.2, "model": "m", "policy": "cloud-first"}
    assert settings_allowed("reader", values) == {k: v for k, v in values.items() if k != "policy"}
    assert settings_allowed(None, values) == settings_allowed("reader", values)
    assert settings_allowed("admin", values) == values


@pytest.mark.parametrize(
    ("method", "path", "need"),
    [("POST", "/project/file", "upload"), ("POST", "/project/file/", "upload"), ("GET", "/project/file/abc", "account"),
     ("POST", "/project/threads", "account"), ("GET", "/project/settings", "account"), ("PUT", "/feedback", "feedback"),
     ("DELETE", "/feedback/", "feedback"), ("GET", "/feedback", "account"),
     ("GET", "/user", "account"), ("GET", "/ws/socket.io/", "account"), ("POST", "/mcp", "account"),
     ("GET", "/", None), ("GET", "/thread/abc", None), ("GET", "/login", None), ("POST", "/login", None),
     ("POST", "/logout", None), ("POST", "/auth/header", None), ("GET", "/project/translations", None),
     ("GET", "/assets/index.js", None), ("GET", "/public/style.css", None), ("GET", "/health", None)],
)  # fmt: skip
def test_which_routes_the_guard_checks(method: str, path: str, need: str | None) -> None:
    assert route_needs(method, path) == need
