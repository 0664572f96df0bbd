"""Delivery in its own process, beside intake (Postfix's smtpd / qmgr split).

One Python process is bound to one core by the GIL. With intake and delivery in separate
processes sharing the queue, accepting and delivering run in parallel: on two cores the
end-to-end rate goes from ~1,200 to ~1,700 msgs/s (bench/delivery.py). The queue stays
the only state: the worker claims and records through it like any node would.

The parent sends the validated configuration (secrets included) on the child's stdin --
never on its command line -- and pokes a pipe whenever a message is accepted, so new
mail is picked up at once. A worker that dies is restarted and its leases handed back.

With SQLite the parent is the only writer of queue.db (issue 12, one writer per
database): the worker reads on read-only connections and sends its writes (claims,
outcomes, leases) over a socket pair to the parent, which runs them on intake's writer
thread (ferry/queue/remote.py). With PostgreSQL every process writes directly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

from ferry.config import RelayConfig, config_payload
from ferry.events import DeliveryTotals, OutcomesReplayed, WorkerDied, WorkerStarted, emit
from ferry.queue.journal import OutcomeJournal, journal_dir, replay
from ferry.runtime import ChildProcess

if TYPE_CHECKING:
    from ferry.delivery.scheduler import Scheduler
    from ferry.queue.base import Queue

RESTART_DELAY = 1.0

# The parent is gone: what the worker still tries to finish before it exits. Nothing
# can be recorded any more (the writer is gone); the next `ferry serve` hands back
# every lease this worker held and delivers again only what was in flight.
PARENT_GONE_GRACE = 2.0


class DeliveryProcess(ChildProcess):
    """The parent's handle on one delivery worker process."""

    RESTART_DELAY = RESTART_DELAY
    LOGGER = "ferry.delivery"

    def __init__(self, config: RelayConfig, owner: str, queue: Queue | None = None) -> None:
        """``queue``: the parent's SQLite queue, which runs the worker's writes (the
        worker opens the database read-only); None: the worker writes its own queue
        (PostgreSQL, made for many writers)."""
        super().__init__()
        self.config = config
        self.owner = owner
        self.queue = queue
        self._wfd: int | None = None
        self._poke_due = False

    async def _spawn(self) -> None:
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        args = ["--owner", self.owner, "--notify-fd", str(rfd)]
        fds = [rfd]
        ours: socket.socket | None = None
        theirs: socket.socket | None = None
        if self.queue is not None:
            ours, theirs = socket.socketpair()
            args += ["--queue-fd", str(theirs.fileno())]
            fds.append(theirs.fileno())
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ferry.delivery.process", *args],
                stdin=subprocess.PIPE,
                pass_fds=fds,
            )
        finally:
            os.close(rfd)
            if theirs is not None:
                theirs.close()
        if ours is not None:
            from ferry.queue.remote import QueueServer

            assert self.queue is not None
            server = QueueServer(self.queue, ours)
            await server.start()
            self.server = server
        assert self.proc.stdin is not None
        self.proc.stdin.write(config_payload(self.config).encode())
        self.proc.stdin.close()
        if self._wfd is not None:
            os.close(self._wfd)
        self._wfd = wfd
        emit(WorkerStarted(self.proc.pid, self.owner))

    async def _died(self, code: int) -> None:
        """Its leases go back to the queue before the restart."""
        assert self.proc is not None
        emit(WorkerDied(self.proc.pid, code))
        # Its last claims commit before the release, or they would stay leased.
        await self._close_server()
        await self._replay()
        await self._release()

    async def _replay(self) -> None:
        """Record what the dead worker journaled but had not seen committed (before its
        leases go back: a recipient no longer leased to it would be skipped)."""
        if self.queue is None:
            return  # PostgreSQL: workers commit their outcomes themselves, no journal
        replayed = await replay(self.queue, journal_dir(self.config.queue.path), self.owner)
        if replayed:
            emit(OutcomesReplayed(replayed, self.owner))

    async def _release(self) -> None:
        """Hand this worker's leases back to the queue (it is gone)."""
        if self.queue is not None:
            await self.queue.release_leases(self.owner)
            return
        from ferry.queue import open_queue

        queue = open_queue(self.config)
        try:
            await queue.release_leases(self.owner)
        finally:
            await queue.close()

    def notify(self) -> None:
        """New mail: wake the worker. Coalesced: one write per turn of the event loop,
        however many messages were accepted in it (a system call per message was 1.6 %
        of the serve process at 1 KB); a full pipe already means "wake"."""
        if self._poke_due:
            return
        try:
            asyncio.get_running_loop().call_soon(self._poke)
        except RuntimeError:  # no loop running (a caller outside it): poke at once
            self._poke()
            return
        self._poke_due = True

    def _poke(self) -> None:
        self._poke_due = False
        if self._wfd is not None:
            with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
                os.write(self._wfd, b"\0")

    async def stop(self, timeout: float = 30.0) -> None:
        if await self._terminate(timeout):
            # it could not release its own leases: do it for it
            with contextlib.suppress(Exception):
                await self._close_server()
                await self._replay()
                await self._release()
        await self._close_server()
        await self._stop_watching()
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None


