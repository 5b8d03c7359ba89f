"""The users file (rag/users.py) and ``python -m rag users``: hashes, roles, atomic private
writes, and a sign-in check that says nothing about which names exist."""

from __future__ import annotations

import io
import json
import os
import stat
import statistics
import time
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from rag.cli import main
from rag.errors import ConfigError
from rag.users import FORMAT, UserRecord, UserStore, read_new_password

# Cheap parameters for the tests that are not about timing (the default costs ~0.3 s a hash here).
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


@pytest.fixture
def store(tmp_path: Path) -> UserStore:
    return UserStore(tmp_path / "data" / "users.json", hasher=FAST)


def test_add_verify_list_remove(store: UserStore) -> None:
    ada = store.add("ada", "correct horse", role="admin")
    store.add("bob", "battery staple")

    assert ada == UserRecord("ada", "admin", ada.created)
    assert store.verify("ada", "correct horse") == ada
    assert store.verify("bob", "battery staple") == UserRecord("bob", "reader", store.get("bob").created)  # type: ignore[union-attr]
    assert [(u.name, u.role) for u in store.list()] == [("ada", "admin"), ("bob", "reader")]

    store.remove("bob")
    assert [u.name for u in store.list()] == ["ada"]
    assert store.verify("bob", "battery staple") is None


def test_the_file_holds_hashes_not_passwords(store: UserStore) -> None:
    store.add("ada", "correct horse", role="admin")
    text = store.path.read_text()
    data = json.loads(text)
    assert data["format"] == FORMAT
    assert data["users"]["ada"]["hash"].startswith("$argon2id$")
    assert "correct horse" not in text


def test_wrong_password_and_unknown_user_get_the_same_answer(store: UserStore) -> None:
    store.add("ada", "correct horse", role="admin")
    assert store.verify("ada", "wrong password") is None
    assert store.verify("nobody", "wrong password") is None
    assert store.verify("nobody", "correct horse") is None
    assert store.verify("ada", "") is None


class CountingHasher(PasswordHasher):
    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=1024, parallelism=1)
        self.verified = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verified += 1
        return super().verify(hash, password)


def test_an_unknown_user_costs_one_hash_check_like_a_known_one(tmp_path: Path) -> None:
    hasher = CountingHasher()
    store = UserStore(tmp_path / "users.json", hasher=hasher)
    store.add("ada", "correct horse")
    store.verify("ada", "wrong password")
    assert hasher.verified == 1
    store.verify("nobody", "wrong password")
    assert hasher.verified == 2
    store.verify("nobody", "again")  # the dummy hash is made once, checked every time
    assert hasher.verified == 3


def test_a_wrong_password_and_an_unknown_user_take_the_same_time(tmp_path: Path) -> None:
    # Real argon2 work (16 MiB, 2 passes: ~10-40 ms here). Without the dummy check an unknown
    # name would answer in microseconds, a ratio in the thousands.
    store = UserStore(tmp_path / "users.json", hasher=PasswordHasher(time_cost=2, memory_cost=16 * 1024, parallelism=1))
    store.add("ada", "correct horse")
    store.verify("nobody", "warm up")  # the dummy hash is made on first use
    wrong, unknown = [], []
    for _ in range(9):  # interleaved, so load on the machine hits both alike
        for name, into in (("ada", wrong), ("nobody", unknown)):
            started = time.perf_counter()
            assert store.verify(name, "not the password") is None
            into.append(time.perf_counter() - started)
    ratio = statistics.median(unknown) / statistics.median(wrong)
    assert 0.5 < ratio < 2.0, (wrong, unknown)


def test_the_file_is_private_and_written_whole(store: UserStore) -> None:
    store.add("ada", "correct horse", role="admin")
    store.add("bob", "battery staple")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    # Only the file and its lock: no temp file left behind.
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["users.json", "users.json.lock"]


