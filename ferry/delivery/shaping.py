"""Traffic shaping per destination: concurrent connections and new connections per minute.

Pure and clock-injected: the scheduler asks "may I open a connection now, and if not,
when?" and never sleeps while holding anything, so a throttled destination waits
without stalling any other (the seed's code held one global lock while sleeping).
"""

from __future__ import annotations

import collections
import math


class RateWindow:
    """At most ``limit`` events in any ``period`` seconds (a sliding window)."""

    def __init__(self, limit: int, period: float) -> None:
        if limit < 1 or period <= 0:
            raise ValueError("limit must be >= 1 and period > 0")
        self.limit = limit
        self.period = period
        self._events: collections.deque[float] = collections.deque()

    def _trim(self, now: float) -> None:
        while self._events and self._events[0] <= now - self.period:
            self._events.popleft()

    def allowed(self, now: float) -> bool:
        self._trim(now)
        return len(self._events) < self.limit

    def next_allowed(self, now: float) -> float:
        """The earliest time an event is allowed (``now`` if it is allowed already)."""
        self._trim(now)
        if len(self._events) < self.limit:
            return now
        return self._events[len(self._events) - self.limit] + self.period

    def record(self, now: float) -> None:
        self._events.append(now)

    def __len__(self) -> int:
        return len(self._events)


class DestinationShaper:
    """The limits of one destination (a recipient domain)."""

    def __init__(self, max_connections: int, connections_per_minute: int) -> None:
        self.max_connections = max_connections
        self.new_connections = RateWindow(connections_per_minute, 60.0)
        self.active = 0

    def can_open(self, now: float) -> bool:
        """May a new connection be opened now?"""
        return self.active < self.max_connections and self.new_connections.allowed(now)

    def open_wait(self, now: float) -> float:
        """Seconds until a new connection may open; ``inf`` when only a close can free one."""
        if self.active >= self.max_connections:
            return math.inf
        return self.new_connections.next_allowed(now) - now

    def opened(self, now: float) -> None:
        self.new_connections.record(now)

    def session_started(self) -> None:
        self.active += 1

    def session_ended(self) -> None:
        self.active = max(0, self.active - 1)
