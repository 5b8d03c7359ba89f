"""The people who may sign in: a users file under the data directory, with argon2id hashes.

``python -m rag users add|remove|list`` manages it; the app checks passwords against it when
``RAG_AUTH=password``. The file is JSON, versioned (``"format": "rag-users v1"``), written to a
temp file and renamed into place, readable by its owner only (0600)::

    {"format": "rag-users v1",
     "users": {"ada": {"role": "admin", "hash": "$argon2id$v=19$m=65536,t=3,p=4$…", "created": "…"}}}

Trade-offs:

- argon2id (argon2-cffi, RFC 9106's recommended parameters: 64 MiB, 3 passes) rather than
  bcrypt: memory-hard, no 72-byte password limit, parameters stored in each hash so they can be
  raised later (a hash made with older parameters is rehashed at the next successful sign-in).
  A check costs ~0.1-0.3 s of CPU here: the app runs it in a thread.
- A wrong password and an unknown user get the same answer (``None``) after the same work:
  an unknown name is checked against a dummy hash made with the same parameters, so the time a
  sign-in takes does not say whether the name exists.
- Roles are two on purpose: ``admin`` may add documents and change what is shared; ``reader``
  asks questions. Anything else read from the file counts as ``reader`` (fail closed).
- One writer at a time (an advisory lock next to the file); readers never see a half-written
  file (rename).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from rag.errors import ConfigError

FORMAT = "rag-users v1"
USERS_FILE = "users.json"
ROLES = ("admin", "reader")
DEFAULT_ROLE = "reader"
MIN_PASSWORD_CHARS = 8
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


@dataclass(frozen=True)
class UserRecord:
    name: str
    role: str
    created: str = ""


def check_name(name: str) -> str:
    """A user name: 1-64 letters, digits and ``. _ @ -``, starting with a letter or digit.

    >>> check_name("ada.lovelace@example.org")
    'ada.lovelace@example.org'
    """
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"user name {name!r} is not allowed: use 1-64 letters, digits and . _ @ -, "
            "starting with a letter or digit"
        )
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise ConfigError(f"the password is too short: use at least {MIN_PASSWORD_CHARS} characters")
    return password


class UserStore:
    """The users file at ``path``. Every method reads the file afresh: the CLI may change it
    while the app runs, and the app sees the change at the next sign-in."""

    def __init__(self, path: Path, *, hasher: PasswordHasher | None = None) -> None:
        self.path = path
        self.hasher = hasher or PasswordHasher()
        self._dummy: str | None = None

    # --- reading ---------------------------------------------------------------------------

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read the users file {self.path}: {exc.strerror or exc}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"the users file {self.path} is not valid JSON ({exc}): fix or remove it") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("users"), dict):
            found = data.get("format") if isinstance(data, dict) else None
            raise ConfigError(
                f"the users file {self.path} is not in the format {FORMAT!r} (found {found!r}): "
                "it was written by another version; move it away and add the users again"
            )
        return data["users"]

    def list(self) -> list[UserRecord]:
        """Every user, sorted by name."""
        return [_record(name, entry) for name, entry in sorted(self._read().items())]

    def get(self, name: str) -> UserRecord | None:
        entry = self._read().get(name)
        return _record(name, entry) if isinstance(entry, dict) else None

    def __len__(self) -> int:
        return len(self._read())

    # --- checking a password ---------------------------------------------------------------

    def verify(self, name: str, password: str) -> UserRecord | None:
        """The user, when ``password`` is theirs; ``None`` for a wrong password, an unknown name
        or a damaged entry alike, after the same amount of hashing."""
        try:
            entry = self._read().get(name)
        except ConfigError:
            entry = None
        stored = entry.get("hash") if isinstance(entry, dict) else None
        if not isinstance(stored, str):
            self._check(self._dummy_hash(), password)  # the same work as for a real user
            return None
        if not self._check(stored, password):
            return None
        if self._needs_rehash(stored):
            self._rehash(name, stored, password)
        return _record(name, entry)  # type: ignore[arg-type]  # entry is a dict here

    def _check(self, stored: str, password: str) -> bool:
        try:
            return bool(self.hasher.verify(stored, password))
        except (VerificationError, InvalidHashError):
            return False

    def _needs_rehash(self, stored: str) -> bool:
        try:
            return bool(self.hasher.check_needs_rehash(stored))
        except (InvalidHashError, ValueError):
            return False

    def _dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = self.hasher.hash(secrets.token_urlsafe(16))
        return self._dummy

    def _rehash(self, name: str, stored: str, password: str) -> None:
        """Store the password again with the current parameters (it was just checked)."""
        with self._locked():
            users = self._read()
            if users.get(name, {}).get("hash") == stored:  # not changed meanwhile
                users[name] = {**users[name], "hash": self.hasher.hash(password)}
                self._write(users)

    # --- changing the file -----------------------------------------------------------------

    def add(self, name: str, password: str, *, role: str = DEFAULT_ROLE, replace: bool = False) -> UserRecord:
        """Add a user (or, with ``replace``, set an existing user's password and role)."""
        check_name(name)
        check_role(role)
        check_password(password)
        hashed = self.hasher.hash(password)
        with self._locked():
            users = self._read()
            if name in users and not replace:
                raise ConfigError(
                    f"user {name!r} already exists: use `python -m rag users add {name} --replace` "
                    "to set a new password or role"
                )
            created = users.get(name, {}).get("created") or _now()
            users[name] = {"role": role, "hash": hashed, "created": created}
            self._write(users)
        return UserRecord(name, role, created)

    def remove(self, name: str) -> None:
        with self._locked():
            users = self._read()
            if name not in users:
                known = ", ".join(sorted(users)) or "none"
                raise ConfigError(f"no user {name!r} in {self.path} (users: {known})")
            del users[name]
            self._write(users)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, users: dict[str, dict[str, Any]]) -> None:
        data = json.dumps({"format": FORMAT, "users": users}, indent=2, sort_keys=True) + "\n"
        write_private(self.path, data)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, fsync, rename),
    readable and writable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _record(name: str, entry: dict[str, Any]) -> UserRecord:
    role = entry.get("role")
    return UserRecord(name, role if role in ROLES else DEFAULT_ROLE, str(entry.get("created", "")))


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def read_new_password(
    *,
    from_stdin: bool,
    stdin: TextIO,
    prompt: Callable[[str], str],
    interactive: bool,
) -> str:
    """The new password: the first line of ``stdin`` (``--password-stdin``), or typed twice
    without echo (``prompt`` is ``getpass.getpass``)."""
    if from_stdin:
        return check_password(stdin.readline().removesuffix("\n").removesuffix("\r"))
    if not interactive:
        raise ConfigError("no terminal to read the password from: pipe it in with --password-stdin")
    password = check_password(prompt("Password: "))
    if prompt("Password again: ") != password:
        raise ConfigError("the two passwords differ: nothing was changed")
    return password
