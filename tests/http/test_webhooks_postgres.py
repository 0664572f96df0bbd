"""Webhooks with several nodes on one PostgreSQL queue: every node runs a sender, one of
them sends each endpoint's events (each event once), another takes over when it stops."""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from ferry.config import Webhook
from ferry.envelope import EnvelopeIn, RecipientIn
from ferry.http.webhooks import Endpoint
from ferry.queue.postgres import PostgresQueue
from tests.http.test_webhooks import Receiver
from tests.queue.backends import fresh_schema
from tests.world.wait import async_wait_until


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[tuple[Receiver, Path]]:
    value = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    path = tmp_path / "webhook.secret"
    path.write_text(value + "\n")
    r = Receiver(value)
    yield r, path
    r.close()


def env(n: int) -> EnvelopeIn:
    return EnvelopeIn("s@x.test", [RecipientIn(f"r{n}@y.test")], b"Subject: t\r\n\r\nx\r\n")


async def test_one_node_sends_each_endpoint_and_another_takes_over(
    pg_dsn: str, endpoint: tuple[Receiver, Path]
) -> None:
    receiver, secret_file = endpoint
    dsn = fresh_schema(pg_dsn)
    hook = Webhook(
        name="app",
        url=f"http://127.0.0.1:{receiver.port}/hooks",
        secret_file=str(secret_file),
        events=["received"],
    )
    a = await PostgresQueue(dsn, event_log=True).open()
    b = await PostgresQueue(dsn, event_log=True).open()
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    async with aiohttp.ClientSession() as session:
        node_a = asyncio.create_task(Endpoint(hook, a, session).run(stop_a))
        # a holds the turn before b's sender starts: b waits.
        await async_wait_until(lambda: a.webhook_turn("app"), 10, message="a's turn")
        assert not await b.webhook_turn("app")
        assert await b.webhook_turn("other")  # turns are per endpoint
        node_b = asyncio.create_task(Endpoint(hook, b, session).run(stop_b))
        try:
            for n in range(6):
                await (a if n % 2 else b).enqueue(env(n))

            def received(k: int) -> bool:
                return len(receiver.ids()) >= k

            await async_wait_until(lambda: received(6), 20, message="6 events")
            # a stops (its connection ends): b's sender takes over from the shared cursor.
            stop_a.set()
            await node_a
            await a.close()
            for n in range(6, 9):
                await b.enqueue(env(n))
            await async_wait_until(lambda: received(9), 20, message="9 events")
        finally:
            stop_a.set()
            stop_b.set()
            await asyncio.gather(node_a, node_b, return_exceptions=True)
            await a.close()
            await b.close()
    ids = receiver.ids()
    assert len(ids) == len(set(ids)) == 9, ids  # each event once, none twice