async def _open_queue(config: RelayConfig, queue_fd: int | None) -> tuple[Queue, asyncio.Event]:
    """The worker's queue, and an event set when the process that writes it is gone."""
    from ferry.queue import open_queue

    gone = asyncio.Event()
    if queue_fd is None:
        # PostgreSQL: this process writes the shared database itself (row locks, MVCC).
        return open_queue(config, durable=False), gone
    from ferry.queue.remote import ForwardingQueue, QueueLink
    from ferry.queue.sqlite import SqliteQueue

    # Read-only: this process never takes queue.db's write lock; its writes go to the
    # parent, the database's one writer.
    reader = SqliteQueue(config.queue.path, readonly=True)
    link = await QueueLink(socket.socket(fileno=queue_fd)).open()
    return ForwardingQueue(reader, link), link.lost


async def _worker(config: RelayConfig, owner: str, notify_fd: int, queue_fd: int | None) -> None:
    from ferry.delivery.scheduler import Scheduler, flat_stats

    queue, parent_gone = await _open_queue(config, queue_fd)
    # A worker of a SQLite queue: outcomes go to its journal before the next
    # transaction, and are committed by the parent behind it (ferry/queue/journal.py).
    journal = (
        OutcomeJournal(journal_dir(config.queue.path), owner) if queue_fd is not None else None
    )
    scheduler = Scheduler(config, queue, owner=owner, journal=journal)
    loop = asyncio.get_running_loop()
    os.set_blocking(notify_fd, False)

    stop = asyncio.Event()

    def poked() -> None:
        with contextlib.suppress(BlockingIOError):
            if not os.read(notify_fd, 4096):
                # The parent is gone (even SIGKILLed): stop cleanly rather than deliver
                # beside the next `ferry serve`, which hands back every lease it finds.
                loop.remove_reader(notify_fd)
                stop.set()
                return
        scheduler.notify()

    loop.add_reader(notify_fd, poked)
    watch = loop.create_task(parent_gone.wait())
    watch.add_done_callback(lambda _t: stop.set())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await scheduler.start()
    try:
        await stop.wait()
    finally:
        watch.cancel()
        with contextlib.suppress(Exception):
            loop.remove_reader(notify_fd)
        await _stop_scheduler(scheduler, parent_gone)
        emit(DeliveryTotals(flat_stats(scheduler.stats())))
        if journal is not None:
            journal.close()  # deleted if every entry committed; else the parent replays it
        await queue.close()


async def _stop_scheduler(scheduler: Scheduler, parent_gone: asyncio.Event) -> None:
    """Stop cleanly (outcomes written, leases handed back) -- unless the process that
    writes the queue is gone: then nothing more can be written, so do not wait for it
    (the sessions stop before their next transaction, as in a crash)."""
    loop = asyncio.get_running_loop()
    stopping = loop.create_task(scheduler.stop())
    gone = loop.create_task(parent_gone.wait())
    await asyncio.wait({stopping, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not stopping.done():
        await asyncio.wait({stopping}, timeout=PARENT_GONE_GRACE)
        stopping.cancel()
    try:
        await stopping
    except (Exception, asyncio.CancelledError):
        if not parent_gone.is_set():
            raise


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ferry-delivery", description=__doc__)
    ap.add_argument("--owner", required=True)
    ap.add_argument("--notify-fd", type=int, required=True)
    ap.add_argument("--queue-fd", type=int, default=None)
    args = ap.parse_args(argv)
    from ferry.runtime import child_start, run_async

    config = child_start()
    run_async(_worker(config, args.owner, args.notify_fd, args.queue_fd))


if __name__ == "__main__":
    main()
