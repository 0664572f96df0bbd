"""A queue that stays small (issue 11.2): bodies go when a message is finished, history
after the retention, free pages back to the file system, statistics from pending rows."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.envelope import EnvelopeIn, Priority, RecipientIn, Reply, Status
from ferry.queue.base import AttemptResult, Queue
from ferry.queue.retention import Retention, pages_to_reclaim, purge_history
from ferry.queue.sqlite import SCHEMA, SqliteQueue, connect
from ferry.queue.sqlite_ops import PENDING_WHERE
from ferry.queue.sqlite_schema import DUE_WHERE, LATEST, MIGRATIONS, SchemaTooNew
from tests.queue.backends import BACKENDS, open_backend

DAY = 86400.0
T0 = 1_800_000_000.0  # a fixed "now": every time below is explicit, no clock is read
OK = Reply(250, "2.0.0", "ok")
TEMP = Reply(451, "4.3.0", "try later")
PERM = Reply(550, "5.1.1", "no such user")


@pytest.fixture(params=BACKENDS)
async def queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Queue]:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgres" else None
    q = await open_backend(request.param, tmp_path, dsn)
    yield q
    await q.close()


def env(*rcpts: str, data: bytes = b"Subject: x\r\n\r\nbody\r\n", **kw: object) -> EnvelopeIn:
    return EnvelopeIn(
        sender="s@example.org",
        recipients=[RecipientIn(r) for r in rcpts],
        data=data,
        **kw,  # type: ignore[arg-type]
    )


async def finish(q: Queue, status: Status, *, at: float, reply: Reply = OK, **kw: object) -> None:
    """Claim everything due and record ``status`` for it at ``at``."""
    claimed = await q.claim("w", now=at, limit=1000, lease=60)
    await q.record(
        "w",
        [AttemptResult(c.recipient.id, status, reply, **kw) for c in claimed],  # type: ignore[arg-type]
        now=at,
    )


async def test_body_goes_when_the_last_recipient_is_final(queue: Queue) -> None:
    qid = await queue.enqueue(env("a@x.test", "b@y.test"))
    claimed = await queue.claim("w", now=T0, limit=10, lease=60)
    a, b = (c.recipient.id for c in claimed)
    await queue.record(
        "w",
        [
            AttemptResult(a, Status.DELIVERED, OK),
            AttemptResult(b, Status.DEFERRED, TEMP, next_attempt=T0 + 60),
        ],
        now=T0,
    )
    assert await queue.read_message(qid) is not None  # b is still pending
    m = await queue.get(qid)
    assert m is not None and m.finished is None
    [c] = await queue.claim("w", now=T0 + 60, limit=10, lease=60)
    await queue.record("w", [AttemptResult(c.recipient.id, Status.FAILED, PERM)], now=T0 + 61)
    assert await queue.read_message(qid) is None
    m = await queue.get(qid)  # the history stays for tracing
    assert m is not None and m.finished == T0 + 61
    assert m.status is Status.PARTIALLY_DELIVERED
    assert [len(r.history) for r in m.recipients] == [1, 2]


async def test_cancelled_message_loses_its_body(queue: Queue) -> None:
    qid = await queue.enqueue(env("a@x.test"))
    await queue.cancel(qid, now=T0)
    assert await queue.read_message(qid) is None
    assert (await queue.get(qid)).finished == T0  # type: ignore[union-attr]


async def test_dsn_queued_with_the_outcome_keeps_its_own_body(queue: Queue) -> None:
    qid = await queue.enqueue(env("a@x.test"))
    [c] = await queue.claim("w", now=T0, limit=10, lease=60)
    dsn = EnvelopeIn(sender="", recipients=[RecipientIn("s@example.org")], data=b"report\r\n")
    [dsn_id] = await queue.record(
        "w",
        [AttemptResult(c.recipient.id, Status.FAILED, PERM)],
        now=T0,
        new_messages=[(dsn, T0 + DAY, [c.recipient.id])],
    )
    assert await queue.read_message(qid) is None
    assert dsn_id is not None and await queue.read_message(dsn_id) == b"report\r\n"


async def test_expiry_reason_is_recorded(queue: Queue) -> None:
    qid = await queue.enqueue(env("a@x.test"))
    await finish(queue, Status.EXPIRED, at=T0, reply=TEMP, expiry_reason="max_retries")
    m = await queue.get(qid)
    assert m is not None and m.recipients[0].expiry_reason == "max_retries"


async def test_purge_deletes_only_history_past_the_retention(queue: Queue) -> None:
    old = await queue.enqueue(env("a@x.test"))
    await finish(queue, Status.DELIVERED, at=T0)
    recent = await queue.enqueue(env("b@x.test"))
    await finish(queue, Status.DELIVERED, at=T0 + 2 * DAY)
    pending = await queue.enqueue(env("c@x.test"))
    assert await queue.purge(before=T0 + DAY, limit=100) == 1
    assert await queue.get(old) is None
    assert await queue.get(recent) is not None and await queue.get(pending) is not None
    assert await queue.purge(before=T0 + 10 * DAY, limit=100) == 1
    assert [m.id for m in await queue.list()] == [pending]  # never a pending message


async def test_purge_runs_in_batches_oldest_first(queue: Queue) -> None:
    ids = []
    for i in range(7):
        ids.append(await queue.enqueue(env(f"r{i}@x.test")))
        await finish(queue, Status.DELIVERED, at=T0 + i)
    assert await queue.purge(before=T0 + 100, limit=3) == 3
    left = {m.id for m in await queue.list(limit=100)}
    assert left == set(ids[3:])
    result = await purge_history(queue, now=T0 + 100, retention=0, batch=2, pause=0)
    assert result.messages == 4 and await queue.list() == []


async def test_retention_uses_its_injected_clock(queue: Queue) -> None:
    qid = await queue.enqueue(env("a@x.test"))
    await finish(queue, Status.DELIVERED, at=T0)
    now = [T0 + 7 * DAY - 1]
    retention = Retention(queue, retention=7 * DAY, clock=lambda: now[0], pause=0)
    assert (await retention.run_once()).messages == 0
    assert await queue.get(qid) is not None
    now[0] = T0 + 7 * DAY + 1
    assert (await retention.run_once()).messages == 1
    assert await queue.get(qid) is None and retention.purged == 1


@pytest.mark.parametrize(
    ("free", "total", "want"), [(0, 100, 0), (10, 100, 0), (11, 100, 2), (900, 1000, 889)]
)
def test_pages_to_reclaim_keeps_a_tenth_for_reuse(free: int, total: int, want: int) -> None:
    assert pages_to_reclaim(free, total) == want


# -- statistics from counters, kept right by triggers -------------------------------------


def _scan(db: Path) -> dict[str, object]:
    """The statistics the slow way: scanning every row."""
    conn = sqlite3.connect(db)
    try:
        counts = dict(conn.execute("SELECT status, COUNT(*) FROM messages GROUP BY status"))
        return {
            "counts": counts,
            "size": conn.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()[0],
            "prio": {
                Priority(p).name.capitalize(): n
                for p, n in conn.execute(
                    "SELECT priority, COUNT(*) FROM messages GROUP BY priority"
                )
            },
            "oldest_pending": conn.execute(
                "SELECT MIN(arrival) FROM recipients"
                " WHERE status IN ('Queued','Deferred','InProgress')"
            ).fetchone()[0],
            "pending_age": conn.execute(
                "SELECT AVG(? - arrival) FROM messages WHERE id IN (SELECT message_id"
                " FROM recipients WHERE status IN ('Queued','Deferred','InProgress'))",
                (T0 + 10_000,),
            ).fetchone()[0],
            "retries": conn.execute(
                "SELECT AVG(CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END) FROM recipients"
            ).fetchone()[0],
            "routes": dict(
                conn.execute(
                    "SELECT route, COUNT(DISTINCT message_id) FROM recipients"
                    " WHERE route IS NOT NULL GROUP BY route"
                )
            ),
        }
    finally:
        conn.close()


async def _random_operations(q: SqliteQueue, rng: random.Random, now: float, n: int) -> float:
    """``n`` random enqueues, claims, outcomes, cancels, removals and purges; the clock."""
    for _ in range(n):
        now += 1
        op = rng.random()
        if op < 0.4:
            k = rng.randint(1, 3)
            await q.enqueue(
                env(
                    *(f"r{i}@d{rng.randint(0, 3)}.test" for i in range(k)),
                    data=b"x" * rng.randint(1, 500),
                    priority=Priority(rng.randint(0, 3)),
                )
            )
        elif op < 0.75:
            claimed = await q.claim("w", now=now, limit=rng.randint(1, 5), lease=60)
            results = []
            for c in claimed:
                status = rng.choice([Status.DELIVERED, Status.FAILED, Status.DEFERRED])
                results.append(
                    AttemptResult(
                        c.recipient.id,
                        status,
                        OK if status is Status.DELIVERED else TEMP,
                        next_attempt=now if status is Status.DEFERRED else None,
                        route=rng.choice(["direct", "smarthost:a", "smarthost:b"]),
                        counts_as_attempt=rng.random() < 0.9,
                    )
                )
            await q.record("w", results, now=now)
        elif op < 0.85:
            ms = await q.list(limit=1000)
            if ms:
                m = rng.choice(ms)
                await (q.cancel(m.id, now=now) if rng.random() < 0.5 else q.remove(m.id))
        elif op < 0.95:
            await q.purge(before=now - rng.randint(0, 50), limit=rng.randint(1, 5))
        else:
            await q.clear_expired()
        if rng.random() < 0.1:
            await q.release_leases()
    return now


async def _assert_counters_exact(q: SqliteQueue, now: float) -> None:
    """The statistics (from counters kept by triggers) equal a scan of every row."""
    st = await q.statistics(now=now)
    scan = _scan(q.db_path)
    counts = scan["counts"]
    assert isinstance(counts, dict)
    assert st.total_messages == sum(counts.values()) > 0
    assert st.delivered_messages == counts.get("Delivered", 0)
    assert st.queued_messages == counts.get("Queued", 0)
    assert st.in_progress_messages == counts.get("InProgress", 0)
    assert st.deferred_messages == counts.get("Deferred", 0)
    assert st.partially_delivered_messages == counts.get("PartiallyDelivered", 0)
    assert st.failed_messages == counts.get("Failed", 0)
    assert st.cancelled_messages == counts.get("Cancelled", 0)
    assert st.total_size == scan["size"]
    assert st.messages_by_priority == scan["prio"]
    assert st.average_retry_count == pytest.approx(scan["retries"])
    assert st.messages_by_smart_host == scan["routes"]
    assert st.oldest_pending_recipient_time == scan["oldest_pending"]
    ages = await q.statistics(now=T0 + 10_000)
    assert ages.average_queue_time == pytest.approx(scan["pending_age"], abs=1)


async def test_counters_match_a_full_scan_after_random_operations(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "c")
    try:
        now = await _random_operations(q, random.Random(7), T0, 300)
        await _assert_counters_exact(q, now)
    finally:
        await q.close()


def _vm_steps(db: Path, sql: str) -> int:
    """How much work SQLite does for a query (virtual machine steps, not wall time)."""
    conn = sqlite3.connect(db)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 1)
    try:
        conn.execute(sql).fetchall()
    finally:
        conn.close()
    return steps


async def test_pending_statistics_and_listings_do_not_scan_the_history(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "h")
    try:
        for i in range(20):
            await q.enqueue(env(f"p{i}@x.test"))
        db = q.db_path
        probes = {
            "statistics": "SELECT status, priority, n, size FROM message_counts WHERE n != 0",
            "pending": "SELECT MIN(arrival) FROM messages WHERE finished IS NULL",
            "age": "SELECT n, arrival_sum FROM pending_totals WHERE id=1",
            "oldest": "SELECT MIN(arrival) FROM messages",
            # the subquery of `queue list --status queued`
            "list": f"SELECT message_id FROM recipients WHERE {PENDING_WHERE} AND status='Queued'",
            # `next_due`: the due recipients' first entry, the ones in progress
            "due": f"SELECT MIN(next_attempt) FROM recipients INDEXED BY recipients_due"
            f" WHERE {DUE_WHERE}",
        }
        before = {k: _vm_steps(db, sql) for k, sql in probes.items()}
        before_stats = await q.statistics(now=T0)

        def history(conn: sqlite3.Connection) -> None:
            # 5,000 finished messages, written directly (fast), then counted by triggers.
            for i in range(5000):
                mid = f"H{i:010d}"
                conn.execute(
                    "INSERT INTO messages(id, sender, size, priority, arrival, expires, status,"
                    " finished) VALUES (?, 's@x', 10, 1, ?, ?, 'Delivered', ?)",
                    (mid, T0 - 5000 + i, T0 + DAY, T0),
                )
                conn.execute(
                    "INSERT INTO recipients(message_id, address, domain, status, priority,"
                    " arrival, attempts) VALUES (?, 'a@x.test', 'x.test', 'Delivered', 1, ?, 1)",
                    (mid, T0 - 5000 + i),
                )

        q.run_sync(history)
        after = {k: _vm_steps(db, sql) for k, sql in probes.items()}
        for k in probes:
            assert after[k] < before[k] + 50, (k, before[k], after[k])
        st = await q.statistics(now=T0)
        assert st.delivered_messages == 5000 and st.queued_messages == 20
        assert st.oldest_pending_recipient_time == before_stats.oldest_pending_recipient_time
        # listing pending mail walks the pending index, not 5,000 finished messages
        plan = " ".join(
            row[3]
            for row in sqlite3.connect(db).execute(
                "EXPLAIN QUERY PLAN SELECT message_id FROM recipients"
                f" WHERE {PENDING_WHERE} AND status='Queued'"
            )
        )
        assert "recipients_pending" in plan
        assert len(await q.list(status=Status.QUEUED, limit=100)) == 20
    finally:
        await q.close()


# -- free space goes back to the file system -------------------------------------------


async def test_purged_space_is_returned_to_the_file_system(tmp_path: Path) -> None:
    # Every body a row (large ones would be spool files): pages to free and give back.
    q = SqliteQueue(tmp_path / "v", spool_threshold=None)
    try:
        for i in range(40):
            await q.enqueue(env(f"r{i}@x.test", data=b"z" * 100_000))
        free, full = await q.free_space()
        await finish(q, Status.DELIVERED, at=T0)  # bodies go: pages are freed
        free, total = await q.free_space()
        assert total == full and free > total // 2  # free pages, same file
        # One call gives back as many pages as asked, in one transaction (Python's sqlite3
        # steps `PRAGMA incremental_vacuum(N)` only once: it used to free a single page).
        assert await q.reclaim_space(pages=100) == 100
        assert (await q.free_space())[1] == full - 100
        result = await purge_history(q, now=T0 + DAY, retention=0, pause=0)
        assert result.messages == 40 and result.pages > 0
        free, total = await q.free_space()
        assert total < full // 4 and free <= total // 10 + 2  # the reserve, rounded
        # ...and the file itself shrinks (the purge ends with a WAL checkpoint)
        assert q.db_path.stat().st_size <= total * 4096
    finally:
        await q.close()


# -- schema migration --------------------------------------------------------------------


def _v1_database(path: Path) -> None:
    """A queue.db as Ferry wrote it before schema version 2 (no auto_vacuum)."""
    path.mkdir(parents=True)
    conn = connect(path / "queue.db")
    conn.executescript(SCHEMA)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    for mid, status in (("DONE", "Delivered"), ("WAIT", "Deferred")):
        conn.execute(
            "INSERT INTO messages(id, sender, size, priority, arrival, expires, status)"
            " VALUES (?, 's@x', 5, 1, ?, ?, ?)",
            (mid, T0, T0 + DAY, status),
        )
        conn.execute("INSERT INTO bodies VALUES (?, ?)", (mid, b"hello"))
        conn.execute(
            "INSERT INTO recipients(message_id, address, domain, status, priority, arrival,"
            " attempts, route) VALUES (?, 'a@x.test', 'x.test', ?, 1, ?, 3, 'direct')",
            (mid, status, T0),
        )
    conn.execute(
        "INSERT INTO attempts(recipient_id, at, outcome) VALUES (1, ?, 'Delivered')", (T0 + 5,)
    )
    conn.close()


async def test_version_1_database_is_migrated(tmp_path: Path) -> None:
    _v1_database(tmp_path / "m")
    q = SqliteQueue(tmp_path / "m")
    try:
        assert q.run_sync(lambda c: c.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2
        version = q.run_sync(
            lambda c: c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        )
        assert version == (str(LATEST),)
        done, wait = await q.get("DONE"), await q.get("WAIT")
        assert done is not None and done.finished == T0 + 5  # its last attempt
        assert wait is not None and wait.finished is None
        assert await q.read_message("DONE") is None
        assert await q.read_message("WAIT") == b"hello"
        st = await q.statistics(now=T0)
        assert (st.delivered_messages, st.deferred_messages, st.total_size) == (1, 1, 10)
        assert st.average_retry_count == 2 and st.messages_by_smart_host == {"direct": 2}
        assert await q.purge(before=T0 + 6, limit=10) == 1
    finally:
        await q.close()
    await SqliteQueue(tmp_path / "m").close()  # opening again changes nothing


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    await SqliteQueue(tmp_path / "n").close()
    conn = sqlite3.connect(tmp_path / "n" / "queue.db")
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(LATEST + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNew):
        SqliteQueue(tmp_path / "n")


def _v5_database(path: Path) -> None:
    """A queue.db as Ferry wrote it at schema version 5 (partial indexes with IN lists,
    the first counter triggers), holding mail in every state."""
    path.mkdir(parents=True)
    conn = connect(path / "queue.db")
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.executescript(SCHEMA)
    conn.execute("BEGIN")
    for step in MIGRATIONS[:4]:  # versions 2 to 5
        step(conn)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '5')")
    # (message, its status, finished; recipients: status, attempts, route, lease)
    rows: list[tuple[str, str, float | None, list[tuple[str, int, str | None, str | None]]]] = [
        ("M1", "Queued", None, [("Queued", 0, None, None), ("Queued", 0, None, None)]),
        ("M2", "InProgress", None, [("InProgress", 0, None, "old-worker")]),
        ("M3", "Deferred", None, [("Deferred", 2, "smarthost:a", None)]),
        ("M4", "Delivered", T0 - 5, [("Delivered", 1, "direct", None)]),
        (
            "M5",
            "PartiallyDelivered",
            None,
            [("Delivered", 1, "smarthost:a", None), ("Deferred", 3, "smarthost:b", None)],
        ),
        ("M6", "Cancelled", T0 - 4, [("Cancelled", 0, None, None)]),
    ]
    for i, (mid, status, finished, recipients) in enumerate(rows):
        conn.execute(
            "INSERT INTO messages(id, sender, size, priority, arrival, expires, status,"
            " finished) VALUES (?, 's@x', ?, ?, ?, ?, ?, ?)",
            (mid, 10 * (i + 1), i % 3, T0 - 100 + i, T0 + DAY, status, finished),
        )
        if finished is None:
            conn.execute("INSERT INTO bodies VALUES (?, ?)", (mid, b"x" * 10 * (i + 1)))
        for j, (rstatus, attempts, route, owner) in enumerate(recipients):
            conn.execute(
                "INSERT INTO recipients(message_id, address, domain, status, priority,"
                " arrival, attempts, next_attempt, route, lease_owner, lease_until)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    mid,
                    f"r{j}@d{j}.test",
                    f"d{j}.test",
                    rstatus,
                    i % 3,
                    T0 - 100 + i,
                    attempts,
                    T0 - 50 if rstatus in ("Queued", "Deferred") else None,
                    route,
                    owner,
                    T0 - 1 if owner else None,  # a lease that ran out
                ),
            )
    conn.execute("COMMIT")
    conn.close()


def _shape(db: Path) -> dict[str, str]:
    """The indexes and triggers of a database, as SQLite keeps their definitions."""
    conn = sqlite3.connect(db)
    try:
        return dict(
            conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type IN ('index', 'trigger')"
                " AND sql IS NOT NULL"
            ).fetchall()
        )
    finally:
        conn.close()


async def test_version_5_database_is_migrated_with_exact_counters(tmp_path: Path) -> None:
    """Version 6 rebuilds the partial indexes and counter triggers (cheaper to keep):
    an old queue comes out shaped like a new one, its counters still exact, and stays
    exact through every kind of change afterwards."""
    _v5_database(tmp_path / "old")
    await SqliteQueue(tmp_path / "new").close()
    q = SqliteQueue(tmp_path / "old")
    try:
        version = q.run_sync(
            lambda c: c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        )
        assert version == (str(LATEST),) and LATEST >= 6
        shape = _shape(q.db_path)
        assert shape == _shape(tmp_path / "new" / "queue.db")
        assert not [name for name, sql in shape.items() if " IN (" in sql.upper()]
        await _assert_counters_exact(q, T0)
        st = await q.statistics(now=T0)
        assert st.messages_by_smart_host == {"direct": 1, "smarthost:a": 2, "smarthost:b": 1}
        # The queries that name the rebuilt indexes find the same mail as before.
        assert await q.next_due() == T0 - 50
        claimed = await q.claim("w", now=T0, limit=100, lease=60)
        assert sorted(c.message.id for c in claimed) == ["M1", "M1", "M2", "M3", "M5"]
        assert [m.id for m in await q.list(status=Status.IN_PROGRESS)] == ["M5", "M3", "M2", "M1"]
        assert await q.next_due() == T0 + 60  # the new leases' end
        await q.record(
            "w",
            [
                AttemptResult(c.recipient.id, Status.DELIVERED, OK, route="smarthost:b")
                for c in claimed
            ],
            now=T0,
        )
        await _assert_counters_exact(q, T0)
        now = await _random_operations(q, random.Random(11), T0, 200)
        await _assert_counters_exact(q, now)
    finally:
        await q.close()
