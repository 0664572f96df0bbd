"""Idle connections kept open between deliveries, per destination and server address.

A connection is used by one delivery at a time: ``take`` removes it from the pool and
``give`` puts it back. Idle connections are closed after ``idle_timeout`` seconds, and
a connection that has carried ``max_transactions`` messages is closed instead of kept.

A connection may hold a connection slot of its destination (``queue.limits``: with
several nodes, a slot shared through the database): :meth:`ConnectionPool.hold` ties
them together. The slot is held while the connection is open, idle here included -- the
destination sees an open connection either way -- and released when it closes. A
connection whose slot was lost (the node lost its database session) is never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Hashable
from typing import Protocol

from ferry.queue.limits import Slot


class PooledClient(Protocol):
    """What the pool needs of a client (``SmtpClient`` satisfies it)."""

    @property
    def usable(self) -> bool: ...

    transactions: int

    async def quit(self) -> None: ...

    def close(self) -> None: ...


class ConnectionPool:
    """Idle SMTP connections keyed by (destination, address, port, tls mode...)."""

    def __init__(
        self,
        *,
        idle_timeout: float = 10.0,
        max_transactions: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_transactions = max_transactions
        self.clock = clock
        self._idle: dict[Hashable, list[tuple[float, PooledClient]]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        # id(client) -> (client, its slot, how long it may idle holding that slot)
        self._slots: dict[int, tuple[PooledClient, Slot, float]] = {}
        self.reused = 0

    def hold(self, client: PooledClient, slot: Slot, *, idle_timeout: float | None = None) -> None:
        """``client`` holds ``slot`` until it is closed; while idle here, for at most
        ``idle_timeout`` seconds (default: the pool's)."""
        self._slots[id(client)] = (client, slot, min(idle_timeout or math.inf, self.idle_timeout))

    def slot_lost(self, client: PooledClient) -> bool:
        """Whether ``client`` held a slot that is gone (it must carry nothing more)."""
        held = self._slots.get(id(client))
        return held is not None and not held[1].held

    def _keeps(self, client: PooledClient, since: float, now: float) -> bool:
        held = self._slots.get(id(client))
        if held is None:
            return client.usable and now - since < self.idle_timeout
        return client.usable and held[1].held and now - since < held[2]

    def take(self, key: Hashable) -> PooledClient | None:
        """An idle, still usable connection for ``key``, or None."""
        entries = self._idle.get(key)
        now = self.clock()
        while entries:
            since, client = entries.pop()
            if self._keeps(client, since, now):
                self.reused += 1
                return client
            self._quit(client)
        self._idle.pop(key, None)
        return None

    def has_idle(self, key_prefix: Hashable) -> bool:
        """Whether any idle connection's key starts with ``key_prefix`` (a destination)."""
        return any(
            isinstance(k, tuple) and k and k[0] == key_prefix and v for k, v in self._idle.items()
        )

    def give(self, key: Hashable, client: PooledClient) -> None:
        """Return a connection after use; it is kept only if it can carry more."""
        held = self._slots.get(id(client))
        if (
            not client.usable
            or client.transactions >= self.max_transactions
            or (held is not None and not held[1].held)
        ):
            self._quit(client)
            return
        self._idle.setdefault(key, []).append((self.clock(), client))

    def expire(self) -> None:
        """Close connections idle for longer than ``idle_timeout``."""
        now = self.clock()
        for key in list(self._idle):
            keep = []
            for since, client in self._idle[key]:
                if self._keeps(client, since, now):
                    keep.append((since, client))
                else:
                    self._quit(client)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def _quit(self, client: PooledClient) -> None:
        task = asyncio.get_running_loop().create_task(client.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        held = self._slots.pop(id(client), None)
        if held is not None:
            # The slot is free once the connection is closed, not when QUIT is sent.
            task.add_done_callback(lambda _t: held[1].release())

    async def close(self) -> None:
        """QUIT every idle connection and wait for them (bounded)."""
        for entries in self._idle.values():
            for _since, client in entries:
                self._quit(client)
        self._idle.clear()
        if self._closing:
            with contextlib.suppress(Exception):
                await asyncio.wait(set(self._closing), timeout=5)
        for task in list(self._closing):
            task.cancel()
