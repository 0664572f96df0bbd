"""History retention: finished messages are purged after ``queue.history_retention``.

A message's body goes as soon as its last recipient is final (in that same
transaction, see ``Queue.record``); its envelope, recipients and attempt history stay
for tracing (``ferry queue show``) until the retention has passed, then ``purge``
deletes them here, in small batches so that intake and delivery, which write the same
database, never wait long behind it. Afterwards the pages freed beyond a reserve kept
for reuse are given back to the file system in small steps, so the file follows the
queue instead of only growing.

In ``ferry serve`` the service process runs this in the background (``Retention``):
it is the process that owns intake's writes, so purges are grouped with them instead
of adding a writer; ``ferry queue purge`` runs the same ``purge_history`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from ferry.events import Purged, emit
from ferry.queue.base import Queue

#: Messages deleted per transaction: a few milliseconds of write lock at most.
PURGE_BATCH = 500
#: Pages given back per transaction (4 KiB pages: 1 MiB).
RECLAIM_STEP = 256
#: Free pages up to this share of the file are kept: new mail reuses them at no cost.
KEEP_FREE = 0.10
#: How often the background purge runs in ``ferry serve``.
INTERVAL = 60.0
#: Between two batches the database is left to intake and delivery for this long.
PAUSE = 0.01

log = logging.getLogger("ferry.queue")


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """What one purge did: messages deleted, pages given back to the file system."""

    messages: int
    pages: int


def pages_to_reclaim(free: int, total: int, keep: float = KEEP_FREE) -> int:
    """How many free pages to give back so that at most ``keep`` of the file stays free.

    Each page given back also shrinks the file, hence the division: after giving back
    x pages, (free - x) <= keep * (total - x).
    """
    return max(0, math.ceil((free - keep * total) / (1 - keep) - 1e-9))


async def reclaim(
    queue: Queue, *, step: int = RECLAIM_STEP, pause: float = PAUSE, keep: float = KEEP_FREE
) -> int:
    """Give free pages beyond the reserve back to the file system, ``step`` at a time."""
    free, total = await queue.free_space()
    want = pages_to_reclaim(free, total, keep)
    done = 0
    while done < want:
        n = await queue.reclaim_space(pages=min(step, want - done))
        if n <= 0:
            break
        done += n
        if pause and done < want:
            await asyncio.sleep(pause)  # pacing: let other writers in between steps
    if done:
        await queue.checkpoint()  # the file shrinks now, not at the next busy moment
    return done


async def purge_history(
    queue: Queue,
    *,
    now: float,
    retention: float,
    batch: int = PURGE_BATCH,
    pause: float = PAUSE,
) -> PurgeResult:
    """Delete every message finished more than ``retention`` seconds before ``now``."""
    before = now - retention
    total = 0
    while True:
        n = await queue.purge(before=before, limit=batch)
        total += n
        if n < batch:
            break
        if pause:
            await asyncio.sleep(pause)  # pacing: let other writers in between batches
    pages = await reclaim(queue, pause=pause)
    # Finished mail's bodies in shared segments: copied out of and freed with them.
    await queue.compact_spool()
    return PurgeResult(total, pages)


class Retention:
    """The background purge of ``ferry serve``: every ``interval`` seconds, and at start."""

    def __init__(
        self,
        queue: Queue,
        *,
        retention: float,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.time,
        pause: float = PAUSE,
    ) -> None:
        self.queue = queue
        self.retention = retention
        self.interval = interval
        self.clock = clock  # injectable: tests move time forward instead of waiting
        self.pause = pause
        self.purged = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def run_once(self) -> PurgeResult:
        result = await purge_history(
            self.queue, now=self.clock(), retention=self.retention, pause=self.pause
        )
        self.purged += result.messages
        if result.messages or result.pages:
            emit(Purged(result.messages, result.pages))
        return result

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def wake(self) -> None:
        """Run a purge now instead of at the next interval."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed purge is retried at the next interval
                log.exception("purging the queue history failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
