"""The queue contract, run against every backend: SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.envelope import EnvelopeIn, Priority, RecipientIn, Reply, Status
from ferry.queue.base import AttemptResult, IdempotencyRecord, IdempotencyReplay, Queue
from ferry.queue.postgres import PostgresQueue
from ferry.queue.sqlite import SqliteQueue
from tests.queue.backends import BACKENDS, open_backend


@pytest.fixture(params=BACKENDS)
async def queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Queue]:
    # The PostgreSQL server is started only when a PostgreSQL case runs.
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgres" else None
    q = await open_backend(request.param, tmp_path, dsn)
    yield q
    await q.close()


def env(
    *rcpts: str,
    sender: str = "s@example.org",
    priority: Priority = Priority.NORMAL,
    data: bytes = b"Subject: x\r\n\r\nbody\r\n",
) -> EnvelopeIn:
    return EnvelopeIn(
        sender=sender, recipients=[RecipientIn(r) for r in rcpts], data=data, priority=priority
    )


OK = Reply(250, "2.0.0", "ok")
TEMP = Reply(451, "4.3.0", "try later")
PERM = Reply(550, "5.1.1", "no such user")


async def test_enqueue_then_get_is_byte_identical(queue: Queue) -> None:
    data = bytes(range(256)) * 10 + b"\r\n"
    qid = await queue.enqueue(env("a@x.test", "b@y.test", data=data))
    assert await queue.read_message(qid) == data
    m = await queue.get(qid)
    assert m is not None
    assert (m.sender, m.size, m.status) == ("s@example.org", len(data), Status.QUEUED)
    assert [r.address for r in m.recipients] == ["a@x.test", "b@y.test"]
    assert await queue.get("nope") is None


async def test_claim_orders_by_priority_then_age(queue: Queue) -> None:
    low = await queue.enqueue(env("a@x.test", priority=Priority.LOW))
    normal = await queue.enqueue(env("b@x.test"))
    urgent = await queue.enqueue(env("c@x.test", priority=Priority.URGENT))
    normal2 = await queue.enqueue(env("d@x.test"))
    claimed = await queue.claim("w1", now=9e9, limit=10, lease=60)
    assert [c.message.id for c in claimed] == [urgent, normal, normal2, low]
    # leased recipients are not claimed twice
    assert await queue.claim("w2", now=9e9, limit=10, lease=60) == []
    assert (await queue.get(urgent)).status is Status.IN_PROGRESS  # type: ignore[union-attr]


async def test_claim_limit_and_due_time(queue: Queue) -> None:
    for i in range(5):
        await queue.enqueue(env(f"r{i}@x.test"))
    first = await queue.claim("w", now=9e9, limit=2, lease=60)
    assert len(first) == 2
    assert await queue.claim("w", now=0, limit=10, lease=60) == []  # nothing due yet at t=0


async def test_expired_lease_is_reclaimed(queue: Queue) -> None:
    await queue.enqueue(env("a@x.test"))
    [c] = await queue.claim("dead-worker", now=1e10, limit=10, lease=60)
    assert await queue.claim("w2", now=1e10 + 59, limit=10, lease=60) == []
    [again] = await queue.claim("w2", now=1e10 + 61, limit=10, lease=60)
    assert again.recipient.id == c.recipient.id
    # the dead worker's late report is ignored: w2 owns the lease now
    await queue.record(
        "dead-worker", [AttemptResult(c.recipient.id, Status.DELIVERED, OK)], now=1e10 + 62
    )
    assert (await queue.get(c.message.id)).status is Status.IN_PROGRESS  # type: ignore[union-attr]


async def test_record_outcomes_history_and_derived_status(queue: Queue) -> None:
    qid = await queue.enqueue(env("a@x.test", "b@x.test", "c@x.test"))
    claimed = {c.recipient.address: c for c in await queue.claim("w", now=9e9, limit=9, lease=60)}
    await queue.record(
        "w",
        [
            AttemptResult(
                claimed["a@x.test"].recipient.id,
                Status.DELIVERED,
                OK,
                next_hop="mx.x.test[127.0.0.1]:25",
                tls="TLSv1.3 X",
            ),
            AttemptResult(claimed["b@x.test"].recipient.id, Status.FAILED, PERM),
            AttemptResult(
                claimed["c@x.test"].recipient.id, Status.DEFERRED, TEMP, next_attempt=9e9 + 60
            ),
        ],
        now=9e9,
    )
    m = await queue.get(qid)
    assert m is not None
    assert m.status is Status.PARTIALLY_DELIVERED
    by = {r.address: r for r in m.recipients}
    assert by["a@x.test"].status is Status.DELIVERED
    assert by["a@x.test"].history[0].next_hop == "mx.x.test[127.0.0.1]:25"
    assert by["a@x.test"].history[0].tls == "TLSv1.3 X"
    assert by["b@x.test"].last_reply == PERM
    assert by["c@x.test"].status is Status.DEFERRED
    assert by["c@x.test"].attempts == 1
    # a partially delivered message with a deferred recipient is listed as deferred work
    assert [x.id for x in await queue.list(status=Status.DEFERRED)] == [qid]
    assert [x.id for x in await queue.list(status=Status.PARTIALLY_DELIVERED)] == [qid]
    assert by["c@x.test"].next_attempt == 9e9 + 60
    assert await queue.next_due() == 9e9 + 60
    # the deferred recipient comes back when due
    assert await queue.claim("w", now=9e9 + 30, limit=9, lease=60) == []
    [again] = await queue.claim("w", now=9e9 + 60, limit=9, lease=60)
    assert again.recipient.address == "c@x.test"


async def test_operator_actions(queue: Queue) -> None:
    a = await queue.enqueue(env("a@x.test"))
    b = await queue.enqueue(env("b@x.test"))
    [ca, cb] = await queue.claim("w", now=9e9, limit=9, lease=60)
    await queue.record(
        "w",
        [
            AttemptResult(ca.recipient.id, Status.DEFERRED, TEMP, next_attempt=9e9 + 3600),
            AttemptResult(cb.recipient.id, Status.EXPIRED, TEMP),
        ],
        now=9e9,
    )
    assert await queue.retry(a, now=9e9 + 1) == 1
    assert (await queue.claim("w", now=9e9 + 1, limit=9, lease=60))[0].message.id == a
    assert await queue.release_leases() == 1
    assert await queue.cancel(a, now=9e9) == 1
    assert (await queue.get(a)).status is Status.CANCELLED  # type: ignore[union-attr]
    assert await queue.clear_expired() == 1
    assert await queue.get(b) is None
    assert await queue.remove(a) is True
    assert await queue.remove(a) is False


async def test_list_filters_and_pagination(queue: Queue) -> None:
    ids = [
        await queue.enqueue(env(f"r@d{i % 2}.test", sender=f"s{i % 3}@x.test")) for i in range(6)
    ]
    assert [m.id for m in await queue.list()] == ids[::-1]
    assert len(await queue.list(domain="d0.test")) == 3
    assert len(await queue.list(sender="s0@x.test")) == 2
    assert len(await queue.list(status=Status.QUEUED, limit=2, offset=1)) == 2
    assert await queue.list(status=Status.DELIVERED) == []


async def test_statistics(queue: Queue) -> None:
    a = await queue.enqueue(env("a@x.test", data=b"x" * 100, priority=Priority.HIGH))
    await queue.enqueue(env("b@x.test", data=b"y" * 50))
    claimed = await queue.claim("w", now=9e9, limit=1, lease=60)
    assert claimed[0].message.id == a
    await queue.record(
        "w",
        [AttemptResult(claimed[0].recipient.id, Status.DELIVERED, OK, route="smarthost:sendgrid")],
        now=9e9,
    )
    st = await queue.statistics(now=9e9)
    assert st.total_messages == 2
    assert (st.delivered_messages, st.queued_messages) == (1, 1)
    assert st.total_size == 150
    assert st.messages_by_priority == {"High": 1, "Normal": 1}
    assert st.messages_by_smart_host == {"smarthost:sendgrid": 1}
    assert st.oldest_message_time is not None


async def test_concurrent_enqueues_are_group_committed(queue: Queue) -> None:
    commits = lambda: queue.commits  # type: ignore[attr-defined]  # noqa: E731
    before = commits()
    ids = await asyncio.gather(*(queue.enqueue(env(f"r{i}@x.test")) for i in range(200)))
    assert len(set(ids)) == 200
    assert commits() - before < 200  # commits (fsyncs) were shared
    assert len(await queue.list(limit=1000)) == 200


async def test_a_failing_enqueue_does_not_fail_its_group(queue: Queue) -> None:
    taken = await queue.enqueue(env("a@x.test"))
    results = await asyncio.gather(
        *(queue.enqueue(env(f"r{i}@x.test")) for i in range(20)),
        queue.enqueue(env("dup@x.test"), queue_id=taken),  # the id exists: refused
        *(queue.enqueue(env(f"s{i}@x.test")) for i in range(20)),
        return_exceptions=True,
    )
    assert isinstance(results[20], Exception)
    ok = [r for i, r in enumerate(results) if i != 20]
    assert all(isinstance(r, str) for r in ok)
    assert len(await queue.list(limit=1000)) == 41
    m = await queue.get(taken)
    assert m is not None and [r.address for r in m.recipients] == ["a@x.test"]


async def test_idempotency_key_is_written_with_its_message(queue: Queue) -> None:
    rec = IdempotencyRecord("token:t:k1", "fp", "", "250 ok", expires=time.time() + 60)
    first = await queue.enqueue(env("a@x.test"), idempotency=rec)
    stored = await queue.idempotency("token:t:k1", now=time.time())
    assert stored is not None and stored.queue_id == first
    with pytest.raises(IdempotencyReplay) as raised:
        await queue.enqueue(env("b@x.test"), idempotency=rec)
    assert raised.value.record.queue_id == first
    assert [m.id for m in await queue.list()] == [first]  # the repeat stored nothing
    # an expired key may be used again
    assert await queue.idempotency("token:t:k1", now=time.time() + 120) is None
    old = IdempotencyRecord("token:t:k2", "fp", "", "250 ok", expires=time.time() - 1)
    await queue.enqueue(env("c@x.test"), idempotency=old)
    again = await queue.enqueue(env("d@x.test"), idempotency=old)
    assert (await queue.idempotency("token:t:k2", now=time.time() - 2)).queue_id == again  # type: ignore[union-attr]


async def test_data_survives_reopen(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    for backend in BACKENDS:
        q = await open_backend(backend, tmp_path / backend, _dsn(request, backend))
        qid = await q.enqueue(env("a@x.test", data=b"persist me\r\n"))
        await q.close()
        q2 = await reopen(q, tmp_path / backend)
        try:
            assert await q2.read_message(qid) == b"persist me\r\n"
        finally:
            await q2.close()


def _dsn(request: pytest.FixtureRequest, backend: str) -> str | None:
    return request.getfixturevalue("pg_dsn") if backend == "postgres" else None


async def reopen(q: Queue, tmp_path: Path) -> Queue:
    if isinstance(q, SqliteQueue):
        return SqliteQueue(tmp_path / "q")
    assert isinstance(q, PostgresQueue)
    return await PostgresQueue(q.conninfo).open()


async def test_extend_leases_keeps_work_from_other_workers(queue: Queue) -> None:
    await queue.enqueue(env("a@x.test"))
    [c] = await queue.claim("w1", now=1e10, limit=10, lease=60)
    assert await queue.extend_leases("w2", [c.recipient.id], until=1e10 + 600) == 0  # not its
    assert await queue.extend_leases("w1", [c.recipient.id], until=1e10 + 600) == 1
    assert await queue.claim("w2", now=1e10 + 300, limit=10, lease=60) == []  # still w1's
    [again] = await queue.claim("w2", now=1e10 + 601, limit=10, lease=60)
    assert again.recipient.id == c.recipient.id


async def test_record_queues_new_messages_in_the_same_transaction(queue: Queue) -> None:
    await queue.enqueue(env("a@x.test"))
    [c] = await queue.claim("w", now=9e9, limit=10, lease=60)
    dsn = env("s@example.org", sender="", data=b"Subject: bounce\r\n\r\nreport\r\n")
    [qid] = await queue.record(
        "w",
        [AttemptResult(c.recipient.id, Status.FAILED, PERM)],
        now=9e9,
        new_messages=[(dsn, 9e9 + 3600, [c.recipient.id])],
    )
    m = await queue.get(qid)
    assert m is not None and m.sender == "" and m.expires == 9e9 + 3600
    assert await queue.read_message(qid) == b"Subject: bounce\r\n\r\nreport\r\n"
    assert (await queue.get(c.message.id)).status is Status.FAILED  # type: ignore[union-attr]


async def test_no_dsn_for_an_outcome_that_was_discarded(queue: Queue) -> None:
    qid = await queue.enqueue(env("a@x.test"))
    [c] = await queue.claim("w", now=9e9, limit=10, lease=60)
    assert await queue.cancel(qid, now=9e9) == 1  # an operator cancels meanwhile
    dsn = env("s@example.org", sender="")
    ids = await queue.record(
        "w",
        [AttemptResult(c.recipient.id, Status.FAILED, PERM)],
        now=9e9,
        new_messages=[(dsn, 9e9 + 3600, [c.recipient.id])],
    )
    assert ids == [None]
    assert [m.id for m in await queue.list()] == [qid]


async def test_bulk_cancel_queues_dsns_in_the_same_transaction(queue: Queue) -> None:
    """`ferry queue cancel --dsn`: the cancelled recipients, and only those, are reported
    to the sender by a DSN queued with the cancel (both backends)."""
    from ferry.envelope import message_status
    from ferry.queue.selection import Selection

    assert isinstance(queue, (SqliteQueue, PostgresQueue))
    body = b"Subject: t\r\n\r\nbody\r\n"
    qid = await queue.enqueue(env("a@y.test", "b@y.test", "c@z.test", data=body))
    other = await queue.enqueue(env("d@z.test"))
    seen: list[tuple[str, list[str], bytes]] = []

    def make_dsn(message: object, original: bytes) -> EnvelopeIn | None:
        rcpts = [r.address for r in message.recipients]  # type: ignore[attr-defined]
        seen.append((message.id, rcpts, original))  # type: ignore[attr-defined]
        return env("s@example.org", sender="", data=b"Subject: cancelled\r\n\r\nreport\r\n")

    result = await queue.bulk(
        "cancel", Selection(domain="y.test"), now=9e9, by="test", make_dsn=make_dsn
    )
    assert (result.messages, result.recipients, result.dsns) == (1, 2, 1)
    assert seen == [(qid, ["a@y.test", "b@y.test"], body)]
    m = await queue.get(qid)
    assert m is not None
    assert [r.status for r in m.recipients] == [Status.CANCELLED, Status.CANCELLED, Status.QUEUED]
    assert m.status is message_status([r.status for r in m.recipients])
    dsns = [x for x in await queue.list() if x.id not in (qid, other)]
    assert [(d.sender, [r.address for r in d.recipients]) for d in dsns] == [
        ("", ["s@example.org"])
    ]
    assert await queue.read_message(dsns[0].id) == b"Subject: cancelled\r\n\r\nreport\r\n"
    # Nothing left to cancel: no second DSN.
    again = await queue.bulk(
        "cancel", Selection(domain="y.test"), now=9e9, by="test", make_dsn=make_dsn
    )
    assert (again.recipients, again.dsns) == (0, 0) and len(seen) == 1
    events = await queue.operator_events(0)
    assert [e["action"] for e in events] == ["cancel with DSN", "cancel with DSN"]


async def test_an_untouched_recipient_spends_no_attempt(queue: Queue) -> None:
    """``counts_as_attempt=False`` (e.g. throttled): no attempt is recorded or spent; a
    recipient never tried goes back Queued, one tried before stays Deferred."""
    await queue.enqueue(env("fresh@x.test", "tried@x.test"))
    claimed = {c.recipient.address: c for c in await queue.claim("w", now=9e9, limit=9, lease=60)}
    tried = claimed["tried@x.test"].recipient.id
    await queue.record(
        "w", [AttemptResult(tried, Status.DEFERRED, TEMP, next_attempt=9e9)], now=9e9
    )
    [again] = await queue.claim("w", now=9e9, limit=9, lease=60)
    assert again.recipient.id == tried
    untouched = [
        AttemptResult(
            c.recipient.id, Status.DEFERRED, None, next_attempt=9e9 + 5, counts_as_attempt=False
        )
        for c in (claimed["fresh@x.test"], again)
    ]
    await queue.record("w", untouched, now=9e9 + 1)
    m = await queue.get(claimed["fresh@x.test"].message.id)
    assert m is not None
    by = {r.address: r for r in m.recipients}
    assert (by["fresh@x.test"].status, by["fresh@x.test"].attempts) == (Status.QUEUED, 0)
    assert by["fresh@x.test"].history == [] and by["fresh@x.test"].next_attempt == 9e9 + 5
    assert (by["tried@x.test"].status, by["tried@x.test"].attempts) == (Status.DEFERRED, 1)
    assert len(by["tried@x.test"].history) == 1
    assert by["tried@x.test"].last_reply == TEMP  # no reply leaves the last one as it was
    st = await queue.statistics(now=9e9)
    assert st.average_retry_count == 0


async def test_expiry_reason_is_kept_for_expired_recipients_only(queue: Queue) -> None:
    await queue.enqueue(env("a@x.test", "b@x.test"))
    claimed = {c.recipient.address: c for c in await queue.claim("w", now=9e9, limit=9, lease=60)}
    await queue.record(
        "w",
        [
            AttemptResult(
                claimed["a@x.test"].recipient.id, Status.EXPIRED, TEMP, expiry_reason="lifetime"
            ),
            AttemptResult(
                claimed["b@x.test"].recipient.id, Status.FAILED, PERM, expiry_reason="lifetime"
            ),
        ],
        now=9e9,
    )
    m = await queue.get(claimed["a@x.test"].message.id)
    assert m is not None and m.status is Status.FAILED and m.finished == 9e9
    by = {r.address: r for r in m.recipients}
    assert by["a@x.test"].expiry_reason == "lifetime"
    assert by["b@x.test"].expiry_reason is None
