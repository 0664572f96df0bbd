"""Limits shared by every node through PostgreSQL (the ``limits.SharedLimits`` contract).

- **Connection slots are session advisory locks** ``(key(schema, destination), slot)``,
  ``slot`` in ``0 .. cap-1``, taken by ``ferry_try_slot`` (schema version 4) on one
  dedicated connection per delivering process. The server frees them itself when that
  connection ends, so a node killed with SIGKILL gives its slots back as soon as the
  server sees its connection close -- no lease to wait for, no row to clean up.
- **Rates** are counters per ``(window, bucket)`` in ``limit_rates``, read and bumped in
  one short transaction under a transaction advisory lock on the window (two nodes never
  both take the last place). The arithmetic is ``limits.rate_wait``.
- **State records** (smart hosts' breakers) are rows of ``limit_states``: an upsert that
  keeps the later ``changed_at``, and a compare-and-set on ``changed_at`` for claims.

Failing closed: when the connection is lost, every slot it held is marked lost at once
(the server freed it, another node may take it now) and the pool stops reusing the
connections that held them; until the database answers again no slot is handed out and
every rate says "wait".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg

from ferry.queue.limits import (
    Record,
    bucket_of,
    first_bucket,
    lock_key,
    rate_wait,
)

log = logging.getLogger("ferry.delivery")

#: After a failure, the shortest time before the connection is tried again.
RECONNECT_SECONDS = 1.0
#: How often a connection holding slots is checked: a lost one frees its slots on the
#: server, so the node must know soon and stop counting on them.
CHECK_SECONDS = 1.0
#: How long one statement may take before the connection counts as lost.
STATEMENT_TIMEOUT_MS = 5000
#: The wait answered by a rate that cannot be read (the database is unreachable).
UNREACHABLE_WAIT = 1.0

Conn = psycopg.AsyncConnection[Any]


class _PgSlot:
    def __init__(self, owner: PostgresLimits, k: int, slot: int, generation: int) -> None:
        self._owner = owner
        self.k = k
        self.slot = slot
        self.generation = generation
        self._released = False

    @property
    def held(self) -> bool:
        return not self._released and self.generation == self._owner.generation

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._owner._release(self)


class PostgresLimits:
    """Slots and rates in the queue's database, on one connection of its own."""

    shared = True

    def __init__(
        self,
        conninfo: str,
        *,
        description: str = "postgresql",
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``name`` (the delivering process's lease owner) is shown as the connection's
        ``application_name`` ("ferry limits <name>"): ``pg_locks`` joined with
        ``pg_stat_activity`` then says which node holds which slots."""
        #: Holds the password when one was given: never log it.
        self._conninfo = conninfo
        self.description = description
        self.name = name
        self.clock = clock
        self._conn: Conn | None = None
        self._lock = asyncio.Lock()  # one statement or transaction at a time
        #: Bumped when the connection is lost: every slot of an older one is gone.
        self.generation = 0
        self._held: dict[int, list[int]] = {}  # lock key -> slots this session holds
        self._schema = ""  # the queue's schema (search_path), part of every lock key
        self._failed_at = -float("inf")
        self._tasks: set[asyncio.Task[None]] = set()
        self._checker: asyncio.Task[None] | None = None
        self._closed = False

    # -- the connection ------------------------------------------------------------

    async def _connection(self) -> Conn:
        if self._closed:
            raise ConnectionError("limits closed")
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if self._conn is not None:
            self._lost()
        if self.clock() - self._failed_at < RECONNECT_SECONDS:
            raise ConnectionError(f"{self.description} unreachable (retrying)")
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=5
            )
            # Not as ``options=`` (it would replace the DSN's, e.g. its search_path).
            await conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}".encode())
            await conn.execute(
                "SELECT set_config('application_name', %s, false)",
                (f"ferry limits {self.name}".strip()[:63],),
            )
            cur = await conn.execute("SELECT current_schema()")
            row = await cur.fetchone()
            self._schema = str(row[0]) if row and row[0] else ""
            self._conn = conn
        except psycopg.Error as exc:
            self._failed_at = self.clock()
            raise ConnectionError(f"cannot connect to {self.description}: {exc}") from None
        if self._checker is None or self._checker.done():
            self._checker = asyncio.get_running_loop().create_task(
                self._check_loop(), name="ferry-limits-check"
            )
        return self._conn

    def _lost(self) -> None:
        """The connection is gone: so are its locks, on the server's side."""
        if self._held:
            log.warning(
                "shared limits: lost the connection to %s; its %d connection slots are"
                " void until it is back",
                self.description,
                sum(len(v) for v in self._held.values()),
            )
        self.generation += 1
        self._held.clear()
        self._failed_at = self.clock()
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            task = asyncio.get_running_loop().create_task(conn.close())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, psycopg.OperationalError) or (
            self._conn is not None and self._conn.closed
        ):
            self._lost()
        elif isinstance(exc, psycopg.Error):  # not the network: say what it was
            log.error("shared limits: %s", exc)

    async def _check_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(CHECK_SECONDS)
            if not self._held or self._conn is None:
                continue
            async with self._lock:
                conn = self._conn
                if conn is None:
                    continue
                try:
                    await conn.execute("SELECT 1")
                except psycopg.Error:
                    self._lost()

    # -- slots -----------------------------------------------------------------------

    def _key(self, name: str) -> int:
        # Advisory locks belong to the database, not a schema: two queues in two schemas
        # of one database must not share their destinations' slots.
        return lock_key(f"{self._schema}/{name}")

    async def take_slot(self, key: str, cap: int) -> _PgSlot | None:
        async with self._lock:
            try:
                conn = await self._connection()
                k = self._key(key)
                held = self._held.get(k, [])
                if len(held) >= cap:
                    return None
                cur = await conn.execute("SELECT ferry_try_slot(%s, %s, %s)", (k, cap, held))
                row = await cur.fetchone()
            except (psycopg.Error, ConnectionError) as exc:
                self._failed(exc)
                return None  # fail closed: no slot without the shared count
            if row is None or row[0] is None:
                return None
            self._held.setdefault(k, []).append(int(row[0]))
            return _PgSlot(self, k, int(row[0]), self.generation)

    def _release(self, slot: _PgSlot) -> None:
        if slot.generation != self.generation or self._closed:
            return  # the connection that held it is gone, and the lock with it
        held = self._held.get(slot.k, [])
        if slot.slot in held:
            held.remove(slot.slot)
        if not held:
            self._held.pop(slot.k, None)
        task = asyncio.get_running_loop().create_task(self._unlock(slot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unlock(self, slot: _PgSlot) -> None:
        async with self._lock:
            if slot.generation != self.generation or self._conn is None:
                return
            try:
                await self._conn.execute("SELECT pg_advisory_unlock(%s, %s)", (slot.k, slot.slot))
            except psycopg.Error:
                self._lost()

    def slots_held(self) -> int:
        """Slots this process holds now (for statistics and tests)."""
        return sum(len(v) for v in self._held.values())

    # -- rates -----------------------------------------------------------------------

    async def take_rate(self, key: str, windows: Sequence[tuple[int, float]], now: float) -> float:
        windows = [(limit, period) for limit, period in windows if limit > 0]
        if not windows:
            return 0.0
        names = [f"{key}/{period:g}" for _, period in windows]
        async with self._lock:
            try:
                conn = await self._connection()
                async with conn.transaction():
                    # One node at a time per destination: read, decide, count.
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(%s)", (self._key("rate:" + key),)
                    )
                    cur = await conn.execute(
                        "SELECT key, bucket, count FROM limit_rates"
                        " WHERE key = ANY(%s) AND bucket >= ANY(%s)",
                        (names, [first_bucket(now, p) for _, p in windows]),
                    )
                    found: dict[str, dict[int, int]] = {name: {} for name in names}
                    for name, bucket, count in await cur.fetchall():
                        found[name][int(bucket)] = int(count)
                    wait = max(
                        rate_wait(found[name], now, limit, period)
                        for name, (limit, period) in zip(names, windows, strict=True)
                    )
                    if wait > 0:
                        return wait
                    buckets = [bucket_of(now, p) for _, p in windows]
                    await conn.execute(
                        "INSERT INTO limit_rates(key, bucket, count)"
                        " SELECT k, b, 1 FROM unnest(%s::text[], %s::bigint[]) AS t(k, b)"
                        " ON CONFLICT (key, bucket) DO UPDATE"
                        " SET count = limit_rates.count + 1",
                        (names, buckets),
                    )
                    await conn.execute(
                        "DELETE FROM limit_rates USING unnest(%s::text[], %s::bigint[])"
                        " AS t(k, b) WHERE key = t.k AND bucket < t.b",
                        (names, [first_bucket(now, p) for _, p in windows]),
                    )
            except (psycopg.Error, ConnectionError) as exc:
                self._failed(exc)
                return UNREACHABLE_WAIT  # fail closed: wait rather than run unlimited
        return 0.0

    # -- state records -----------------------------------------------------------------

    async def share(
        self, kind: str, changed: Mapping[str, Record], *, after: float = -math.inf
    ) -> dict[str, Record]:
        names = list(changed)
        async with self._lock:
            try:
                conn = await self._connection()
                if names:
                    await conn.execute(
                        "INSERT INTO limit_states(kind, name, changed_at, state)"
                        " SELECT %s, n, c, s::jsonb"
                        " FROM unnest(%s::text[], %s::float8[], %s::text[]) AS t(n, c, s)"
                        " ON CONFLICT (kind, name) DO UPDATE"
                        " SET changed_at = excluded.changed_at, state = excluded.state"
                        " WHERE limit_states.changed_at < excluded.changed_at",
                        (
                            kind,
                            names,
                            [changed[n][0] for n in names],
                            [json.dumps(changed[n][1]) for n in names],
                        ),
                    )
                cur = await conn.execute(
                    "SELECT name, changed_at, state FROM limit_states"
                    " WHERE kind = %s AND changed_at > %s",
                    (kind, after),
                )
                rows = await cur.fetchall()
            except (psycopg.Error, ConnectionError) as exc:
                self._failed(exc)
                return {}  # each node keeps its own view meanwhile
        return {str(n): (float(c), dict(s)) for n, c, s in rows}

    async def claim(self, kind: str, name: str, seen: float, record: Record) -> Record | None:
        async with self._lock:
            try:
                conn = await self._connection()
                cur = await conn.execute(
                    "INSERT INTO limit_states(kind, name, changed_at, state)"
                    " VALUES (%s, %s, %s, %s::jsonb)"
                    " ON CONFLICT (kind, name) DO UPDATE"
                    " SET changed_at = excluded.changed_at, state = excluded.state"
                    " WHERE limit_states.changed_at <= %s"
                    " RETURNING changed_at",
                    (kind, name, record[0], json.dumps(record[1]), seen),
                )
                if await cur.fetchone() is not None:
                    return None
                cur = await conn.execute(
                    "SELECT changed_at, state FROM limit_states WHERE kind = %s AND name = %s",
                    (kind, name),
                )
                row = await cur.fetchone()
            except (psycopg.Error, ConnectionError) as exc:
                self._failed(exc)
                return (-math.inf, {})  # not claimed: nobody can say who holds it
        return (float(row[0]), dict(row[1])) if row else (-math.inf, {})

    async def close(self) -> None:
        if self._closed:
            return
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait(set(self._tasks), timeout=5)
        self._closed = True
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._checker
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()  # the server frees every slot with it
        self._conn = None
        self._held.clear()
