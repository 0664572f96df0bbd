"""Traffic shaping per destination: connections, connection rate, message rates, backoff.

Pure and clock-injected: the scheduler asks "may I open a connection / send a message
now, and if not, when?" and never sleeps while holding anything, so a throttled
destination waits without stalling any other (the seed's code held one global lock
while sleeping).

When a destination answers ``421`` or ``452`` "too many ..." it is telling us to slow
down: the shaper halves its connection allowance and pauses new work for a while
(doubling on repeats), then ramps back up one connection per ``ramp_after`` clean
transactions -- additive increase, multiplicative decrease, as TCP does.
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
    """The limits of one destination (a recipient domain or an MX group)."""

    def __init__(
        self,
        max_connections: int,
        connections_per_minute: int,
        *,
        messages_per_minute: int = 0,
        messages_per_hour: int = 0,
        backoff_base: float = 30.0,
        backoff_cap: float = 600.0,
        ramp_after: int = 20,
        key: str = "",
    ) -> None:
        #: The destination these limits belong to (a domain or an MX group): with
        #: several nodes, the name of the limits they share (``queue.limits``).
        self.key = key
        self.max_connections = max_connections
        self.allowed_connections = max_connections  # lowered by backoff, ramps back up
        self.new_connections = RateWindow(connections_per_minute, 60.0)
        self.message_windows = [
            RateWindow(n, period)
            for n, period in ((messages_per_minute, 60.0), (messages_per_hour, 3600.0))
            if n > 0
        ]
        self.active = 0
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.ramp_after = ramp_after
        self.paused_until = 0.0
        #: Set when limits shared with other nodes said "not now" (no free connection
        #: slot, a shared rate spent): no new connection or message before then.
        self.shared_wait_until = 0.0
        self.backoffs = 0  # consecutive throttle replies
        self._clean = 0  # clean transactions since the last change

    # -- connections ------------------------------------------------------------

    def can_open(self, now: float) -> bool:
        """May a new connection be opened now?"""
        return self.open_wait(now) <= 0

    def open_wait(self, now: float) -> float:
        """Seconds until a new connection may open; ``inf`` when only a close can free one."""
        if self.active >= self.allowed_connections:
            return math.inf
        return (
            max(
                self.paused_until,
                self.shared_wait_until,
                self.new_connections.next_allowed(now),
            )
            - now
        )

    def opened(self, now: float) -> None:
        self.new_connections.record(now)

    def session_started(self) -> None:
        self.active += 1

    def session_ended(self) -> None:
        self.active = max(0, self.active - 1)

    # -- messages ---------------------------------------------------------------

    def send_wait(self, now: float) -> float:
        """Seconds until one more message may be sent (0: now)."""
        until = max(
            [
                self.paused_until,
                self.shared_wait_until,
                *(w.next_allowed(now) for w in self.message_windows),
            ]
        )
        return max(0.0, until - now)

    def wait_shared(self, until: float) -> None:
        """Limits shared with other nodes refused: try again no sooner than ``until``."""
        self.shared_wait_until = max(self.shared_wait_until, until)

    def message_rates(self) -> list[tuple[int, float]]:
        """The message-rate windows as ``(limit, period)`` (for the shared count)."""
        return [(w.limit, w.period) for w in self.message_windows]

    def reserve_send(self, now: float) -> None:
        """Count one message against the rates when it is decided, not when it is done:
        concurrent sessions of this destination must not all take the last slot."""
        for window in self.message_windows:
            window.record(now)

    def sent(self, now: float, *, reserved: bool = False) -> None:
        """A transaction went through (whatever the recipients' fates)."""
        if not reserved:
            self.reserve_send(now)
        self._clean += 1
        if self.backoffs and self._clean >= self.ramp_after:
            self.backoffs = 0
        if self.allowed_connections < self.max_connections and self._clean >= self.ramp_after:
            self.allowed_connections += 1
            self._clean = 0

    def throttled(self, now: float) -> float:
        """The destination said "too many" (421 / 452): back off. Returns the pause."""
        self.backoffs += 1
        self._clean = 0
        self.allowed_connections = max(1, self.allowed_connections // 2)
        pause = float(min(self.backoff_cap, self.backoff_base * 2.0 ** (self.backoffs - 1)))
        self.paused_until = max(self.paused_until, now + pause)
        return pause

    def state(self, now: float) -> dict[str, float | int]:
        """For statistics."""
        return {
            "active_connections": self.active,
            "allowed_connections": self.allowed_connections,
            "paused_for": round(max(0.0, self.paused_until - now), 1),
            "backoffs": self.backoffs,
        }


def is_throttle_reply(code: int, text: str) -> bool:
    """421 (service closing / too many connections) or 452 "too many ..." (RFC 5321)."""
    if code == 421:
        return True
    return code == 452 and "too many" in text.lower()
