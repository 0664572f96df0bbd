"""Intake on more than one core: ``ferry serve`` accepts, intake processes hold the sessions.

``ferry serve`` is the queue's one writer (ferry/queue/remote.py); with the SMTP sessions
in the same process, intake and the writer shared one core under one GIL, and that
process was the relay's bottleneck (issue 12). With ``server.workers`` >= 1 this process
only accepts: it binds every listener, takes each new connection, decides the connection
limits (``max_connections``, ``max_connections_per_ip``: one count for the whole relay)
and hands the socket to the intake process with the fewest connections (SCM_RIGHTS over a
socket pair, Postfix's master hands its listening sockets to smtpd much the same way).
The process runs the whole SMTP session and sends back only what needs this one: the
message to queue (committed here, fsynced, before the 250 goes out; a large body it has
already written to the spool), AUTH failures to count (one throttle for every session),
and which connections are over.

A dead intake process loses its open connections (their clients retry: a 250 is only
ever sent after the commit) and is restarted; while none is running, new connections
wait in the listening sockets' backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
from collections.abc import Callable, Sequence

from ferry.config import Listener, RelayConfig
from ferry.envelope import EnvelopeIn
from ferry.events import Listening, emit
from ferry.intake.handover import HANDOVER, refusal_code
from ferry.intake.process import IntakeProcess
from ferry.intake.server import LocalAuthGate, QueueWriter, over_limit
from ferry.queue.base import IdempotencyRecord
from ferry.queue.sqlite import SqliteQueue

ACCEPT_BATCH = 64  # connections taken per wake-up: others' events are not starved
EMFILE_PAUSE = 1.0  # out of file descriptors: stop accepting this long (as asyncio does)


def bind(listener: Listener) -> socket.socket:
    """A non-blocking listening socket for ``listener`` (an IP address, ferry.config)."""
    family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "::" means IPv6 only, as asyncio's create_server binds it.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((listener.address, listener.port))
        except OSError as exc:
            # Named as asyncio's create_server names it (workers = 0): which address.
            where = (listener.address, listener.port)
            raise OSError(
                exc.errno, f"error while attempting to bind on address {where!r}: {exc.strerror}"
            ) from None
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class IntakeDispatcher:
    """Accepts on every listener and hands each connection to an intake process."""

    def __init__(
        self,
        config: RelayConfig,
        queue: QueueWriter,
        *,
        ssl_context: ssl.SSLContext | None,
        on_accept: Callable[[str], None] | None = None,
        processes: int = 1,
    ) -> None:
        self.config = config
        self.queue = queue
        self.ssl_context = ssl_context
        self.on_accept = on_accept
        self.processes = processes
        # One count of failed AUTH attempts for every intake process's sessions.
        self.auth_gate = LocalAuthGate()
        self.throttle = self.auth_gate.throttle
        self.children: list[IntakeProcess] = []
        self.sockets: list[tuple[socket.socket, Listener]] = []
        # Every connection handed over and not yet over: id -> (its process, the
        # address it counts against, None if it was refused and counts nowhere).
        self.open: dict[int, tuple[IntakeProcess, str | None]] = {}
        self.per_ip: dict[str, int] = {}
        self.counted = 0  # connections that count against max_connections
        self.accepted = 0  # messages queued
        self._ids = itertools.count(1)
        self._accepting = False
        self._stopping = False

    # -- life ------------------------------------------------------------------

    async def start(self) -> None:
        for listener in self.config.server.listen:
            if listener.mode == "smtps" and self.ssl_context is None:
                raise RuntimeError("smtps listener needs a TLS certificate")
            sock = bind(listener)
            self.sockets.append((sock, listener))
            host, port = sock.getsockname()[:2]
            emit(Listening(host, port, listener.mode))
        for n in range(self.processes):
            child = IntakeProcess(self.config, n, self)
            await child.start()
            self.children.append(child)
        self._resume_accepting()

    @property
    def open_connections(self) -> int:
        """Connections handed to an intake process and not yet reported over."""
        return len(self.open)

    def bound(self) -> list[tuple[str, int, str]]:
        """(address, port, mode) actually bound -- useful when port 0 was configured."""
        out: list[tuple[str, int, str]] = []
        for sock, listener in self.sockets:
            host, port = sock.getsockname()[:2]
            out.append((str(host), int(port), str(listener.mode)))
        return out

    async def stop(self) -> None:
        self._stopping = True
        self._pause_accepting()
        for sock, _listener in self.sockets:
            sock.close()
        self.sockets.clear()
        await asyncio.gather(*(child.stop() for child in self.children), return_exceptions=True)
        self.children.clear()

    # -- accepting -------------------------------------------------------------------

    def _resume_accepting(self) -> None:
        if self._accepting or self._stopping or not self.live_children():
            return
        loop = asyncio.get_running_loop()
        for index, (sock, _listener) in enumerate(self.sockets):
            loop.add_reader(sock.fileno(), self._accept, index)
        self._accepting = True

    def _pause_accepting(self) -> None:
        """New connections wait in the backlog (no intake process is running, or no
        file descriptor is left)."""
        if not self._accepting:
            return
        loop = asyncio.get_running_loop()
        for sock, _listener in self.sockets:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
        self._accepting = False

    def live_children(self) -> list[IntakeProcess]:
        return [c for c in self.children if c.ready]

    def _accept(self, index: int) -> None:
        sock, _listener = self.sockets[index]
        cfg = self.config.server
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS: the connection stays in the backlog; try later.
                log = logging.getLogger("ferry.intake")
                log.warning("accept: %s; pausing %ss", exc, EMFILE_PAUSE)
                self._pause_accepting()
                asyncio.get_running_loop().call_later(EMFILE_PAUSE, self._resume_accepting)
                return
            children = self.live_children()
            if not children:  # the last one died a moment ago
                conn.close()
                self._pause_accepting()
                return
            ip = str(addr[0])
            refused = over_limit(self.counted, self.per_ip.get(ip, 0), cfg)
            child = min(children, key=lambda c: c.connections)
            cid = next(self._ids)
            if refused is None:
                self.counted += 1
                self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            self.open[cid] = (child, ip if refused is None else None)
            child.connections += 1
            child.hand_over(conn, HANDOVER.pack(cid, index, refusal_code(refused)))

    def forget(self, cids: Sequence[int]) -> None:
        """These connections are over: they no longer count against the limits."""
        for cid in cids:
            entry = self.open.pop(cid, None)
            if entry is None:
                continue
            child, ip = entry
            child.connections -= 1
            if ip is not None:
                self.counted -= 1
                left = self.per_ip.get(ip, 1) - 1
                if left <= 0:
                    self.per_ip.pop(ip, None)
                else:
                    self.per_ip[ip] = left

    def lost(self, child: IntakeProcess) -> int:
        """An intake process is gone: its connections went with it. Returns how many."""
        gone = [cid for cid, (c, _ip) in self.open.items() if c is child]
        self.forget(gone)
        if not self.live_children():
            self._pause_accepting()
        return len(gone)

    def child_ready(self) -> None:
        self._resume_accepting()

    # -- the calls intake processes make (ferry/queue/remote.py runs them) ------------

    async def enqueue(
        self,
        envelope: EnvelopeIn,
        *,
        queue_id: str | None = None,
        expires: float | None = None,
        idempotency: IdempotencyRecord | None = None,
        spooled: tuple[str, int, int] | None = None,
    ) -> str:
        """Queue a message an intake process received; ``spooled``: it already wrote the
        body to the spool, as (segment, offset, size), and ``envelope.data`` is empty."""
        if spooled is not None:
            if not isinstance(self.queue, SqliteQueue) or queue_id is None:
                raise RuntimeError("a spooled body for a queue without a spool")
            segment, offset, size = spooled
            qid = await self.queue.enqueue_spooled(
                envelope,
                size,
                queue_id=queue_id,
                segment=segment,
                offset=offset,
                expires=expires,
                idempotency=idempotency,
            )
        else:
            qid = await self.queue.enqueue(
                envelope, queue_id=queue_id, expires=expires, idempotency=idempotency
            )
        self.accepted += 1
        if self.on_accept is not None:
            self.on_accept(qid)
        return qid

    async def auth_delay(self, ip: str) -> float:
        return await self.auth_gate.delay(ip)

    async def auth_failed(self, ip: str) -> int:
        return await self.auth_gate.failed(ip)

    async def auth_succeeded(self, ip: str) -> None:
        await self.auth_gate.succeeded(ip)

    async def closed(self, cids: list[int]) -> None:
        self.forget(cids)

    async def segment_sealed(self, segment: str) -> None:
        """An intake process has moved on from a spool segment (ferry/queue/spool.py)."""
        if isinstance(self.queue, SqliteQueue):
            await self.queue.seal_segment(segment)

    async def writer_gone(self, tag: str) -> None:
        """An intake process is gone and its calls are over: its segments are sealed."""
        if isinstance(self.queue, SqliteQueue):
            await self.queue.seal_writer(tag)
