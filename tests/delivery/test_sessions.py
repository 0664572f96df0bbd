"""Delivery sessions driven directly: several sessions sharing one destination's work."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ferry.delivery.mx import MxResolver
from ferry.delivery.sessions import Delivery, Destination, WorkItem, make_shaper
from ferry.envelope import EnvelopeIn, RecipientIn, Status
from ferry.queue.sqlite import SqliteQueue
from tests.delivery.relay_world import SENDER, World, msg


async def _claimed_destination(queue: SqliteQueue, world: World, domain: str, n: int) -> Any:
    for i in range(n):
        await queue.enqueue(EnvelopeIn(SENDER, [RecipientIn(f"u{i}@{domain}")], msg(f"s{i}")))
    claimed = await queue.claim("t", now=time.time() + 1, limit=n, lease=60)
    assert len(claimed) == n
    return claimed


async def test_sessions_sharing_a_destination_never_pop_an_empty_queue(world: World) -> None:
    """Issue 10.7: three sessions start on a destination holding two messages. Each one
    saw work, awaited the body read-ahead, then popped: the third found the deque empty
    (IndexError) and the session died. Now each session takes its item before awaiting."""
    mx = world.mx("mx.race.test").publish(world.dns, "race.test")
    config = world.config()
    queue = SqliteQueue(world.tmp_path / "q", durable=False)
    resolver = MxResolver([world.dns.address], timeout=2)
    delivery = Delivery(config, queue, resolver, owner="t")
    try:
        claimed = await _claimed_destination(queue, world, "race.test", 2)
        dest = Destination("race.test", make_shaper(config, "race.test"))
        for c in claimed:
            dest.pending.append(WorkItem(c.message, [c]))
            delivery.held.add(c.recipient.id)
        results = await asyncio.gather(
            *(delivery.run_session(dest) for _ in range(3)), return_exceptions=True
        )
        assert results == [None, None, None]
        await delivery.flush()
        assert not dest.pending and not delivery.held
        for c in claimed:
            m = await queue.get(c.message.id)
            assert m is not None and m.status is Status.DELIVERED
        assert len(await mx.async_wait_for_messages(2)) == 2
    finally:
        await delivery.pool.close()
        await queue.close()


async def test_concurrent_sessions_keep_the_message_rate(world: World) -> None:
    """Check-await-act on the message rate: every session checked the rate, awaited its
    transfer and only then counted the message, so three sessions sent three messages
    under ``messages_per_minute = 1``. Now the slot is taken when the check passes."""
    mx = world.mx("mx.rate.test").publish(world.dns, "rate.test")
    config = world.config(messages_per_minute=1)
    queue = SqliteQueue(world.tmp_path / "q", durable=False)
    resolver = MxResolver([world.dns.address], timeout=2)
    delivery = Delivery(config, queue, resolver, owner="t")
    try:
        claimed = await _claimed_destination(queue, world, "rate.test", 3)
        dest = Destination("rate.test", make_shaper(config, "rate.test"))
        for c in claimed:
            dest.pending.append(WorkItem(c.message, [c]))
            delivery.held.add(c.recipient.id)
        await asyncio.gather(*(delivery.run_session(dest) for _ in range(3)))
        await delivery.flush()
        assert len(mx.messages) == 1
        assert len(dest.pending) == 2  # waiting for the next minute, still held
    finally:
        await delivery.pool.close()
        await queue.close()
