"""The AUTH users file: hashing, atomic rewrites, reloads, malformed input."""

from __future__ import annotations

import base64
import logging
import os
import re
import stat
import threading
from pathlib import Path

import pytest

from ferry.envelope import Priority
from ferry.intake import users
from ferry.intake.users import UserDB, UserRecord

# n=2**14, r=8, p=1, then base64 salt and derived key.
DEFAULT_HASH_LINE = r"alice:scrypt\$16384\$8\$1\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+"


@pytest.fixture
def fast_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cheap scrypt cost for new hashes; the cost is stored per hash anyway."""
    monkeypatch.setattr(users, "SCRYPT_N", 2**4)


@pytest.fixture
def db(tmp_path: Path, fast_scrypt: None) -> UserDB:
    return UserDB(tmp_path / "users")


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the thread of every scrypt run."""
    calls: list[int] = []
    real = users._scrypt

    def spy(*args: object, **kwargs: object) -> bytes:
        calls.append(threading.get_ident())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(users, "_scrypt", spy)
    return calls


def test_add_and_verify(db: UserDB) -> None:
    db.add("alice", "s3cret")
    assert db.verify("alice", "s3cret") == UserRecord("alice", None)
    assert db.verify("alice", "s3cret ") is None
    assert db.verify("alice", "S3CRET") is None
    assert db.verify("alice", "") is None
    assert db.verify("Alice", "s3cret") is None  # names are case-sensitive
    assert db.verify("bob", "s3cret") is None


def test_default_hash_parameters_and_no_plaintext(tmp_path: Path) -> None:
    db = UserDB(tmp_path / "users")
    db.add("alice", "correct horse battery")
    text = (tmp_path / "users").read_text()
    assert "correct horse" not in text
    assert text.count("\n") == 1
    assert re.fullmatch(DEFAULT_HASH_LINE, text.strip())
    *_, salt, dk = text.strip().split("$")
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(dk)) == 32
    assert db.verify("alice", "correct horse battery") == UserRecord("alice")


def test_same_password_different_salts(db: UserDB) -> None:
    db.add("alice", "same")
    db.add("bob", "same")
    hashes = [line.split(":")[1] for line in db.path.read_text().splitlines()]
    assert hashes[0] != hashes[1]


def test_unicode_password(db: UserDB) -> None:
    db.add("jose", "contraseña-пароль-密码")
    assert db.verify("jose", "contraseña-пароль-密码") is not None
    assert db.verify("jose", "contrasena-пароль-密码") is None


def test_file_mode_and_parent_created(tmp_path: Path, fast_scrypt: None) -> None:
    path = tmp_path / "etc" / "ferry" / "users"
    db = UserDB(path)
    db.add("alice", "pw")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)  # an operator loosened it; the next write tightens it again
    db.add("bob", "pw")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert db.remove("bob")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # No temp files left behind.
    assert os.listdir(path.parent) == ["users"]


def test_replace_existing_user(db: UserDB) -> None:
    db.add("alice", "old", Priority.HIGH)
    db.add("bob", "pw")
    db.add("alice", "new")
    assert db.verify("alice", "old") is None
    assert db.verify("alice", "new") == UserRecord("alice", None)
    assert [r.name for r in db.list()] == ["alice", "bob"]  # replaced in place
    assert len(db.path.read_text().splitlines()) == 2


def test_remove(db: UserDB) -> None:
    db.add("alice", "pw")
    db.add("bob", "pw")
    assert db.remove("alice") is True
    assert db.remove("alice") is False
    assert db.verify("alice", "pw") is None
    assert db.list() == [UserRecord("bob")]


def test_missing_file_means_no_users(tmp_path: Path) -> None:
    db = UserDB(tmp_path / "nope" / "users")
    assert db.list() == []
    assert db.verify("alice", "pw") is None
    assert db.remove("alice") is False
    assert not (tmp_path / "nope").exists()  # reading never creates anything


def test_list_in_file_order_without_hashes(db: UserDB) -> None:
    db.add("zed", "pw", Priority.URGENT)
    db.add("amy", "pw")
    db.add("mid", "pw", Priority.LOW)
    records = db.list()
    assert records == [
        UserRecord("zed", Priority.URGENT),
        UserRecord("amy", None),
        UserRecord("mid", Priority.LOW),
    ]
    assert all(not hasattr(r, "hash") for r in records)
    assert "scrypt" not in repr(records)


@pytest.mark.parametrize("priority", list(Priority))
def test_priority_round_trip(db: UserDB, priority: Priority) -> None:
    db.add("alice", "pw", priority)
    assert db.path.read_text().strip().endswith(f":{priority.name}")
    assert db.verify("alice", "pw") == UserRecord("alice", priority)
    assert UserDB(db.path).list() == [UserRecord("alice", priority)]


@pytest.mark.parametrize(
    "name", ["a", "alice", "a.b_c-d", "user@example.com", "x+tag", "A9", "n" * 64]
)
def test_valid_names(db: UserDB, name: str) -> None:
    db.add(name, "pw")
    assert db.verify(name, "pw") == UserRecord(name)


@pytest.mark.parametrize("name", ["", "n" * 65, "a:b", "a b", "a/b", "ünï", "a\nb", "#x"])
def test_invalid_names_rejected(db: UserDB, name: str) -> None:
    with pytest.raises(ValueError, match="bad user name"):
        db.add(name, "pw")
    assert not db.path.exists()


