"""Limits shared by nodes through PostgreSQL (``ferry/queue/postgres_limits.py``), against
the real test server: each ``PostgresLimits`` below stands for one node (its own
database session), as in ``ferry serve``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest

from ferry.queue.postgres import PostgresQueue
from ferry.queue.postgres_limits import PostgresLimits
from tests.harness import free_port
from tests.queue.backends import fresh_schema
from tests.world.wait import async_wait_until

T0 = 1_800_000_000.0


@pytest.fixture
async def dsn(pg_dsn: str) -> str:
    dsn = fresh_schema(pg_dsn)
    await (await PostgresQueue(dsn).open()).close()  # the schema, limits' step included
    return dsn


@pytest.fixture
async def nodes(dsn: str) -> AsyncIterator[list[PostgresLimits]]:
    made = [PostgresLimits(dsn), PostgresLimits(dsn)]
    yield made
    for limits in made:
        await limits.close()


def _backend_pid(limits: PostgresLimits) -> int:
    conn = limits._conn
    assert conn is not None
    return int(conn.info.backend_pid)


async def test_slots_are_shared_and_come_back_when_released(
    nodes: list[PostgresLimits],
) -> None:
    a, b = nodes
    one = await a.take_slot("dest:x.test", 2)
    two = await a.take_slot("dest:x.test", 2)  # the same session: a second slot, not one twice
    assert one is not None and two is not None and one.held and two.held
    assert await a.take_slot("dest:x.test", 2) is None
    assert await b.take_slot("dest:x.test", 2) is None  # the other node: none left
    assert await b.take_slot("dest:other.test", 2) is not None  # another destination
    one.release()
    one.release()  # idempotent
    assert not one.held
    await async_wait_until(
        lambda: b.take_slot("dest:x.test", 2), 10, message="the released slot for b"
    )
    assert await a.take_slot("dest:x.test", 2) is None
    assert a.slots_held() == 1 and b.slots_held() == 2


async def test_a_lost_session_frees_its_slots_for_the_others_and_voids_its_own(
    dsn: str, nodes: list[PostgresLimits]
) -> None:
    a, b = nodes
    held = [await a.take_slot("dest:x.test", 2) for _ in range(2)]
    assert all(s is not None and s.held for s in held)
    assert await b.take_slot("dest:x.test", 2) is None
    # The node's database session ends (a killed node, a cut network): the server frees
    # its locks by itself...
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (_backend_pid(a),))
    await async_wait_until(
        lambda: b.take_slot("dest:x.test", 2), 10, message="a's slots to come free"
    )
    # ...and the node learns it within a check, before it would count on them again.
    await async_wait_until(
        lambda: not any(s is not None and s.held for s in held), 10, message="a's slots void"
    )
    assert a.slots_held() == 0
    # It takes slots again once its session is back (here: the one b left).
    await async_wait_until(
        lambda: a.take_slot("dest:x.test", 2), 10, message="a reconnected and took a slot"
    )
    assert await b.take_slot("dest:x.test", 2) is None


async def test_a_rate_window_is_one_count_for_every_node(nodes: list[PostgresLimits]) -> None:
    a, b = nodes
    windows = [(3, 60.0)]
    assert await a.take_rate("msg:x.test", windows, T0) == 0
    assert await b.take_rate("msg:x.test", windows, T0 + 1) == 0
    assert await a.take_rate("msg:x.test", windows, T0 + 2) == 0
    wait_b = await b.take_rate("msg:x.test", windows, T0 + 3)
    wait_a = await a.take_rate("msg:x.test", windows, T0 + 3)
    assert 57 <= wait_a == wait_b <= 66
    assert await b.take_rate("msg:other.test", windows, T0 + 3) == 0  # its own window
    # Refusals counted nothing: once the first events leave the window, there is room.
    assert await b.take_rate("msg:x.test", windows, T0 + 3 + wait_b) == 0
    # Every window must have room; a refusal counts in none of them.
    both = [(10, 60.0), (4, 3600.0)]
    assert await a.take_rate("msg:y.test", both, T0) == 0
    assert await b.take_rate("msg:y.test", both, T0 + 100) == 0
    assert await a.take_rate("msg:y.test", both, T0 + 200) == 0
    assert await b.take_rate("msg:y.test", both, T0 + 300) == 0
    assert await a.take_rate("msg:y.test", both, T0 + 400) > 3000
    assert await a.take_rate("msg:y.test", [(10, 60.0)], T0 + 400) == 0


async def test_unreachable_database_means_no_slot_and_wait_never_unlimited() -> None:
    port = free_port()  # nothing listens there
    limits = PostgresLimits(f"postgresql://ferry:secret@127.0.0.1:{port}/ferry")
    try:
        assert await limits.take_slot("dest:x.test", 5) is None
        assert await limits.take_rate("msg:x.test", [(100, 60.0)], T0) > 0
        assert limits.slots_held() == 0
    finally:
        await limits.close()


async def test_slots_of_a_stopped_node_come_free(dsn: str, nodes: list[PostgresLimits]) -> None:
    a = nodes[0]
    c = PostgresLimits(dsn)
    assert await c.take_slot("smarthost:relay", 1) is not None
    assert await a.take_slot("smarthost:relay", 1) is None
    await c.close()  # a clean stop: the session ends (the server then drops its locks)
    await async_wait_until(
        lambda: a.take_slot("smarthost:relay", 1), 10, message="the stopped node's slot"
    )


async def test_state_records_keep_the_latest_change(nodes: list[PostgresLimits]) -> None:
    a, b = nodes
    assert await a.share("breaker", {}) == {}
    got = await a.share("breaker", {"relay1": (100.0, {"state": "open"})})
    assert got == {"relay1": (100.0, {"state": "open"})}
    # An older change from another node does not replace it; a newer one does.
    got = await b.share("breaker", {"relay1": (90.0, {"state": "closed"})})
    assert got == {"relay1": (100.0, {"state": "open"})}
    got = await b.share("breaker", {"relay2": (95.0, {"state": "open"})})
    assert set(got) == {"relay1", "relay2"}
    await b.share("breaker", {"relay1": (130.0, {"state": "closed"})})
    assert (await a.share("breaker", {}))["relay1"] == (130.0, {"state": "closed"})
    assert await a.share("other-kind", {}) == {}


async def test_a_claim_is_won_by_one_node_only(nodes: list[PostgresLimits]) -> None:
    a, b = nodes
    await a.share("breaker", {"relay": (100.0, {"state": "open"})})
    # Both saw the breaker open since 100 and take the probe at 130: one wins.
    first = await a.claim("breaker", "relay", 100.0, (130.0, {"state": "half_open"}))
    second = await b.claim("breaker", "relay", 100.0, (130.5, {"state": "half_open"}))
    assert first is None
    assert second == (130.0, {"state": "half_open"})  # what stands, to adopt
    # A claim on a record nobody stored yet is won.
    assert await b.claim("breaker", "new", float("-inf"), (1.0, {"state": "half_open"})) is None


async def test_claims_and_shares_fail_closed_without_the_database() -> None:
    limits = PostgresLimits(f"postgresql://ferry:secret@127.0.0.1:{free_port()}/ferry")
    try:
        assert await limits.share("breaker", {"x": (1.0, {"state": "open"})}) == {}
        stands = await limits.claim("breaker", "x", 0.0, (1.0, {"state": "half_open"}))
        assert stands is not None  # not claimed
    finally:
        await limits.close()


async def test_two_queues_in_two_schemas_do_not_share_slots(
    pg_dsn: str, nodes: list[PostgresLimits]
) -> None:
    other_dsn = fresh_schema(pg_dsn)  # another Ferry's queue, in the same database
    await (await PostgresQueue(other_dsn).open()).close()
    other = PostgresLimits(other_dsn)
    try:
        assert await nodes[0].take_slot("dest:x.test", 1) is not None
        assert await nodes[1].take_slot("dest:x.test", 1) is None  # same queue: shared
        assert await other.take_slot("dest:x.test", 1) is not None  # not the same queue
    finally:
        await other.close()
