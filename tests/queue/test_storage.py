"""The queue notices when its database is gone, replaced or damaged, and never makes one
where it should only read."""

from __future__ import annotations

import dataclasses
import json
import os
import smtplib
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.envelope import EnvelopeIn, RecipientIn
from ferry.events import subscribe
from ferry.queue.sqlite import QueueDamaged, QueueNotFound, QueueStorageLost, SqliteQueue
from tests.harness import free_port, run_cli, write_toml


def env(rcpt: str = "a@x.test") -> EnvelopeIn:
    return EnvelopeIn(sender="s@example.org", recipients=[RecipientIn(rcpt)], data=b"x\r\n")


@pytest.fixture
def events() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    seen: list[tuple[str, dict[str, Any]]] = []
    unsubscribe = subscribe(lambda event: seen.append((event.name, dataclasses.asdict(event))))
    yield seen
    unsubscribe()


def corrupt_an_index(db: Path, index: str = "messages_sender") -> None:
    """Overwrite one index's root page header: the tables stay readable, quick_check fails."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (index,)).fetchone()
    conn.close()
    with open(db, "r+b") as fh:
        fh.seek(page_size * (root - 1))
        fh.write(b"\x0d\x00\x00\xff\xff" + b"\x00" * 11)
        fh.flush()
        os.fsync(fh.fileno())


@pytest.mark.parametrize("which", ["queue.db", "queue.db-wal"])
async def test_a_deleted_database_refuses_writes(
    tmp_path: Path,
    events,  # type: ignore[no-untyped-def]
    which: str,
) -> None:
    q = SqliteQueue(tmp_path / "q")
    try:
        await q.enqueue(env())
        (tmp_path / "q" / which).unlink()
        for _ in range(3):
            with pytest.raises(QueueStorageLost, match=f"{which}: deleted while in use"):
                await q.enqueue(env())
        lost = [f for e, f in events if e == "queue_storage_lost"]
        assert len(lost) == 1  # once per loss, not per refused message
        assert lost[0]["path"] == str(tmp_path / "q" / "queue.db")
    finally:
        await q.close()


async def test_a_replaced_database_refuses_writes(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q")
    try:
        await q.enqueue(env())
        db = tmp_path / "q" / "queue.db"
        db.rename(tmp_path / "elsewhere.db")
        db.write_bytes(b"")
        with pytest.raises(QueueStorageLost, match="replaced by another file"):
            await q.enqueue(env())
    finally:
        await q.close()


async def test_opening_without_create_never_makes_a_database(tmp_path: Path) -> None:
    for kwargs in ({"create": False}, {"readonly": True}):
        with pytest.raises(QueueNotFound, match=f"no queue exists at {tmp_path / 'q'}"):
            SqliteQueue(tmp_path / "q", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "q").exists()


async def test_read_only_queue_reads_and_never_writes(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q")
    qid = await q.enqueue(env())
    await q.close()
    before = (tmp_path / "q" / "queue.db").read_bytes()
    ro = SqliteQueue(tmp_path / "q", readonly=True)
    try:
        assert [m.id for m in await ro.list()] == [qid]
        assert await ro.check() == []
        with pytest.raises(RuntimeError, match="read-only"):
            await ro.cancel(qid, now=0)
    finally:
        await ro.close()
    assert (tmp_path / "q" / "queue.db").read_bytes() == before


async def test_check_finds_a_damaged_index(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q")
    for i in range(50):
        await q.enqueue(env(f"r{i}@x.test"))
    assert await q.check() == []
    assert await q.check(quick=True) == []
    await q.close()
    corrupt_an_index(tmp_path / "q" / "queue.db")
    q = SqliteQueue(tmp_path / "q", readonly=True)
    try:
        for quick in (True, False):
            problems = await q.check(quick=quick)
            assert problems, quick
    finally:
        await q.close()


async def test_check_refuses_a_database_that_is_not_a_whole_queue(tmp_path: Path) -> None:
    # What a recovery that stopped half way leaves: a sound file without the queue's tables.
    (tmp_path / "q").mkdir()
    conn = sqlite3.connect(tmp_path / "q" / "queue.db")
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.close()
    q = SqliteQueue(tmp_path / "q", readonly=True)
    try:
        assert await q.check() == [
            "not a complete Ferry queue: no table attempts, bodies, messages, recipients"
        ]
    finally:
        await q.close()


def test_a_file_that_is_not_a_database_is_reported_damaged(tmp_path: Path) -> None:
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "queue.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(QueueDamaged, match="file is not a database") as info:
        SqliteQueue(tmp_path / "q")
    assert ".recover" in str(info.value)


# -- end to end: `ferry serve` and the CLI as real processes ----------------------


def _config(tmp_path: Path, port: int) -> Path:
    return write_toml(
        tmp_path / "ferry.toml",
        f"""
