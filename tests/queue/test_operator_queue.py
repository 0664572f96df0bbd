"""The queue's operator side: selections, pages, summaries, bulk changes, suspensions."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.envelope import EnvelopeIn, RecipientIn, Status
from ferry.queue.selection import AGE_BUCKETS, Selection, age_bucket
from ferry.queue.sqlite import SqliteQueue

NOW = 1_800_000_000.0


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[SqliteQueue]:
    q = SqliteQueue(tmp_path / "q")
    yield q
    await q.close()


def _put(q: SqliteQueue, rows: list[tuple[str, float, str, str, int | None]]) -> None:
    """(queue id, age in minutes, recipient, status, last code) with known arrivals."""

    def job(conn: sqlite3.Connection) -> None:
        for qid, minutes, rcpt, status, code in rows:
            arrival = NOW - minutes * 60
            conn.execute(
                "INSERT OR IGNORE INTO messages(id, sender, size, priority, arrival, expires,"
                " status) VALUES (?, 's@x.example', 10, 1, ?, ?, ?)",
                (qid, arrival, arrival + 86400, status),
            )
            conn.execute("INSERT OR IGNORE INTO bodies VALUES (?, x'00')", (qid,))
            conn.execute(
                "INSERT INTO recipients(message_id, address, domain, status, priority, arrival,"
                " attempts, next_attempt, last_code, last_enhanced, last_text)"
                " VALUES (?,?,?,?,1,?,?,?,?,?,?)",
                (
                    qid,
                    rcpt,
                    rcpt.rpartition("@")[2],
                    status,
                    arrival,
                    1 if code else 0,
                    NOW + 600,
                    code,
                    f"{code // 100}.7.1" if code else None,
                    "Greylisted, try later" if code else None,
                ),
            )

    q.run_sync(job)


def test_age_buckets() -> None:
    assert [age_bucket(m * 60) for m in (0, 4.9, 5, 9, 1279, 1280, 99999)] == [
        0, 0, 1, 1, 8, 9, 9
    ]  # fmt: skip
    assert len(AGE_BUCKETS) == 9


async def test_summary_from_counts_equals_the_grouped_summary(queue: SqliteQueue) -> None:
    rows = []
    for i in range(300):
        domain = ("a.example", "b.example", "c.example")[i % 3]
        status = ("Queued", "Deferred", "Held", "Delivered")[i % 4]
        rows.append((f"M{i:05d}", (i * 7) % 2000, f"u{i}@{domain}", status, 451 if i % 5 else None))
    _put(queue, rows)
    fast = await queue.summary(Selection(), now=NOW)
    # The same shape through the other two paths: rows grouped (a summary is of waiting
    # mail even with --all), and rows reached from the sender's messages.
    for other in (Selection(waiting_only=False), Selection(sender="s@x.example")):
        grouped = await queue.summary(other, now=NOW)
        assert fast.by_domain == grouped.by_domain and fast.by_reply == grouped.by_reply
    older = await queue.summary(Selection(older_than=600 * 60), now=NOW)
    grouped = await queue.summary(Selection(older_than=600 * 60, waiting_only=False), now=NOW)
    assert older.by_domain == grouped.by_domain
    assert sum(older.by_domain["a.example"][:7]) == 0  # nothing younger than 600 min
    waiting = [r for r in rows if r[3] != "Delivered"]
    assert sum(sum(v) for v in fast.by_domain.values()) == len(waiting)
    replied = await queue.summary(Selection(reply="greylisted"), now=NOW)
    assert sum(replied.by_reply.values()) == sum(1 for r in waiting if r[4])
    expected = [0] * 10
    for r in waiting:
        if r[2].endswith("@a.example"):
            expected[age_bucket(r[1] * 60)] += 1
    assert fast.by_domain["a.example"] == expected
    counts = await queue.counts()
    assert counts.waiting_recipients == len(waiting)
    assert counts.held_recipients == sum(1 for r in rows if r[3] == "Held")


async def test_pages_are_keyset_pages_in_arrival_order(queue: SqliteQueue) -> None:
    # Same arrival for several messages: the id breaks the tie, nothing is skipped.
    _put(queue, [(f"M{i:03d}", 10 - i // 3, f"u{i}@a.example", "Queued", None) for i in range(10)])
    seen: list[str] = []
    after = None
    while True:
        page = await queue.list_page(Selection(), now=NOW, limit=3, after=after)
        seen += [m.id for m in page.messages]
        if page.after is None:
            break
        after = page.after
    ids = [f"M{i:03d}" for i in range(10)]
    # Newest first; equal arrivals by id, descending.
    assert seen == sorted(ids, key=lambda i: (int(i[1:]) // 3, i), reverse=True)


async def test_filters(queue: SqliteQueue) -> None:
    # Queue IDs sort by arrival, as real ones do (the newest has the greatest).
    _put(
        queue,
        [
            ("X9", 1, "a@x.example", "Deferred", 451),
            ("X5", 100, "b@y.example", "Queued", None),
            ("X1", 1000, "c@x.example", "Delivered", None),
        ],
    )

    async def ids(sel: Selection) -> list[str]:
        return [m.id for m in (await queue.list_page(sel, now=NOW, limit=10, after=None)).messages]

    assert await ids(Selection()) == ["X9", "X5"]
    assert await ids(Selection(waiting_only=False)) == ["X9", "X5", "X1"]
    assert await ids(Selection(domain="X.example.")) == ["X9"]
    assert await ids(Selection(reply="greylisted")) == ["X9"]
    assert await ids(Selection(reply="4.7.1")) == ["X9"]
    assert await ids(Selection(older_than=3600)) == ["X5"]
    assert await ids(Selection(newer_than=120)) == ["X9"]
    assert await ids(Selection(recipient="B@Y.example")) == ["X5"]
    assert await ids(Selection(status=Status.DELIVERED, waiting_only=False)) == ["X1"]


async def test_hold_release_cancel_with_dsn(queue: SqliteQueue) -> None:
    env = EnvelopeIn(
        sender="app@x.example",
        recipients=[RecipientIn("a@y.example"), RecipientIn("b@y.example", notify="NEVER")],
        data=b"Subject: t\r\n\r\nbody\r\n",
    )
    qid = await queue.enqueue(env)
    held = await queue.bulk("hold", Selection(ids=(qid,)), now=NOW, by="test")
    assert (held.messages, held.recipients) == (1, 2)
    m = await queue.get(qid)
    assert m is not None and {r.status for r in m.recipients} == {Status.HELD}
    assert m.status is Status.HELD
    # Held recipients are never claimed.
    assert await queue.claim("w", now=NOW + 10**6, limit=10, lease=60) == []
    released = await queue.bulk("release", Selection(ids=(qid,)), now=NOW, by="test")
    assert released.recipients == 2
    seen = []

    def dsn(message: object, original: bytes) -> EnvelopeIn | None:
        seen.append([r.address for r in message.recipients])  # type: ignore[attr-defined]
        return EnvelopeIn(sender="", recipients=[RecipientIn("app@x.example")], data=b"x")

    result = await queue.bulk(
        "cancel", Selection(domain="y.example"), now=NOW, by="test", make_dsn=dsn
    )
    assert (result.recipients, result.dsns) == (2, 1) and seen == [["a@y.example", "b@y.example"]]
    m = await queue.get(qid)
    assert m is not None and m.status is Status.CANCELLED
    events = await queue.operator_events(0)
    assert [e["action"] for e in events] == ["hold", "release", "cancel with DSN"]
    assert events[2]["selection"] == "--domain y.example" and events[2]["by"] == "test"


async def test_suspensions_expire_and_resume(queue: SqliteQueue) -> None:
    await queue.suspend("A.Example.", now=NOW, until=NOW + 60, reason="slow", by="t")
    await queue.suspend("all", now=NOW, until=None, reason="", by="config")
    assert [s.domain for s in await queue.suspensions(now=NOW)] == ["*", "a.example"]
    assert [s.domain for s in await queue.suspensions(now=NOW + 61)] == ["*"]
    assert not await queue.resume("*", by="someone else")
    assert await queue.resume("*", by="config")
    assert await queue.resume("a.example")
    assert await queue.suspensions(now=NOW) == []
