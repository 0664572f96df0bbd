"""The forwarding protocol between a delivery worker and the queue's one writer
(ferry/queue/remote.py): framing, request ids, exceptions carried with their type, and
what each end sees when the other is gone. Real socket pairs, a real SQLite queue."""

from __future__ import annotations

import asyncio
import pickle
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry.envelope import EnvelopeIn, RecipientIn, Reply, Status
from ferry.queue.base import AttemptResult, IdempotencyRecord, IdempotencyReplay
from ferry.queue.remote import (
    ForwardingQueue,
    FrameDecoder,
    QueueGone,
    QueueLink,
    QueueServer,
    RemoteError,
    encode_frame,
    portable,
)
from ferry.queue.sqlite import QueueStorageLost, SqliteQueue

# -- framing (pure) -----------------------------------------------------------------


def test_frames_survive_any_split() -> None:
    objs: list[Any] = [(1, "claim", ("owner",), {"now": 1.5}), b"x" * 70_000, None, {"a": [1, 2]}]
    stream = b"".join(encode_frame(o) for o in objs)
    for step in (1, 3, 4, 5, 1000, len(stream)):
        dec = FrameDecoder()
        got: list[Any] = []
        for i in range(0, len(stream), step):
            got += dec.feed(stream[i : i + step])
        assert got == objs, step
        assert dec.pending == 0


def test_an_unfinished_frame_waits_for_the_rest() -> None:
    frame = encode_frame("hello")
    dec = FrameDecoder()
    assert dec.feed(frame[:-1]) == []
    assert dec.pending == len(frame) - 1
    assert dec.feed(frame[-1:]) == ["hello"]


def test_an_absurd_length_is_refused() -> None:
    with pytest.raises(ValueError, match="not a queue peer"):
        FrameDecoder().feed(b"\xff\xff\xff\xff" + b"x" * 10)


def test_exceptions_keep_their_type_or_say_what_they_were() -> None:
    lost = portable(QueueStorageLost("queue.db: deleted while in use"))
    assert type(lost) is QueueStorageLost and "deleted" in str(lost)
    # An intake process's enqueue can raise IdempotencyReplay in serve: it crosses whole.
    record = IdempotencyRecord("k", "f", "Q1", "250 ok", 0.0)
    replay = portable(IdempotencyReplay(record))
    assert type(replay) is IdempotencyReplay and replay.record == record
    # A custom constructor does not survive pickling as itself: it is named instead.
    odd = portable(_Odd(3, 4))
    assert type(odd) is RemoteError and "_Odd" in str(odd)
    assert pickle.loads(pickle.dumps(odd)).args == odd.args


class _Odd(Exception):
    def __init__(self, low: int, high: int) -> None:
        super().__init__(f"between {low} and {high}")  # args cannot rebuild it


# -- both ends over a real socket pair ----------------------------------------------


def env(rcpt: str = "a@x.test") -> EnvelopeIn:
    return EnvelopeIn(sender="s@example.org", recipients=[RecipientIn(rcpt)], data=b"x\r\n")


class Pair:
    def __init__(self, owner: Any, server: QueueServer, link: QueueLink) -> None:
        self.owner = owner
        self.server = server
        self.link = link


async def connect(target: Any, **kw: Any) -> Pair:
    ours, theirs = socket.socketpair()
    server = QueueServer(target, ours, **kw)
    await server.start()
    link = await QueueLink(theirs).open()
    return Pair(target, server, link)


@pytest.fixture
async def sqlite_pair(tmp_path: Path) -> AsyncIterator[tuple[SqliteQueue, ForwardingQueue, Pair]]:
    writer = SqliteQueue(tmp_path / "q")
    pair = await connect(writer)
    worker = ForwardingQueue(SqliteQueue(tmp_path / "q", readonly=True), pair.link)
    yield writer, worker, pair
    await worker.close()
    await pair.server.close()
    await writer.close()


async def test_a_worker_claims_and_records_through_the_writer(
    sqlite_pair: tuple[SqliteQueue, ForwardingQueue, Pair],
) -> None:
    writer, worker, pair = sqlite_pair
    ids = [await writer.enqueue(env(f"u{i}@x.test")) for i in range(3)]
    commits = writer.commits
    now = time.time()
    claimed = await worker.claim("w1", now=now, limit=10, lease=60)
    assert sorted(c.message.id for c in claimed) == sorted(ids)
    assert writer.commits > commits  # the writer's commit, not the worker's
    # The worker reads on its own (read-only) connections, and sees the commit.
    assert await worker.read_messages(ids) == {i: b"x\r\n" for i in ids}
    assert await worker.extend_leases("w1", [c.recipient.id for c in claimed], until=now + 99) == 3
    reply = Reply(250, "2.0.0", "ok")
    await worker.record(
        "w1", [AttemptResult(c.recipient.id, Status.DELIVERED, reply) for c in claimed], now=now
    )
    for i in ids:
        got = await worker.get(i)
        assert got is not None and got.status is Status.DELIVERED
    assert pair.server.requests == 3