[server]
hostname = "mx.ferry.test"
listen = [{{ address = "127.0.0.1", port = {port}, mode = "mta" }}]
users_file = "{tmp_path}/users"
[queue]
path = "{tmp_path}/data"
[delivery]
hold = true   # nothing leaves this machine
""",
    )


def _send(port: int, rcpt: str = "r@example.net") -> None:
    with smtplib.SMTP("127.0.0.1", port) as c:
        c.sendmail("s@example.org", [rcpt], b"Subject: t\r\n\r\nbody\r\n")


def test_serve_answers_451_once_its_database_is_deleted(tmp_path: Path, serve_factory) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    proc = serve_factory(_config(tmp_path, port), port)
    _send(port)
    (tmp_path / "data" / "queue.db").unlink()
    for _ in range(2):
        with pytest.raises(smtplib.SMTPDataError) as info:
            _send(port)
        assert info.value.smtp_code == 451
        assert info.value.smtp_error.startswith(b"4.3.0")
    log = proc.log_path.read_text()
    assert log.count("queue_storage_lost") == 1
    assert "deleted while in use" in log


def test_serve_refuses_a_damaged_database_and_queue_check_reports_it(
    tmp_path: Path,
    serve_factory,  # type: ignore[no-untyped-def]
) -> None:
    port = free_port()
    cfg = _config(tmp_path, port)
    proc = serve_factory(cfg, port)
    for i in range(20):
        _send(port, f"r{i}@example.net")
    proc.stop()
    db = tmp_path / "data" / "queue.db"
    ok = run_cli(cfg, "queue", "check")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{db}: ok (20 messages" in ok.stdout
    corrupt_an_index(db)

    res = subprocess.run(
        [sys.executable, "-m", "ferry.cli", "--config", str(cfg), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert res.returncode == 1
    assert f"the queue database {db} is damaged" in res.stderr
    assert f"sqlite3 {db} .recover" in res.stderr

    bad = run_cli(cfg, "queue", "check")
    assert bad.returncode == 1
    assert f"{db}: damaged" in bad.stdout and ".recover" in bad.stdout
    assert cli_json_rc(cfg, "queue", "check")["ok"] is False

    # The README's recovery procedure, step by step.
    recovered = tmp_path / "data" / "queue-recovered.db"
    dump = subprocess.run(["sqlite3", str(db), ".recover"], capture_output=True, timeout=60)
    subprocess.run(["sqlite3", str(recovered)], input=dump.stdout, timeout=60)
    if dump.returncode != 0:
        # Debian's sqlite3 lacks the sqlite_dbpage table .recover needs (its output
        # is a partial database): the documented .dump fallback.
        recovered.unlink()
        dump = subprocess.run(["sqlite3", str(db), ".dump"], capture_output=True, timeout=60)
        subprocess.run(["sqlite3", str(recovered)], input=dump.stdout, check=True, timeout=60)
    (tmp_path / "data" / "damaged").mkdir()
    for f in (tmp_path / "data").glob("queue.db*"):
        f.rename(tmp_path / "data" / "damaged" / f.name)
    recovered.rename(db)
    again = run_cli(cfg, "queue", "check")
    assert again.returncode == 0, again.stdout
    assert "ok (20 messages" in again.stdout
    serve_factory(cfg, port)  # starts again


def cli_json_rc(cfg: Path, *args: str) -> Any:
    res = run_cli(cfg, *args, "--json")
    return json.loads(res.stdout)


@pytest.mark.parametrize(
    "args",
    [
        ("queue", "list"),
        ("queue", "show", "x"),
        ("queue", "stats"),
        ("queue", "retry", "x"),
        ("queue", "clear-expired"),
        ("queue", "check"),
    ],
)
def test_cli_never_creates_a_queue(tmp_path: Path, args: tuple[str, ...]) -> None:
    cfg = _config(tmp_path, free_port())
    res = run_cli(cfg, *args)
    assert res.returncode == 1
    assert f"no queue exists at {tmp_path / 'data' / 'queue.db'}" in res.stderr
    assert not (tmp_path / "data").exists()
