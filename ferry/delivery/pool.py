"""Idle connections kept open between deliveries, per destination and server address.

A connection is used by one delivery at a time: ``take`` removes it from the pool and
``give`` puts it back. Idle connections are closed after ``idle_timeout`` seconds, and
a connection that has carried ``max_transactions`` messages is closed instead of kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Hashable
from typing import Protocol


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
        self.reused = 0

    def take(self, key: Hashable) -> PooledClient | None:
        """An idle, still usable connection for ``key``, or None."""
        entries = self._idle.get(key)
        now = self.clock()
        while entries:
            since, client = entries.pop()
            if client.usable and now - since < self.idle_timeout:
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
        if not client.usable or client.transactions >= self.max_transactions:
            self._quit(client)
            return
        self._idle.setdefault(key, []).append((self.clock(), client))

    def expire(self) -> None:
        """Close connections idle for longer than ``idle_timeout``."""
        now = self.clock()
        for key in list(self._idle):
            keep = []
            for since, client in self._idle[key]:
                if client.usable and now - since < self.idle_timeout:
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
