"""`ferry serve` as a real process: the CLI beside it, and SIGKILL durability."""

from __future__ import annotations

import smtplib
import sqlite3
from pathlib import Path

import pytest

from tests.harness import AckingClients, cli_json, free_port, run_cli, wait_until, write_toml


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
hold = true   # these tests look at the queue; nothing may leave this machine
""",
    )


def _msg(i: int) -> bytes:
    return (
        f"From: s@example.org\r\nTo: r@example.net\r\nMessage-ID: <{i}@t>\r\n"
        f"Subject: message {i}\r\n\r\nbody {i}\r\n" + "x" * (i % 97) + "\r\n"
    ).encode()


@pytest.fixture
def served(tmp_path: Path, serve_factory):  # type: ignore[no-untyped-def]
    port = free_port()
    cfg = _config(tmp_path, port)
    return cfg, port, serve_factory(cfg, port)


def test_cli_works_while_serving(served) -> None:  # type: ignore[no-untyped-def]
    cfg, port, _proc = served
    with smtplib.SMTP("127.0.0.1", port) as c:
        c.sendmail("s@example.org", ["a@example.net", "b@example.org"], _msg(1))
        c.sendmail("t@example.org", ["c@example.net"], _msg(2))
    listing = cli_json(cfg, "queue", "list")["messages"]
    assert len(listing) == 2
    assert {m["sender"] for m in listing} == {"s@example.org", "t@example.org"}

    def listed(*args: str) -> list[dict[str, object]]:
        return cli_json(cfg, "queue", "list", *args)["messages"]  # type: ignore[no-any-return]

    assert len(listed("--sender", "t@example.org")) == 1
    assert len(listed("--domain", "example.org")) == 1
    assert len(listed("--status", "queued")) == 2
    first = next(m for m in listing if m["sender"] == "s@example.org")
    shown = cli_json(cfg, "queue", "show", first["id"])
    assert [r["address"] for r in shown["recipients"]] == ["a@example.net", "b@example.org"]
    stats = cli_json(cfg, "queue", "stats")
    assert stats["total_messages"] == 2
    assert stats["queued_messages"] == 2
    res = run_cli(cfg, "queue", "cancel", first["id"])
    assert res.returncode == 0, res.stderr
    assert cli_json(cfg, "queue", "show", first["id"])["status"] == "Cancelled"
    assert run_cli(cfg, "queue", "retry", first["id"]).returncode == 1  # nothing pending
    assert run_cli(cfg, "queue", "remove", first["id"]).returncode == 0
    assert run_cli(cfg, "queue", "show", first["id"]).returncode == 1
    human = run_cli(cfg, "queue", "stats")
    assert "total messages" in human.stdout
    assert run_cli(cfg, "queue", "clear-expired").stdout.startswith("0 expired")


def test_user_commands(tmp_path: Path) -> None:
    cfg = _config(tmp_path, free_port())
    res = run_cli(cfg, "user", "add", "alice", "--priority", "high", input="pa55word\n")
    assert res.returncode == 0, res.stderr
    assert cli_json(cfg, "user", "list") == [{"name": "alice", "priority": "high"}]
    text = (tmp_path / "users").read_text()
    assert "pa55word" not in text and "scrypt$" in text
    assert run_cli(cfg, "user", "remove", "alice").returncode == 0
    assert cli_json(cfg, "user", "list") == []
    assert run_cli(cfg, "user", "remove", "alice").returncode == 1


def test_sigkill_loses_nothing_that_got_250(tmp_path: Path, serve_factory) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    cfg = _config(tmp_path, port)
    proc = serve_factory(cfg, port)
    clients = AckingClients(port, _msg).start()
    acked = clients.acked  # queue id -> message bytes
    wait_until(lambda: len(acked) >= 200, 30, "200 accepted messages")
    proc.kill()
    clients.stop()
    assert len(acked) >= 200

    # Every message that got 250 is there, byte-identical after our Received: header.
    db = sqlite3.connect(tmp_path / "data" / "queue.db")
    rows = dict(db.execute("SELECT message_id, data FROM bodies"))
    recipients = dict(db.execute("SELECT message_id, COUNT(*) FROM recipients GROUP BY message_id"))
    db.close()
    for qid, msg in acked.items():
        assert qid in rows, f"{qid} got 250 but is not in the queue"
        assert bytes(rows[qid]).endswith(b"\r\n" + msg)
    # Nothing is half there: every stored message is one whole message we sent.
    sent = {f"<{i}@t>".encode(): m for i, m in clients.sent.items()}  # by Message-ID
    for qid, data in rows.items():
        data = bytes(data)
        mid = data.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0]
        assert data.endswith(b"\r\n" + sent[mid]), qid
        assert recipients.get(qid) == 1

    # After a restart the queue is intact and served.
    serve_factory(cfg, port)
    listing = cli_json(cfg, "queue", "list", "--limit", "100000")["messages"]
    assert {m["id"] for m in listing} >= set(acked)
