"""What only the PostgreSQL backend has: its schema versions, its password handling, and
several nodes (queues) working on one database at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ferry.config import RelayConfig
from ferry.envelope import EnvelopeIn, RecipientIn, Reply, Status
from ferry.queue import open_queue
from ferry.queue.base import AttemptResult
from ferry.queue.postgres import PostgresQueue, describe_dsn
from ferry.queue.postgres_schema import LATEST, MIGRATIONS, SchemaTooNew
from tests.queue.backends import fresh_schema
from tests.world.wait import async_wait_until

OK = Reply(250, "2.0.0", "ok")
T0 = 1_800_000_000.0


def env(*rcpts: str) -> EnvelopeIn:
    return EnvelopeIn(
        sender="s@example.org", recipients=[RecipientIn(r) for r in rcpts], data=b"x\r\n"
    )


def version(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert row is not None
    return int(row[0])


async def test_schema_is_created_once_and_reopening_changes_nothing(pg_dsn: str) -> None:
    dsn = fresh_schema(pg_dsn)
    # Three nodes starting at once: the advisory lock lets one create, the others wait.
    queues = [PostgresQueue(dsn) for _ in range(3)]
    await asyncio.gather(*(q.open() for q in queues))
    qid = await queues[0].enqueue(env("a@x.test"))
    for q in queues:
        await q.close()
    assert version(dsn) == LATEST
    q = await PostgresQueue(dsn).open()
    try:
        assert (await q.get(qid)) is not None
    finally:
        await q.close()
    assert version(dsn) == LATEST


async def test_a_newer_schema_is_refused(pg_dsn: str) -> None:
    dsn = fresh_schema(pg_dsn)
    await (await PostgresQueue(dsn).open()).close()
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(LATEST + 1),))
    q = PostgresQueue(dsn)
    with pytest.raises(SchemaTooNew, match="newer Ferry"):
        await q.open()
    await q.close()


async def test_password_from_password_file_and_never_in_descriptions(
    pg_dsn: str, tmp_path: Path
) -> None:
    dsn = fresh_schema(pg_dsn)
    password = conninfo_to_dict(dsn)["password"]
    assert password
    # the DSN without its password
    bare = make_conninfo("", **{k: v for k, v in conninfo_to_dict(dsn).items() if k != "password"})
    secret = tmp_path / "pg-password"
    secret.write_text(f"{password}\n")
    config = RelayConfig.load(
        env={
            "FERRY_QUEUE__BACKEND": "postgres",
            "FERRY_QUEUE__DSN": bare,
            "FERRY_QUEUE__PASSWORD_FILE": str(secret),
            "FERRY_QUEUE__PATH": str(tmp_path / "data"),
        }
    )
    q = open_queue(config)
    assert isinstance(q, PostgresQueue)
    try:
        qid = await q.enqueue(env("a@x.test"))
        assert (await q.get(qid)) is not None
    finally:
        await q.close()
    assert password not in describe_dsn(dsn)
    assert password not in repr(config) and password not in str(config.masked())
    with_password = RelayConfig.load(
        env={"FERRY_QUEUE__BACKEND": "postgres", "FERRY_QUEUE__DSN": dsn}
    )
    assert password not in str(with_password.masked()) and password not in repr(with_password)


async def test_a_wrong_password_is_refused_without_showing_it(pg_dsn: str) -> None:
    wrong = make_conninfo(fresh_schema(pg_dsn), password="wrong-secret-1234")
    q = PostgresQueue(wrong)
    with pytest.raises(ConnectionError) as raised:
        await q.open()
    await q.close()
    assert "wrong-secret-1234" not in str(raised.value)
    assert "127.0.0.1" in str(raised.value)


async def test_nodes_claiming_at_once_never_share_a_recipient(pg_dsn: str) -> None:
    dsn = fresh_schema(pg_dsn)
    nodes = [await PostgresQueue(dsn).open() for _ in range(3)]
    try:
        await asyncio.gather(*(nodes[i % 3].enqueue(env(f"r{i}@x.test")) for i in range(300)))
        claimed: list[list[int]] = [[] for _ in nodes]

        async def drain(n: int) -> None:
            while batch := await nodes[n].claim(f"node{n}", now=T0 * 2, limit=7, lease=60):
                claimed[n] += [c.recipient.id for c in batch]

        await asyncio.gather(*(drain(n) for n in range(3)))
        everything = [i for ids in claimed for i in ids]
        assert len(everything) == 300 and len(set(everything)) == 300
    finally:
        for q in nodes:
            await q.close()


async def test_two_nodes_finishing_one_message_at_once_finish_it(pg_dsn: str) -> None:
    # Each node records one of a message's two recipients in the same instant: without
    # the message lock each would still see the other's recipient in progress, and the
    # message would never be finished (status stuck, body kept forever).
    dsn = fresh_schema(pg_dsn)
    a, b = await PostgresQueue(dsn).open(), await PostgresQueue(dsn).open()
    try:
        for _round in range(20):
            qid = await a.enqueue(env("one@x.test", "two@x.test"))
            [ca] = await a.claim("a", now=T0 * 2, limit=1, lease=60)
            [cb] = await b.claim("b", now=T0 * 2, limit=1, lease=60)
            await asyncio.gather(
                a.record("a", [AttemptResult(ca.recipient.id, Status.DELIVERED, OK)], now=T0),
                b.record("b", [AttemptResult(cb.recipient.id, Status.DELIVERED, OK)], now=T0),
            )
            m = await a.get(qid)
            assert m is not None
            assert (m.status, m.finished) == (Status.DELIVERED, T0)
            assert await a.read_message(qid) is None
    finally:
        await a.close()
        await b.close()


async def test_new_mail_on_one_node_wakes_the_others(pg_dsn: str) -> None:
    dsn = fresh_schema(pg_dsn)
    a, b = await PostgresQueue(dsn).open(), await PostgresQueue(dsn).open()
    woken = asyncio.Event()
    try:
        await b.listen(woken.set)
        await async_wait_until(woken.is_set, 10, message="the first wake on listening")
        woken.clear()
        await a.enqueue(env("a@x.test"))
        await async_wait_until(woken.is_set, 10, message="a NOTIFY from the other node")
    finally:
        await a.close()
        await b.close()


async def test_a_node_that_loses_the_database_recovers_when_it_returns(tmp_path: Path) -> None:
    import shutil
    import tempfile

    from tests.world.postgres import PostgresCluster

    # A server of its own, stopped and started again under the queue's feet.
    base = Path(tempfile.mkdtemp(prefix="ferry-pg-loss-"))
    cluster = PostgresCluster(base)
    try:
        q = await PostgresQueue(cluster.start(), pool_size=3).open()
        try:
            first = await q.enqueue(env("a@x.test"))
            cluster.stop()
            with pytest.raises(Exception) as lost:  # intake answers 451 4.3.0 on any error
                await q.enqueue(env("b@x.test"))
            assert not isinstance(lost.value, AssertionError)
            cluster.start()
            stored: list[str] = []

            async def enqueued() -> bool:
                try:
                    stored.append(await q.enqueue(env("c@x.test")))
                except Exception:
                    return False
                return True

            await async_wait_until(enqueued, 30, interval=0.2, message="enqueue to work again")
            assert (await q.get(first)) is not None and (await q.get(stored[0])) is not None
            assert len(await q.list()) == 2  # b@ was refused, never half-stored
        finally:
            await q.close()
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


async def test_nodes_are_listed_with_the_work_in_their_hands(pg_dsn: str) -> None:
    dsn = fresh_schema(pg_dsn)
    a, b = await PostgresQueue(dsn).open(), await PostgresQueue(dsn).open()
    try:
        await a.register_node("relay-a:100", "host-a", "1.0")
        await b.register_node("relay-b:200", "host-b", "1.1")
        for i in range(5):
            await a.enqueue(env(f"r{i}@x.test"))
        await a.claim("relay-a:100:0", now=T0 * 2, limit=3, lease=60)
        await b.claim("relay-b:200:1", now=T0 * 2, limit=1, lease=60)
        listed = {n.id: n for n in await a.nodes()}
        assert {k: (n.host, n.version, n.in_hand) for k, n in listed.items()} == {
            "relay-a:100": ("host-a", "1.0", 3),
            "relay-b:200": ("host-b", "1.1", 1),
        }
        assert not listed["relay-a:100"].silent(listed["relay-a:100"].heartbeat + 1)
        assert listed["relay-a:100"].silent(listed["relay-a:100"].heartbeat + 3600)
    finally:
        await b.close()  # a clean stop leaves the table
    try:
        assert [n.id for n in await a.nodes()] == ["relay-a:100"]
    finally:
        await a.close()


async def test_a_version_1_queue_is_migrated_in_place(pg_dsn: str) -> None:
    dsn = fresh_schema(pg_dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)")
        conn.execute(MIGRATIONS[0].encode())
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        conn.execute(
            "INSERT INTO messages(id, sender, size, priority, arrival, expires, status)"
            " VALUES ('OLD1', 's@x.test', 3, 0, 1, 9e9, 'Queued')"
        )
    q = await PostgresQueue(dsn).open()
    try:
        assert version(dsn) == LATEST
        m = await q.get("OLD1")
        assert m is not None and m.sender == "s@x.test"
        await q.register_node("n:1", "h", "v")  # the version 2 table is there
    finally:
        await q.close()


async def test_operator_tools_on_postgres(pg_dsn: str) -> None:
    from ferry.queue.selection import Selection

    q = await PostgresQueue(fresh_schema(pg_dsn)).open()
    try:
        a = await q.enqueue(env("a@y.example", "b@y.example"))
        b = await q.enqueue(env("c@z.example"))
        held = await q.bulk("hold", Selection(ids=(a,)), now=T0, by="test")
        assert (held.messages, held.recipients) == (1, 2)
        m = await q.get(a)
        assert m is not None and m.status is Status.HELD
        assert [c.message.id for c in await q.claim("w", now=T0 * 2, limit=9, lease=60)] == [b]
        assert (await q.counts()).held_recipients == 2
        page = await q.list_page(Selection(domain="y.example"), now=T0, limit=10)
        assert [m.id for m in page.messages] == [a]
        first = await q.list_page(Selection(), now=T0, limit=1)
        rest = await q.list_page(Selection(), now=T0, limit=1, after=first.after)
        assert [m.id for m in first.messages + rest.messages] == [b, a]
        released = await q.bulk("release", Selection(ids=(a,)), now=T0, by="test")
        assert released.recipients == 2
        cancelled = await q.bulk("cancel", Selection(domain="y.example"), now=T0, by="test")
        assert cancelled.recipients == 2
        m = await q.get(a)
        assert m is not None and m.status is Status.CANCELLED and m.finished == T0
        events = await q.operator_events(0)
        assert [e["action"] for e in events] == ["hold", "release", "cancel"]
        assert await q.last_operator_event() == events[-1]["id"]
        await q.suspend("A.Example.", now=T0, until=T0 + 60, reason="slow", by="t")
        await q.suspend("all", now=T0, until=None, reason="", by="config")
        assert [s.domain for s in await q.suspensions(now=T0)] == ["*", "a.example"]
        assert [s.domain for s in await q.suspensions(now=T0 + 61)] == ["*"]
        assert not await q.resume("*", by="someone else")
        assert await q.resume("*", by="config")
        assert await q.resume("a.example")
        assert await q.suspensions(now=T0) == []
    finally:
        await q.close()


async def test_summary_on_postgres(pg_dsn: str) -> None:
    from ferry.queue.selection import AGE_BUCKETS, Selection

    q = await PostgresQueue(fresh_schema(pg_dsn)).open()
    try:
        await q.enqueue(env("a@y.example", "b@y.example"))
        await q.enqueue(env("c@z.example"))
        now = time.time()
        s = await q.summary(Selection(), now=now + 7 * 60)  # 7 minutes on: 2nd bucket
        row = [0] * (len(AGE_BUCKETS) + 1)
        row[1] = 2
        assert s.by_domain["y.example"] == row
        assert sum(s.by_domain["z.example"]) == 1
        assert s.by_reply == {(None, None): 3}
    finally:
        await q.close()


async def test_delivery_statistics_of_two_nodes_are_added_up_once(pg_dsn: str) -> None:
    """Each scheduler adds its increments under its node; `ferry stats` reads every node's
    counters once, states only while fresh; a node that stops keeps its counts."""
    from ferry.delivery.scheduler import counter_key
    from ferry.queue.postgres import STATE_FRESH_SECONDS
    from ferry.stats import STOPPED_NODES, combine_nodes

    dsn = fresh_schema(pg_dsn)
    a, b = await PostgresQueue(dsn).open(), await PostgresQueue(dsn).open()
    sent, hosts = counter_key("sent"), counter_key("smart_hosts", "sg", "sent")
    try:
        await a.register_node("node-a:1", "host-a", "1")
        await b.register_node("node-b:2", "host-b", "1")
        state = {"active_sessions": 2, "backlog": 5, "smart_hosts": {"sg": {"state": "closed"}}}
        assert await a.add_delivery_stats("node-a:1:0", {sent: 3}, state, now=T0)
        assert await a.add_delivery_stats("node-a:1:1", {sent: 1, hosts: 1}, state, now=T0)
        assert await a.add_delivery_stats("node-a:1:0", {sent: 2}, state, now=T0 + 1)
        assert await b.add_delivery_stats("node-b:2:0", {sent: 4, hosts: 2}, state, now=T0)
        out = combine_nodes("direct", await b.delivery_stats(now=T0 + 1))
        assert out["delivery"]["sent"] == 10 and out["smart_hosts"]["sg"]["sent"] == 3
        assert out["smart_hosts"]["sg"]["state"] == "closed"
        assert (out["delivery"]["active_sessions"], out["workers"]) == (6, 3)
        assert {k: v["sent"] for k, v in out["nodes"].items()} == {"node-a:1": 6, "node-b:2": 4}
        # A killed node's states stop counting; its counts do not.
        later = combine_nodes("direct", await b.delivery_stats(now=T0 + STATE_FRESH_SECONDS + 2))
        assert later["delivery"]["sent"] == 10 and later["delivery"]["active_sessions"] == 0
    finally:
        await a.close()  # a clean stop: node-a's counts join the stopped nodes'
    try:
        out = combine_nodes("direct", await b.delivery_stats(now=T0 + 1))
        assert out["delivery"]["sent"] == 10
        assert {k: v["sent"] for k, v in out["nodes"].items()} == {STOPPED_NODES: 6, "node-b:2": 4}
        # A scheduler that stops removes its states.
        await b.add_delivery_stats("node-b:2:0", {sent: 1}, None, now=T0 + 2)
        out = combine_nodes("direct", await b.delivery_stats(now=T0 + 2))
        assert (out["delivery"]["sent"], out["workers"]) == (11, 0)
    finally:
        await b.close()


async def test_the_event_log_never_skips_an_event_committed_late(pg_dsn: str) -> None:
    """Event ids are taken at insert: an event whose transaction commits after a later
    id's must still reach a reader that follows the log by cursor (webhooks)."""
    dsn = fresh_schema(pg_dsn)
    q = await PostgresQueue(dsn).open()
    insert = "INSERT INTO events(at, type, data) VALUES (1, %s, '{}') RETURNING id"
    try:
        slow = psycopg.connect(dsn)  # a transaction left open: its event is id 1
        try:
            [(first,)] = slow.execute(insert, ("slow",)).fetchall()
            with psycopg.connect(dsn, autocommit=True) as fast:
                [(second,)] = fast.execute(insert, ("fast",)).fetchall()
            assert first < second
            seen: list[int] = []
            cursor = 0

            async def follow() -> None:
                nonlocal cursor
                for e in await q.events(after=cursor, limit=100):
                    seen.append(e.id)
                    cursor = e.id

            await follow()  # the fast one is committed, the slow one not yet
            slow.commit()
        finally:
            slow.close()
        await follow()
        assert sorted(seen) == [first, second] and len(seen) == 2
    finally:
        await q.close()


async def test_bodies_are_compressed_with_lz4_and_read_back_whole(pg_dsn: str) -> None:
    """Issue 14.4 (numbers in the README): bodies in bytea, lz4-compressed by TOAST where
    the server has lz4 (Debian's PostgreSQL does)."""
    dsn = fresh_schema(pg_dsn)
    q = await PostgresQueue(dsn).open()
    try:
        line = b"Line %d of a plain mail, as people write it.\r\n"
        text = b"".join(line % i for i in range(3000))
        qid = await q.enqueue(EnvelopeIn("s@x.test", [RecipientIn("a@y.test")], text))
        assert await q.read_message(qid) == text
    finally:
        await q.close()
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT a.attstorage, a.attcompression FROM pg_attribute a"
            " WHERE a.attrelid = 'bodies'::regclass AND a.attname = 'data'"
        ).fetchone()
        assert row == ("x", "l")
        stored = conn.execute("SELECT pg_column_size(data) FROM bodies").fetchone()
        assert stored is not None and stored[0] < len(text) // 2
