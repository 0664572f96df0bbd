"""Wiring: configuration in, a running relay out (queue, TLS, intake, later delivery).

``ferry serve`` and the Python API both build a ``Service``; nothing else knows how
the stages are put together.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ferry.config import RelayConfig
from ferry.delivery.process import DeliveryProcess
from ferry.delivery.scheduler import Scheduler, flat_stats, stats_dir
from ferry.envelope import EnvelopeIn
from ferry.events import (
    Accepted,
    DeliveryTotals,
    HostnameNotFqdn,
    LeasesReleased,
    OperatorBulkAction,
    OutcomesReplayed,
    Started,
    Stopping,
    emit,
)
from ferry.intake.dispatch import IntakeDispatcher
from ferry.intake.server import IntakeServer, load_tls, run_hook
from ferry.message import message_id
from ferry.queue import open_queue
from ferry.queue.base import IdempotencyRecord
from ferry.queue.journal import journal_dir, replay
from ferry.queue.retention import Retention
from ferry.queue.selection import ALL_DESTINATIONS
from ferry.queue.sqlite import QueueDamaged, SqliteQueue

if TYPE_CHECKING:
    from ferry.http.server import Api
    from ferry.http.webhooks import WebhookSender
    from ferry.queue.postgres import PostgresQueue


def _node_identity() -> tuple[str, str]:
    """(host name, Ferry version) for the table of nodes sharing a PostgreSQL queue."""
    import importlib.metadata
    import socket

    try:
        version = importlib.metadata.version("ferry-relay")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return socket.gethostname(), version


# Who set the hold that `delivery.hold = true` stands for (lifted at a start without it).
HOLD_BY_CONFIG = "config:delivery.hold"

# How often `ferry serve` looks for operator actions to log.
OPERATOR_EVENTS_POLL = 1.0


def is_fqdn(name: str) -> bool:
    """A fully qualified domain name: at least two labels, not localhost, not an IP."""
    labels = name.rstrip(".").split(".")
    if len(labels) < 2 or any(not label for label in labels):
        return False
    if labels[-1].isdigit():
        return False  # an IPv4 address
    return name.rstrip(".").lower() not in ("localhost.localdomain",)


class AlreadyRunning(RuntimeError):
    """Another ``ferry serve`` holds this queue directory."""


def _clear_stats(config: RelayConfig) -> None:
    """Statistics are per run: the previous run's files go when a new run starts."""
    d = stats_dir(config)
    if d.is_dir():
        for f in d.glob("*.json"):
            f.unlink(missing_ok=True)


