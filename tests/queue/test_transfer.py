"""Moving a SQLite queue's pending mail to PostgreSQL (`ferry queue migrate-to`), and
`ferry queue migrate` (the schema, created or upgraded on demand)."""

from __future__ import annotations

import json
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ferry.envelope import EnvelopeIn, RecipientIn, Reply, Status
from ferry.queue.base import AttemptResult
from ferry.queue.postgres import PostgresQueue
from ferry.queue.postgres_schema import LATEST
from ferry.queue.sqlite import SqliteQueue
from tests.harness import run_cli, write_toml
from tests.queue.backends import fresh_schema

T0 = 1_800_000_000.0
OK = Reply(250, "2.0.0", "ok")
TEMP = Reply(451, "4.3.0", "try later")


def env(*rcpts: str, data: bytes = b"Subject: x\r\n\r\nbody\r\n") -> EnvelopeIn:
    return EnvelopeIn(
        sender="s@example.org",
        recipients=[RecipientIn(r, notify="FAILURE") for r in rcpts],
        data=data,
        envid="ENV1",
        body_8bit=True,
    )


def _bare(dsn: str, tmp_path: Path) -> tuple[str, Path]:
    """The DSN without its password, and a file holding the password."""
    parts = conninfo_to_dict(dsn)
    secret = tmp_path / "pg-password"
    secret.write_text(f"{parts.pop('password')}\n")
    return make_conninfo("", **parts), secret


async def test_migrate_to_moves_pending_mail_whole_and_can_run_again(
    tmp_path: Path, pg_dsn: str
) -> None:
    data = tmp_path / "data"
    sq = SqliteQueue(data)
    try:
        # Large enough to be in the spool (the others are rows): both kinds move.
        mixed = await sq.enqueue(env("a@x.test", "b@y.test", data=b"mixed\r\n" * 3000))
        spooled = sq.run_sync(
            lambda c: c.execute("SELECT spool FROM messages WHERE id=?", (mixed,)).fetchone()
        )
        assert spooled == (2,)
        claimed = await sq.claim("w", now=T0, limit=10, lease=60)
        by = {c.recipient.address: c.recipient.id for c in claimed}
        await sq.record(
            "w",
            [
                AttemptResult(by["a@x.test"], Status.DELIVERED, OK, next_hop="mx.x.test"),
                AttemptResult(by["b@y.test"], Status.DEFERRED, TEMP, next_attempt=T0 * 3),
            ],
            now=T0,
        )
        done = await sq.enqueue(env("c@x.test"))
        [c] = await sq.claim("w", now=T0 * 2, limit=10, lease=60)
        await sq.record("w", [AttemptResult(c.recipient.id, Status.DELIVERED, OK)], now=T0)
        queued = await sq.enqueue(env("d@x.test"))
        leased = await sq.enqueue(env("e@x.test"))
        # A node dies holding the older one's lease.
        [dead] = await sq.claim("dead-node", now=T0 * 2, limit=1, lease=60)
        assert dead.message.id == queued
    finally:
        await sq.close()
    dsn = fresh_schema(pg_dsn)
    bare, secret = _bare(dsn, tmp_path)
    config = write_toml(tmp_path / "ferry.toml", f'[queue]\npath = "{data}"\n')
    res = run_cli(config, "queue", "migrate-to", bare, "--password-file", str(secret), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"copied": 3, "skipped": 0, "recipients": 4}
    assert conninfo_to_dict(dsn)["password"] not in res.stdout + res.stderr
    again = run_cli(config, "queue", "migrate-to", bare, "--password-file", str(secret), "--json")
    assert json.loads(again.stdout) == {"copied": 0, "skipped": 3, "recipients": 0}

    pq = await PostgresQueue(dsn).open()
    try:
        assert await pq.get(done) is None  # finished mail stays behind
        m = await pq.get(mixed)
        assert m is not None
        assert (m.status, m.envid, m.finished) == (Status.PARTIALLY_DELIVERED, "ENV1", None)
        assert await pq.read_message(mixed) == b"mixed\r\n" * 3000
        a, b = m.recipients
        assert (a.address, a.status, a.attempts) == ("a@x.test", Status.DELIVERED, 1)
        assert a.history[0].next_hop == "mx.x.test"
        assert (b.status, b.attempts, b.next_attempt, b.last_reply) == (
            Status.DEFERRED,
            1,
            T0 * 3,
            TEMP,
        )
        assert b.notify == "FAILURE"
        # The old queue's lease is void: that recipient is due at once, like the queued one.
        due = await pq.claim("n", now=T0 * 2, limit=10, lease=T0 * 10)
        assert {c.message.id for c in due} == {queued, leased}
        # The deferred one comes when its time comes, not before.
        assert await pq.claim("n", now=T0 * 3 - 1, limit=10, lease=60) == []
        [later] = await pq.claim("n", now=T0 * 3, limit=10, lease=60)
        assert later.recipient.address == "b@y.test"
    finally:
        await pq.close()


def test_migrate_creates_then_reports_up_to_date(tmp_path: Path, pg_dsn: str) -> None:
    bare, secret = _bare(fresh_schema(pg_dsn), tmp_path)
    config = write_toml(
        tmp_path / "ferry.toml",
        f'[queue]\npath = "{tmp_path / "data"}"\nbackend = "postgres"\n'
        f'dsn = "{bare}"\npassword_file = "{secret}"\n',
    )
    first = run_cli(config, "queue", "migrate", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["found"] == 0
    assert json.loads(first.stdout)["version"] == LATEST
    second = run_cli(config, "queue", "migrate")
    assert second.returncode == 0 and "up to date" in second.stdout
