"""Spooled bodies and SIGKILL: `ferry serve` as a real process (issue 12).

A body is durable in its spool segment before the row that makes it visible is
committed; a kill in between leaves bytes no row names, in a segment the next start
removes before accepting (when no live message needs it).
"""

from __future__ import annotations

import smtplib
import sqlite3
import threading
from pathlib import Path

from ferry.queue.spool import names, read_at
from tests.harness import AckingClients, cli_json, free_port, wait_until, write_toml

BIG = 40_000  # above ferry.queue.sqlite.SPOOL_THRESHOLD: these bodies are in the spool


def _config(tmp_path: Path, port: int) -> Path:
    return write_toml(
        tmp_path / "ferry.toml",
        f"""
[server]
hostname = "mx.ferry.test"
listen = [{{ address = "127.0.0.1", port = {port}, mode = "mta" }}]
[queue]
path = "{tmp_path}/data"
[delivery]
hold = true   # these tests look at the queue; nothing may leave this machine
""",
    )


def _msg(i: int, size: int) -> bytes:
    head = f"From: s@example.org\r\nTo: r@example.net\r\nMessage-ID: <{i}@t>\r\n\r\n".encode()
    line = f"message {i}: the quick brown fox jumps over the lazy dog\r\n".encode()
    return head + line * (size // len(line) + 1)


def _stored(data: Path) -> tuple[dict[str, bytes], set[str]]:
    """Every live message's body (row or spool) and the segments live bodies are in."""
    db = sqlite3.connect(data / "queue.db")
    try:
        rows = {m: bytes(d) for m, d in db.execute("SELECT message_id, data FROM bodies")}
        spooled = db.execute(
            "SELECT id, segment, body_offset, size FROM messages"
            " WHERE spool = 2 AND finished IS NULL"
        ).fetchall()
    finally:
        db.close()
    for mid, segment, offset, size in spooled:
        body = read_at(data / "spool", segment, offset, size)
        if body is not None:
            rows[mid] = body
    return rows, {segment for _mid, segment, _o, _s in spooled}


def test_sigkill_keeps_every_acked_spooled_body_and_restart_sweeps(
    tmp_path: Path,
    serve_factory,  # type: ignore[no-untyped-def]
) -> None:
    port = free_port()
    cfg = _config(tmp_path, port)
    proc = serve_factory(cfg, port)
    # Mostly files, some rows.
    clients = AckingClients(port, lambda i: _msg(i, BIG if i % 3 else 500)).start()
    acked = clients.acked
    wait_until(lambda: len(acked) >= 60, 60, "60 accepted messages")
    proc.kill()
    clients.stop()

    data = tmp_path / "data"
    bodies, spooled = _stored(data)
    assert spooled, "no body was spooled"
    for qid, msg in acked.items():
        assert qid in bodies, f"{qid} got 250 but its body is not in the queue"
        assert bodies[qid].endswith(b"\r\n" + msg)
    # A restart removes what no committed row names (bodies written when the kill came).
    serve_factory(cfg, port).stop()
    bodies_after, spooled_after = _stored(data)
    assert set(names(data / "spool")) == spooled_after
    assert all(bodies_after[q] == bodies[q] for q in acked)


def test_kill_between_body_write_and_commit_leaves_nothing(
    tmp_path: Path,
    serve_factory,  # type: ignore[no-untyped-def]
) -> None:
    port = free_port()
    cfg = _config(tmp_path, port)
    proc = serve_factory(cfg, port)
    data = tmp_path / "data"
    # Hold the database's write lock: the server can write the body file but not
    # commit the row that would make it a message.
    holder = sqlite3.connect(data / "queue.db", isolation_level=None, timeout=30)
    holder.execute("BEGIN IMMEDIATE")
    replies: list[object] = []

    def client() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
                c.ehlo("client.test")
                replies.append(c.sendmail("s@example.org", ["r@example.net"], _msg(1, BIG)))
        except (OSError, smtplib.SMTPException) as exc:
            replies.append(exc)

    t = threading.Thread(target=client)
    t.start()
    try:

        def whole_body() -> list[str]:
            spool = data / "spool"
            return [n for n in names(spool) if (spool / n).stat().st_size > BIG]

        wait_until(whole_body, 30, "the whole body in a segment")
        # On disk, yet no message: delivery and the CLI see none.
        assert cli_json(cfg, "queue", "list")["messages"] == []
        proc.kill()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    t.join(30)
    assert replies and isinstance(replies[0], Exception)  # never a 250
    serve_factory(cfg, port).stop()  # the restart sweeps before it listens
    assert names(data / "spool") == []
    assert cli_json(cfg, "queue", "list")["messages"] == []