async def test_the_workers_own_queue_cannot_write(
    sqlite_pair: tuple[SqliteQueue, ForwardingQueue, Pair],
) -> None:
    _writer, worker, _pair = sqlite_pair
    assert isinstance(worker.reader, SqliteQueue)
    with pytest.raises(RuntimeError, match="read-only"):
        await worker.reader.release_leases("w1")
    assert await worker.release_leases("w1") == 0  # forwarded: fine


async def test_an_exception_in_the_writer_is_raised_in_the_worker_with_its_type(
    tmp_path: Path, sqlite_pair: tuple[SqliteQueue, ForwardingQueue, Pair]
) -> None:
    writer, worker, _pair = sqlite_pair
    await writer.enqueue(env())
    (tmp_path / "q" / "queue.db").unlink()
    with pytest.raises(QueueStorageLost, match="deleted while in use"):
        await worker.claim("w1", now=time.time(), limit=10, lease=60)


async def until(pred: Any) -> None:
    """Let the loop run until ``pred()`` holds (a deadline, not a sleep)."""

    async def spin() -> None:
        while not pred():
            await asyncio.sleep(0)

    await asyncio.wait_for(spin(), 10)


class Gate:
    """A queue-shaped object whose calls finish when the test says (the protocol only)."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}

    async def release_leases(self, owner: str | None = None) -> int:
        assert owner is not None
        self.gates.setdefault(owner, asyncio.Event())
        await self.gates[owner].wait()
        if owner == "bad":
            raise ValueError("no such owner")
        return len(owner)


async def test_requests_in_flight_at_once_get_their_own_replies() -> None:
    gate = Gate()
    pair = await connect(gate, methods={"release_leases"})
    try:
        owners = ["a", "bb", "bad", "dddd"]
        calls = [asyncio.ensure_future(pair.link.call("release_leases", o)) for o in owners]
        await until(lambda: len(gate.gates) == len(owners))  # all reached the server
        assert pair.link.in_flight == 4
        for o in reversed(owners):  # replies in the opposite order
            gate.gates[o].set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert results[0] == 1 and results[1] == 2 and results[3] == 4
        assert isinstance(results[2], ValueError) and str(results[2]) == "no such owner"
        with pytest.raises(RemoteError, match="not a forwarded queue method"):
            await pair.link.call("enqueue", env())
    finally:
        pair.link.close()
        await pair.server.close()


async def test_the_writer_gone_fails_every_call_in_flight_and_later() -> None:
    gate = Gate()
    pair = await connect(gate, methods={"release_leases"})
    call = asyncio.ensure_future(pair.link.call("release_leases", "x"))
    await until(lambda: gate.gates)
    gate.gates["x"].set()  # the server finishes it, but closes before replying
    await pair.server.close()
    with pytest.raises(QueueGone):
        await call
    await asyncio.wait_for(pair.link.lost.wait(), 10)
    with pytest.raises(QueueGone):
        await pair.link.call("release_leases", "y")


async def test_the_worker_gone_lets_the_writer_finish_what_it_received() -> None:
    gate = Gate()
    pair = await connect(gate, methods={"release_leases"})
    call = asyncio.ensure_future(pair.link.call("release_leases", "x"))
    await until(lambda: gate.gates)
    pair.link.close()
    await asyncio.wait_for(pair.server.closed(), 10)
    with pytest.raises(QueueGone):
        await call
    closing = asyncio.ensure_future(pair.server.close())
    # It waits for the request it had received: still not done after the loop has run
    # freely for a while (a bound on a negative check, not synchronisation).
    done, _ = await asyncio.wait({closing}, timeout=0.2)
    assert not done
    gate.gates["x"].set()
    await asyncio.wait_for(closing, 10)


# -- the writer's side: a worker's bookkeeping does not wait for intake's fsync -------


async def test_relaxed_writes_commit_apart_before_the_fsynced_ones(tmp_path: Path) -> None:
    """In one group, a delivery worker's writes (``relaxed()``) are committed first with
    synchronous=NORMAL and answered at once; intake's are committed after with FULL."""
    import threading

    q = SqliteQueue(tmp_path / "q")
    try:
        w = q._writer
        assert w is not None
        gate, running = threading.Event(), threading.Event()

        def hold(_conn: Any) -> None:  # keeps the writer busy while the group forms
            running.set()
            gate.wait(10)

        held = w.submit(hold)
        assert running.wait(10)
        seen: list[tuple[str, int]] = []

        def job(name: str) -> Any:
            def fn(conn: Any) -> None:
                seen.append((name, conn.execute("PRAGMA synchronous").fetchone()[0]))

            return fn

        commits = w.commits
        strict = w.submit(job("intake"))
        relaxed = w.submit(job("outcome"), fsync=False)
        gate.set()
        for fut in (held, strict, relaxed):
            fut.result(10)
        assert seen == [("outcome", 1), ("intake", 2)]  # 1 = NORMAL, 2 = FULL
        assert w.commits == commits + 3
        # The view the parent serves its workers with submits relaxed jobs.
        await q.relaxed().release_leases("w1")
        assert (
            await asyncio.to_thread(
                q.run_sync, lambda c: c.execute("PRAGMA synchronous").fetchone()[0]
            )
            == 2
        )
    finally:
        await q.close()
