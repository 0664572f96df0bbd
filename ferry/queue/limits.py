"""Limits several delivering processes must share: connection slots and rate windows.

Delivery keeps its own counts per process (``delivery/shaping.py``: sessions, sliding
rate windows, backoff; one semaphore per smart host). With one node that is the whole
truth, and :class:`LocalLimits` adds nothing to it. With several ``ferry serve`` nodes on
one PostgreSQL queue each node's counts see only its own traffic, so the same limits are
also taken from the database (``postgres_limits.PostgresLimits``): a destination's cap of
2 connections then holds across all nodes, not 2 per node.

The contract, for whoever delivers:

- :meth:`SharedLimits.take_slot` -- one of ``cap`` connection slots of a destination,
  held while the connection is open (also while it waits idle in the pool), or None.
- :meth:`SharedLimits.take_rate` -- count one event (a message, a new connection) in
  every window given, or say how long to wait when one of them is full.
- :meth:`SharedLimits.share` and :meth:`SharedLimits.claim` -- small state records
  (a smart host's circuit breaker) stamped with the time they changed: the latest change
  wins, and a change may be claimed only by whoever saw the latest state (the one
  half-open probe of a breaker, for all nodes).

They fail *closed*: when the shared state cannot be read (the database is unreachable)
the answer is "no slot" / "wait" / "not claimed", never "go ahead unlimited"; ``share``
then returns nothing and each node keeps its own view.

The rate windows are counted in buckets (:func:`rate_wait`): pure functions here, so the
database side stays a thin edge.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

#: A shared state record: (when it last changed, its fields as JSON values).
Record = tuple[float, dict[str, Any]]

#: Buckets per rate window. A window of ``period`` seconds is checked over the last
#: ``RATE_BUCKETS + 1`` buckets of ``period / RATE_BUCKETS`` seconds (see rate_wait).
RATE_BUCKETS = 10


class Slot(Protocol):
    """One connection slot of a destination, held until released."""

    @property
    def held(self) -> bool:
        """False once the slot is lost (its holder's database session ended)."""
        ...

    def release(self) -> None:
        """Give the slot back (idempotent; never blocks)."""
        ...


class SharedLimits(Protocol):
    """Connection slots and rates shared by every process that delivers (see module)."""

    #: True when other nodes share these limits (PostgreSQL); False for one process.
    shared: bool

    async def take_slot(self, key: str, cap: int) -> Slot | None:
        """One of ``cap`` slots of destination ``key``; None when all are taken (or the
        shared state is unreachable)."""
        ...

    async def take_rate(self, key: str, windows: Sequence[tuple[int, float]], now: float) -> float:
        """Count one event of ``key`` in each ``(limit, period)`` window and return 0, or
        return the seconds to wait (nothing counted) when a window is full."""
        ...

    async def share(
        self, kind: str, changed: Mapping[str, Record], *, after: float = -math.inf
    ) -> dict[str, Record]:
        """Publish the ``changed`` records of ``kind`` (each kept only if it changed later
        than the one stored) and return the stored records of ``kind`` that changed
        after ``after``."""
        ...

    async def claim(self, kind: str, name: str, seen: float, record: Record) -> Record | None:
        """Store ``record`` only if the stored one changed no later than ``seen`` (what
        the caller based its change on). None: stored; else the record that stands
        (``(-inf, {})`` when it cannot be known)."""
        ...

    async def close(self) -> None: ...


class _FreeSlot:
    """The slot of a process whose own counts are the limit: always held."""

    held = True

    def release(self) -> None:
        pass


FREE_SLOT: Slot = _FreeSlot()


class LocalLimits:
    """One process delivers alone (SQLite): its own counts are already the limits."""

    shared = False

    async def take_slot(self, key: str, cap: int) -> Slot | None:
        return FREE_SLOT

    async def take_rate(self, key: str, windows: Sequence[tuple[int, float]], now: float) -> float:
        return 0.0

    async def share(
        self, kind: str, changed: Mapping[str, Record], *, after: float = -math.inf
    ) -> dict[str, Record]:
        return {}

    async def claim(self, kind: str, name: str, seen: float, record: Record) -> Record | None:
        return None

    async def close(self) -> None:
        pass


# -- pure parts ------------------------------------------------------------------------


def lock_key(name: str) -> int:
    """A signed 32-bit advisory-lock key for ``name``, the same on every node.

    Two names may share a key (1 in 2**32): they then share slots, which is stricter than
    configured, never looser.
    """
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big", signed=True)


def bucket_width(period: float) -> float:
    return period / RATE_BUCKETS


def bucket_of(now: float, period: float) -> int:
    """The bucket of a ``period``-second window that ``now`` falls in."""
    return math.floor(now / bucket_width(period))


def first_bucket(now: float, period: float) -> int:
    """The oldest bucket that counts at ``now``.

    ``RATE_BUCKETS + 1`` buckets are counted (the current one and ``RATE_BUCKETS``
    before it): they cover at least the last ``period`` seconds whatever ``now``, so no
    ``period``-long interval ever holds more than ``limit`` events. The price: an event
    may count for up to ``period * (1 + 1/RATE_BUCKETS)`` seconds.
    """
    return bucket_of(now, period) - RATE_BUCKETS


def rate_wait(buckets: Mapping[int, int], now: float, limit: int, period: float) -> float:
    """Seconds until one more event fits ``limit`` per ``period`` (0: it fits now).

    ``buckets`` maps a bucket number (:func:`bucket_of`) to its count; buckets older than
    :func:`first_bucket` are ignored. When full, the wait ends when enough of the oldest
    buckets have left the counted range.
    """
    if limit < 1 or period <= 0:
        raise ValueError("limit must be >= 1 and period > 0")
    first = first_bucket(now, period)
    counted = sorted((b, n) for b, n in buckets.items() if b >= first and n > 0)
    total = sum(n for _, n in counted)
    if total < limit:
        return 0.0
    width = bucket_width(period)
    for b, n in counted:
        total -= n
        if total < limit:
            # Bucket b stops counting when b < first_bucket(t), i.e. at bucket b + 11.
            return max(0.0, (b + RATE_BUCKETS + 1) * width - now)
    raise AssertionError("unreachable: the last bucket empties the window")