def test_a_failed_write_leaves_the_previous_file(store: UserStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add("ada", "correct horse", role="admin")
    before = store.path.read_bytes()

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        store.add("bob", "battery staple")
    assert store.path.read_bytes() == before
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["users.json", "users.json.lock"]


def test_adding_twice_needs_replace(store: UserStore) -> None:
    first = store.add("ada", "correct horse", role="admin")
    with pytest.raises(ConfigError, match="already exists.*--replace"):
        store.add("ada", "another password")
    again = store.add("ada", "another password", role="reader", replace=True)
    assert again == UserRecord("ada", "reader", first.created)
    assert store.verify("ada", "correct horse") is None
    assert store.verify("ada", "another password") == again


def test_removing_an_unknown_user_names_the_known_ones(store: UserStore) -> None:
    store.add("ada", "correct horse")
    with pytest.raises(ConfigError, match=r"no user 'bob' .*\(users: ada\)"):
        store.remove("bob")


@pytest.mark.parametrize("name", ["", " ada", "ada lovelace", "-ada", "a" * 65, "ad\nm", "ädä", "../ada"])
def test_bad_names_are_refused(store: UserStore, name: str) -> None:
    with pytest.raises(ConfigError, match="not allowed"):
        store.add(name, "correct horse")
    assert store.list() == []


def test_bad_roles_and_short_passwords_are_refused(store: UserStore) -> None:
    with pytest.raises(ConfigError, match="role 'root' is not one of admin, reader"):
        store.add("ada", "correct horse", role="root")
    with pytest.raises(ConfigError, match="at least 8 characters"):
        store.add("ada", "short")
    assert not store.path.exists()


def test_an_unknown_role_in_the_file_counts_as_reader(store: UserStore) -> None:
    store.add("ada", "correct horse", role="admin")
    data = json.loads(store.path.read_text())
    data["users"]["ada"]["role"] = "superuser"
    store.path.write_text(json.dumps(data))
    assert store.verify("ada", "correct horse") == UserRecord("ada", "reader", data["users"]["ada"]["created"])


def test_a_damaged_or_foreign_file_is_explained(store: UserStore) -> None:
    store.path.parent.mkdir(parents=True)
    store.path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        store.list()
    assert store.verify("ada", "correct horse") is None  # a sign-in is refused, not crashed
    store.path.write_text(json.dumps({"format": "rag-users v9", "users": {}}))
    with pytest.raises(ConfigError, match="not in the format 'rag-users v1' \\(found 'rag-users v9'\\)"):
        store.add("ada", "correct horse")


def test_a_hash_with_old_parameters_is_upgraded_at_sign_in(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    UserStore(path, hasher=FAST).add("ada", "correct horse", role="admin")
    stronger = PasswordHasher(time_cost=2, memory_cost=2048, parallelism=1)
    store = UserStore(path, hasher=stronger)
    assert store.verify("ada", "correct horse") is not None
    stored = json.loads(path.read_text())["users"]["ada"]["hash"]
    assert "m=2048,t=2,p=1" in stored
    assert store.verify("ada", "correct horse") is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_wrong_password_does_not_upgrade_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    UserStore(path, hasher=FAST).add("ada", "correct horse")
    before = path.read_text()
    UserStore(path, hasher=PasswordHasher(time_cost=2, memory_cost=2048, parallelism=1)).verify("ada", "nope nope")
    assert path.read_text() == before


# --- reading the new password ---------------------------------------------------------------


def test_password_from_stdin_is_its_first_line() -> None:
    read = read_new_password(from_stdin=True, stdin=io.StringIO("s3cret pass\nignored\n"), prompt=_no_prompt,
                             interactive=False)  # fmt: skip
    assert read == "s3cret pass"
    assert read_new_password(from_stdin=True, stdin=io.StringIO("windows pw\r\n"), prompt=_no_prompt,
                             interactive=False) == "windows pw"  # fmt: skip


def test_typed_password_must_match() -> None:
    answers = iter(["first password", "other password"])
    with pytest.raises(ConfigError, match="differ"):
        read_new_password(from_stdin=False, stdin=io.StringIO(), prompt=lambda _: next(answers), interactive=True)


def test_no_terminal_and_no_stdin_flag_says_what_to_do() -> None:
    with pytest.raises(ConfigError, match="--password-stdin"):
        read_new_password(from_stdin=False, stdin=io.StringIO("pw\n"), prompt=_no_prompt, interactive=False)


def _no_prompt(_: str) -> str:
    raise AssertionError("must not prompt")


# --- the command line -----------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_cli(argv: list[str], stdin: io.StringIO, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setattr("sys.stdin", stdin)
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_add_list_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    data = ["--data-dir", str(tmp_path / "data")]

    code, out, err = run_cli([*data, "users", "add", "ada", "--role", "admin", "--password-stdin"],
                             io.StringIO("correct horse\n"), monkeypatch, capsys)  # fmt: skip
    assert (code, err) == (0, "")
    assert f"Added ada (admin) in {tmp_path / 'data' / 'users.json'}" in out
    assert "RAG_AUTH=password" in out  # sign-in is off by default: say how to turn it on

    typed = iter(["battery staple", "battery staple"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(typed))
    code, out, err = run_cli([*data, "users", "add", "bob"], Terminal(), monkeypatch, capsys)
    assert (code, err) == (0, "")

    code, out, err = run_cli([*data, "users", "list"], io.StringIO(), monkeypatch, capsys)
    assert code == 0
    assert [line.split()[:2] for line in out.splitlines()] == [["ada", "admin"], ["bob", "reader"]]

    store = UserStore(tmp_path / "data" / "users.json")
    assert store.verify("ada", "correct horse") is not None
    assert store.verify("bob", "battery staple") is not None

    code, out, err = run_cli([*data, "users", "remove", "bob"], io.StringIO(), monkeypatch, capsys)
    assert code == 0 and "Removed bob" in out
    assert [u.name for u in store.list()] == ["ada"]


def test_cli_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    data = ["--data-dir", str(tmp_path / "data")]
    code, out, err = run_cli([*data, "users", "add", "ada", "--password-stdin"], io.StringIO("short\n"),
                             monkeypatch, capsys)  # fmt: skip
    assert code == 1 and err == "error: the password is too short: use at least 8 characters\n"

    code, out, err = run_cli([*data, "users", "add", "ada"], io.StringIO("correct horse\n"), monkeypatch, capsys)
    assert code == 1 and "--password-stdin" in err  # stdin is not a terminal: no silent echo

    code, out, err = run_cli([*data, "users", "remove", "nobody"], io.StringIO(), monkeypatch, capsys)
    assert code == 1 and err.startswith("error: no user 'nobody'")

    code, out, err = run_cli([*data, "users", "remove"], io.StringIO(), monkeypatch, capsys)
    assert code == 2 and "needs a user name" in err

    code, out, err = run_cli([*data, "users", "list"], io.StringIO(), monkeypatch, capsys)
    assert code == 0 and "no users in" in out and "users add NAME --role admin" in out