class Service:
    """The whole relay in one process."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        before_queue: Callable[[EnvelopeIn], Awaitable[None]] | None = None,
        lock: bool = True,
        config_file: str | None = None,
    ) -> None:
        self.config = config
        self.config_file = config_file
        self.before_queue = before_queue
        self.use_lock = lock
        self.queue: SqliteQueue | PostgresQueue | None = None
        self.intake: IntakeServer | IntakeDispatcher | None = None
        self.scheduler: Scheduler | None = None
        self.workers: list[DeliveryProcess] = []
        self.http: Api | None = None
        self.webhooks: WebhookSender | None = None
        self.retention: Retention | None = None
        self._lock: IO[str] | None = None
        self._operator_log: asyncio.Task[None] | None = None
        # Every destination suspended (re-read every second): accepting then wakes no
        # delivery process -- there is nothing it may do.
        self._held = config.delivery.hold

    async def start(self) -> None:
        self._take_lock()
        try:
            if self.config.http.listen:
                # Before the delivery workers start: they inherit where to count.
                from ferry.metrics import install, metrics_dir

                install(metrics_dir(self.config.data_dir), fresh=True)
            self.queue = queue = open_queue(self.config)
            # A damaged database would answer 451 to every message with the reason only
            # in the log: refuse to start instead, saying how to recover. (PostgreSQL:
            # connects and refuses a schema newer than this Ferry knows.)
            problems = await queue.check(quick=True)
            if problems and isinstance(queue, SqliteQueue):
                raise QueueDamaged(queue.db_path, problems)
            # One server per queue directory: leases left by a previous (crashed) run of
            # this node are ours to hand back at once instead of waiting for them to expire.
            # A PostgreSQL queue is shared by several nodes: the others' leases are theirs,
            # and a dead node's run out by themselves.
            if isinstance(queue, SqliteQueue):
                # First what a crashed run's workers journaled but never saw committed
                # (ferry/queue/journal.py): their leases are still theirs until below.
                replayed = await replay(queue, journal_dir(self.config.queue.path))
                if replayed:
                    emit(OutcomesReplayed(replayed, None))
            released = await queue.release_leases() if isinstance(queue, SqliteQueue) else 0
            if released:
                emit(LeasesReleased(released))
            if isinstance(queue, SqliteQueue):
                # Before intake accepts: a body without its row is a crash's leftover.
                await queue.sweep_spool()
            _clear_stats(self.config)
            # History purge in this process, the one that owns intake's writes.
            self.retention = Retention(self.queue, retention=self.config.queue.history_retention)
            self.retention.start()
            d = self.config.delivery
            # `delivery.hold` is the suspension of every destination, stored in the
            # queue like `ferry queue suspend '*'`: `ferry queue resume '*'` lifts it
            # without a restart; restarting with hold = false lifts it too.
            now = time.time()
            if d.hold:
                await self.queue.suspend(
                    ALL_DESTINATIONS,
                    now=now,
                    until=None,
                    reason="delivery.hold = true in the configuration",
                    by=HOLD_BY_CONFIG,
                )
            else:
                await self.queue.resume(ALL_DESTINATIONS, by=HOLD_BY_CONFIG)
            if d.workers == 0:
                self.scheduler = Scheduler(self.config, self.queue, owner=self._owner(0))
                await self.scheduler.start()
            else:
                # SQLite: this process is queue.db's one writer; workers send it their
                # writes (ferry/queue/remote.py). PostgreSQL: every process writes.
                writer = queue.relaxed() if isinstance(queue, SqliteQueue) else None
                for n in range(d.workers):
                    worker = DeliveryProcess(self.config, self._owner(n), writer)
                    await worker.start()
                    self.workers.append(worker)
            # no listeners (a library embedding Ferry): no certificate to make
            ssl_context = load_tls(self.config) if self.config.server.listen else None
            processes = self.config.server.workers
            if processes and self.config.server.listen and self.before_queue is None:
                # Sessions in intake processes; this one accepts and writes the queue.
                # (A before_queue hook is a Python callable of this process: with one,
                # sessions stay here.)
                self.intake = IntakeDispatcher(
                    self.config,
                    self.queue,
                    ssl_context=ssl_context,
                    on_accept=self._accepted,
                    processes=processes,
                )
            else:
                self.intake = IntakeServer(
                    self.config,
                    self.queue,
                    ssl_context=ssl_context,
                    on_accept=self._accepted,
                    before_queue=self.before_queue,
                )
            await self.intake.start()
            if not isinstance(queue, SqliteQueue):
                # Mail another node accepted wakes this node's delivery at once.
                await queue.listen(self._wake_delivery)
                # `ferry nodes`: this node, its heartbeat and the work its workers hold.
                await queue.register_node(self._owner(0).rsplit(":", 1)[0], *_node_identity())
            if self.config.webhooks:
                from ferry.http.webhooks import WebhookSender

                self.webhooks = WebhookSender(self.config, lambda: self.queue)
                await self.webhooks.start()
            if self.config.http.listen:
                from ferry.http.server import Api

                self.http = Api(self.config, self)
                await self.http.start()
        except BaseException:
            await self.stop()
            raise
        await self._log_start()
        self._operator_log = asyncio.get_running_loop().create_task(self._relay_operator_events())

    async def _log_start(self) -> None:
        """One line that says what this relay is: version, files, listeners, delivery."""
        from ferry import __version__

        assert self.queue is not None and self.intake is not None
        held = [s.domain for s in await self.queue.suspensions(now=time.time())]
        listeners = ",".join(f"{h}:{p}/{m}" for h, p, m in self.intake.bound())
        emit(
            Started(
                hostname=self.config.server.hostname,
                mode=self.config.delivery.mode,
                queue=str(Path(self.config.queue.path).resolve()),
                version=__version__,
                config=str(Path(self.config_file).resolve()) if self.config_file else "(defaults)",
                listeners=listeners or "none",
                intake_workers=(
                    len(self.intake.children) if isinstance(self.intake, IntakeDispatcher) else 0
                ),
                workers=self.config.delivery.workers,
                hold="all" if ALL_DESTINATIONS in held else "no",
                suspended=",".join(d for d in held if d != ALL_DESTINATIONS) or None,
            )
        )
        if not is_fqdn(self.config.server.hostname):
            emit(
                HostnameNotFqdn(
                    self.config.server.hostname,
                    "set server.hostname to this machine's public name (MX, HELO,"
                    " MAILER-DAEMON@ of bounces)",
                )
            )

    async def _relay_operator_events(self) -> None:
        """Log what operators do from other processes (`ferry queue hold ...`), and
        follow whether delivery is held."""
        assert self.queue is not None
        queue = self.queue
        last = await queue.last_operator_event()
        while True:
            await asyncio.sleep(OPERATOR_EVENTS_POLL)  # polling another process's writes
            try:
                for ev in await queue.operator_events(last):
                    last = ev["id"]
                    emit(
                        OperatorBulkAction(
                            ev["by"],
                            ev["action"],
                            ev["selection"],
                            ev["messages"],
                            ev["recipients"],
                        )
                    )
                held = await queue.suspensions(now=time.time())
                self._held = any(s.domain == ALL_DESTINATIONS for s in held)
            except RuntimeError:
                return  # the queue closed under us: stopping
            except Exception:
                logging.getLogger("ferry").exception("reading operator events")

    async def submit(
        self,
        envelope: EnvelopeIn,
        *,
        queue_id: str | None = None,
        idempotency: IdempotencyRecord | None = None,
        client: str = "api",
    ) -> str:
        """Queue a message durably (the same guarantee as SMTP's 250) and wake delivery.

        With ``idempotency``, raises :class:`IdempotencyReplay` when its key was used.
        """
        if self.queue is None:
            raise RuntimeError("the service is not running")
        if self.before_queue is not None:
            await run_hook(self.before_queue, envelope)
        lifetime = self.config.delivery.message_lifetime  # seconds, parsed at load
        qid = await self.queue.enqueue(
            envelope,
            queue_id=queue_id,
            expires=time.time() + lifetime,
            idempotency=idempotency,
        )
        emit(
            Accepted(
                queue_id=qid,
                client=client,
                sender=envelope.sender,
                recipients=tuple(r.address for r in envelope.recipients),
                size=len(envelope.data),
                priority=envelope.priority,
                message_id=message_id(envelope.data),
            )
        )
        self._accepted(qid)
        return qid

    def _owner(self, n: int) -> str:
        return f"{self.config.server.hostname}:{os.getpid()}:{n}"

    def _wake_delivery(self) -> None:
        if self.scheduler is not None:
            self.scheduler.notify()
        for worker in self.workers:
            worker.notify()

    def _accepted(self, _queue_id: str) -> None:
        if self.webhooks is not None:
            self.webhooks.notify()
        if self._held:
            return  # delivery picks the mail up by itself within seconds of a resume
        if self.scheduler is not None:
            self.scheduler.notify()
        for worker in self.workers:
            worker.notify()

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self.webhooks is not None:
            await self.webhooks.stop()
            self.webhooks = None
        if self._operator_log is not None:
            self._operator_log.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._operator_log
            self._operator_log = None
        if self.intake is not None:
            await self.intake.stop()
            self.intake = None
        for worker in self.workers:
            await worker.stop()
        self.workers.clear()
        if self.scheduler is not None:
            await self.scheduler.stop()
            emit(DeliveryTotals(flat_stats(self.scheduler.stats())))
            self.scheduler = None
        if self.retention is not None:
            await self.retention.stop()
            self.retention = None
        if self.queue is not None:
            await self.queue.close()
            self.queue = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _take_lock(self) -> None:
        if not self.use_lock:
            return
        path = Path(self.config.queue.path)
        path.mkdir(parents=True, exist_ok=True)
        fh = open(path / "serve.lock", "a+")  # noqa: SIM115 -- held for the service's life
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise AlreadyRunning(f"another ferry serve is using {path.resolve()}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._lock = fh

    async def run_forever(self) -> None:
        """Start, then run until SIGINT/SIGTERM; stop cleanly."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Before the start: a SIGTERM while starting (the children already run) is a
        # clean stop once the start is done, not the end of this process alone.
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            emit(Stopping())
            await self.stop()