def test_empty_password_rejected(db: UserDB) -> None:
    with pytest.raises(ValueError, match="empty password"):
        db.add("alice", "")


def test_comments_and_blank_lines_survive_rewrites(db: UserDB) -> None:
    db.path.write_text("# Ferry users\n\n# ops team below\n")
    db.add("alice", "pw")
    db.add("bob", "pw")
    db.remove("alice")
    lines = db.path.read_text().splitlines()
    assert lines[:3] == ["# Ferry users", "", "# ops team below"]
    assert [x.split(":")[0] for x in lines[3:]] == ["bob"]


def test_reload_after_change_by_another_writer(db: UserDB) -> None:
    server = UserDB(db.path)  # e.g. the running server; `db` is the CLI
    assert server.verify("alice", "pw") is None
    db.add("alice", "pw")
    assert server.verify("alice", "pw") == UserRecord("alice")
    db.add("alice", "changed", Priority.HIGH)
    assert server.verify("alice", "pw") is None
    assert server.verify("alice", "changed") == UserRecord("alice", Priority.HIGH)
    db.remove("alice")
    assert server.verify("alice", "changed") is None
    db.path.unlink()
    assert server.list() == []


def test_reload_after_in_place_edit(db: UserDB) -> None:
    db.add("alice", "pw")
    line = db.path.read_text()
    server = UserDB(db.path)
    assert server.list() == [UserRecord("alice")]
    # An editor rewriting the same file (same inode) with a longer content.
    with open(db.path, "a") as f:
        f.write(line.replace("alice", "carol"))
    assert [r.name for r in server.list()] == ["alice", "carol"]


def test_reads_are_cached(db: UserDB, monkeypatch: pytest.MonkeyPatch) -> None:
    db.add("alice", "pw")
    loads = 0
    real = UserDB._load

    def counting(self: UserDB) -> dict[str, object]:
        nonlocal loads
        loads += 1
        return real(self)  # type: ignore[return-value]

    monkeypatch.setattr(UserDB, "_load", counting)
    for _ in range(3):
        db.verify("alice", "pw")
        db.list()
    assert loads == 1
    db.add("bob", "pw")
    db.list()
    assert loads == 2


def test_malformed_lines_skipped_with_line_numbers(
    db: UserDB, caplog: pytest.LogCaptureFixture
) -> None:
    db.add("good", "pw")
    good = db.path.read_text().strip()
    secret_hash = good.split(":")[1]
    dummy = secret_hash.replace("scrypt", "bcrypt")
    huge_n = secret_hash.replace("$16$", f"${2**30}$", 1)
    db.path.write_text(
        "\n".join(
            [
                "# comment",  # 1
                good,  # 2
                "no-colon-here",  # 3
                f"bad name:{secret_hash}",  # 4
                f"x:{dummy}",  # 5
                f"y:{secret_hash}:SOMETIMES",  # 6
                f"z:{secret_hash}:HIGH:extra",  # 7
                "w:scrypt$16$8$1$!!!$???",  # 8
                f"v:{huge_n}",  # 9
                "u:scrypt$15$8$1$AAAA$AAAA",  # 10 (n not a power of two)
                "",  # 11
                f"good:{secret_hash}:URGENT",  # 12 duplicate: first one wins
                f"  ok : {secret_hash} : low ",  # 13 whitespace and case tolerated
            ]
        )
        + "\n"
    )
    with caplog.at_level(logging.WARNING, logger="ferry.users"):
        records = db.list()
    assert records == [UserRecord("good"), UserRecord("ok", Priority.LOW)]
    assert db.verify("good", "pw") == UserRecord("good")
    assert db.verify("ok", "pw") == UserRecord("ok", Priority.LOW)
    warned = {r.message.split(":")[0] for r in caplog.records}
    assert warned == {f"{db.path} line {n}" for n in (3, 4, 5, 6, 7, 8, 9, 10, 12)}
    assert all(r.name == "ferry.users" for r in caplog.records)
    b64_part = secret_hash.split("$")[-1]
    assert not any(b64_part in r.getMessage() for r in caplog.records)


def test_verify_always_costs_one_scrypt(db: UserDB, scrypt_calls: list[int]) -> None:
    db.add("alice", "pw")
    scrypt_calls.clear()
    db.verify("alice", "pw")
    db.verify("alice", "wrong")
    db.verify("nobody", "pw")
    db.verify("bad name!", "pw")
    assert len(scrypt_calls) == 4


def test_compare_is_constant_time(db: UserDB, monkeypatch: pytest.MonkeyPatch) -> None:
    db.add("alice", "pw")
    compared: list[tuple[bytes, bytes]] = []
    real = users.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(users.hmac, "compare_digest", spy)
    assert db.verify("alice", "wrong") is None
    assert db.verify("nobody", "wrong") is None
    assert len(compared) == 2


async def test_averify_runs_off_the_event_loop(db: UserDB, scrypt_calls: list[int]) -> None:
    db.add("alice", "pw", Priority.HIGH)
    scrypt_calls.clear()
    assert await db.averify("alice", "pw") == UserRecord("alice", Priority.HIGH)
    assert await db.averify("alice", "nope") is None
    assert await db.averify("nobody", "pw") is None
    assert len(scrypt_calls) == 3
    assert threading.get_ident() not in scrypt_calls
